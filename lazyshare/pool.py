"""``lazyshare.pool.Pool``: a drop-in ``multiprocessing.Pool`` over ZeroMQ.

This module owns the public API (``Pool`` and its methods, run in the caller's
threads) and the result objects with their cache (completed by the result
thread). The rest lives in:

* ``lazyshare.dispatcher``: the shared state (``_Core``), the dispatcher, result
  and feeder threads, terminate and an aborted start;
* ``lazyshare.policy``: how many tasks go to a worker, the prefetch depth, the
  feed window (plain functions);
* ``lazyshare.worker``: the worker process's main loop;
* ``lazyshare.transport``: the control plane's messages (and the page plane's);
* ``lazyshare.serialization``: the frames of tasks and results;
* ``lazyshare.startmethod``: the start method and the default worker count.

Data flow and who owns what::

  caller threads (Pool API)                     feeder thread "lazyshare-feeder"
  apply_async / map_async / starmap_async       imap / imap_unordered: walks the
    pickle in the caller (snapshot at             iterable lazily, pickles each task,
    submission, CallExports per call)             at most a window ahead of the
                                                  results (policy.feed_has_room)
        │ append _Task                                  │ append _Task
        ▼                                               ▼
  ┌─ pending (deque, append: any thread, popleft/appendleft: dispatcher) ─┐
  │  + _Wakeup (any thread: wake(); one byte until the dispatcher drains) │
  └──────────────────────────────────┬────────────────────────────────────┘
                                     ▼
  dispatcher thread "lazyshare-dispatcher"   ── owns: ROUTER socket, worker table,
    zmq.Poller over ROUTER + wake pipe +        per-worker in-flight tasks, the
    every worker's Process.sentinel            Process objects in `_pool`
        │ [wid, "T", header, *frames]  ▲ [wid, "R"|"D"|"B"|"I", ...]
        ▼                              │
  worker processes "lazyshare-worker-N" (DEALER, identity wid)
    serialization.loads -> func(*args) -> serialization.dumps_result
        results and lost tasks ──► result queue (SimpleQueue)
                                     ▼
  result thread "lazyshare-results"  ── the only caller of ``_set`` on result objects:
    loads_result, task_done, callbacks,     runs callbacks, so a slow callback never
    event.set, fails what is left after      stalls dispatch
    terminate()
        │ task_done: the segments only that task used are released (CallExports
        │ counts tasks per segment), the feeder's window shrinks (and wakes it)
        ▼
  cache (dict job -> result, like the stdlib's): entries added by the API threads,
  removed by whoever completes a job; removal closes that call's CallExports (what
  is left of it) and, when the cache empties, wakes the dispatcher (close() waits
  for an empty cache).

Semantics follow CPython's ``Lib/multiprocessing/pool.py`` (the result classes *are*
the stdlib's ``ApplyResult``/``MapResult``/``IMapIterator``, subclassed), with these
differences, all on paths where the stdlib hangs or crashes:

* A worker that dies while holding tasks (signal, ``os._exit``, segfault, an
  uncaught ``SystemExit``/``KeyboardInterrupt``) fails exactly those tasks with
  :class:`~lazyshare.errors.WorkerLostError`; a replacement is started.
* A task that raises ``SystemExit`` (``sys.exit()``) or ``KeyboardInterrupt``
  ends its worker, as in the stdlib's pool (which then hangs): that task fails
  with ``WorkerLostError``. The private ``Pool(..., _future_semantics=True)``,
  which :class:`lazyshare.Executor` passes, makes workers behave as
  ``ProcessPoolExecutor``'s instead: any ``BaseException`` a task raises is its
  exception and the worker goes on, and an error while pickling a result (a
  ``SystemExit`` too) is delivered itself, with the remote traceback as its
  ``__cause__``, where the pool gives ``MaybeEncodingError``.
* ``terminate()`` fails every outstanding result with :class:`PoolTerminatedError`
  (the stdlib leaves them pending forever); error callbacks run for them.
* A result that cannot be pickled *or unpickled* becomes ``MaybeEncodingError``;
  a task whose arguments cannot be unpickled in the worker fails with that error.
* An exception raised by a callback is printed to stderr; the pool goes on. So
  is a ``SystemExit`` or ``KeyboardInterrupt`` from a callback, or from unpickling
  a result (then the result fails with ``MaybeEncodingError``): they run in the
  result thread, where only their own code can raise these.
* If the initializer fails (or a worker dies before it is ready) ``max(3,
  processes)`` times in a row with no worker becoming ready in between, the pool is
  *broken*: outstanding and later tasks fail with ``WorkerLostError`` (its
  ``__cause__`` is the initializer's exception). The stdlib restarts workers forever.
* Workers prefetch: while the backlog is deep, each worker holds up to
  ``policy.QUEUED_WORK`` seconds of queued tasks (by the moving average of task
  time, at most ``policy.MAX_PREFETCH``), so tiny tasks stream. Long tasks, a shallow backlog and
  the tail of a map go one task per worker, balanced as by the stdlib's shared
  queue. A task queued behind a long one on a worker waits for it; if the worker
  dies, the task it was running fails (``WorkerLostError``) and the ones queued
  behind it, which never started, go back to the front of the queue.
* What workers cannot import by name (lambdas, closures, the functions and
  classes of an interactive ``__main__`` or of a package's ``__main__.py``)
  travels by value with cloudpickle, where the stdlib refuses it; each task then
  has its own copy of its globals. A script's (or ``python -m`` module's) own
  ``__main__`` functions and classes go by reference, as with the stdlib, so
  they share the worker's one ``__main__``: what an initializer sets with
  ``global`` is what later tasks see. One defined under ``if __name__ ==
  "__main__":`` is not in the worker's ``__main__`` and fails with
  ``AttributeError``, as with the stdlib.
* Each worker starts with the parent's ``os.environ`` as it is when that worker
  starts, under forkserver too (a fork server's children inherit its
  environment, frozen when the first pool started it), plus the private
  ``_worker_env`` (the joblib backend's per-worker thread limits). Where that
  changes a thread-count variable (``OMP_NUM_THREADS``,
  ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``, ``BLIS_NUM_THREADS``), the
  native thread pools already loaded in the worker (numpy's BLAS is) are set to
  it with threadpoolctl if that is importable; without it they keep the count
  they read at load.

``imap``/``imap_unordered``: the feeder pulls the next item of the iterable only
while the call's tasks not done yet (waiting, sent, or their result not handled
yet) fit a window: fewer than ``policy.FEED_AHEAD`` tasks, fewer than
``policy.FEED_LIMIT`` of them waiting to be sent, and less than
``policy.FEED_BYTES`` exported or pickled for them (but room for ``2 * processes`` tasks whatever their size). The stdlib's
task handler is held back the same way by its pipe; as there, results that
arrive before the caller reads them are kept: the window does not wait for a
slow reader. Each task's segments go when its result is in (a map's chunks
too), so a stream of fresh arrays runs in bounded memory.

Results are pickled by the worker with multiprocessing's own ``ForkingPickler``
(protocol 5, out-of-band buffers as separate frames, read back by
``serialization.loads_result``), not cloudpickle: what the stdlib cannot send back
(a lambda, a lock) raises ``MaybeEncodingError`` here too. A result may point
into the task's lazy arguments (the argument returned, a view, an exception or a
pandas frame sharing its memory): on the uffd-user-mode-only rung, where
libzmq's kernel-mode read of a page not fetched yet would fail, such a frame is
fetched first (copied, under a memory budget) so that it arrives intact.
"""

