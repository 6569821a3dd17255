"""Cases of test_live.py, each run in a fresh interpreter (``python
_live_child.py NAME``, as root or as user nobody): write tracking and kept
segments change the process, so none of it happens in the test process. A
case prints a dict as JSON on the last line of stdout."""

from __future__ import annotations

import ctypes
import gc
import json
import mmap
import os
import sys
import tempfile
import time
import warnings

import numpy as np
from _libc import libc

import lazyshare
from lazyshare import handler, live

PS = mmap.PAGESIZE
MB = 1 << 20
N = 16  # tasks per call


# ---------------------------------------------------------------- task functions (run in workers)


def chunk_sum(a, i, n=N, delay=0.0):
    if delay:
        time.sleep(delay)
    k = len(a) // n
    return float(a[i * k : (i + 1) * k].sum(dtype=np.float64))


def write_then_sum(a, value):
    a[:] = value
    return float(a.sum(dtype=np.float64))


def whole_sum(a):
    return float(a.sum(dtype=np.float64))


def cache_maps(_):
    """(pid, mappings of a page cache, memfds open) in this worker."""
    with open("/proc/self/maps") as f:
        n = sum("lazyshare-cache" in line for line in f)
    time.sleep(0.05)
    return os.getpid(), n, own_cache_fds()


# ---------------------------------------------------------------- helpers (parent)


def sums(pool, a, delay=0.0):
    return pool.starmap(chunk_sum, [(a, i, N, delay) for i in range(N)])


def expect(a):
    return [chunk_sum(a, i) for i in range(N)]


def lazy_bytes(pool) -> int:
    return pool.stats(timeout=2.0)["totals"]["bytes_lazy"]


def own_cache_fds() -> int:
    """Page-cache memfds open in this process."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "lazyshare-cache" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


def wait_released(timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gc.collect()
        if live.live_segments() == 0 and own_cache_fds() == 0:
            return True
        time.sleep(0.02)
    return False


def caught():
    w = warnings.catch_warnings(record=True)
    rec = w.__enter__()
    warnings.simplefilter("always")
    return w, rec


def written_warnings(rec) -> int:
    return sum("while tasks that read it were running" in str(x.message) for x in rec)


def broken_warnings(rec) -> int:
    return sum("could not be kept whole" in str(x.message) for x in rec)


# ---------------------------------------------------------------- cases


def case_snapshot(budget=None):
    """Zeros, then the parent writes ones while the tasks wait: what the tasks
    saw, whether a warning said so, and what the next call sees. Twice: once
    on a fresh array, once on one the previous calls left cached."""
    caps = handler.capabilities()
    out = {"chunk": float(32 * MB // 8 // N), "mode": caps.mode, "snapshots": caps.snapshots}
    w, rec = caught()
    with lazyshare.Pool(2, memory_budget=budget) as p:
        for name in ("fresh", "cached"):
            a = np.zeros(32 * MB // 8)
            if name == "cached":
                sums(p, a)
            r = p.starmap_async(chunk_sum, [(a, i, N, 0.4) for i in range(N)])
            time.sleep(0.1)
            a[:] = 1.0
            out[name] = r.get(60)
            out[name + "_next"] = sums(p, a)
        out["preserved"] = handler.owner_counters()["snap_bytes_preserved"]
    w.__exit__(None, None, None)
    out["warned"] = written_warnings(rec)
    out["broken"] = broken_warnings(rec)
    return out


def case_snapshot_budget():
    """case_snapshot for workers with a memory budget: they do not map the
    cache, and get the snapshot's pages through it."""
    return case_snapshot(budget=8 * MB)


