"""The pool with the default threshold: big arrays travel lazily (native core)."""

from __future__ import annotations

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
