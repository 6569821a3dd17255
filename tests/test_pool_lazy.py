"""The pool with the default threshold: big arrays travel lazily (native core)."""

from __future__ import annotations

import functools
import itertools
import time

import _pool_funcs as f
import numpy as np
import pytest
from conftest import DEADLINE, wait_for

from lazyshare import handler
from lazyshare.pool import Pool

pytestmark = pytest.mark.timeout(DEADLINE)

MiB = 1 << 20


def test_big_array_is_not_pickled_and_is_released():
    a = np.arange(8 * MiB, dtype=np.float64)  # 64 MiB
    with Pool(2) as p:
        parts = p.starmap(f.part_sum, [(a, i, 16) for i in range(4)], chunksize=1)
        assert parts == [f.part_sum(a, i, 16) for i in range(4)]
        # views of the same allocation: the base is exported once per call
        assert p.map(f.first, [a[5:], a[::3], a.reshape(-1, 8).T]) == [5.0, 0.0, 0.0]
        # deep inside other containers too, in map chunks and in apply
        assert p.map(f.first_nested, [{"deep": [a[7::2]]}] * 3, chunksize=3) == [7.0] * 3
        assert p.apply(f.first_nested, ({"deep": (a[9:],)},)) == 9.0
        s = p.stats()["totals"]
        assert s["tasks"] == 4 + 3 + 1 + 1
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


def test_mutation_between_calls_is_seen():
    """Snapshot per call: a write by the parent between two maps is seen by the second."""
    a = np.zeros(4 * MiB)  # 32 MiB
    with Pool(2) as p:
        assert p.map(f.first, [a, a]) == [0.0, 0.0]
        a[0] = 7.0
        assert p.map(f.first, [a, a]) == [7.0, 7.0]
        a[0] = 9.0
        assert p.apply(f.first, (a,)) == 9.0


def test_worker_writes_stay_private():
    a = np.ones(2 * MiB)
    with Pool(2) as p:
        assert p.map(f.write_then_sum, [a, a]) == [(0.0, True), (0.0, True)]
        assert p.apply(f.write_then_sum, (a,)) == (0.0, True)  # a fresh copy again
    assert a[:2000].sum() == 2000.0  # the parent's array is untouched


def test_pandas_frame_goes_lazily():
    pd = pytest.importorskip("pandas", reason="pandas is a test dependency: pip install '.[test]'")
    df = pd.DataFrame({"x": np.arange(2 * MiB, dtype=np.float64), "y": np.ones(2 * MiB)})
    with Pool(2) as p:
        got = p.starmap(f.frame_stats, [(df, "x"), (df, "y")])
        s = p.stats()["totals"]
    assert got[0] == (float(df["x"].sum()), len(df), "DataFrame")
    assert got[1] == (float(len(df)), len(df), "DataFrame")
    assert s["bytes_pickled"] < MiB  # 32 MiB of columns, none of it pickled
    assert s["bytes_lazy"] > 0


