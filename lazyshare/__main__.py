"""``python -m lazyshare demo`` and ``python -m lazyshare doctor``."""

from __future__ import annotations

import argparse
import os
import platform
import stat
import sys

from lazyshare import settings


def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except (ImportError, KeyError):
        return str(uid)


def _group(gid: int) -> str:
    try:
        import grp

        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except (ImportError, KeyError):
        return str(gid)


def _my_groups() -> set[int]:
    return {os.getegid(), *os.getgroups()}


def _data_path(mode: str) -> str:
    if mode == "eager":
        return "wire (pages sent in the reply: no userfaultfd to hand to the owner)"
    if settings.read().data_path == "wire":
        return "wire (pages sent in the reply, as LAZYSHARE_DATA_PATH=wire asks)"
    return "install (the owner copies pages in through this process's userfaultfd)"


def _link_line() -> str:
    """What TLS links between hosts (lazyshare.link) would use here."""
    import ssl

    from . import link
    from .errors import LinkError

    try:
        crypto, libssl = link.openssl()
    except LinkError as e:
        return f"unavailable: {e}"
    return f"TLS 1.3 with {ssl.OPENSSL_VERSION} ({libssl}); silent links end after {settings.read().link_timeout:g} s"


def doctor(args) -> int:
    """Print the capability ladder on this machine and how to reach its best rung."""
    from lazyshare import handler
    from lazyshare.errors import CapabilityError

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
            f"/dev/userfaultfd: mode {stat.filemode(st.st_mode)}, owner {_user(st.st_uid)}, "
            f"group {_group(st.st_gid)} (this user is {'' if st.st_gid in _my_groups() else 'not '}"
            f"a member), usable by this process: {os.access('/dev/userfaultfd', os.R_OK | os.W_OK)}"
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
    forced = os.environ.pop("LAZYSHARE_MODE", None)
    try:
        best = handler._probe()  # what this machine gives, whatever LAZYSHARE_MODE says
    finally:
        if forced is not None:
            os.environ["LAZYSHARE_MODE"] = forced
    try:
        caps = handler._probe()
    except CapabilityError as e:
        print(f"\nLAZYSHARE_MODE: {e}")
        print(f"best rung available: {best.mode}\n  {best.reason}")
        return 2
    print(f"\nrung in use: {caps.mode}\n  {caps.reason}")
    in_use = caps.mode
    if caps.mode != best.mode:
        print(f"best rung available: {best.mode} (unset LAZYSHARE_MODE to use it)")
        caps = best
    print(
        f"  /dev/userfaultfd: {os.strerror(caps.devnode_errno) if caps.devnode_errno else 'ok'}; "
        f"userfaultfd(2): {os.strerror(caps.syscall_errno) if caps.syscall_errno else 'ok'}; "
        f"user-mode-only: {os.strerror(caps.usermode_errno) if caps.usermode_errno else 'ok'}"
    )
    print(f"data path: {_data_path(in_use)}")
    print(f"across calls: {_live_line(in_use)}")
    print(f"links to other hosts: {_link_line()}")
    if caps.mode == "uffd":
        print("\nThis machine gives the best rung: nothing to do.")
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


def _live_line(mode: str) -> str:
    """What calls keep, and what a task sees of the parent's writes, here."""
    from . import handler, settings

    if mode == "eager":
        return "nothing kept (each call exports afresh); no snapshot"
    if not settings.read().cache:
        return "nothing kept (LAZYSHARE_CACHE=0); no snapshot"
    rc = handler.lib.ls_track_supported()
    if rc < 0:
        return (
            f"page cache, but no write tracking ({os.strerror(-rc)}; needs Linux 6.7+): "
            "every call drops it; no snapshot"
        )
    if mode == "uffd":
        return (
            "page cache and write tracking; snapshots as of submission for numpy arrays that own "
            "their data (the parent's writes wait while their block is kept); other buffers: a "
            "write during a call is reported"
        )
    return (
        "page cache and write tracking; a write during a call is reported, not held back "
        "(a held-back kernel-mode write fails with EFAULT on this rung)"
    )


def demo(args) -> int:
    # The task function must be importable by the stdlib's workers: it lives in
    # lazyshare.demo, not in this __main__.
    from .demo import run

    return run(args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lazyshare")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="lazyshare.Pool beside multiprocessing.Pool on a generated array")
    d.add_argument("--size-mib", type=int, default=1024)
    d.add_argument("--tasks", type=int, default=4)
    d.add_argument("--processes", type=int, default=2)
    d.set_defaults(func=demo)
    s = sub.add_parser("doctor", help="which userfaultfd rung this machine gives, and how to get the best")
    s.set_defaults(func=doctor)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
