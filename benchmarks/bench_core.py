"""The lazy-page core against the machine's ceiling, in one run.

    python benchmarks/bench_core.py [--size-mib 1024] [--runs 5] [--quick]

Prints, as medians over --runs fresh attaching processes:

* sequential materialization of one segment (GB/s), and the ceiling measured in
  the same run: UFFDIO_COPY from local memory into a fresh registered mapping
  with the same block size (the largest read-ahead window);
* random single-page faults: latency p50/p99 as seen by the touching thread.

Every run touches freshly allocated memory in the attaching process, as the
ceiling does; on a VM the first touch of guest memory can dominate both, so the
ratio is the figure to read, not the absolute GB/s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import numpy as np

import lazyshare
from lazyshare import handler


def _sequential(desc, q):
    import lazyshare

    a = lazyshare.attach(desc)
    t = time.perf_counter()
    lazyshare.materialize(a)
    dt = time.perf_counter() - t
    q.put((a.nbytes / dt / 1e9, lazyshare.stats()["requests"]))


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


def _ceiling(nbytes, block, q):
    from lazyshare import handler

    ns = handler.lib.ls_bench_uffd_copy(nbytes, block)
    q.put(nbytes / ns if ns > 0 else float("nan"))


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
    ap.add_argument("--faults", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="256 MiB, 3 runs")
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.runs = min(args.size_mib, 256), 3

    caps = lazyshare.capabilities()
    print(f"rung: {caps.mode} ({caps.reason})")
    ctx = mp.get_context("spawn")
    a = np.random.default_rng(1).random(args.size_mib << 20 >> 3)
    desc = lazyshare.export(a)
    block = handler._MAX_BLOCK

    seq, ceil, p50, p99, s50, s99 = [], [], [], [], [], []
    for _ in range(args.runs):
        ceil.append(_in_child(ctx, _ceiling, a.nbytes, block))
        gbps, _ = _in_child(ctx, _sequential, desc)
        seq.append(gbps)
        lo, hi = _in_child(ctx, _random, desc, args.faults)
        p50.append(lo)
        p99.append(hi)
        lo, hi = _in_child(ctx, _random_during_stream, desc, args.faults)
        s50.append(lo)
        s99.append(hi)
    lazyshare.release(desc)

    med = statistics.median
    print(f"\n{args.size_mib} MiB segment, {args.runs} runs, block {block >> 10} KiB (medians)")
    print(f"  UFFDIO_COPY from local memory (ceiling)   {med(ceil):6.2f} GB/s")
    ratios = [sq / c for sq, c in zip(seq, ceil)]
    print(
        f"  sequential lazy materialization           {med(seq):6.2f} GB/s   "
        f"= {med(ratios):.0%} of the ceiling (median of per-run ratios)"
    )
    print(f"  random single-page fault                  p50 {med(p50):6.1f} us   p99 {med(p99):7.1f} us")
    print(f"  the same while another thread streams     p50 {med(s50):6.1f} us   p99 {med(s99):7.1f} us")
    print("  per run, sequential/ceiling: " + ", ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
