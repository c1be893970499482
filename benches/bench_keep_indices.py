"""keep_indices per backend: ms of drawing the kept-token indices.

    pytest benches/bench_keep_indices.py --benchmark-columns=min,mean,rounds

Shapes, bytes counted and GPU timing: benches/tokens.py. A summary with the ratio to the
reference backend is written to benches/results/keep_indices-<device>.json.
"""
import pytest

from benches.common import runnable_backends
from benches.tokens import SHAPES, bench_token_op, result_log
from microdit.ops.keep_indices import keep_indices_op


@pytest.fixture(scope="module")
def log():
    yield from result_log("keep_indices")


@pytest.mark.parametrize("passes", ["forward"])
@pytest.mark.parametrize("backend", runnable_backends(keep_indices_op))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_keep_indices(benchmark, device, shape, backend, passes, log, copy_gbps):
    bench_token_op(benchmark, device, shape, "keep_indices", backend, passes, log, copy_gbps)
