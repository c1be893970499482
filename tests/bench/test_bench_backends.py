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
