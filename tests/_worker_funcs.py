"""Functions run by pool workers in tests/test_pool_worker.py (importable by reference)."""

from __future__ import annotations

import os


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
