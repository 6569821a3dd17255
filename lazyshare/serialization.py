"""Pickling with lazy big buffers.

Owner side (the pool's parent)::

    exports = CallExports(threshold)        # one per pool call (map, apply, ...)
    frames = exports.dumps(obj)             # list of bytes-like, sent as one multipart
    ...                                     # tasks run, results come back
    exports.close()                         # the call is done: segments unpinned once
                                            # the workers' mappings are gone too

Worker side::

    obj = loads(frames)                     # big arrays arrive as lazy mappings

Frame layout of ``dumps``: ``[kinds, payload, inline buffer, ...]``. ``kinds`` is a
small pickle: one entry per out-of-band buffer of ``payload``, either ``None`` (the
next inline frame) or an :class:`~lazyshare.handler.ArrayDescriptor` (attach it).

numpy arrays are caught by ``reducer_override`` before numpy reduces them, so a
slice, a transposed or a strided view of a big array exports the *base*
allocation once per call and is rebuilt as the same view in the worker. Other
objects that pickle their data out-of-band (protocol 5 ``PickleBuffer``) go
through ``buffer_callback``.

Results (``dumps_result``/``loads_result``) are pickled with protocol 5 by the
stdlib's pickler and their out-of-band buffers travel as separate zero-copy
frames; nothing is exported.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import cloudpickle
import numpy as np

__all__ = [
    "DEFAULT_THRESHOLD",
    "CallExports",
    "loads",
    "dumps_result",
    "loads_result",
]

#: Buffers of at least this many bytes are exported instead of pickled (like
#: joblib's ``max_nbytes``): below it, a page round trip costs more than a copy.
DEFAULT_THRESHOLD = 1 << 20

_PROTOCOL = 5


def _handler():
    # Imported late: the compiled module is only needed once something is big.
    from . import handler

    return handler


class _LazyPickler(cloudpickle.Pickler):
    def __init__(self, file, exports: CallExports, buffer_callback):
        super().__init__(file, protocol=_PROTOCOL, buffer_callback=buffer_callback)
        self._exports = exports

    def reducer_override(self, obj):
        if type(obj) is np.ndarray and obj.nbytes >= self._exports.threshold and not obj.dtype.hasobject:
            return _rebuild_array, (self._exports.export_array(obj),)
        return super().reducer_override(obj)


class CallExports:
    """The segments exported for one pool call, deduplicated by allocation.

    Not thread-safe: one thread pickles a call's tasks.
    """

    def __init__(self, threshold: int | None = DEFAULT_THRESHOLD):
        # None disables lazy export: everything is pickled.
        self.threshold = float("inf") if threshold is None else int(threshold)
        self._segments: dict[tuple[int, int], Any] = {}
        self.bytes_exported = 0  # bytes pinned and offered lazily (not moved)
        self.bytes_pickled = 0  # bytes of frames produced by dumps
        self.closed = False

    def export_array(self, arr: np.ndarray):
        if self.closed:
            raise ValueError("CallExports is closed")
        h = _handler()
        pin, low, high = h.root_extent(arr)
        seg = self._segments.get((low, high))
        if seg is None:
            seg = h.export_memory(pin, low, high - low)
            self._segments[(low, high)] = seg
            self.bytes_exported += high - low
        return h.ArrayDescriptor.for_view(seg, arr, low)

    def dumps(self, obj) -> list:
        buffers: list = []
        kinds: list = []

        def callback(buf: pickle.PickleBuffer):
            raw = buf.raw()
            if raw.nbytes >= self.threshold:
                arr = np.frombuffer(raw, dtype=np.uint8)
                kinds.append(self.export_array(arr))
                return False  # out-of-band; attached lazily
            kinds.append(None)
            buffers.append(raw)
            return False

        f = io.BytesIO()
        _LazyPickler(f, self, callback).dump(obj)
        payload = f.getbuffer()
        head = pickle.dumps(kinds, _PROTOCOL)
        frames = [head, payload, *buffers]
        self.bytes_pickled += sum(memoryview(x).nbytes for x in frames)
        return frames

    @property
    def segments(self) -> list:
        return list(self._segments.values())

    def close(self) -> None:
        """Stop offering this call's segments (safe to call twice)."""
        if self.closed:
            return
        self.closed = True
        h = _handler() if self._segments else None
        for seg in self._segments.values():
            h.release(seg)
        self._segments.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _rebuild_array(desc):
    return _handler().attach(desc)


def loads(frames) -> Any:
    """Unpickle ``CallExports.dumps`` frames; lazy buffers are attached."""
    kinds = pickle.loads(frames[0])
    inline = iter(frames[2:])
    buffers = []
    for desc in kinds:
        if desc is None:
            buffers.append(next(inline))
        else:
            buffers.append(memoryview(_handler().attach(desc)))
    return pickle.loads(frames[1], buffers=buffers)


class _ResultPickler(pickle.Pickler):
    """multiprocessing's ForkingPickler (its reducers), with a buffer_callback.

    Results use the stdlib's pickler, not cloudpickle, so that what the stdlib
    cannot send back (a lambda, say) raises MaybeEncodingError here too."""

    def __init__(self, file, buffers: list):
        from multiprocessing.reduction import ForkingPickler

        super().__init__(file, _PROTOCOL, buffer_callback=buffers.append)
        table = ForkingPickler._copyreg_dispatch_table.copy()
        table.update(ForkingPickler._extra_reducers)
        self.dispatch_table = table


def dumps_result(obj) -> list:
    """Pickle a result: ``[payload, buffer, ...]`` with buffers out-of-band."""
    buffers: list = []
    f = io.BytesIO()
    _ResultPickler(f, buffers).dump(obj)
    return [f.getbuffer(), *(b.raw() for b in buffers)]


def loads_result(frames) -> Any:
    return pickle.loads(frames[0], buffers=frames[1:])
