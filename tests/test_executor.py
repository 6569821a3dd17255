"""lazyshare.Executor, tested the way CPython's test_concurrent_futures tests
ProcessPoolExecutor: submit, map (timeout, chunksize), exceptions, shutdown with
and without waiting, cancel_futures; plus lazy arguments and a killed worker that
fails only its own futures."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import signal
import time
import weakref
from concurrent.futures.process import BrokenProcessPool

import _ext_funcs as f
import _unpickle_funcs as u
import numpy as np
import pytest
from conftest import DEADLINE, wait_for

import lazyshare
from lazyshare.errors import BrokenWorkerError, WorkerLostError

pytestmark = pytest.mark.timeout(DEADLINE)


@pytest.fixture
def ex():
    executor = lazyshare.Executor(max_workers=2)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _shut_down_within(ex, timeout: float = DEADLINE / 2) -> bool:
    """shutdown(wait=True) that cannot hang the test: False (and the pool
    terminated) if the executor does not finish in time."""
    ex.shutdown(wait=False)
    ex._thread.join(timeout)
    if ex._thread.is_alive():
        ex._state.pool.terminate()
        return False
    return True


def _wait_file(path) -> int:
    deadline = time.monotonic() + DEADLINE
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)
    return int(path.read_text())


def test_is_a_concurrent_futures_executor(ex):
    assert isinstance(ex, cf.Executor)
    assert issubclass(BrokenWorkerError, BrokenProcessPool)
    assert issubclass(BrokenWorkerError, WorkerLostError)


def test_submit(ex):
    future = ex.submit(pow, 2, 8)
    assert future.result(timeout=DEADLINE) == 256


def test_submit_keyword(ex):
    assert ex.submit(f.mul, 2, y=8).result(timeout=DEADLINE) == 16
    assert ex.submit(f.mul, x=3, y=4).result(timeout=DEADLINE) == 12
    with pytest.raises(TypeError):
        ex.submit()


def test_lambda_and_closure(ex):
    k = 7
    assert ex.submit(lambda x: x + k, 1).result(timeout=DEADLINE) == 8


def test_map(ex):
    assert list(ex.map(pow, range(10), range(10))) == list(map(pow, range(10), range(10)))
    assert list(ex.map(pow, range(10), range(10), chunksize=3)) == list(map(pow, range(10), range(10)))
    assert list(ex.map(pow, [], [])) == []
    with pytest.raises(ValueError):
        ex.map(pow, range(3), range(3), chunksize=0)


def test_map_exception(ex):
    it = ex.map(f.div, [1, 1, 1], [2, 0, 4])
    assert next(it) == 0.5
    with pytest.raises(ZeroDivisionError) as info:
        next(it)
    # the worker's traceback travels as the cause, as with ProcessPoolExecutor
    assert "ZeroDivisionError" in str(info.value.__cause__)


def test_map_timeout_counts_from_the_call(ex):
    it = ex.map(f.sleep_return, [0.0, 2.0], [1, 2], timeout=1.0)
    time.sleep(1.2)  # the deadline passes before we start iterating
    assert next(it) == 1
    t = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        next(it)
    assert time.monotonic() - t < 0.5


def test_map_is_lazy_in_results(ex):
    t = time.monotonic()
    it = ex.map(f.sleep_return, [0.5, 0.5], [1, 2])
    assert time.monotonic() - t < 0.4  # map returns before the results exist
    assert list(it) == [1, 2]


def test_exception_result(ex):
    future = ex.submit(f.div, 1, 0)
    assert isinstance(future.exception(timeout=DEADLINE), ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        future.result()


def test_done_callback_and_as_completed(ex):
    seen = []
    fs = [ex.submit(f.mul, i, 2) for i in range(20)]
    fs[0].add_done_callback(lambda fut: seen.append(fut.result()))
    assert sorted(x.result() for x in cf.as_completed(fs, timeout=DEADLINE)) == [2 * i for i in range(20)]
    assert seen == [0]


def test_shutdown_refuses_new_work():
    ex = lazyshare.Executor(max_workers=1)
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 2, 2)
    ex.shutdown()  # twice is fine


def test_context_manager_waits():
    with lazyshare.Executor(max_workers=2) as ex:
        fs = [ex.submit(f.sleep_return, 0.2, i) for i in range(4)]
    assert all(x.done() for x in fs)
    assert [x.result() for x in fs] == [0, 1, 2, 3]


def test_shutdown_no_wait():
    ex = lazyshare.Executor(max_workers=2)
    fs = [ex.submit(f.sleep_return, 0.3, i) for i in range(4)]
    t = time.monotonic()
    ex.shutdown(wait=False)
    assert time.monotonic() - t < 0.3
    # the work still completes in the background
    assert [x.result(timeout=DEADLINE) for x in fs] == [0, 1, 2, 3]
    ex._thread.join(DEADLINE)  # workers gone before the leftover-children check
    assert not ex._thread.is_alive()


def test_cancel_futures_on_shutdown():
    ex = lazyshare.Executor(max_workers=2)
    fs = [ex.submit(f.sleep_return, 0.02, i) for i in range(200)]
    ex.shutdown(wait=True, cancel_futures=True)
    cancelled = [x for x in fs if x.cancelled()]
    assert len(cancelled) >= 100  # 20 ms tasks: max_workers + 1 were handed to the pool at a time
    for i, x in enumerate(fs):
        assert x.done()
        if not x.cancelled():
            assert x.result() == i


def test_cancel_pending_future(ex):
    blockers = [ex.submit(f.sleep_return, 0.5) for _ in range(64)]  # fill the pipe
    last = ex.submit(pow, 2, 3)
    assert last.cancel()
    assert last.cancelled()
    for b in blockers:
        b.cancel()
    ex.shutdown(wait=True)
    assert all(b.done() for b in blockers)


def test_big_argument_moves_lazily(ex):
    big = np.arange(8 << 20, dtype=np.float64)  # 64 MiB
    served = lazyshare.stats()["bytes_served"]
    fs = [ex.submit(f.slice_sum, big, i << 20, (i << 20) + 1000) for i in range(8)]
    assert [x.result(timeout=DEADLINE) for x in fs] == [
        float(big[i << 20 : (i << 20) + 1000].sum()) for i in range(8)
    ]
    moved = lazyshare.stats()["bytes_served"] - served
    totals = ex.stats()["totals"]
    assert 0 < totals["bytes_lazy"] < big.nbytes // 4
    assert 0 < moved < big.nbytes // 4
    assert totals["bytes_pickled"] < 1 << 20  # the array was not pickled
    assert ex.submit(f.array_info, big).result(timeout=DEADLINE) == ("ndarray", True)


def test_killed_worker_fails_only_its_futures(ex, tmp_path):
    victim_file, survivor_file = tmp_path / "victim", tmp_path / "survivor"
    victim = ex.submit(f.pid_then_sleep, victim_file, 30)
    survivor = ex.submit(f.pid_then_sleep, survivor_file, 2)
    victim_pid = _wait_file(victim_file)
    survivor_pid = _wait_file(survivor_file)
    assert victim_pid != survivor_pid
    os.kill(victim_pid, signal.SIGKILL)

    with pytest.raises(BrokenProcessPool) as info:  # what ProcessPoolExecutor code catches
        victim.result(timeout=DEADLINE)
    err = info.value
    assert isinstance(err, BrokenWorkerError) and isinstance(err, WorkerLostError)
    assert err.exitcode == -signal.SIGKILL and err.pid == victim_pid
    assert "SIGKILL" in str(err)
    assert isinstance(err.__cause__, WorkerLostError)

    assert survivor.result(timeout=DEADLINE) == survivor_pid  # the other worker's future
    # the executor goes on, with a replacement worker
    assert list(ex.map(f.mul, range(10), range(10))) == [i * i for i in range(10)]
    pids = {x.result(timeout=DEADLINE) for x in [ex.submit(f.getpid) for _ in range(20)]}
    assert victim_pid not in pids


def test_not_picklable(ex):
    import pickle

    with pytest.raises(NotImplementedError):
        pickle.dumps(ex)


# --------------------------------------------------------------------------- BaseException in the parent
@pytest.mark.parametrize("make", [u.exit_in_parent, u.interrupt_in_parent, u.error_in_parent])
def test_result_that_raises_when_unpickled_in_the_parent(make):
    # ProcessPoolExecutor fails the future with BrokenProcessPool (and breaks);
    # here only that future fails, and the executor goes on.
    ex = lazyshare.Executor(max_workers=2)
    try:
        me = os.getpid()
        assert ex.submit(u.in_worker, me).result(timeout=DEADLINE)
        bad = ex.submit(make, me)
        later = [ex.submit(f.mul, i, 2) for i in range(10)]
        err = bad.exception(timeout=DEADLINE)
        assert isinstance(err, BrokenProcessPool) and not isinstance(err, WorkerLostError)
        assert type(err.__cause__).__name__ in ("SystemExit", "KeyboardInterrupt", "UnpicklingError")
        assert [x.result(timeout=DEADLINE) for x in later] == [2 * i for i in range(10)]
        assert list(ex.map(f.mul, range(5), range(5))) == [i * i for i in range(5)]
    finally:
        assert _shut_down_within(ex)


@pytest.mark.parametrize("exc", [SystemExit(2), KeyboardInterrupt()])
def test_done_callback_raising_base_exception(exc):
    # Future catches only Exception from a done-callback; the rest must not end
    # the pool's result thread or lose the executor's count of work in flight.
    calls = []

    def bad(fut):
        calls.append(fut)
        raise exc

    def add(fut):
        try:
            fut.add_done_callback(bad)
        except BaseException as e:  # already done: it ran here
            assert e is exc

    ex = lazyshare.Executor(max_workers=2)
    try:
        fs = [ex.submit(f.sleep_return, 0.3, i) for i in range(4)]
        for x in fs:
            add(x)
        assert [x.result(timeout=DEADLINE) for x in fs] == [0, 1, 2, 3]
        assert list(ex.map(f.mul, range(5), range(5))) == [i * i for i in range(5)]
    finally:
        assert _shut_down_within(ex), "the executor lost count of its work"
    assert len(calls) == 4


# --------------------------------------------------------------------------- references
def _dead(ref) -> bool:
    gc.collect()
    return ref() is None


def test_an_idle_executor_keeps_no_argument_alive(ex):
    # The manager thread held the last call's function and arguments until the
    # next submit: a big array stayed in the parent while the executor idled.
    for make in (lambda: u.Thing(b"x" * 100), lambda: np.ones(2 << 20)):  # pickled; exported (16 MiB)
        arg = make()
        ref = weakref.ref(arg)
        fut = ex.submit(u.touch, arg)
        assert fut.result(timeout=60) > 0
        del arg, fut
        assert wait_for(lambda ref=ref: _dead(ref), timeout=5), gc.get_referrers(ref())


def test_a_done_future_is_all_that_holds_its_result(ex):
    fut = ex.submit(u.make_thing, 10)
    ref = weakref.ref(fut.result(timeout=60))
    assert ref() is not None  # the future holds it
    del fut
    assert wait_for(lambda ref=ref: _dead(ref), timeout=5), gc.get_referrers(ref())


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_iterator_drops_what_it_yielded(ex, chunksize):
    it = ex.map(u.make_thing, [10] * 4, chunksize=chunksize)
    # The pool's result thread may still be returning from the callback that set
    # the result (its frame holds the value for a moment): wait for that, not
    # for ever; a suspended iterator that held the value would hold it for good.
    first = next(it)
    ref = weakref.ref(first)
    del first
    assert wait_for(lambda: _dead(ref), timeout=5)  # the suspended iterator does not hold it
    second = next(it)
    ref2 = weakref.ref(second)
    del second
    assert wait_for(lambda: _dead(ref2), timeout=5)
    assert len(list(it)) == 2


# --------------------------------------------------------------------------- errors as ProcessPoolExecutor's
@pytest.fixture
def ex1():
    executor = lazyshare.Executor(max_workers=1)
    try:
        yield executor
    finally:
        assert _shut_down_within(executor)


def test_error_while_pickling_the_result_is_delivered_itself(ex1):
    # ProcessPoolExecutor sends the pickling error back (CPython's
    # test_error_during_result_pickle_on_worker), not MaybeEncodingError.
    import pickle

    pid = ex1.submit(u.getpid).result(timeout=DEADLINE)
    err = ex1.submit(u.return_instance, u.ErrorAtPickle).exception(timeout=DEADLINE)
    assert type(err) is pickle.PicklingError and str(err) == "Error in pickle"
    assert "Error in pickle" in str(err.__cause__)  # the worker's traceback
    err = ex1.submit(u.unpicklable_result).exception(timeout=DEADLINE)
    assert isinstance(err, TypeError) and "pickle" in str(err)
    assert ex1.submit(u.getpid).result(timeout=DEADLINE) == pid  # the same worker went on


@pytest.mark.parametrize(
    "call, exc_type",
    [
        ((u.exit_now, 5), SystemExit),  # CPython's test_exit_during_func_exec_on_worker
        ((u.return_instance, u.ExitAtPickle), SystemExit),  # ...test_exit_during_result_pickle_on_worker
        ((u.raise_interrupt,), KeyboardInterrupt),
    ],
)
def test_base_exception_in_a_task_is_its_exception(ex1, call, exc_type):
    pid = ex1.submit(u.getpid).result(timeout=DEADLINE)
    fut = ex1.submit(*call)
    err = fut.exception(timeout=DEADLINE)
    assert type(err) is exc_type
    if call[0] is u.exit_now:
        assert err.code == 5
    with pytest.raises(exc_type):
        fut.result()
    assert ex1.submit(u.getpid).result(timeout=DEADLINE) == pid  # the worker was kept
    assert list(ex1.map(f.mul, range(4), range(4))) == [0, 1, 4, 9]


# --------------------------------------------------------------------------- handing work over
@pytest.mark.parametrize("workers", [2, 5])
def test_cancel_futures_right_after_a_burst(workers):
    # CPython's test_shutdown.test_cancel_futures, as it is: with few workers, many
    # of 50 futures submitted at once are cancelled and the others complete.
    ex = lazyshare.Executor(max_workers=workers)
    fs = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    ex.shutdown(cancel_futures=True)
    cancelled = [x for x in fs if x.cancelled()]
    assert len(cancelled) > 20
    others = [x for x in fs if not x.cancelled()]
    for x in others:
        assert x.done()
        assert x.exception() is None
    assert len(others) > 0


def test_work_goes_to_idle_workers_at_submit(ex):
    # As in ProcessPoolExecutor, up to max_workers + 1 items are handed over by
    # submit itself while run times are unknown: running before the call returns.
    fs = [ex.submit(f.sleep_return, 0.5, i) for i in range(6)]
    assert [x.running() for x in fs] == [True] * 3 + [False] * 3
    assert all(x.cancel() for x in fs[3:])
    assert [x.result(timeout=DEADLINE) for x in fs[:3]] == [0, 1, 2]


def test_many_tiny_submits_complete_in_order():
    # Once run times are known to be short the pipe is deeper; order is kept
    # (one worker counts its calls).
    with lazyshare.Executor(max_workers=1) as ex:
        fs = [ex.submit(u.call_number) for _ in range(10_000)]
        out = [x.result(timeout=DEADLINE) for x in fs]
        assert out == list(range(out[0], out[0] + 10_000))
        assert ex._state.limit() > 2  # the pipe did deepen


def test_tiny_submits_from_threads_all_complete(ex):
    import threading

    results: dict = {}

    def submitter(k):
        fs = [ex.submit(f.mul, k, i) for i in range(2000)]
        results[k] = [x.result(timeout=DEADLINE) for x in fs]

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert results == {k: [k * i for i in range(2000)] for k in range(4)}


@pytest.mark.parametrize("exc", [SystemExit(4), ValueError("no")])
def test_argument_that_cannot_be_unpickled_in_the_worker(ex1, exc):
    # ProcessPoolExecutor's worker dies of it and the pool breaks; here that
    # future fails with the error and the worker goes on.
    pid = ex1.submit(u.getpid).result(timeout=DEADLINE)
    err = ex1.submit(u.same, u._RaisesInWorker(os.getpid(), exc)).exception(timeout=DEADLINE)
    assert type(err) is type(exc) and err.args == exc.args
    assert ex1.submit(u.getpid).result(timeout=DEADLINE) == pid


def test_a_broken_executor_refuses_new_work():
    # The initializer failed max(3, max_workers) times in a row: the pool is
    # broken for good, and, as in ProcessPoolExecutor, submit raises.
    ex = lazyshare.Executor(max_workers=2, initializer=u.failing_initializer)
    try:
        with pytest.raises(BrokenProcessPool, match="initializer failed"):
            ex.submit(pow, 2, 2).result(timeout=DEADLINE)
        with pytest.raises(BrokenProcessPool, match="initializer failed") as info:
            ex.submit(pow, 2, 3)
        assert isinstance(info.value, BrokenWorkerError)
        assert isinstance(info.value.__cause__, WorkerLostError)
    finally:
        assert _shut_down_within(ex)


def test_argument_whose_pickling_exits_fails_its_future_and_shutdown_returns():
    ex = lazyshare.Executor(2)
    try:
        fut = ex.submit(u.same, u.ExitAtPickle())
        with pytest.raises(SystemExit):
            fut.result(timeout=60)
        assert ex.submit(u.same, 3).result(timeout=60) == 3
    finally:
        ex.shutdown()
