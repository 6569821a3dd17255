"""The consumer's side of a segment's page cache (csrc/client.c, source.c): a
region whose attach names the owner's cache memfd (fd and inode) maps it
privately, so pages another consumer fetched map without a request, faults on
holes ask the owner to fill the cache (LS_INSTALL_CACHED), and writes stay the
consumer's own. A cache that cannot be mapped (wrong inode, no such fd, too
short) falls back to anonymous memory, silently; the eager rung ignores it.

This process is the owner; consumers are spawned and attach with
ls_client_attach themselves (tests/_cache_client_child.py)."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import tempfile

import _cache_client_child as child
import numpy as np
import pytest
from conftest import DEADLINE

import lazyshare
from lazyshare import handler

pytestmark = pytest.mark.timeout(60)

CTX = mp.get_context("spawn")
PAGE = 4096

needs_uffd = pytest.mark.skipif(lazyshare.capabilities().mode == "eager", reason="needs userfaultfd")


class Consumer:
    """A spawned consumer driven over a queue pair."""

    def __init__(self):
        self.cmds, self.out = CTX.Queue(), CTX.Queue()
        self.p = CTX.Process(target=child.consumer, args=(self.cmds, self.out))
        self.p.start()

    def __call__(self, *cmd):
        self.cmds.put(cmd)
        got = self.out.get(timeout=DEADLINE)
        assert not (isinstance(got, tuple) and got and got[0] == "error"), got[1]
        return got

    def close(self):
        try:
            if self.p.is_alive():
                self.cmds.put(("quit",))
                self.out.get(timeout=10)
        except Exception:
            pass
        self.p.join(10)
        if self.p.is_alive():
            self.p.kill()
            self.p.join()


@pytest.fixture
def consumers():
    made = []

    def make():
        c = Consumer()
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture(params=["install", "wire"])
def data_path(request, monkeypatch):
    monkeypatch.setenv("LAZYSHARE_DATA_PATH", request.param)
    return request.param


def export(nbytes, seed=1, cache=False):
    """An exported random array (with a page cache if asked), its segment and
    the bytes the segment starts with."""
    a = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    desc = lazyshare.export(a)
    seg = desc.segment
    if cache:
        seg = handler.add_cache(seg)
        assert seg.cache_ino, "no page cache here"
    return a, desc, seg


def digest(b):
    return hashlib.sha256(bytes(b)).hexdigest()


def seg_bytes(a, desc, off, n):
    """Bytes [off, off+n) of the segment of a (its descriptor's offset is where a starts)."""
    raw = a.view(np.uint8).reshape(-1)
    return raw[off - desc.offset : off - desc.offset + n].tobytes()


# ---- no cache, or one that cannot be mapped: anonymous memory, as before


def test_no_cache_named_maps_anonymous_memory_and_counts_nothing(consumers, data_path):
    a, desc, seg = export(5 * PAGE + 123)
    try:
        c = consumers()
        r = c("attach", seg, desc.offset, a.nbytes, -1, 0)
        assert r["rc"] == 0 and r["cached"] == 0
        assert r["attaches"] == 0 and r["fallbacks"] == 0
        got, _, _, _ = c("read")
        assert got == digest(a.tobytes())
    finally:
        lazyshare.release(desc)


@needs_uffd
@pytest.mark.parametrize("wrong", ["inode", "no_such_fd", "too_short", "directory"])
def test_a_cache_that_cannot_be_mapped_falls_back_to_anonymous_memory(consumers, data_path, wrong):
    a, desc, seg = export(40 * PAGE + 77)
    other = tempfile.TemporaryFile()  # a regular file of this (the owner's) process
    other.write(b"x" * 4 * PAGE)
    other.flush()
    dirfd = os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd, ino = {
            "inode": (other.fileno(), os.fstat(other.fileno()).st_ino + 1),
            "no_such_fd": (999_999, 12345),  # above any fd number this process holds
            "too_short": (other.fileno(), os.fstat(other.fileno()).st_ino),  # right inode, 4 pages of 41
            "directory": (dirfd, os.fstat(dirfd).st_ino),
        }[wrong]
        c = consumers()
        r = c("attach", seg, desc.offset, a.nbytes, fd, ino)
        assert r["rc"] == 0, r
        assert r["cached"] == 0 and r["fallbacks"] == 1 and r["attaches"] == 0
        got, cost, _, smaps = c("read")
        assert got == digest(a.tobytes())
        assert cost["bytes_fetched"] >= a.nbytes
        assert smaps["Anonymous"] >= a.nbytes // PAGE * PAGE  # private anonymous memory, as before
        # writes are private, the owner's array is untouched
        assert c("write", 5, b"\xff\xfe") == "ok"
        assert c("peek", 4, 4) == a.tobytes()[4:5] + b"\xff\xfe" + a.tobytes()[7:8]
        assert c("detach") == 0
    finally:
        os.close(dirfd)
        other.close()
        lazyshare.release(desc)


def test_eager_rung_ignores_the_cache(consumers, monkeypatch):
    monkeypatch.setenv("LAZYSHARE_MODE", "eager")
    a, desc, seg = export(9 * PAGE + 5)
    other = tempfile.TemporaryFile()
    try:
        c = consumers()
        r = c("attach", seg, desc.offset, a.nbytes, other.fileno(), os.fstat(other.fileno()).st_ino)
        assert r["rc"] == 0 and r["cached"] == 0
        assert r["fallbacks"] == 0 and r["attaches"] == 0  # not even tried
        got, _, _, _ = c("read")
        assert got == digest(a.tobytes())
    finally:
        other.close()
        lazyshare.release(desc)


# ---- with the owner's cache


@needs_uffd
def test_two_consumers_share_the_cache_and_keep_their_writes(consumers, monkeypatch):
    """The install path: the first consumer's faults fill the cache; the second
    maps those pages without asking; their Rss is the memfd's (shmem), not
    anonymous memory; a write is the writer's own."""
    monkeypatch.setenv("LAZYSHARE_DATA_PATH", "install")
    n = 64 << 20
    a, desc, seg = export(n, seed=7, cache=True)
    original = digest(a.tobytes())
    try:
        first, second = consumers(), consumers()
        for c in (first, second):
            r = c("attach", seg, desc.offset, n, seg.cache_fd, seg.cache_ino)
            assert r["rc"] == 0 and r["cached"] == 1 and r["attaches"] == 1 and r["fallbacks"] == 0, r
        got1, cost1, rss1, smaps1 = first("read")
        assert got1 == original
        assert cost1["requests"] > 0 and cost1["bytes_fetched"] >= n
        got2, cost2, rss2, smaps2 = second("read")
        assert got2 == original
        # the second finds the pages in the cache: almost no faults, no requests
        assert cost2["faults"] * 8 <= cost1["faults"], (cost1, cost2)
        assert cost2["requests"] * 8 <= cost1["requests"], (cost1, cost2)
        for rss, smaps in ((rss1, smaps1), (rss2, smaps2)):
            assert rss["RssShmem"] + rss["RssFile"] >= n * 9 // 10, rss
            assert rss["RssAnon"] < n // 10, rss
            assert smaps["Anonymous"] < n // 10, smaps
            assert smaps["Rss"] >= n * 9 // 10, smaps

        # a write stays private: neither the cache, the other consumer nor the owner sees it
        pos = desc.offset + 3 * PAGE + 10
        assert first("write", pos - desc.offset, b"\x00\x11\x22\x33") == "ok"
        assert first("peek", pos - desc.offset, 4) == b"\x00\x11\x22\x33"
        want = seg_bytes(a, desc, pos, 4)
        assert want != b"\x00\x11\x22\x33"
        assert second("peek", pos - desc.offset, 4) == want
        assert os.pread(seg.cache_fd, 4, pos) == want
        assert digest(a.tobytes()) == original
        # a third consumer, attached after the write, reads the original too
        third = consumers()
        assert third("attach", seg, desc.offset, n, seg.cache_fd, seg.cache_ino)["cached"] == 1
        got3, cost3, _, _ = third("read")
        assert got3 == original and cost3["requests"] * 8 <= cost1["requests"]
        for c in (first, second, third):
            assert c("detach") == 0
    finally:
        lazyshare.release(desc)


@needs_uffd
def test_a_write_to_a_hole_fills_the_cache_and_stays_private(consumers, data_path):
    a, desc, seg = export(16 * PAGE, seed=3, cache=True)
    try:
        c, d = consumers(), consumers()
        for x in (c, d):
            assert x("attach", seg, desc.offset, a.nbytes, seg.cache_fd, seg.cache_ino)["cached"] == 1
        off = 5 * PAGE + 1  # into the array; its page is a hole of the cache yet
        assert c("write", off, b"\xab") == "ok"  # a write fault on a missing page
        around = c("peek", off - 1, 3)
        raw = a.tobytes()
        assert around == raw[off - 1 : off] + b"\xab" + raw[off + 1 : off + 2]
        assert d("peek", off - 1, 3) == raw[off - 1 : off + 2]
        assert digest(a.tobytes()) == digest(raw)
        got, _, _, _ = d("read")
        assert got == digest(raw)
    finally:
        lazyshare.release(desc)


@needs_uffd
def test_never_written_pages_read_as_zeros_from_a_cached_region(consumers, data_path):
    """Zero ranges come as zero pages in the consumer (the cache keeps its hole)."""
    n = 40 << 20  # above malloc's largest mmap threshold: fresh pages, never written
    buf = np.zeros(n, dtype=np.uint8)
    buf[10 * PAGE : 11 * PAGE] = 9
    desc = lazyshare.export(buf)
    seg = handler.add_cache(desc.segment)
    try:
        c = consumers()
        assert c("attach", seg, desc.offset, n, seg.cache_fd, seg.cache_ino)["cached"] == 1
        got, cost, _, _ = c("read")
        assert got == digest(buf.tobytes())
        assert cost["bytes_zero"] > 0
    finally:
        lazyshare.release(desc)


@needs_uffd
def test_pages_punched_from_the_cache_under_a_mapping_are_fetched_again(consumers, monkeypatch):
    """A page dropped from the cache (ls_server_cache_punch) while a consumer
    maps it faults again there: it is fetched anew (the owner's current bytes),
    not woken into a fault loop."""
    monkeypatch.setenv("LAZYSHARE_DATA_PATH", "install")
    a, desc, seg = export(32 * PAGE, seed=5, cache=True)
    try:
        c = consumers()
        assert c("attach", seg, desc.offset, a.nbytes, seg.cache_fd, seg.cache_ino)["cached"] == 1
        got, _, _, _ = c("read")
        assert got == digest(a.tobytes())
        a[4 * PAGE : 6 * PAGE] = 0x5A  # the owner changes two pages and drops them from the cache
        assert handler.cache_punch(seg, [(desc.offset + 4 * PAGE, desc.offset + 6 * PAGE)]) > 0
        got, cost, _, _ = c("read")
        assert got == digest(a.tobytes())
        assert cost["requests"] >= 1
    finally:
        lazyshare.release(desc)


@needs_uffd
def test_a_budget_maps_anonymous_memory_and_never_drops_pages_of_a_cached_region(consumers, data_path):
    """A budget needs pages it can drop: under one, a region attached does not
    map the cache (anonymous, write-protected memory instead, trimmed to the
    budget; no fallback counted). A cached region attached before the budget
    was set is never trimmed: its pages are the cache's, and dropping a page of
    a private file mapping would lose the consumer's writes."""
    n = 8 << 20
    a, desc, seg = export(n, seed=11, cache=True)
    raw = bytearray(a.tobytes())
    try:
        c = consumers()
        assert c("budget", 1 << 20) == 0
        r = c("attach", seg, desc.offset, n, seg.cache_fd, seg.cache_ino)
        assert r["rc"] == 0 and r["cached"] == 0 and r["fallbacks"] == 0 and r["attaches"] == 0
        got, cost, _, _ = c("read")
        assert got == digest(raw) and cost["bytes_dropped"] > 0

        d = consumers()
        assert d("attach", seg, desc.offset, n, seg.cache_fd, seg.cache_ino)["cached"] == 1
        assert d("budget", 1 << 20) == 0
        assert d("write", 100, b"\x01\x02") == "ok"
        raw[100:102] = b"\x01\x02"
        got, cost, _, _ = d("read")
        assert got == digest(raw) and cost["bytes_dropped"] == 0
        got, cost, _, _ = d("read")  # again: nothing was dropped, nothing moves
        assert got == digest(raw) and cost["requests"] == 0 and cost["bytes_dropped"] == 0
    finally:
        lazyshare.release(desc)


@needs_uffd
def test_read_ahead_asks_only_for_the_holes_of_the_cache(consumers, monkeypatch):
    """Pages the cache holds are not requested by read-ahead (the owner would
    skip them, but its reply would count them as fetched): after pairs of pages
    are punched out of a filled cache, a new consumer reading everything
    fetches exactly those pages."""
    monkeypatch.setenv("LAZYSHARE_DATA_PATH", "install")
    n = 4 << 20
    a, desc, seg = export(n, seed=13, cache=True)
    try:
        first = consumers()
        assert first("attach", seg, desc.offset, n, seg.cache_fd, seg.cache_ino)["cached"] == 1
        assert first("read")[0] == digest(a.tobytes())
        assert first("detach") == 0
        # adjacent pairs: the second fault of a pair is sequential and would read ahead
        holes = [(k * 16 * PAGE, (k * 16 + 2) * PAGE) for k in range(1, n // (16 * PAGE) - 1)]
        assert handler.cache_punch(seg, holes) == 2 * PAGE * len(holes)
        second = consumers()
        assert second("attach", seg, desc.offset, n, seg.cache_fd, seg.cache_ino)["cached"] == 1
        got, cost, _, _ = second("read")
        assert got == digest(a.tobytes())
        assert cost["bytes_fetched"] == 2 * PAGE * len(holes), cost
    finally:
        lazyshare.release(desc)