from __future__ import annotations

import itertools
import sys
import threading
import traceback
import warnings
from collections.abc import Iterable, Iterator
from multiprocessing import TimeoutError, util
from multiprocessing.pool import (
    CLOSE,
    INIT,
    RUN,
    TERMINATE,
    ApplyResult,
    IMapIterator,
    IMapUnorderedIterator,
    MapResult,
    MaybeEncodingError,
    RemoteTraceback,
)
from typing import Any, Callable

from . import live, serialization, startmethod, transport
from .dispatcher import _abort_start, _Core, _Dispatcher, _feed_loop, _result_loop, _terminate_pool, _Worker
from .errors import LazyshareError

__all__ = [
    "Pool",
    "AsyncResult",
    "ApplyResult",
    "MapResult",
    "IMapIterator",
    "IMapUnorderedIterator",
    "MaybeEncodingError",
    "RemoteTraceback",
    "TimeoutError",
    "PoolTerminatedError",
    "RUN",
    "CLOSE",
    "TERMINATE",
]

AsyncResult = ApplyResult


# --------------------------------------------------------------------------- results
class PoolTerminatedError(LazyshareError):
    """The pool was terminated before this task completed."""


class _ApplyResult(ApplyResult):
    def _fail_all(self, exc: BaseException) -> None:
        self._set(0, (False, exc))


