"""scikit-learn's ``n_jobs`` on the "lazyshare" joblib backend beside loky, in one run.

    python benchmarks/bench_sklearn.py [--size-mib N] [--runs 3] [--jobs 2] [--quick]
                                       [--workloads cv,grid,perm]

One ``X`` (1,000,000 x 128 float64 by default, 977 MiB; ``--size-mib`` sets its size)
and ``y``; each workload runs under ``parallel_config(backend=..., n_jobs=2)``:

  cv     cross_val_score(Ridge(), X, y, cv=4) (as cross_validate, to read fold times)
  grid   GridSearchCV(Ridge(), {"alpha": [0.1, 1, 10, 100]}, cv=3, refit=False).fit(X, y)
  perm   permutation_importance(ridge, X, y, n_repeats=3, max_samples=0.01): 128
         tasks, each gathering the same 1% of X's rows, scattered

Both backends run every workload once on a small ``X`` first (workers started,
scikit-learn imported in them) and report their workers' BLAS thread count; what
is timed is the call itself, including what the backend does per call (loky: dump
``X`` and ``y`` to a memmap in /dev/shm; lazyshare: start a pool if it does not
reuse one). Runs alternate the backends' order. Results must agree between
backends (printed: bit-identical or the largest relative difference).

Bytes moved per call: lazyshare's counted (bytes its page server served, pickled
task messages from ``LazyshareBackend.stats()``), with the workers it started for
the call; loky's computed (the arrays over ``max_nbytes`` it dumps once per
``Parallel`` call; workers then read the memmap from the page cache). For cv, the
median time of one fold inside a worker (fit + score, page faults included) is
printed per backend, and the CPU seconds of the whole process tree per call (the
parent's page server and loky's dump included; less sensitive than wall time to
other load on the machine). Figures are medians; the ratio is loky's time / lazyshare's
(above 1: lazyshare is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

COLS = 128


def make_data(rows: int):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, COLS))
    w = rng.standard_normal(COLS)
    y = X @ w + 0.1 * rng.standard_normal(rows)
    return X, y


#: worker-side seconds of the last cv call: fit (page faults included) + score
WORKER_SECONDS: list[float] = []


def wl_cv(X, y, jobs):
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import cross_validate

    # cross_val_score is cross_validate(...)["test_score"]; the fold times are kept
    r = cross_validate(Ridge(), X, y, cv=4, n_jobs=jobs)
    WORKER_SECONDS[:] = list(r["fit_time"] + r["score_time"])
    return np.asarray(r["test_score"])


def wl_grid(X, y, jobs):
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV

    gs = GridSearchCV(Ridge(), {"alpha": [0.1, 1.0, 10.0, 100.0]}, cv=3, refit=False, n_jobs=jobs)
    gs.fit(X, y)
    return np.asarray(gs.cv_results_["mean_test_score"])


def wl_perm(X, y, jobs, model):
    from sklearn.inspection import permutation_importance

    r = permutation_importance(model, X, y, n_repeats=3, max_samples=0.01, random_state=0, n_jobs=jobs)
    return np.asarray(r.importances)


def blas_threads():
    """Threads of the BLAS a worker runs (joblib's per-worker limit, if applied)."""
    from threadpoolctl import threadpool_info

    return max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=None)


#: arrays a workload hands to its Parallel call(s): what loky dumps per call
DUMPED = {"cv": ("X", "y"), "grid": ("X", "y"), "perm": ("X", "y")}


def _descendants(pid: int) -> list[int]:
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return out
    for k in kids:
        out.append(k)
        out.extend(_descendants(k))
    return out


def tree_cpu() -> float:
    """CPU seconds (user + system) of this process and its live descendants, with
    those of the children they reaped (a worker that exited counts through its
    parent, the fork server for lazyshare's): the parent's page server and loky's
    dump included. Less sensitive to other load on the machine than wall time."""
    total = 0
    for pid in [os.getpid(), *_descendants(os.getpid())]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def agree(a: np.ndarray, b: np.ndarray) -> str:
    if np.array_equal(a, b):
        return "bit-identical"
    if not np.allclose(a, b, rtol=1e-9, atol=1e-12):
        raise AssertionError(f"results differ:\n{a}\n{b}")
    rel = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))
    return f"max rel diff {rel:.1e}"


