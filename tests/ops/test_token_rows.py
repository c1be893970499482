"""The compiled row-copy custom ops behind mask_tokens / unmask_tokens: opcheck, torch.compile."""
import pytest
import torch

from microdit.ops.mask_tokens import mask_tokens, mask_tokens_op
from microdit.ops.token_rows import mask_tokens_ext, unmask_tokens_ext
from microdit.ops.unmask_tokens import unmask_tokens
from tests.helpers import available_backends
from tests.ops.tokens import ids

MASK = available_backends(mask_tokens_op)

EXT = [b for b in ("cpp", "cuda") if b in MASK]


@pytest.mark.skipif(not EXT, reason="compiled extension not available here")
def test_custom_ops_opcheck():
    dev = "cuda" if "cuda" in EXT else "cpu"
    x = torch.randn(3, 123, 77, device=dev, requires_grad=True)
    keep = ids(3, 123, 31).to(dev)
    torch.library.opcheck(mask_tokens_ext, (x, keep))
    src = torch.randn(3, 31, 77, device=dev, requires_grad=True)
    fill = torch.randn(1, 1, 77, device=dev, requires_grad=True)
    torch.library.opcheck(unmask_tokens_ext, (src, keep, 123, fill))
    torch.library.opcheck(unmask_tokens_ext, (src, keep, 123, None))


@pytest.mark.skipif(not EXT, reason="compiled extension not available here")
def test_custom_ops_under_torch_compile():
    x = torch.randn(2, 16, 8)
    keep = ids(2, 16, 4)
    mt = torch.randn(1, 1, 8)

    def f(x):
        return unmask_tokens(mask_tokens(x, keep, backend="cpp") * 2, keep, 16, mt, backend="cpp")

    expected = f(x)  # eager first, as a built model does: backend availability is then cached
    torch.testing.assert_close(torch.compile(f, backend="eager", fullgraph=True)(x), expected)