class _MapResult(MapResult):
    def _fail_all(self, exc: BaseException) -> None:
        while self._number_left > 0 and self._job in self._cache:
            self._set(0, (False, exc))


class _IMapMixin:
    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            self._unsorted.clear()
            self._items.append((False, exc))
            self._index += 1
            self._length = self._index
            self._cond.notify()
            self._cache.pop(self._job, None)
            self._pool = None


class _IMapIterator(_IMapMixin, IMapIterator):
    pass


class _IMapUnorderedIterator(_IMapMixin, IMapUnorderedIterator):
    pass


class _Cache(dict):
    """job -> result object. Removing a job closes its exports; emptying wakes the
    dispatcher (the stdlib's ``_PoolCache`` notifies its worker handler)."""

    def __init__(self, core: _Core):
        super().__init__()
        self._core = core

    def fail_outstanding(self, terminated: bool, broken: BaseException | None) -> None:
        """Fail every result still here: the pool's threads are gone, so nothing
        else can complete them (the result thread, as it leaves)."""
        if terminated:
            err: BaseException = PoolTerminatedError("the pool was terminated before this task completed")
        else:
            err = broken or LazyshareError("the pool stopped before this task completed")
        for result in list(self.values()):
            try:
                result._fail_all(err)
            except BaseException:
                traceback.print_exc()

    def __delitem__(self, job):
        super().__delitem__(job)
        self._core.job_done(job, not self)

    def pop(self, job, *default):
        had = job in self
        value = super().pop(job, *default)
        if had:
            self._core.job_done(job, not self)
        return value


def _guard_callback(cb: Callable | None, what: str) -> Callable | None:
    """A callback that raises must not kill the result thread (the stdlib hangs)."""
    if cb is None:
        return None

    def guarded(value, _cb=cb):
        try:
            _cb(value)
        except BaseException:
            # SystemExit and KeyboardInterrupt too: a callback runs in the result
            # thread, where they can only come from its own code (signals reach the
            # main thread only), and ending that thread would leave every later
            # result pending. Printed, like any other exception.
            print(f"lazyshare: exception in {what} {_cb!r}:", file=sys.stderr)
            traceback.print_exc()

    return guarded


