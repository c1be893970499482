"""mask_tokens (gather) per backend: forward, backward and both; ms and GB/s.

    pytest benches/bench_mask_tokens.py --benchmark-columns=min,mean,rounds

Shapes, bytes counted and GPU timing: benches/tokens.py. A summary with the ratio to the
reference backend is written to benches/results/mask_tokens-<device>.json.
"""
import pytest

from benches.common import runnable_backends
from benches.tokens import PASSES, SHAPES, bench_token_op, result_log
from microdit.ops.mask_tokens import mask_tokens_op


@pytest.fixture(scope="module")
def log():
    yield from result_log("mask_tokens")


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("backend", runnable_backends(mask_tokens_op))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_mask_tokens(benchmark, device, shape, backend, passes, log, copy_gbps):
    bench_token_op(benchmark, device, shape, "mask", backend, passes, log, copy_gbps)
