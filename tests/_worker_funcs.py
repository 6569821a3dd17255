"""Functions run by pool workers in tests/test_pool_worker.py (importable by reference)."""

from __future__ import annotations

import os
import sys
import threading


def identity(*args):
    return args[0] if len(args) == 1 else args


def write_first(*arrays):
    """Each array's writeable flag and its first element after writing 7 there."""
    out = []
    for a in arrays:
        w = bool(a.flags.writeable)
        if w:
            a.flat[0] = 7
        out.append((w, float(a.flat[0])))
    return out


def environ(*names):
    """These variables as the task sees them (None: unset), and the worker's pid."""
    return {n: os.environ.get(n) for n in names}, os.getpid()


def view(a, start, stop, step=1):
    return a[start:stop:step]


def raise_with(a):
    e = ValueError("carries its argument")
    e.array = a
    raise e


def rename(df):
    return df.rename(columns=str.upper)


def mode(_=None):
    import lazyshare

    return lazyshare.capabilities().mode


def fail_with_attached(desc):
    """An initializer that raises with an array attached lazily in the worker."""
    import lazyshare

    raise_with(lazyshare.attach(desc))


def write_untouched(a):
    """os.write of a lazy array none of whose pages the task touched."""
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        return os.write(fd, a)
    finally:
        os.close(fd)


def exit_with(code):
    sys.exit(code)


def interrupt():
    raise KeyboardInterrupt


def returns_lock():
    return threading.Lock()


class ExitsWhenPickled:
    def __reduce__(self):
        sys.exit(4)


def exits_when_pickled():
    return ExitsWhenPickled()


class LockedError(Exception):
    def __init__(self):
        super().__init__("carries a lock")
        self.lock = threading.Lock()


def raises_locked():
    raise LockedError


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(a)  # args == (a,): unpickling calls NeedsTwoArgs(a) and fails


def raises_needs_two():
    raise NeedsTwoArgs("a", "b")


def blas_threads(_=None):
    """The thread count of each BLAS library loaded here (threadpoolctl)."""
    import threadpoolctl

    return {
        i["internal_api"]: i["num_threads"]
        for i in threadpoolctl.threadpool_info()
        if i["user_api"] == "blas"
    }
