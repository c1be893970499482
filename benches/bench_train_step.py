"""A whole training step (the trainer's own `step_once`, batch on the device) per backends x
mode, through pytest-benchmark: the same code as `microdit bench`, which also profiles, costs
and writes benches/results/.

    pytest benches/bench_train_step.py --benchmark-columns=min,median,rounds
    MICRODIT_BENCH_PRESET=MicroDiT_XL_2 MICRODIT_BENCH_PHASE=3 pytest benches/bench_train_step.py -k eager

Environment: MICRODIT_BENCH_PRESET (default MicroDiT_Micro_2), MICRODIT_BENCH_PHASE (1..4,
default 1), MICRODIT_BENCH_MICRO_BATCH (default the phase's; on the CPU / 32). Compiled
configurations take minutes to compile on a small CPU.
"""
import os
import tempfile

import pytest
import torch

from microdit.bench import step

PRESET = os.environ.get("MICRODIT_BENCH_PRESET", "MicroDiT_Micro_2")
PHASE = int(os.environ.get("MICRODIT_BENCH_PHASE", "1"))
MICRO = os.environ.get("MICRODIT_BENCH_MICRO_BATCH")


@pytest.mark.parametrize("mode", step.MODES)
@pytest.mark.parametrize("backends", step.BACKENDS)
def test_train_step(benchmark, device, backends, mode):
    spec = step.StepSpec(preset=PRESET, phase=PHASE, device=device,
                         micro_batch=int(MICRO) if MICRO else None).resolved()
    precision = step.default_precisions(torch.device(device))[0]
    with tempfile.TemporaryDirectory() as out, step.backend_choice(backends):
        trainer = step.make_trainer(spec, backends, mode, precision, out)
        batches = [next(iter(trainer.loader))] * trainer.accum

        def one_step():
            trainer.step_once(batches)
            step.timing.sync(device)

        benchmark.pedantic(one_step, rounds=spec.steps, warmup_rounds=spec.warmup)
        trainer.lock.release()
        sec = benchmark.stats.stats.median
        benchmark.extra_info.update(preset=PRESET, phase=PHASE, micro_batch=spec.micro_batch, precision=precision,
                                    images_per_s=spec.micro_batch / sec,
                                    model_tflops=spec.micro_batch / sec * trainer.flops / 1e12)
