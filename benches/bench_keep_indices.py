"""keep_indices per backend: ms of drawing the kept-token indices (forward only).

    pytest benches/bench_keep_indices.py --benchmark-columns=min,mean,rounds

Shapes, bytes counted, timing: benches/tokens.py; summary: benches/results/keep_indices-<device>.json.
"""
from benches.tokens import token_bench

test_keep_indices, log = token_bench("keep_indices", "keep_indices")
