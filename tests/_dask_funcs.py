"""Task functions for tests/test_dask.py (importable by the workers)."""

from __future__ import annotations

import os

import numpy as np


def chunk_sum(a, i, n=16):
    step = len(a) // n
    return float(a[i * step : (i + 1) * step].sum()), os.getpid()


def nested(d):
    (x,) = d["arrays"][0]
    return float(x[:10].sum()) + float(d["other"][0][-1]), type(x).__name__


def head(a, k=100):
    return a[:k]


def is_lazy(a):
    from lazyshare.dask import _lazy

    return _lazy(a)


def lazy_results(dask_worker=None):
    from lazyshare.dask import _lazy

    return sorted(str(_lazy(v)) for v in dask_worker.data.values() if isinstance(v, np.ndarray))


def fault_handler_started():
    from lazyshare import handler

    return handler._client_pid == os.getpid()


def slice_sum(a, i, frac=0.01):
    """Sum a different 1% of a for each i (i < 1/frac)."""
    n = int(len(a) * frac)
    return float(a[i * n : (i + 1) * n].sum())


def slow_read(a, announce=None):
    """Touch a page at a time, slowly: a task that is mid-fetch for seconds."""
    import time

    step = 4096 // a.itemsize
    total = 0.0
    for k in range(0, len(a), step):
        total += float(a[k])
        time.sleep(0.005)
    return total


def served_here(dask_worker=None):
    from lazyshare.dask import _the_owner

    return len(_the_owner().entries)


class Counter:
    """A Dask actor: install's wrappers must leave actor classes alone."""

    def __init__(self, a):
        self.total = float(a[:10].sum())

    def get(self):
        return self.total
