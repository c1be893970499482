"""unmask_tokens (a scatter with mask_token) per backend: forward, backward, both; ms, GB/s.

    pytest benches/bench_unmask_tokens.py --benchmark-columns=min,mean,rounds

Shapes, bytes counted, timing: benches/tokens.py; summary: benches/results/unmask_tokens-<device>.json.
"""
from benches.tokens import token_bench

test_unmask_tokens, log = token_bench("unmask", "unmask_tokens")
