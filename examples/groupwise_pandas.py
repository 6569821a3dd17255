"""Group-wise computation over a large pandas DataFrame, lazyshare.Pool beside
multiprocessing.Pool.

    python examples/groupwise_pandas.py [--rows 16000000] [--stores 4000] [--tasks 32]
                                        [--processes 2] [--no-stdlib]

A sales table (one row per store and day; 10 columns, 1.1 GiB at the default size) is
sorted by store. Each task takes a range of stores and computes, per store, the
price elasticity of demand (slope of log units on log price), total revenue and
the share of promotion days: a ``groupby`` on its rows. Every task receives the
whole DataFrame and its row range.

pandas pickles a frame's column blocks out-of-band, so lazyshare.Pool exports them;
a task touches only its rows of the three columns it reads (pandas stores each
column of a block contiguously). multiprocessing.Pool pickles the whole frame into
every chunk of tasks.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from _compare import compare, fmt_bytes


def store_stats(df: pd.DataFrame, lo: int, hi: int) -> pd.DataFrame:
    """Per store in rows [lo, hi): elasticity, revenue, promo share."""
    part = df.iloc[lo:hi]
    x = np.log(part["price"].to_numpy())
    y = np.log(part["units"].to_numpy())
    g = pd.DataFrame(
        {"store": part["store"].to_numpy(), "x": x, "y": y, "xx": x * x, "xy": x * y, "n": 1.0}
    ).groupby("store", sort=True)
    s = g.sum()
    slope = (s["xy"] - s["x"] * s["y"] / s["n"]) / (s["xx"] - s["x"] ** 2 / s["n"])
    rev = part.groupby("store", sort=True)["revenue"].sum()
    promo = part.groupby("store", sort=True)["promo"].mean()
    return pd.DataFrame({"elasticity": slope, "revenue": rev, "promo_share": promo})


def make_frame(rows: int, stores: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    store = np.sort(rng.integers(0, stores, rows)).astype(np.int32)
    true_elasticity = rng.uniform(-2.5, -0.5, stores)[store]
    price = rng.uniform(1.0, 20.0, rows)
    promo = (rng.random(rows) < 0.1).astype(np.float64)
    units = np.exp(3.0 + true_elasticity * np.log(price) + 0.3 * promo + 0.1 * rng.standard_normal(rows))
    return pd.DataFrame(
        {
            "store": store,
            "day": (np.arange(rows) % 3650).astype(np.int32),
            "price": price,
            "units": units,
            "revenue": price * units,
            "promo": promo,
            "cost": price * rng.uniform(0.4, 0.8, rows),
            "stock": rng.uniform(0, 500, rows),
            "rating": rng.uniform(1, 5, rows),
            "visits": units * rng.uniform(2, 6, rows),
        }
    )


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(u.equals(v) for u, v in zip(a, b))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16_000_000)
    ap.add_argument("--stores", type=int, default=4000)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--no-stdlib", action="store_true", help="skip multiprocessing.Pool")
    args = ap.parse_args(argv)

    df = make_frame(args.rows, args.stores)
    # task boundaries fall between stores: each store is computed by one task
    cuts = np.searchsorted(df["store"].to_numpy(), np.linspace(0, args.stores, args.tasks + 1)[1:-1])
    edges = [0, *map(int, cuts), len(df)]
    work = [(df, lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
    size = df.memory_usage(index=False).sum()
    print(f"per-store statistics, {args.tasks} tasks over a {len(df)}-row DataFrame ({fmt_bytes(size)})")
    rows = compare(store_stats, work, processes=args.processes, stdlib=not args.no_stdlib, same=same)
    result = pd.concat(rows[0]["result"])
    assert len(result) == df["store"].nunique()
    assert result.equals(store_stats(df, 0, len(df)))
    print(f"median elasticity {result['elasticity'].median():.2f} over {len(result)} stores")
    return rows


if __name__ == "__main__":
    main()
