"""The pool's machinery in the parent: the state its threads share, and the threads.

Owns:

* :class:`_Core`: everything the pool's threads and the API share (the task
  queue, the result queue, the cache, the exports of each call, the worker
  table's counters, the ROUTER socket and the wake-up of the dispatcher);
* the dispatcher thread "lazyshare-dispatcher" (:class:`_Dispatcher`): the
  ROUTER socket, the workers (start, replace, stop, kill), who holds which
  task, handing out tasks (how many: ``policy``);
* the result thread "lazyshare-results" (:func:`_result_loop`): the only
  caller of ``_set`` on result objects, so callbacks never stall dispatch;
* the feeder thread "lazyshare-feeder" (:func:`_feed_loop`): walks ``imap``
  iterables within the window ``policy.feed_has_room`` allows;
* tearing it all down: :func:`_terminate_pool` (any thread, the garbage
  collector too) and :func:`_abort_start` (a ``Pool.__init__`` that failed).

API threads call ``_Core.enqueue`` (pickles in the calling thread), ``wake``,
``job_done`` and ``stats``. The result classes and the cache are
``lazyshare.pool``'s; the worker's side is ``lazyshare.worker``.
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import wait as _wait_sentinels
from multiprocessing.pool import CLOSE, INIT, RUN, TERMINATE, MaybeEncodingError

import zmq

from . import live, output, policy, serialization, transport, worker
from .errors import LazyshareError, WorkerLostError

#: After a worker's sentinel fires, results it sent just before dying may still be
#: in the kernel socket buffer or libzmq's I/O thread: wait this long for them.
_DEATH_GRACE = 0.1
#: terminate(): SIGTERM, then SIGKILL after this long.
_TERM_GRACE = 1.0
#: stats(): how long to wait for workers' counters to settle (their idle
#: re-reads take milliseconds; read-ahead slow to complete is not waited for).
_SETTLE_WAIT = 0.25


class _Wakeup:
    """Wakes the dispatcher's poller from any thread: ``wake()`` writes one byte
    to a pipe whose read end (``fileno()``) the poller watches, unless a wake-up
    is already pending; the dispatcher calls ``drain()`` when it fires. Like
    ``concurrent.futures.process._ThreadWakeup``. Every method is safe after
    ``close()`` (and ``close()`` twice): then ``wake()`` and ``drain()`` do
    nothing and ``fileno()`` is -1."""

    __slots__ = ("_r", "_w", "_lock", "_pending")

    def __init__(self):
        self._r, self._w = os.pipe()
        self._lock = threading.Lock()
        self._pending = False  # a byte written and not drained yet: no need for another
        try:
            os.set_blocking(self._r, False)
            os.set_blocking(self._w, False)
        except BaseException:
            self.close()
            raise

    def wake(self) -> None:
        if self._pending:
            return
        self._pending = True
        with self._lock:
            if self._w >= 0:
                try:
                    os.write(self._w, b"\0")
                except OSError:  # full: the dispatcher will wake anyway
                    pass

    def fileno(self) -> int:
        return self._r

    def drain(self) -> None:
        with self._lock:
            if self._r >= 0:
                try:
                    os.read(self._r, 4096)
                except BlockingIOError:
                    pass
        self._pending = False

    def close(self) -> None:
        with self._lock:
            if self._w >= 0:
                os.close(self._w)
                os.close(self._r)
                self._r = self._w = -1


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
        "settled",
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
        self.settled = True  # its counters include every page it fetched (no request was in flight)

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
        cache_factory=dict,
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
        self.cache = cache_factory(self)
        self.exports: dict[int, serialization.CallExports] = {}
        self.output_totals = output.new_totals()  # shared outputs merged (lazyshare.output)
        self.pending: collections.deque[_Task] = collections.deque()
        self.result_q: queue.SimpleQueue = queue.SimpleQueue()
        self.feed_q: queue.SimpleQueue = queue.SimpleQueue()
        self.feed_room = threading.Event()
        self.feed: _Feed | None = None  # the window of the one the feeder walks
        self.pool_list: list = []  # Pool._pool: one Process per slot
        self.broken: BaseException | None = None

        # Set by the dispatcher when it could send more than is pending: only then
        # does a new task need to wake it (else a result will, and it dispatches).
        self.hungry = True
        self.stats_lock = threading.Lock()
        self.stats_cond = threading.Condition(self.stats_lock)  # a worker's counters settled
        self.live: dict[bytes, _Worker] = {}
        self.dead_totals = {"tasks": 0, "bytes_pickled": 0, "bytes_lazy": 0, "faults": 0}

        self.wakeup = _Wakeup()
        self.router = None
        try:  # a failure closes what was opened (Pool.__init__ never gets this object)
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
            self.wakeup.close()
            raise

        self.worker_counter = itertools.count(1)
        self.dispatcher: threading.Thread | None = None
        self.result_thread: threading.Thread | None = None
        self.feeder: threading.Thread | None = None
        self.terminated = False

    # -- any thread ---------------------------------------------------------------
    def wake(self) -> None:
        self.wakeup.wake()

    def job_done(self, job: int, empty: bool) -> None:
        exports = self.exports.pop(job, None)
        if exports is not None:
            try:
                exports.close()
            except Exception:
                traceback.print_exc()
        if empty:
            self.wake()

    def merge(self, job: int, writes: list, ok: bool, value):
        """Apply a task's writes to the shared outputs of its call (result
        thread, before the result is delivered): ``(ok, value)``, or ``(False,
        WriteConflictError)`` if it changed bytes an earlier task had changed."""
        exports = self.exports.get(job)
        if exports is None or not writes:
            return ok, value
        conflict = exports.outputs.merge(writes)
        return (False, conflict) if conflict is not None else (ok, value)

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
                    exports = serialization.CallExports(self.threshold, self)
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
            target=worker._worker_main,
            args=(
                self.endpoint,
                wid,
                self.owner_pid,
                self.init_blob,
                self.initargs,
                self.maxtasks,
                self.budget,
                self.future,
                worker._environ_snapshot(self.worker_env),
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

    def report_counters(self, w: _Worker, lazy: int, faults: int, settled: bool) -> None:
        """A worker's cumulative counters (the dispatcher, from its messages)."""
        with self.stats_cond:
            w.bytes_lazy = lazy
            w.faults = faults
            w.settled = settled
            if settled:
                self.stats_cond.notify_all()

    def forget_worker(self, w: _Worker) -> None:
        with self.stats_cond:
            self.stats_cond.notify_all()
            if self.live.pop(w.wid, None) is not None:
                t = self.dead_totals
                t["tasks"] += w.tasks
                t["bytes_pickled"] += w.bytes_pickled
                t["bytes_lazy"] += w.bytes_lazy
                t["faults"] += w.faults

    def stats(self, wait: float = _SETTLE_WAIT) -> dict:
        """Counters per live worker and totals. A worker whose last counters
        were not settled (page requests were in flight: see
        ``worker._native_counters``) sends them again once they are: wait at
        most ``wait`` seconds for that, so that a task's own pages are counted
        once its result is in. Never called on a path a result takes."""
        deadline = time.monotonic() + wait
        with self.stats_cond:
            while any(not w.settled and not w.dead for w in self.live.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break  # read-ahead slow to complete: report the counters as they are
                self.stats_cond.wait(left)
            workers = {w.pid: w.counters() for w in self.live.values()}
            totals = dict(self.dead_totals)
        for c in workers.values():
            for k in totals:
                totals[k] += c[k]
        return {
            "workers": workers,
            "totals": totals,
            "cache": live.stats(),
            "outputs": dict(self.output_totals),
        }


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
        self.poller.register(core.wakeup.fileno(), zmq.POLLIN)
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
            live.pool_ended(self.core)

    def _loop(self) -> None:
        core = self.core
        router = core.router
        wakeup = core.wakeup
        wake_fd = wakeup.fileno()
        poll = self.poller.poll
        while True:
            events = poll(self._timeout())
            for sock, _ in events:
                if sock is router:
                    self._drain_router()
                elif sock == wake_fd:
                    wakeup.drain()
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
        elif kind == transport.COUNTERS:
            self.core.report_counters(w, *transport.COUNTERS_HDR.unpack(msg[2].buffer))
        elif kind == transport.BYE:
            self._on_bye(w, msg)
        elif kind == transport.INIT_FAILED:
            self._on_init_failed(w, msg)

    def _on_result(self, w: _Worker, msg, results: list) -> None:
        job, index, seconds, lazy, faults, settled = transport.RESULT_HDR.unpack(msg[2].buffer)
        if w.inflight.pop((job, index), None) is None:
            return
        w.tasks += 1
        self.core.report_counters(w, lazy, faults, settled)
        self.ema = ema = policy.task_time(self.ema, seconds)
        self.core.task_seconds = ema
        self.limit = policy.prefetch_depth(ema)
        results.append((job, index, None, [f.buffer for f in msg[3:]], True))

    def _on_ready(self, w: _Worker) -> None:
        w.hello = w.ready = True
        self.startup_failures = 0

    def _on_bye(self, w: _Worker, msg) -> None:
        w.bye = True
        w.ready = False
        if len(msg) > 2:
            lazy, faults, _ = transport.COUNTERS_HDR.unpack(msg[2].buffer)
            self.core.report_counters(w, lazy, faults, True)  # all it will send
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
        inflight = sum(len(w.inflight) for w in ready)
        limit = policy.send_limit(self.limit, len(pending), inflight, len(ready))
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
            core.wakeup.close()
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
                    res = serialization.loads_result(payload)
                    ok, payload = res[0], res[1]
                    if len(res) > 2:  # the task's writes to shared outputs: merged first
                        ok, payload = core.merge(job, res[2], ok, payload)
                    res = None
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
        cache.fail_outstanding(core.state == TERMINATE, core.broken)


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
        held = self.fed_bytes - self.done_bytes
        if self.exports is not None:
            held += self.exports.bytes_live
        return policy.feed_has_room(
            len(self.sizes), len(core.pending), core.processes, self.last, held, refill
        )


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
        core.wakeup.close()
        core.result_q.put(None)
        core.feed_q.put(None)
        for t in (core.result_thread, core.feeder):
            if _started(t):
                t.join(5.0)
    except BaseException:
        traceback.print_exc()
