"""Code run by pool workers and helper processes in tests/test_faults.py,
tests/test_leaks.py and tests/test_soak.py (importable by reference)."""

from __future__ import annotations

import os
import sys
import time
import zlib

import numpy as np

PAGE = 4096


# ---------------------------------------------------------------- pool task functions


def slice_check(a, lo, hi):
    """What the parent checks a slice against: exact bytes (crc32) and the sum."""
    s = a[lo:hi]
    return zlib.crc32(memoryview(np.ascontiguousarray(s)).cast("B")), float(s.sum())


def expected(a, lo, hi):
    return slice_check(a, lo, hi)


def sum_all(a):
    return float(a.sum())


def sum_with(a, _other):
    return float(a[:: PAGE // a.itemsize].sum())


def segfault(a=None):
    """Touch some lazy pages (if given), then crash inside native code."""
    import ctypes

    if a is not None:
        float(a[:: PAGE // a.itemsize][:64].sum())
    ctypes.string_at(0)  # SIGSEGV in libc's memcpy / strlen
    return "survived"


def read_forever(a, path):
    """Fault random single pages of ``a`` forever (a request is almost always in
    flight), after writing this worker's pid to ``path``."""
    per_page = PAGE // a.itemsize
    npages = a.size // per_page
    k = 0
    x = 0.0
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    while True:
        k = (k * 7919 + 104729) % npages
        x += a[k * per_page]


class FailsToUnpickle:
    """Pickles in the parent; rebuilding it (in the worker) raises."""

    def __reduce__(self):
        return (_refuse_to_unpickle, ("deliberately not unpicklable",))


def _refuse_to_unpickle(msg):
    raise ValueError(msg)


class ResultFailsToUnpickle:
    """A result that pickles in the worker but cannot be rebuilt in the parent."""

    def __reduce__(self):
        return (_refuse_to_unpickle, ("result deliberately not unpicklable",))


def return_unloadable_result(_=None):
    return ResultFailsToUnpickle()


class CannotPickle:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this argument")


def proc_counts(_=None):
    """(pid, open fds, mapping lines, threads) of the calling worker."""
    return (os.getpid(), *proc_counts_of(os.getpid()))


def proc_counts_of(pid):
    nfd = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        nmaps = sum(1 for _ in f)
    nthreads = len(os.listdir(f"/proc/{pid}/task"))
    return nfd, nmaps, nthreads


def rss_bytes(pid="self"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def kernel_paths(a):
    """On the user-mode-only rung: what each kernel access to a not-yet-touched
    lazy page does, then the same after materialize(). Returns a dict."""
    import socket
    import tempfile

    import lazyshare

    out = {}
    d = tempfile.mkdtemp()
    n = a.size

    def attempt(name, fn):
        try:
            ok = fn()
            out[name] = "ok" if ok else "WRONG"
        except OSError as e:
            out[name] = f"OSError:{e.errno}:{e}"

    def do_write():
        r, w = os.pipe()
        try:
            data = a[:512]
            k = os.write(w, data)
            return os.read(r, k) == data.tobytes()[:k] and k > 0
        finally:
            os.close(r)
            os.close(w)

    def do_tofile():
        p = os.path.join(d, "t.bin")
        a.tofile(p)
        return np.array_equal(np.fromfile(p, dtype=a.dtype), a)

    def do_save():
        p = os.path.join(d, "t.npy")
        np.save(p, a)
        return np.array_equal(np.load(p), a)

    def do_send():
        s1, s2 = socket.socketpair()
        try:
            data = a[:512]
            s1.sendall(data)
            got = b""
            while len(got) < data.nbytes:
                got += s2.recv(1 << 16)
            return got == data.tobytes()
        finally:
            s1.close()
            s2.close()

    for name, fn in [("os.write", do_write), ("tofile", do_tofile), ("np.save", do_save), ("send", do_send)]:
        attempt(name, fn)
    lazyshare.materialize(a)
    for name, fn in [("os.write", do_write), ("tofile", do_tofile), ("np.save", do_save), ("send", do_send)]:
        attempt(name + "+materialize", fn)
    out["n"] = n
    out["mode"] = lazyshare.capabilities().mode
    return out


def kernel_paths_child(desc, q):
    import lazyshare

    q.put(kernel_paths(lazyshare.attach(desc)))


def tofile_task(a, path):
    a.tofile(path)


# ---------------------------------------------------------------- helper process mains


def consumer_main():
    """argv: consumer <desc hex>. Attach, print the fault thread's tid, wait for a
    line on stdin, touch pages and print what was read (never reached on a
    fatal page error)."""
    import pickle

    import lazyshare

    desc = pickle.loads(bytes.fromhex(sys.argv[2]))
    a = lazyshare.attach(desc)
    tid = next(
        int(t)
        for t in os.listdir("/proc/self/task")
        if open(f"/proc/self/task/{t}/comm").read().strip() == "lazyshare-fault"
    )
    print(f"attached {tid}", flush=True)
    sys.stdin.readline()
    t0 = time.monotonic()
    v = a[:: PAGE // a.itemsize].sum()
    print(f"read {float(v)!r} after {time.monotonic() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    {"consumer": consumer_main}[sys.argv[1]]()
