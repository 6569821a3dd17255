"""Cases of test_track.py, each run in a fresh interpreter (``python -c``):
tracking changes the process (registrations, a userfaultfd, split huge pages),
so none of it may happen in the test process. A case returns a dict, printed
as JSON on the last line of stdout."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import time

import numpy as np
from _libc import libc  # mmap/munmap signatures set
from lazyshare._native import ffi, lib

PS = mmap.PAGESIZE

libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MREMAP_MAYMOVE = 1
MAP_FAILED = ctypes.c_void_p(-1).value
MADV_DONTNEED = 4
MADV_MERGEABLE = 12
MADV_NOHUGEPAGE = 15


def raw_map(
    n: int, flags: int = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, fd: int = -1, fill: bool = True
) -> int:
    """n bytes mapped with libc.mmap (not owned by a Python object), populated."""
    a = libc.mmap(None, n, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    assert a != MAP_FAILED, os.strerror(ctypes.get_errno())
    if fill:
        view(a, n)[:] = 1
    return a


def view(addr: int, n: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr))


def dirty(addr: int, n: int, reprotect: int = 1, max_ranges: int = 4096) -> list[tuple[int, int]] | int:
    """Every written range of [addr, addr+n) as offsets, continuing while out
    fills; the -errno if the scan fails."""
    out = ffi.new("uint64_t[]", 2 * max_ranges)
    got: list[tuple[int, int]] = []
    cur = addr
    while True:
        r = lib.ls_track_dirty(cur, addr + n - cur, out, max_ranges, reprotect)
        if r < 0:
            return r
        got += [(out[2 * i] - addr, out[2 * i + 1] - addr) for i in range(r)]
        if r < max_ranges:
            return got
        cur = out[2 * r - 1]
        if cur >= addr + n:
            return got


def pages(ranges) -> list[int]:
    return sorted(p for s, e in ranges for p in range(s // PS, e // PS))


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


# ---------------------------------------------------------------- cases


def basic():
    n = 64 << 20
    a = raw_map(n)
    v = view(a, n)
    r = {"add": lib.ls_track_add(a, n), "clean": dirty(a, n)}
    idx = np.sort(np.random.default_rng(7).choice(n // PS, n // PS // 100, replace=False))
    v[idx * PS + 123] = 9
    first = dirty(a, n)
    r["written"] = idx.tolist()
    r["reported"] = pages(first)
    r["ranges_merged"] = all(first[i][1] < first[i + 1][0] for i in range(len(first) - 1))
    r["after_reprotect"] = dirty(a, n)
    v[idx[:5] * PS] = 3  # the same pages again
    r["again"] = pages(dirty(a, n, reprotect=0))
    r["still_there_without_reprotect"] = pages(dirty(a, n))
    r["clean_at_end"] = dirty(a, n)
    r["values_kept"] = bool((v[idx[5:] * PS + 123] == 9).all() and (v[idx[:5] * PS] == 3).all())
    r["remove"] = lib.ls_track_remove(a, n)
    r["after_remove"] = dirty(a, n)
    return r


def kernel_write(mode: str):
    """read(2) into tracked pages: recorded, and the read succeeds."""
    if mode == "rung":  # the rung the project picked (LAZYSHARE_MODE forces it)
        from lazyshare import handler

        want = handler.MODES[handler.capabilities().mode]
        lib.ls_track_set_mode(want)
    n = 4 << 20
    a = raw_map(n)
    v = view(a, n)
    r = {"add": lib.ls_track_add(a, n), "mode": lib.ls_track_mode(), "clean": dirty(a, n)}
    rfd, wfd = os.pipe()
    payload = os.urandom(3 * PS)
    os.write(wfd, payload)
    mv = memoryview((ctypes.c_uint8 * n).from_address(a)).cast("B")
    got = os.readv(rfd, [mv[10 * PS + 100 : 10 * PS + 100 + 3 * PS]])
    os.close(rfd)
    os.close(wfd)
    r["readv"] = got
    r["content_ok"] = bytes(v[10 * PS + 100 : 10 * PS + 100 + 3 * PS]) == payload
    with open(sys.executable, "rb") as f:
        r["readinto"] = f.readinto(mv[100 * PS : 101 * PS])
    r["reported"] = pages(dirty(a, n))
    r["remove"] = lib.ls_track_remove(a, n)
    r["uid"] = os.getuid()
    return r


def sync(mode: str):
    """Synchronous tracking (ls_track_add_sync): writes from several threads
    and from the kernel (read(2)) wait for the snapshot thread and go on; the
    written 2 MiB blocks are reported; MADV_DONTNEED marks its blocks."""
    import threading

    lib.ls_track_set_mode({"full": 0, "user": 1}[mode])
    n = 16 << 20
    a = raw_map(n + (2 << 20))
    base = -(-a // (2 << 20)) * (2 << 20)  # a 2 MiB-aligned start: blocks are absolute
    lo = base + 3 * PS  # the range starts and ends inside blocks
    hi = base + n - 5 * PS
    v = view(a, n + (2 << 20))
    r = {"add": lib.ls_track_add_sync(lo, hi - lo), "mode": lib.ls_track_mode()}
    if r["add"]:
        return r
    r["clean"] = dirty(lo, hi - lo)
    before = ffi.new("struct ls_stats *")
    lib.ls_get_stats(before)

    def writer(k):
        for off in range(k * PS, hi - lo, 8 * PS):
            v[lo - a + off] = 7

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    rfd, wfd = os.pipe()
    os.write(wfd, b"x" * PS)
    mv = memoryview((ctypes.c_uint8 * (n + (2 << 20))).from_address(a)).cast("B")
    r["readv"] = os.readv(rfd, [mv[lo - a + 100 : lo - a + 100 + PS]])
    os.close(rfd)
    os.close(wfd)
    for t in threads:
        t.join(20)
    r["joined"] = not any(t.is_alive() for t in threads)
    after = ffi.new("struct ls_stats *")
    lib.ls_get_stats(after)
    r["faults"] = after.snap_faults - before.snap_faults
    r["reported"] = [(s_ + lo, e_ + lo) for s_, e_ in dirty(lo, hi - lo)]
    r["lo"], r["hi"] = lo, hi
    r["clean_after"] = dirty(lo, hi - lo)
    r["values"] = int(v[lo - a + 8 * PS]) == 7 and int(v[lo - a + 100]) == ord("x")
    r["madvise"] = libc.madvise(base + (4 << 20), PS, MADV_DONTNEED)
    r["after_madvise"] = [(s_ + lo, e_ + lo) for s_, e_ in dirty(lo, hi - lo)]
    r["base"] = base
    r["remove"] = lib.ls_track_remove(lo, hi - lo)
    r["count"] = lib.ls_track_count()
    return r


def dontneed():
    n = 1 << 20
    a = raw_map(n)
    r = {"add": lib.ls_track_add(a, n)}
    r["madvise"] = libc.madvise(a + 3 * PS, 2 * PS, MADV_DONTNEED)
    r["reported"] = pages(dirty(a, n))
    r["reads_zero"] = int(view(a, n)[3 * PS])
    r["clean_after"] = dirty(a, n)
    r["remove"] = lib.ls_track_remove(a, n)
    return r


def mremap():
    n = 1 << 20
    a = raw_map(n)
    r = {"add": lib.ls_track_add(a, n)}
    view(a, n)[5 * PS] = 2
    # Block the next pages so that growing must move the mapping.
    guard = libc.mmap(a + n, PS, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x100000, -1, 0)
    b = libc.mremap(a, n, 2 * n, MREMAP_MAYMOVE)
    assert b != MAP_FAILED
    r["moved"] = b != a
    view(b, 2 * n)[7 * PS] = 2
    r["old_range"] = dirty(a, n)  # unmapped now
    r["old_again"] = dirty(a, n)  # stays lost
    # The memory at the new address, as a caller would re-add it after -ENXIO.
    r["readd_new"] = lib.ls_track_add(b, 2 * n)
    r["new_clean"] = dirty(b, 2 * n)
    r["remove_old"] = lib.ls_track_remove(a, n)
    r["remove_new"] = lib.ls_track_remove(b, 2 * n)
    # mremap in place (shrink) of a tracked range, then a new mapping at the old place.
    c = raw_map(n)
    r["add_c"] = lib.ls_track_add(c, n)
    libc.munmap(c, n)
    c2 = libc.mmap(
        c, n, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10, -1, 0
    )
    r["remapped_same_place"] = c2 == c
    r["replaced_mapping"] = dirty(c, n)
    r["readd_replaces_lost"] = lib.ls_track_add(c, n)
    r["readd_clean"] = dirty(c, n)
    r["remove_c"] = lib.ls_track_remove(c, n)
    libc.munmap(guard, PS)
    return r


def refused():
    n = 1 << 20
    r = {}
    shared = raw_map(n, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    r["shared_anon"] = lib.ls_track_add(shared, n)
    fd = os.memfd_create("t")
    os.ftruncate(fd, n)
    r["file_private"] = lib.ls_track_add(raw_map(n, mmap.MAP_PRIVATE, fd), n)
    r["file_shared"] = lib.ls_track_add(raw_map(n, mmap.MAP_SHARED, fd), n)
    os.close(fd)
    a = raw_map(n)
    r["unaligned"] = lib.ls_track_add(a + 1, n - PS)
    r["odd_length"] = lib.ls_track_add(a, n - 1)
    r["empty"] = lib.ls_track_add(a, 0)
    g = raw_map(3 * PS)
    libc.munmap(g + PS, PS)
    r["gap"] = lib.ls_track_add(g, 3 * PS)
    r["ok"] = lib.ls_track_add(a, n)
    r["overlap"] = lib.ls_track_add(a + PS, PS)
    r["twice"] = lib.ls_track_add(a, n)
    r["dirty_outside"] = lib.ls_track_dirty(a + n, PS, ffi.new("uint64_t[2]"), 1, 1)
    r["dirty_across"] = lib.ls_track_dirty(a - PS, 2 * PS, ffi.new("uint64_t[2]"), 1, 1)
    r["dirty_no_room"] = lib.ls_track_dirty(a, n, ffi.new("uint64_t[2]"), 0, 1)
    r["remove_partial"] = lib.ls_track_remove(a, PS)
    r["count"] = lib.ls_track_count()
    r["remove"] = lib.ls_track_remove(a, n)
    b = raw_map(n)
    r["madvise_mergeable"] = libc.madvise(b, n, MADV_MERGEABLE)
    r["madvise_errno"] = ctypes.get_errno()
    r["mergeable"] = lib.ls_track_add(b, n)
    r["count_end"] = lib.ls_track_count()
    return r


def fork():
    n = 4 << 20
    a = raw_map(n)
    v = view(a, n)
    r = {"add": lib.ls_track_add(a, n)}
    v[1 * PS] = 5
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: writes, and asks
        try:
            v[2 * PS : 3 * PS] = 6
            v[20 * PS] = 6
            c = {
                "dirty": lib.ls_track_dirty(a, n, ffi.new("uint64_t[8]"), 4, 1),
                "count": lib.ls_track_count(),
                "remove": lib.ls_track_remove(a, n),
            }
            c["add_own"] = lib.ls_track_add(a, n)  # the child may track its copy afresh
            v[30 * PS] = 1
            c["own"] = pages(dirty(a, n))
            c["own_remove"] = lib.ls_track_remove(a, n)
            os.write(wfd, json.dumps(c).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        r["child"] = json.loads(f.read() or "{}")
    os.waitpid(pid, 0)
    v[40 * PS] = 5
    r["parent"] = pages(dirty(a, n))
    r["parent_values"] = [int(v[2 * PS]), int(v[20 * PS])]
    r["remove"] = lib.ls_track_remove(a, n)
    return r


def many_ranges():
    """Every other page of 8 MiB: 1024 disjoint ranges, past the kernel's 512."""
    n = 8 << 20
    a = raw_map(n)
    libc.madvise(a, n, MADV_NOHUGEPAGE)
    v = view(a, n)
    r = {"add": lib.ls_track_add(a, n)}
    v[0 : n : 2 * PS] = 4
    want = list(range(0, n // PS, 2))
    r["want"] = len(want)
    got = dirty(a, n, reprotect=0, max_ranges=4096)
    r["ranges_one_call"] = len(got)
    r["all_one_call"] = pages(got) == want
    small = dirty(a, n, reprotect=1, max_ranges=100)  # continued from the last end, reprotecting
    r["ranges_continued"] = len(small)
    r["all_continued"] = pages(small) == want
    r["clean_after"] = dirty(a, n)
    r["remove"] = lib.ls_track_remove(a, n)
    return r


def add_remove_loop():
    n = 1 << 20
    r = {"supported": lib.ls_track_supported()}

    def once():
        a = np.ones(n, dtype=np.uint8)  # mmap'd by malloc: its own mapping, page-aligned data + 16
        base = (a.ctypes.data + PS - 1) // PS * PS
        ln = (a.ctypes.data + n) // PS * PS - base
        assert lib.ls_track_add(base, ln) == 0
        a[::PS] = 2
        assert len(pages(dirty(base, ln))) == ln // PS
        assert lib.ls_track_remove(base, ln) == 0

    once()
    f0, m0 = fds(), maps()
    for _ in range(1000):
        once()
    r["fds"] = [f0, fds()]
    r["maps"] = [m0, maps()]
    r["count"] = lib.ls_track_count()
    return r


def supported():
    return {"supported": lib.ls_track_supported(), "mode": lib.ls_track_mode()}


def thp():
    """A transparent huge page: a 4 KiB write is reported as that page alone
    (the kernel splits the PMD mapping on the first tracked write)."""
    n = 8 << 20
    raw = raw_map(n + (2 << 20), fill=False)
    a = (raw + (2 << 20) - 1) // (2 << 20) * (2 << 20)
    libc.madvise(a, n, 14)  # MADV_HUGEPAGE
    view(a, n)[:] = 2
    r = {"huge_before": anon_huge_kb(a), "add": lib.ls_track_add(a, n), "clean": dirty(a, n)}
    r["huge_armed"] = anon_huge_kb(a)
    view(a, n)[(512 + 3) * PS] = 1
    r["reported"] = pages(dirty(a, n))
    r["huge_after"] = anon_huge_kb(a)
    r["remove"] = lib.ls_track_remove(a, n)
    return r


def anon_huge_kb(addr: int) -> int:
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                s, e = (int(x, 16) for x in head.split("-"))
                inside = s <= addr < e
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return -1


def mirror_while_writing():
    """A cache kept by copying only the reported pages equals the array, however
    a writer thread races the reprotecting scans (no write is lost between a
    report and the re-protection)."""
    import threading

    n = 16 << 20
    a = raw_map(n)
    v = view(a, n)
    mirror = v.copy()
    r = {"add": lib.ls_track_add(a, n)}
    stop = threading.Event()
    writes = [0]

    def writer():
        rng = np.random.default_rng(3)
        while not stop.is_set():
            idx = rng.integers(0, n // PS, 64)
            v[idx * PS + rng.integers(0, PS, 64)] = rng.integers(0, 256, 64, dtype=np.uint8)
            writes[0] += 64

    th = threading.Thread(target=writer)
    th.start()
    scans = busy = 0
    try:
        while not writes[0]:
            time.sleep(0.001)
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end or scans < 50:
            got = dirty(a, n)
            for s, e in got:
                mirror[s:e] = v[s:e]
            scans += 1
            busy += bool(got)
            time.sleep(0.0005)  # let the writer run between scans too
    finally:
        stop.set()
        th.join()
    for s, e in dirty(a, n):
        mirror[s:e] = v[s:e]
    r["scans"] = scans
    r["scans_with_writes"] = busy
    r["writes"] = writes[0]
    r["equal"] = bool((mirror == v).all())
    r["remove"] = lib.ls_track_remove(a, n)
    return r


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    res = globals()[name](*args)
    print(json.dumps(res, default=int))
    sys.stdout.flush()
