"""lazyshare: process pools that stop pickling big data.

Large numpy arrays in a task's arguments are mapped into the worker as missing
pages; a native userfaultfd handler pulls only the pages the task touches from
the parent over ZeroMQ. See README.md for the design and the guarantees.
"""

from __future__ import annotations

from .errors import (
    CapabilityError,
    LazyshareError,
    OwnerGoneError,
    ProtocolError,
    SegmentError,
    WorkerLostError,
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

__version__ = "0.1.0"

__all__ = [
    "ArrayDescriptor",
    "Capabilities",
    "CapabilityError",
    "LazyshareError",
    "LazyshareWarning",
    "OwnerGoneError",
    "ProtocolError",
    "SegmentDescriptor",
    "SegmentError",
    "WorkerLostError",
    "attach",
    "capabilities",
    "export",
    "exported",
    "materialize",
    "release",
    "stats",
]


def __getattr__(name: str):
    # The pool pulls in multiprocessing machinery: load it on first use.
    if name == "Pool":
        from .pool import Pool

        return Pool
    raise AttributeError(f"module 'lazyshare' has no attribute {name!r}")
