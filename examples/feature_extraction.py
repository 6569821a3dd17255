"""Per-chunk feature extraction over a large 2-D array, with lazyshare.Pool.

    python examples/feature_extraction.py [--rows 2000000] [--cols 64] [--chunks 32]

Each task computes summary features (mean, std, min, max, an outlier count) of
one block of rows. With multiprocessing.Pool every task would pickle the whole
array; with lazyshare.Pool each worker pulls only the pages of its own block.
The same code runs with multiprocessing.Pool for comparison (--stdlib).
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np

import lazyshare


def features(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    block = x[lo:hi]
    mu = block.mean(axis=0)
    sd = block.std(axis=0)
    outliers = (np.abs(block - mu) > 3 * sd).sum(axis=0)
    return np.stack([mu, sd, block.min(axis=0), block.max(axis=0), outliers])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--cols", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--stdlib", action="store_true", help="also run multiprocessing.Pool")
    args = ap.parse_args()

    x = np.random.default_rng(0).standard_normal((args.rows, args.cols))
    edges = np.linspace(0, args.rows, args.chunks + 1, dtype=int)
    work = [(x, int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]
    print(f"array {x.nbytes / 2**30:.2f} GiB, {args.chunks} chunks, 2 workers")

    t = time.perf_counter()
    with lazyshare.Pool(2) as pool:
        out = pool.starmap(features, work)
        st = pool.stats()["totals"]
    dt = time.perf_counter() - t
    print(
        f"lazyshare.Pool        {dt:7.2f} s   moved {st['bytes_lazy'] / 2**20:8.1f} MiB lazily, "
        f"pickled {st['bytes_pickled'] / 2**10:.1f} KiB"
    )
    check = features(*work[3])
    assert np.allclose(out[3], check)

    if args.stdlib:
        t = time.perf_counter()
        with multiprocessing.get_context("forkserver").Pool(2) as pool:
            out2 = pool.starmap(features, work)
        dt2 = time.perf_counter() - t
        print(f"multiprocessing.Pool  {dt2:7.2f} s   pickled {args.chunks * x.nbytes / 2**20:8.1f} MiB")
        assert all(np.allclose(a, b) for a, b in zip(out, out2))


if __name__ == "__main__":
    main()
