"""Exceptions raised by lazyshare.

Every error the native core can report reaches Python through
:func:`lazyshare.handler._check` and becomes one of these.
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "LazyshareError",
    "LinkError",
    "CapabilityError",
    "SegmentError",
    "OwnerGoneError",
    "ProtocolError",
    "WorkerLostError",
    "BrokenWorkerError",
    "WriteConflictError",
]


class LazyshareError(RuntimeError):
    """Base class of every lazyshare error."""


class CapabilityError(LazyshareError):
    """The requested userfaultfd rung is not available in this process."""


class SegmentError(LazyshareError):
    """A segment is unknown to its owner, already released, or was asked for
    out of its bounds."""


class OwnerGoneError(LazyshareError):
    """The process that exported a segment is gone or does not answer."""


class ProtocolError(LazyshareError):
    """A peer sent a message that does not follow the page protocol."""


class WorkerLostError(LazyshareError):
    """A pool worker died while it held this task.

    ``exitcode`` is the worker's exit status as ``multiprocessing`` reports it
    (negative: killed by that signal).
    """

    def __init__(self, message: str, exitcode: int | None = None, pid: int | None = None):
        super().__init__(message)
        self.exitcode = exitcode
        self.pid = pid

    def __reduce__(self):
        return (type(self), (self.args[0], self.exitcode, self.pid))


class BrokenWorkerError(WorkerLostError, BrokenProcessPool):
    """A worker of a :class:`lazyshare.Executor` died while it held this future.

    Both a :class:`WorkerLostError` and a
    :class:`concurrent.futures.process.BrokenProcessPool`, so that handlers written
    for ``ProcessPoolExecutor`` catch it. Unlike ``ProcessPoolExecutor``, only the
    futures that worker held fail; the executor starts a replacement and goes on.
    ``__cause__`` is the pool's original :class:`WorkerLostError`.
    """


class WriteConflictError(LazyshareError):
    """Two tasks of one call changed the same bytes of a shared output array
    (:func:`lazyshare.shared`) to different values. Raised as the later task's
    result; that task's other changes, and everything the earlier one wrote,
    are in the array.

    ``array`` describes the array, ``start``/``stop`` bound the conflicting
    bytes (offsets from the array's first byte) and ``nbytes`` counts them.
    """

    def __init__(self, message: str, array: str = "", start: int = 0, stop: int = 0, nbytes: int = 0):
        super().__init__(message)
        self.array, self.start, self.stop, self.nbytes = array, start, stop, nbytes

    def __reduce__(self):
        return (type(self), (self.args[0], self.array, self.start, self.stop, self.nbytes))


class LinkError(LazyshareError):
    """A link to an owner on another host could not be made or was refused:
    unreachable, a certificate the other end does not trust (or that we do not),
    a plaintext peer where TLS is required, or a cluster without encryption."""
