"""The "lazyshare" joblib backend: registration, results, errors, a 64 MiB array
argument that moves only the pages its tasks touch (joblib's own auto-memmapping
is off), and the pool reused across calls: same workers for the same key, a new
pool for another, idle timeout, errors and aborted calls, exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import _ext_funcs as f
import _joblib_funcs as jf
import numpy as np
import pytest
from conftest import DEADLINE, pid_alive, wait_for

joblib = pytest.importorskip("joblib")
from joblib import Parallel, delayed, parallel_config  # noqa: E402

import lazyshare  # noqa: E402
import lazyshare.joblib  # noqa: E402  (registers the backend)
from lazyshare.joblib import LazyshareBackend  # noqa: E402

pytestmark = pytest.mark.timeout(DEADLINE)
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def _shutdown_reused_pool(no_leftover_children):
    """The backend keeps its pool between calls: shut it down before the
    leftover-children check runs."""
    yield
    lazyshare.joblib.shutdown()


def _pids(backend):
    return set(backend.stats()["workers"])


def _all_dead(pids):
    return wait_for(lambda: not any(pid_alive(p) for p in pids))


def test_registered_on_import_and_by_function():
    from joblib.parallel import BACKENDS

    assert BACKENDS["lazyshare"] is LazyshareBackend
    del BACKENDS["lazyshare"]
    lazyshare.register_joblib()
    lazyshare.register_joblib()  # idempotent
    assert BACKENDS["lazyshare"] is LazyshareBackend


def test_parallel_config_moves_only_touched_pages():
    big = np.arange(8 << 20, dtype=np.float64)  # 64 MiB
    bounds = [(i << 20, (i << 20) + 4096) for i in range(8)]  # 32 KiB of each 8 MiB
    backend = LazyshareBackend()
    served = lazyshare.stats()["bytes_served"]
    with parallel_config(backend=backend, n_jobs=2):
        out = Parallel()(delayed(f.slice_sum)(big, lo, hi) for lo, hi in bounds)
    assert out == [float(big[lo:hi].sum()) for lo, hi in bounds]
    moved = lazyshare.stats()["bytes_served"] - served
    totals = backend.stats()["totals"]
    assert 0 < moved < big.nbytes // 4, moved
    assert 0 < totals["bytes_lazy"] < big.nbytes // 4
    assert totals["bytes_pickled"] < 1 << 20  # joblib did not pickle the array
    assert totals["tasks"] >= 1


def test_by_name_with_workers_getting_plain_writable_arrays(tmp_path):
    big = np.ones(2 << 20)  # 16 MiB: joblib's loky would memmap this read-only
    with parallel_config(backend="lazyshare", n_jobs=2, temp_folder=str(tmp_path)):
        infos = Parallel()(delayed(f.array_info)(big) for _ in range(4))
    assert infos == [("ndarray", True)] * 4
    assert list(tmp_path.iterdir()) == []  # nothing was dumped to disk


def test_threshold_backend_parameter():
    big = np.ones(2 << 20)  # 16 MiB, under a 32 MiB threshold: pickled
    backend = LazyshareBackend(threshold=32 << 20)
    with parallel_config(backend=backend, n_jobs=2):
        assert Parallel()(delayed(f.slice_sum)(big, 0, 10) for _ in range(2)) == [10.0, 10.0]
    totals = backend.stats()["totals"]
    assert totals["bytes_lazy"] == 0 and totals["bytes_pickled"] >= big.nbytes


def test_memory_budget_backend_parameter():
    import _pool_funcs

    a = np.ones(8 << 20)  # 64 MiB
    with parallel_config(backend="lazyshare", n_jobs=2, memory_budget=8 << 20):
        (s1, s2, v, _grew, dropped), _ = Parallel()(delayed(_pool_funcs.budget_pass)(a) for _ in range(2))
    assert s1 == s2 == float(a.size) - 2.0 and v == -1.0
    assert dropped >= a.nbytes - (8 << 20)  # the workers kept to the budget


def test_errors_propagate():
    with pytest.raises(ZeroDivisionError):
        Parallel(n_jobs=2, backend="lazyshare")(delayed(f.div)(1, x) for x in (1, 0, 2))


def test_n_jobs_1_runs_sequentially():
    assert Parallel(n_jobs=1, backend="lazyshare")(delayed(f.mul)(i, 2) for i in range(3)) == [0, 2, 4]


# --------------------------------------------------------------------------- the reused pool


def test_consecutive_calls_reuse_the_workers():
    first, second = LazyshareBackend(), LazyshareBackend()
    with parallel_config(backend=first, n_jobs=2):
        assert Parallel(batch_size=1)(delayed(f.mul)(i, 2) for i in range(8)) == list(range(0, 16, 2))
    with parallel_config(backend=second, n_jobs=2):
        ran_on = set(Parallel(batch_size=1)(delayed(f.getpid)() for _ in range(3)))
    assert len(_pids(first)) == 2
    assert _pids(second) == _pids(first)
    assert ran_on <= _pids(first)
    assert all(pid_alive(p) for p in _pids(first))  # kept for the next call
    # each backend's counters are its own call's, not the pool's since it started
    assert first.stats()["totals"]["tasks"] == 8
    assert second.stats()["totals"]["tasks"] == 3
    with parallel_config(backend="lazyshare", n_jobs=2):  # by name too
        assert set(Parallel()(delayed(f.getpid)() for _ in range(8))) <= _pids(first)


def test_another_key_gets_a_new_pool_and_the_old_one_is_shut_down():
    two, three, two_again = LazyshareBackend(), LazyshareBackend(), LazyshareBackend()
    with parallel_config(backend=two, n_jobs=2):
        Parallel()(delayed(f.mul)(i) for i in range(4))
    with parallel_config(backend=three, n_jobs=3):
        Parallel()(delayed(f.mul)(i) for i in range(6))
    assert len(_pids(three)) == 3 and not _pids(three) & _pids(two)
    assert _all_dead(_pids(two))
    with parallel_config(backend=two_again, n_jobs=2):
        Parallel()(delayed(f.mul)(i) for i in range(4))
    assert not _pids(two_again) & (_pids(two) | _pids(three))
    assert _all_dead(_pids(three))
    other = LazyshareBackend(threshold=32 << 20)  # a backend parameter is part of the key
    with parallel_config(backend=other, n_jobs=2):
        Parallel()(delayed(f.mul)(i) for i in range(4))
    assert not _pids(other) & _pids(two_again)


def test_workers_get_joblibs_thread_limits_and_they_are_part_of_the_key():
    default = str(os.environ.get("OMP_NUM_THREADS", max(joblib.cpu_count() // 2, 1)))
    first, limited = LazyshareBackend(), LazyshareBackend()
    with parallel_config(backend=first, n_jobs=2):
        envs = Parallel()(delayed(jf.thread_env)() for _ in range(4))
    assert {e["OMP_NUM_THREADS"] for e in envs} == {default}
    assert all(e["OPENBLAS_NUM_THREADS"] and e["MKL_NUM_THREADS"] for e in envs)
    with parallel_config(backend=limited, n_jobs=2, inner_max_num_threads=3):
        envs = Parallel()(delayed(jf.thread_env)() for _ in range(4))
    assert {tuple(e.values()) for e in envs} == {("3", "3", "3")}
    assert not _pids(limited) & _pids(first)  # other limits: another pool


def test_idle_timeout_shuts_the_pool_down():
    kept, idle = LazyshareBackend(), LazyshareBackend(idle_worker_timeout=0.2)
    with parallel_config(backend=kept, n_jobs=2):
        Parallel()(delayed(f.mul)(i) for i in range(4))
    with parallel_config(backend=idle, n_jobs=2):  # same key: the same pool
        Parallel()(delayed(f.mul)(i) for i in range(4))
    assert _pids(idle) == _pids(kept)
    assert _all_dead(_pids(idle))  # 0.2 s after the last call left it
    again = LazyshareBackend()
    with parallel_config(backend=again, n_jobs=2):  # a Parallel argument, as for loky
        Parallel(idle_worker_timeout=0)(delayed(f.mul)(i) for i in range(4))
    assert not _pids(again) & _pids(idle)
    assert _all_dead(_pids(again))


def test_error_with_tasks_still_running_kills_the_workers():
    failed, after = LazyshareBackend(), LazyshareBackend()
    with parallel_config(backend=failed, n_jobs=2):
        with pytest.raises(ZeroDivisionError):
            Parallel(batch_size=1, pre_dispatch="all")(
                [delayed(f.sleep_return)(DEADLINE), delayed(f.div)(1, 0)]
            )
    assert _all_dead(_pids(failed))  # the sleeping task did not run on
    with parallel_config(backend=after, n_jobs=2):
        assert Parallel()(delayed(f.mul)(i, 3) for i in range(4)) == [0, 3, 6, 9]
    assert not _pids(after) & _pids(failed)


def test_error_with_nothing_running_keeps_the_pool():
    ok, failed, after = LazyshareBackend(), LazyshareBackend(), LazyshareBackend()
    with parallel_config(backend=ok, n_jobs=2):
        Parallel()(delayed(f.mul)(i) for i in range(4))
    with parallel_config(backend=failed, n_jobs=2):
        with pytest.raises(ValueError, match="task 0 failed"):
            Parallel()([delayed(jf.fail)(0)])
    with parallel_config(backend=after, n_jobs=2):
        assert Parallel()(delayed(f.mul)(i, 3) for i in range(4)) == [0, 3, 6, 9]
    assert _pids(after) == _pids(failed) == _pids(ok)


def test_managed_parallel_aborted_goes_on_with_a_new_pool():
    backend = LazyshareBackend()
    with parallel_config(backend=backend, n_jobs=2):
        with Parallel(batch_size=1, pre_dispatch="all") as parallel:
            before = _pids(backend)
            with pytest.raises(ZeroDivisionError):
                parallel([delayed(f.sleep_return)(DEADLINE), delayed(f.div)(1, 0)])
            assert parallel(delayed(f.mul)(i, 2) for i in range(4)) == [0, 2, 4, 6]
            assert not _pids(backend) & before
    assert _all_dead(before)


def test_concurrent_calls_share_the_pool_and_an_error_in_one_spares_the_other():
    import threading

    with multiprocessing_manager() as manager:
        go = manager.Event()
        out = {}
        a, b = LazyshareBackend(), LazyshareBackend()

        def call_a():
            with parallel_config(backend=a, n_jobs=2):
                out["a"] = Parallel(batch_size=1)([delayed(jf.wait_event)(go, "a")])

        t = threading.Thread(target=call_a)
        t.start()
        assert wait_for(lambda: a.stats() is not None and a.stats()["totals"]["bytes_pickled"] > 0)
        with parallel_config(backend=b, n_jobs=2):
            with pytest.raises(ValueError, match="task 1 failed"):
                Parallel(batch_size=1, pre_dispatch="all")(
                    [delayed(jf.fail)(1), delayed(jf.wait_event)(go, "b")]
                )
        go.set()
        t.join(DEADLINE)
        assert out["a"] == ["a"]  # not killed by the other call's abort
        assert _pids(a) == _pids(b)


def test_broken_pool_is_replaced(tmp_path, capfd):
    flag = tmp_path / "fail"
    flag.touch()
    opts = dict(backend="lazyshare", n_jobs=2, initializer=jf.fail_init_if, initargs=(str(flag),))
    with parallel_config(**opts):
        with pytest.raises(lazyshare.WorkerLostError, match="initializer"):
            Parallel()(delayed(f.mul)(i) for i in range(4))
    flag.unlink()
    with parallel_config(**opts):
        assert Parallel()(delayed(f.mul)(i, 2) for i in range(4)) == [0, 2, 4, 6]
    assert "pool is broken" in capfd.readouterr().err


def test_shutdown_then_a_new_pool():
    first, second = LazyshareBackend(), LazyshareBackend()
    with parallel_config(backend=first, n_jobs=2):
        Parallel()(delayed(f.mul)(i) for i in range(4))
    lazyshare.joblib.shutdown()
    assert _all_dead(_pids(first))
    with parallel_config(backend=second, n_jobs=2):
        assert Parallel()(delayed(f.mul)(i) for i in range(4)) == [0, 1, 2, 3]
    assert not _pids(second) & _pids(first)


def test_a_worker_dying_in_a_task_fails_the_call_not_the_next():
    failed, after = LazyshareBackend(), LazyshareBackend()
    with parallel_config(backend=failed, n_jobs=2):
        with pytest.raises(lazyshare.WorkerLostError):
            Parallel()([delayed(os._exit)(3)])
    with parallel_config(backend=after, n_jobs=2):
        assert Parallel()(delayed(f.mul)(i) for i in range(4)) == [0, 1, 2, 3]


def test_nested_parallel_follows_joblib_rules():
    backend = LazyshareBackend()
    with parallel_config(backend=backend, n_jobs=2):
        outs = Parallel()(delayed(jf.nested)(3) for _ in range(2))
        again = Parallel()(delayed(f.getpid)() for _ in range(4))
    for out in outs:
        assert out["daemon"]
        assert out["inner"] == ("ThreadingBackend", [0, 1, 2])  # joblib's nested backend
        assert out["by_name"] == ("SequentialBackend", [0, 1, 2])  # no processes below processes
        assert any("cannot be nested" in w for w in out["warnings"])
    assert set(again) <= _pids(backend)


EXIT_SCRIPT = """
import warnings
warnings.simplefilter("always")
from joblib import Parallel, delayed, parallel_config
import _ext_funcs as f
import lazyshare.joblib
if __name__ == "__main__":
    b = lazyshare.joblib.LazyshareBackend()
    with parallel_config(backend=b, n_jobs=2):
        Parallel()(delayed(f.mul)(i) for i in range(4))
    print(*sorted(b.stats()["workers"]))
