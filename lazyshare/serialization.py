"""Pickling with lazy big buffers: everything that turns a task, a result or
the pool's initializer into frames and back, and the one frame layout of a task.

Run by the threads that pickle tasks in the parent (the caller's, for
``apply_async``/``map``; the feeder thread for ``imap``), by the result thread
(``loads_result``, ``CallExports.task_done``), and by a worker's main thread
(``loads``, ``dumps_result``).

Owner side (the pool's parent)::

    exports = CallExports(threshold)        # one per pool call (map, apply, ...)
    frames = exports.dumps(obj, task=i)     # list of bytes-like, sent as one multipart
    ...                                     # the task runs, its result comes back
    exports.task_done(i)                    # segments no other task uses are released
    exports.close()                         # the call is done: the rest are released
                                            # (unpinned once the workers' mappings are
                                            # gone too)

Worker side::

    obj = loads(frames)                     # big arrays arrive as lazy mappings

Frame layout of a task (``_task_frames``, the one place that lays it out, for
``CallExports.dumps`` and for ``_dumps_small``, the C-pickler fast path of
small tasks): ``[head, payload, inline buffer, ...]``. ``head`` is a
small pickle of ``kinds`` or ``(kinds, views)``. ``kinds``: one entry per
out-of-band buffer of ``payload``, either ``None`` (the next inline frame) or an
:class:`~lazyshare.handler.ArrayDescriptor` (attach it). ``views``: the
descriptors of the arrays the payload refers to by index. ``loads`` attaches
every descriptor of both before unpickling, with one
:func:`~lazyshare.handler.attach_all`: views of one base whose bytes do not
overlap share one mapping, overlapping ones get their own (each arrives as
private as an unpickled copy), and all are confirmed in one round trip.

numpy arrays are caught by ``reducer_override`` before numpy reduces them, so a
slice, a transposed or a strided view of a big array exports the *base*
allocation (one segment for a call's tasks while any of them using it is not
done) and is rebuilt as the same view in the worker. Other objects that pickle
their data out-of-band (protocol 5 ``PickleBuffer``) go through
``buffer_callback``.

Subclasses of ndarray go lazily too, and arrive as follows (numpy's own
pickling is ``ndarray.__reduce__``, which copies the data with ``tobytes()``):

* a subclass that pickles as ndarray does (no ``__reduce__``, ``__reduce_ex__``
  or ``__setstate__`` of its own, nothing in ``copyreg``): the lazy ndarray's
  ``view(cls)`` -- so ``__array_finalize__`` runs with the plain array as
  ``obj``, as for any view -- then the instance's ``__dict__`` is restored.
  numpy's pickling drops ``__dict__``; here it arrives (pickled on its own;
  if it cannot be pickled it is dropped, as numpy would, with a warning).
  ``np.recarray`` and ``np.matrix`` are such subclasses.
* ``np.memmap``: unpickling a memmap gives an ``np.memmap`` that maps no file
  (``_mmap``, ``filename``, ``offset``, ``mode`` all None); so does this. The
  worker's copy is private: its writes never reach the file.
* ``np.ma.MaskedArray`` (whose ``__reduce__`` copies data and mask with
  ``tobytes()``): data and mask go separately, each lazily when big (a
  ``nomask`` stays ``nomask``), and are rebuilt as numpy's ``_mareconstruct``
  rebuilds them, with ``fill_value``, the base class (a masked memmap's data is
  an ``np.memmap`` as above) and ``hardmask`` (which numpy's pickling loses).
* a subclass with its own ``__reduce__``/``__reduce_ex__``/``__setstate__`` (or
  a ``copyreg`` reducer) is pickled its own way, i.e. whole, with one
  ``LazyshareWarning`` per class saying so.

Arrays of Python objects (``dtype=object``) are always pickled.

Results (``dumps_result``/``loads_result``) are pickled with protocol 5 by the
stdlib's pickler and their out-of-band buffers travel as separate zero-copy
frames; nothing is exported.
"""

from __future__ import annotations

import copyreg
import io
import operator
import os
import pickle
import sys
import threading
import warnings
from typing import Any

