"""mask_tokens (a row gather) per backend: forward, backward and both; ms and GB/s.

    pytest benches/bench_mask_tokens.py --benchmark-columns=min,mean,rounds

Shapes, bytes counted, timing: benches/tokens.py; summary: benches/results/mask_tokens-<device>.json.
"""
from benches.tokens import token_bench

test_mask_tokens, log = token_bench("mask", "mask_tokens")
