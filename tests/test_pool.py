"""lazyshare.pool.Pool against multiprocessing.Pool's behaviour, plus what the stdlib
cannot do (lost workers, parent death, leftovers). Two workers, small tasks: the
machine has two cores. Worker functions live in _pool_funcs (importable)."""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.pool
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref

import _pool_funcs as f
import _unpickle_funcs as u
import pytest
from conftest import DEADLINE, pid_alive, wait_for

from lazyshare import transport
from lazyshare.errors import WorkerLostError
from lazyshare.pool import Pool, PoolTerminatedError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

pytestmark = pytest.mark.timeout(DEADLINE)


def both_workers_up(pool):
    """Wait until both workers run tasks (a worker takes ~0.3 s to start)."""
    assert wait_for(lambda: len(set(pool.map(f.pid_after, [0.05, 0.05], chunksize=1))) == 2, interval=0)


POOL_THREADS = {"lazyshare-dispatcher", "lazyshare-results", "lazyshare-feeder"}


def lazyshare_threads():
    """The pool's threads (the native core has lazyshare-* threads of its own)."""
    return [t.name for t in threading.enumerate() if t.name in POOL_THREADS]


def socket_files():
    d = transport.runtime_dir()
    return [n for n in os.listdir(d) if n.startswith("pool-")]


# --------------------------------------------------------------------------- the API
def test_apply(pool):
    assert pool.apply(f.sqr, (5,)) == 25
    assert pool.apply(f.sqr, (), {"x": 3}) == 9


def test_apply_async_and_callback(pool):
    got = []
    r = pool.apply_async(f.sqr, (7,), callback=got.append)
    assert r.get(timeout=DEADLINE) == 49
    assert r.ready() and r.successful()
    assert got == [49]
    assert isinstance(r, multiprocessing.pool.AsyncResult)


def test_map(pool):
    assert pool.map(f.sqr, list(range(10))) == [x * x for x in range(10)]
    assert pool.map(f.sqr, list(range(100)), chunksize=20) == [x * x for x in range(100)]


def test_map_default_chunksize_like_stdlib(pool):
    # divmod(len, 4 * processes): 100 items, 2 workers -> chunks of 13 -> 8 tasks
    before = pool.stats()["totals"]["tasks"]
    pool.map(f.sqr, range(100))
    assert pool.stats()["totals"]["tasks"] - before == 8
    before = pool.stats()["totals"]["tasks"]
    pool.map(f.sqr, range(100), chunksize=30)
    assert pool.stats()["totals"]["tasks"] - before == 4


def test_map_async_callbacks(pool):
    calls = []
    pool.map_async(int, ["1"], callback=calls.append, error_callback=calls.append).wait(DEADLINE)
    assert calls == [[1]]  # the full list, once
    pool.map_async(int, ["a"], callback=calls.append, error_callback=calls.append).wait(DEADLINE)
    assert len(calls) == 2 and isinstance(calls[1], ValueError)


def test_async_error_callback(pool):
    seen = []
    r = pool.apply_async(f.raising, error_callback=seen.append)
    with pytest.raises(KeyError):
        r.get(DEADLINE)
    assert isinstance(seen[0], KeyError)  # ran before get() returned, as in the stdlib
    assert r.ready() and not r.successful()


def test_callbacks_run_in_a_pool_thread(pool):
    where = []
    pool.apply_async(f.sqr, (2,), callback=lambda _: where.append(threading.current_thread().name)).get(
        DEADLINE
    )
    assert where == ["lazyshare-results"]


def test_callback_that_raises_does_not_break_the_pool(pool, capsys):
    def bad(_):
        raise RuntimeError("callback bug")

    r = pool.apply_async(f.sqr, (2,), callback=bad)
    r.wait(DEADLINE)
    assert r.ready()
    assert pool.apply(f.sqr, (3,)) == 9
    assert "callback bug" in capsys.readouterr().err


def test_starmap_and_starmap_async(pool):
    pairs = list(zip(range(10), range(10, 20)))
    assert pool.starmap(f.mul, pairs) == [a * b for a, b in pairs]
    assert pool.starmap_async(f.mul, pairs, 3).get(DEADLINE) == [a * b for a, b in pairs]


