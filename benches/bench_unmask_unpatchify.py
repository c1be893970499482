"""unmask_unpatchify (un-mask fused with un-patchify) per backend: ms and GB/s.

    pytest benches/bench_unmask_unpatchify.py --benchmark-columns=min,mean,rounds

Shapes, bytes counted, timing: benches/tokens.py; summary: benches/results/unmask_unpatchify-<device>.json.
"""
from benches.tokens import token_bench

test_unmask_unpatchify, log = token_bench("unmask_unpatchify", "unmask_unpatchify")
