"""Shared test helpers."""
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def available_backends(op) -> list[str]:
    return [name for name, _, reasons in op.table() if not reasons]