def test_imap_in_order(pool):
    assert list(pool.imap(f.sqr, range(10))) == [x * x for x in range(10)]
    it = pool.imap(f.sqr, range(10))
    for i in range(10):
        assert next(it) == i * i
    with pytest.raises(StopIteration):
        next(it)
    it = pool.imap(f.sqr, range(1000), chunksize=100)
    assert list(it) == [x * x for x in range(1000)]


def test_imap_next_timeout(pool):
    it = pool.imap(f.sqr, [(1)], 1)
    it = pool.imap(f.sleep, [1.0])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.05)
    assert it.next(timeout=DEADLINE) == 1.0


def test_imap_unordered_gives_completion_order(pool):
    assert sorted(pool.imap_unordered(f.sqr, range(100))) == [x * x for x in range(100)]
    assert sorted(pool.imap_unordered(f.sqr, range(100), chunksize=7)) == [x * x for x in range(100)]
    # a slow first task does not hold back the others (imap would)
    both_workers_up(pool)
    out = list(pool.imap_unordered(f.sleep, [1.0, 0.01, 0.01, 0.01]))
    assert out[-1] == 1.0
    assert list(pool.imap(f.sleep, [0.3, 0.01])) == [0.3, 0.01]


def test_chunksize_validation(pool):
    with pytest.raises(ValueError, match="Chunksize must be 1\\+"):
        pool.imap(f.sqr, range(3), chunksize=0)
    with pytest.raises(ValueError, match="Chunksize must be 1\\+"):
        pool.imap_unordered(f.sqr, range(3), chunksize=-1)


def test_empty_iterables(pool):
    assert pool.map(f.sqr, []) == []
    assert list(pool.imap(f.sqr, [])) == []
    assert list(pool.imap_unordered(f.sqr, [])) == []
    assert pool.map_async(f.sqr, []).get(DEADLINE) == []
    assert pool.map_async(f.sqr, [], chunksize=1).get(DEADLINE) == []
    assert pool.starmap(f.mul, []) == []


def test_generators_as_iterables(pool):
    assert pool.map(f.sqr, (x for x in range(10))) == [x * x for x in range(10)]
    assert list(pool.imap(f.sqr, (x for x in range(10)))) == [x * x for x in range(10)]
    assert pool.starmap(f.mul, ((x, 2) for x in range(5))) == [0, 2, 4, 6, 8]


def test_iterable_that_raises(pool):
    for _ in range(2):  # reentrant
        with pytest.raises(f.SayWhenError):
            pool.map(f.sqr, f.exception_throwing_generator(1, -1), 1)
    with pytest.raises(f.SayWhenError):
        pool.map(f.sqr, f.exception_throwing_generator(10, 3), 1)

    class SpecialIterable:
        def __iter__(self):
            return self

        def __next__(self):
            raise f.SayWhenError

        def __len__(self):
            return 3  # the stdlib hangs when __len__ promises more than one chunk

    with pytest.raises(f.SayWhenError):
        pool.map(f.sqr, SpecialIterable(), 1)

    it = pool.imap(f.sqr, f.exception_throwing_generator(10, 3), 1)
    assert [next(it) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(f.SayWhenError):
        next(it)
    it = pool.imap(f.sqr, f.exception_throwing_generator(20, 7), 2)
    assert [next(it) for _ in range(6)] == [x * x for x in range(6)]
    with pytest.raises(f.SayWhenError):
        next(it)
    with pytest.raises(f.SayWhenError):
        list(pool.imap_unordered(f.sqr, f.exception_throwing_generator(10, 3), 1))
    assert pool.map(f.sqr, range(3)) == [0, 1, 4]


def test_get_timeout_and_successful_not_ready(pool):
    r = pool.apply_async(f.sleep, (1.0,))
    t = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError):
        r.get(timeout=0.1)
    assert time.monotonic() - t < 0.9
    assert not r.ready()
    with pytest.raises(ValueError, match="not ready"):
        r.successful()
    r.wait(0.01)
    assert r.get(DEADLINE) == 1.0
    assert r.successful()


