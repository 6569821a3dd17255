"""A joblib backend: ``Parallel`` calls whose big arrays move only the pages touched.

Importing this module registers the backend under the name ``"lazyshare"``
(``lazyshare.register_joblib()`` does the same)::

    import lazyshare.joblib  # or: lazyshare.register_joblib()
    from joblib import Parallel, delayed, parallel_config

    with parallel_config(backend="lazyshare", n_jobs=4):
        out = Parallel()(delayed(f)(big, i) for i in range(100))

Libraries built on joblib (scikit-learn's ``n_jobs``, ...) pick it up the same way
when they use processes. joblib's batches of tasks travel as tasks of a
:class:`lazyshare.Pool`: big buffers in them are exported and fetched page by page
on first touch.

**One pool, reused.** As loky's reusable executor, the backend keeps one
process-wide pool and hands it to every ``Parallel`` call whose workers would be
the same: same ``n_jobs``, start method, ``threshold``, ``memory_budget``, worker
environment (joblib's thread limits, ``inner_max_num_threads``) and pool options
(``initializer``, ``initargs``, ``maxtasksperchild``). A call that needs other
workers replaces it (the old pool is shut down once no call uses it). The pool is
shut down after ``idle_worker_timeout`` seconds (a backend or ``Parallel``
parameter, 300 by default as for loky) with no call using it, at interpreter exit,
or by :func:`shutdown`. A pool that is broken (workers failing to start) or was
terminated is replaced by the next call. A call aborted by an error (or a
generator closed early) whose tasks are still running kills the pool's workers,
as loky does, unless another ``Parallel`` call shares the pool: then those tasks
run to their end and their results are dropped.

**Threads when asked for.** Under ``parallel_config(backend="lazyshare")`` a call
that prefers threads (``Parallel(prefer="threads")``, as scikit-learn's random
forests do) runs on joblib's threading backend, as it would with joblib's default
backend (loky, selected by ``parallel_config``, would use processes), with the
call's ``n_jobs`` or else the configured one (joblib's default backend would run
one thread then). ``require="sharedmem"`` gets threads through joblib itself.
Naming the backend in the call, ``Parallel(backend="lazyshare", prefer="threads")``,
keeps processes: joblib ignores ``prefer`` when ``backend`` is given.

``return_as="generator"`` and ``"generator_unordered"`` stream results as tasks
complete; as with loky, the input is consumed as tasks complete (``pre_dispatch``
ahead) and a result is dropped once the generator has yielded it.

joblib's own auto-memmapping is not used: this backend never dumps arrays to a
temporary folder, so ``max_nbytes``, ``mmap_mode`` and ``temp_folder`` have no
effect. Buffers of at least ``threshold`` bytes (a backend parameter, default
1 MiB like joblib's ``max_nbytes``) go lazily, smaller ones are pickled::

    parallel_config(backend="lazyshare", threshold=16 << 20)

Workers receive writable private copies (joblib's memmapped arrays are read-only).
Pages are fetched per batch of tasks (a joblib batch is one pool task): a fold that
reads all of ``X`` fetches all of ``X``, and the next batch or call fetches it again,
where loky writes ``X`` once per call to a memmap that its workers read from the
page cache. Workers run with joblib's thread limits (``OMP_NUM_THREADS`` and the
like, ``inner_max_num_threads``), computed as for loky.
"""

from __future__ import annotations

import atexit
import os
import threading
import traceback
from multiprocessing.pool import RUN
from typing import Any, Callable

from joblib._parallel_backends import (
    FallbackToBackend,
    MultiprocessingBackend,
    SequentialBackend,
    ThreadingBackend,
)
from joblib.parallel import register_parallel_backend

from . import serialization
from .pool import Pool

__all__ = ["LazyshareBackend", "register", "shutdown"]

NAME = "lazyshare"
#: Seconds an unused pool is kept (loky's default ``idle_worker_timeout``).
DEFAULT_IDLE_TIMEOUT = 300.0
_UNSET: Any = object()


# =========================================================================== the reused pool
class _Shared:
    """A pool, the key its workers were started with, and the calls using it."""

    __slots__ = ("pool", "key", "users", "retired", "timer", "owner_pid")

    def __init__(self, pool: Pool, key: dict):
        self.pool = pool
        self.key = key
        self.users = 0
        self.retired = False  # no new user; shut down when the last one leaves
        self.timer: threading.Timer | None = None
        self.owner_pid = os.getpid()


_lock = threading.Lock()
#: The pool the next call gets if its key matches.
_current: _Shared | None = None
#: Every pool not shut down yet: the current one and retired ones still in use.
_live: set[_Shared] = set()


