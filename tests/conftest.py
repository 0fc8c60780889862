import os

import pytest

# Without the CUDA extension the chunked LM loss is off by default (it costs CPU step time); the
# suite keeps it on, inherited by every process it starts, so that its code is tested on CPU too
# (enable_fused_kernels=False tests cover the other path).
os.environ.setdefault("SHARDFORMER_FUSED_LOSS", "always")

from .dist_harness import ProcessPool


@pytest.fixture(scope="session")
def pools():
    """pools(n): a ProcessPool of n gloo ranks, created once per session and reused."""
    cache = {}

    def get(n: int) -> ProcessPool:
        if n not in cache:
            cache[n] = ProcessPool(n)
        return cache[n]

    yield get
    for pool in cache.values():
        pool.close()