def test_remote_traceback_is_chained(pool):
    with pytest.raises(RuntimeError) as info:
        pool.apply(f.raise_runtime)
    exc = info.value
    assert type(exc) is RuntimeError and exc.args == (123,)
    cause = exc.__cause__
    assert type(cause) is multiprocessing.pool.RemoteTraceback
    assert "raise RuntimeError(123)  # some comment" in cause.tb
    # an error raised by the iterable in the parent is not a remote one
    with pytest.raises(f.SayWhenError) as info:
        pool.map(f.sqr, f.exception_throwing_generator(1, -1), 1)
    assert info.value.__cause__ is None


def test_map_waits_for_all_chunks_before_failing():
    # the stdlib's test_map_no_failfast
    t = time.monotonic()
    with pytest.raises(ValueError):
        with Pool(2) as p:
            try:
                p.map(f.raise_large_valueerror, [0, 1])
            finally:
                time.sleep(0.5)
                p.close()
                p.join()
    assert time.monotonic() - t > 0.5


def test_unpicklable_result_is_maybe_encoding_error(pool):
    for _ in range(3):  # and the workers survive it
        seen = []
        r = pool.apply_async(f.unpicklable_result, error_callback=seen.append)
        with pytest.raises(multiprocessing.pool.MaybeEncodingError) as info:
            r.get(DEADLINE)
        assert isinstance(seen[0], multiprocessing.pool.MaybeEncodingError)
        assert str(info.value).startswith("Error sending result: '<unlocked _thread.lock object")
        assert "Reason: '" in str(info.value)
        assert info.value.exc is not None and info.value.value is not None
    with pytest.raises(multiprocessing.pool.MaybeEncodingError):
        pool.map(f.unpicklable_result, range(2))
    assert pool.apply(f.sqr, (4,)) == 16


def test_exceptions_that_do_not_travel(pool):
    with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="UnpicklableError"):
        pool.apply(f.raise_unpicklable)
    with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="BadInitError"):
        pool.apply(f.raise_bad_init)
    assert pool.apply(f.sqr, (2,)) == 4


def test_unpicklable_argument(pool):
    with pytest.raises(RuntimeError, match="cannot pickle"):
        pool.map(f.sqr, [f.CannotPickle()] * 10)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        pool.apply(f.sqr, (f.CannotPickle(),))
    with pytest.raises(RuntimeError, match="cannot pickle"):
        list(pool.imap(f.sqr, [1, f.CannotPickle()]))
    assert pool.map(f.sqr, range(5)) == [0, 1, 4, 9, 16]


def test_lambdas_and_closures(pool):
    k = 3
    assert pool.map(lambda x: x + k, range(4)) == [3, 4, 5, 6]

    def closure(x):
        return x * k

    assert pool.apply(closure, (5,)) == 15
    assert list(pool.imap(closure, range(3))) == [0, 3, 6]


def test_release_task_refs(pool):
    objs = [f.Counted() for _ in range(10)]
    refs = [weakref.ref(o) for o in objs]
    pool.map(f.identity, objs)
    del objs
    gc.collect()
    assert wait_for(lambda: all(r() is None for r in refs), timeout=2)


# --------------------------------------------------------------------------- construction
def test_constructor_errors():
    with pytest.raises(ValueError):
        Pool(0)
    with pytest.raises(ValueError):
        Pool(-1)
    with pytest.raises(TypeError):
        Pool(1, initializer=1)
    for value in [0, -1, 0.5, "12"]:
        with pytest.raises(ValueError):
            Pool(1, maxtasksperchild=value)
    assert not socket_files()


def test_pool_size_and_worker_names():
    p = Pool(2)
    try:
        assert len(p._pool) == 2
        assert all(w.name.startswith("lazyshare-worker-") for w in p._pool)
        assert all(w.daemon for w in p._pool)
        assert repr(p) == "<lazyshare.pool.Pool state=RUN pool_size=2>"
    finally:
        p.close()
        p.join()


def test_initializer_and_initargs():
    with Pool(2, initializer=f.initializer, initargs=("ready",)) as p:
        assert set(p.map(f.get_initialized, range(8), chunksize=1)) == {"ready"}
    p.join()


