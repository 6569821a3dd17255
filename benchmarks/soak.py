"""Soak: many tasks reading random slices of one big array through lazyshare.Pool,
with worker churn (maxtasksperchild) and workers SIGKILLed at random.

Every result that comes back is checked in the parent against numpy on the
original array (crc32 of the slice's bytes and its sum); every failure must be
the WorkerLostError of a worker this script killed. Prints tasks, kills,
failures, wrong results (must be 0) and the parent's RSS at start and end.

    python benchmarks/soak.py                       # 20,000 tasks over 4 GiB
    python benchmarks/soak.py --tasks 1000 --size-gib 0.25 --kill-every 150
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(HERE), "tests"), os.path.dirname(HERE)]

import _fault_funcs as ff  # noqa: E402

from lazyshare.errors import WorkerLostError  # noqa: E402
from lazyshare.pool import Pool  # noqa: E402


def run(
    tasks=20_000,
    size_gib=4.0,
    kill_every=300,
    maxtasksperchild=50,
    processes=2,
    max_slice=1 << 18,
    seconds=None,
    window=32,
    seed=0,
    log=print,
) -> dict:
    rng = np.random.default_rng(seed)
    rnd = random.Random(seed)
    n = int(size_gib * (1 << 30)) // 8
    t0 = time.monotonic()
    a = np.empty(n)
    rng.random(out=a)
    log(f"array: {a.nbytes / (1 << 30):.2f} GiB filled in {time.monotonic() - t0:.1f}s")
    rss_start = ff.rss_bytes()
    out = dict(tasks=0, ok=0, kills=0, failures=0, expected_failures=0, wrong=0, unexpected=[])
    killed: set[int] = set()
    next_kill = rnd.randint(kill_every // 2, kill_every * 3 // 2) if kill_every else None
    deadline = None if seconds is None else time.monotonic() + seconds
    t1 = time.monotonic()
    with Pool(processes, maxtasksperchild=maxtasksperchild) as pool:
        inflight = []
        submitted = 0

        def collect(item):
            lo, hi, r = item
            out["tasks"] += 1
            try:
                got = r.get(120)
            except WorkerLostError as e:
                out["failures"] += 1
                if e.pid in killed and e.exitcode == -signal.SIGKILL:
                    out["expected_failures"] += 1
                else:
                    out["unexpected"].append(repr(e))
                return
            except Exception as e:  # anything else is a bug
                out["failures"] += 1
                out["unexpected"].append(repr(e))
                return
            if got == ff.expected(a, lo, hi):
                out["ok"] += 1
            else:
                out["wrong"] += 1

        while submitted < tasks and (deadline is None or time.monotonic() < deadline):
            lo = int(rng.integers(0, n - 1))
            hi = min(n, lo + int(rng.integers(1, max_slice)))
            inflight.append((lo, hi, pool.apply_async(ff.slice_check, (a, lo, hi))))
            submitted += 1
            if len(inflight) >= window:
                collect(inflight.pop(0))
            if next_kill is not None and submitted >= next_kill:
                victims = [p.pid for p in pool._pool if p.exitcode is None and p.pid]
                if victims:
                    pid = rnd.choice(victims)
                    killed.add(pid)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        out["kills"] += 1
                    except ProcessLookupError:
                        pass
                next_kill = submitted + rnd.randint(kill_every // 2, kill_every * 3 // 2)
            if submitted % 2000 == 0:
                log(f"  {submitted} submitted, {out['kills']} kills, {time.monotonic() - t1:.0f}s")
        for item in inflight:
            collect(item)
        out["bytes_lazy"] = pool.stats()["totals"]["bytes_lazy"]
    out["seconds"] = time.monotonic() - t1
    out["rss_start"], out["rss_end"] = rss_start, ff.rss_bytes()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--kill-every", type=int, default=300, help="tasks between kills, on average (0: none)")
    ap.add_argument("--maxtasksperchild", type=int, default=50)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--max-slice", type=int, default=1 << 18, help="elements per slice, at most")
    ap.add_argument("--seconds", type=float, default=None, help="stop submitting after this long")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    r = run(
        tasks=args.tasks,
        size_gib=args.size_gib,
        kill_every=args.kill_every,
        maxtasksperchild=args.maxtasksperchild,
        processes=args.processes,
        max_slice=args.max_slice,
        seconds=args.seconds,
        seed=args.seed,
    )
    print(
        f"tasks {r['tasks']}  ok {r['ok']}  kills {r['kills']}  failures {r['failures']} "
        f"(WorkerLostError of a killed worker: {r['expected_failures']})  wrong results {r['wrong']}  "
        f"unexpected failures {len(r['unexpected'])}"
    )
    print(
        f"time {r['seconds']:.1f}s  bytes moved lazily {r['bytes_lazy'] / (1 << 20):.0f} MiB  "
        f"parent RSS start {r['rss_start'] / (1 << 20):.0f} MiB  end {r['rss_end'] / (1 << 20):.0f} MiB"
    )
    for u in r["unexpected"][:10]:
        print("  unexpected:", u)
    return 1 if r["wrong"] or r["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
