"""Costs that must not grow with table sizes, checked structurally (regions,
memory-map lines, files read), never by timing: the timings are in
benchmarks/bench_tables.py."""

from __future__ import annotations

import builtins
import ctypes
import errno
import mmap

import _tables_funcs as tf
import numpy as np
import pytest
from _libc import libc
from conftest import DEADLINE

from lazyshare import handler
from lazyshare.pool import Pool

pytestmark = pytest.mark.timeout(DEADLINE)

PAGE = mmap.PAGESIZE


@pytest.fixture
def small_pool():
    """One worker, every view of at least a page going lazily."""
    p = Pool(1, threshold=PAGE)
    try:
        yield p
    finally:
        p.terminate()
        p.join()


def _chunk(p, views):
    return p.map(tf.first_and_regions, views, chunksize=len(views))


def test_disjoint_views_in_one_chunk_share_one_region(small_pool):
    """Rows of one array in one map chunk: one region (one mapping, one
    registration, one hold) however many rows, so the worker's memory map does
    not grow with them (one region per view ran into vm.max_map_count)."""
    a = np.arange(20000 * 512, dtype=np.float64)  # 20,000 rows of 4 KiB
    rows = a.reshape(20000, 512)
    out_n = _chunk(small_pool, list(rows[:5000]))
    out_4n = _chunk(small_pool, list(rows))
    assert [v for v, _, _ in out_4n] == [float(r[0]) for r in rows]
    assert {r for _, r, _ in out_n} == {1} and {r for _, r, _ in out_4n} == {1}
    maps_n, maps_4n = max(m for *_, m in out_n), max(m for *_, m in out_4n)
    assert maps_4n < maps_n + 500  # not one more line per view (15,000 more)


def test_overlapping_views_get_regions_of_their_own(small_pool):
    """Sliding windows overlap: each must be as private as an unpickled copy,
    so they need as many regions as windows overlap at the deepest point."""
    a = np.arange(64 * 512, dtype=np.float64)
    w, step = 4 * 512, 512  # 16 KiB windows, 4 KiB apart: 4 deep
    windows = [a[i * step : i * step + w] for i in range(60)]
    out = _chunk(small_pool, windows)
    assert [v for v, _, _ in out] == [float(x[0]) for x in windows]
    assert {r for _, r, _ in out} == {4}


def test_views_in_one_task_stay_as_private_as_pickled_copies(small_pool):
    a = np.arange(4096, dtype=np.float64)
    # overlapping: a write through one view never shows through the other
    got, regions = small_pool.apply(tf.write_then_read, (a[:2048], a[1024:3072], 1500, 1500 - 1024))
    assert got == 1500.0 and regions == 2
    # the same view twice is one object (pickle's memo), as with the stdlib
    x = a[:2048]
    assert small_pool.apply(tf.same_object, (x, x)) == (True, 1)
    # disjoint: one region, and each still sees its own bytes
    got, regions = small_pool.apply(tf.write_then_read, (a[:2048], a[2048:], 0, 0))
    assert got == 2048.0 and regions == 1
    assert a[1500] == 1500.0 and a[0] == 0.0  # the parent's array is untouched


def test_lazy_overlap_sees_the_regions_of_the_fault_handler(small_pool):
    a = np.arange(8192, dtype=np.float64)
    views = [a[:1024], a[4096:5120], a[512:1536]]  # the first and last overlap
    inside, fresh, regions = small_pool.apply(tf.overlap_probe, (views,))
    assert inside == [True, True, True] and fresh is False and regions == 2


def _ranges():
    """Ranges of this process's memory, with whether untouched pages there are zeros."""
    heap = np.ones(1000)  # malloc'd: the heap or an anonymous arena
    big = np.zeros(16 << 20)  # its own anonymous mapping
    f = open("/proc/self/exe", "rb")  # noqa: SIM115 (closed by the caller)
    exe = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    shared = mmap.mmap(-1, 1 << 20)  # MAP_SHARED anonymous
    holed = _holed()
    exe_arr = np.frombuffer(exe, dtype=np.uint8)
    sh_arr = np.frombuffer(shared, dtype=np.uint8)
    cases = [
        ("heap", heap.ctypes.data, heap.nbytes, True),
        ("anonymous mapping", big.ctypes.data, big.nbytes, True),
        ("part of it", big.ctypes.data + 4096 * 3, 4096 * 5, True),
        ("file", exe_arr.ctypes.data, exe_arr.nbytes, False),
        ("shared", sh_arr.ctypes.data, sh_arr.nbytes, False),
        ("unmapped", 1 << 46, 4096, False),
        ("across a hole", holed, 3 * PAGE, False),
        ("before the hole", holed, PAGE, True),
    ]
    return cases, (heap, big, exe, shared, exe_arr, sh_arr, f)


def _holed() -> int:
    """Three anonymous pages whose middle one is unmapped again."""
    addr = libc.mmap(
        None, 3 * PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0
    )
    assert addr and addr != ctypes.c_void_p(-1).value
    assert libc.munmap(addr + PAGE, PAGE) == 0
    return addr


def test_anonymous_memory_is_found_without_reading_the_memory_map(monkeypatch):
    """Export decides whether untouched pages are zeros with PROCMAP_QUERY,
    one ioctl per VMA, never reading /proc/self/maps (whose cost grows with
    the number of mappings); the answers match the parse it replaces."""
    rc = handler.lib.ls_vma_anon(handler.ffi.cast("uint64_t", 4096), 4096)
    if rc in (-errno.ENOTTY, -errno.EINVAL):
        pytest.skip("no PROCMAP_QUERY in this kernel (Linux < 6.11)")
    cases, keep = _ranges()
    try:
        opened = []
        real_open = builtins.open

        def spy(path, *a, **k):
            opened.append(str(path))
            return real_open(path, *a, **k)

        monkeypatch.setattr(builtins, "open", spy)
        got = {name: handler._untouched_pages_are_zero(addr, n) for name, addr, n, _ in cases}
        a = np.ones(1 << 18)
        d = handler.export(a)
        handler.release(d)
        monkeypatch.setattr(builtins, "open", real_open)
        assert not [p for p in opened if "maps" in p]
        assert got == {name: want for name, _, _, want in cases}
        # the fallback for older kernels gives the same answers
        assert {name: handler._anon_by_maps(addr, n) for name, addr, n, _ in cases} == got
    finally:
        keep[-1].close()
