"""``lazyshare.pool.Pool``: a drop-in ``multiprocessing.Pool`` over ZeroMQ.

Data flow and who owns what::

  caller threads (Pool API)                     feeder thread "lazyshare-feeder"
  apply_async / map_async / starmap_async       imap / imap_unordered: walks the
    pickle in the caller (snapshot at             iterable lazily, pickles each task,
    submission, CallExports per call)             at most a window ahead of the
                                                  results (see _FEED_LIMIT)
        │ append _Task                                  │ append _Task
        ▼                                               ▼
  ┌─ pending (deque, append: any thread, popleft/appendleft: dispatcher) ─┐
  │  + wake-up pipe (any thread writes one byte when `wake_flag` is off)  │
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
  ``_QUEUED_WORK`` seconds of queued tasks (by the moving average of task time, at
  most ``_MAX_PREFETCH``), so tiny tasks stream. Long tasks, a shallow backlog and
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
yet) fit a window: fewer than ``_FEED_AHEAD`` tasks, fewer than ``_FEED_LIMIT`` of
them waiting to be sent, and less than ``_FEED_BYTES`` exported or pickled for
them (but room for ``2 * processes`` tasks whatever their size). The stdlib's
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

import collections
import errno
import itertools
import multiprocessing
import os
import pickle
import queue
import select
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator
from multiprocessing import TimeoutError, util
from multiprocessing.connection import wait as _wait_sentinels
from multiprocessing.pool import (
    CLOSE,
    INIT,
    RUN,
    TERMINATE,
    ApplyResult,
    ExceptionWithTraceback,
    IMapIterator,
    IMapUnorderedIterator,
    MapResult,
    MaybeEncodingError,
    RemoteTraceback,
)
from typing import Any, Callable

import numpy as np
import zmq

from . import serialization, transport
from .errors import LazyshareError, WorkerLostError

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

# --------------------------------------------------------------------------- tuning
#: Queued work per worker the dispatcher aims for (seconds, by the moving average
#: of a worker's time per task, unpickling and pickling included). It must cover
#: the dispatcher's reaction time: a round trip is ~0.6 ms on the 2-vCPU VM
#: (sequential ``apply``; the stdlib's too), but while the caller's thread runs
#: Python (a loop of ``apply_async``) the dispatcher gets the GIL only every switch
#: interval (5 ms). With 64 tasks in flight, 10,000 tiny ``apply_async`` took 2x the
#: stdlib's time, workers idling between GIL slots. Tasks longer than this go one
#: at a time, balanced exactly as by the stdlib's shared queue.
_QUEUED_WORK = max(0.002, 2 * sys.getswitchinterval())
#: Cap on tasks in flight per worker.
_MAX_PREFETCH = 512
#: After a worker's sentinel fires, results it sent just before dying may still be
#: in the kernel socket buffer or libzmq's I/O thread: wait this long for them.
_DEATH_GRACE = 0.1
#: terminate(): SIGTERM, then SIGKILL after this long.
_TERM_GRACE = 1.0
#: How long a retiring worker waits for the parent's acknowledgement of its last
#: message (it must not exit before libzmq has delivered its results).
_BYE_TIMEOUT = 5.0
#: The feeder stops pulling from an imap iterable while this many tasks wait to be
#: sent (tasks go out in batches: it refills at half), and while the stream's
#: tasks not done yet (sent, waiting, or their result not handled yet) reach
#: ``_FEED_AHEAD`` (it refills at three quarters) or hold ``_FEED_BYTES`` (bytes
#: exported and pickled for them): the window a stream runs ahead of its results.
#: 10,000 tiny tasks keep 500-650 in the window (``_FEED_LIMIT`` binds); a stream
#: of 2 MiB arrays holds ~32 of them. Below ``2 * processes`` tasks there is always
#: room (a worker has one running and one queued), and a task that added less
#: than ``_FEED_BYTES // _FEED_AHEAD`` makes room for the next (views of a base
#: already exported add nothing), so the window holds at most ~2 * ``_FEED_BYTES``
#: plus one task.
_FEED_LIMIT = 256
_FEED_AHEAD = 1024
_FEED_BYTES = 64 << 20


class PoolTerminatedError(LazyshareError):
    """The pool was terminated before this task completed."""


# =========================================================================== results
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


# =========================================================================== parent
class _Task:
    __slots__ = ("job", "index", "mode", "frames", "nbytes")

    def __init__(self, job: int, index: int, mode: int, frames: list, nbytes: int):
        self.job = job
        self.index = index
        self.mode = mode
        self.frames = frames
        self.nbytes = nbytes


class _Worker:
    """Parent-side record of one worker process (owned by the dispatcher)."""

    __slots__ = (
        "num",
        "wid",
        "name",
        "slot",
        "process",
        "pid",
        "sentinel",
        "hello",
        "ready",
        "stopping",
        "bye",
        "dead",
        "dead_at",
        "inflight",
        "budget",
        "tasks",
        "bytes_pickled",
        "bytes_lazy",
        "faults",
    )

    def __init__(self, num: int, slot: int, process, maxtasks: int | None):
        self.num = num
        self.wid = b"w%d" % num
        self.name = process.name
        self.slot = slot
        self.process = process
        self.pid = process.pid
        self.sentinel = process.sentinel
        self.hello = False  # said hello once (its initializer succeeded)
        self.ready = False  # said hello and can be sent tasks: the ROUTER routes to it
        self.stopping = False  # was sent STOP
        self.bye = False  # said goodbye: everything it sent has arrived
        self.dead = False
        self.dead_at = 0.0
        self.inflight: dict[tuple[int, int], _Task] = {}  # (job, index) -> task, oldest first
        self.budget = -1 if maxtasks is None else maxtasks  # tasks it may still be sent
        self.tasks = 0
        self.bytes_pickled = 0
        self.bytes_lazy = 0
        self.faults = 0

    def counters(self) -> dict:
        return {
            "name": self.name,
            "tasks": self.tasks,
            "bytes_pickled": self.bytes_pickled,
            "bytes_lazy": self.bytes_lazy,
            "faults": self.faults,
        }


def _describe_exit(w: _Worker, exitcode) -> str:
    if exitcode is None:
        how = "disappeared"
    elif exitcode < 0:
        try:
            how = f"died with signal {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"died with signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    return f"worker {w.name} (pid {w.pid}) {how}"


class _Core:
    """Everything the pool's threads share. Holds no reference to the ``Pool``, so
    that dropping the last reference to a pool terminates it, as in the stdlib."""

    def __init__(
        self,
        ctx,
        process_factory,
        processes,
        initializer,
        initargs,
        maxtasks,
        threshold,
        budget=None,
        future=False,
        worker_env=None,
    ):
        self.ctx = ctx
        self.process_factory = process_factory
        self.processes = processes
        self.init_blob = None if initializer is None else serialization._CloudCallable(initializer)
        self.initargs = initargs
        self.maxtasks = maxtasks
        self.threshold = threshold
        self.threshold_value = float("inf") if threshold is None else int(threshold)
        self.budget = budget
        self.future = future  # workers behave as ProcessPoolExecutor's (see _run_task)
        self.worker_env = worker_env  # applied on top of os.environ in every worker
        self.owner_pid = os.getpid()
        self.task_seconds: float | None = None  # the dispatcher's moving average of run times

        self.lock = threading.Lock()  # state changes vs submissions
        self.state = INIT
        self.cache = _Cache(self)
        self.exports: dict[int, serialization.CallExports] = {}
        self.pending: collections.deque[_Task] = collections.deque()
        self.result_q: queue.SimpleQueue = queue.SimpleQueue()
        self.feed_q: queue.SimpleQueue = queue.SimpleQueue()
        self.feed_room = threading.Event()
        self.feed: _Feed | None = None  # the window of the one the feeder walks
        self.pool_list: list = []  # Pool._pool: one Process per slot
        self.broken: BaseException | None = None

        self.wake_flag = False
        # Set by the dispatcher when it could send more than is pending: only then
        # does a new task need to wake it (else a result will, and it dispatches).
        self.hungry = True
        self.wake_lock = threading.Lock()
        self.stats_lock = threading.Lock()
        self.live: dict[bytes, _Worker] = {}
        self.dead_totals = {"tasks": 0, "bytes_pickled": 0, "bytes_lazy": 0, "faults": 0}

        self.wake_r, self.wake_w = os.pipe()
        self.router = None
        try:  # a failure closes what was opened (Pool.__init__ never gets this object)
            os.set_blocking(self.wake_r, False)
            os.set_blocking(self.wake_w, False)
            self.endpoint = transport.new_endpoint("pool")
            self.router = transport.context().socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.router.setsockopt(zmq.SNDHWM, 0)
            self.router.setsockopt(zmq.RCVHWM, 0)
            self.router.bind(self.endpoint)
        except BaseException:
            if self.router is not None:
                self.router.close(linger=0)
            os.close(self.wake_r)
            os.close(self.wake_w)
            raise

        self.worker_counter = itertools.count(1)
        self.dispatcher: threading.Thread | None = None
        self.result_thread: threading.Thread | None = None
        self.feeder: threading.Thread | None = None
        self.terminated = False

    # -- any thread ---------------------------------------------------------------
    def wake(self) -> None:
        if self.wake_flag:
            return
        self.wake_flag = True
        with self.wake_lock:
            if self.wake_w is not None:
                try:
                    os.write(self.wake_w, b"\0")
                except OSError:  # full: the dispatcher will wake anyway
                    pass

    def job_done(self, job: int, empty: bool) -> None:
        exports = self.exports.pop(job, None)
        if exports is not None:
            try:
                exports.close()
            except Exception:
                traceback.print_exc()
        if empty:
            self.wake()

    def task_done(self, job: int, index: int) -> None:
        """The result thread has a task's result: release the segments only it
        used, and count it out of the feeder's window. Never raises."""
        try:
            exports = self.exports.get(job)
            if exports is not None:
                exports.task_done(index)
            feed = self.feed
            if feed is not None and feed.job == job:
                nbytes = feed.sizes.pop(index, None)
                if nbytes is not None:
                    feed.done_bytes += nbytes
                    if feed.waiting and feed.room(self, True):
                        self.feed_room.set()
        except Exception:
            traceback.print_exc()

    def enqueue(
        self,
        job: int,
        index: int,
        mode: int,
        exports: serialization.CallExports | None,
        payload,
        feed: _Feed | None = None,
    ) -> None:
        """Pickle one task and queue it (any API thread, or the feeder with its
        ``feed``). ``exports`` None: created on demand, for an apply whose task
        turns out to need it. The task's segments are released when its result
        is in (``task_done``), the rest when the call completes (``job_done``)."""
        new = 0
        try:
            frames = serialization._dumps_small(self.threshold_value, payload)
            if frames is None:
                if exports is None:
                    exports = serialization.CallExports(self.threshold)
                    self.exports[job] = exports
                frames = exports.dumps(payload, index)
                new = exports.bytes_new
        except BaseException as e:  # SystemExit too (a hang otherwise); the stdlib's task handler: cache[job]._set(idx, (False, e))
            self.result_q.put([(job, index, False, e, False)])
            return
        if job not in self.cache:  # failed meanwhile (terminate): nothing to run
            self.job_done(job, False)
            return
        task = _Task(job, index, mode, frames, sum(len(f) for f in frames))
        if feed is not None:  # counted before it can run: its result finds it
            feed.sizes[index] = task.nbytes
            feed.fed_bytes += task.nbytes
            feed.last = task.nbytes + new
        self.pending.append(task)
        if self.hungry:
            self.wake()

    def start_worker(self, slot: int) -> _Worker:
        num = next(self.worker_counter)
        wid = b"w%d" % num
        p = self.process_factory(
            self.ctx,
            target=_worker_main,
            args=(
                self.endpoint,
                wid,
                self.owner_pid,
                self.init_blob,
                self.initargs,
                self.maxtasks,
                self.budget,
                self.future,
                _environ_snapshot(self.worker_env),
            ),
            name=f"lazyshare-worker-{num}",
        )
        p.daemon = True
        p.start()
        w = _Worker(num, slot, p, self.maxtasks)
        with self.stats_lock:
            self.live[w.wid] = w
        if slot < len(self.pool_list):
            self.pool_list[slot] = p
        else:
            self.pool_list.append(p)
        return w

    def forget_worker(self, w: _Worker) -> None:
        with self.stats_lock:
            if self.live.pop(w.wid, None) is not None:
                t = self.dead_totals
                t["tasks"] += w.tasks
                t["bytes_pickled"] += w.bytes_pickled
                t["bytes_lazy"] += w.bytes_lazy
                t["faults"] += w.faults

    def stats(self) -> dict:
        with self.stats_lock:
            workers = {w.pid: w.counters() for w in self.live.values()}
            totals = dict(self.dead_totals)
        for c in workers.values():
            for k in totals:
                totals[k] += c[k]
        return {"workers": workers, "totals": totals}