def case_concurrent():
    """A call runs on zeros; the parent writes ones; a second call starts
    while the first runs: each sees the array as of its own submission."""
    a = np.zeros(16 * MB // 8)
    with lazyshare.Pool(2) as p:
        r1 = p.starmap_async(chunk_sum, [(a, i, N, 0.3) for i in range(N)])
        time.sleep(0.05)
        a[: len(a) // 2] = 1.0
        r2 = p.starmap_async(chunk_sum, [(a, i, N, 0.1) for i in range(N)])
        time.sleep(0.05)
        a[:] = 2.0
        first, second = r1.get(60), r2.get(60)
        third = sums(p, a)
        gens = live.stats()["generations"]
    k = float(len(a) // N)
    return {
        "ok": first == [0.0] * N and second == [k] * (N // 2) + [0.0] * (N // 2) and third == [2 * k] * N,
        "generations": gens,
    }


def case_writers():
    """Threads of the parent write to a kept array without pause (small
    writes holding the GIL, big slices releasing it, read(2) into it from the
    kernel) while calls are submitted and run: nothing hangs, every call
    completes, and once the writers stop, a call sees the array exactly."""
    import threading

    a = np.zeros(24 * MB // 8)
    stop = threading.Event()
    errors = []
    rfd, wfd = os.pipe()

    def small(seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            a[rng.integers(0, len(a), 64)] = rng.random()

    def big(seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            lo = int(rng.integers(0, len(a) - MB))
            a[lo : lo + MB // 8] = rng.random()

    def kernel():
        mv = memoryview(a).cast("B")
        rng = np.random.default_rng(9)
        while not stop.is_set():
            off = int(rng.integers(0, a.nbytes - PS))
            os.write(wfd, b"\x01" * PS)
            if os.readv(rfd, [mv[off : off + PS]]) != PS:
                errors.append("short read")

    threads = [threading.Thread(target=f, args=(k,)) for k, f in enumerate((small, small, big))]
    threads.append(threading.Thread(target=kernel))
    w, rec = caught()
    with lazyshare.Pool(2) as p:
        for t in threads:
            t.start()
        try:
            done = 0
            for _ in range(8):
                rs = [p.starmap_async(chunk_sum, [(a, i, N, 0.01) for i in range(N)]) for _ in range(2)]
                for r in rs:
                    got = r.get(60)
                    done += all(np.isfinite(got))
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        alive = any(t.is_alive() for t in threads)
        final = sums(p, a) == expect(a)
    w.__exit__(None, None, None)
    os.close(rfd)
    os.close(wfd)
    return {
        "calls": done,
        "final": final,
        "alive": alive,
        "errors": errors,
        "broken": broken_warnings(rec),
        "faults": handler.owner_counters()["snap_faults"],
        "mode": handler.capabilities().mode,
    }


def case_cap():
    """LAZYSHARE_CACHE_MAX (set by the test to 40 MiB): three 16 MiB arrays used
    in turn; between calls the caches stay within it, the least recently used
    one emptied."""
    rng = np.random.default_rng(8)
    arrays = [rng.random(16 * MB // 8) for _ in range(3)]
    with lazyshare.Pool(2) as p:
        ok = True
        for a in arrays:
            ok &= sums(p, a) == expect(a)
        st = live.stats()
        moved = []
        for a in (arrays[2], arrays[0]):  # the most recent stays cached; the oldest went
            before = lazy_bytes(p)
            ok &= sums(p, a) == expect(a)
            moved.append(lazy_bytes(p) - before)
    return {"ok": bool(ok), "cached": st["bytes_cached"], "evicted": st["bytes_evicted"], "moved": moved}


def case_discard():
    """MADV_DONTNEED of the pages of a numpy array between calls and during a
    call: the next call sees zeros; the call running says its snapshot could
    not be kept (the full rung) or that the array was written (the other)."""
    a = np.full(16 * MB // 8, 3.0)
    lo = -(-a.ctypes.data // PS) * PS
    w, rec = caught()
    with lazyshare.Pool(2) as p:
        ok = sums(p, a) == expect(a)
        assert libc.madvise(lo, 4 * MB, 4) == 0  # MADV_DONTNEED
        ok &= sums(p, a) == expect(a)
        ok &= expect(a)[1] == 0.0  # chunk 1 lies in the pages discarded
        a[:] = 5.0
        ok &= sums(p, a) == expect(a)
        r = p.starmap_async(chunk_sum, [(a, i, N, 0.3) for i in range(N)])
        time.sleep(0.05)
        assert libc.madvise(lo, 4 * MB, 4) == 0
        r.get(60)
        ok &= sums(p, a) == expect(a)
    w.__exit__(None, None, None)
    return {
        "ok": bool(ok),
        "broken": broken_warnings(rec),
        "warned": written_warnings(rec),
        "mode": handler.capabilities().mode,
    }


def case_dirty():
    """1% of the pages written between calls: the bytes the next call moves."""
    a = np.random.default_rng(1).random(64 * MB // 8)
    with lazyshare.Pool(2) as p:
        ok = sums(p, a) == expect(a)
        b0 = lazy_bytes(p)
        ok &= sums(p, a) == expect(a)
        b1 = lazy_bytes(p)
        pages = len(a) * 8 // PS
        pick = np.random.default_rng(2).choice(pages, pages // 100, replace=False)
        a[pick * (PS // 8)] += 1.0
        ok &= sums(p, a) == expect(a)
        b2 = lazy_bytes(p)
        a[:] = a.copy()  # every page written, none changed
        ok &= sums(p, a) == expect(a)
        b3 = lazy_bytes(p)
        st = live.stats()
    return {
        "ok": bool(ok),
        "first": b0,
        "unchanged": b1 - b0,
        "after_1pct": b2 - b1,
        "after_same": b3 - b2,
        "changed": len(pick) * PS,
        "bytes": a.nbytes,
        "stats": st,
        "mode": handler.capabilities().mode,
    }


def case_freed():
    """The array dies between calls: its segment, cache and tracking go, in
    the parent and in every worker."""
    a = np.random.default_rng(3).random(16 * MB // 8)
    with lazyshare.Pool(2) as p:
        ok = sums(p, a) == expect(a)
        kept = live.live_segments()
        del a
        released = wait_released()
        seen = {}
        deadline = time.monotonic() + 20
        while len(seen) < 2 and time.monotonic() < deadline:
            for pid, maps, fds in p.map(cache_maps, range(4), chunksize=1):
                seen[pid] = (maps, fds)
        b = np.ones(16 * MB // 8)
        ok &= sums(p, b) == expect(b)
    return {
        "ok": bool(ok),
        "kept": kept,
        "released": released,
        "workers": list(seen.values()),
        "tracked": handler.lib.ls_track_count(),
    }


def case_realloc():
    """The array is resized in place (realloc: mremap moves it) between
    pools; while a pool runs numpy refuses (the kept segment's weak reference),
    once none does it works, and the next pool sees the new extent."""
    a = np.arange(8 * MB // 8, dtype=np.float64)
    with lazyshare.Pool(2) as p:
        ok = sums(p, a) == expect(a)
        try:
            a.resize(32 * MB // 8, refcheck=False)
            refused = False
        except ValueError:
            refused = True
    kept_after = live.live_segments()
    a.resize(32 * MB // 8, refcheck=False)
    a[:] = np.arange(len(a), dtype=np.float64) * 2
    with lazyshare.Pool(2) as p:
        ok &= sums(p, a) == expect(a)
        a[: len(a) // 2] = -3.0
        ok &= sums(p, a) == expect(a)
    return {"ok": bool(ok), "refused": refused, "kept_after": kept_after}


def _anon(n: int):
    """A fresh private anonymous mapping of ``n`` bytes, as a float64 array."""
    addr = libc.mmap(None, n, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    return addr, np.ctypeslib.as_array((ctypes.c_double * (n // 8)).from_address(addr))


def case_mremap():
    """Memory moved away and a new mapping put back at its address (tracking
    lost): the next call sees the new bytes."""
    n = 16 * MB
    addr, a = _anon(n)
    a[:] = 1.0
    with lazyshare.Pool(2) as p:
        ok = sums(p, a) == expect(a)
        spot = libc.mmap(None, n, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        tmp = libc.mremap(addr, n, n, 3, ctypes.c_void_p(spot))  # MAYMOVE|FIXED: away from addr
        assert tmp == spot
        moved = np.ctypeslib.as_array((ctypes.c_double * (n // 8)).from_address(tmp))
        moved[:] = 5.0
        back = libc.mremap(tmp, n, n, 3, ctypes.c_void_p(addr))  # MREMAP_FIXED: back at addr
        assert back == addr
        ok &= sums(p, a) == [5.0 * (len(a) // N)] * N
    return {"ok": bool(ok)}


def case_dontneed():
    """MADV_DONTNEED in the parent between calls: the pages read as zeros again."""
    n = 16 * MB
    addr, a = _anon(n)
    a[:] = 2.0
    with lazyshare.Pool(2) as p:
        ok = sums(p, a) == expect(a)
        assert libc.madvise(addr, n // 2, 4) == 0  # MADV_DONTNEED: first half
        ok &= sums(p, a) == expect(a)
        ok &= expect(a)[0] == 0.0
    return {"ok": bool(ok)}


def case_fork():
    """The parent forks while tracking: the child's writes are its own, the
    parent's later writes are seen."""
    a = np.random.default_rng(4).random(16 * MB // 8)
    with lazyshare.Pool(2) as p:
        ok = sums(p, a) == expect(a)
        pid = os.fork()
        if pid == 0:
            a[:] = -1.0
            os._exit(0)
        os.waitpid(pid, 0)
        ok &= sums(p, a) == expect(a)
        a[: len(a) // 3] = 9.0
        ok &= sums(p, a) == expect(a)
    return {"ok": bool(ok)}


def case_task_writes():
    """A task writes its argument; the next task in the same worker sees the
    parent's data."""
    a = np.random.default_rng(5).random(16 * MB // 8)
    want = float(a.sum(dtype=np.float64))
    with lazyshare.Pool(1) as p:
        first = p.apply(write_then_sum, (a, 7.0))
        second = p.apply(whole_sum, (a,))
        third = p.map(whole_sum, [a, a])
    return {
        "ok": first == 7.0 * len(a) and second == want and third == [want, want],
        "parent_intact": float(a.sum(dtype=np.float64)) == want,
    }


def case_kernel_write():
    """The parent's kernel-mode writes (readinto) between calls and during one."""
    a = np.zeros(16 * MB // 8)
    src = np.random.default_rng(6).random(len(a))
    src2 = src * 2
    with tempfile.TemporaryFile() as f:
        f.write(src.tobytes())
        f.write(src2.tobytes())
        w, rec = caught()
        with lazyshare.Pool(2) as p:
            ok = sums(p, a) == expect(a)
            f.seek(0)
            f.readinto(memoryview(a).cast("B"))
            ok &= bool((a == src).all())
            ok &= sums(p, a) == expect(a)
            want = expect(a)
            r = p.starmap_async(chunk_sum, [(a, i, N, 0.3) for i in range(N)])
            time.sleep(0.05)
            f.readinto(memoryview(a).cast("B"))  # during the call
            during = r.get(60)
            ok &= bool((a == src2).all())
            ok &= sums(p, a) == expect(a)
        w.__exit__(None, None, None)
    return {
        "ok": bool(ok),
        "warned": written_warnings(rec),
        "snapshot": during == want,
        "mode": handler.capabilities().mode,
    }


def _counts():
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * PS
    return maps, fds, rss


def case_churn():
    """Many arrays created, used and dropped in a loop: no growth."""
    marks = []
    with lazyshare.Pool(2) as p:
        ok = True
        for i in range(40):
            a = np.full(8 * MB // 8, float(i))
            ok &= sums(p, a) == expect(a)
            del a
            if i in (9, 39):
                wait_released()
                marks.append(_counts())
        released = wait_released()
        stats = p.stats(timeout=1.0)["totals"]
    (m1, f1, r1), (m2, f2, r2) = marks
    return {
        "ok": bool(ok),
        "released": released,
        "maps": [m1, m2],
        "fds": [f1, f2],
        "rss_growth": r2 - r1,
        "segments": handler.lib.ls_track_count(),
        "lazy": stats["bytes_lazy"],
    }


def case_untracked():
    """Memory that cannot be tracked (a shared mapping): each call sees the
    parent's current bytes."""
    m = mmap.mmap(-1, 16 * MB)
    a = np.frombuffer(m, dtype=np.float64)
    a[:] = 1.0
    with lazyshare.Pool(2) as p:
        ok = sums(p, a) == expect(a)
        a[::1000] = 3.0
        ok &= sums(p, a) == expect(a)
        st = live.stats()
        ok &= st["segments"] == 1 and st["segments_untracked"] == 1
    del a
    return {"ok": bool(ok)}


def case_zeros():
    """A tracked array never written (np.zeros): its pages are zeros without
    payload and without a page of cache, call after call; a page written
    between calls moves, the rest stay zeros."""
    a = np.zeros(64 * MB // 8)
    with lazyshare.Pool(2) as p:
        before = lazy_bytes(p)
        ok = sums(p, a) == expect(a)
        ok &= sums(p, a) == expect(a)
        first = lazy_bytes(p) - before
        cached = p.stats()["cache"]["bytes_cached"]
        a[len(a) // 2] = 7.0  # one page written
        before = lazy_bytes(p)
        ok &= sums(p, a) == expect(a)
        after_write = lazy_bytes(p) - before
    return {
        "ok": bool(ok),
        "first": first,
        "cached": cached,
        "after_write": after_write,
        "mode": handler.capabilities().mode,
    }


if __name__ == "__main__":
    out = globals()["case_" + sys.argv[1]]()
    print(json.dumps(out))
