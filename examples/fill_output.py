"""Tasks fill a shared output array in place, lazyshare.Pool beside
multiprocessing.Pool returning the pieces.

    python examples/fill_output.py [--rows 262144] [--cols 512] [--tasks 16] [--processes 2] [--no-stdlib]

A feature matrix ``X`` (rows x cols float64, 1 GiB by default) is standardized
row block by row block: task i writes ``(X[b] - mean) / std`` of its block of
rows into the output ``Z``. With lazyshare, ``Z = lazyshare.shared(np.empty_like(X))``
is passed to every task and each task's writes are merged into it before its
result is delivered; no piece is returned. With multiprocessing.Pool each task
returns its block (pickled back) and the parent concatenates them. The two
outputs must be identical.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np
from _compare import fmt_bytes, stdlib_bytes

import lazyshare


def standardize_into(X: np.ndarray, Z: np.ndarray, i: int, tasks: int) -> int:
    b = slice(i * len(X) // tasks, (i + 1) * len(X) // tasks)
    block = X[b]
    Z[b] = (block - block.mean(axis=1, keepdims=True)) / (block.std(axis=1, keepdims=True) + 1e-12)
    return i


def standardized(X: np.ndarray, i: int, tasks: int) -> np.ndarray:
    b = slice(i * len(X) // tasks, (i + 1) * len(X) // tasks)
    block = X[b]
    return (block - block.mean(axis=1, keepdims=True)) / (block.std(axis=1, keepdims=True) + 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=262144)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--no-stdlib", action="store_true")
    args = ap.parse_args()
    X = np.random.default_rng(0).standard_normal((args.rows, args.cols))
    work = range(args.tasks)

    Z = lazyshare.shared(np.empty_like(X))
    with lazyshare.Pool(args.processes) as pool:
        pool.map(abs, range(args.processes))  # workers started before the clock
        t = time.perf_counter()
        pool.starmap(standardize_into, [(X, Z, i, args.tasks) for i in work])
        ls_time = time.perf_counter() - t
        st = pool.stats()
    moved = st["totals"]["bytes_lazy"] + st["outputs"]["bytes_sent"]
    print(f"lazyshare.Pool        {ls_time:.2f}s  {fmt_bytes(moved)} (lazy in + written back)")
    if args.no_stdlib:
        return
    with multiprocessing.get_context("forkserver").Pool(args.processes) as mpool:
        mpool.map(abs, range(args.processes))
        t = time.perf_counter()
        parts = mpool.starmap(standardized, [(X, i, args.tasks) for i in work])
        Z2 = np.concatenate(parts)
        mp_time = time.perf_counter() - t
    assert np.array_equal(Z, Z2), "the outputs differ"
    pickled = stdlib_bytes([(X, i, args.tasks) for i in work], args.processes) + Z2.nbytes
    print(f"multiprocessing.Pool  {mp_time:.2f}s  {fmt_bytes(pickled)} (pickled: X to the tasks, Z back)")
    print(f"identical outputs; lazyshare {mp_time / ls_time:.1f}x faster")


if __name__ == "__main__":
    main()
