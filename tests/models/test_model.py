"""MicroDiT forward behaviour: masking variants, shapes, resolution changes, errors."""
import pytest
import torch

import microdit
from microdit.ops.keep_indices import drop_mask, keep_indices


def randomised(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.mask_token.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomised(microdit.create_model("MicroDiT_Test_2"))


def batch(B=2, res=8, L=5, Cy=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, res, res, generator=g), torch.randn(B, generator=g), torch.randn(B, L, Cy, generator=g)


def test_masked_positions_hold_mask_token(model):
    x, t, y = batch()
    keep = keep_indices(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, t, y, ids_keep=keep)  # (B, C, H, W)
    tokens = out.reshape(2, 4, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 16)  # (row, col, channel)
    dropped = drop_mask(keep, 16).bool()
    assert torch.equal(tokens[dropped], model.mask_token.reshape(1, 16).expand(int(dropped.sum()), 16))
    assert not torch.equal(tokens[~dropped][0], model.mask_token.reshape(16))


def test_mask_ratio_draws_with_generator(model):
    x, t, y = batch()
    with torch.no_grad():
        a = model(x, t, y, mask_ratio=0.5, generator=torch.Generator().manual_seed(4))
        b = model(x, t, y, mask_ratio=0.5, generator=torch.Generator().manual_seed(4))
        keep = keep_indices(2, 16, 0.5, generator=torch.Generator().manual_seed(4))
        c = model(x, t, y, ids_keep=keep)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_naive_masking_without_mixer():
    torch.manual_seed(0)
    m = randomised(microdit.create_model("MicroDiT_Test_2", use_patch_mixer=False))
    assert not hasattr(m, "patch_mixer")
    x, t, y = batch()
    with torch.no_grad():
        out = m(x, t, y, mask_ratio=0.75)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_kept_tokens_independent_of_dropped_inputs_without_mixer():
    """Naive masking drops tokens before any mixing: changing a dropped patch changes nothing."""
    torch.manual_seed(0)
    m = randomised(microdit.create_model("MicroDiT_Test_2", use_patch_mixer=False))
    x, t, y = batch()
    keep = torch.tensor([[0, 5, 10, 15], [1, 2, 3, 4]])
    x2 = x.clone()
    x2[:, :, 6:8, 6:8] += 1.0  # token 15 of sample 1 (row 3, col 3) is dropped there
    with torch.no_grad():
        a, b = m(x, t, y, ids_keep=keep), m(x2, t, y, ids_keep=keep)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])


def test_scalar_timestep_broadcasts(model):
    x, _, y = batch()
    with torch.no_grad():
        a = model(x, torch.tensor([0.3]), y, guidance=2.0)
        b = model(x, torch.full((2,), 0.3), y, guidance=2.0)
    torch.testing.assert_close(a, b)


def test_set_resolution_regenerates_only_the_position_table():
    torch.manual_seed(0)
    m = randomised(microdit.create_model("MicroDiT_Test_2"))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.set_resolution(16, 2.0)
    after = m.state_dict()
    assert after["pos_embed"].shape == (1, 64, 64)
    assert all(torch.equal(before[k], after[k]) for k in before if k != "pos_embed")
    x, t, y = batch(res=16)
    with torch.no_grad():
        assert m(x, t, y, mask_ratio=0.75).shape == (2, 4, 16, 16)


def test_bad_inputs_are_named(model):
    x, t, y = batch()
    with pytest.raises(ValueError, match="latents must be"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="position table"):
        model(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="caption embeddings"):
        model(x, t, torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="ids_keep"):
        model(x, t, y, ids_keep=torch.zeros(3, 4, dtype=torch.long))


def test_backends_shown_in_repr():
    m = microdit.create_model("MicroDiT_Test_2", backends={"moe": "reference"})
    assert "backend=reference" in repr(m.blocks[1].mlp)
    assert "backend=auto" in repr(microdit.create_model("MicroDiT_Test_2").blocks[1].mlp)


def test_bf16_autocast_training_step():
    torch.manual_seed(0)
    m = microdit.create_model("MicroDiT_Test_2")
    x0, _, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = microdit.edm.loss(m, x0, y, mask_ratio=0.75)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_blocks_chain_each_ffn_residual_into_the_next_norm1():
    """With the maps applied across blocks, each block's FFN residual (but the last of the mixer
    and of the backbone) is added by the next block's residual_ln_modulate; the outputs and
    gradients are those of each block adding its own (FSDP2's across_blocks=False path)."""
    from microdit.ops.registry import ALL_OPS

    torch.manual_seed(0)
    m = randomised(microdit.create_model("MicroDiT_Test_2", backends={"ln_modulate": "reference",
                                                                       "residual_ln_modulate": "reference"})).double()
    x, t, y = (v.double() for v in batch())  # float64: the chain only reorders gradient sums
    keep = keep_indices(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    op, calls = ALL_OPS["residual_ln_modulate"], []
    runs = {}
    try:
        ALL_OPS["residual_ln_modulate"] = lambda *a, **k: calls.append(1) or op(*a, **k)
        for chained in (True, False):
            m.across_blocks, calls[:] = chained, []
            out = m(x, t, y, ids_keep=keep)
            runs[chained] = (out, torch.autograd.grad(out.square().sum(), list(m.parameters()), allow_unused=True),
                             len(calls))
    finally:
        ALL_OPS["residual_ln_modulate"] = op
        m.across_blocks = True
    n_mixer, n_blocks = len(m.patch_mixer), len(m.blocks)
    assert runs[False][2] == 2 * (n_mixer + n_blocks)
    assert runs[True][2] == 2 * (n_mixer + n_blocks) + (n_mixer - 1) + (n_blocks - 1)
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(runs[True][1], runs[False][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
