"""OpSet: ops given to the model, resolved once; probing shapes checks nothing; one randomness draw."""
import copy
import pickle

import pytest
import torch

import microdit
from microdit import edm
from microdit.models.checkpoint import infer_config
from microdit.ops.opset import BoundOp, build_ops, probe_ops
from microdit.ops.registry import ALL_OPS, BackendError


def test_build_ops_binds_every_op_and_checks_names():
    ops = build_ops({"moe": "reference"})
    assert set(ops.backends()) == set(ALL_OPS) and ops.moe == BoundOp("moe", "reference")
    assert ops["mask_tokens"].backend is None  # automatic per call
    with pytest.raises(ValueError, match="unknown ops"):
        build_ops({"nope": "torch"})
    with pytest.raises(BackendError, match="no backend 'nope'"):
        build_ops({"moe": "nope"})
    with pytest.raises(AttributeError, match="no op 'nope'"):
        ops.nope


def test_env_choice_is_resolved_when_built(monkeypatch):
    monkeypatch.setenv("MICRODIT_BACKEND", "mask_tokens=reference")
    assert build_ops().mask_tokens.backend == "reference"
    assert probe_ops().mask_tokens.backend is None  # probing reads no environment


def test_the_model_runs_the_ops_it_is_given():
    cfg = microdit.preset_config("MicroDiT_Test_2")
    model = microdit.MicroDiT(cfg, ops=build_ops({"moe": "reference", "unmask_tokens": "torch"}))
    assert model.ops.moe.backend == "reference" and "backend=reference" in repr(model.blocks[1].mlp)
    # unmask_unpatchify keeps its own (automatic) choice: unmask_tokens' is not carried over
    assert model.ops.unmask_unpatchify.backend is None
    assert copy.deepcopy(model).ops.backends() == model.ops.backends()
    assert pickle.loads(pickle.dumps(model.ops)).backends() == model.ops.backends()


def test_shape_probing_runs_no_availability_check(monkeypatch):
    sd = microdit.create_model("MicroDiT_Test_2").state_dict()
    calls = []
    for op in ALL_OPS.values():
        monkeypatch.setattr(op, "_available", {})  # nothing cached: a check would run now
        monkeypatch.setattr(op, "reasons", lambda name, op=op: calls.append((op.name, name)) or [])
    assert infer_config(sd, "sd").dim == microdit.preset_config("MicroDiT_Test_2").dim
    assert calls == []


def test_draw_step_is_the_trainers_and_the_losses_randomness():
    model = microdit.create_model("MicroDiT_Test_2")
    x0, y = torch.randn(4, 4, 8, 8), torch.randn(4, 5, 32)
    g = torch.Generator().manual_seed(7)
    step = edm.draw_step(4, x0.shape[1:], patch_size=2, mask_ratio=0.5, ops=model.ops, generator=g)
    g = torch.Generator().manual_seed(7)  # the same draws in the same order, by hand
    rnd, noise = torch.randn(4, 1, 1, 1, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    ids = model.ops.keep_indices(4, 16, 0.5, None, g)
    assert torch.equal(step.rnd_normal, rnd) and torch.equal(step.noise, noise) and torch.equal(step.ids_keep, ids)
    assert torch.equal(step[1::2].ids_keep, ids[1::2])
    with torch.no_grad():
        by_step = edm.loss(lambda *a, **k: model(*a, **k), x0, y, step=step)  # a wrapped model needs only `step`
        by_parts = edm.loss(model, x0, y, rnd_normal=rnd, noise=noise, ids_keep=ids)
    assert torch.equal(by_step, by_parts)
    with pytest.raises(TypeError, match="pass step=edm.draw_step"):
        edm.loss(lambda *a, **k: model(*a, **k), x0, y)
