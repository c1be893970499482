"""unmask_unpatchify (un-mask fused with un-patchify) per backend: forward, backward, both; ms, GB/s.

    pytest benches/bench_unmask_unpatchify.py --benchmark-columns=min,mean,rounds

Shapes, bytes counted and GPU timing: benches/tokens.py. A summary with the ratio to the
reference backend is written to benches/results/unmask_unpatchify-<device>.json.
"""
import pytest

from benches.common import runnable_backends
from benches.tokens import PASSES, SHAPES, bench_token_op, result_log
from microdit.ops.unmask_unpatchify import unmask_unpatchify_op


@pytest.fixture(scope="module")
def log():
    yield from result_log("unmask_unpatchify")


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("backend", runnable_backends(unmask_unpatchify_op))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_unmask_unpatchify(benchmark, device, shape, backend, passes, log, copy_gbps):
    bench_token_op(benchmark, device, shape, "unmask_unpatchify", backend, passes, log, copy_gbps)
