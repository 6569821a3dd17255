"""Per-chunk feature extraction over a large 2-D array, lazyshare.Pool beside
multiprocessing.Pool.

    python examples/feature_extraction.py [--rows 2000000] [--cols 64] [--chunks 32]
                                          [--processes 2] [--no-stdlib]

A (rows x cols) float64 matrix (1 GiB by default) is cut into blocks of rows; each
task computes summary features of one block (per-column mean, std, min, max and a
3-sigma outlier count). Every task receives the whole matrix and the bounds of its
block, as code written for a single process would be called. multiprocessing.Pool
pickles the matrix into every chunk of tasks; lazyshare.Pool maps it into each
worker and pulls only the pages of that task's block.
"""

from __future__ import annotations

import argparse

import numpy as np
from _compare import compare, fmt_bytes


def features(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Features of rows [lo, hi): a (5, cols) array."""
    block = x[lo:hi]
    mu = block.mean(axis=0)
    sd = block.std(axis=0)
    outliers = (np.abs(block - mu) > 3 * sd).sum(axis=0)
    return np.stack([mu, sd, block.min(axis=0), block.max(axis=0), outliers])


def make_work(rows: int, cols: int, chunks: int, seed: int = 0) -> tuple[np.ndarray, list[tuple]]:
    x = np.random.default_rng(seed).standard_normal((rows, cols))
    edges = np.linspace(0, rows, chunks + 1, dtype=int)
    return x, [(x, int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--cols", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--no-stdlib", action="store_true", help="skip multiprocessing.Pool")
    args = ap.parse_args(argv)

    x, work = make_work(args.rows, args.cols, args.chunks)
    print(
        f"features of {args.chunks} row blocks of a {args.rows} x {args.cols} array ({fmt_bytes(x.nbytes)})"
    )
    rows = compare(features, work, processes=args.processes, stdlib=not args.no_stdlib, same=same)
    assert np.array_equal(rows[0]["result"][-1], features(*work[-1]))
    return rows


if __name__ == "__main__":
    main()