import cloudpickle
import numpy as np

from . import output as _output

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
_NO_KINDS = pickle.dumps([], _PROTOCOL)


def _task_frames(kinds: list, views: list, payload, inline: list) -> list:
    """The one frame layout of a pickled task (see the module docstring):
    ``[head, payload, *inline]``, where ``head`` pickles ``kinds`` (one per
    out-of-band buffer: None for the next inline frame, or a descriptor) or
    ``(kinds, views)``. ``loads`` reads it back."""
    if views:
        head = pickle.dumps((kinds, views), _PROTOCOL)
    else:
        head = pickle.dumps(kinds, _PROTOCOL) if kinds else _NO_KINDS
    return [head, payload, *inline]


def _handler():
    # Imported late: the compiled module is only needed once something is big.
    from . import handler

    return handler


def _live():
    from . import live

    return live


class _LazyPickler(cloudpickle.Pickler):
    def __init__(self, file, exports: CallExports, buffer_callback, views: list):
        super().__init__(file, protocol=_PROTOCOL, buffer_callback=buffer_callback)
        self._exports = exports
        self._views = views  # descriptors, referred to by index (see _view)

    def _view_of(self, arr: np.ndarray) -> int:
        self._views.append(self._exports.export_array(arr))
        return len(self._views) - 1

    def reducer_override(self, obj):
        if (rv := _as_the_stdlib(obj, self._exports.threshold)) is not None:
            return rv
        if (
            isinstance(obj, np.ndarray)
            and (obj.nbytes >= self._exports.threshold or _output.marked(obj) is not None)
            and not obj.dtype.hasobject
        ):
            if type(obj) is np.ndarray:
                return _view, (self._view_of(obj),)
            rv = self._reduce_subclass(obj)
            if rv is not None:
                return rv
        return super().reducer_override(obj)

    def _reduce_subclass(self, obj: np.ndarray):
        """A big instance of an ndarray subclass, lazily (see the module
        docstring), or None: it pickles its own way."""
        cls = type(obj)
        if cls in copyreg.dispatch_table:
            return None  # a reducer registered for it: respected
        if _pickles_as(cls, np.ma.MaskedArray):
            mask = obj._mask
            state = _instance_state(obj, _MASKED_OWN)
            return _rebuild_masked, (
                cls,
                obj._baseclass,
                obj.view(np.ndarray),
                None if mask is np.ma.nomask else mask.view(np.ndarray),
                obj._fill_value,
                bool(obj._hardmask),
                self._dumps_state(cls, state),
            )
        if _pickles_as(cls, np.ndarray):
            own = _MEMMAP_OWN if isinstance(obj, np.memmap) else ()
            state = self._dumps_state(cls, _instance_state(obj, own))
            return _rebuild_subclass, (self._view_of(obj.view(np.ndarray)), cls, state)
        _warn_pickled_whole(cls, obj.nbytes)
        return None

    def _dumps_state(self, cls: type, state: dict | None) -> bytes | None:
        """An instance's extra attributes, pickled apart (big arrays among them
        still go lazily): numpy's own pickling drops them, so one that cannot be
        pickled is dropped too, with a warning, instead of failing the task."""
        if not state:
            return None
        f = io.BytesIO()
        try:
            _LazyPickler(f, self._exports, None, self._views).dump(state)
        except Exception as e:
            _warn_once(
                ("state", cls),
                f"lazyshare: the attributes of a {_qualname(cls)} could not be pickled ({e!r}); "
                "it arrives without them, as numpy's own pickling would send it",
            )
            return None
        return f.getvalue()


# Attributes that a class's own machinery rebuilds (or that numpy's pickling
# resets): not sent with the instance's other attributes.
_MEMMAP_OWN = ("_mmap", "filename", "offset", "mode")
_MASKED_OWN = (
    "_mask",
    "_fill_value",
    "_hardmask",
    "_sharedmask",
    "_isfield",
    "_baseclass",
    "_optinfo",
    "_basedict",
    *_MEMMAP_OWN,
)


