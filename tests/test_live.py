"""Segments that outlive a call (lazyshare/live.py): a page cache shared by
the workers, write tracking in the parent, release with the array.

Each case runs in a fresh interpreter (tests/_live_child.py), on the full
``uffd`` rung as root and on the ``uffd-user-mode-only`` rung as user nobody
(what an ordinary user gets), since tracking changes the process."""

from __future__ import annotations

import pytest
from _proc import run_case

from lazyshare import handler

pytestmark = pytest.mark.timeout(120)

RUNGS = ["uffd", "uffd-user-mode-only"]


def _tracking_ok() -> bool:
    return handler.lib.ls_track_supported() == 1


needs_tracking = pytest.mark.skipif(
    not _tracking_ok(), reason="write tracking needs UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN (Linux 6.7+)"
)


def case(name: str, rung: str = "uffd", env: dict | None = None) -> dict:
    """Run _live_child.case_<name> at ``rung`` (see ``_proc.run_case``)."""
    return run_case("_live_child.py", name, rung, env)


@needs_tracking
@pytest.mark.parametrize("rung", RUNGS)
@pytest.mark.parametrize("name", ["snapshot", "snapshot_budget", "snapshot_wire"])
def test_tasks_see_their_arguments_as_of_submission(rung, name):
    # snapshot_budget: workers that do not map the cache; snapshot_wire: pages
    # sent as reply payload (both get the snapshot's pages through the cache).
    env = {"LAZYSHARE_DATA_PATH": "wire"} if name == "snapshot_wire" else None
    r = case(name.replace("_wire", ""), rung, env=env)
    for k in ("fresh", "cached"):
        assert r[k + "_next"] == [r["chunk"]] * 16  # the next call sees the ones
        if rung == "uffd":
            # The full rung holds the parent's writes back: each block is
            # copied into the cache before its first write; no warning.
            assert r[k] == [0.0] * 16
        else:
            # The user-mode-only rung cannot (a held-back kernel-mode write
            # would fail with EFAULT): a task that had not read its pages may
            # have seen ones; one warning per array says so.
            for s in r[k]:
                assert 0.0 <= s <= r["chunk"]
    assert r["snapshots"] == (rung == "uffd")  # capabilities() says which it is
    if rung == "uffd":
        assert r["warned"] == 0 and r["broken"] == 0
        assert r["preserved"] >= 2 * 32 * 2**20 * 0.9
    else:
        assert r["warned"] == 2
        assert r["preserved"] == 0


@needs_tracking
@pytest.mark.parametrize("rung", RUNGS)
def test_parent_threads_writing_while_calls_run_never_hang(rung):
    r = case("writers", rung)
    assert r["calls"] == 16 and r["final"] and not r["alive"] and r["errors"] == []
    assert r["broken"] == 0
    if rung == "uffd":
        assert r["faults"] > 0  # the writers did wait on the snapshot thread


@needs_tracking
def test_a_call_started_while_another_runs_gets_its_own_snapshot():
    r = case("concurrent")
    assert r["ok"]
    assert r["generations"] >= 2


@needs_tracking
@pytest.mark.parametrize("rung", RUNGS)
def test_pages_discarded_by_the_parent(rung):
    r = case("discard", rung)
    assert r["ok"]
    if rung == "uffd":
        assert r["broken"] == 1 and r["warned"] == 0
    else:
        assert r["warned"] == 1


@needs_tracking
@pytest.mark.parametrize("rung", RUNGS)
def test_only_pages_written_between_calls_move_again(rung):
    r = case("dirty", rung)
    assert r["ok"]
    assert r["first"] >= r["bytes"] * 0.9
    # Unchanged: the workers map what the first call cached, nothing moves.
    assert r["unchanged"] <= r["bytes"] * 0.01
    assert r["stats"]["bytes_reused"] >= r["bytes"] * 0.9
    # 1% of the pages written: about those move again (a page is the unit).
    assert r["after_1pct"] <= r["changed"] * 1.1 + (64 << 10)
    assert r["stats"]["bytes_invalidated"] >= r["changed"] * 0.9
    if rung == "uffd":
        # Written blocks are compared with their cached pages: bytes written
        # back unchanged move nothing.
        assert r["after_same"] <= 64 << 10
    else:
        assert r["after_same"] >= r["bytes"] * 0.9


@needs_tracking
@pytest.mark.parametrize("rung", RUNGS)
def test_an_array_that_dies_takes_its_cache_from_every_process(rung):
    r = case("freed", rung)
    assert r["ok"]
    assert r["kept"] == 1
    assert r["released"]  # no kept segment, no cache memfd in the parent
    assert len(r["workers"]) == 2
    for maps, fds in r["workers"]:
        assert (maps, fds) == (0, 0)


@needs_tracking
def test_resize_refused_while_a_pool_runs_then_allowed_and_seen():
    r = case("realloc")
    assert r["ok"]
    assert r["refused"]  # numpy: an array with a weak reference cannot resize
    assert r["kept_after"] == 0


@needs_tracking
@pytest.mark.parametrize("name", ["mremap", "dontneed", "fork", "task_writes", "untracked"])
def test_parent_memory_events_between_calls(name):
    r = case(name)
    assert r["ok"]
    if name == "task_writes":
        assert r["parent_intact"]


@needs_tracking
@pytest.mark.parametrize("rung", RUNGS)
def test_kernel_mode_writes_by_the_parent(rung):
    r = case("kernel_write", rung)
    assert r["ok"]
    if rung == "uffd":  # the readinto during the call waited for its blocks to be kept
        assert r["snapshot"] and r["warned"] == 0
    else:  # ...or was reported
        assert r["warned"] == 1


@needs_tracking
def test_many_arrays_created_and_dropped_leave_nothing():
    r = case("churn")
    assert r["ok"]
    assert r["released"]
    assert r["segments"] == 0  # nothing tracked any more
    # 30 more arrays went through between the marks: a leak would leave 30+
    # mappings; a few come and go with the allocator and the pool's threads.
    assert abs(r["maps"][1] - r["maps"][0]) <= 8
    assert r["fds"][1] <= r["fds"][0]
    assert r["rss_growth"] < (32 << 20)


@needs_tracking
def test_caches_stay_within_the_cap_between_calls():
    r = case("cap", env={"LAZYSHARE_CACHE_MAX": str(40 << 20)})
    assert r["ok"]
    assert r["cached"] <= 40 << 20
    assert r["evicted"] >= 16 << 20
    recent, oldest = r["moved"]
    assert recent <= 1 << 20  # still cached
    assert oldest >= 15 << 20  # emptied: fetched again


def test_cache_off_exports_per_call():
    r = case("dirty", env={"LAZYSHARE_CACHE": "0"})
    assert r["ok"]
    assert r["unchanged"] >= r["bytes"] * 0.9  # everything moves again
    assert r["stats"]["segments"] == 0


@needs_tracking
@pytest.mark.parametrize("rung", RUNGS)
def test_never_written_pages_stay_zeros_without_payload(rung):
    r = case("zeros", rung)
    assert r["ok"]
    # Tracking marks never-written pages; they still go as zero pages: no
    # bytes, no cache (but the first page, which holds the allocator's header).
    assert r["first"] <= 2 * 4096
    assert r["cached"] <= 2 * 4096
    assert 0 < r["after_write"] <= 2 * 4096
