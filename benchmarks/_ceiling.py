"""The ceiling bench_core.py measures lazy materialization against: UFFDIO_COPY
from a local (cache-hot) buffer into a fresh registered mapping, in this thread.

Kept out of the library (it ships no benchmark code): plain ioctls through
ctypes. Their cost per call (a few microseconds, against about a millisecond
for the 4 MiB block bench_core.py copies by default) is inside the run-to-run
noise; ``python benchmarks/_ceiling.py`` compares blocks against one another.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import time

from _libc import libc  # mmap/munmap signatures set

libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc.syscall.restype = ctypes.c_long

PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x02, 0x20, 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value
O_CLOEXEC, O_NONBLOCK = os.O_CLOEXEC, os.O_NONBLOCK
UFFD_USER_MODE_ONLY = 1
SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(platform.machine())


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (0xAA << 8) | nr  # _IOWR(UFFDIO, nr, size)


class UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioRegister(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class UffdioCopy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    ]


UFFD_API = 0xAA
UFFDIO_API = _iowr(0x3F, ctypes.sizeof(UffdioApi))
UFFDIO_REGISTER = _iowr(0x00, ctypes.sizeof(UffdioRegister))
UFFDIO_COPY = _iowr(0x03, ctypes.sizeof(UffdioCopy))
UFFDIO_REGISTER_MODE_MISSING = 1
USERFAULTFD_IOC_NEW = 0xAA00  # _IO(0xAA, 0x00)


def _ioctl(fd: int, req: int, arg) -> int:
    rc = libc.ioctl(fd, req, ctypes.byref(arg) if arg is not None else None)
    return rc if rc >= 0 else -ctypes.get_errno()


def _open_uffd() -> int:
    """A ready userfaultfd: /dev/userfaultfd, else userfaultfd(2), else user-mode only."""
    candidates = []
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | O_CLOEXEC)
    except OSError:
        pass
    else:
        try:
            candidates.append(libc.ioctl(dev, USERFAULTFD_IOC_NEW, ctypes.c_void_p(O_CLOEXEC | O_NONBLOCK)))
        finally:
            os.close(dev)
    if SYS_USERFAULTFD is not None:
        for flags in (0, UFFD_USER_MODE_ONLY):
            candidates.append(libc.syscall(SYS_USERFAULTFD, O_CLOEXEC | O_NONBLOCK | flags))
    err = errno.ENOSYS
    for fd in candidates:
        if fd < 0:
            err = ctypes.get_errno() or err
            continue
        api = UffdioApi(api=UFFD_API)
        if _ioctl(fd, UFFDIO_API, api) == 0:
            for other in candidates:
                if other >= 0 and other != fd:
                    os.close(other)
            return fd
        os.close(fd)
    raise OSError(err, f"no userfaultfd: {os.strerror(err)}")


def uffd_copy_ns(length: int, block: int) -> int:
    """UFFDIO_COPY ``length`` bytes, ``block`` bytes per ioctl, from a local
    buffer into a fresh registered mapping; nanoseconds taken by the copies."""
    page = os.sysconf("SC_PAGESIZE")
    if not block or block % page or length % block:
        raise ValueError("block must be a whole number of pages dividing length")
    fd = _open_uffd()
    src = dst = None
    try:
        src = libc.mmap(None, block, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        dst = libc.mmap(
            None, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0
        )
        if src in (None, MAP_FAILED) or dst in (None, MAP_FAILED):
            raise MemoryError("mmap failed")
        ctypes.memset(src, 0x5A, block)
        reg = UffdioRegister(start=dst, len=length, mode=UFFDIO_REGISTER_MODE_MISSING)
        rc = _ioctl(fd, UFFDIO_REGISTER, reg)
        if rc < 0:
            raise OSError(-rc, f"UFFDIO_REGISTER: {os.strerror(-rc)}")
        cp = UffdioCopy(src=src, len=block)
        ioctl, ref = libc.ioctl, ctypes.byref(cp)
        off = 0
        t0 = time.perf_counter_ns()
        while off < length:
            cp.dst, cp.copy = dst + off, 0
            if ioctl(fd, UFFDIO_COPY, ref) < 0 and cp.copy <= 0:
                e = ctypes.get_errno()
                raise OSError(e, f"UFFDIO_COPY: {os.strerror(e)}")
            off += cp.copy if cp.copy > 0 else block
        return time.perf_counter_ns() - t0
    finally:
        if dst not in (None, MAP_FAILED):
            libc.munmap(dst, length)
        if src not in (None, MAP_FAILED):
            libc.munmap(src, block)
        os.close(fd)


def main() -> None:
    import statistics

    length = 256 << 20
    for block in (4 << 10, 64 << 10, 1 << 20, 4 << 20):
        ns = [uffd_copy_ns(length, block) for _ in range(5)]
        print(f"block {block >> 10:5d} KiB: {length / statistics.median(ns):6.2f} GB/s (median of 5)")


if __name__ == "__main__":
    main()