def test_initializer_lambda():
    with Pool(1, initializer=lambda: f.initializer("lam")) as p:
        assert p.apply(f.get_initialized) == "lam"
    p.join()


def test_failing_initializer_is_bounded(capfd):
    # The stdlib restarts workers forever and every task hangs; here the pool
    # breaks after max(3, processes) start failures in a row.
    p = Pool(2, initializer=f.failing_initializer)
    try:
        r = p.apply_async(f.sqr, (2,))
        with pytest.raises(WorkerLostError, match="initializer failed") as info:
            r.get(DEADLINE)
        assert isinstance(info.value.__cause__, RuntimeError)
        with pytest.raises(WorkerLostError):
            p.map(f.sqr, range(4))
        p.close()
        p.join()
    finally:
        p.terminate()
    assert "initializer failed on purpose" in capfd.readouterr().err


def test_maxtasksperchild_replaces_workers():
    p = Pool(2, maxtasksperchild=3)
    try:
        first = sorted(w.pid for w in p._pool)
        results = [p.apply_async(f.getpid) for _ in range(20)]
        pids = {r.get(DEADLINE) for r in results}
        assert len(pids) >= 5  # 20 tasks, at most 3 per worker: 7 workers at least
        assert wait_for(lambda: all(w.is_alive() for w in p._pool))
        assert len(p._pool) == 2 and sorted(w.pid for w in p._pool) != first
        assert p.stats()["totals"]["tasks"] == 20
    finally:
        p.close()
        p.join()


def test_maxtasksperchild_early_close():
    # the stdlib's test_pool_worker_lifetime_early_close
    p = Pool(2, maxtasksperchild=1)
    results = [p.apply_async(f.sqr, (i, 0.05)) for i in range(6)]
    p.close()
    p.join()
    assert [r.get(0) for r in results] == [i * i for i in range(6)]


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_context(method):
    with Pool(2, context=multiprocessing.get_context(method)) as p:
        assert p._ctx.get_start_method() == method
        assert p.map(f.sqr, range(5)) == [0, 1, 4, 9, 16]
    p.join()


def test_fork_context_warns_and_uses_forkserver():
    with pytest.warns(RuntimeWarning, match="fork") as record:
        p = Pool(1, context=multiprocessing.get_context("fork"))
    try:
        assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
        assert p._ctx.get_start_method() == "forkserver"
        assert p.apply(f.sqr, (3,)) == 9
    finally:
        p.close()
        p.join()


# --------------------------------------------------------------------------- lifecycle
def test_states_and_errors():
    p = Pool(2)
    assert p._state == multiprocessing.pool.RUN
    with pytest.raises(ValueError, match="Pool is still running"):
        p.join()
    r = p.apply_async(f.sqr, (3,))
    p.close()
    p.close()  # twice is fine
    assert p._state == multiprocessing.pool.CLOSE
    for call in (
        lambda: p.apply_async(f.sqr, (1,)),
        lambda: p.map(f.sqr, [1]),
        lambda: p.imap(f.sqr, [1]),
        lambda: p.starmap_async(f.mul, [(1, 2)]),
    ):
        with pytest.raises(ValueError, match="Pool not running"):
            call()
    p.join()
    assert r.get(0) == 9  # close() lets outstanding work finish
    p.terminate()
    p.terminate()
    assert p._state == multiprocessing.pool.TERMINATE
    p.join()


def test_with_statement_terminates():
    t = time.monotonic()
    with Pool(2) as p:
        r = p.apply_async(f.sleep, (30,))
        time.sleep(0.3)
    assert p._state == multiprocessing.pool.TERMINATE
    p.join()
    assert time.monotonic() - t < 10
    with pytest.raises(PoolTerminatedError):
        r.get(1)
    with pytest.raises(ValueError):
        with p:
            pass


def test_terminate_busy_pool():
    # the stdlib's test_terminate: many long tasks in flight
    p = Pool(2)
    p.map_async(time.sleep, [30] * 1000, chunksize=1)
    time.sleep(0.5)
    t = time.monotonic()
    p.terminate()
    p.join()
    assert time.monotonic() - t < 5