# --------------------------------------------------------------------------- the Pool
class Pool:
    """A drop-in ``multiprocessing.Pool`` whose big array arguments are mapped
    lazily into the workers instead of being pickled.

    ``threshold`` (keyword-only): out-of-band buffers of at least this many bytes are
    exported and fetched page by page on first touch; ``None`` pickles everything.

    ``memory_budget`` (keyword-only, bytes): each worker keeps at most this much of
    the pages it fetched; older pages it did not write are dropped and fetched
    again if touched (pages it wrote are kept). ``None``: no limit -- a task's
    pages are released when the task ends anyway.
    """

    _wrap_exception = True

    @staticmethod
    def Process(ctx, *args, **kwds):
        return ctx.Process(*args, **kwds)

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: Any = None,
        *,
        threshold: int | None = serialization.DEFAULT_THRESHOLD,
        memory_budget: int | None = None,
        _future_semantics: bool = False,
        _worker_env: dict[str, str] | None = None,
    ) -> None:
        # initialized early so that __del__ works if __init__ raises
        self._pool: list = []
        self._state = INIT
        self._core: _Core | None = None

        self._ctx = startmethod.resolve_context(context)
        self._maxtasksperchild = maxtasksperchild
        self._initializer = initializer
        self._initargs = initargs
        if processes is None:
            processes = startmethod.cpu_count()
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget < 0):
            raise ValueError("memory_budget must be None or a non-negative number of bytes")
        if _worker_env is not None:
            _worker_env = dict(_worker_env)
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in _worker_env.items()):
                raise TypeError("_worker_env must map variable names (str) to values (str)")
        self._processes = processes
        self._threshold = threshold
        if threshold is not None:
            _warn_if_eager()

        core = _Core(
            self._ctx,
            type(self).Process,
            processes,
            initializer,
            tuple(initargs),
            maxtasksperchild,
            threshold,
            memory_budget,
            future=_future_semantics,
            worker_env=_worker_env,
            cache_factory=_Cache,
        )
        self._core = core
        self._pool = core.pool_list
        self._cache = core.cache
        workers: list[_Worker] = []
        try:
            for slot in range(processes):
                workers.append(core.start_worker(slot))
            core.state = RUN
            dispatcher = _Dispatcher(core, workers)
            core.dispatcher = threading.Thread(
                target=dispatcher.run, name="lazyshare-dispatcher", daemon=True
            )
            core.result_thread = threading.Thread(
                target=_result_loop, args=(core,), name="lazyshare-results", daemon=True
            )
            core.feeder = threading.Thread(
                target=_feed_loop, args=(core,), name="lazyshare-feeder", daemon=True
            )
            live.pool_started(core)  # ended by the dispatcher thread, however the pool ends
            for t in (core.dispatcher, core.result_thread, core.feeder):
                t.start()
            self._terminate = util.Finalize(self, _terminate_pool, args=(core,), exitpriority=15)
        except BaseException:
            # Whatever step failed (a worker or a thread that would not start, ...):
            # stop what was started, or it would outlive the failed constructor.
            self._core = None
            _abort_start(core, workers)
            live.pool_ended(core)
            raise
        self._state = RUN

    # Globals copied as defaults: __del__ may run during interpreter shutdown.
    def __del__(self, _warn=warnings.warn, RUN=RUN):
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)
            core = getattr(self, "_core", None)
            if core is not None:
                core.wake()

    def __repr__(self) -> str:
        cls = self.__class__
        return f"<{cls.__module__}.{cls.__qualname__} state={self._state} pool_size={len(self._pool)}>"

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        self.terminate()

    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _repopulate_pool(self) -> None:
        """The stdlib's hook: the dispatcher keeps every slot filled; wake it."""
        if self._core is not None:
            self._core.wake()

    # -- submission --------------------------------------------------------------
    def _register(self, cls, args: tuple, exports: serialization.CallExports | None = None, feed=None):
        """Create a result object under the lock, so that close()/terminate() cannot
        slip between the state check and the registration (close() queues the
        feeder's end marker under the same lock)."""
        core = self._core
        with core.lock:
            if self._state != RUN or core.state != RUN:
                raise ValueError("Pool not running")
            result = cls(self, *args)
            if exports is not None and result._job in core.cache:
                core.exports[result._job] = exports
            if feed is not None:
                core.feed_q.put((result._job, feed[0], exports, feed[1], result._set_length))
            return result

    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: dict = {}) -> Any:  # noqa: B006
        """Equivalent of ``func(*args, **kwds)``. Pool must be running."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: dict = {},  # noqa: B006 (the stdlib's signature)
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> ApplyResult:
        """Asynchronous version of :meth:`apply`."""
        if callback is not None:
            callback = _guard_callback(callback, "callback")
        if error_callback is not None:
            error_callback = _guard_callback(error_callback, "error_callback")
        result = self._register(_ApplyResult, (callback, error_callback))
        self._core.enqueue(result._job, 0, transport.APPLY, None, (func, args, kwds))  # exports on demand
        return result

    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None) -> list:
        """Apply ``func`` to each element of ``iterable``, collecting the results."""
        return self._map_async(func, iterable, transport.MAP, chunksize).get()

    def starmap(
        self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]], chunksize: int | None = None
    ) -> list:
        """Like :meth:`map`, with each element unpacked as arguments."""
        return self._map_async(func, iterable, transport.STARMAP, chunksize).get()

    def map_async(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[list], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> MapResult:
        """Asynchronous version of :meth:`map`."""
        return self._map_async(func, iterable, transport.MAP, chunksize, callback, error_callback)

    def starmap_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> MapResult:
        """Asynchronous version of :meth:`starmap`."""
        return self._map_async(func, iterable, transport.STARMAP, chunksize, callback, error_callback)

    def _map_async(self, func, iterable, mode, chunksize=None, callback=None, error_callback=None):
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(iterable), len(self._pool) * 4)
            if extra:
                chunksize += 1
        if len(iterable) == 0:
            chunksize = 0
        length = len(iterable)
        core = self._core
        exports = serialization.CallExports(self._threshold, self._core)
        result = self._register(
            _MapResult,
            (
                chunksize,
                length,
                _guard_callback(callback, "callback"),
                _guard_callback(error_callback, "error_callback"),
            ),
            exports,
        )
        job = result._job
        if job not in core.cache:  # empty: already complete
            return result
        i = -1
        try:
            for i, chunk in enumerate(_get_tasks(func, iterable, chunksize)):
                if core.state == TERMINATE:
                    break
                core.enqueue(job, i, mode, exports, chunk)
        except Exception as e:
            # The iterable raised: the stdlib sends the error as task i + 1 (and
            # hangs if its __len__ promised more chunks); complete the rest too.
            nchunks = length // chunksize + bool(length % chunksize) if chunksize > 0 else i + 2
            core.result_q.put([(job, j, False, e, False) for j in range(i + 1, max(nchunks, i + 2))])
        if job not in core.cache:
            core.job_done(job, False)  # completed while pickling: close exports now
        return result

    def imap(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int = 1) -> Iterator[Any]:
        """Lazy :meth:`map`: results in order, as an iterator."""
        self._check_running()
        exports = serialization.CallExports(self._threshold, self._core)
        if chunksize == 1:
            return self._register(_IMapIterator, (), exports, (transport.APPLY, _apply_tasks(func, iterable)))
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        result = self._register(
            _IMapIterator, (), exports, (transport.MAP, _get_tasks(func, iterable, chunksize))
        )
        return (item for chunk in result for item in chunk)

    def imap_unordered(
        self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int = 1
    ) -> Iterator[Any]:
        """Like :meth:`imap`, results in completion order."""
        self._check_running()
        exports = serialization.CallExports(self._threshold, self._core)
        if chunksize == 1:
            return self._register(
                _IMapUnorderedIterator, (), exports, (transport.APPLY, _apply_tasks(func, iterable))
            )
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        result = self._register(
            _IMapUnorderedIterator, (), exports, (transport.MAP, _get_tasks(func, iterable, chunksize))
        )
        return (item for chunk in result for item in chunk)

    # -- lifecycle ---------------------------------------------------------------
    def close(self) -> None:
        """No more tasks; workers exit once the outstanding ones are done."""
        core = self._core
        if self._state == RUN:
            self._state = CLOSE
            with core.lock:
                if core.state == RUN:
                    core.state = CLOSE
                    core.feed_q.put(None)
            core.wake()

    def terminate(self) -> None:
        """Stop the workers now (SIGTERM, then SIGKILL); outstanding results fail."""
        self._state = TERMINATE
        if self._core is not None:
            self._terminate()

    def join(self) -> None:
        """Wait for the workers and the pool's threads to exit (after close/terminate)."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        elif self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        core = self._core
        for t in (core.dispatcher, core.result_thread, core.feeder):
            if t is not None:
                t.join()
        core.wakeup.close()
        for p in self._pool:
            p.join()

    def stats(self, timeout: float = 0.25) -> dict:
        """Counters per live worker (by pid) and totals over the pool's life.

        ``tasks``: task messages completed (a map chunk is one task, as for
        ``maxtasksperchild``); ``bytes_pickled``: bytes of task frames sent;
        ``bytes_lazy``: bytes workers fetched lazily; ``faults``: their page faults.
        ``outputs``: shared output arrays (:func:`lazyshare.shared`) of this pool:
        bytes workers sent back, bytes merged (changed), task messages merged,
        conflicts. ``cache``: the arrays kept across calls and their page caches, for this
        process (see :func:`lazyshare.live.stats`: bytes cached, filled, reused
        by later calls, dropped because the parent changed them, and preserved
        for snapshots).

        A result never waits for its worker's counters, so a worker may still
        be counting pages of requests in flight when its last result is in:
        this waits at most ``timeout`` seconds for such workers to report
        (``0``: the counters as they are now, for frequent readers such as a
        progress bar).
        """
        return self._core.stats(timeout)


def _apply_tasks(func, iterable):
    for x in iterable:
        yield (func, (x,), {})


def _get_tasks(func, it, size):
    it = iter(it)
    while 1:
        x = tuple(itertools.islice(it, size))
        if not x:
            return
        yield (func, x)


def _warn_if_eager() -> None:
    """Say once, in the caller's process, that workers will copy big arrays whole
    (the eager rung): workers keep quiet, else every worker started (maxtasksperchild
    churn, replacements) would print the same warning to the terminal."""
    from . import handler

    caps = handler.capabilities()
    if caps.mode == "eager":
        warnings.warn(
            f"lazyshare: {caps.reason}. To get lazy paging, run on Linux 5.11+ with "
            "/dev/userfaultfd readable by this user (Linux 6.1+), or "
            "sysctl vm.unprivileged_userfaultfd=1, or allow the userfaultfd syscall "
            "in the container's seccomp profile. See `python -m lazyshare doctor`.",
            handler.LazyshareWarning,
            stacklevel=3,
        )
