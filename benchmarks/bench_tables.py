"""Costs against table sizes: what one export, one attach and one fault cost as
the owner's memory map, the live regions of a worker and the views in one
task grow.

    python benchmarks/bench_tables.py [--quick] [--max-views 70000] [--skip export,attach,views]
                                      [--views rows,windows,nested]

Prints, for each size:

* export: microseconds per exported array (deciding whether its untouched pages
  are zeros, then registering it with the page server) with M other mappings in
  the owner's memory map, and the time of one call that exports 2,000 arrays;
* attach: microseconds per attach in a worker already holding N live regions
  (the last 1,000 of N), and per first touch of a page in one of them;
* views in one task: unpickling one argument list of V views of one array (a
  map chunk), per view, and a first touch of each, with the worker's regions
  and memory-map lines after: rows (disjoint), windows 16 deep, and windows
  8,192 deep (each overlapping thousands of others).

Figures are medians of a few runs where cheap; on a shared 2-vCPU VM read the
ratios between sizes, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import mmap
import multiprocessing as mp
import statistics
import time

import numpy as np
from _libc import libc as _libc

from lazyshare import handler, serialization

MiB = 1 << 20


def _maps_lines() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def _grow_maps(n: int) -> None:
    """Add n one-page mappings that cannot merge (alternating protections)."""
    ps = mmap.PAGESIZE
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    for i in range(n):
        prot = mmap.PROT_READ if i % 2 else mmap.PROT_READ | mmap.PROT_WRITE
        if _libc.mmap(None, ps, prot, flags, -1, 0) in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")


def bench_export(sizes, narrays):
    print("export (owner): per array, against mappings in the owner's memory map")
    arrays = [np.ones(MiB // 8 * 2) for _ in range(narrays)]  # 2 MiB each: one mapping each
    have = _maps_lines()
    for target in sizes:
        if target > have:
            _grow_maps(target - have)
            have = _maps_lines()
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            descs = [handler.export(a) for a in arrays[:200]]
            runs.append((time.perf_counter() - t) / len(descs))
            for d in descs:
                handler.release(d)
        t = time.perf_counter()
        with serialization.CallExports() as ex:
            ex.dumps(arrays)
            call = time.perf_counter() - t
        print(
            f"  {have:>7} mappings: {statistics.median(runs) * 1e6:9.1f} us/export   "
            f"one call exporting {len(arrays)} arrays: {call:7.3f} s"
        )


def _attach_child(desc, sizes, q):
    from lazyshare import handler

    out = []
    held = []
    for n in sizes:
        while len(held) < n - 1000:
            held.append(handler.attach(desc))
        t = time.perf_counter()
        last = [handler.attach(desc) for _ in range(1000)]
        per_attach = (time.perf_counter() - t) / 1000
        t = time.perf_counter()
        for a in last:
            a[0]  # first touch: one fault, one request
        per_fault = (time.perf_counter() - t) / 1000
        held.extend(last)
        out.append((n, per_attach, per_fault, handler.stats()["regions_attached"], _maps_lines()))
    q.put(out)


def bench_attach(sizes):
    print("attach (worker): the last 1,000 attaches of N live regions, and a first touch in each")
    a = np.arange(MiB // 8, dtype=np.float64)  # one 1 MiB segment, attached again and again
    ctx = mp.get_context("spawn")
    with handler.exported(a) as desc:
        q = ctx.Queue()
        p = ctx.Process(target=_attach_child, args=(desc, sizes, q))
        p.start()
        out = q.get()
        p.join()
    for n, per_attach, per_fault, regions, maps in out:
        print(
            f"  N={n:>6}: {per_attach * 1e6:8.1f} us/attach  {per_fault * 1e6:8.1f} us/first touch  "
            f"(regions {regions}, memory-map lines {maps})"
        )


def _views_child(frames_list, q):
    from lazyshare import handler, serialization

    out = []
    for name, frames in frames_list:
        t = time.perf_counter()
        views = serialization.loads(frames)
        dt = time.perf_counter() - t
        regions, maps = handler.stats()["regions_attached"], _maps_lines()
        t = time.perf_counter()
        for v in views:
            v[0]  # a first touch in each view
        touch = time.perf_counter() - t
        out.append((name, len(views), dt, touch, regions, maps))
        del views, v
        gc.collect()
        deadline = time.monotonic() + 60
        while handler.stats()["regions_attached"] and time.monotonic() < deadline:
            time.sleep(0.01)
    q.put(out)


def bench_views(sizes, kinds=("rows", "windows", "nested")):
    print(
        "views in one task (a map chunk, threshold 4 KiB): unpickling V views of one array, then a first touch in each"
    )
    page = mmap.PAGESIZE
    a = np.zeros(max(sizes) * page // 8 + 4 * MiB, dtype=np.float64)  # never written: zero pages
    ctx = mp.get_context("spawn")
    exports = serialization.CallExports(threshold=page)
    frames_list = []
    for v in sizes if "rows" in kinds else ():
        rows = a[: v * page // 8].reshape(v, page // 8)
        frames_list.append((f"rows, V={v}", [bytes(f) for f in exports.dumps(list(rows))]))
    for v in sizes if "windows" in kinds else ():  # 64 KiB windows 4 KiB apart: 16 deep
        w = 16 * page // 8
        step = page // 8
        frames_list.append(
            (
                f"windows, V={v}",
                [bytes(f) for f in exports.dumps([a[i * step : i * step + w] for i in range(v)])],
            )
        )
    v = min(sizes[-1], 60000)  # 64 KiB windows 8 bytes apart: 8,192 deep
    if "nested" in kinds:
        frames_list.append(
            (f"nested, V={v}", [bytes(f) for f in exports.dumps([a[i : i + 2 * page] for i in range(v)])])
        )
    q = ctx.Queue()
    p = ctx.Process(target=_views_child, args=(frames_list, q))
    p.start()
    out = q.get(timeout=3600)
    p.join()
    exports.close()
    for name, nviews, dt, touch, regions, maps in out:
        print(
            f"  {name:>16}: {dt / nviews * 1e6:8.1f} us/view unpickled  {touch / nviews * 1e6:8.1f} us/first touch  "
            f"(regions {regions}, memory-map lines {maps})"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-views", type=int, default=70000)
    ap.add_argument("--skip", default="", help="comma-separated: export,attach,views")
    ap.add_argument("--views", default="rows,windows,nested", help="comma-separated kinds of views")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    if "export" not in skip:
        bench_export([350, 3000, 30000] if not args.quick else [350, 3000], 2000 if not args.quick else 500)
    if "attach" not in skip:
        bench_attach([1000, 5000, 25000] if not args.quick else [1000, 5000])
    if "views" not in skip:
        views = [5000, 20000, args.max_views] if not args.quick else [2000, 8000]
        bench_views(views, args.views.split(","))


if __name__ == "__main__":
    main()
