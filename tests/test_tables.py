"""Costs that must not grow with table sizes: structural checks (no timings;
those are in benchmarks/bench_tables.py)."""

from __future__ import annotations

import builtins
import ctypes
import errno
import mmap

import numpy as np
import pytest
from conftest import DEADLINE

from lazyshare import handler

pytestmark = pytest.mark.timeout(DEADLINE)

PAGE = mmap.PAGESIZE


def test_lazy_overlap_finds_the_one_candidate_mapping():
    base = 1 << 44  # far from anything this process maps
    regions = {}
    try:
        for k in range(1000):
            regions[10**9 + k] = (base + k * 3 * 4096, 2 * 4096)  # gaps of a page between them
            handler._attached_add(10**9 + k, *regions[10**9 + k])
        assert handler.lazy_overlap(base, 1)
        assert handler.lazy_overlap(base + 2 * 4096 - 1, 1)
        assert not handler.lazy_overlap(base + 2 * 4096, 4096)  # the gap
        assert handler.lazy_overlap(base + 2 * 4096, 4097)  # reaches the next one
        assert not handler.lazy_overlap(base - 4096, 4096)
        assert handler.lazy_overlap(base - 4096, 4097)
        assert handler.lazy_overlap(base + 500 * 3 * 4096 + 100, 8)
        assert not handler.lazy_overlap(base + 999 * 3 * 4096 + 2 * 4096, 1 << 20)
        assert not handler.lazy_overlap(base, 0)
        for k in range(0, 1000, 2):
            handler._attached_remove(10**9 + k)
        assert not handler.lazy_overlap(base, 2 * 4096)
        assert handler.lazy_overlap(base + 3 * 4096, 1)
        assert handler.lazy_overlap(base, 1 << 40)
    finally:
        for r in regions:
            handler._attached_remove(r)
    assert not handler.lazy_overlap(base, 1 << 40)


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
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
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
