"""The "lazyshare" joblib backend: registration, results, errors, and a 64 MiB
array argument that moves only the pages its tasks touch (joblib's own
auto-memmapping is off)."""

from __future__ import annotations

import _ext_funcs as f
import numpy as np
import pytest

joblib = pytest.importorskip("joblib")
from joblib import Parallel, delayed, parallel_config  # noqa: E402

import lazyshare  # noqa: E402
import lazyshare.joblib  # noqa: E402  (registers the backend)
from lazyshare.joblib import LazyshareBackend  # noqa: E402


def test_registered_on_import_and_by_function():
    from joblib.parallel import BACKENDS

    assert BACKENDS["lazyshare"] is LazyshareBackend
    del BACKENDS["lazyshare"]
    lazyshare.register_joblib()
    lazyshare.register_joblib()  # idempotent
    assert BACKENDS["lazyshare"] is LazyshareBackend


def test_parallel_config_moves_only_touched_pages():
    big = np.arange(8 << 20, dtype=np.float64)  # 64 MiB
    bounds = [(i << 20, (i << 20) + 4096) for i in range(8)]  # 32 KiB of each 8 MiB
    backend = LazyshareBackend()
    served = lazyshare.stats()["bytes_served"]
    with parallel_config(backend=backend, n_jobs=2):
        out = Parallel()(delayed(f.slice_sum)(big, lo, hi) for lo, hi in bounds)
    assert out == [float(big[lo:hi].sum()) for lo, hi in bounds]
    moved = lazyshare.stats()["bytes_served"] - served
    totals = backend.stats()["totals"]
    assert 0 < moved < big.nbytes // 4, moved
    assert 0 < totals["bytes_lazy"] < big.nbytes // 4
    assert totals["bytes_pickled"] < 1 << 20  # joblib did not pickle the array
    assert totals["tasks"] >= 1


def test_by_name_with_workers_getting_plain_writable_arrays(tmp_path):
    big = np.ones(2 << 20)  # 16 MiB: joblib's loky would memmap this read-only
    with parallel_config(backend="lazyshare", n_jobs=2, temp_folder=str(tmp_path)):
        infos = Parallel()(delayed(f.array_info)(big) for _ in range(4))
    assert infos == [("ndarray", True)] * 4
    assert list(tmp_path.iterdir()) == []  # nothing was dumped to disk


def test_threshold_backend_parameter():
    big = np.ones(2 << 20)  # 16 MiB, under a 32 MiB threshold: pickled
    backend = LazyshareBackend(threshold=32 << 20)
    with parallel_config(backend=backend, n_jobs=2):
        assert Parallel()(delayed(f.slice_sum)(big, 0, 10) for _ in range(2)) == [10.0, 10.0]
    totals = backend.stats()["totals"]
    assert totals["bytes_lazy"] == 0 and totals["bytes_pickled"] >= big.nbytes


def test_memory_budget_backend_parameter():
    import _pool_funcs

    a = np.ones(8 << 20)  # 64 MiB
    with parallel_config(backend="lazyshare", n_jobs=2, memory_budget=8 << 20):
        (s1, s2, v, _grew, dropped), _ = Parallel()(delayed(_pool_funcs.budget_pass)(a) for _ in range(2))
    assert s1 == s2 == float(a.size) - 2.0 and v == -1.0
    assert dropped >= a.nbytes - (8 << 20)  # the workers kept to the budget


def test_errors_propagate():
    with pytest.raises(ZeroDivisionError):
        Parallel(n_jobs=2, backend="lazyshare")(delayed(f.div)(1, x) for x in (1, 0, 2))


def test_n_jobs_1_runs_sequentially():
    assert Parallel(n_jobs=1, backend="lazyshare")(delayed(f.mul)(i, 2) for i in range(3)) == [0, 2, 4]
