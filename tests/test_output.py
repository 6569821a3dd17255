"""Shared output arrays (lazyshare.shared, lazyshare/output.py): tasks'
writes merged back into the parent's array, byte-exact, on every rung.

Each case runs in a fresh interpreter (tests/_output_child.py): as root on the
full ``uffd`` rung, as user nobody on ``uffd-user-mode-only``, and with
``LAZYSHARE_MODE=eager`` (workers copy whole segments; every page they hold
goes back as a candidate, and the merge is as exact)."""

from __future__ import annotations

import pytest
from _proc import run_case

pytestmark = pytest.mark.timeout(150)

RUNGS = ["uffd", "uffd-user-mode-only", "eager"]


def case(name: str, rung: str, env: dict | None = None) -> dict:
    return run_case("_output_child.py", name, rung, env, timeout=140)


@pytest.mark.parametrize("rung", RUNGS)
def test_interleaved_writes_of_16_tasks_all_land(rung):
    # 256 MiB on the lazy rungs; the eager rung copies the whole output into
    # each task and sends all of it back, so 64 MiB keeps it quick.
    r = case("interleaved", rung, {"OUT_MB": "64" if rung == "eager" else "256"})
    assert r["ok"]  # every element checked against the expected array
    assert r["stats"]["tasks_merged"] >= 8 and r["stats"]["conflicts"] == 0
    # Each task wrote 1/16 of every page, over pages whose twin is zeros: it
    # sends those words and a bit per word (1/64 more), not the pages (16x).
    assert r["stats"]["bytes_sent"] <= 1.3 * r["nbytes"]


@pytest.mark.parametrize("rung", RUNGS)
def test_contiguous_blocks_by_map_imap_and_apply(rung):
    r = case("blocks", rung)
    assert r["in_place"] == [True] * 16  # each imap result finds its block merged
    assert r["imap"] and r["map"] and r["apply"]
    assert r["stats"]["bytes_merged"] > 0


@pytest.mark.parametrize("rung", RUNGS)
def test_conflicts(rung):
    r = case("conflict", rung)
    # Calls one after the other: the later call saw the earlier one's values; no conflict.
    assert r["error"] is None
    assert r["first"] == [1.0] * 5 + [2.0] * 10
    assert r["others"] == [1.0, 1.0, 2.0, 2.0]
    assert r["same"] == [4.0, 4.0]  # the same value written twice is no conflict
    # Two tasks of one map change the same ten float64s: the later result fails.
    assert r["map_error"] == 80 and r["map_first"] == 1.0
    assert r["last"] == 2.0  # conflicts="last": the later value, whole
    assert r["stats"]["conflicts"] == 2


@pytest.mark.parametrize("rung", RUNGS)
def test_failed_tasks_merge_nothing(rung):
    r = case("failures", rung)
    assert r["raised"] and r["after_raise"] == 0.0
    assert r["lost"] and r["after_death"] == 0.0
    assert r["retry"] == [1.0, 1.0]  # += 1 by the retry lands once
    assert r["mixed"] == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("rung", ["uffd", "eager"])
def test_views_small_arrays_and_unshare(rung):
    r = case("views", rung)
    assert r["view"]  # a strided view written by 8 tasks
    assert r["span"]  # a span ending inside pages, written sparsely
    assert r["ends"] == [0.0, 3.0, 3.0, 3.0, 0.0] and r["ends_sum"] == 9.0
    # three sparse pages, each counted once: not the whole pages the two
    # crossing the span's ends are made into to be cut
    assert r["ends_sent"] < 4096, r["ends_sent"]
    assert r["only_view"] == [5.0, 0.0, 0.0]  # only the marked rows merged
    assert r["small"] == [float(i + 1) for i in range(10)]  # below the export threshold
    assert r["unshared"] == r["small"]  # unshared: pickled again, writes stay private


@pytest.mark.parametrize("rung", ["uffd", "uffd-user-mode-only"])
def test_sparse_writes_send_back_only_the_pages_written(rung):
    r = case("sparse", rung)
    assert r["ok"]
    # One float64 changed per page in 1% of the pages: only those pages go back.
    assert r["bytes_sent"] <= 1.1 * r["pages_changed"] * r["page"]


@pytest.mark.parametrize("rung", RUNGS)
def test_a_workers_next_task_reuses_the_cleared_region(rung):
    r = case("reuse", rung)
    assert r["plain"]["clean"] and r["plain"]["exact"]
    assert r["plain"]["reused"] >= 1  # 16 tasks on 2 workers: regions were given again
    assert r["kept"]["clean"] and r["kept"]["exact"]
    assert r["kept"]["reused"] == 0  # every task kept its argument: none reused
    assert r["unpinned_after"] < 3  # the idle workers let the segments go (after 0.2 s)


@pytest.mark.parametrize("rung", RUNGS)
def test_parent_writes_during_the_call_are_kept(rung):
    # The page the parent writes was never written at submission: on every
    # rung the task reads it as zeros, and the merge keeps the parent's write.
    r = case("parent_writes", rung)
    assert r == {"task": 3.0, "parent": 99.0, "seen": 0.0, "mode": rung}


@pytest.mark.parametrize("rung", RUNGS)
def test_written_and_never_written_pages(rung):
    r = case("prefilled", rung)
    # 32 MiB of zeros written over never-written pages: nothing goes back (the
    # two pages the array shares with malloc's header too: its bytes there
    # are zeros, so their twin is zeros).
    assert r.pop("zeros_over_zeros_sent") == 0
    assert r == {"mode": rung, "bump": True, "zeros_over_data": True, "fresh_zero": True}


def test_executor_and_joblib_backend():
    r = case("executor_joblib", "uffd")
    assert r["executor"]
    if r["joblib"] == "missing":
        pytest.skip("joblib is not installed")
    assert r["joblib"]


def test_bad_input_is_refused_clearly():
    r = case("refused", "uffd")
    assert r["readonly"].startswith("ValueError") and "read-only" in r["readonly"]
    assert r["object"].startswith("TypeError") and "objects" in r["object"]
    assert r["list"].startswith("TypeError")
    assert "conflicts must be one of" in r["conflicts"]
    assert r["empty"] and r["empty_call"] == 0.0
