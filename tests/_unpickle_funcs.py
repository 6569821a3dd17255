"""Worker functions for tests/test_executor.py and tests/test_pool.py: results that
fail to unpickle in the parent only, arguments that fail to unpickle in the
worker only, objects to weak-reference, errors ProcessPoolExecutor's tests use."""

from __future__ import annotations

import os
import sys


class _Raises:
    """Pickles fine; unpickling raises ``exc`` in the process ``pid`` only (the
    parent), so the worker, which pickles it, is not affected."""

    def __init__(self, pid: int, exc: BaseException):
        self.pid = pid
        self.exc = exc

    def __reduce__(self):
        return _rebuild, (self.pid, self.exc)


def _rebuild(pid: int, exc: BaseException):
    if os.getpid() == pid:
        raise exc
    return _Raises(pid, exc)


def exit_in_parent(parent_pid: int, code: int = 3):
    """A result whose unpickling calls sys.exit() in the parent."""
    return _Raises(parent_pid, SystemExit(code))


def interrupt_in_parent(parent_pid: int):
    return _Raises(parent_pid, KeyboardInterrupt())


def error_in_parent(parent_pid: int):
    import pickle

    return _Raises(parent_pid, pickle.UnpicklingError("refuses to unpickle in the parent"))


def in_worker(parent_pid: int) -> bool:
    return os.getpid() != parent_pid


def exit_now(code: int = 5):
    sys.exit(code)


class Thing:
    """An object that can be weakly referenced, travelling by reference."""

    def __init__(self, payload: bytes = b""):
        self.payload = payload


def make_thing(n: int = 0) -> Thing:
    return Thing(b"x" * n)


def same(x):
    return x


def touch(x) -> int:
    """Uses its argument, returns something small."""
    return len(getattr(x, "payload", b"")) if not hasattr(x, "nbytes") else int(x.nbytes)


class ErrorAtPickle:
    """Fails to pickle (in the worker, as a result): CPython's test_deadlock's."""

    def __reduce__(self):
        import pickle

        raise pickle.PicklingError("Error in pickle")


class ExitAtPickle:
    def __reduce__(self):
        sys.exit(1)


def return_instance(cls):
    return cls()


def unpicklable_result():
    import threading

    return threading.Lock()


def raise_interrupt():
    raise KeyboardInterrupt


def getpid():
    return os.getpid()


_calls = 0


def call_number(_=None) -> int:
    """How many calls this worker has run, this one included."""
    global _calls
    _calls += 1
    return _calls


class _RaisesInWorker:
    """Pickles fine in the parent; unpickling raises ``exc`` anywhere else."""

    def __init__(self, parent_pid: int, exc: BaseException):
        self.parent_pid = parent_pid
        self.exc = exc

    def __reduce__(self):
        return _rebuild_in_worker, (self.parent_pid, self.exc)


def _rebuild_in_worker(parent_pid: int, exc: BaseException):
    if os.getpid() != parent_pid:
        raise exc
    return _RaisesInWorker(parent_pid, exc)


def failing_initializer():
    raise RuntimeError("initializer failed on purpose")