def _same(a, b) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # e.g. arrays in initargs: compared by identity only
        return False


def _same_key(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)


def _usable(pool: Pool) -> bool:
    core = getattr(pool, "_core", None)
    return pool._state == RUN and core is not None and core.state == RUN and core.broken is None


def _cancel_timer(entry: _Shared) -> None:
    if entry.timer is not None:
        entry.timer.cancel()
        entry.timer = None


def _stop(entry: _Shared | None) -> None:
    """Terminate a pool no call uses (any thread but the pool's own)."""
    if entry is None or entry.owner_pid != os.getpid():
        return
    try:
        entry.pool.terminate()
        entry.pool.join()
    except Exception:
        traceback.print_exc()
    with _lock:
        _live.discard(entry)


def _acquire(key: dict, make: Callable[[], Pool]) -> _Shared:
    """The current pool if its key is ``key`` and it is usable, else a new one
    (the one it replaces is shut down once no call uses it)."""
    global _current
    stale = None
    with _lock:
        cur = _current
        if cur is not None and _same_key(cur.key, key) and _usable(cur.pool):
            _cancel_timer(cur)
            cur.users += 1
            return cur
        entry = _Shared(make(), key)  # if this raises, nothing changed
        entry.users = 1
        _live.add(entry)
        _current = entry
        if cur is not None:
            _cancel_timer(cur)
            cur.retired = True
            if cur.users == 0:
                stale = cur
    _stop(stale)
    return entry


def _release(entry: _Shared, idle_timeout: float | None) -> None:
    """One call is done with ``entry``: keep it for the next, or shut it down."""
    global _current
    doomed = None
    with _lock:
        entry.users -= 1
        if entry.users > 0:
            return
        if entry is not _current or entry.retired or not _usable(entry.pool):
            if entry is _current:
                _current = None
            doomed = entry
        elif idle_timeout is not None and idle_timeout <= 0:
            _current = None
            doomed = entry
        elif idle_timeout is not None and idle_timeout != float("inf"):
            timer = threading.Timer(idle_timeout, _idle_expired, args=(entry,))
            timer.daemon = True
            timer.name = "lazyshare-joblib-idle"
            entry.timer = timer
            timer.start()
    _stop(doomed)


def _idle_expired(entry: _Shared) -> None:
    global _current
    with _lock:
        if entry.timer is not threading.current_thread() or entry.users > 0:
            return  # cancelled, or a call took it meanwhile
        entry.timer = None
        if entry is _current:
            _current = None
    _stop(entry)


def _retire_and_kill(entry: _Shared) -> bool:
    """Kill the workers of ``entry`` if the caller is its only user; the next
    call gets a new pool. False (nothing done) if another call uses it."""
    global _current
    with _lock:
        if entry.users > 1:
            return False
        entry.retired = True
        if entry is _current:
            _current = None
    try:
        entry.pool.terminate()
    except Exception:
        traceback.print_exc()
    return True


def shutdown() -> None:
    """Shut down the pool(s) the backend keeps for reuse, now: their workers are
    terminated and a ``Parallel`` call still running on one fails. The next call
    starts a new pool. Runs at interpreter exit; call it to release the workers
    earlier (test teardown, before a fork)."""
    global _current
    with _lock:
        entries = list(_live)
        _current = None
        for e in entries:
            _cancel_timer(e)
            e.retired = True
    for e in entries:
        _stop(e)


def _forget_in_child() -> None:
    # A forked child does not own the parent's pools: drop them without touching
    # them (the objects stay referenced, so no finalizer runs in the child).
    global _current, _live, _lock
    _orphans.append((_current, _live))
    _current, _live, _lock = None, set(), threading.Lock()


_orphans: list = []
atexit.register(shutdown)  # before multiprocessing's own exit handler (LIFO)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


