"""Shared by the examples: run one workload on lazyshare.Pool and on
multiprocessing.Pool, check that they agree, print time and bytes moved.

Both pools are started (and warmed up) before the clock starts: what is timed is
the call, ``pool.starmap(func, work)`` with the default chunksize, which is what
moving the data costs. Bytes moved: for lazyshare, what its workers fetched lazily
plus the task messages it pickled (``Pool.stats()``); for multiprocessing.Pool,
the pickled size of the chunks it sends (the same array in one chunk is pickled
once), measured with pickle protocol 5 without copying the buffers.
"""

from __future__ import annotations

import math
import multiprocessing
import pickle
import time
from typing import Any, Callable

import lazyshare


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _noop(x: int) -> int:
    return x


def pickled_size(obj: Any) -> int:
    """Bytes pickle protocol 5 writes for obj, out-of-band buffers included
    (counted, not copied)."""
    sizes: list[int] = []
    payload = pickle.dumps(obj, 5, buffer_callback=lambda b: sizes.append(b.raw().nbytes))
    return len(payload) + sum(sizes)


def stdlib_bytes(work: list, processes: int) -> int:
    """What multiprocessing.Pool.starmap(func, work) pickles with its default chunksize."""
    chunksize = math.ceil(len(work) / (processes * 4)) or 1
    return sum(pickled_size(tuple(work[i : i + chunksize])) for i in range(0, len(work), chunksize))


def compare(
    func: Callable[..., Any],
    work: list[tuple],
    *,
    processes: int = 2,
    stdlib: bool = True,
    same: Callable[[Any, Any], bool] = lambda a, b: a == b,
) -> list[dict]:
    """Run ``starmap(func, work)`` on both pools; print and return one row per peer:
    ``{"peer", "seconds", "bytes", "result"}``."""
    rows = []
    with lazyshare.Pool(processes) as pool:
        pool.map(_noop, range(processes))  # workers up
        before = pool.stats()["totals"]
        t = time.perf_counter()
        out = pool.starmap(func, work)
        dt = time.perf_counter() - t
        after = pool.stats()["totals"]
    lazy = after["bytes_lazy"] - before["bytes_lazy"]
    pickled = after["bytes_pickled"] - before["bytes_pickled"]
    rows.append(
        {
            "peer": "lazyshare.Pool",
            "seconds": dt,
            "bytes": lazy + pickled,
            "detail": f"lazy {fmt_bytes(lazy)}, pickled {fmt_bytes(pickled)}",
            "result": out,
        }
    )
    if stdlib:
        ctx = multiprocessing.get_context("forkserver")
        with ctx.Pool(processes) as pool:
            pool.map(_noop, range(processes))
            t = time.perf_counter()
            out2 = pool.starmap(func, work)
            dt = time.perf_counter() - t
        if not same(out, out2):
            raise AssertionError("lazyshare.Pool and multiprocessing.Pool disagree")
        rows.append(
            {
                "peer": "multiprocessing.Pool",
                "seconds": dt,
                "bytes": stdlib_bytes(work, processes),
                "detail": "pickled",
                "result": out2,
            }
        )
    print_rows(rows)
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'':22}{'time':>9}  {'bytes moved':>11}")
    for r in rows:
        print(f"{r['peer']:22}{r['seconds']:>8.2f}s  {fmt_bytes(r['bytes']):>11}  ({r['detail']})")
    by = {r["peer"]: r for r in rows}
    if "multiprocessing.Pool" in by:
        lz, mp = by["lazyshare.Pool"], by["multiprocessing.Pool"]
        print(
            f"lazyshare.Pool: {mp['seconds'] / max(lz['seconds'], 1e-9):.1f}x faster, "
            f"{mp['bytes'] / max(lz['bytes'], 1):.1f}x fewer bytes moved "
            f"(paging: {lazyshare.capabilities().mode})"
        )