def _pickles_as(cls: type, base: type) -> bool:
    """Whether instances of ``cls`` pickle exactly as instances of ``base`` do
    (none of the methods pickling goes through is overridden below it)."""
    if not issubclass(cls, base):
        return False
    return all(getattr(cls, m) is getattr(base, m) for m in ("__reduce_ex__", "__reduce__", "__setstate__"))


def _instance_state(obj, own) -> dict | None:
    d = getattr(obj, "__dict__", None)
    if not d:
        return None
    return {k: v for k, v in d.items() if k not in own} or None


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_warned: set = set()


def _warn_once(key, msg: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    from .handler import LazyshareWarning

    warnings.warn(msg, LazyshareWarning, stacklevel=2)


def _warn_pickled_whole(cls: type, nbytes: int) -> None:
    _warn_once(
        ("whole", cls),
        f"lazyshare: {_qualname(cls)} defines its own pickling (__reduce__, __reduce_ex__ or "
        f"__setstate__), which is respected: such arrays ({nbytes} bytes here) are pickled whole, "
        "not shared lazily",
    )


class CallExports:
    """The segments exported for one pool call, deduplicated by allocation.

    ``dumps(obj, task=key)`` counts each segment ``obj`` uses once for that task
    (views of one base: one segment); ``task_done(key)`` drops the task's counts
    and releases the segments no other task of the call still uses, so a stream
    of tasks keeps only the segments of the tasks not done yet. A ``dumps``
    without ``task`` keeps its segments until ``close()``, which releases all.

    One thread pickles a call's tasks; ``task_done`` and ``close`` may come from
    another (the lookup and the count of a segment are one step under a lock, so
    a segment is never released between being found and being counted).
    """

    def __init__(self, threshold: int | None = DEFAULT_THRESHOLD, pool: Any = None):
        # None disables lazy export: everything is pickled.
        self.threshold = float("inf") if threshold is None else int(threshold)
        # The pool the call runs in: segments are kept across its calls
        # (lazyshare.live) while it runs. None: exported for this call alone.
        self.pool = pool
        self._segments: dict[tuple[int, int], Any] = {}
        self._gens: dict[tuple[int, int], Any] = {}  # segments kept across calls (lazyshare.live)
        self._uses: dict[tuple[int, int], int] = {}  # segment -> tasks using it
        self._tasks: dict[Any, tuple] = {}  # task -> the segments it uses
        self._using: set | None = None  # those of the task being pickled
        self._lock = threading.Lock()
        self.bytes_live = 0  # bytes exported and still offered (not released yet)
        self.bytes_new = 0  # bytes the last dumps exported anew
        self.outputs = _output.CallOutputs(
            getattr(pool, "output_totals", None)
        )  # the shared outputs among them
        self.closed = False

    def export_array(self, arr: np.ndarray):
        if self.closed:
            raise ValueError("CallExports is closed")
        h = _handler()
        pin, low, high = h.root_extent(arr)
        key = (low, high)
        using = self._using
        with self._lock:
            seg = self._segments.get(key)
            gen = self._gens.get(key)
            if seg is not None and (using is None or key not in using):
                self._uses[key] += 1  # a use outside a task is never done: kept until close
                if using is not None:
                    using.add(key)
        marks = _output.marked(arr) if _output._marks else None
        if seg is None:
            # A shared output is exported for the call alone: no page cache (its
            # tasks' pages would be kept once more) and no snapshot (the merges
            # would copy every block they write first); see lazyshare.output.
            keep = self.pool is not None and marks is None
            gen = _live().acquire(pin, low, high, self.pool) if keep else None
            seg = h.export_memory(pin, low, high - low) if gen is None else gen.desc
            with self._lock:
                closed = self.closed
                if not closed:
                    self._segments[key] = seg
                    if gen is not None:
                        self._gens[key] = gen
                    self._uses[key] = 1
                    if using is not None:
                        using.add(key)
                    self.bytes_live += high - low
                    self.bytes_new += high - low
            if closed:  # closed meanwhile (the pool was terminated)
                self._release(seg, gen)
                raise ValueError("CallExports is closed")
        # A kept segment begins at its allocation's first page (see live._Gen).
        base = low if gen is None else gen.base
        zeros = self.outputs.add(seg, base, pin, marks) if marks is not None else ()
        return h.ArrayDescriptor.for_view(seg, arr, base, marks is not None, zeros)

    def dumps(self, obj, task=None) -> list:
        """Pickle ``obj``; its segments stay offered until ``task_done(task)``
        (until ``close()`` without ``task``)."""
        buffers: list = []
        kinds: list = []
        views: list = []

        def callback(buf: pickle.PickleBuffer):
            raw = buf.raw()
            if raw.nbytes >= self.threshold:
                arr = np.frombuffer(raw, dtype=np.uint8)
                kinds.append(self.export_array(arr))
                return False  # out-of-band; attached lazily
            kinds.append(None)
            buffers.append(raw)
            return False

        self.bytes_new = 0
        if task is not None:
            self._using = set()
        try:
            f = io.BytesIO()
            _LazyPickler(f, self, callback, views).dump(obj)
        except BaseException:
            if task is not None:  # the task will not run: what it counted goes
                self._drop(self._using)
            raise
        finally:
            using, self._using = self._using, None
        if using:
            self._tasks[task] = tuple(using)
        return _task_frames(kinds, views, f.getbuffer(), buffers)

    def task_done(self, task) -> None:
        """The task ``dumps(obj, task)`` pickled is done: release the segments
        no other task uses. Workers still mapping one keep it readable (the
        page server keeps a released segment until its last mapping is gone)."""
        keys = self._tasks.pop(task, None)
        if keys:
            self._drop(keys)

    def _drop(self, keys) -> None:
        gone = []
        with self._lock:
            for key in keys:
                n = self._uses.get(key, 0) - 1
                if n > 0:
                    self._uses[key] = n
                elif n == 0:
                    del self._uses[key]
                    seg = self._segments.pop(key)
                    self.bytes_live -= seg.nbytes
                    gone.append((seg, self._gens.pop(key, None)))
        for seg, gen in gone:
            self._release(seg, gen)

    @staticmethod
    def _release(seg, gen) -> None:
        if gen is None:
            _handler().release(seg)
        else:
            _live().release(gen)

    @property
    def segments(self) -> list:
        return list(self._segments.values())

    def close(self) -> None:
        """Stop offering this call's segments (safe to call twice)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            gone = [(seg, self._gens.get(key)) for key, seg in self._segments.items()]
            self._segments.clear()
            self._gens.clear()
            self._uses.clear()
            self._tasks.clear()
            self.bytes_live = 0
        self.outputs.close()
        for seg, gen in gone:
            self._release(seg, gen)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_loading = threading.local()  # .views: the arrays of the frames loads is unpickling


def _view(index):
    views = getattr(_loading, "views", None)
    if views is None:
        raise RuntimeError("lazyshare payloads are unpickled by lazyshare.serialization.loads")
    return views[index]


def _as_the_stdlib(obj, threshold, _function=type(lambda: None)):  # noqa: B008 (FunctionType, once)
    """Where the stdlib's pool and cloudpickle differ, what the stdlib does with
    ``obj`` (called first by ``_LazyPickler.reducer_override``): None (no
    difference), NotImplemented (save it as a global, by reference) or a
    reduction; raises what the stdlib raises.

    A read-only ndarray below ``threshold`` goes as a writable copy: pickled
    out-of-band it would arrive read-only, where the stdlib's pool (protocol 4,
    in-band) gives a writable one. A memoryview raises the stdlib's TypeError
    (cloudpickle would send it as bytes).

    A function or class of ``__main__`` goes by reference when the workers run
    the parent's ``__main__`` too (spawn and forkserver children import a script
    or a ``python -m`` module as ``__mp_main__``) and ``__main__.<qualname>`` is
    this very object: then its ``global`` statements write to the one namespace
    that the worker's other ``__main__`` functions read, as with the stdlib.
    cloudpickle would copy it by value, into a namespace of its own per task.
    An interactive ``__main__`` (REPL, notebook, ``python -c``), a package's
    ``__main__.py`` (which workers do not run) and what is not reachable by name
    (lambdas, nested functions) stay by value (see ``_main_is_importable``).
    """
    cls = type(obj)
    if cls is np.ndarray:
        if obj.flags.writeable or obj.nbytes >= threshold:
            return None  # a big one is attached writable
        return obj.copy(order="K").__reduce_ex__(_PROTOCOL)
    if cls is memoryview:
        return obj.__reduce_ex__(_PROTOCOL)  # TypeError: cannot pickle memoryview objects
    if cls is not _function and not isinstance(obj, type):
        return None
    if getattr(obj, "__module__", None) != "__main__" or not _main_is_importable():
        return None
    target = sys.modules.get("__main__")
    for name in obj.__qualname__.split("."):
        target = getattr(target, name, None)
        if target is None:
            return None
    return NotImplemented if target is obj else None


def _main_is_importable() -> bool:
    """Whether workers run the parent's ``__main__`` (as ``__mp_main__``): spawn
    and forkserver children import a script's file or a ``python -m`` module,
    but not a package's ``__main__`` nor a script named ipython (multiprocessing
    skips those). Then a ``__main__`` function pickles by reference, as the
    stdlib pickles it, and its ``global`` statements reach the worker's one
    ``__main__`` namespace. An interactive ``__main__`` (REPL, notebook,
    ``python -c``) has no file: cloudpickle sends its functions by value."""
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    path = getattr(main, "__file__", None)
    known = _main_seen.get((spec_name, path))
    if known is None:
        if spec_name is not None:
            known = spec_name != "__main__" and not spec_name.endswith(".__main__")
        else:
            known = (
                bool(path)
                and os.path.isfile(path)
                and os.path.splitext(os.path.basename(path))[0] != "ipython"
            )
        _main_seen[(spec_name, path)] = known
    return known


_main_seen: dict = {}  # (__spec__.name, __file__) -> importable (asked once per chunk: cached)

# ---------------------------------------------------------------- the fast path of small tasks
_BY_VALUE_MODULES = getattr(getattr(cloudpickle, "cloudpickle", None), "_PICKLE_BY_VALUE_MODULES", None)


def _dumps_small(threshold: float, task) -> list | None:
    """``CallExports.dumps(task)`` for small tasks, or None.

    cloudpickle costs 2-3x the C pickler on a small task (a Python ``ChainMap``
    lookup and ``reducer_override`` call per object): 10,000 ``apply_async`` spend
    most of their parent time there. The C pickler gives the same result when it
    succeeds, nothing lives in an interactive ``__main__`` (see
    ``_main_is_importable``), no module is registered to be pickled by value,
    nothing is big enough to be exported and no buffer is read-only (the stdlib
    gives a writable copy: see ``_as_the_stdlib``, which also refuses
    memoryviews as the stdlib does); then the frames are those of
    ``_task_frames``, as from ``CallExports.dumps``. Otherwise (lambdas, closures,
    big arrays ...) None: use ``CallExports.dumps``. A big ndarray, at any depth,
    stops the pickler as soon as it is reached (``_small_table``), before it is
    copied.
    """
    if _BY_VALUE_MODULES is None or _BY_VALUE_MODULES:
        return None
    buffers: list = []
    f = io.BytesIO()
    p = pickle.Pickler(f, _PROTOCOL, buffer_callback=buffers.append)
    p.dispatch_table = _small_table(threshold)
    try:
        p.dump(task)
    except Exception:  # _TooBig, or anything cloudpickle may still handle
        return None
    payload = f.getvalue()
    if len(payload) >= threshold:
        return None
    if (b"__main__" in payload or b"__mp_main__" in payload) and not _main_is_importable():
        return None
    raws = [b.raw() for b in buffers]
    if any(r.nbytes >= threshold or r.readonly for r in raws):
        return None  # a read-only array would arrive read-only: CallExports.dumps copies it
    return _task_frames([None] * len(raws), (), payload, raws)


class _TooBig(Exception):
    pass


_small_tables: dict = {}


def _small_table(threshold: float) -> dict:
    """copyreg's dispatch table plus ndarray and its subclasses, whose reducer
    refuses big arrays.
    Consulted by the C pickler for exact types it has no fast path for, so it
    costs nothing per int or str."""
    table = _small_tables.get(threshold)
    if table is None:

        def reduce_array(a):
            if a.nbytes >= threshold or (_output._marks and _output.marked(a) is not None):
                raise _TooBig
            return a.__reduce_ex__(_PROTOCOL)

        class Table(dict):  # a subclass of ndarray (memmap, masked...) too, on first sight
            def __missing__(self, cls):
                if issubclass(cls, type):
                    raise KeyError(cls)  # a class (of a metaclass): pickled by reference
                r = self[cls] = reduce_array if issubclass(cls, np.ndarray) else _reduce_ex_5
                return r

        table = _small_tables[threshold] = Table({**copyreg.dispatch_table, np.ndarray: reduce_array})
    return table


_reduce_ex_5 = operator.methodcaller("__reduce_ex__", _PROTOCOL)  # what the pickler does without an entry


# ---------------------------------------------------------------- the pool's initializer
class _InitPickler(cloudpickle.Pickler):
    """cloudpickle, except where ``_as_the_stdlib`` says the stdlib differs
    (``__main__`` functions by reference where workers import it)."""

    def reducer_override(self, obj):
        if (rv := _as_the_stdlib(obj, float("inf"))) is not None:
            return rv
        return super().reducer_override(obj)


class _CloudCallable:
    """The initializer travels with cloudpickle (lambdas, closures) but, as with
    the stdlib, by reference when it is a ``__main__`` function that workers
    import: what it sets with ``global`` is then what the tasks' ``__main__``
    functions see. ``initargs`` go through multiprocessing's own pickler, so that
    queues, locks and manager proxies work as with the stdlib."""

    def __init__(self, func):
        self.func = func

    def __reduce__(self):
        f = io.BytesIO()
        _InitPickler(f).dump(self.func)
        return _load_cloud, (f.getvalue(),)

    def __call__(self, *args):
        return self.func(*args)


def _load_cloud(blob: bytes):
    return _CloudCallable(pickle.loads(blob))


def _rebuild_subclass(index, cls, state):
    """A lazy ndarray as an instance of ``cls``: ``view(cls)`` (its
    ``__array_finalize__`` sees the plain array), then its attributes."""
    arr = _view(index).view(cls)
    if state is not None:
        arr.__dict__.update(pickle.loads(state))
    return arr


def _rebuild_masked(cls, baseclass, data, mask, fill_value, hardmask, state):
    """As numpy's ``_mareconstruct`` + ``MaskedArray.__setstate__`` rebuild one,
    over the lazy data and mask; the hard mask and other attributes kept."""
    if baseclass is not np.ndarray:
        data = data.view(baseclass)
    arr = cls.__new__(cls, data, mask=np.ma.nomask if mask is None else mask, dtype=data.dtype)
    if fill_value is not None:
        arr.fill_value = fill_value
    arr._hardmask = hardmask
    if state is not None:
        arr.__dict__.update(pickle.loads(state))
    return arr


def loads(frames, outputs: list | None = None) -> Any:
    """Unpickle ``CallExports.dumps`` frames; lazy buffers are attached. The
    shared outputs among them (``lazyshare.shared``) are appended to
    ``outputs`` as (segment id, segment length, array, zero extents)."""
    head = pickle.loads(frames[0])
    kinds, views = head if isinstance(head, tuple) else (head, ())
    lazy = [d for d in kinds if d is not None]
    descs = [*lazy, *views]
    arrays = _handler().attach_all(descs) if descs else []
    if outputs is not None:
        outputs.extend(
            (d.segment.id, d.segment.nbytes, a, d.zeros) for d, a in zip(descs, arrays) if d.output
        )
    oob = iter(arrays[: len(lazy)])
    inline = iter(frames[2:])
    buffers = [next(inline) if d is None else memoryview(next(oob)) for d in kinds]
    outer = getattr(_loading, "views", None)
    _loading.views = arrays[len(lazy) :]
    try:
        return pickle.loads(frames[1], buffers=buffers)
    finally:
        _loading.views = outer


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