# =========================================================================== the backend
class LazyshareBackend(MultiprocessingBackend):
    """joblib's ``multiprocessing`` backend with a reused :class:`lazyshare.Pool` in
    place of its memmapping pool: same batching, nesting rules and error handling.

    ``threshold``, ``memory_budget``: as for :class:`lazyshare.Pool`.
    ``idle_worker_timeout``: seconds an unused pool is kept (default 300).
    ``stats()`` returns the pool counters of the current (or last) ``Parallel``
    call: what its tasks moved, not what the reused pool moved before.
    """

    supports_inner_max_num_threads = True
    # joblib's multiprocessing backend turns generators off (the stdlib pool can
    # deadlock terminating from its own result thread); this pool cannot.
    supports_return_generator = True

    def __init__(self, nesting_level=None, inner_max_num_threads=None, threshold=_UNSET, **backend_kwargs):
        super().__init__(
            nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **backend_kwargs
        )
        self.threshold = serialization.DEFAULT_THRESHOLD if threshold is _UNSET else threshold
        self._shared: _Shared | None = None
        self._idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
        self._baseline: dict | None = None
        self._last_stats: dict | None = None
        self._count_lock = threading.Lock()
        self._outstanding = 0  # tasks of this backend's calls not completed yet

    def configure(
        self,
        n_jobs: int = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        idle_worker_timeout: float | None = None,
        **kwargs: Any,
    ) -> int:
        if prefer == "threads" and self._selected_by_config():
            # What joblib's default backend does for a call that prefers threads.
            raise FallbackToBackend(ThreadingBackend(nesting_level=self.nesting_level))
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        opts = {**self.backend_kwargs, **kwargs}
        # joblib always passes its memmapping options and the default context; a
        # 'fork' context (the default on Linux before 3.14) means "unspecified".
        for ignored in ("max_nbytes", "mmap_mode", "temp_folder", "verbose"):
            opts.pop(ignored, None)
        timeout = opts.pop("idle_worker_timeout", None)
        if idle_worker_timeout is not None:
            timeout = idle_worker_timeout
        context = opts.pop("context", None)
        if context is not None and context.get_start_method() == "fork":
            context = None
        budget = opts.pop("memory_budget", None)
        env = self._prepare_worker_env(n_jobs=n_jobs)
        key = {
            "n_jobs": n_jobs,
            "context": None if context is None else context.get_start_method(),
            "threshold": self.threshold,
            "memory_budget": budget,
            "env": env,
            **opts,
        }

        def make() -> Pool:
            return Pool(
                n_jobs,
                context=context,
                threshold=self.threshold,
                memory_budget=budget,
                _worker_env=env,
                **opts,
            )

        self._leave()  # configure() again without terminate(): abort_everything
        self._shared = _acquire(key, make)
        self._pool = self._shared.pool
        self._idle_timeout = DEFAULT_IDLE_TIMEOUT if timeout is None else float(timeout)
        self._baseline = self._pool.stats()
        self.parallel = parallel
        return n_jobs

    def _selected_by_config(self) -> bool:
        """Whether this instance is the backend of the active ``parallel_config``
        (not one named in the ``Parallel`` call)."""
        from joblib import parallel as jp

        config = getattr(jp._backend, "config", None) or {}
        return config.get("backend") is self

    def submit(self, func, callback=None):
        with self._count_lock:
            self._outstanding += 1

        def done(result, _cb=callback):
            with self._count_lock:
                self._outstanding -= 1
            if _cb is not None:
                _cb(result)

        try:
            return super().submit(func, callback=done)
        except BaseException:
            with self._count_lock:
                self._outstanding -= 1
            raise

    def terminate(self) -> None:
        """End of a ``Parallel`` call: the pool stays for the next one."""
        self._leave()
        self.reset_batch_stats()

    def _leave(self) -> None:
        entry = self._shared
        if entry is None:
            return
        self._last_stats = self._call_stats()
        self._shared = self._pool = None
        _release(entry, self._idle_timeout)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """The call failed: its other tasks are of no use. If some are still
        running and no other call shares the pool, kill its workers (loky does
        the same) so that the next call does not wait behind them."""
        entry = self._shared
        with self._count_lock:
            busy = self._outstanding > 0
        # terminate() fails the tasks it kills: their callbacks bring the count down
        if entry is not None and busy and _retire_and_kill(entry) and ensure_ready:
            self.configure(
                n_jobs=self.parallel.n_jobs, parallel=self.parallel, **self.parallel._backend_kwargs
            )

    def _call_stats(self) -> dict:
        now = self._shared.pool.stats()
        base = self._baseline or {"workers": {}, "totals": {}}
        totals = {k: v - base["totals"].get(k, 0) for k, v in now["totals"].items()}
        workers = {}
        for pid, counters in now["workers"].items():
            before = base["workers"].get(pid, {})
            workers[pid] = {k: v - before.get(k, 0) if isinstance(v, int) else v for k, v in counters.items()}
        return {"workers": workers, "totals": totals}

    def stats(self) -> dict | None:
        """``Pool.stats()`` over the current ``Parallel`` call (or the last one):
        the counters its tasks added to the reused pool's; None before any call."""
        if self._shared is not None:
            return self._call_stats()
        return self._last_stats


def register() -> None:
    """Register the backend with joblib as ``"lazyshare"`` (idempotent)."""
    register_parallel_backend(NAME, LazyshareBackend)


register()
