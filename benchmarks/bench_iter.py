"""Pages that outlive a call: the same array passed to call after call.

    python benchmarks/bench_iter.py [--size-mib 1024] [--runs 5] [--calls 6] [--iters 5]
                                    [--pairs 3] [--only iter,dirty,overwrite,memory] [--mp] [--quick]

Every call is 16 tasks over a float64 array; task i returns the sum of the
disjoint 1/16 chunk i (the whole array is read once per call). Every call's
results are checked against numpy's chunk sums of the parent's array as it is
then: a stale page anywhere fails the benchmark (exit 1).

iter       one array, 2 workers, --calls calls in a row; a fresh array for each of
           --runs repeats. Peers in the same run, each reused across the calls:
           lazyshare.Pool; joblib with one Parallel(n_jobs=2) per repeat (loky,
           default auto-memmapping, which dumps an array once per Parallel and finds
           it again by identity: later writes to it are not seen in the workers);
           multiprocessing.shared_memory by hand (the array
           copied into a SharedMemory once, before the first call, which is timed
           with it; a forkserver multiprocessing.Pool whose tasks attach by name).
           First-call time and the median of later calls; for lazyshare the
           counters of Pool.stats() per call (bytes_lazy: bytes the workers fetched).
           multiprocessing.Pool pickles the whole array into each of the 16 tasks
           of every call (11 s a call at 256 MiB here, 120x lazyshare; 6 calls x 2
           repeats would be minutes of a quick run): only with --mp.
dirty      between calls the parent changes one float in each of 1% of the pages,
           chosen at random: bytes moved by the next call (bytes_lazy) over the
           bytes changed (changed pages x 4096).
overwrite  the parent overwrites the whole array (a[:] = i) before each call
           (loop = overwrite + call), and, "during", while a starmap_async call runs
           (each followed by an untimed call that must see the new array exactly).
           Runs in child processes, alternately with LAZYSHARE_CACHE=1 (segments
           outlive a call, written pages tracked) and LAZYSHARE_CACHE=0 (one export
           per call), --pairs times each: ratio tracked / untracked.
memory     the whole-array call, twice, with 2 and with 8 workers, in a fresh child
           each (and each again with LAZYSHARE_CACHE=0): every ~20 ms the sum of Pss
           (/proc/<pid>/smaps_rollup: shared pages counted once overall) over the
           child and all its descendants (forkserver, workers). Figure:
           (peak - Pss before the array and the pool existed) / (2 x array), the
           array plus one copy of what the workers touched; the aim is <= 1.15.
           Idle workers' interpreters are in that peak (the "idle" column).

Ratios are of medians; this is meant for a noisy 2-core VM, so read the ratios.
Missed aims are reported, never an error: the exit status is 1 only for a wrong
result or a part that failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from multiprocessing import shared_memory

import numpy as np
from bench_pool import shm_sum_slice, sum_slice  # the same tasks as the pool benchmark

N_TASKS = 16
PAGE = 4096
MiB = 1 << 20
PARTS = ("iter", "dirty", "overwrite", "memory")
STATS_WAIT = 5.0  # seconds Pool.stats may wait for workers still counting pages


class WrongResult(Exception):
    pass


def tiny(x):
    return x + 1


def chunks(n: int) -> list[tuple[int, int]]:
    step = n // N_TASKS
    return [(i * step, (i + 1) * step) for i in range(N_TASKS)]


def chunk_sums(a) -> list[float]:
    return [float(a[s:e].sum()) for s, e in chunks(a.size)]


def check(what: str, got, a) -> None:
    """The results must be numpy's chunk sums of the parent's array as it is now."""
    want = chunk_sums(a)
    got = list(got)
    if got != want:
        bad = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]
        raise WrongResult(
            f"{what}: {len(bad)} of {len(want)} chunk sums differ from the parent's array "
            f"(stale or wrong pages); first (chunk, got, expected): {bad[:3]}"
        )


def tasks(a):
    return [(a, s, e) for s, e in chunks(a.size)]


def totals(pool) -> dict:
    return dict(pool.stats(STATS_WAIT)["totals"])


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def new_array(n: int, seed: int):
    return np.random.default_rng(seed).random(n)


def cache_env() -> str:
    return os.environ.get("LAZYSHARE_CACHE", "unset")


# ---- iter: one array, call after call


class LazysharePeer:
    name = "lazyshare"

    def __init__(self, pool):
        self.pool = pool
        self.stats: list[dict] = []  # per call of the current repeat

    def start(self, a):
        self.stats = []
        self.last = totals(self.pool)

    def call(self, a):
        return self.pool.starmap(sum_slice, tasks(a), chunksize=1)

    def after_call(self):
        now = totals(self.pool)
        self.stats.append(delta(now, self.last))
        self.last = now

    def stop(self):
        pass


class ShmPeer:
    name = "shared_memory"

    def __init__(self, pool):
        self.pool = pool
        self.shm = None

    def start(self, a):
        self.shm = None

    def call(self, a):
        if self.shm is None:  # the copy the user makes once; timed with the first call
            self.shm = shared_memory.SharedMemory(create=True, size=a.nbytes)
            view = np.ndarray(a.shape, a.dtype, buffer=self.shm.buf)
            view[:] = a
            del view
        return self.pool.starmap(
            shm_sum_slice, [(self.shm.name, a.size, s, e) for s, e in chunks(a.size)], chunksize=1
        )

    def after_call(self):
        pass

    def stop(self):
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None


class JoblibPeer:
    name = "joblib"

    def __init__(self):
        from joblib import Parallel, delayed

        self.Parallel, self.delayed = Parallel, delayed
        self.par = None

    def start(self, a):
        self.par = self.Parallel(n_jobs=2, backend="loky")  # default max_nbytes: memmaps big arrays
        self.par.__enter__()

    def call(self, a):
        d = self.delayed
        return self.par(d(sum_slice)(a, s, e) for s, e in chunks(a.size))

    def after_call(self):
        pass

    def stop(self):
        if self.par is not None:
            self.par.__exit__(None, None, None)
            self.par = None


class MpPeer:
    name = "multiprocessing"

    def __init__(self, pool):
        self.pool = pool

    def start(self, a):
        pass

    def call(self, a):
        return self.pool.starmap(sum_slice, tasks(a), chunksize=1)

    def after_call(self):
        pass

    def stop(self):
        pass


def part_iter(args, n: int) -> None:
    import lazyshare

    print(f"iter: {args.calls} calls of {N_TASKS} tasks on one array, 2 workers, {args.runs} repeats")
    ctx = mp.get_context("forkserver")
    lz = lazyshare.Pool(2)
    mpp = ctx.Pool(2)
    peers: list = [LazysharePeer(lz), ShmPeer(mpp)]
    try:
        peers.append(JoblibPeer())
    except ImportError:
        print("  joblib not installed: its row is skipped (pip install joblib)")
    if args.mp:
        peers.append(MpPeer(mpp))
    else:
        print(
            "  multiprocessing.Pool skipped: it pickles the whole array into each of the 16 tasks of"
            " every call (11 s a call at 256 MiB on a 2-core VM); --mp includes it"
        )
    times: dict[str, tuple[list, list]] = {p.name: ([], []) for p in peers}
    lz_first: list[dict] = []
    lz_later: list[dict] = []
    try:
        lz.map(tiny, range(4))
        mpp.map(tiny, range(4))
        for p in peers:
            if isinstance(p, JoblibPeer):  # start loky's (reused) executor before the timings
                with p.Parallel(n_jobs=2, backend="loky") as par:
                    par(p.delayed(tiny)(i) for i in range(4))
        for r in range(args.runs):
            a = new_array(n, 100 + r)
            k = r % len(peers)  # a different peer goes first in each repeat
            for p in peers[k:] + peers[:k]:
                p.start(a)
                try:
                    for c in range(args.calls):
                        t = time.perf_counter()
                        got = p.call(a)
                        dt = time.perf_counter() - t
                        check(f"iter {p.name} repeat {r} call {c}", got, a)
                        p.after_call()
                        times[p.name][0 if c == 0 else 1].append(dt)
                finally:
                    p.stop()
            lz_first.append(peers[0].stats[0])
            lz_later.extend(peers[0].stats[1:])
            del a
            gc.collect()
    finally:
        lz.terminate()
        lz.join()
        mpp.terminate()
        mpp.join()

    print(f"  {'peer':16} {'first call':>11} {'later calls':>12}")
    for p in peers:
        first, later = times[p.name]
        print(f"  {p.name:16} {med(first):9.3f} s {med(later):10.3f} s")
    lz_l = med(times["lazyshare"][1])
    ratios = [f"lazyshare / shared_memory {lz_l / med(times['shared_memory'][1]):.2f}"]
    if "joblib" in times:
        ratios.append(f"joblib / lazyshare {med(times['joblib'][1]) / lz_l:.2f}")
    if "multiprocessing" in times:
        ratios.append(f"multiprocessing / lazyshare {med(times['multiprocessing'][1]) / lz_l:.1f}")
    print("  later calls: " + ", ".join(ratios))
    for label, rows in (("first", lz_first), ("later", lz_later)):
        keys = sorted({k for d in rows for k in d})
        per = ", ".join(f"{k} {med([d.get(k, 0) for d in rows]):.0f}" for k in keys)
        mb = med([d.get("bytes_lazy", 0) for d in rows])
        print(
            f"  lazyshare per {label} call: {mb / MiB:.1f} MiB moved ({mb / (n * 8):.1%} of the array); {per}"
        )
    try:  # kept segments, where the library has them
        from lazyshare import live

        if os.path.dirname(live.__file__) == os.path.dirname(lazyshare.__file__):
            print(f"  lazyshare.live.stats() at the end: {live.stats()}")
    except Exception:
        pass


# ---- dirty: 1% of the pages changed between calls


def part_dirty(args, n: int) -> None:
    import lazyshare

    print(f"dirty: one float changed in each of 1% of the pages (random) before each of {args.iters} calls")
    a = new_array(n, 7)
    rng = np.random.default_rng(8)
    npages = a.size * 8 // PAGE
    rows = []
    with lazyshare.Pool(2) as pool:
        pool.map(tiny, range(4))
        before = totals(pool)
        got = pool.starmap(sum_slice, tasks(a), chunksize=1)
        check("dirty first call", got, a)
        now = totals(pool)
        first = now["bytes_lazy"] - before["bytes_lazy"]
        for i in range(args.iters):
            which = rng.choice(npages, npages // 100, replace=False)
            idx = which * (PAGE // 8) + rng.integers(0, PAGE // 8, which.size)
            a[idx] = rng.random(idx.size)
            changed = np.unique((a.ctypes.data + 8 * idx) // PAGE).size * PAGE  # pages of memory written
            before = now
            t = time.perf_counter()
            got = pool.starmap(sum_slice, tasks(a), chunksize=1)
            dt = time.perf_counter() - t
            check(f"dirty call {i + 1}", got, a)
            now = totals(pool)
            rows.append(
                (dt, now["bytes_lazy"] - before["bytes_lazy"], changed, now["faults"] - before["faults"])
            )
    moved = med([r[1] for r in rows])
    changed = med([r[2] for r in rows])
    ratio = med([r[1] / r[2] for r in rows])
    print(
        f"  first call {first / MiB:.1f} MiB moved; next calls (median): {med([r[0] for r in rows]):.3f} s, "
        f"{moved / MiB:.1f} MiB moved for {changed / MiB:.1f} MiB of pages changed: "
        f"moved / changed = {ratio:.1f} (1.0: only changed pages move); "
        f"faults {med([r[3] for r in rows]):.0f}"
    )


# ---- overwrite: the whole array written between calls and during one (child processes)


def child_overwrite(args, n: int) -> dict:
    import lazyshare

    out = {"between": [], "write": [], "call": [], "moved": [], "during": [], "seen": [0, 0, 0]}
    a = np.full(n, 1.0)
    val = 1.0
    with warnings.catch_warnings(record=True) as caught, lazyshare.Pool(2) as pool:
        warnings.simplefilter("always")
        pool.map(tiny, range(4))
        check("overwrite warm call", pool.starmap(sum_slice, tasks(a), chunksize=1), a)
        now = totals(pool)
        for i in range(args.iters):
            val += 1
            t0 = time.perf_counter()
            a[:] = val
            t1 = time.perf_counter()
            got = pool.starmap(sum_slice, tasks(a), chunksize=1)
            t2 = time.perf_counter()
            check(f"overwrite between, call {i}", got, a)
            before, now = now, totals(pool)
            out["between"].append(t2 - t0)
            out["write"].append(t1 - t0)
            out["call"].append(t2 - t1)
            out["moved"].append(now["bytes_lazy"] - before["bytes_lazy"])
        per = n // N_TASKS
        for i in range(args.iters):
            old, val = val, val + 1
            t0 = time.perf_counter()
            res = pool.starmap_async(sum_slice, tasks(a), chunksize=1)
            a[:] = val  # while the call runs
            got = res.get(timeout=600)
            out["during"].append(time.perf_counter() - t0)
            for c, g in enumerate(got):  # each element is the old or the new value, never anything else
                k = g - per * old  # how many elements of the chunk the task saw new
                if k != int(k) or not 0 <= k <= per:
                    raise WrongResult(
                        f"overwrite during, call {i}, chunk {c}: sum {g} is not that of a mix of {old} and {val}"
                    )
                out["seen"][0 if k == 0 else 2 if k == per else 1] += 1
            check(
                f"overwrite during, the call after call {i}",
                pool.starmap(sum_slice, tasks(a), chunksize=1),
                a,
            )
    out["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:200] for w in caught})
    return out


def part_overwrite(args, n: int) -> None:
    print(
        f"overwrite: a[:] = i before each of {args.iters} calls, and during each of {args.iters} more; "
        f"child processes, LAZYSHARE_CACHE=1 and =0 alternately, {args.pairs} each"
    )
    runs: dict[str, list[dict]] = {"1": [], "0": []}
    for _ in range(args.pairs):
        for mode in ("1", "0"):
            runs[mode].append(run_child("overwrite", args, {"LAZYSHARE_CACHE": mode}))
    rows = {}
    for mode, label in (("1", "tracked (CACHE=1)"), ("0", "untracked (CACHE=0)")):
        got = {
            k: [x for r in runs[mode] for x in r[k]] for k in ("between", "write", "call", "moved", "during")
        }
        seen = [sum(r["seen"][i] for r in runs[mode]) for i in range(3)]
        rows[mode] = {k: med(v) for k, v in got.items()}
        r = rows[mode]
        print(
            f"  {label:20} between: loop {r['between']:.3f} s (write {r['write']:.3f} + call {r['call']:.3f}), "
            f"{r['moved'] / MiB:.0f} MiB moved/call; during: loop {r['during']:.3f} s "
            f"(chunks seen old/mixed/new {seen[0]}/{seen[1]}/{seen[2]})"
        )
        for w in sorted({w for x in runs[mode] for w in x["warnings"]}):
            print(f"    warning: {w}")
    t, u = rows["1"], rows["0"]
    print(
        f"  tracked / untracked: between {t['between'] / u['between']:.2f} "
        f"(write {t['write'] / u['write']:.2f}, call {t['call'] / u['call']:.2f}), "
        f"during {t['during'] / u['during']:.2f}"
    )


# ---- memory: peak Pss of the process tree during the whole-array call


def pss(pid) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def tree(pid) -> list[int]:
    """pid and all its descendants (workers are the forkserver's children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def tree_pss() -> int:
    return sum(pss(p) for p in tree(os.getpid()))


class PssSampler:
    def __init__(self, every=0.02):
        self.peak, self.samples, self.every = tree_pss(), 1, every
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop.wait(self.every):
            self.peak = max(self.peak, tree_pss())
            self.samples += 1

    def done(self) -> int:
        self.stop.set()
        self.t.join()
        return max(self.peak, tree_pss())


def child_memory(args, n: int) -> dict:
    import lazyshare

    base = tree_pss()
    a = new_array(n, 9)
    with_array = tree_pss()
    peaks, samples = [], 0
    with lazyshare.Pool(args.workers) as pool:
        pool.map(tiny, range(4 * args.workers))
        time.sleep(0.2)
        idle = tree_pss()
        for c in range(2):
            s = PssSampler()
            got = pool.starmap(sum_slice, tasks(a), chunksize=1)
            peaks.append(s.done())
            samples += s.samples
            check(f"memory call {c}", got, a)
    return {"base": base, "with_array": with_array, "idle": idle, "peaks": peaks, "samples": samples}


def part_memory(args, n: int) -> None:
    print(
        "memory: whole-array call twice per child, Pss of the child's process tree every ~20 ms; "
        "(peak - before array and pool) / (2 x array), aim <= 1.15"
    )
    print(
        f"  {'workers':>7} {'cache':>5} {'array':>9} {'idle':>9} {'peak 1':>9} {'peak 2':>9}  ratio  samples"
    )
    for workers in (2, 8):
        for mode in ("1", "0"):
            d = run_child("memory", args, {"LAZYSHARE_CACHE": mode}, ["--workers", str(workers)])
            b = d["base"]
            ratio = (max(d["peaks"]) - b) / (2 * n * 8)
            aim = "" if ratio <= 1.15 else "  (aim 1.15 missed)"
            print(
                f"  {workers:7} {mode:>5} {(d['with_array'] - b) / MiB:5.0f} MiB {(d['idle'] - b) / MiB:5.0f} MiB "
                f"{(d['peaks'][0] - b) / MiB:5.0f} MiB {(d['peaks'][1] - b) / MiB:5.0f} MiB  {ratio:5.2f}  "
                f"{d['samples']:7}{aim}"
            )
    print("  (MiB above the Pss before the array; idle: array + started workers; peak k: during call k)")


# ---- children


def run_child(part: str, args, env: dict, extra=()) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", part, "--size-mib", str(args.size_mib)]
    cmd += ["--iters", str(args.iters), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **env})
    if r.returncode:
        sys.stderr.write(r.stderr)
        raise RuntimeError(f"child {part} {env} exited with {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, help="array size (default 1024, --quick 256)")
    ap.add_argument("--runs", type=int, help="iter: repeats, each on a fresh array (default 5, --quick 2)")
    ap.add_argument("--calls", type=int, default=6, help="iter: calls per repeat")
    ap.add_argument("--iters", type=int, help="dirty, overwrite: calls measured (default 5, --quick 3)")
    ap.add_argument(
        "--pairs", type=int, help="overwrite: children per LAZYSHARE_CACHE value (default 3, --quick 1)"
    )
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: " + ",".join(PARTS))
    ap.add_argument("--mp", action="store_true", help="iter: include multiprocessing.Pool (slow)")
    ap.add_argument("--quick", action="store_true", help="256 MiB, fewer repeats")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for name, default, quick in (("size_mib", 1024, 256), ("runs", 5, 2), ("iters", 5, 3), ("pairs", 3, 1)):
        if getattr(args, name) is None:  # what is given explicitly wins over --quick
            setattr(args, name, quick if args.quick else default)
    n = args.size_mib * MiB // 8
    n -= n % N_TASKS
    if args.child:
        out = {"overwrite": child_overwrite, "memory": child_memory}[args.child](args, n)
        print(json.dumps(out))
        return 0
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(only) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")

    import lazyshare

    print(
        f"lazyshare from {os.path.dirname(lazyshare.__file__)}, rung {lazyshare.capabilities().mode}; "
        f"array {args.size_mib} MiB float64; "
        f"LAZYSHARE_CACHE={cache_env()} in this process; medians\n"
    )
    runners = {"iter": part_iter, "dirty": part_dirty, "overwrite": part_overwrite, "memory": part_memory}
    status = 0
    for part in PARTS:
        if part not in only:
            continue
        t = time.perf_counter()
        try:
            runners[part](args, n)
        except WrongResult as e:
            print(f"WRONG RESULT: {e}", file=sys.stderr, flush=True)
            status = 1
        except Exception as e:  # a failed part is an error; the others still run
            print(f"{part} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            status = 1
        print(f"  ({part}: {time.perf_counter() - t:.0f} s)\n", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
