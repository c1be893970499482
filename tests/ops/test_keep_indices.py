"""keep_indices backends against the reference, uniformity; num_kept and check_ids_keep."""
import pytest
import torch

from microdit.ops.keep_indices import check_ids_keep, keep_indices, keep_indices_op, num_kept
from tests.helpers import available_backends
from tests.ops.tokens import device_of

@pytest.mark.parametrize("backend", available_backends(keep_indices_op))
def test_keep_indices_match_reference_and_are_uniform(backend):
    dev = device_of(backend)
    g1, g2 = torch.Generator(dev).manual_seed(3), torch.Generator(dev).manual_seed(3)
    a = keep_indices(4, 64, 0.75, device=dev, generator=g1, backend=backend)
    b = keep_indices(4, 64, 0.75, device=dev, generator=g2, backend="reference")
    assert a.shape == (4, 16) and torch.equal(a, b)
    # Each token is kept with probability K/T, and each slot holds any token equally often.
    g = torch.Generator(dev).manual_seed(0)
    draws = keep_indices(4000, 16, 0.75, device=dev, generator=g, backend=backend).cpu()  # K = 4
    freq = torch.bincount(draws.flatten(), minlength=16).float() / draws.numel()
    assert (freq - 1 / 16).abs().max() < 0.01
    first = torch.bincount(draws[:, 0], minlength=16).float() / 4000
    assert (first - 1 / 16).abs().max() < 0.02
    assert all(len(set(r.tolist())) == 4 for r in draws[:50])


def test_num_kept_and_errors():
    assert num_kept(256, 0.75) == 64 and num_kept(1024, 0.5) == 512 and num_kept(10, 0.0) == 10
    with pytest.raises(ValueError, match="mask_ratio"):
        num_kept(16, 1.0)
    with pytest.raises(ValueError, match="repeats"):
        check_ids_keep(torch.tensor([[1, 1]]), 1, 4)
    with pytest.raises(ValueError, match="outside"):
        check_ids_keep(torch.tensor([[1, 4]]), 1, 4)
    with pytest.raises(ValueError, match="shape"):
        check_ids_keep(torch.tensor([1, 2]), 1, 4)