# --------------------------------------------------------------------------- dispatcher
class _Dispatcher:
    def __init__(self, core: _Core, workers: list[_Worker]):
        self.core = core
        self.workers: dict[bytes, _Worker] = {w.wid: w for w in workers}
        self.by_fd: dict[int, _Worker] = {w.sentinel: w for w in workers}
        self.dying: list[_Worker] = []
        self.ema: float | None = None  # moving average of task run time
        self.limit = 1  # tasks in flight per worker (1 until run times are known)
        self.maintain_due = True  # a slot may be free
        self.startup_failures = 0
        self.init_error: BaseException | None = None
        self.poller = zmq.Poller()
        self.poller.register(core.router, zmq.POLLIN)
        self.poller.register(core.wake_r, zmq.POLLIN)
        for w in workers:
            self.poller.register(w.sentinel, zmq.POLLIN)

    # -- main loop ---------------------------------------------------------------
    def run(self) -> None:
        core = self.core
        try:
            self._loop()
        except BaseException as e:  # a bug: fail loudly rather than hang
            traceback.print_exc()
            core.broken = core.broken or LazyshareError(f"lazyshare pool dispatcher crashed: {e!r}")
            self._kill_all()
        finally:
            self._shutdown()

    def _loop(self) -> None:
        core = self.core
        router = core.router
        wake_r = core.wake_r
        poll = self.poller.poll
        while True:
            events = poll(self._timeout())
            for sock, _ in events:
                if sock is router:
                    self._drain_router()
                elif sock == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    core.wake_flag = False
                    self.maintain_due = True  # e.g. Pool._repopulate_pool()
                else:
                    w = self.by_fd.get(sock)
                    if w is not None:
                        self._on_exit(w)
            if self.dying:
                self._reap_dying()
            state = core.state
            if state == TERMINATE:
                self._kill_all()
                return
            if core.broken is not None:
                core.hungry = True
                self._fail_pending(core.broken)
            else:
                if self.maintain_due:
                    self._maintain()
                self._dispatch()
            if state == CLOSE and not self._outstanding():
                self._stop_workers()
                if not self.workers:
                    return

    def _timeout(self) -> int:
        if not self.dying:
            return transport.POLL_MS
        left = min(w.dead_at for w in self.dying) + _DEATH_GRACE - time.monotonic()
        return max(1, min(transport.POLL_MS, int(left * 1000) + 1))

    def _outstanding(self) -> bool:
        return bool(self.core.cache or self.core.pending or any(w.inflight for w in self.workers.values()))

    # -- messages from workers ---------------------------------------------------
    def _drain_router(self) -> None:
        router = self.core.router
        results: list = []  # handed to the result thread in one go
        try:
            for _ in range(4096):  # then go dispatch: keep workers fed
                try:
                    msg = transport.recv(router, transport.NOBLOCK)
                except zmq.Again:
                    return
                w = self.workers.get(msg[0].bytes)
                if w is None:  # a worker already declared dead: its news is stale
                    continue
                kind = msg[1].bytes
                if kind == transport.RESULT:
                    self._on_result(w, msg, results)
                else:
                    self._on_control(w, kind, msg)
        finally:
            if results:
                self.core.result_q.put(results)

    def _on_control(self, w: _Worker, kind: bytes, msg) -> None:
        if kind == transport.READY:
            self._on_ready(w)
        elif kind == transport.BYE:
            self._on_bye(w, msg)
        elif kind == transport.INIT_FAILED:
            self._on_init_failed(w, msg)

    def _on_result(self, w: _Worker, msg, results: list) -> None:
        job, index, seconds, lazy, faults = transport.RESULT_HDR.unpack(msg[2].buffer)
        if w.inflight.pop((job, index), None) is None:
            return
        w.tasks += 1
        w.bytes_lazy = lazy
        w.faults = faults
        ema = self.ema
        self.ema = ema = seconds if ema is None else 0.8 * ema + 0.2 * seconds
        self.core.task_seconds = ema
        self.limit = 1 + min(_MAX_PREFETCH - 1, int(_QUEUED_WORK / max(ema, 1e-6)))
        results.append((job, index, None, [f.buffer for f in msg[3:]], True))

    def _on_ready(self, w: _Worker) -> None:
        w.hello = w.ready = True
        self.startup_failures = 0

    def _on_bye(self, w: _Worker, msg) -> None:
        w.bye = True
        w.ready = False
        if len(msg) > 2:
            w.bytes_lazy, w.faults = transport.COUNTERS_HDR.unpack(msg[2].buffer)
        self._send(w, [transport.ACK])
        self.maintain_due = True  # its slot is free: start a successor

    def _on_init_failed(self, w: _Worker, msg) -> None:
        try:
            ok, exc = serialization.loads_result([f.buffer for f in msg[2:]])
        except Exception as e:
            exc = e
        self.init_error = exc
        self._send(w, [transport.ACK])

    def _send(self, w: _Worker, frames: list) -> bool:
        try:
            transport.send(self.core.router, [w.wid, *frames])
            return True
        except zmq.ZMQError:  # EHOSTUNREACH: gone; its sentinel will tell
            w.ready = False
            return False

    # -- worker exits ------------------------------------------------------------
    def _on_exit(self, w: _Worker) -> None:
        self.maintain_due = True
        self.poller.unregister(w.sentinel)
        del self.by_fd[w.sentinel]
        w.process.join(1.0)
        w.dead = True
        w.ready = False
        if w.inflight and not w.bye:
            w.dead_at = time.monotonic()
            self.dying.append(w)  # results may still be on their way
        else:
            self._finish(w)

    def _reap_dying(self) -> None:
        now = time.monotonic()
        due = [w for w in self.dying if now >= w.dead_at + _DEATH_GRACE]
        if not due:
            return
        self._drain_router()  # last chance for results sent just before death
        for w in due:
            self.dying.remove(w)
            self._finish(w)

    def _finish(self, w: _Worker) -> None:
        exitcode = w.process.exitcode
        if w.inflight:
            # A worker runs its tasks in the order it got them: the oldest one it
            # had not answered was running (or about to) and fails; the ones
            # queued behind it never started and go back to the front of the
            # queue, for another worker (unless the pool is being torn down).
            tasks = list(w.inflight.values())
            w.inflight.clear()
            running, queued = tasks[0], tasks[1:]
            what = _describe_exit(w, exitcode)
            err = WorkerLostError(f"{what} while running this task", exitcode=exitcode, pid=w.pid)
            self.core.result_q.put([(running.job, running.index, False, err, False)])
            if self.core.state == TERMINATE or self.core.broken is not None:
                for t in queued:
                    err = WorkerLostError(
                        f"{what} while this task was queued on it", exitcode=exitcode, pid=w.pid
                    )
                    self.core.result_q.put([(t.job, t.index, False, err, False)])
            else:
                self.core.pending.extendleft(reversed(queued))
        del self.workers[w.wid]
        self.core.forget_worker(w)
        if not w.hello and self.core.state != TERMINATE:
            self.startup_failures += 1
            if self.startup_failures >= max(3, self.core.processes):
                self._break(w, exitcode)

    def _break(self, w: _Worker, exitcode) -> None:
        core = self.core
        msg = f"{_describe_exit(w, exitcode)} before it was ready, {self.startup_failures} times in a row"
        if self.init_error is not None:
            msg += f": the initializer failed with {self.init_error!r}"
        err = WorkerLostError(msg, exitcode=exitcode, pid=w.pid)
        err.__cause__ = self.init_error
        core.broken = err
        print(f"lazyshare: pool is broken: {msg}", file=sys.stderr)

    # -- keeping the pool populated -----------------------------------------------
    def _maintaining(self) -> bool:
        core = self.core
        if core.broken is not None:
            return False
        return core.state == RUN or (core.state == CLOSE and self._outstanding())

    def _maintain(self) -> None:
        """Start a worker in every free slot: a slot frees when its worker says
        goodbye (maxtasksperchild) or dies (then at once, before the grace)."""
        self.maintain_due = False
        if not self._maintaining():
            return
        used = {x.slot for x in self.workers.values() if not x.bye and not x.dead}
        for slot in range(self.core.processes):
            if slot not in used:
                self._start(slot)

    def _start(self, slot: int) -> None:
        try:
            w = self.core.start_worker(slot)
        except Exception:
            traceback.print_exc()  # retried at the next wake-up
            self.maintain_due = True
            return
        self.workers[w.wid] = w
        self.by_fd[w.sentinel] = w
        self.poller.register(w.sentinel, zmq.POLLIN)

    # -- handing out tasks ---------------------------------------------------------
    def _dispatch(self) -> None:
        core = self.core
        pending = core.pending
        while True:
            if pending:
                self._dispatch_some()
            if pending:  # every worker is full: a result will call us again
                core.hungry = False
                return
            core.hungry = True  # then look again: a task may have come in between
            if not pending:
                return

    def _dispatch_some(self) -> None:
        core = self.core
        pending = core.pending
        ready = [w for w in self.workers.values() if w.ready and not w.stopping and w.budget != 0]
        if not ready:
            return
        # Queue ahead only while the backlog is deep: a task queued behind a long one
        # waits for it, where the stdlib's shared queue would hand it to an idle
        # worker. With a shallow backlog (a few tasks, or the tail of a map) every
        # worker gets one task at a time, so the order of [long, short, short] and
        # tasks that wait for one another behave as with the stdlib.
        backlog = len(pending) + sum(len(w.inflight) for w in ready)
        limit = max(1, min(self.limit, backlog // (2 * len(ready))))
        router = core.router
        while pending and ready:
            best = ready[0]
            n = len(best.inflight)
            for w in ready:
                if len(w.inflight) < n:
                    best, n = w, len(w.inflight)
            if n >= limit:
                break
            task = pending.popleft()
            try:
                transport.send(
                    router,
                    [
                        best.wid,
                        transport.TASK,
                        transport.TASK_HDR.pack(task.job, task.index, task.mode),
                        *task.frames,
                    ],
                )
            except zmq.ZMQError:  # not delivered (peer gone): give it to someone else
                pending.appendleft(task)
                best.ready = False
                ready.remove(best)
                continue
            best.inflight[(task.job, task.index)] = task
            best.bytes_pickled += task.nbytes
            if best.budget > 0:
                best.budget -= 1
                if best.budget == 0:
                    ready.remove(best)
        feed = core.feed
        if feed is not None and feed.waiting and feed.room(core, True):
            core.feed_room.set()

    def _fail_pending(self, err: BaseException) -> None:
        pending = self.core.pending
        while pending:
            task = pending.popleft()
            e = WorkerLostError(str(err), getattr(err, "exitcode", None), getattr(err, "pid", None))
            e.__cause__ = err.__cause__
            self.core.result_q.put([(task.job, task.index, False, e, False)])
        self.core.feed_room.set()

    # -- stopping ---------------------------------------------------------------
    def _send_stop(self, w: _Worker) -> None:
        if not w.stopping and not w.bye and not w.dead:
            w.stopping = True
            self._send(w, [transport.STOP])

    def _stop_workers(self) -> None:
        for w in list(self.workers.values()):
            if w.ready:
                self._send_stop(w)
            # a starting worker gets STOP when it says hello (_on_ready)

    def _kill_all(self) -> None:
        alive = [w for w in self.workers.values() if not w.dead]
        for w in alive:
            try:
                w.process.terminate()
            except Exception:
                pass
        deadline = time.monotonic() + _TERM_GRACE
        left = [w for w in alive if w.process.exitcode is None]
        while left and time.monotonic() < deadline:
            _wait_sentinels([w.sentinel for w in left], timeout=max(0.0, deadline - time.monotonic()))
            left = [w for w in left if w.process.exitcode is None]
        for w in left:
            try:
                w.process.kill()
            except Exception:
                pass
        for w in alive:
            w.process.join(5.0)
        for w in list(self.workers.values()):
            w.inflight.clear()  # the result thread fails what is left in the cache
            self.core.forget_worker(w)
        self.workers.clear()
        self.dying.clear()
        self.core.pending.clear()

    def _shutdown(self) -> None:
        core = self.core
        try:
            core.router.close(linger=0)
        finally:
            try:
                os.unlink(transport.endpoint_path(core.endpoint))
            except OSError:
                pass
            core.feed_room.set()
            _close_wake_pipe(core)
            core.result_q.put(None)


# --------------------------------------------------------------------------- result thread
class _ResultLoadError(MaybeEncodingError):
    """A result the parent could not unpickle; ``__cause__`` is the error it raised
    (``lazyshare.Executor`` turns it into ``BrokenProcessPool``, as the stdlib's)."""


def _load_error(e: BaseException, job: int, index: int) -> _ResultLoadError:
    # Keep the traceback from where unpickling raised, without this thread's frame
    # and with the frames' locals (the result's buffers) cleared.
    tb = e.__traceback__
    e.__traceback__ = tb.tb_next if tb is not None else None
    traceback.clear_frames(e.__traceback__)
    err = _ResultLoadError(e, f"<result of task {index} of job {job}>")
    err.__cause__ = e
    return err


def _result_loop(core: _Core) -> None:
    cache = core.cache
    get = core.result_q.get
    while True:
        batch = get()
        if batch is None:
            break
        for job, index, ok, payload, raw in batch:
            if raw:
                try:
                    ok, payload = serialization.loads_result(payload)
                except BaseException as e:  # SystemExit from a __reduce__ too: this thread must go on
                    ok, payload = False, _load_error(e, job, index)
            core.task_done(job, index)  # its exports go before the caller sees it
            try:
                cache[job]._set(index, (ok, payload))
            except KeyError:
                pass
            except BaseException:
                traceback.print_exc()
        batch = payload = None  # noqa: F841 (release results promptly)
    # The dispatcher is gone: nothing else can complete; fail what is left.
    if cache:
        if core.state == TERMINATE:
            err: BaseException = PoolTerminatedError("the pool was terminated before this task completed")
        else:
            err = core.broken or LazyshareError("the pool stopped before this task completed")
        for result in list(cache.values()):
            try:
                result._fail_all(err)
            except BaseException:
                traceback.print_exc()


# --------------------------------------------------------------------------- feeder thread
class _Feed:
    """The window of the imap call the feeder walks: ``sizes`` (index -> pickled
    bytes of each task not done, so its length is the window's count) is filled
    by the feeder and emptied by the result thread, one atomic dict operation at
    a time; ``fed_bytes``/``last`` are written by the feeder only, ``done_bytes``
    by the result thread only."""

    __slots__ = ("job", "exports", "sizes", "fed_bytes", "done_bytes", "last", "waiting")

    def __init__(self, job: int, exports: serialization.CallExports | None):
        self.job = job
        self.exports = exports
        self.sizes: dict[int, int] = {}
        self.fed_bytes = self.done_bytes = self.last = 0
        self.waiting = False

    def room(self, core: _Core, refill: bool = False) -> bool:
        """Whether the feeder may pull the next task (``refill``: whether a
        waiting feeder should be woken, with hysteresis on the counts)."""
        ahead = len(self.sizes)
        if ahead >= (_FEED_AHEAD * 3 // 4 if refill else _FEED_AHEAD):
            return False
        if len(core.pending) >= (_FEED_LIMIT // 2 if refill else _FEED_LIMIT):
            return False
        if ahead < 2 * core.processes or self.last < _FEED_BYTES // _FEED_AHEAD:
            return True
        held = self.fed_bytes - self.done_bytes
        if self.exports is not None:
            held += self.exports.bytes_live
        return held < _FEED_BYTES


def _feed_loop(core: _Core) -> None:
    for item in iter(core.feed_q.get, None):
        job, mode, exports, tasks, set_length = item
        feed = core.feed = _Feed(job, exports)
        tasks = enumerate(tasks)
        i = -1
        try:
            while True:
                # Room first, then pull: the iterable is not consumed ahead of it.
                if not feed.room(core):
                    while core.state != TERMINATE and core.broken is None:
                        feed.waiting = True  # then look: a result or the dispatcher wakes us
                        core.feed_room.clear()
                        if feed.room(core):
                            break
                        core.feed_room.wait(transport.POLL_MS / 1000)
                    feed.waiting = False
                if core.state == TERMINATE:
                    break
                try:
                    i, payload = next(tasks)
                except StopIteration:
                    set_length(i + 1)
                    break
                core.enqueue(job, i, mode, exports, payload, feed)
                payload = None
        except Exception as e:  # the iterable raised: the stdlib's _guarded_task_generation
            core.result_q.put([(job, i + 1, False, e, False)])
            set_length(i + 2)
        finally:
            core.feed = None
            item = tasks = exports = payload = feed = None


def _terminate_pool(core: _Core) -> None:
    """Kill workers, stop threads, fail outstanding results. Safe to call twice and
    from any thread (also from a callback or the garbage collector)."""
    with core.lock:
        if core.terminated:
            return
        core.terminated = True
        core.state = TERMINATE
    core.wake()
    core.feed_room.set()
    core.feed_q.put(None)
    me = threading.current_thread()
    for t in (core.dispatcher, core.result_thread):
        if t is not None and t is not me and t.is_alive():
            t.join()
    if _started(core.feeder) and core.feeder is not me:
        core.feeder.join(5.0)  # only a user iterable that blocks can delay it
    for p in core.pool_list:
        if p.exitcode is None and p.pid is not None and p is not me:
            p.join(1.0)


def _started(t: threading.Thread | None) -> bool:
    return t is not None and t.ident is not None


def _abort_start(core: _Core, workers: list[_Worker]) -> None:
    """Undo a ``Pool.__init__`` that failed part-way: workers, threads, the socket,
    its file and the wake-up pipe. Errors here do not hide the original one."""
    try:
        if _started(core.dispatcher):
            _terminate_pool(core)  # the dispatcher kills workers and closes what it owns
            return
        with core.lock:
            core.terminated = True
            core.state = TERMINATE
        procs = {id(p): p for p in [*core.pool_list, *(w.process for w in workers)]}
        alive = [p for p in procs.values() if p.pid is not None and p.exitcode is None]
        for p in alive:
            p.terminate()
        deadline = time.monotonic() + _TERM_GRACE
        left = alive
        while left and time.monotonic() < deadline:
            _wait_sentinels([p.sentinel for p in left], timeout=max(0.0, deadline - time.monotonic()))
            left = [p for p in left if p.exitcode is None]
        for p in left:
            p.kill()
        for p in alive:
            p.join(5.0)
        core.router.close(linger=0)
        try:
            os.unlink(transport.endpoint_path(core.endpoint))
        except OSError:
            pass
        _close_wake_pipe(core)
        core.result_q.put(None)
        core.feed_q.put(None)
        for t in (core.result_thread, core.feeder):
            if _started(t):
                t.join(5.0)
    except BaseException:
        traceback.print_exc()


def _close_wake_pipe(core: _Core) -> None:
    with core.wake_lock:
        if core.wake_w is not None:
            os.close(core.wake_w)
            os.close(core.wake_r)
            core.wake_w = None


# =========================================================================== the Pool
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

        self._ctx = _resolve_context(context)
        self._maxtasksperchild = maxtasksperchild
        self._initializer = initializer
        self._initargs = initargs
        if processes is None:
            processes = _cpu_count()
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
            for t in (core.dispatcher, core.result_thread, core.feeder):
                t.start()
            self._terminate = util.Finalize(self, _terminate_pool, args=(core,), exitpriority=15)
        except BaseException:
            # Whatever step failed (a worker or a thread that would not start, ...):
            # stop what was started, or it would outlive the failed constructor.
            self._core = None
            _abort_start(core, workers)
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
        exports = serialization.CallExports(self._threshold)
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
        exports = serialization.CallExports(self._threshold)
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
        exports = serialization.CallExports(self._threshold)
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
        _close_wake_pipe(core)
        for p in self._pool:
            p.join()

    def stats(self) -> dict:
        """Counters per live worker (by pid) and totals over the pool's life.

        ``tasks``: task messages completed (a map chunk is one task, as for
        ``maxtasksperchild``); ``bytes_pickled``: bytes of task frames sent;
        ``bytes_lazy``: bytes workers fetched lazily; ``faults``: their page faults.
        """
        return self._core.stats()


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


def _cpu_count() -> int:
    n = getattr(os, "process_cpu_count", os.cpu_count)()
    return n or 1


def _resolve_context(context):
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


def _explain_efault(e: BaseException) -> None:
    """On the user-mode-only rung, a kernel access (os.write, socket.send, tofile)
    to a lazy page not yet touched fails with EFAULT: say what to do."""
    h = sys.modules.get("lazyshare.handler")
    caps = getattr(h, "_caps", None)
    if caps is None or caps.mode != "uffd-user-mode-only" or not isinstance(e, OSError):
        return
    if e.errno == errno.EFAULT or (e.errno is None and " requested and " in str(e)):  # numpy's tofile
        note = (
            "lazyshare: this worker is on the uffd-user-mode-only rung, where the kernel cannot "
            "fetch a lazy page: call lazyshare.materialize(arr) before handing a lazily attached "
            "array to os.write/socket.send/tofile (see `python -m lazyshare doctor`)"
        )
        _add_note(e, note)


def _add_note(e: BaseException, note: str) -> None:
    """``e.add_note(note)``; before Python 3.11, which neither has it nor prints
    ``__notes__``, the note is also appended to the message, so that it shows in
    the traceback the parent prints (and survives pickling: ``args`` does)."""
    if hasattr(e, "add_note"):
        e.add_note(note)
        return
    e.__notes__ = [*getattr(e, "__notes__", ()), note]
    if e.args and isinstance(e.args[-1], str):
        e.args = (*e.args[:-1], f"{e.args[-1]} ({note})")
        if isinstance(e, OSError) and e.strerror is not None:
            e.strerror = e.args[-1]


# =========================================================================== worker side
def _watch_parent(pid: int) -> None:
    """Exit when the pool's process dies, even in the middle of a task. With
    forkserver our OS parent is the fork server, so watch the pool's pid: a pidfd
    where available (no pid reuse race), else poll it."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        fd = None

    def watch():
        if fd is not None:
            p = select.poll()
            p.register(fd, select.POLLIN)
            while not p.poll(None):
                pass
        else:
            while True:
                time.sleep(0.5)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
        os._exit(1)

    threading.Thread(target=watch, name="lazyshare-parent-watch", daemon=True).start()


def _native_counters() -> tuple[int, int]:
    # The cumulative ``bytes_fetched`` and ``faults`` of this process, which the
    # pool reports with each result. Looked up only if a task already imported
    # the handler (a worker that never attached anything has nothing to count).
    h = sys.modules.get("lazyshare.handler")
    if h is None:
        return 0, 0
    try:
        s = h.stats()
        return int(s["bytes_fetched"]), int(s["faults"])
    except Exception:
        return 0, 0


def _kernel_safe(frames: list, budget: int | None) -> list:
    """``frames``, safe to leave zero-copy whatever memory they point into.

    A frame of at least ``transport.ZERO_COPY`` bytes goes to libzmq zero-copy, and its
    I/O thread reads it with send(2): a kernel-mode read. On the
    uffd-user-mode-only rung that fails with EFAULT on a lazy page not fetched
    yet, and libzmq aborts the worker. A result may well point into a lazy
    mapping (the argument itself, a view of it, an exception carrying it, a
    pandas frame sharing its memory): such a frame's pages are fetched here, in
    user mode. With a memory budget they could be dropped again before libzmq
    reads them, so the frame is copied instead. Smaller frames pyzmq copies in
    this thread; on the other rungs the kernel waits for a page as user code
    does. ``lazy_overlap`` is a bisect over the attached mappings.
    """
    h = sys.modules.get("lazyshare.handler")
    caps = getattr(h, "_caps", None)  # None: nothing was attached in this process
    if caps is None or caps.mode != "uffd-user-mode-only":
        return frames
    for i, frame in enumerate(frames):
        view = memoryview(frame)
        if view.nbytes < transport.ZERO_COPY:
            continue
        raw = np.frombuffer(view, np.uint8)
        if h.lazy_overlap(raw.ctypes.data, raw.nbytes):
            if budget:
                frames[i] = bytes(view)
            else:
                h.materialize(raw)
    return frames


def _encode_result(result: tuple, budget: int | None = None, future: bool = False) -> list:
    return _kernel_safe(_pickle_result(result, future), budget)


def _pickle_result(result: tuple, future: bool = False) -> list:
    """The frames of ``(ok, value)``. If that fails: with ``future`` the error
    itself becomes the task's exception, as ``ProcessPoolExecutor``'s worker
    sends it back (a ``SystemExit`` raised by a ``__reduce__`` too); otherwise a
    ``MaybeEncodingError``, as from the stdlib's pool (and a ``SystemExit`` ends
    the worker)."""
    try:
        frames = serialization.dumps_result(result)
        if not result[0]:  # an exception must also unpickle (custom __init__ ...)
            pickle.loads(frames[0], buffers=frames[1:])
        return frames
    except BaseException as e:
        if future:
            return _pickle_result((False, ExceptionWithTraceback(e, e.__traceback__)))
        if not isinstance(e, Exception):
            raise
        value = result[1]
        if isinstance(value, ExceptionWithTraceback):
            value = value.exc
        try:
            wrapped = MaybeEncodingError(e, value)
        except Exception:
            wrapped = MaybeEncodingError(e, f"<unrepresentable {type(value).__name__}>")
        try:
            return serialization.dumps_result((False, wrapped))
        except Exception:  # repr() gave something odd: keep the worker alive
            return [pickle.dumps((False, MaybeEncodingError(type(e).__name__, type(value).__name__)), 5)]


def _run_task(sock, msg, budget: int | None = None, future: bool = False) -> None:
    """Run one task message and send its result. A task that raises
    ``SystemExit`` or ``KeyboardInterrupt`` ends the worker, as in the stdlib's
    pool (the task then fails with ``WorkerLostError``); with ``future``, as in
    ``ProcessPoolExecutor``'s worker, it is the task's exception and the worker
    goes on."""
    t0 = time.perf_counter()
    job, index, mode = transport.TASK_HDR.unpack(msg[1].buffer)
    func = args = kwds = payload = value = None
    try:
        payload = serialization.loads([f.buffer for f in msg[2:]])
        msg = None
        if mode == transport.APPLY:
            func, args, kwds = payload
            payload = None
            value = func(*args, **kwds)
        elif mode == transport.MAP:
            func, args = payload
            payload = None
            value = list(map(func, args))
        else:
            func, args = payload
            payload = None
            value = list(itertools.starmap(func, args))
        result = (True, value)
    except BaseException as e:
        if not (future or isinstance(e, Exception)):
            raise
        _explain_efault(e)
        result = (False, ExceptionWithTraceback(e, e.__traceback__))
    # Drop the task before the result leaves: lazy mappings are released promptly.
    func = args = kwds = payload = value = msg = None
    frames = _encode_result(result, budget, future)
    result = None
    lazy, faults = _native_counters()
    seconds = time.perf_counter() - t0
    transport.send(
        sock, [transport.RESULT, transport.RESULT_HDR.pack(job, index, seconds, lazy, faults), *frames]
    )


def _await_ack(sock) -> None:
    deadline = time.monotonic() + _BYE_TIMEOUT
    while time.monotonic() < deadline:
        if sock.poll(100):
            if transport.recv(sock)[0].bytes == transport.ACK:
                return


#: threadpoolctl's internal_api of a native thread pool -> the variables it reads
#: when loaded, the first one set wins (OpenBLAS, MKL and BLIS fall back to
#: OpenMP's).
_THREAD_VARS = {
    "openblas": ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"),
    "mkl": ("MKL_NUM_THREADS", "OMP_NUM_THREADS"),
    "blis": ("BLIS_NUM_THREADS", "OMP_NUM_THREADS"),
    "openmp": ("OMP_NUM_THREADS",),
}


def _environ_snapshot(extra: dict | None) -> dict:
    """The parent's environment now, plus ``extra``, for a worker to start with."""
    for _ in range(100):
        try:
            env = dict(os.environ)
            break
        except KeyError:  # another thread removed a variable while it was copied
            continue
    else:
        env = dict(os.environ)
    if extra:
        env.update(extra)
    return env


def _thread_count(env, names) -> int | None:
    for name in names:
        value = env.get(name)
        if value is not None:
            try:
                n = int(value.split(",")[0])  # OMP_NUM_THREADS may list nested levels
            except ValueError:
                return None
            return n if n > 0 else None
    return None


def _apply_environment(env: dict | None) -> None:
    """Make ``os.environ`` ``env`` (set and unset to match). A forkserver child
    inherits the fork server's environment, which was frozen when the first pool
    started it; a spawn child inherits the parent's but not ``_worker_env``.

    Native thread pools already loaded (numpy's BLAS is: this module imports
    numpy before a worker runs) read their thread count at load: where the
    count a library would read changed, it is applied with threadpoolctl if that
    is importable. Without it such a library keeps its count (new variables
    still reach libraries loaded later and the worker's children); so does one
    whose variable was removed, whose default cannot be restored."""
    if env is None:
        return
    before = {api: _thread_count(os.environ, names) for api, names in _THREAD_VARS.items()}
    for name in [k for k in os.environ if k not in env]:
        del os.environ[name]
    for name, value in env.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
    limits = {}
    for api, names in _THREAD_VARS.items():
        n = _thread_count(env, names)
        if n is not None and n != before[api]:
            limits[api] = n
    if not limits:
        return
    try:
        import threadpoolctl
    except ImportError:
        return
    try:
        for lib in threadpoolctl.ThreadpoolController().lib_controllers:
            n = limits.get(lib.internal_api)
            if n is not None:
                lib.set_num_threads(n)
    except Exception:  # a library threadpoolctl cannot drive: leave it as it is
        traceback.print_exc()


def _worker_main(
    endpoint: str,
    wid: bytes,
    pool_pid: int,
    initializer,
    initargs,
    maxtasks,
    budget=None,
    future=False,
    env=None,
) -> None:
    _apply_environment(env)
    _watch_parent(pool_pid)
    if budget:
        from . import handler

        handler.set_memory_budget(budget)
    warnings.filterwarnings("ignore", message="lazyshare: ", category=RuntimeWarning)  # _warn_if_eager
    sock = transport.context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, wid)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    try:
        if initializer is not None:
            try:
                initializer(*initargs)
            except BaseException as e:
                try:
                    error = (False, ExceptionWithTraceback(e, e.__traceback__))
                    transport.send(sock, [transport.INIT_FAILED, *_encode_result(error, budget)])
                    _await_ack(sock)
                except Exception:
                    pass
                raise  # printed by multiprocessing, exit code 1, as in the stdlib
        transport.send(sock, [transport.READY])
        completed = 0
        while maxtasks is None or completed < maxtasks:
            if not sock.poll(transport.POLL_MS):
                continue
            msg = transport.recv(sock)
            kind = msg[0].bytes
            if kind == transport.TASK:
                _run_task(sock, msg, budget, future)
                msg = None
                completed += 1
            elif kind == transport.STOP:
                break
        # Everything sent so far precedes this on the same pipe: once the parent
        # acknowledges it, no result can be lost by exiting.
        transport.send(sock, [transport.BYE, transport.COUNTERS_HDR.pack(*_native_counters())])
        _await_ack(sock)
    finally:
        sock.close(linger=0)
