"""lazyshare.Pool beside its peers, in one run, with ratios.

    python benchmarks/bench_pool.py [--size-mib 1024] [--runs 3] [--mp-runs 1] [--quick]

Workloads (2 workers each):
  sparse  16 tasks, each summing a different 1% slice of a float64 array
  whole   16 tasks, each summing a disjoint 1/16 (the array is read once)
  zeros   one task sums an 8 GiB np.zeros (lazyshare only): how many bytes cross
  tiny    10,000 tiny tasks with no arrays: pool.map(f, range(10000)) and
          10,000 apply_async calls

Peers: multiprocessing.Pool (forkserver: pickles the array into every task),
multiprocessing.shared_memory by hand (copy into a segment once per call, workers
attach by name), joblib (loky, auto-memmapping of arrays over 1 MiB), and Ray
when it is installed (``ray.put`` of the array once per call into its shared-memory
object store, tasks get it zero-copy, read-only; --no-ray skips it).

Every pool is started before its timings; what is timed is the call, including
whatever the peer must do per call (copy into shared memory, joblib's dump).
multiprocessing.Pool on a 1 GiB array takes close to a minute per workload here,
so it runs --mp-runs times (default 1). Figures are medians; read the ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from multiprocessing import shared_memory

import numpy as np

N_TASKS = 16


# ---- the tasks (module level: the stdlib pool imports them by name)


def sum_slice(a, start, stop):
    return float(a[start:stop].sum())


def shm_sum_slice(name, n, start, stop):
    shm = shared_memory.SharedMemory(name=name)
    try:
        a = np.ndarray((n,), np.float64, buffer=shm.buf)
        return float(a[start:stop].sum())
    finally:
        del a
        shm.close()


def sum_all(a):
    return float(a.sum())


def tiny(x):
    return x + 1


def bounds(n, kind):
    step = n // N_TASKS
    if kind == "sparse":
        return [(i * step, i * step + n // 100) for i in range(N_TASKS)]
    return [(i * step, (i + 1) * step) for i in range(N_TASKS)]


# ---- one timed call per peer


def run_lazyshare(pool, a, kind):
    return pool.starmap(sum_slice, [(a, s, e) for s, e in bounds(a.size, kind)], chunksize=1)


def run_mp(pool, a, kind):
    return pool.starmap(sum_slice, [(a, s, e) for s, e in bounds(a.size, kind)], chunksize=1)


def run_shm(pool, a, kind):
    shm = shared_memory.SharedMemory(create=True, size=a.nbytes)
    try:
        view = np.ndarray(a.shape, a.dtype, buffer=shm.buf)
        view[:] = a  # the copy the user must make to share the array
        del view
        return pool.starmap(
            shm_sum_slice, [(shm.name, a.size, s, e) for s, e in bounds(a.size, kind)], chunksize=1
        )
    finally:
        shm.close()
        shm.unlink()


def run_joblib(parallel, a, kind):
    from joblib import delayed

    return parallel(delayed(sum_slice)(a, s, e) for s, e in bounds(a.size, kind))


def start_ray():
    """Ray with 2 worker CPUs, warmed up; None if Ray is not installed."""
    try:
        import ray
    except ImportError:
        print("ray not installed: its column is skipped (pip install ray)")
        return None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    remote = ray.remote(sum_slice)
    ray.get([remote.remote(np.zeros(8), 0, 8) for _ in range(4)])
    return remote


def run_ray(remote, a, kind):
    import ray

    ref = ray.put(a)  # the per-call copy into the object store; tasks map it read-only
    try:
        return ray.get([remote.remote(ref, s, e) for s, e in bounds(a.size, kind)])
    finally:
        del ref


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mp-runs", type=int, default=1)
    ap.add_argument("--tiny", type=int, default=10_000)
    ap.add_argument("--zeros-gib", type=int, default=8, help="size of the np.zeros argument")
    ap.add_argument("--no-mp", action="store_true", help="skip multiprocessing.Pool (minutes at 1 GiB)")
    ap.add_argument("--no-ray", action="store_true", help="skip Ray even if it is installed")
    ap.add_argument("--quick", action="store_true", help="128 MiB, one run each: under a minute")
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.runs, args.mp_runs, args.zeros_gib = 128, 1, 1, 1

    import lazyshare

    try:
        from joblib import Parallel
    except ImportError:
        Parallel = None
        print("joblib not installed: its column is skipped (pip install joblib)")

    caps = lazyshare.capabilities()
    print(
        f"lazyshare rung: {caps.mode}; array {args.size_mib} MiB float64; 2 workers; "
        f"medians of {args.runs} runs (multiprocessing.Pool: {args.mp_runs})\n"
    )
    a = np.random.default_rng(0).random(args.size_mib << 20 >> 3)
    expect = {k: [float(a[s:e].sum()) for s, e in bounds(a.size, k)] for k in ("sparse", "whole")}

    ctx = mp.get_context("forkserver")
    results: dict[tuple[str, str], float] = {}
    lz = lazyshare.Pool(2)
    mpp = ctx.Pool(2)
    par = Parallel(n_jobs=2, backend="loky", max_nbytes="1M") if Parallel else None
    ray_remote = None if args.no_ray else start_ray()
    try:
        # warm every pool up (worker start-up is not what is compared)
        lz.map(tiny, range(4))
        mpp.map(tiny, range(4))
        if par:
            par(__import__("joblib").delayed(tiny)(i) for i in range(4))
        for kind in ("sparse", "whole"):
            peers = [("lazyshare", run_lazyshare, lz, args.runs), ("shared_memory", run_shm, mpp, args.runs)]
            if par:
                peers.append(("joblib", run_joblib, par, args.runs))
            if ray_remote:
                peers.append(("ray", run_ray, ray_remote, args.runs))
            if not args.no_mp:
                peers.append(("multiprocessing", run_mp, mpp, args.mp_runs))
            for name, fn, pool, runs in peers:
                ts = []
                for _ in range(runs):
                    dt, out = timed(fn, pool, a, kind)
                    if out != expect[kind]:
                        print(f"WRONG RESULT from {name} on {kind}", file=sys.stderr)
                        return 1
                    ts.append(dt)
                results[(kind, name)] = statistics.median(ts)
                print(f"  {kind:6} {name:16} {results[(kind, name)]:8.3f} s", flush=True)
        stats = lz.stats()["totals"]

        # never-written pages: np.zeros is untouched memory, answered as zero pages
        z = np.zeros(args.zeros_gib << 30 >> 3)
        before = lz.stats()["totals"]["bytes_lazy"]
        dt, out = timed(lz.apply, sum_all, (z,))
        assert out == 0.0
        zero_moved = lz.stats()["totals"]["bytes_lazy"] - before
        del z
        print(
            f"  zeros  lazyshare        {dt:8.3f} s   ({args.zeros_gib} GiB np.zeros read by one task: "
            f"{zero_moved / 2**20:.1f} MiB crossed, {zero_moved / (args.zeros_gib << 30):.3%})",
            flush=True,
        )

        for label, call in (
            ("map", lambda p: p.map(tiny, range(args.tiny))),
            (
                "apply_async",
                lambda p: [r.get() for r in [p.apply_async(tiny, (i,)) for i in range(args.tiny)]],
            ),
        ):
            for name, pool in (("lazyshare", lz), ("multiprocessing", mpp)):
                ts = []
                for _ in range(max(args.runs, 3)):
                    dt, out = timed(call, pool)
                    assert out == [i + 1 for i in range(args.tiny)]
                    ts.append(dt)
                results[("tiny-" + label, name)] = statistics.median(ts)
                print(f"  tiny-{label:11} {name:16} {results[('tiny-' + label, name)]:8.3f} s", flush=True)
    finally:
        lz.terminate()
        lz.join()
        mpp.terminate()
        if ray_remote:
            __import__("ray").shutdown()
        mpp.join()

    print("\nratios (peer time / lazyshare time; above 1: lazyshare is faster)")
    for kind in ("sparse", "whole"):
        lzt = results[(kind, "lazyshare")]
        row = ", ".join(
            f"{name} {results[(kind, name)] / lzt:.1f}x"
            for name in ("multiprocessing", "shared_memory", "joblib", "ray")
            if (kind, name) in results
        )
        print(f"  {kind:6}: {row}")
    for label in ("map", "apply_async"):
        r = results[("tiny-" + label, "lazyshare")] / results[("tiny-" + label, "multiprocessing")]
        print(f"  tiny {label}: lazyshare takes {r:.2f}x multiprocessing.Pool's time")
    print(
        f"\nlazyshare moved {stats['bytes_lazy'] / 2**20:.1f} MiB lazily and pickled "
        f"{stats['bytes_pickled'] / 2**20:.1f} MiB over all runs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
