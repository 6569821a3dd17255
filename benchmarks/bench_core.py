"""The lazy-page core against the machine's ceiling, in one run.

    python benchmarks/bench_core.py [--size-mib 1024] [--runs 5] [--pairs 3] [--quick] [--wire]

Prints, as medians over --runs fresh attaching processes:

* sequential materialization of one segment (GB/s), and the ceiling measured
  beside it in the same process: UFFDIO_COPY from a local (cache-hot) buffer
  into a fresh registered mapping with the same block size (the largest
  read-ahead window), in back-to-back pairs (benchmarks/_ceiling.py);
* random single-page faults: latency p50/p99 as seen by the touching thread.

Both fill freshly allocated memory; on a VM the first touch of guest memory can
dominate either, so the per-pair ratio is the figure to read, not the GB/s.
--wire measures the payload path (pages sent in the reply and installed by the
consumer) instead of the owner installing them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import numpy as np

import lazyshare
from lazyshare import settings


def _sequential(desc, block, rounds, q):
    """Pairs of (ceiling, lazy materialization) in one process, back to back.

    Both fill fresh memory of this process, so both pay the same first-touch
    costs; on a VM that returns freed memory to the host (free page reporting)
    those swing either figure by 3x from one allocation to the next, so the
    ratio is taken per pair, and the first pair only warms up.
    """
    import gc

    from _ceiling import uffd_copy_ns

    import lazyshare

    pairs = []
    for i in range(rounds + 1):
        ns = uffd_copy_ns(desc.nbytes, block)
        a = lazyshare.attach(desc)
        t = time.perf_counter()
        lazyshare.materialize(a)
        dt = time.perf_counter() - t
        nbytes = a.nbytes
        del a
        gc.collect()
        if i:
            pairs.append((nbytes / ns if ns > 0 else float("nan"), nbytes / dt / 1e9))
    q.put(pairs)


def _random(desc, n, q):
    import lazyshare

    a = lazyshare.attach(desc)
    per_page = 4096 // a.itemsize
    pages = np.random.default_rng(0).permutation(a.size // per_page)[:n]
    lat = np.empty(n)
    for k, p in enumerate(pages):
        i = int(p) * per_page
        t = time.perf_counter_ns()
        a[i]
        lat[k] = time.perf_counter_ns() - t
    lat /= 1000
    q.put((float(np.percentile(lat, 50)), float(np.percentile(lat, 99))))


def _random_during_stream(desc, n, q):
    """Random single-page faults in one half while another thread streams the other."""
    import threading

    import lazyshare

    a = lazyshare.attach(desc)
    half = a.size // 2
    t = threading.Thread(target=lazyshare.materialize, args=(a[:half],))
    t.start()
    idx = np.random.default_rng(2).integers(half, a.size, n)
    lat = []
    for i in idx:
        if not t.is_alive():
            break
        t0 = time.perf_counter_ns()
        a[i]
        lat.append(time.perf_counter_ns() - t0)
    t.join()
    lat = np.array(lat or [0]) / 1000
    q.put((float(np.percentile(lat, 50)), float(np.percentile(lat, 99))))


def _in_child(ctx, target, *args):
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    out = q.get(timeout=600)
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=3, help="(ceiling, sequential) pairs per run")
    ap.add_argument("--faults", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="256 MiB, 3 runs")
    ap.add_argument("--wire", action="store_true", help="pages as payload (LAZYSHARE_DATA_PATH=wire)")
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.runs = min(args.size_mib, 256), 3
    if args.wire:
        os.environ["LAZYSHARE_DATA_PATH"] = "wire"  # inherited by the attaching children

    caps = lazyshare.capabilities()
    print(f"rung: {caps.mode} ({caps.reason})")
    ctx = mp.get_context("spawn")
    a = np.random.default_rng(1).random(args.size_mib << 20 >> 3)
    desc = lazyshare.export(a)
    block = settings.read().max_block

    seq, ceil, ratios, p50, p99, s50, s99 = [], [], [], [], [], [], []
    for _ in range(args.runs):
        for c, sq in _in_child(ctx, _sequential, desc, block, args.pairs):
            ceil.append(c)
            seq.append(sq)
            ratios.append(sq / c)
        lo, hi = _in_child(ctx, _random, desc, args.faults)
        p50.append(lo)
        p99.append(hi)
        lo, hi = _in_child(ctx, _random_during_stream, desc, args.faults)
        s50.append(lo)
        s99.append(hi)
    lazyshare.release(desc)

    med = statistics.median
    print(
        f"\n{args.size_mib} MiB segment, {args.runs} runs of {args.pairs} pairs, block {block >> 10} KiB (medians)"
    )
    print(f"  UFFDIO_COPY from local memory (ceiling)   {med(ceil):6.2f} GB/s")
    print(
        f"  sequential lazy materialization           {med(seq):6.2f} GB/s   "
        f"= {med(ratios):.0%} of the ceiling (median of per-pair ratios; "
        f"{med(seq) / med(ceil):.0%} as a ratio of medians)"
    )
    print(f"  random single-page fault                  p50 {med(p50):6.1f} us   p99 {med(p99):7.1f} us")
    print(f"  the same while another thread streams     p50 {med(s50):6.1f} us   p99 {med(s99):7.1f} us")
    print("  per pair, sequential/ceiling: " + ", ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
