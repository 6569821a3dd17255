"""``python -m lazyshare demo`` and ``python -m lazyshare doctor``."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import platform
import stat
import sys
import time

import numpy as np


def _slice_mean(arr, i, n):
    """One task: the mean of the i-th of n sparse 1% slices of arr."""
    step = len(arr) // n
    part = arr[i * step : i * step + len(arr) // 100]
    return float(part.mean())


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def demo(args) -> int:
    import lazyshare

    n = args.tasks
    nbytes = args.size_mib << 20
    print(
        f"lazyshare demo: a {_fmt_bytes(nbytes)} float64 array, {n} tasks each averaging a "
        f"different 1% slice, {args.processes} workers"
    )
    caps = lazyshare.capabilities()
    print(f"paging: {caps.mode} — {caps.reason}\n")
    arr = np.random.default_rng(0).random(nbytes // 8)
    expected = [_slice_mean(arr, i, n) for i in range(n)]
    work = [(arr, i, n) for i in range(n)]

    t = time.perf_counter()
    with lazyshare.Pool(args.processes) as pool:
        got = pool.starmap(_slice_mean, work)
        st = pool.stats()
    t_lazy = time.perf_counter() - t
    assert got == expected, "lazyshare.Pool returned wrong results"
    moved_lazy = st["totals"]["bytes_lazy"] + st["totals"]["bytes_pickled"]

    ctx = multiprocessing.get_context("forkserver")
    moved_mp = sum(len(pickle.dumps(w, protocol=pickle.HIGHEST_PROTOCOL)) for w in work[:1]) * n
    t = time.perf_counter()
    with ctx.Pool(args.processes) as pool:
        got = pool.starmap(_slice_mean, work)
    t_mp = time.perf_counter() - t
    assert got == expected, "multiprocessing.Pool returned wrong results"

    print(f"{'':24}{'time':>10}{'bytes moved':>16}")
    print(f"{'multiprocessing.Pool':24}{t_mp:>9.2f}s{_fmt_bytes(moved_mp):>16}")
    print(f"{'lazyshare.Pool':24}{t_lazy:>9.2f}s{_fmt_bytes(moved_lazy):>16}")
    print(
        f"\nspeed-up {t_mp / t_lazy:.1f}x, {moved_mp / max(moved_lazy, 1):.0f}x fewer bytes moved "
        f"(lazy pages {_fmt_bytes(st['total']['bytes_lazy'])}, "
        f"pickled {_fmt_bytes(st['total']['bytes_pickled'])})"
    )
    return 0


def doctor(args) -> int:
    from lazyshare import handler

    print(f"kernel: {platform.release()} ({platform.machine()})")
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            sysctl = f.read().strip()
    except OSError:
        sysctl = "absent (kernel older than 5.2, or not Linux)"
    print(f"vm.unprivileged_userfaultfd: {sysctl}")
    try:
        st = os.stat("/dev/userfaultfd")
        print(
            f"/dev/userfaultfd: mode {stat.filemode(st.st_mode)}, uid {st.st_uid}, gid {st.st_gid}, "
            f"writable by this process: {os.access('/dev/userfaultfd', os.R_OK | os.W_OK)}"
        )
    except OSError as e:
        print(f"/dev/userfaultfd: {e.strerror} (needs Linux 6.1+)")
    seccomp = "unknown"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    seccomp = {"0": "off", "1": "strict", "2": "filter"}.get(line.split()[1], line.split()[1])
    except OSError:
        pass
    print(f"seccomp: {seccomp}")
    print(f"uid {os.getuid()}, euid {os.geteuid()}")
    caps = handler._probe()
    print(f"\nrung in use: {caps.mode}\n  {caps.reason}")
    print(
        f"  /dev/userfaultfd: {os.strerror(caps.devnode_errno) if caps.devnode_errno else 'ok'}; "
        f"userfaultfd(2): {os.strerror(caps.syscall_errno) if caps.syscall_errno else 'ok'}; "
        f"user-mode-only: {os.strerror(caps.usermode_errno) if caps.usermode_errno else 'ok'}"
    )
    if caps.mode == "uffd":
        print("\nBest rung: nothing to do.")
        return 0
    print("\nTo reach the best rung ('uffd'), one of:")
    print("  * give this user access to /dev/userfaultfd (Linux 6.1+), e.g. as root:")
    print(
        "      groupadd -f userfaultfd && chgrp userfaultfd /dev/userfaultfd && chmod 0660 /dev/userfaultfd"
    )
    print(
        f"      usermod -aG userfaultfd {os.environ.get('USER', '<user>')}   (a udev rule makes it permanent)"
    )
    print("  * or allow unprivileged userfaultfd system-wide: sysctl -w vm.unprivileged_userfaultfd=1")
    print("  * or grant CAP_SYS_PTRACE to the process.")
    if caps.mode == "eager":
        print(
            "  * in a container, allow the userfaultfd syscall in the seccomp profile "
            "(Docker's default profile blocks it)."
        )
    else:
        print(
            "\nOn the current rung, arrays are lazy but the kernel cannot wait for a missing page: call\n"
            "lazyshare.materialize(arr) before os.write/socket.send/arr.tofile of an attached array."
        )
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lazyshare")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="lazyshare.Pool beside multiprocessing.Pool on a generated array")
    d.add_argument("--size-mib", type=int, default=1024)
    d.add_argument("--tasks", type=int, default=8)
    d.add_argument("--processes", type=int, default=2)
    d.set_defaults(func=demo)
    s = sub.add_parser("doctor", help="which userfaultfd rung this machine gives, and how to get the best")
    s.set_defaults(func=doctor)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
