"""imap / imap_unordered over a generator: memory held while streaming, and the
speed of tiny tasks, beside multiprocessing.Pool.

    python benchmarks/bench_stream.py [--runs 5] [--tasks 10000] [--arrays 600] [--mib 2]
                                      [--task-ms 2]

tiny    ``list(pool.imap(f, range(tasks), chunksize))`` for chunksize 1 and 100,
        and the same with ``imap_unordered``; medians of --runs, ratio to the stdlib,
        and the parent's CPU time per task (steadier than wall time on a busy machine)
stream  a generator yields --arrays fresh arrays of --mib MiB (written, so that
        they take memory), each task takes --task-ms, the consumer reads the
        results as they come: peak growth of the parent's RSS over the stream,
        how far the generator ran ahead of the results read, and (lazyshare) the
        most segments pinned at once. glibc's dynamic mmap threshold would keep
        freed 2 MiB blocks in the heap after the first is freed (RSS would say
        nothing): the script re-executes itself with MALLOC_MMAP_THRESHOLD_ set.

Two workers each, forkserver, pools started before the timings.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time

import numpy as np

MiB = 1 << 20


def tiny(x):
    return x + 1


def head_tail(a, seconds=0.0):
    time.sleep(seconds)
    return float(a[0]) + float(a[-1])


def rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(x.split()[1]) * 1024 for x in fh if x.startswith("VmRSS"))


class Sampler:
    """RSS of this process every 5 ms, in a thread (the peak between samples)."""

    def __init__(self):
        self.base = rss()
        self.peak = self.base
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def done(self) -> int:
        self.stop.set()
        self.t.join()
        self.peak = max(self.peak, rss())
        return self.peak - self.base


def stream(pool, method, n, nbytes, chunksize, lazy, seconds):
    from lazyshare import handler

    if lazy:  # the previous call's segments are let go once the workers unmap them
        deadline = time.monotonic() + 10
        while handler.pinned_segments() and time.monotonic() < deadline:
            time.sleep(0.01)

    yielded = [0]
    done = [0]
    ahead = [0]

    def gen():
        for i in range(n):
            a = np.full(nbytes // 8, float(i))
            yielded[0] += 1
            ahead[0] = max(ahead[0], yielded[0] - done[0])
            yield a

    s = Sampler()
    pinned = 0
    total = 0.0
    func = functools.partial(head_tail, seconds=seconds)
    for v in getattr(pool, method)(func, gen(), chunksize):
        total += v
        done[0] += 1
        if lazy:
            pinned = max(pinned, handler.pinned_segments())
    grew = s.done()
    assert total == sum(2.0 * i for i in range(n))
    return grew, pinned, ahead[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=10000)
    ap.add_argument("--arrays", type=int, default=600)
    ap.add_argument("--mib", type=float, default=2)
    ap.add_argument("--task-ms", type=float, default=2.0)
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-stream", action="store_true")
    args = ap.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
        os.execv(sys.executable, [sys.executable, *sys.argv])

    import lazyshare

    print(f"lazyshare from {os.path.dirname(lazyshare.__file__)}")
    ctx = mp.get_context("forkserver")
    pools = {"lazyshare": lazyshare.Pool(2), "stdlib": ctx.Pool(2)}
    try:
        for p in pools.values():  # warm up: workers started and importing
            p.map(tiny, range(100))
        if not args.skip_tiny:
            print(f"tiny: {args.tasks} tasks, medians of {args.runs} runs (ms)")
            for method in ("imap", "imap_unordered"):
                for cs in (1, 100):
                    t, cpu = {}, {}
                    for name, p in pools.items():
                        xs, cs_ = [], []
                        for _ in range(args.runs):
                            t0, c0 = time.perf_counter(), time.process_time()
                            out = list(getattr(p, method)(tiny, range(args.tasks), cs))
                            xs.append(time.perf_counter() - t0)
                            cs_.append(time.process_time() - c0)
                            assert len(out) == args.tasks
                        t[name] = statistics.median(xs)
                        cpu[name] = statistics.median(cs_) / args.tasks * 1e6
                    print(
                        f"  {method:15s} chunksize {cs:3d}: lazyshare {t['lazyshare'] * 1e3:7.1f}  "
                        f"stdlib {t['stdlib'] * 1e3:7.1f}  ratio {t['lazyshare'] / t['stdlib']:.2f}   "
                        f"parent CPU us/task: lazyshare {cpu['lazyshare']:5.2f} stdlib {cpu['stdlib']:5.2f}"
                    )
        if not args.skip_stream:
            nbytes = int(args.mib * MiB)
            print(f"stream: {args.arrays} fresh arrays of {args.mib:g} MiB, {args.task_ms:g} ms per task")
            for method in ("imap", "imap_unordered"):
                for cs in (1, 4):
                    for name, p in pools.items():
                        grew, pinned, ahead = stream(
                            p, method, args.arrays, nbytes, cs, name == "lazyshare", args.task_ms / 1e3
                        )
                        extra = f"  pinned max {pinned:4d}" if name == "lazyshare" else ""
                        print(
                            f"  {method:15s} chunksize {cs}: {name:9s} RSS peak +{grew / MiB:7.1f} MiB"
                            f"  generator ahead of results max {ahead:4d}{extra}"
                        )
    finally:
        for p in pools.values():
            p.terminate()
            p.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