def test_array_over_2_gib_read_sparsely():
    big = np.zeros((2 << 30) // 8 + 1024 * 1024, dtype=np.float64)  # 2 GiB + 8 MiB, untouched zeros
    big[-1] = 5.0
    big[0] = 3.0
    step = 64 << 20 >> 3  # one element every 64 MiB
    with Pool(2) as p:
        got = p.apply(f.sparse_sum, (big, step))
        s = p.stats()["totals"]
    assert got == float(big[::step].sum())
    assert s["bytes_pickled"] < MiB
    assert s["bytes_lazy"] < 64 * MiB  # a few pages of 2 GiB


MAIN_SCRIPT = """
import lazyshare, numpy as np

def twice(x):
    return 2 * x

if __name__ == "__main__":
    with lazyshare.Pool(2) as p:
        print(p.map(twice, range(5)), p.apply(twice, (21,)), p.apply(lambda: 7))
        print(p.apply(twice, (np.ones(1 << 18),)).sum())
"""


@pytest.mark.parametrize("as_file", [True, False])
def test_functions_of_main_script_and_of_interactive_main(tmp_path, as_file):
    import os
    import subprocess
    import sys

    if as_file:
        path = tmp_path / "script.py"
        path.write_text(MAIN_SCRIPT)
        cmd = [sys.executable, str(path)]
    else:
        cmd = [sys.executable, "-c", MAIN_SCRIPT]  # __main__ without a file: by value
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["[0, 2, 4, 6, 8] 42 7", str(2.0 * (1 << 18))]


def test_read_ahead_stays_inside_a_sliced_argument():
    a = np.random.default_rng(0).random(16 * MiB)  # 128 MiB
    n = a.size // 8
    slices = [a[i * n : i * n + a.size // 100] for i in range(8)]
    with Pool(2) as p:
        got = p.starmap(f.sparse_sum, [(s, 1) for s in slices], chunksize=1)
        moved = p.stats()["totals"]["bytes_lazy"]
    assert got == [float(s.sum()) for s in slices]
    need = sum(s.nbytes for s in slices)
    assert need <= moved <= need + 8 * 2 * 4096  # at most a partial page at each end


def test_memory_budget_drops_clean_pages_and_keeps_written_ones():
    a = np.ones(32 * MiB)  # 256 MiB
    budget = 32 * MiB
    with Pool(1, memory_budget=budget) as p:
        s1, s2, v, grew, dropped = p.apply(f.budget_pass, (a,))
    expect = float(a.size) - 2.0  # a[3] = -1 instead of 1
    assert s1 == expect and s2 == expect and v == -1.0
    assert grew < budget + 16 * MiB, grew  # the budget, a window in flight, the interpreter's own
    assert dropped >= a.nbytes - budget


def test_memory_budget_is_validated():
    with pytest.raises(ValueError):
        Pool(1, memory_budget=-1)


def test_executor_takes_a_memory_budget_too():
    from lazyshare import Executor

    a = np.ones(16 * MiB)  # 128 MiB
    with Executor(1, memory_budget=16 * MiB) as ex:
        s1, s2, v, grew, dropped = ex.submit(f.budget_pass, a).result(timeout=DEADLINE)
    assert s1 == s2 == float(a.size) - 2.0 and v == -1.0
    assert dropped >= a.nbytes - 16 * MiB


# --------------------------------------------------------------------------- streams
# imap over a generator of fresh arrays: each task's segments are released when its
# result is in, and the feeder runs a bounded window ahead of the results (about
# 64 MiB of exports: 32 arrays of 2 MiB). The bounds below are twice that: the pins
# a worker's mapping still holds for a moment after its result, and one chunk of
# overshoot. Without the window, the whole stream was pinned until the call ended.
STREAM_MIB = 2
STREAM_BOUND = 64


class _Stream:
    """Fresh (written) arrays; records how far it ran ahead of the tasks the pool
    completed, in items."""

    def __init__(self, pool, n, chunksize):
        self.pool = pool
        self.n = n
        self.chunksize = chunksize
        self.base = pool.stats()["totals"]["tasks"]
        self.yielded = 0
        self.ahead = 0

    def __iter__(self):
        for i in range(self.n):
            a = np.full(STREAM_MIB * MiB // 8, float(i))
            self.yielded += 1
            done = (self.pool.stats()["totals"]["tasks"] - self.base) * self.chunksize
            self.ahead = max(self.ahead, self.yielded - done)
            yield a


@pytest.mark.parametrize("chunksize", [1, 3])
@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_stream_of_fresh_arrays_is_bounded(method, chunksize):
    n = 320
    base = handler.pinned_segments()
    with Pool(2) as p:
        stream = _Stream(p, n, chunksize)
        func = functools.partial(f.head_tail, seconds=0.003)
        got = []
        pinned = 0
        for v in getattr(p, method)(func, stream, chunksize):
            got.append(v)
            pinned = max(pinned, handler.pinned_segments() - base)
            time.sleep(0.004)  # a slow reader: results wait for it, exports do not
        assert stream.yielded == n
        expect = [2.0 * i for i in range(n)]
        assert (got if method == "imap" else sorted(got)) == expect
        assert pinned <= STREAM_BOUND and stream.ahead <= STREAM_BOUND, (
            f"{pinned} segments pinned at once, the generator ran {stream.ahead} items ahead"
        )
        assert wait_for(lambda: handler.pinned_segments() == base)


def _rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(x.split()[1]) * 1024 for x in fh if x.startswith("VmRSS"))


def test_stream_of_fresh_arrays_keeps_rss_bounded():
    # 600 x 2 MiB: 1.2 GiB streamed; the stdlib's peak here is ~45 MiB. A generous
    # bound (RSS is noisy): the structural bounds are asserted above.
    n = 600
    with Pool(2) as p:
        p.map(f.sqr, range(4))  # workers up
        before = peak = _rss()
        total = 0.0
        for v in p.imap(f.head_tail, (np.full(STREAM_MIB * MiB // 8, float(i)) for i in range(n))):
            total += v
            peak = max(peak, _rss())
    assert total == sum(2.0 * i for i in range(n))
    assert peak - before < 200 * MiB, f"RSS grew by {(peak - before) / MiB:.0f} MiB"


def _arrays_then(n, when, bad):
    """Fresh arrays, with ``bad`` at ``when``: "raise" raises there, "unpicklable"
    yields an array beside an object that cannot be pickled."""
    for i in range(n):
        a = np.full(STREAM_MIB * MiB // 8, float(i))
        if i == when:
            if bad == "raise":
                raise f.SayWhenError("Somebody said when")
            yield (a, f.CannotPickle())
        else:
            yield a


@pytest.mark.parametrize("chunksize", [1, 3])
def test_stream_with_an_unpicklable_task_or_a_raising_generator(chunksize):
    # As the stdlib: a task that cannot be pickled fails alone (its chunk with it)
    # and the stream goes on; an iterable that raises ends it with its error.
    base = handler.pinned_segments()
    n, when = 60, 31
    bad_chunk = when // chunksize
    with Pool(2) as p:
        it = p.imap(f.head_tail, _arrays_then(n, when, "unpicklable"), chunksize)
        got = [next(it) for _ in range(bad_chunk * chunksize)]
        with pytest.raises(RuntimeError, match="cannot pickle"):
            next(it)
        if chunksize == 1:
            got += list(it)
            assert got == [2.0 * i for i in range(n) if i != when]
        else:  # like the stdlib's: the flattening generator ends with the error
            assert list(it) == []
            assert got == [2.0 * i for i in range(bad_chunk * chunksize)]

        it = p.imap(f.head_tail, _arrays_then(n, when, "raise"), chunksize)
        got = []
        with pytest.raises(f.SayWhenError):
            for v in it:
                got.append(v)
        assert got == [2.0 * i for i in range(bad_chunk * chunksize)]

        got = []
        with pytest.raises(f.SayWhenError):
            for v in p.imap_unordered(f.head_tail, _arrays_then(n, when, "raise"), chunksize):
                got.append(v)
        assert set(got) <= {2.0 * i for i in range(when)}
        assert wait_for(lambda: handler.pinned_segments() == base)
        assert p.map(f.first, [np.ones(MiB)]) == [1.0]  # and the pool goes on


def test_terminate_mid_stream_leaves_nothing_pinned():
    from lazyshare.pool import PoolTerminatedError

    base = handler.pinned_segments()
    p = Pool(2)
    try:
        endless = (np.full(STREAM_MIB * MiB // 8, float(i)) for i in itertools.count())
        it = p.imap(functools.partial(f.head_tail, seconds=0.02), endless)
        assert [next(it) for _ in range(5)] == [0.0, 2.0, 4.0, 6.0, 8.0]
        assert wait_for(lambda: handler.pinned_segments() > base)  # the window, in flight
    finally:
        p.terminate()
        p.join()
    with pytest.raises(PoolTerminatedError):
        for _ in it:
            pass
    assert wait_for(lambda: handler.pinned_segments() == base)


def test_map_releases_each_chunk_as_it_completes(tmp_path):
    # The caller's list holds the arrays anyway, but each chunk's exports go as it
    # completes, not when the whole map does.
    go = str(tmp_path / "go")
    n = 12
    arrays = [np.full(STREAM_MIB * MiB // 8, float(i)) for i in range(n)]
    base = handler.pinned_segments()
    with Pool(2) as p:
        r = p.starmap_async(f.first_when, [(a, None) for a in arrays[:-1]] + [(arrays[-1], go)], 1)
        assert wait_for(lambda: handler.pinned_segments() - base == 1)  # the one still running
        assert not r.ready()
        open(go, "w").close()
        assert r.get(DEADLINE) == [float(i) for i in range(n)]
        assert wait_for(lambda: handler.pinned_segments() == base)


def test_stream_of_views_of_one_base_exports_it_once_at_a_time():
    a = np.arange(8 * MiB, dtype=np.float64)  # 64 MiB, more than the window's bytes
    k = a.size // 200
    base = handler.pinned_segments()
    with Pool(2) as p:
        pinned = 0
        got = []
        for v in p.imap(f.head_tail, (a[i * k : (i + 1) * k] for i in range(200))):
            got.append(v)
            pinned = max(pinned, handler.pinned_segments() - base)
        assert got == [float(a[i * k] + a[(i + 1) * k - 1]) for i in range(200)]
        # one segment while tasks using it are out; a new one only after all were
        # done (and the old one's last mapping may still be going)
        assert pinned <= 3
        assert wait_for(lambda: handler.pinned_segments() == base)


def test_released_segment_stays_readable_while_a_worker_maps_it():
    # A task's exports go when its result is in; a worker that still maps one
    # (here it kept its argument) holds it: its pages are still served.
    a = np.arange(4 * MiB, dtype=np.float64)  # 32 MiB, one page touched by the first task
    base = handler.pinned_segments()
    with Pool(1) as p:
        assert list(p.imap(f.stash, [a])) == [0.0]
        assert handler.pinned_segments() - base == 1  # released, but mapped: pinned
        assert p.apply(f.stash_sum) == float(a.sum())
        assert p.apply(f.stash_drop)
        assert wait_for(lambda: handler.pinned_segments() == base)


def test_call_exports_count_segments_per_task():
    from lazyshare import serialization

    a = np.arange(MiB, dtype=np.float64)  # 8 MiB
    b = np.ones(MiB)
    base = handler.pinned_segments()
    ex = serialization.CallExports()
    ex.dumps((a[1:], a[::2], a.reshape(-1, 8).T), task=0)  # views of one base: one segment
    assert len(ex.segments) == 1 and ex.bytes_live == a.nbytes
    ex.dumps((a[5:], b), task=1)  # a's segment, shared with task 0
    assert len(ex.segments) == 2 and ex.bytes_live == a.nbytes + b.nbytes
    ex.task_done(0)
    assert len(ex.segments) == 2
    ex.task_done(1)
    assert ex.segments == [] and ex.bytes_live == 0
    assert handler.pinned_segments() == base  # nobody mapped them: unpinned at once
    with pytest.raises(RuntimeError, match="cannot pickle"):  # a task that fails keeps nothing
        ex.dumps((b, f.CannotPickle()), task=2)
    assert ex.segments == [] and handler.pinned_segments() == base
    ex.dumps(a)  # without a task: kept until close
    ex.dumps(a[3:], task=3)
    ex.task_done(3)
    assert len(ex.segments) == 1
    ex.close()
    assert ex.segments == [] and handler.pinned_segments() == base
