"""lazyshare.progress: a tqdm bar over results, with bytes moved; tqdm optional."""

from __future__ import annotations

import inspect
import io
import multiprocessing.pool
import sys
from concurrent.futures import as_completed

import _ext_funcs as f
import numpy as np
import pytest

import lazyshare

pytest.importorskip("tqdm")


def _star_slice_sum(args):
    return f.slice_sum(*args)


def test_bar_counts_tasks_and_bytes_with_pool_imap():
    big = np.arange(4 << 20, dtype=np.float64)  # 32 MiB
    work = [(big, i << 19, (i << 19) + 1000) for i in range(8)]
    out = io.StringIO()
    with lazyshare.Pool(2) as pool:
        it = pool.imap(_star_slice_sum, work)
        got = list(lazyshare.progress(it, total=len(work), file=out, pool=pool, mininterval=0))
    assert got == [f.slice_sum(*w) for w in work]
    text = out.getvalue()
    assert "8/8" in text
    assert "moved" in text and "lazy" in text and "pickled" in text
    assert "0 B (lazy 0 B" not in text.rsplit("\r", 1)[-1]  # bytes were counted by the end


def test_bar_with_executor_futures_and_default_total():
    out = io.StringIO()
    with lazyshare.Executor(2) as ex:
        fs = [ex.submit(f.mul, i, 2) for i in range(6)]
        done = list(lazyshare.progress(as_completed(fs), total=6, pool=ex, file=out))
        assert sorted(x.result() for x in done) == [0, 2, 4, 6, 8, 10]
        assert list(lazyshare.progress([1, 2, 3], file=out)) == [1, 2, 3]  # total from len()
    assert "6/6" in out.getvalue() and "3/3" in out.getvalue()


def test_without_tqdm_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(ImportError, match=r"lazyshare\[progress\]"):
        lazyshare.progress([1, 2])


def test_stdlib_signatures_unchanged():
    for name in ("map", "imap", "imap_unordered", "starmap", "map_async", "apply_async"):
        ours = inspect.signature(getattr(lazyshare.Pool, name))
        theirs = inspect.signature(getattr(multiprocessing.pool.Pool, name))
        assert [(p.name, p.default) for p in ours.parameters.values()] == [
            (p.name, p.default) for p in theirs.parameters.values()
        ], name