def test_refuses_to_pickle(pool):
    with pytest.raises(
        NotImplementedError, match="pool objects cannot be passed between processes or pickled"
    ):
        pickle.dumps(pool)


def test_resource_warning_like_stdlib():
    pool = Pool(1)
    pool.terminate()
    pool.join()
    pool._state = multiprocessing.pool.RUN  # as the stdlib's test does
    with pytest.warns(ResourceWarning, match="unclosed running multiprocessing pool"):
        pool = None
        gc.collect()


def test_forgotten_pool_warns_and_is_terminated():
    p = Pool(2)
    pids = [w.pid for w in p._pool]
    wr = weakref.ref(p)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        del p
        gc.collect()
    assert any(issubclass(x.category, ResourceWarning) for x in w)
    del w  # the recorded warning's ``source`` kept the pool alive
    gc.collect()
    assert wr() is None
    assert wait_for(lambda: not any(pid_alive(pid) for pid in pids), timeout=5)
    assert wait_for(lambda: not lazyshare_threads(), timeout=5)
    assert not socket_files()


@pytest.mark.parametrize("how", ["close", "terminate"])
def test_no_leftovers(how):
    p = Pool(2)
    assert p.map(f.sqr, range(10)) == [x * x for x in range(10)]
    r = p.apply_async(f.sleep, (0.2,))
    assert set(lazyshare_threads()) == POOL_THREADS
    assert len(socket_files()) == 1
    pids = [w.pid for w in p._pool]
    getattr(p, how)()
    p.join()
    if how == "close":
        assert r.get(0) == 0.2
    assert not any(pid_alive(pid) for pid in pids)
    assert all(w.exitcode is not None for w in p._pool)
    assert lazyshare_threads() == []
    assert socket_files() == []
    assert multiprocessing.active_children() == []


def test_stats_shape(pool):
    pool.map(f.sqr, range(10), chunksize=5)
    s = pool.stats()
    assert set(s) == {"workers", "totals", "cache", "outputs"}
    assert s["outputs"] == {"bytes_sent": 0, "bytes_merged": 0, "tasks_merged": 0, "conflicts": 0}
    assert set(s["cache"]) == {
        "segments",
        "segments_untracked",
        "bytes_cached",
        "bytes_filled",
        "bytes_invalidated",
        "bytes_preserved",
        "bytes_reused",
        "bytes_evicted",
        "generations",
    }
    keys = {"tasks", "bytes_pickled", "bytes_lazy", "faults"}
    assert set(s["totals"]) == keys
    assert set(s["workers"]) == {w.pid for w in pool._pool}
    for c in s["workers"].values():
        assert keys <= set(c)
    assert s["totals"]["tasks"] == 2
    assert s["totals"]["bytes_pickled"] > 0


# --------------------------------------------------------------------------- failures
def test_sigkill_of_a_worker_mid_task(pool, tmp_path):
    path = str(tmp_path / "pid")
    r = pool.apply_async(f.pid_then_sleep, (path, 30))
    assert wait_for(lambda: os.path.exists(path) and open(path).read())
    pid = int(open(path).read())
    t = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerLostError) as info:
        r.get(10)
    assert time.monotonic() - t < 5
    msg = str(info.value)
    assert f"(pid {pid})" in msg and "SIGKILL" in msg and "while running this task" in msg
    assert info.value.pid == pid and info.value.exitcode == -signal.SIGKILL
    # a replacement takes the slot and the pool goes on
    assert pool.map(f.sqr, range(20)) == [x * x for x in range(20)]
    assert wait_for(lambda: pid not in [w.pid for w in pool._pool] and all(w.is_alive() for w in pool._pool))


