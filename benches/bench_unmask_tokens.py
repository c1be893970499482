"""unmask_tokens (scatter with mask_token) per backend: forward, backward, both; ms and GB/s.

    pytest benches/bench_unmask_tokens.py --benchmark-columns=min,mean,rounds

Shapes, bytes counted and GPU timing: benches/tokens.py. A summary with the ratio to the
reference backend is written to benches/results/unmask_tokens-<device>.json.
"""
import pytest

from benches.common import runnable_backends
from benches.tokens import PASSES, SHAPES, bench_token_op, result_log
from microdit.ops.unmask_tokens import unmask_tokens_op


@pytest.fixture(scope="module")
def log():
    yield from result_log("unmask_tokens")


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("backend", runnable_backends(unmask_tokens_op))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_unmask_tokens(benchmark, device, shape, backend, passes, log, copy_gbps):
    bench_token_op(benchmark, device, shape, "unmask", backend, passes, log, copy_gbps)
