"""Helpers of the token-op tests (tests/ops/test_{keep_indices,mask_tokens,unmask_tokens,unmask_unpatchify,token_rows}.py)."""
import pytest
import torch


def ids(B, T, K, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(B)]).to(device)


def device_of(backend: str) -> str:
    """Where a backend's inputs live: the GPU for cuda, and for triton outside the interpreter."""
    return "cuda" if backend == "cuda" or backend == "triton" and torch.cuda.is_available() else "cpu"


def skip_unsupported(op, backend, *args):
    reasons = op.impls[backend].supports(*args)
    if reasons:
        pytest.skip(f"backend {backend}: " + "; ".join(reasons))
