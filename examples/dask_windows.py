"""Random windows of a big array on a Dask cluster: lazyshare.dask beside
plain Dask, which pickles the array into the task graph.

    python examples/dask_windows.py [--size-mib 1024] [--tasks 16] [--windows 64] [--workers 2] [--no-plain]

Each task takes ``--windows`` random windows of 64 KiB from a float64 series
held by the client and returns their mean maxima (a block-maxima estimate).
With ``lazyshare.dask.install(client)`` the workers map the series and fetch
only the windows they read; with plain Dask, ``client.map`` puts the whole
series into the graph. The two must agree. Needs ``pip install 'lazyshare[dask]'``.
The cluster is a LocalCluster on this machine; on a real one, the same code
fetches pages over TLS links (see the README).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from _compare import fmt_bytes


def block_maxima(series: np.ndarray, seed: int, windows: int, width: int = 8192) -> float:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(series) - width, windows)
    return float(np.mean([series[s : s + width].max() for s in starts]))


def fetched(client) -> int:
    from lazyshare import handler

    return sum(client.run(lambda: handler.stats()["bytes_fetched"]).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-plain", action="store_true")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    import lazyshare.dask

    series = np.random.default_rng(0).standard_normal((args.size_mib << 20) // 8)
    seeds = range(args.tasks)
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            report = lazyshare.dask.install(client)
            rungs = sorted({r["rung"] for r in report.values()})
            before = fetched(client)
            t = time.perf_counter()
            lazy = client.gather(client.map(block_maxima, [series] * args.tasks, seeds, windows=args.windows))
            t_lazy = time.perf_counter() - t
            moved = fetched(client) - before
            print(
                f"lazyshare.dask  {t_lazy:8.3f}s  {fmt_bytes(moved)} fetched by the workers "
                f"(of a {fmt_bytes(series.nbytes)} series; rung {', '.join(rungs)})"
            )
            if not args.no_plain:
                lazyshare.dask.uninstall(client)
                t = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # dask: "Sending large graph"
                    plain = client.gather(
                        client.map(block_maxima, [series] * args.tasks, seeds, windows=args.windows)
                    )
                t_plain = time.perf_counter() - t
                print(f"dask (pickled)  {t_plain:8.3f}s  the series in the graph")
                assert lazy == plain, "the two runs disagree"
                print(f"{t_plain / t_lazy:.1f}x faster")
    print(f"mean block maximum over {args.tasks} tasks: {np.mean(lazy):.4f}")


if __name__ == "__main__":
    main()
