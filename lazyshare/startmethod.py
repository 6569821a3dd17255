"""Start-method policy: which ``multiprocessing`` context a pool's workers start
with, and how many workers a pool has by default.

Called by ``Pool.__init__`` in the caller's thread.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings


def cpu_count() -> int:
    """The default number of workers: the CPUs this process may use."""
    n = getattr(os, "process_cpu_count", os.cpu_count)()
    return n or 1


def resolve_context(context):
    """The context workers start with: forkserver by default (spawn where there
    is none), the caller's otherwise, except fork, which is replaced by
    forkserver with a ``RuntimeWarning`` (``stacklevel`` points at the caller
    of ``Pool()``)."""
    if context is None:
        try:
            return multiprocessing.get_context("forkserver")
        except ValueError:  # no forkserver on this platform
            return multiprocessing.get_context("spawn")
    if context.get_start_method() == "fork":
        warnings.warn(
            "lazyshare.Pool does not use the 'fork' start method: the parent runs native "
            "threads (page server, ZeroMQ I/O) that fork() cannot copy safely, and a forked "
            "child would silently lose userfaultfd registrations; using 'forkserver' instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return multiprocessing.get_context("forkserver")
    return context