def fmt_mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=None, help="size of X (default: 1,000,000 rows)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--workloads", default="cv,grid,perm")
    ap.add_argument("--quick", action="store_true", help="64 MiB X, one run each: a fast check")
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.runs = args.size_mib or 64, 1
    rows = 1_000_000 if args.size_mib is None else (args.size_mib << 20) // (8 * COLS)

    import joblib
    import sklearn
    from joblib import parallel_config
    from sklearn.linear_model import Ridge

    import lazyshare
    import lazyshare.joblib
    from lazyshare.joblib import LazyshareBackend

    X, y = make_data(rows)
    model = Ridge().fit(X, y)
    arrays = {"X": X, "y": y}
    workloads = {
        "cv": lambda X, y: wl_cv(X, y, args.jobs),
        "grid": lambda X, y: wl_grid(X, y, args.jobs),
        "perm": lambda X, y: wl_perm(X, y, args.jobs, model),
    }
    names = [w for w in args.workloads.split(",") if w]
    print(
        f"lazyshare rung {lazyshare.capabilities().mode}; scikit-learn {sklearn.__version__}, "
        f"joblib {joblib.__version__}; X {rows:,} x {COLS} float64 ({fmt_mib(X.nbytes)}); "
        f"{args.jobs} jobs; medians of {args.runs} runs\n"
    )

    backend = LazyshareBackend()  # an instance: its stats() are the last call's counters
    peers = {"lazyshare": backend, "loky": "loky"}
    # warm-up: workers started and scikit-learn imported in them, by every workload
    Xs, ys = X[: 4 * 4096], y[: 4 * 4096]
    for b in peers.values():
        for name in names:
            with parallel_config(backend=b, n_jobs=args.jobs):
                workloads[name](Xs, ys)

    from joblib import Parallel, delayed

    for peer, b in peers.items():
        with parallel_config(backend=b, n_jobs=args.jobs):
            threads = set(Parallel()(delayed(blas_threads)() for _ in range(4 * args.jobs)))
        print(f"  {peer}: BLAS threads per worker {sorted(threads)}")
    print()

    times: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    moved: dict[str, list[tuple[int, int]]] = {}
    started: dict[str, list[int]] = {}
    fold: dict[str, list[float]] = {}
    seen = set((backend.stats() or {"workers": {}})["workers"])  # the warm-up's
    notes: dict[str, str] = {}
    for name in names:
        expect = None
        for run in range(args.runs):
            order = list(peers) if run % 2 == 0 else list(peers)[::-1]
            for peer in order:
                served = lazyshare.stats()["bytes_served"]
                with parallel_config(backend=peers[peer], n_jobs=args.jobs):
                    c = tree_cpu()
                    t = time.perf_counter()
                    out = workloads[name](X, y)
                    dt = time.perf_counter() - t
                    dc = tree_cpu() - c
                times.setdefault((name, peer), []).append(dt)
                cpu.setdefault((name, peer), []).append(dc)
                if peer == "lazyshare":
                    totals = (backend.stats() or {"totals": {}})["totals"]
                    lazy = lazyshare.stats()["bytes_served"] - served
                    moved.setdefault(name, []).append((lazy, totals.get("bytes_pickled", 0)))
                    pids = set((backend.stats() or {"workers": {}})["workers"])
                    started.setdefault(name, []).append(len(pids - seen))
                    seen |= pids
                if name == "cv":
                    fold.setdefault(peer, []).extend(WORKER_SECONDS)
                if expect is None:
                    expect = out
                else:
                    notes[name] = agree(out, expect)
                print(f"  {name:5} {peer:10} run {run + 1}: {dt:7.3f} s  ({dc:6.2f} CPU s)", flush=True)

    print()
    print(
        "| workload | lazyshare | loky | loky / lazyshare | CPU s, lazyshare / loky "
        "| lazyshare: fetched lazily, pickled | workers started per call | loky: dumped |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        lz = statistics.median(times[(name, "lazyshare")])
        lk = statistics.median(times[(name, "loky")])
        lazy = statistics.median(m[0] for m in moved[name])
        pickled = statistics.median(m[1] for m in moved[name])
        dumped = sum(arrays[a].nbytes for a in DUMPED[name] if arrays[a].nbytes >= 1 << 20)
        print(
            f"| {name} | {lz:.2f} s | {lk:.2f} s | {lk / lz:.2f}x "
            f"| {statistics.median(cpu[(name, 'lazyshare')]):.1f} / {statistics.median(cpu[(name, 'loky')]):.1f} "
            f"| {fmt_mib(lazy)}, {fmt_mib(pickled)} "
            f"| {statistics.median(started[name]):g} | {fmt_mib(dumped)} |"
        )
    print()
    for peer, secs in fold.items():
        print(f"  cv, one fold in a worker (fit + score), {peer}: median {statistics.median(secs):.2f} s")
    for name in names:
        print(f"  {name}: results {notes.get(name, 'one run only')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
