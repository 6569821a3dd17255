"""The fault handler's read-ahead policy (csrc/readahead.c), driven directly
through the compiled module: a pure function of a region's small state."""

from __future__ import annotations

import pytest
from lazyshare._native import ffi, lib

pytestmark = pytest.mark.timeout(60)

MIN, MAX = 4, 64  # pages


def frm(pl) -> int:
    """The demand block's first page (``from`` is a Python keyword)."""
    return getattr(pl, "from")


class Region:
    """One region's read-ahead state and requested-pages bitmap, as the fault
    handler keeps them."""

    def __init__(self, npages: int, min_pages: int = MIN, max_pages: int = MAX):
        self.npages, self.min, self.max = npages, min_pages, max_pages
        self.ra = ffi.new("struct ls_readahead *")
        lib.ls_readahead_init(self.ra, min_pages)
        self.bits = ffi.new("uint8_t[]", (npages + 7) // 8)
        self.requests: list[tuple[int, int]] = []  # (first page, pages) in send order

    def plan(self, page: int):
        out = ffi.new("struct ls_readahead_plan *")
        lib.ls_readahead_fault(self.ra, page, self.npages, self.min, self.max, out)
        return out

    def runs(self, lo: int, hi: int) -> list[tuple[int, int]]:
        start, n = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        out, p = [], lo
        while lib.ls_readahead_next_run(self.bits, p, hi, self.max, start, n):
            out.append((start[0], n[0]))
            p = start[0] + n[0]
        return out

    def mark(self, start: int, n: int) -> None:
        for i in range(start, start + n):
            self.bits[i >> 3] |= 1 << (i & 7)

    def requested(self, page: int) -> bool:
        return bool(self.bits[page >> 3] >> (page & 7) & 1)

    def fault(self, page: int):
        """What the handler does on a fault: the demand block unless the page
        is already requested, then the window ahead if sequential."""
        pl = self.plan(page)
        ranges = [] if self.requested(page) else [(frm(pl), pl.to)]
        if pl.sequential:
            ranges.append((pl.ahead_from, pl.ahead_to))
        for lo, hi in ranges:
            for start, n in self.runs(lo, hi):
                self.mark(start, n)
                self.requests.append((start, n))
        return pl


def test_first_fault_fetches_min_block_and_nothing_ahead():
    r = Region(1000)
    pl = r.fault(100)
    assert (frm(pl), pl.to, pl.sequential) == (100, 104, 0)
    assert r.ra.window == MIN
    assert r.requests == [(100, 4)]


def test_sequential_scan_grows_the_window_to_max_and_requests_ahead():
    r = Region(100_000)
    windows, faulted = [], []
    for page in range(r.npages):  # a reader touching every page in order
        if not r.requested(page):
            pl = r.fault(page)
            windows.append(r.ra.window)
            faulted.append(page)
            if len(faulted) > 1:
                assert pl.sequential and pl.ahead_from == pl.to
                assert pl.ahead_to == min(pl.to + r.ra.window, r.npages)
    assert windows[:6] == [4, 8, 16, 32, 64, 64]
    assert set(windows[4:]) == {MAX}
    # every page requested exactly once, in runs of at most max_pages
    covered = sorted(p for s, n in r.requests for p in range(s, s + n))
    assert covered == list(range(r.npages))
    assert max(n for _, n in r.requests) == MAX
    # once at full speed one fault every two windows: read-ahead hides the rest
    assert len(faulted) < r.npages // MAX + 10


def test_random_faults_stay_at_min_block():
    r = Region(1 << 20)
    page = 12345
    for _ in range(200):
        page = (page * 7919 + 104729) % r.npages
        pl = r.fault(page)
        if not pl.sequential:
            assert r.ra.window == MIN and pl.to - frm(pl) == min(MIN, r.npages - page)
            assert (pl.ahead_from, pl.ahead_to) == (0, 0)
    assert all(n <= MIN for _, n in r.requests)


def test_backward_scan_is_not_sequential():
    r = Region(10_000)
    for page in range(9_000, 8_000, -MIN):
        pl = r.fault(page)
        assert not pl.sequential and r.ra.window == MIN
        assert (frm(pl), pl.to) == (page, page + MIN)
    assert all(n == MIN for _, n in r.requests)


def test_read_ahead_never_goes_past_the_region_end():
    r = Region(50)
    for page in range(r.npages):
        if not r.requested(page):
            pl = r.fault(page)
            assert pl.to <= r.npages and pl.ahead_to <= r.npages and pl.ahead_from <= pl.ahead_to
    assert sorted(p for s, n in r.requests for p in range(s, s + n)) == list(range(50))
    # a fault on the very last page: one page, nothing ahead of it
    r2 = Region(50)
    pl = r2.fault(49)
    assert (frm(pl), pl.to) == (49, 50)
    pl = r2.fault(49)  # again (already requested): sequential, but nothing left ahead
    assert pl.sequential and pl.ahead_from == pl.ahead_to == 50


def test_window_resets_after_a_random_jump_and_grows_again():
    r = Region(1 << 20)
    page = 0
    for _ in range(6):  # each fault lands on the start of the window read ahead
        r.fault(page)
        page = max(s + n for s, n in r.requests) - r.ra.window
    assert r.ra.window == MAX
    pl = r.fault(500_000)  # far ahead: random
    assert not pl.sequential and r.ra.window == MIN
    pl = r.fault(500_000 + MIN)  # then in order again: grows from min
    assert pl.sequential and r.ra.window == 2 * MIN
    pl = r.fault(400_000)  # behind the last fault: random
    assert not pl.sequential and r.ra.window == MIN


def test_pages_already_requested_are_skipped():
    r = Region(100)
    r.mark(10, 3)  # 10, 11, 12 already requested (say by an earlier fault)
    r.mark(20, 1)
    assert r.runs(8, 30) == [(8, 2), (13, 7), (21, 9)]
    assert r.runs(10, 13) == []
    long = Region(1000)
    assert long.runs(0, 200) == [(0, 64), (64, 64), (128, 64), (192, 8)]
