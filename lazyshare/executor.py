"""``lazyshare.Executor``: a ``concurrent.futures.Executor`` over :class:`lazyshare.Pool`.

Data flow and who owns what::

  caller threads                           _hand_over, by submit when there is room
  submit(fn, *args) ─► _State.pending ──►  (an idle worker), else by the manager
  (a Future per item; cancel() works        thread "lazyshare-executor" when a result
   while the item is still pending)         makes room; one at a time (`handover`),
                                            oldest first, while fewer than limit()
                                            are in flight: set_running_or_notify_
                                            cancel(), Pool.apply_async(fn, args,
                                            kwargs, callbacks)
                                                     │
                                           lazyshare.Pool (dispatcher, workers)
                                                     ▼
  Future.set_result / set_exception  ◄──  the pool's result thread runs the callbacks,
                                           decrements `inflight`, wakes the manager
  shutdown(): no more submissions; the manager closes and joins the pool once
  nothing is pending or in flight (after cancelling what is pending, if asked).

``_State`` (a condition variable over ``pending``, ``inflight``, ``shutdown``) is
shared by the caller threads, the manager and the pool's result thread. ``limit()``
is ``max_workers + 1`` (``ProcessPoolExecutor``'s) until the pool's moving average
of run times is known, deeper when the tasks are short (``_INFLIGHT_PER_WORKER``).

Semantics follow ``concurrent.futures.ProcessPoolExecutor`` (a task's
``SystemExit`` or ``KeyboardInterrupt`` is its future's exception and the worker
goes on; an error while pickling a result is delivered itself), with these
differences, on purpose:

* Big buffers in the arguments are mapped lazily into the worker, as for
  :class:`lazyshare.Pool`; each submitted call exports its arguments afresh.
  As with ``ProcessPoolExecutor``, the arguments are pickled when the work item is
  handed to the pool, which may be after ``submit`` returns: do not write to an
  array while a future that uses it is not done (pages are read lazily too).
* Functions and arguments travel with cloudpickle: lambdas, closures and
  interactive ``__main__`` functions work (``ProcessPoolExecutor`` refuses them).
* One failure fails one future. ``ProcessPoolExecutor`` marks itself broken
  (every pending future fails with ``BrokenProcessPool``, ``submit`` refuses)
  whenever a worker dies, a result cannot be unpickled in the parent or an
  argument cannot be unpickled in a worker; the pool knows which task each
  failure belongs to, so the other futures need not pay for it:

  - a worker that dies fails only the future it was running, with
    :class:`~lazyshare.errors.BrokenWorkerError` (a ``BrokenProcessPool`` and a
    ``WorkerLostError``); items queued behind it go to another worker, a
    replacement starts and the executor goes on;
  - a result that cannot be unpickled in the parent (even by ``SystemExit``)
    fails its future with ``BrokenProcessPool``, the error as ``__cause__``;
  - an argument that cannot be unpickled in the worker fails its future with
    that error (``SystemExit`` included) and the worker goes on.

  The executor is broken for good (outstanding futures fail, ``submit`` raises
  ``BrokenWorkerError``) only when ``max(3, max_workers)`` workers in a row fail
  to start (the initializer fails): one failed start is retried.
* Up to ``max_workers + 1`` items are handed to the pool at a time, as by
  ``ProcessPoolExecutor``, but once the pool's tasks are known to be short (by
  the workers' moving average of run time), up to ~10 ms of work per worker
  beyond the running task, at most 16 per worker: tiny tasks would otherwise be
  paced by thread switches. Handed-over items are running and cannot be
  cancelled; after a run of tiny tasks, a burst of long ones is handed over that
  deep until their run times show.
* A done-callback that raises ``SystemExit`` or ``KeyboardInterrupt`` is logged
  like any exception (``Future`` lets them through, which would end the pool's
  result thread).
* ``mp_context`` ``fork`` is replaced by forkserver with a warning, as for
  :class:`lazyshare.Pool` (the parent runs native threads ``fork()`` cannot copy).
"""

from __future__ import annotations

import collections
import functools
import itertools
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor as _StdExecutor
from concurrent.futures import Future
from concurrent.futures._base import LOGGER
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from . import policy, serialization
from .dispatcher import _ResultLoadError
from .errors import BrokenWorkerError, WorkerLostError
from .pool import Pool

__all__ = ["Executor"]

#: Work items in the pool at once (handed over, not done yet). The rest wait in
#: the executor, where ``Future.cancel()`` and ``shutdown(cancel_futures=True)``
#: still cancel them. ``ProcessPoolExecutor`` moves max_workers + 1 into its call
#: queue, and so does the executor until the pool knows how long its tasks run
#: (by the workers' moving average); when they are short it hands over up to
#: ``policy.QUEUED_WORK`` seconds of work per worker beyond the running task, at most
#: this many per worker. Tiny tasks need the deep pipe: 10,000 tiny submits on 2
#: workers took 3.2 s with 4 per worker, 1.6 s with 16 and 1.2-1.5 s with 64,
#: against 2.8 s for ProcessPoolExecutor (2-vCPU VM).
_INFLIGHT_PER_WORKER = 16


