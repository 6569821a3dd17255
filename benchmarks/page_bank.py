"""How much a worker-side page bank would save a contiguous fill of a shared
output (a probe for a design, not a benchmark of the library).

    python benchmarks/page_bank.py [--runs 5]

Two processes at once (2 workers), each filling eight fresh 64 MiB blocks (one
task's 1/16 of a 1 GiB output): today every block is a fresh private mapping,
each page faulted in and zeroed by the kernel; with a bank, the previous block's
pages are zeroed in user space and moved into the faulting 2 MiB block with
UFFDIO_MOVE by a handler thread (see _page_bank.c). Needs a C compiler and
Linux 6.8+ (UFFD_FEATURE_MOVE); prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run_pair(exe: str, mode: str) -> float:
    procs = [subprocess.Popen([exe, mode], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    times = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=120)
            if p.returncode:
                sys.exit(f"page_bank {mode} failed ({p.returncode})")
            times.append(float(out.split()[1]))
    finally:  # a failed or stuck one takes its twin with it
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return max(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        sys.exit("page_bank: needs a C compiler (cc)")
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "page_bank")
        subprocess.run(
            [cc, "-O2", "-Wall", "-Wextra", "-pthread", os.path.join(HERE, "_page_bank.c"), "-o", exe],
            check=True,
        )
        res: dict = {"fresh": [], "bank": []}
        for _ in range(args.runs):
            for mode in res:
                res[mode].append(run_pair(exe, mode))
    fresh, bank = (statistics.median(res[m]) for m in ("fresh", "bank"))
    print("# page_bank: 2 processes x 8 fills of 64 MiB, medians of", args.runs, "runs")
    print(f"fresh pages (today)          {fresh:.3f} s")
    print(f"pages from a bank            {bank:.3f} s   fresh/bank {fresh / bank:.2f}")
    print("all runs:", {m: [round(x, 3) for x in v] for m, v in res.items()})


if __name__ == "__main__":
    main()
