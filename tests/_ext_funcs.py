"""Functions run by workers in tests/test_executor.py, test_joblib_backend.py and
test_progress.py (importable by reference)."""

from __future__ import annotations

import os
import pathlib
import time


def slice_sum(a, lo, hi):
    return float(a[lo:hi].sum())


def array_info(a):
    """What the worker received: its type and whether it is writable."""
    return type(a).__name__, bool(a.flags.writeable)


def mul(x, y=1):
    return x * y


def div(x, y):
    return x / y


def sleep_return(seconds, value=None):
    time.sleep(seconds)
    return value


def pid_then_sleep(path, seconds):
    """Write this worker's pid to path, then sleep: a target to kill."""
    tmp = pathlib.Path(f"{path}.tmp")
    tmp.write_text(str(os.getpid()))
    tmp.rename(path)
    time.sleep(seconds)
    return os.getpid()


def getpid():
    return os.getpid()