"""


def test_interpreter_exit_shuts_the_pool_down_quietly():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [sys.executable, "-X", "dev", "-c", textwrap.dedent(EXIT_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    pids = [int(p) for p in r.stdout.split()]
    assert len(pids) == 2
    assert _all_dead(pids)


class multiprocessing_manager:
    """A multiprocessing Manager, shut down on exit."""

    def __enter__(self):
        import multiprocessing

        self.manager = multiprocessing.get_context("forkserver").Manager()
        return self.manager

    def __exit__(self, *exc):
        self.manager.shutdown()


# --------------------------------------------------------------------------- prefer / require


def _ran_in_this_process(out):
    return {pid for pid, _ in out} == {os.getpid()}


def test_prefer_threads_under_parallel_config_runs_on_threads_as_by_default():
    tasks = [delayed(jf.where)() for _ in range(4)]
    with parallel_config(n_jobs=2):  # joblib's default backend
        default = Parallel(n_jobs=2, prefer="threads")
        default(tasks)
    with parallel_config(backend="lazyshare", n_jobs=2):
        ours = Parallel(n_jobs=2, prefer="threads")
        assert _ran_in_this_process(ours(tasks))
        assert type(ours._backend) is type(default._backend)
        assert ours._effective_n_jobs() == default._effective_n_jobs() == 2
        # n_jobs from the config (joblib's default backend would run one thread)
        from_config = Parallel(prefer="threads")
        assert _ran_in_this_process(from_config(tasks))
        assert type(from_config._backend) is type(default._backend)
        # no preference, or processes preferred: the lazyshare pool
        for parallel in (Parallel(), Parallel(prefer="processes")):
            out = parallel(tasks)
            assert os.getpid() not in {pid for pid, _ in out}
            assert isinstance(parallel._backend, LazyshareBackend)


def test_prefer_threads_is_ignored_when_the_call_names_the_backend():
    # joblib: "prefer ... Ignored if the backend parameter is specified" (loky too)
    out = Parallel(n_jobs=2, backend="lazyshare", prefer="threads")(delayed(jf.where)() for _ in range(4))
    assert os.getpid() not in {pid for pid, _ in out}


def test_require_sharedmem_gets_threads():
    with parallel_config(backend="lazyshare", n_jobs=2):
        parallel = Parallel(n_jobs=2, require="sharedmem")
        assert _ran_in_this_process(parallel(delayed(jf.where)() for _ in range(4)))
        assert parallel._effective_n_jobs() == 2
    with pytest.raises(ValueError, match="shared memory"):
        Parallel(n_jobs=2, backend="lazyshare", require="sharedmem")


# --------------------------------------------------------------------------- generators


def test_generator_streams_results_in_order_and_reads_the_input_lazily():
    with multiprocessing_manager() as manager:
        go = manager.Event()
        pulled = []

        def tasks():
            for i in range(40):
                pulled.append(i)
                yield delayed(f.mul)(i) if i == 0 else delayed(jf.wait_event)(go, i)

        with parallel_config(backend="lazyshare", n_jobs=2):
            gen = Parallel(return_as="generator", batch_size=1)(tasks())
            assert next(gen) == 0  # while the other tasks wait
            assert len(pulled) < 40
            go.set()
            assert list(gen) == list(range(1, 40))


def test_generator_unordered_yields_in_completion_order():
    with multiprocessing_manager() as manager:
        go = manager.Event()
        with parallel_config(backend="lazyshare", n_jobs=2):
            gen = Parallel(return_as="generator_unordered", batch_size=1)(
                [delayed(jf.wait_event)(go, "slow"), delayed(f.mul)(7)]
            )
            assert next(gen) == 7
            go.set()
            assert list(gen) == ["slow"]


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_generator_closed_early_does_not_hang_and_the_pool_goes_on(return_as):
    backend, after = LazyshareBackend(), LazyshareBackend()
    with parallel_config(backend=backend, n_jobs=2):
        gen = Parallel(return_as=return_as)(delayed(f.sleep_return)(0.05, i) for i in range(1000))
        got = []
        for x in gen:
            got.append(x)
            if len(got) == 3:
                break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # joblib: "tasks ... have been cancelled"
            gen.close()
        assert len(got) == 3
        assert _all_dead(_pids(backend))  # its running tasks were killed
    with parallel_config(backend=after, n_jobs=2):
        assert sorted(Parallel(return_as=return_as)(delayed(f.mul)(i) for i in range(4))) == [0, 1, 2, 3]


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_generator_raises_a_task_error_and_the_pool_goes_on(return_as):
    with parallel_config(backend="lazyshare", n_jobs=2):
        gen = Parallel(return_as=return_as)(delayed(f.div)(1, x) for x in (1, 0, 2))
        with pytest.raises(ZeroDivisionError):
            for _ in gen:
                pass
        assert sorted(Parallel(return_as=return_as)(delayed(f.mul)(i) for i in range(4))) == [0, 1, 2, 3]
