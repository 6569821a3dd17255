"""Dirty tracking of the owner's own memory (csrc/track.c): which pages were
written since a point in time. Every case runs in a fresh interpreter
(tests/_track_child.py): registrations, the tracking userfaultfd and split huge
pages must not leak into the test process."""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest
from _proc import as_user

pytestmark = pytest.mark.timeout(60)

HERE = os.path.dirname(os.path.abspath(__file__))


def case(name, *args, env=None, user=None):
    """Run _track_child.<name>(*args) in a new interpreter; its result dict."""
    cmd = [sys.executable, os.path.join(HERE, "_track_child.py"), name, *args]
    full_env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]), **(env or {})
    )
    if user is not None:
        cmd = as_user(cmd, user)
    r = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=55)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_supported_on_this_kernel():
    r = case("supported")
    assert r["supported"] == 1
    assert r["mode"] in (0, 1)  # LS_MODE_UFFD or LS_MODE_UFFD_USER


def test_written_pages_reported_exactly_then_clean_after_reprotect():
    r = case("basic")
    assert r["add"] == 0
    assert r["clean"] == []  # nothing written yet
    assert r["reported"] == r["written"]  # 1% of 16384 pages, exactly those
    assert r["ranges_merged"]  # adjacent pages come as one range, ranges sorted and disjoint
    assert r["after_reprotect"] == []
    assert r["again"] == r["written"][:5]  # the same pages written again show again
    assert r["still_there_without_reprotect"] == r["written"][:5]  # reprotect=0 only looks
    assert r["clean_at_end"] == []
    assert r["values_kept"]  # tracking never changes what the memory holds
    assert r["remove"] == 0
    assert r["after_remove"] == -errno.ENOENT


def check_kernel_write(r):
    assert r["add"] == 0 and r["clean"] == []
    assert r["readv"] == 3 * 4096 and r["content_ok"]  # no EFAULT: async never blocks the writer
    assert r["readinto"] == 4096
    assert r["reported"] == [10, 11, 12, 13, 100]
    assert r["remove"] == 0


def test_kernel_mode_write_recorded_full_rung():
    r = case("kernel_write", "rung", env={"LAZYSHARE_MODE": "uffd"})
    assert r["mode"] == 0
    check_kernel_write(r)


def test_kernel_mode_write_recorded_user_mode_only_rung():
    r = case("kernel_write", "rung", env={"LAZYSHARE_MODE": "uffd-user-mode-only"})
    assert r["mode"] == 1  # UFFD_USER_MODE_ONLY: a sync uffd would fail these reads with EFAULT
    check_kernel_write(r)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges to another user")
def test_kernel_mode_write_recorded_as_unprivileged_user():
    nobody = pwd.getpwnam("nobody")
    rt = tempfile.mkdtemp()
    os.chown(rt, nobody.pw_uid, nobody.pw_gid)
    try:
        r = case("kernel_write", "auto", env={"HOME": rt}, user=nobody.pw_uid)
    finally:
        shutil.rmtree(rt, ignore_errors=True)
    assert r["uid"] == nobody.pw_uid
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        sysctl = f.read().strip()
    # /dev/userfaultfd is root's 0600: the full rung only if the sysctl allows
    # userfaultfd(2) to anyone; else the tracker falls back to user-mode-only.
    assert r["mode"] == (0 if sysctl == "1" else 1)
    check_kernel_write(r)


