"""lazyshare: process pools that stop pickling big data.

Large numpy arrays in a task's arguments are mapped into the worker as missing
pages; a native userfaultfd handler pulls only the pages the task touches from
the parent over ZeroMQ. See README.md for the design and the guarantees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import (
    BrokenWorkerError,
    CapabilityError,
    LazyshareError,
    LinkError,
    OwnerGoneError,
    ProtocolError,
    SegmentError,
    WorkerLostError,
    WriteConflictError,
)
from .handler import (
    ArrayDescriptor,
    Capabilities,
    LazyshareWarning,
    SegmentDescriptor,
    attach,
    capabilities,
    export,
    exported,
    materialize,
    release,
    stats,
)
from .output import shared, unshare

if TYPE_CHECKING:  # loaded on first use by __getattr__ below
    from .executor import Executor
    from .pool import Pool
    from .progressbar import progress

__version__ = "0.1.0"

__all__ = [
    "ArrayDescriptor",
    "BrokenWorkerError",
    "Capabilities",
    "CapabilityError",
    "Executor",
    "LazyshareError",
    "LazyshareWarning",
    "LinkError",
    "OwnerGoneError",
    "Pool",
    "ProtocolError",
    "SegmentDescriptor",
    "SegmentError",
    "WorkerLostError",
    "WriteConflictError",
    "attach",
    "capabilities",
    "export",
    "exported",
    "materialize",
    "progress",
    "register_joblib",
    "release",
    "shared",
    "stats",
    "unshare",
]


def __getattr__(name: str):
    # The pool pulls in multiprocessing machinery: load it on first use.
    if name == "Pool":
        from .pool import Pool

        return Pool
    if name == "Executor":
        from .executor import Executor

        return Executor
    if name == "progress":
        from .progressbar import progress

        return progress
    raise AttributeError(f"module 'lazyshare' has no attribute {name!r}")


def register_joblib() -> None:
    """Register the ``"lazyshare"`` joblib backend, as ``import lazyshare.joblib``
    does: ``joblib.parallel_config(backend="lazyshare")`` then selects it."""
    from .joblib import register

    register()
