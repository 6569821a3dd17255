"""The demo behind ``python -m lazyshare demo``: lazyshare.Pool beside
multiprocessing.Pool on a generated array, printing times and bytes moved."""

from __future__ import annotations

import multiprocessing
import pickle
import time

import numpy as np


def _slice_mean(arr, i, n):
    """One task: the mean of the i-th of n sparse 1% slices of arr."""
    step = len(arr) // n
    part = arr[i * step : i * step + len(arr) // 100]
    return float(part.mean())


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def run(args) -> int:
    import lazyshare

    n = args.tasks
    nbytes = args.size_mib << 20
    print(
        f"lazyshare demo: a {_fmt_bytes(nbytes)} float64 array, {n} tasks each averaging a "
        f"different 1% slice, {args.processes} workers"
    )
    caps = lazyshare.capabilities()
    print(f"paging: {caps.mode} — {caps.reason}\n")
    arr = np.random.default_rng(0).random(nbytes // 8)
    expected = [_slice_mean(arr, i, n) for i in range(n)]
    work = [(arr, i, n) for i in range(n)]

    t = time.perf_counter()
    with lazyshare.Pool(args.processes) as pool:
        got = pool.starmap(_slice_mean, work)
        st = pool.stats()
    t_lazy = time.perf_counter() - t
    assert got == expected, "lazyshare.Pool returned wrong results"
    moved_lazy = st["totals"]["bytes_lazy"] + st["totals"]["bytes_pickled"]

    ctx = multiprocessing.get_context("forkserver")
    moved_mp = sum(len(pickle.dumps(w, protocol=pickle.HIGHEST_PROTOCOL)) for w in work[:1]) * n
    t = time.perf_counter()
    with ctx.Pool(args.processes) as pool:
        got = pool.starmap(_slice_mean, work)
    t_mp = time.perf_counter() - t
    assert got == expected, "multiprocessing.Pool returned wrong results"

    print(f"{'':24}{'time':>10}{'bytes moved':>16}")
    print(f"{'multiprocessing.Pool':24}{t_mp:>9.2f}s{_fmt_bytes(moved_mp):>16}")
    print(f"{'lazyshare.Pool':24}{t_lazy:>9.2f}s{_fmt_bytes(moved_lazy):>16}")
    print(
        f"\nspeed-up {t_mp / t_lazy:.1f}x, {moved_mp / max(moved_lazy, 1):.0f}x fewer bytes moved "
        f"(lazy pages {_fmt_bytes(st['totals']['bytes_lazy'])}, "
        f"pickled {_fmt_bytes(st['totals']['bytes_pickled'])})"
    )
    return 0
