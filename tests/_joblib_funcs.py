"""Functions run by workers in tests/test_joblib_backend.py (importable by reference)."""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import threading
import warnings


def where():
    """(pid, thread name) of whoever runs the task."""
    return os.getpid(), threading.current_thread().name


def fail(x):
    raise ValueError(f"task {x} failed")


def wait_event(event, value=None, timeout=50.0):
    """Return ``value`` once ``event`` (a manager's Event) is set."""
    if not event.wait(timeout):
        raise TimeoutError("the event was never set")
    return value


def fail_init_if(path):
    """An initializer that fails while ``path`` exists."""
    if pathlib.Path(path).exists():
        raise RuntimeError("initializer told to fail")


def thread_env():
    """What joblib's thread limits look like in the worker."""
    return {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def nested(n):
    """Two Parallel calls inside a worker: one with the backend joblib hands down,
    one asking for the lazyshare backend by name."""
    from joblib import Parallel, delayed

    import lazyshare.joblib  # noqa: F401  (registers the backend in the worker)

    inner = Parallel(n_jobs=2)
    a = inner(delayed(abs)(-i) for i in range(n))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        by_name = Parallel(n_jobs=2, backend="lazyshare")
        b = by_name(delayed(abs)(-i) for i in range(n))
    return {
        "daemon": multiprocessing.current_process().daemon,
        "inner": (type(inner._backend).__name__, a),
        "by_name": (type(by_name._backend).__name__, b),
        "warnings": [str(w.message) for w in caught],
    }