def test_tasks_queued_behind_a_killed_task_run_on_another_worker(tmp_path):
    with Pool(1) as p:
        p.map(f.sqr, range(200), chunksize=1)  # run times known: tasks now queue ahead on the worker
        path = str(tmp_path / "pid")
        pad = b"x" * 20000  # makes a queued task recognisable in bytes_pickled
        before = sum(c["bytes_pickled"] for c in p.stats()["workers"].values())
        victim = p.apply_async(f.pid_then_sleep, (path, 30))
        queued = [p.apply_async(f.getpid, (pad,)) for _ in range(8)]
        assert wait_for(lambda: os.path.exists(path) and open(path).read())
        pid = int(open(path).read())
        queued_on_victim = lambda: p.stats()["workers"][pid]["bytes_pickled"] - before > len(pad)  # noqa: E731
        assert wait_for(queued_on_victim), "no task was queued on the worker: nothing to show"
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerLostError, match="while running this task"):
            victim.get(DEADLINE)
        pids = [r.get(DEADLINE) for r in queued]  # none of them had started: they run elsewhere
        assert pid not in pids and len(set(pids)) == 1


def test_worker_exit_during_map(pool):
    with pytest.raises(WorkerLostError, match="exited with code 7"):
        pool.map(f.die, [7], chunksize=1)
    with pytest.raises(WorkerLostError, match="exited with code 3"):
        pool.apply(f.exit_in_task)
    assert pool.map(f.sqr, range(10)) == [x * x for x in range(10)]


