import pytest

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