def test_sync_tracking_holds_writes_and_reports_blocks():
    r = case("sync", "full")
    assert r["add"] == 0 and r["mode"] == 0 and r["clean"] == []
    assert r["joined"] and r["readv"] == 4096  # no writer stuck, no EFAULT from the kernel
    lo, hi, blk = r["lo"], r["hi"], 2 << 20
    # Every page was written: every block, clipped to the range, one range.
    assert r["reported"] == [[lo, hi]]
    # No snapshot open: the first write to a span of 16 blocks (32 MiB, aligned)
    # waited once and unprotected the span (16 MiB here: one span or two; each
    # of the 4 writers may have faulted before the first fault was handled).
    spans = len(range((lo // (16 * blk)) * 16 * blk, hi, 16 * blk))
    assert 1 <= r["faults"] <= 4 * spans
    assert r["clean_after"] == [] and r["values"]
    assert r["madvise"] == 0
    assert r["after_madvise"] == [[r["base"] + (4 << 20), r["base"] + (6 << 20)]]
    assert r["remove"] == 0 and r["count"] == 0


def test_sync_tracking_refused_on_the_user_mode_only_rung():
    # A held-back kernel-mode write would fail with EFAULT there: never offered.
    r = case("sync", "user")
    assert r["add"] == -errno.EPERM


def test_madv_dontneed_reported_written():
    r = case("dontneed")
    assert r["add"] == 0 and r["madvise"] == 0
    assert r["reported"] == [3, 4]  # the zapped pages changed (they read as zeros now)
    assert r["reads_zero"] == 0
    assert r["clean_after"] == []
    assert r["remove"] == 0


def test_mremap_or_a_new_mapping_loses_tracking():
    r = case("mremap")
    assert r["add"] == 0 and r["moved"]
    assert r["old_range"] == -errno.ENXIO  # treat all as written, re-add
    assert r["old_again"] == -errno.ENXIO  # and it stays so until removed or re-added
    assert r["readd_new"] == 0 and r["new_clean"] == []
    assert r["remove_old"] == 0 and r["remove_new"] == 0
    # unmapped and mapped anew at the same address: PM_SCAN_CHECK_WPASYNC fails
    assert r["add_c"] == 0 and r["remapped_same_place"]
    assert r["replaced_mapping"] == -errno.ENXIO
    assert r["readd_replaces_lost"] == 0 and r["readd_clean"] == []
    assert r["remove_c"] == 0


def test_memory_that_cannot_be_tracked_honestly_is_refused():
    r = case("refused")
    assert r["shared_anon"] == -errno.EOPNOTSUPP
    assert r["file_private"] == -errno.EOPNOTSUPP
    assert r["file_shared"] == -errno.EOPNOTSUPP
    assert r["unaligned"] == r["odd_length"] == r["empty"] == -errno.EINVAL
    assert r["gap"] == -errno.ENOMEM
    assert r["ok"] == 0
    assert r["overlap"] == r["twice"] == -errno.EEXIST
    assert r["dirty_outside"] == r["dirty_across"] == -errno.ENOENT
    assert r["dirty_no_room"] == -errno.EINVAL
    assert r["remove_partial"] == -errno.ENOENT
    assert r["count"] == 1 and r["remove"] == 0
    if r["madvise_mergeable"] != 0:
        pytest.skip(f"madvise(MADV_MERGEABLE): {os.strerror(r['madvise_errno'])} (no KSM in this kernel)")
    assert r["mergeable"] == -errno.EOPNOTSUPP  # KSM merging drops the write-protect bit
    assert r["count_end"] == 0


def test_fork_child_tracks_nothing_and_its_writes_stay_out_of_the_parent():
    r = case("fork")
    assert r["add"] == 0
    c = r["child"]
    assert c["dirty"] == -errno.ENOENT and c["count"] == 0 and c["remove"] == -errno.ENOENT
    assert c["add_own"] == 0 and c["own"] == [30] and c["own_remove"] == 0
    assert r["parent"] == [1, 40]  # the child's pages 2, 20 and 30 never show
    assert r["parent_values"] == [1, 1]
    assert r["remove"] == 0


def test_more_than_512_disjoint_ranges_all_reported():
    r = case("many_ranges")
    assert r["add"] == 0 and r["want"] == 1024
    assert r["ranges_one_call"] == 1024 and r["all_one_call"]
    assert r["ranges_continued"] == 1024 and r["all_continued"]  # out full: go on from the last end
    assert r["clean_after"] == []  # what was reported, and only that, was protected again
    assert r["remove"] == 0


def test_add_remove_loop_leaves_no_fds_or_mappings():
    r = case("add_remove_loop")
    assert r["supported"] == 1
    assert r["fds"][1] == r["fds"][0]
    assert r["maps"][1] <= r["maps"][0] + 2
    assert r["count"] == 0


def test_huge_page_write_reported_at_4k_and_splits_only_that_huge_page():
    r = case("thp")
    assert r["add"] == 0 and r["clean"] == []
    if r["huge_before"] < 8192:
        pytest.skip("no transparent huge pages for this mapping")
    assert r["huge_armed"] == 8192  # protecting keeps the PMD mappings
    assert r["reported"] == [515]  # 4 KiB granularity inside a huge page
    assert r["huge_after"] == 8192 - 2048  # the first tracked write split that one huge page
    assert r["remove"] == 0


def test_cache_of_reported_pages_stays_equal_under_a_racing_writer():
    r = case("mirror_while_writing")
    assert r["add"] == 0
    assert r["scans"] >= 50 and r["scans_with_writes"] >= 10 and r["writes"] > 0
    assert r["equal"]  # no write fell between a report and its re-protection
    assert r["remove"] == 0