class _State:
    def __init__(self, pool: Pool, workers: int):
        self.pool = pool
        self.core = pool._core
        self.workers = workers
        self.cond = threading.Condition(threading.Lock())
        self.pending: collections.deque = collections.deque()  # (future, fn, args, kwargs)
        self.inflight = 0
        self.shutdown = False
        # Held by whoever moves items from `pending` into the pool (the manager, or
        # a submit that finds room): one at a time keeps them in submission order.
        self.handover = threading.Lock()

    def limit(self) -> int:
        """How many items may be in the pool now (see ``_INFLIGHT_PER_WORKER``)."""
        per_worker = policy.prefetch_depth(self.core.task_seconds, _INFLIGHT_PER_WORKER)
        return max(self.workers + 1, per_worker * self.workers)

    def request_shutdown(self, cancel_futures: bool = False) -> None:
        with self.cond:
            self.shutdown = True
            if cancel_futures:
                while self.pending:
                    self.pending.popleft()[0].cancel()
            self.cond.notify_all()

    def task_done(self, n: int = 1) -> None:
        with self.cond:
            self.inflight -= n
            self.cond.notify_all()


def _on_result(state: _State, fut: Future, value: Any) -> None:
    try:
        fut.set_result(value)
    except BaseException:  # a done-callback's SystemExit..., which Future lets through
        LOGGER.exception("exception calling callback for %r", fut)
    finally:
        state.task_done()


def _broken_worker(exc: WorkerLostError) -> BrokenWorkerError:
    lost = BrokenWorkerError(str(exc), exc.exitcode, exc.pid)
    lost.__cause__ = exc
    return lost


def _on_error(state: _State, fut: Future, exc: BaseException) -> None:
    try:
        if isinstance(exc, WorkerLostError) and not isinstance(exc, BrokenWorkerError):
            exc = _broken_worker(exc)
        elif isinstance(exc, _ResultLoadError):  # ProcessPoolExecutor: BrokenProcessPool
            cause = exc.__cause__
            broken = BrokenProcessPool(f"the result of this call could not be unpickled: {cause!r}")
            broken.__cause__ = cause
            exc = broken
        fut.set_exception(exc)
    except BaseException:
        LOGGER.exception("exception calling callback for %r", fut)
    finally:
        state.task_done()


def _hand_over(state: _State) -> None:
    """Move pending items into the pool while there is room, oldest first. The
    caller holds ``state.handover``."""
    pool = state.pool
    while True:
        with state.cond:
            room = state.limit() - state.inflight
            if not state.pending or room <= 0:
                return
            batch = [state.pending.popleft() for _ in range(min(room, len(state.pending)))]
            state.inflight += len(batch)
        for fut, fn, args, kwargs in batch:
            if not fut.set_running_or_notify_cancel():  # cancelled while pending
                state.task_done()
                continue
            try:
                pool.apply_async(
                    fn,
                    args,
                    kwargs,
                    callback=functools.partial(_on_result, state, fut),
                    error_callback=functools.partial(_on_error, state, fut),
                )
            except BaseException as e:  # the pool stopped under us
                fut.set_exception(e)
                state.task_done()
        # Hold nothing of the calls just handed over.
        batch = fut = fn = args = kwargs = None


def _manage(state: _State) -> None:
    pool = state.pool
    try:
        while True:
            with state.cond:
                while not (state.pending and state.inflight < state.limit()):
                    if state.shutdown and not state.pending and state.inflight == 0:
                        return
                    state.cond.wait()
            with state.handover:
                _hand_over(state)
    finally:
        with state.cond:
            for fut, *_ in state.pending:
                fut.cancel()
            state.pending.clear()
        pool.close()
        pool.join()
        _live.discard(state)


# Like concurrent.futures: the interpreter does not exit before pending futures are
# done, even after shutdown(wait=False) (threading runs these before joining threads).
_live: set[_State] = set()
_threads: weakref.WeakSet = weakref.WeakSet()
_exiting = False


def _python_exit() -> None:
    global _exiting
    _exiting = True
    for state in list(_live):
        state.request_shutdown()
    for t in list(_threads):
        t.join()


_register_atexit = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:
    _register_atexit(_python_exit)
else:  # pragma: no cover - Python without threading._register_atexit
    import atexit

    atexit.register(_python_exit)


def _process_chunk(fn: Callable[..., Any], chunk: tuple) -> list:
    """One map chunk, run in a worker (``ProcessPoolExecutor``'s ``_process_chunk``)."""
    return [fn(*args) for args in chunk]


