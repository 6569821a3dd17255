"""Block-bootstrap confidence interval over a long time series, lazyshare.Pool
beside multiprocessing.Pool.

    python examples/bootstrap.py [--size-mib 1024] [--tasks 32] [--replicates 10]
                                 [--blocks 16] [--block-len 16384] [--processes 2] [--no-stdlib]

A long series of daily returns (float64, 1 GiB by default) is resampled with the
moving-block bootstrap: a replicate glues together ``blocks`` randomly placed
windows of ``block-len`` consecutive samples and computes the mean and the 1%
quantile (value at risk) of that sample. Each task computes ``replicates``
replicates with its own seed, and the parent turns all of them into 95% intervals.

Each task touches only the blocks it drew: random subsets, spread over the whole
series. multiprocessing.Pool pickles the whole series into every chunk of tasks;
lazyshare.Pool fetches the pages of the drawn blocks.
"""

from __future__ import annotations

import argparse

import numpy as np
from _compare import compare, fmt_bytes


def replicates(series: np.ndarray, seed: int, count: int, blocks: int, block_len: int) -> np.ndarray:
    """``count`` bootstrap replicates: an array of (mean, 1% quantile) rows."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, 2))
    for r in range(count):
        starts = rng.integers(0, len(series) - block_len, size=blocks)
        sample = np.concatenate([series[s : s + block_len] for s in starts])
        out[r] = sample.mean(), np.quantile(sample, 0.01)
    return out


def make_series(size_mib: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = (size_mib << 20) // 8
    # returns with a little autocorrelation: why a *block* bootstrap
    noise = rng.standard_normal(n) * 0.01
    noise[1:] += 0.2 * noise[:-1]
    return noise


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--replicates", type=int, default=10, help="replicates per task")
    ap.add_argument("--blocks", type=int, default=16, help="blocks per replicate")
    ap.add_argument("--block-len", type=int, default=16384, help="samples per block")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--no-stdlib", action="store_true", help="skip multiprocessing.Pool")
    args = ap.parse_args(argv)

    series = make_series(args.size_mib)
    work = [(series, seed, args.replicates, args.blocks, args.block_len) for seed in range(args.tasks)]
    print(
        f"block bootstrap over a {fmt_bytes(series.nbytes)} series: {args.tasks} tasks x "
        f"{args.replicates} replicates x {args.blocks} blocks of {args.block_len} samples"
    )
    rows = compare(replicates, work, processes=args.processes, stdlib=not args.no_stdlib, same=same)
    reps = np.concatenate(rows[0]["result"])
    assert np.array_equal(rows[0]["result"][1], replicates(*work[1]))
    lo, hi = np.quantile(reps[:, 0], [0.025, 0.975])
    vlo, vhi = np.quantile(reps[:, 1], [0.025, 0.975])
    print(f"95% interval of the mean: [{lo:.2e}, {hi:.2e}]; of the 1% quantile: [{vlo:.4f}, {vhi:.4f}]")
    return rows


if __name__ == "__main__":
    main()
