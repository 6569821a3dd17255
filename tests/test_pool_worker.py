"""The worker side of the pool against the stdlib's: ``__main__`` namespaces,
what arguments arrive as, results that point into lazy memory, task-error
semantics, the workers' environment. ``__main__`` behaviour needs real scripts,
run in a subprocess; worker functions otherwise live in _worker_funcs."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.pool
import os
import subprocess
import sys
import textwrap

import _worker_funcs as wf
import numpy as np
import pytest
from conftest import DEADLINE, wait_for
from test_core import _run_script, run_as_nobody

from lazyshare import handler
from lazyshare.pool import Pool

pytestmark = pytest.mark.timeout(DEADLINE)

HERE = os.path.dirname(os.path.abspath(__file__))


def run_file(path, code, *args, env=None, cwd=None, module=None):
    """Write ``code`` to ``path`` and run it (``python path *args``, or
    ``python -m module`` from ``cwd``); tests/ is importable. Returns the
    completed process; asserts it succeeded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(code))
    pythonpath = os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])
    full_env = dict(os.environ, PYTHONPATH=pythonpath, **(env or {}))
    cmd = [sys.executable, "-m", module] if module else [sys.executable, str(path)]
    r = subprocess.run(
        [*cmd, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=DEADLINE - 5
    )
    assert r.returncode == 0, r.stderr
    return r


# --------------------------------------------------------------------------- __main__
MAIN_NAMESPACE = """
import json, multiprocessing as mp, multiprocessing.pool, sys
import numpy as np
import lazyshare

model = None
n = 0

def init():
    global model
    model = "loaded"

def get_model(_=None):
    return model

def count(_=None):
    global n
    n += 1
    return n

class Point:
    def __init__(self, x):
        self.x = x

def is_point(p):
    return isinstance(p, Point), type(p).__module__

def run(pool, ctx):
    big = np.ones(1 << 18)  # 2 MiB: lazy for lazyshare (threshold 1 MiB)
    with pool(1, initializer=init, context=ctx) as p:
        return {
            "model": [p.apply(get_model), p.apply(get_model, (big,)), p.map(get_model, [big] * 2)],
            "count": [p.apply(count) for _ in range(3)] + [p.apply(count, (big,)) for _ in range(3)],
            "map": p.map(count, [big] * 4, chunksize=2) + p.map(count, [None] * 4, chunksize=2),
            "imap": list(p.imap(count, [big] * 3)) + list(p.imap(count, [big] * 4, chunksize=2)),
            "starmap": p.starmap(count, [(big,)] * 2),
            "class": [p.apply(is_point, (Point(1),)), p.apply(is_point, (Point(big),))],
        }

if __name__ == "__main__":
    ctx = mp.get_context(sys.argv[1])
    print(json.dumps([run(mp.pool.Pool, ctx), run(lazyshare.Pool, ctx)]))
"""


@pytest.mark.parametrize(
    "how, method", [("script", "forkserver"), ("script", "spawn"), ("module", "forkserver")]
)
def test_main_functions_share_one_namespace_as_with_the_stdlib(tmp_path, how, method):
    """The initializer's ``global`` writes and a ``__main__`` counter are seen by
    every later task of that worker, on every path, as with multiprocessing.Pool."""
    if how == "script":
        r = run_file(tmp_path / "script.py", MAIN_NAMESPACE, method)
    else:  # python -m mainmod: workers import it by name
        r = run_file(tmp_path / "mainmod.py", MAIN_NAMESPACE, method, cwd=tmp_path, module="mainmod")
    stdlib, ours = json.loads(r.stdout)
    assert stdlib["model"] == ["loaded", "loaded", ["loaded", "loaded"]]
    assert stdlib["count"] == list(range(1, 7))  # the reference, one worker
    assert ours == stdlib


BY_VALUE = """
import multiprocessing as mp
import numpy as np
import lazyshare

def twice(x):
    return 2 * x

def total(a):
    return float(a.sum())

if __name__ == "__main__":
    big = np.ones(1 << 18)
    with lazyshare.Pool(1, initializer=twice, initargs=(1,)) as p:
        print(p.apply(twice, (21,)), p.apply(total, (big,)), p.map(total, [big] * 2, chunksize=2),
              list(p.imap(twice, [1, 2])))
"""


def test_main_functions_workers_cannot_import_go_by_value(tmp_path):
    """``python -c`` and a package's ``__main__.py`` (which workers do not run:
    the stdlib cannot call their functions at all) keep by-value pickling."""
    want = f"42 {float(1 << 18)} [{float(1 << 18)}, {float(1 << 18)}] [2, 4]"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [sys.executable, "-c", BY_VALUE], env=env, capture_output=True, text=True, timeout=DEADLINE - 5
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want
    r = run_file(tmp_path / "mainpkg" / "__main__.py", BY_VALUE, cwd=tmp_path, module="mainpkg")
    assert r.stdout.strip() == want


# --------------------------------------------------------------------------- arguments
def read_only_arrays():
    small = np.arange(100.0)
    strided = np.arange(200.0)[::2]
    big = np.arange(1 << 18, dtype=np.float64)  # 2 MiB: lazy
    for a in (small, strided, big):
        a.flags.writeable = False
    from_bytes = np.frombuffer(b"x" * 800, dtype=np.uint8)  # read-only memory
    return small, strided, from_bytes, big, big[10:], big[::3]


def test_read_only_arguments_arrive_writable_as_with_the_stdlib():
    """The stdlib gives a writable private copy of every array; so do the fast
    path (C pickler), cloudpickle's (a lambda alongside) and lazy arrays."""
    arrays = read_only_arrays()
    small = arrays[:3]
    with multiprocessing.get_context("forkserver").Pool(1) as sp:
        want = sp.apply(wf.write_first, arrays)
    assert want == [(True, 7.0)] * len(arrays)
    with Pool(1) as p:
        assert p.apply(wf.write_first, small) == want[:3]  # _dumps_small
        assert p.apply(lambda *a: wf.write_first(*a), small) == want[:3]  # cloudpickle
        assert p.apply(wf.write_first, arrays) == want  # big ones lazily
        assert p.map(wf.write_first, arrays, chunksize=3) == [[w] for w in want]
        st = p.stats()
        # Lazily: not pickled, and mapped from the parent (fetched by the task,
        # or, for the first page, put in the page cache when the call began).
        assert st["totals"]["bytes_pickled"] < arrays[3].nbytes
        assert st["totals"]["bytes_lazy"] + st["cache"]["bytes_filled"] > 0
    assert [float(a.flat[0]) for a in arrays] == [0.0, 0.0, 120.0, 0.0, 10.0, 0.0]  # writes stayed private


def test_memoryview_argument_fails_as_with_the_stdlib():
    """The stdlib cannot pickle a memoryview (lazyshare used to send it as
    bytes): the call fails in the caller with the stdlib's TypeError, and the
    pool goes on."""
    mv = memoryview(b"abc")
    big = np.ones(1 << 18)
    calls = [
        lambda p: p.apply(wf.identity, (mv,)),
        lambda p: p.apply(wf.identity, (mv, big)),
        lambda p: p.apply_async(wf.identity, ({"deep": [mv]},)).get(DEADLINE),
        lambda p: p.map(wf.identity, [1, mv, 2]),
        lambda p: p.map(wf.identity, [big, mv], chunksize=1),
        lambda p: list(p.imap(wf.identity, [1, mv])),
        lambda p: p.starmap(wf.identity, [(mv, big)]),
    ]

    def outcomes(p):
        out = []
        for call in calls:
            try:
                call(p)
                out.append("no error")
            except Exception as e:
                out.append((type(e).__name__, str(e), e.__cause__ is None))
        out.append(p.apply(wf.identity, (5,)))
        return out

    with multiprocessing.get_context("forkserver").Pool(1) as sp:
        want = outcomes(sp)
    assert want[0][0] == "TypeError" and "memoryview" in want[0][1]
    with Pool(1) as p:
        assert outcomes(p) == want


# --------------------------------------------------------------------------- results
RETURN_LAZY = """
import errno, os, numpy as np, pandas as pd, lazyshare, _worker_funcs as wf

def check(name, call, want):
    try:
        got = call()
    except Exception as e:  # carrying the array, or as the cause of a broken pool's error
        got = getattr(e.__cause__ if isinstance(e, lazyshare.WorkerLostError) else e, "array", None)
        if got is None:
            return f"{name}: {e!r}"
    same = got.equals(want) if isinstance(want, pd.DataFrame) else np.array_equal(got, want)
    return f"{name}: {'ok' if same else 'DIFFERENT'}"

if __name__ == "__main__":
    a = np.random.default_rng(5).random(2 << 20)  # 16 MiB
    df = pd.DataFrame({"x": a[: 1 << 20], "y": a[1 << 20 :]})
    budget = os.environ.get("TEST_BUDGET")
    with lazyshare.Pool(1, memory_budget=budget and int(budget)) as p:
        print(p.apply(wf.mode))
        print(check("arg", lambda: p.apply(wf.identity, (a,)), a))
        print(check("view", lambda: p.apply(wf.view, (a, 1000, -1000)), a[1000:-1000]))
        print(check("strided", lambda: p.apply(wf.view, (a, 1, None, 3)), a[1::3]))
        print(check("map", lambda: np.concatenate(p.map(wf.identity, [a[:4096], a], chunksize=2)),
                    np.concatenate([a[:4096], a])))
        print(check("exception", lambda: p.apply(wf.raise_with, (a,)), a))
        print(check("frame", lambda: p.apply(wf.rename, (df,)), df.rename(columns=str.upper)))
        try:
            print("write:", p.apply(wf.write_untouched, (a,)) == a.nbytes)
        except OSError as e:  # the user-mode-only rung; the error says what to do
            print("write:", e.errno == errno.EFAULT and "materialize" in " ".join(e.__notes__))
        desc = lazyshare.export(a)
        try:
            with lazyshare.Pool(1, initializer=wf.fail_with_attached, initargs=(desc,)) as q:
                print(check("initializer", lambda: q.apply(wf.identity, (1,)), a))
        finally:
            lazyshare.release(desc)
"""
RESULTS = ["arg: ok", "view: ok", "strided: ok", "map: ok", "exception: ok", "frame: ok", "write: True"]


def lazy_results(run, mode, **env):
    r = run(RETURN_LAZY, env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:9] == [mode, *RESULTS, "initializer: ok"]


@pytest.mark.parametrize("budget", [None, 4 << 20])
def test_results_pointing_into_lazy_memory_on_the_user_mode_only_rung(budget):
    """libzmq sends big frames zero-copy with send(2), a kernel-mode read that
    fails on a lazy page not fetched yet on this rung (EFAULT: libzmq aborted
    the worker). The argument itself, a view, an exception carrying it, a
    pandas frame sharing its memory (copy-on-write) all come back intact."""
    env = {"LAZYSHARE_MODE": "uffd-user-mode-only"}
    if budget:
        env["TEST_BUDGET"] = str(budget)
    lazy_results(_run_script, "uffd-user-mode-only", **env)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges to another user")
def test_results_pointing_into_lazy_memory_as_an_ordinary_user():
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        mode = "uffd" if f.read().strip() == "1" else "uffd-user-mode-only"
    lazy_results(lambda code, env: run_as_nobody(code, env), mode)


@pytest.mark.skipif(handler.capabilities().mode != "uffd", reason="the full uffd rung is not available")
def test_results_pointing_into_lazy_memory_on_the_full_rung():
    lazy_results(_run_script, "uffd", LAZYSHARE_MODE="uffd")


# --------------------------------------------------------------------------- task errors
FAILING = [
    (wf.exit_with, (3,)),
    (wf.interrupt, ()),
    (wf.returns_lock, ()),
    (wf.exits_when_pickled, ()),
    (wf.raises_locked, ()),
]


def outcomes(run, calls):
    """What each ``run(fn, args)`` raised: type, message, the type of its cause
    and the remote traceback's last line."""
    out = []
    for fn, args in calls:
        try:
            run(fn, args)
            out.append("no error")
        except BaseException as e:
            cause = e.__cause__
            remote = str(cause).strip().strip('"').strip().split("\n")[-1] if cause is not None else None
            out.append((type(e).__name__, str(e), type(cause).__name__.lstrip("_"), remote))
    return out


def test_future_semantics_as_process_pool_executor():
    """With ``_future_semantics`` (the Executor's) a task's BaseException is its
    exception and an error pickling the result is delivered itself, as
    ProcessPoolExecutor's worker does; the worker goes on."""
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(1, mp_context=ctx) as ex:
        pid = ex.submit(os.getpid).result()
        want = outcomes(lambda fn, args: ex.submit(fn, *args).result(), FAILING)
        assert ex.submit(os.getpid).result() == pid
    assert [w[0] for w in want] == ["SystemExit", "KeyboardInterrupt", "TypeError", "SystemExit", "TypeError"]
    assert {w[2] for w in want} == {"RemoteTraceback"}
    with Pool(1, _future_semantics=True) as p:
        pid = p.apply(os.getpid)
        assert outcomes(p.apply, FAILING) == want  # each with the remote traceback as its cause
        # an exception that cannot be unpickled: the error that says so
        [(kind, msg, cause, remote)] = outcomes(p.apply, [(wf.raises_needs_two, ())])
        # (Python 3.9's message does not name the class: check the part every version has)
        assert kind == "TypeError" and "required positional argument" in msg and cause == "RemoteTraceback"
        assert p.apply(os.getpid) == pid  # never replaced


def test_pool_semantics_as_the_stdlib_pool():
    """Without it, the stdlib pool's choices: an error pickling the result is a
    MaybeEncodingError; SystemExit and KeyboardInterrupt end the worker (the
    stdlib's pool then hangs; here the task fails with WorkerLostError)."""
    from lazyshare.errors import WorkerLostError

    with Pool(1) as p:
        for fn, args in [(wf.exit_with, (3,)), (wf.interrupt, ()), (wf.exits_when_pickled, ())]:
            with pytest.raises(WorkerLostError):
                p.apply(fn, args)
        for fn in (wf.returns_lock, wf.raises_locked, wf.raises_needs_two):
            with pytest.raises(multiprocessing.pool.MaybeEncodingError):
                p.apply(fn)
        assert p.apply(wf.identity, (5,)) == 5


# --------------------------------------------------------------------------- environment
def test_workers_start_with_the_parents_environment_of_the_moment(monkeypatch):
    """The fork server's environment is frozen when the first pool starts it;
    each worker starts with the parent's as it is when that worker starts."""
    from multiprocessing import forkserver

    forkserver.ensure_running()  # so that it cannot have the variables below
    monkeypatch.setenv("LS_TEST_LATE", "late")
    with Pool(1) as p:
        assert p.apply(wf.environ, ("LS_TEST_LATE",))[0] == {"LS_TEST_LATE": "late"}
    # A replacement worker (maxtasksperchild) sees the value current when it
    # starts: change it once the next worker has started, and the one after
    # that (which starts when this task is done) sees the change.
    monkeypatch.setenv("LS_TEST_LATE", "a")
    seen = []
    with Pool(1, maxtasksperchild=1) as p:
        for change in ("b", None, None):
            env, pid = p.apply(wf.environ, ("LS_TEST_LATE",))
            seen.append((env["LS_TEST_LATE"], pid))
            assert wait_for(lambda pid=pid: p._pool[0].pid not in (None, pid))  # the next one is up
            if change is None:
                monkeypatch.delenv("LS_TEST_LATE", raising=False)
            else:
                monkeypatch.setenv("LS_TEST_LATE", change)
        env, pid = p.apply(wf.environ, ("LS_TEST_LATE",))
        seen.append((env["LS_TEST_LATE"], pid))
    assert [v for v, _ in seen] == ["a", "a", "b", None]
    assert len({pid for _, pid in seen}) == 4


REMOVED_VARIABLE = """
import os, sys, multiprocessing as mp, lazyshare, _worker_funcs as wf
if __name__ == "__main__":
    ctx = mp.get_context(sys.argv[1])
    os.environ["LS_TEST_GONE"] = "there"
    with lazyshare.Pool(1, context=ctx) as p:  # the fork server starts with it
        print(p.apply(wf.environ, ("LS_TEST_GONE",))[0])
    del os.environ["LS_TEST_GONE"]
    os.environ["LS_TEST_NEW"] = "new"
    with lazyshare.Pool(1, context=ctx) as p:
        print(p.apply(wf.environ, ("LS_TEST_GONE", "LS_TEST_NEW"))[0])
"""


def test_a_variable_removed_in_the_parent_is_gone_in_later_workers(tmp_path):
    """As with spawn, where each child inherits the parent's environment."""
    want = "{'LS_TEST_GONE': 'there'}\n{'LS_TEST_GONE': None, 'LS_TEST_NEW': 'new'}\n"
    for method in ("spawn", "forkserver"):
        assert run_file(tmp_path / "gone.py", REMOVED_VARIABLE, method).stdout == want, method


def test_worker_env_is_applied_on_top_with_thread_limits():
    """``_worker_env`` (the joblib backend's per-worker limits): set before the
    task runs, and the BLAS numpy already loaded in the worker is limited too
    (threadpoolctl), not only libraries loaded later."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with Pool(1) as p:
        default = p.apply(wf.blas_threads)
    if not default or max(default.values()) < 2:
        pytest.skip(f"no BLAS with more than one thread to limit here: {default}")
    assert threadpoolctl  # the parent has it too: the workers import the same one
    extra = {
        "LS_TEST_EXTRA": "x",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    with Pool(1, _worker_env=extra) as p:
        env, _ = p.apply(wf.environ, tuple(extra))
        assert env == extra
        assert p.apply(wf.blas_threads) == {api: 1 for api in default}
    with pytest.raises(TypeError):
        Pool(1, _worker_env={"X": 1})
