"""Functions run by pool workers in tests/test_pool*.py (importable by reference)."""

from __future__ import annotations

import os
import threading
import time


class Counted:
    pass


class SayWhenError(ValueError):
    pass


def sqr(x, wait=0.0):
    time.sleep(wait)
    return x * x


def mul(x, y):
    return x * y


def identity(x):
    return x


def getpid(_=None):
    return os.getpid()


def pid_after(seconds):
    time.sleep(seconds)
    return os.getpid()


def raising():
    raise KeyError("key")


def raise_runtime():
    raise RuntimeError(123)  # some comment


def raise_large_valueerror(wait):
    time.sleep(wait)
    raise ValueError("x" * 1024**2)


def unpicklable_result(_=None):
    return threading.Lock()


class UnpicklableError(Exception):
    def __init__(self):
        super().__init__("has a lock")
        self.lock = threading.Lock()


def raise_unpicklable():
    raise UnpicklableError()


class BadInitError(Exception):
    """Pickles, but cannot be rebuilt: __init__ needs two arguments."""

    def __init__(self, a, b):
        super().__init__(a)


def raise_bad_init():
    raise BadInitError("a", "b")


class CannotPickle:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")


def exception_throwing_generator(total, when):
    if when == -1:
        raise SayWhenError("Somebody said when")
    for i in range(total):
        if i == when:
            raise SayWhenError("Somebody said when")
        yield i


def pid_then_sleep(path, seconds):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return "slept"


def die(code):
    os._exit(code)


def exit_in_task():
    raise SystemExit(3)


_initialized = None


def initializer(value):
    global _initialized
    _initialized = value


def get_initialized(_=None):
    return _initialized


def failing_initializer():
    raise RuntimeError("initializer failed on purpose")


def sleep(seconds):
    time.sleep(seconds)
    return seconds


def part_sum(a, i, n):
    k = len(a) // n
    return float(a[i * k : (i + 1) * k].sum())


def first(a):
    return float(a.flat[0])


def first_nested(d):
    return first(d["deep"][0])


def add_one_inplace(a):
    a += 1  # arguments arrive writable, as after unpickling
    return a


def sparse_sum(a, step):
    """Sum one element every `step`: touches len(a)/step pages at most."""
    return float(a[::step].sum())


def frame_stats(df, key):
    return float(df[key].sum()), len(df), type(df).__name__


def write_then_sum(a):
    """Write into the (private) argument, then read it back."""
    a[:1000] = -1.0
    return float(a[:2000].sum()), bool(a.flags.writeable)


def lazy_stats(_=None):
    from lazyshare import handler

    return handler.stats()


def budget_pass(a):
    """Read a lazily attached array twice, writing two elements; report this
    worker's RSS growth during the task and what its handler dropped."""
    from lazyshare import handler

    def rss():
        with open("/proc/self/status") as fh:
            return next(int(x.split()[1]) * 1024 for x in fh if x.startswith("VmRSS"))

    before = rss()
    a[3] = -1.0
    s1 = float(a.sum())
    grew = rss() - before
    s2 = float(a.sum())
    return s1, s2, float(a[3]), grew, handler.stats()["bytes_dropped"]


def head_tail(a, seconds=0.0):
    """a[0] + a[-1] after ``seconds``: a task that touches two pages of its array."""
    time.sleep(seconds)
    return float(a[0]) + float(a[-1])


def first_when(a, path):
    """a[0], once ``path`` exists (None: at once): the test says when."""
    while path is not None and not os.path.exists(path):
        time.sleep(0.005)
    return float(a.flat[0])


_stash: list = []


def stash(a):
    """Keep the (lazily attached) argument past the task; a[0]."""
    _stash.append(a)
    return float(a[0])


def stash_sum():
    return sum(float(x.sum()) for x in _stash)


def stash_drop():
    _stash.clear()
    return True
