"""Triton kernels of microdit."""
