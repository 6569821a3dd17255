"""Peak memory of the whole-array workload, per peer, each in its own process tree.

    python benchmarks/bench_memory.py [--size-mib 1024] [--quick]

For each peer a fresh parent process makes the array, starts 2 workers, runs 16
tasks that each sum a disjoint 1/16 of it (every byte read once), and reports
its own peak RSS (VmHWM) and its workers'. The figure of merit is

    (parent peak + workers' peaks) / (array + what the workers touched)

where "touched" is the array once more (the workers read all of it). 1.0 would
mean no copy beyond the one the workers need; shared memory and joblib make an
extra copy (the segment, the memmap file) that processes map and count.
Peaks include each interpreter's own footprint (~30-60 MiB with numpy).
joblib's memmap file lives in /dev/shm: its pages are in no process's RSS until
a worker maps them, so its figure leaves out up to one array's worth of tmpfs.
Workers of lazyshare unmap a task's arguments when the task ends, so their peak
is one task's pages, not the whole array.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
from multiprocessing import shared_memory

import numpy as np
from bench_pool import shm_sum_slice, sum_slice  # the same tasks as the timing benchmark

N_TASKS = 16


def hwm(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def worker_hwm(_=None):
    return os.getpid(), hwm()


def _peaks_of_workers(pool, n=2):
    """Each worker reports its own VmHWM (ask more times than workers)."""
    got = {}
    for _ in range(20):
        for pid, peak in pool.map(worker_hwm, range(8), chunksize=1):
            got[pid] = max(peak, got.get(pid, 0))
        if len(got) >= n:
            break
    return sum(got.values())


def run_peer(peer: str, size_mib: int) -> dict:
    a = np.random.default_rng(0).random(size_mib << 20 >> 3)
    step = a.size // N_TASKS
    work = [(i * step, (i + 1) * step) for i in range(N_TASKS)]
    expect = [float(a[s:e].sum()) for s, e in work]
    if peer == "lazyshare":
        import lazyshare

        with lazyshare.Pool(2) as pool:
            got = pool.starmap(sum_slice, [(a, s, e) for s, e in work], chunksize=1)
            workers = _peaks_of_workers(pool)
    elif peer == "shared_memory":
        with mp.get_context("forkserver").Pool(2) as pool:
            shm = shared_memory.SharedMemory(create=True, size=a.nbytes)
            try:
                v = np.ndarray(a.shape, a.dtype, buffer=shm.buf)
                v[:] = a
                del v
                got = pool.starmap(shm_sum_slice, [(shm.name, a.size, s, e) for s, e in work], chunksize=1)
                workers = _peaks_of_workers(pool)
            finally:
                shm.close()
                shm.unlink()
    elif peer == "joblib":
        from joblib import Parallel, delayed

        with Parallel(n_jobs=2, backend="loky", max_nbytes="1M") as par:
            got = par(delayed(sum_slice)(a, s, e) for s, e in work)
            seen = {}
            for _ in range(10):
                for pid, peak in par(delayed(worker_hwm)() for _ in range(8)):
                    seen[pid] = max(peak, seen.get(pid, 0))
            workers = sum(seen.values())
    else:
        raise SystemExit(f"unknown peer {peer}")
    assert got == expect, f"{peer}: wrong results"
    return {"peer": peer, "parent": hwm(), "workers": workers, "array": a.nbytes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="256 MiB")
    args = ap.parse_args()
    if args.quick:
        args.size_mib = 256
    if args.peer:
        print(json.dumps(run_peer(args.peer, args.size_mib)))
        return 0
    print(f"whole-array workload, {args.size_mib} MiB array, 2 workers; peak RSS per process tree\n")
    print(f"  {'peer':14} {'parent':>10} {'workers':>10} {'total':>10}   total / (array + touched)")
    for peer in ("lazyshare", "shared_memory", "joblib"):
        r = subprocess.run(
            [sys.executable, __file__, "--peer", peer, "--size-mib", str(args.size_mib)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if r.returncode:
            print(f"  {peer:14} failed: {r.stderr.strip().splitlines()[-1:]}")
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        total = d["parent"] + d["workers"]
        mib = 2**20
        note = "  (+ up to the array in /dev/shm)" if peer == "joblib" else ""
        print(
            f"  {peer:14} {d['parent'] / mib:8.0f} MiB {d['workers'] / mib:7.0f} MiB {total / mib:7.0f} MiB"
            f"   {total / (2 * d['array']):.2f}{note}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
