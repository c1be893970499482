"""The cost arithmetic of `microdit bench`: GPU-hours, the paper's schedule, schedules from files."""
from pathlib import Path

import pytest

from microdit.bench import cost
from microdit.models.flops import model_flops
from microdit.models.presets import preset_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the shipped configs in the checkout


def test_gpu_hours_arithmetic():
    # 1,000 steps x 256 images at 64 images/s: 4,000 s.
    assert cost.gpu_hours(1000, 256, 64.0) == pytest.approx(4000 / 3600)
    with pytest.raises(ValueError, match="images_per_s"):
        cost.gpu_hours(1, 1, 0.0)


def test_paper_schedule_at_paper_rate_is_504_gpu_hours():
    rates = cost.paper_rates()
    total = sum(cost.gpu_hours(s, b, rates[p]) for p, (s, b) in cost.PAPER_SCHEDULE.items())
    assert total == pytest.approx(504.0, rel=1e-12)
    # The derivation: one FLOP rate over the run, so rate x FLOPs/image is the same in every phase.
    per_image = {p: model_flops(preset_config("MicroDiT_XL_2", input_size=s), m).training
                 for p, (s, m) in {1: (32, 0.75), 2: (32, 0.0), 3: (64, 0.75), 4: (64, 0.0)}.items()}
    flop_rates = [rates[p] * per_image[p] for p in rates]
    assert max(flop_rates) == pytest.approx(min(flop_rates))
    assert flop_rates[0] / 1e12 == pytest.approx(181.1, abs=0.1)  # TFLOP/s per H100
    assert rates[1] == pytest.approx(641.85, abs=0.01)


def test_cost_report_at_paper_rates_matches_the_paper():
    rates = cost.paper_rates()
    rep = cost.cost_report({p: {"fast": 2 * r, "reference": r} for p, r in rates.items()})
    t = rep["total"]
    assert t["paper_gpu_hours"] == pytest.approx(504.0)
    assert t["reference_gpu_hours"] == pytest.approx(504.0)
    assert t["reference_dollars"] == pytest.approx(1890.0)
    assert t["fast_gpu_hours"] == pytest.approx(252.0)
    assert all(r["fast_over_reference"] == pytest.approx(2.0) for r in rep["phases"].values())
    assert rep["incomplete"] == []
    cheap = cost.cost_report({p: {"fast": r} for p, r in rates.items()}, price=2.0)
    assert cheap["total"]["fast_dollars"] == pytest.approx(1008.0)
    assert len(cheap["incomplete"]) == 4  # the reference was not measured: said, not hidden
    with pytest.raises(ValueError, match="price"):
        cost.cost_report({}, price=0)


def test_schedule_from_strings_and_training_configs():
    assert cost.parse_schedule(["1:1000x256", " 3 : 20x64 "]) == {1: (1000, 256), 3: (20, 64)}
    # The shipped phase configs map back onto their phases (resolution / 8 and mask ratio).
    assert cost.parse_schedule([str(CONFIGS / "phase3.yaml")]) == {3: (50_000, 2048)}
    assert cost.parse_schedule([str(CONFIGS / "phase2.yaml")]) == {2: (30_000, 2048)}
    with pytest.raises(ValueError, match="PHASE:STEPSxBATCH"):
        cost.parse_schedule(["5:10x10"])
    with pytest.raises(ValueError, match="demo.yaml"):
        cost.parse_schedule([str(CONFIGS / "demo.yaml")])  # 32 px: none of the phases
    rep = cost.cost_report({1: {"fast": 100.0}}, schedule={1: (1000, 360)})
    assert rep["phases"]["1"]["fast_gpu_hours"] == pytest.approx(1.0)
    assert list(rep["phases"]) == ["1"]
