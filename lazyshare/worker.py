"""The worker process: its main loop and everything it does to run a task.

Runs in each worker process "lazyshare-worker-N" (started by the dispatcher
thread with :func:`_worker_main` as its target), in its main thread, plus one
daemon thread "lazyshare-parent-watch" that ends the process when the pool's
process dies. Owns: the worker's DEALER socket and its side of the control
plane (``transport``), applying the parent's environment, the initializer,
running a task (:func:`_run_task`), encoding its result (``MaybeEncodingError``,
the EFAULT advice, frames safe for libzmq's kernel-mode reads) and the
counters it reports with each result.

The parent side calls :func:`_environ_snapshot` (what a worker starts with).
"""

from __future__ import annotations

import errno
import itertools
import os
import pickle
import select
import sys
import threading
import time
import traceback
import warnings
from multiprocessing.pool import ExceptionWithTraceback, MaybeEncodingError

import numpy as np
import zmq

from . import output, serialization, transport

#: How long a retiring worker waits for the parent's acknowledgement of its last
#: message (it must not exit before libzmq has delivered its results).
_BYE_TIMEOUT = 5.0
#: An idle worker whose last counters were not settled reads them again after
#: this long, then twice as long each time, until they are.
_RECHECK_MS = 1
#: A shared output's region kept for the next task of its call (lazyshare.output)
#: goes once the worker has idled this long.
_PARK_MS = 200


#: What numpy's ``tofile`` says when the write falls short ("%ld requested and
#: %ld written", numpy/_core/src/multiarray/convert.c).
_NUMPY_SHORT_WRITE = " requested and "


def _explain_efault(e: BaseException) -> None:
    """On the user-mode-only rung, a kernel access (os.write, socket.send, tofile)
    to a lazy page not yet touched fails with EFAULT: say what to do.

    The error is one of these: an ``OSError`` with errno EFAULT (what the kernel
    answers ``write``, ``send`` and the like), or numpy's ``tofile``, whose
    ``OSError`` has no errno: numpy raises it with only the text above (the
    errno of the failed ``fwrite`` is dropped), so that text is the one mark it
    leaves. Either is explained only while this process maps lazy memory
    (``handler.lazy_overlap`` over the whole address space, a lookup in the
    fault handler's tree): this runs while the task's arguments are still
    referenced, and without a lazy mapping the fault is not one the advice
    could cure."""
    h = sys.modules.get("lazyshare.handler")
    caps = h.detected_capabilities() if h is not None else None
    if caps is None or caps.mode != "uffd-user-mode-only" or not isinstance(e, OSError):
        return
    if not (e.errno == errno.EFAULT or (e.errno is None and _NUMPY_SHORT_WRITE in str(e))):
        return
    if not h.lazy_overlap(0, (1 << 64) - 1):
        return
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


def _native_counters() -> tuple[int, int, bool]:
    """The cumulative ``bytes_fetched`` and ``faults`` of this process, which the
    pool reports with each result, and whether they are settled: every page
    request sent so far was answered and counted.

    Read as they are, never after waiting for requests still on the wire: a
    task's read-ahead still in flight, or a thread of its own still faulting,
    must not hold back its result. When the owner installs pages itself, the
    faulting thread runs on before this process counts the bytes, so even a
    task's own pages may not be counted yet: then the worker sends the counters
    again, settled, as soon as it is idle (``_worker_main``), and
    ``Pool.stats()`` waits a moment for that. Looked up only if a task already
    imported the handler (a worker that never attached anything has nothing to
    count)."""
    h = sys.modules.get("lazyshare.handler")
    if h is None:
        return 0, 0, True
    try:
        return h.counters()
    except Exception:
        return 0, 0, True


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
    caps = h.detected_capabilities() if h is not None else None  # None: nothing attached here
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


def _run_task(sock, msg, budget: int | None = None, future: bool = False) -> bool:
    """Run one task message and send its result. A task that raises
    ``SystemExit`` or ``KeyboardInterrupt`` ends the worker, as in the stdlib's
    pool (the task then fails with ``WorkerLostError``); with ``future``, as in
    ``ProcessPoolExecutor``'s worker, it is the task's exception and the worker
    goes on. Returns whether the counters it reported were settled."""
    t0 = time.perf_counter()
    job, index, mode = transport.TASK_HDR.unpack(msg[1].buffer)
    func = args = kwds = payload = value = None
    outputs: list = []  # shared outputs (lazyshare.shared) among the arguments
    output.begin(job)
    try:
        payload = serialization.loads([f.buffer for f in msg[2:]], outputs)
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
        # The task returned: the pages it wrote in its shared outputs go with the result.
        result = (True, value, output.collect(outputs)) if outputs else (True, value)
    except BaseException as e:
        if not (future or isinstance(e, Exception)):
            raise
        _explain_efault(e)
        result = (False, ExceptionWithTraceback(e, e.__traceback__))
    # Drop the task before the result leaves: lazy mappings are released promptly.
    func = args = kwds = payload = value = msg = outputs = None
    frames = _encode_result(result, budget, future)
    result = None
    lazy, faults, settled = _native_counters()
    seconds = time.perf_counter() - t0
    transport.send(
        sock,
        [transport.RESULT, transport.RESULT_HDR.pack(job, index, seconds, lazy, faults, settled), *frames],
    )
    frames = None
    output.settle()  # its shared outputs' regions, taken back for the call's next task here
    return settled


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
        last_task = time.monotonic()
        recheck = 0  # ms until the counters are read again (0: they were settled)
        while maxtasks is None or completed < maxtasks:
            kept = output.holding()
            if not sock.poll(recheck or (_PARK_MS if kept else transport.POLL_MS)):
                if kept and time.monotonic() - last_task >= _PARK_MS / 1000:
                    output.drop_parked()  # idle: the call is likely over, its segments held for nothing
                if recheck:  # idle: report the counters once they settle
                    counters = _native_counters()
                    if counters[2]:
                        transport.send(sock, [transport.COUNTERS, transport.COUNTERS_HDR.pack(*counters)])
                        recheck = 0
                    else:
                        recheck = min(2 * recheck, transport.POLL_MS)
                continue
            msg = transport.recv(sock)
            kind = msg[0].bytes
            if kind == transport.TASK:
                recheck = 0 if _run_task(sock, msg, budget, future) else _RECHECK_MS
                last_task = time.monotonic()
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
