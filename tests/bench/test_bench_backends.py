"""`microdit bench --backends` configurations that pin single ops (attention=flash_attn, ...)."""
import os

import pytest

from microdit.bench import step
from microdit.ops import import_all
from microdit.ops.registry import ALL_OPS


def test_op_pinning_configurations():
    import_all()
    assert step.backends_reasons("attention=sdpa+ln_modulate=torch") == []
    with step.backend_choice("attention=reference+swiglu=reference"):
        assert ALL_OPS["attention"].resolve(None) == "reference" and ALL_OPS["swiglu"].resolve(None) == "reference"
        assert ALL_OPS["moe"].resolve(None) is None  # the rest stays automatic
    assert "MICRODIT_BACKEND" not in os.environ
    assert "flash_attn" in step.backends_reasons("attention=flash")[0]
    assert "unknown_op" in step.backends_reasons("unknown_op=x")[0]


def test_cli_rejects_a_bad_configuration():
    import argparse

    from microdit.bench import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--backends", "fast,attention=cudnn", "--device", "cpu"])
    with pytest.raises(SystemExit, match="attention=cudnn"):
        cli.cmd_bench(args)


def test_a_pin_that_cannot_run_here_is_skipped_with_its_reason(monkeypatch):
    """attention=flash_attn on a machine without flash-attn (or CUDA): a skipped row naming the
    backend's own reason, never built and timed; a pin that can run is measured."""
    import_all()
    why = ALL_OPS["attention"].reasons("flash_attn")
    assert why  # this machine has no flash-attn beside a CPU torch
    assert step.pinned_unavailable("fast") == [] and step.pinned_unavailable("attention=sdpa") == []
    assert step.pinned_unavailable("attention=sdpa+attention=flash_attn") == ["attention=flash_attn: " + "; ".join(why)]
    assert "not reference, fast or OP=BACKEND" in step.pinned_unavailable("fast+attention=sdpa")[0]  # no KeyError
    measured = []

    def fake_measure(spec, b, m, p, peaks):
        measured.append(b)
        return {"backends": b, "precision": p, "status": "ok"}

    monkeypatch.setattr(step, "measure", fake_measure)
    spec = step.StepSpec(preset="MicroDiT_Test_2", phase=1, device="cpu", micro_batch=1, steps=1, warmup=0)
    rows = step.run_matrix(spec, backends=("attention=sdpa", "attention=flash_attn"), modes=("eager",),
                           precisions=["fp32"], peaks={"measured_tflops": 1.0, "datasheet": {}})
    by = {(r["backends"], r["precision"]): r for r in rows}
    assert measured == ["attention=sdpa"]
    assert by[("attention=flash_attn", "fp32")]["status"] == "skipped"
    assert by[("attention=flash_attn", "fp32")]["reason"] == "attention=flash_attn: " + "; ".join(why)
