"""`microdit bench`: the end-to-end training-step benchmark and the cost report.

    from microdit import bench
    results = bench.run(bench.StepSpec(preset="MicroDiT_Micro_2", device="cpu"), phases=[1, 2])
    bench.write(results, "benches/results")   # JSON, markdown, cost report (md, png, json)
"""
from .cost import PAPER_GPU_HOURS, PAPER_PRICE, PAPER_SCHEDULE, cost_report, gpu_hours, paper_rates, parse_schedule
from .report import headline, results_stem, run, table_markdown, write
from .step import BACKENDS, MODES, PHASES, PRECISIONS, StepSpec, run_matrix, trainer_check

__all__ = ["BACKENDS", "MODES", "PAPER_GPU_HOURS", "PAPER_PRICE", "PAPER_SCHEDULE", "PHASES", "PRECISIONS",
           "StepSpec", "cost_report", "gpu_hours", "headline", "paper_rates", "parse_schedule", "results_stem",
           "run", "run_matrix", "table_markdown", "trainer_check", "write"]