def _chunks(iterables: tuple, chunksize: int) -> Iterator[tuple]:
    it = zip(*iterables)
    while True:
        chunk = tuple(itertools.islice(it, chunksize))
        if not chunk:
            return
        yield chunk


def _result_or_cancel(fut: Future, timeout: float | None = None) -> Any:
    try:
        try:
            return fut.result(timeout)
        finally:
            fut.cancel()
    finally:
        del fut  # break the reference cycle with the exception's traceback


class Executor(_StdExecutor):
    """A ``concurrent.futures.Executor`` whose big array arguments are mapped lazily
    into the workers instead of being pickled.

    The constructor takes ``ProcessPoolExecutor``'s arguments; ``mp_context`` is a
    multiprocessing context (forkserver by default; ``fork`` is replaced by
    forkserver with a warning, as in :class:`lazyshare.Pool`). ``threshold``
    (keyword-only): buffers of at least this many bytes go lazily; ``None`` pickles
    everything. Workers start at construction.

    A worker that dies fails only the future it was running, with
    :class:`lazyshare.BrokenWorkerError` (a
    ``concurrent.futures.process.BrokenProcessPool``); the executor goes on. The
    module docstring lists every difference from ``ProcessPoolExecutor``.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        *,
        max_tasks_per_child: int | None = None,
        threshold: int | None = serialization.DEFAULT_THRESHOLD,
        memory_budget: int | None = None,
    ) -> None:
        self._state: _State | None = None
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        pool = Pool(
            max_workers,
            initializer,
            initargs,
            max_tasks_per_child,
            mp_context,
            threshold=threshold,
            memory_budget=memory_budget,
            _future_semantics=True,  # a task's BaseException and pickling errors as the stdlib's
        )
        self._max_workers = len(pool._pool)
        state = _State(pool, self._max_workers)
        self._state = state
        _live.add(state)
        self._thread = threading.Thread(target=_manage, args=(state,), name="lazyshare-executor", daemon=True)
        self._thread.start()
        _threads.add(self._thread)
        # A forgotten executor still finishes its work and closes its pool.
        weakref.finalize(self, state.request_shutdown)

    def __reduce__(self):
        raise NotImplementedError("executor objects cannot be passed between processes or pickled")

    def __repr__(self) -> str:
        state = self._state
        what = "shut down" if state is None or state.shutdown else "running"
        return f"<lazyshare.Executor {what} max_workers={getattr(self, '_max_workers', None)}>"

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)``; returns a :class:`concurrent.futures.Future`."""
        state = self._state
        with state.cond:
            if state.shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            broken = state.core.broken  # for good: no worker could start, or the pool crashed
            if isinstance(broken, WorkerLostError):
                raise _broken_worker(broken)
            if broken is not None:
                raise BrokenProcessPool(str(broken)) from broken
            fut: Future = Future()
            state.pending.append((fut, fn, args, kwargs))
            room = state.inflight < state.limit()
        if room:  # hand it over now, as ProcessPoolExecutor does with idle workers
            if state.handover.acquire(blocking=False):
                try:
                    _hand_over(state)
                finally:
                    state.handover.release()
            else:  # someone else is handing over and may just have looked: the manager will
                with state.cond:
                    state.cond.notify_all()
        # else: a result makes room and wakes the manager
        return fut

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """``concurrent.futures.Executor.map``: every call is submitted now, the
        results come lazily, in order; ``timeout`` counts from this call. With
        ``chunksize`` > 1, that many calls travel (and export their arguments) as
        one work item."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if timeout is None else time.monotonic() + timeout
        if chunksize == 1:
            fs = [self.submit(fn, *args) for args in zip(*iterables)]
        else:
            fs = [self.submit(_process_chunk, fn, chunk) for chunk in _chunks(iterables, chunksize)]

        def results() -> Iterator[Any]:
            # Nothing yielded stays referenced here (no local holds a result, a
            # chunk's list is consumed from its end), as in concurrent.futures.
            try:
                fs.reverse()  # pop from the end: a future is dropped once yielded
                while fs:
                    wait = None if end is None else end - time.monotonic()
                    if chunksize == 1:
                        yield _result_or_cancel(fs.pop(), wait)
                    else:
                        chunk = _result_or_cancel(fs.pop(), wait)
                        chunk.reverse()
                        while chunk:
                            yield chunk.pop()
            finally:
                for f in fs:
                    f.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submissions. ``cancel_futures``: cancel the futures not yet handed
        to a worker. ``wait``: return once every other future is done and the
        workers have exited; otherwise they finish in the background (the
        interpreter waits for them before exiting)."""
        state = self._state
        if state is None:
            return
        state.request_shutdown(cancel_futures)
        if wait:
            self._thread.join()

    def stats(self, timeout: float = 0.25) -> dict:
        """The pool's counters (:meth:`lazyshare.Pool.stats`): tasks, bytes
        pickled, bytes moved lazily and page faults, per worker and in total."""
        return self._state.pool.stats(timeout)