def test_parent_death_stops_workers(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path[:0] = [{ROOT!r}, {HERE!r}]
        from lazyshare.pool import Pool
        import _pool_funcs as f
        if __name__ == "__main__":
            p = Pool(2)
            r = p.apply_async(f.sleep, (60,))   # one busy worker, one idle
            time.sleep(0.3)
            print(" ".join(str(w.pid) for w in p._pool), flush=True)
            time.sleep(60)
        """
    )
    path = tmp_path / "parent.py"
    path.write_text(script)
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        pids = [int(x) for x in line.split()]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        proc.kill()
        proc.wait(DEADLINE)
        assert wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=5)
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- BaseException in the parent
@pytest.mark.parametrize("make", [u.exit_in_parent, u.interrupt_in_parent, u.error_in_parent])
def test_result_that_raises_when_unpickled_in_the_parent(pool, make):
    # The result pickles in the worker; unpickling it raises (SystemExit,
    # KeyboardInterrupt ...) in the parent's result thread, which must go on.
    me = os.getpid()
    assert pool.apply(u.in_worker, (me,))
    for _ in range(2):
        seen = []
        r = pool.apply_async(make, (me,), error_callback=seen.append)
        with pytest.raises(multiprocessing.pool.MaybeEncodingError) as info:
            r.get(DEADLINE)
        assert seen == [info.value]
        assert type(info.value.__cause__).__name__ in ("SystemExit", "KeyboardInterrupt", "UnpicklingError")
    with pytest.raises(multiprocessing.pool.MaybeEncodingError):
        pool.map(make, [me] * 4, chunksize=2)
    assert pool.apply(f.sqr, (3,)) == 9
    assert pool.map(f.sqr, range(10)) == [x * x for x in range(10)]


@pytest.mark.parametrize("exc", [SystemExit(2), KeyboardInterrupt()])
def test_callback_raising_base_exception_does_not_break_the_pool(pool, capsys, exc):
    # Printed like any other callback error: a callback runs in the result
    # thread, where these come only from its own code, never from a signal.
    def bad(_):
        raise exc

    r = pool.apply_async(f.sqr, (2,), callback=bad)
    r.wait(DEADLINE)
    assert r.ready() and r.get(0) == 4
    r = pool.apply_async(f.raising, error_callback=bad)
    r.wait(DEADLINE)
    assert r.ready()
    m = pool.map_async(f.sqr, range(4), callback=bad)
    assert m.get(DEADLINE) == [0, 1, 4, 9]
    assert pool.apply(f.sqr, (3,)) == 9
    assert type(exc).__name__ in capsys.readouterr().err


# --------------------------------------------------------------------------- a failed construction
class _Injected(Exception):
    pass


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _fail_on_nth_pool_thread(monkeypatch, n, exc):
    real = threading.Thread.start
    seen = []

    def start(self):
        if self.name in POOL_THREADS:
            seen.append(self.name)
            if len(seen) == n:
                raise exc
        return real(self)

    monkeypatch.setattr(threading.Thread, "start", start)


def _inject(monkeypatch, step):
    """Make Pool(2) fail at ``step``; returns the Pool class to call."""
    import lazyshare.pool as lp

    if step == "bind":
        monkeypatch.setattr(lp.transport, "new_endpoint", lambda name: "ipc:///nonexistent-dir/x/pool.sock")
    elif step == "second worker":
        calls = []

        class FailingPool(Pool):
            @staticmethod
            def Process(ctx, *args, **kwds):
                calls.append(1)
                if len(calls) == 2:
                    raise _Injected("second worker")
                return ctx.Process(*args, **kwds)

        return FailingPool
    elif step == "dispatcher":

        def init(self, *args, **kwds):
            raise _Injected("dispatcher")

        monkeypatch.setattr(lp._Dispatcher, "__init__", init)
    elif step.startswith("thread "):
        _fail_on_nth_pool_thread(monkeypatch, int(step.split()[1]), _Injected(step))
    elif step == "interrupt at thread 2":
        _fail_on_nth_pool_thread(monkeypatch, 2, KeyboardInterrupt())
    elif step == "finalize":
        real = multiprocessing.util.Finalize

        def finalize(obj, *args, **kwds):
            if isinstance(obj, Pool):
                raise _Injected("finalize")
            return real(obj, *args, **kwds)

        monkeypatch.setattr(multiprocessing.util, "Finalize", finalize)
    else:
        raise AssertionError(step)
    return Pool


@pytest.mark.parametrize(
    "step",
    [
        "bind",
        "second worker",
        "dispatcher",
        "thread 1",
        "thread 2",
        "thread 3",
        "interrupt at thread 2",
        "finalize",
    ],
)
def test_failed_construction_leaves_nothing_behind(monkeypatch, step):
    from conftest import leftover_children

    with Pool(2) as warm:  # the forkserver and ZeroMQ's own descriptors are long-lived
        warm.map(f.sqr, range(4))
    warm.join()
    fds = _fd_count()
    cls = _inject(monkeypatch, step)
    expected = KeyboardInterrupt if step.startswith("interrupt") else Exception
    with pytest.raises(expected) as info:
        cls(2)
    assert isinstance(info.value, (_Injected, KeyboardInterrupt)) or step == "bind"
    monkeypatch.undo()
    del info  # its traceback holds the half-built pool
    gc.collect()
    assert not leftover_children(grace=5.0)
    assert multiprocessing.active_children() == []
    assert wait_for(lambda: not lazyshare_threads(), timeout=5), lazyshare_threads()
    assert socket_files() == []
    assert wait_for(lambda: _fd_count() <= fds, timeout=5), (fds, _fd_count())
    with Pool(2) as p:  # and pools still work
        assert p.map(f.sqr, range(4)) == [0, 1, 4, 9]
    p.join()


# --------------------------------------------------------------------------- references
def _dead(ref) -> bool:
    gc.collect()
    return ref() is None


def test_an_idle_pool_keeps_no_argument_or_result_alive(pool):
    # Nothing of a completed call stays reachable from the dispatcher or the
    # result thread once the caller dropped it.
    import numpy as np

    for make in (lambda: u.Thing(b"x" * 100), lambda: np.ones(2 << 20)):  # pickled; exported (16 MiB)
        arg = make()
        ref = weakref.ref(arg)
        r = pool.apply_async(u.touch, (arg,))
        assert r.get(DEADLINE) > 0
        del arg, r
        assert wait_for(lambda ref=ref: _dead(ref), timeout=5), gc.get_referrers(ref())
        arg = make()
        ref = weakref.ref(arg)
        assert pool.map(u.touch, [arg, arg], chunksize=1) == [pool.apply(u.touch, (arg,))] * 2
        del arg
        assert wait_for(lambda ref=ref: _dead(ref), timeout=5), gc.get_referrers(ref())
    r = pool.apply_async(u.make_thing, (10,))
    ref = weakref.ref(r.get(DEADLINE))
    del r
    assert wait_for(lambda ref=ref: _dead(ref), timeout=5), gc.get_referrers(ref())
    it = pool.imap(u.make_thing, [10] * 3)
    ref = weakref.ref(next(it))
    assert wait_for(lambda ref=ref: _dead(ref), timeout=5), gc.get_referrers(ref())
    assert len(list(it)) == 2
