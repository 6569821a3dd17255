"""The pool with the default threshold: big arrays travel lazily (native core)."""

from __future__ import annotations

import _pool_funcs as f
import numpy as np
import pytest
from conftest import DEADLINE

from lazyshare.pool import Pool

handler = pytest.importorskip("lazyshare.handler")

pytestmark = pytest.mark.timeout(DEADLINE)

MiB = 1 << 20


def wait_for(cond, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_big_array_is_not_pickled_and_is_released():
    a = np.arange(8 * MiB, dtype=np.float64)  # 64 MiB
    with Pool(2) as p:
        parts = p.starmap(f.part_sum, [(a, i, 16) for i in range(4)], chunksize=1)
        assert parts == [f.part_sum(a, i, 16) for i in range(4)]
        # views of the same allocation: the base is exported once per call
        assert p.map(f.first, [a[5:], a[::3], a.reshape(-1, 8).T]) == [5.0, 0.0, 0.0]
        s = p.stats()["totals"]
        assert s["tasks"] == 4 + 3
        assert s["bytes_pickled"] < MiB
        assert s["bytes_lazy"] >= 4 * a.nbytes // 16
        assert s["bytes_lazy"] < a.nbytes
        # every call's exports are closed once it completes; workers drop their
        # mappings after each task
        assert wait_for(lambda: handler.pinned_segments() == 0)
        p.close()
        p.join()


def test_small_arrays_are_pickled_and_writable():
    with Pool(1) as p:
        out = p.apply(f.add_one_inplace, (np.zeros(1000),))
        assert out.sum() == 1000 and out.flags.writeable
        assert p.stats()["totals"]["bytes_lazy"] == 0
    p.join()


def test_threshold_none_pickles_everything():
    a = np.ones(2 * MiB // 8)
    with Pool(1, threshold=None) as p:
        assert p.apply(f.part_sum, (a, 0, 1)) == float(len(a))
        s = p.stats()["totals"]
        assert s["bytes_pickled"] >= a.nbytes and s["bytes_lazy"] == 0
    p.join()
