"""Cases of test_output.py, each run in a fresh interpreter (``python
_output_child.py NAME``) at the rung the test chose (root, user nobody, or
``LAZYSHARE_MODE=eager``). A case prints a dict as JSON on its last line."""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

import numpy as np

import lazyshare
from lazyshare import handler

MB = 1 << 20
N = 16


# ---------------------------------------------------------------- task functions (run in workers)


def fill_block(out, i, n=N, value=None):
    k = len(out) // n
    out[i * k : (i + 1) * k] = np.arange(i * k, (i + 1) * k) * 3.0 + 1 if value is None else value
    return i


def fill_strided(out, i, n=N):
    out[i::n] = np.arange(i, len(out), n) * 7.0 + 0.5
    return i


def write_then(out, at, value, then=None, delay=0.0):
    if delay:
        time.sleep(delay)
    for a, b in at:
        out[a:b] = value
    if then == "raise":
        raise ValueError("after writing")
    if then == "die":
        os._exit(3)
    return value


def bump(out, i, n=N):
    k = len(out) // n
    out[i * k : (i + 1) * k] += 1
    return i


def touch_pages(out, pages, page):
    """Change one float64 in each of ``pages`` pages (of ``page`` bytes)."""
    step = page // 8
    for p in pages:
        out[p * step] = p + 1.0
    return len(pages)


def write_all(a):
    a[...] = 5
    return a.shape


def read_sum(a):
    return float(a.sum())


# ---------------------------------------------------------------- cases (parent)


def _mode() -> str:
    return handler.capabilities().mode


def case_interleaved():
    """16 tasks write out[i::16] of one output (every page written by every task)."""
    n = int(os.environ.get("OUT_MB", "256")) * MB // 8
    out = lazyshare.shared(np.zeros(n))
    with lazyshare.Pool(2) as p:
        r = p.starmap(fill_strided, [(out, i) for i in range(N)])
        st = p.stats(0)["outputs"]
    exp = np.empty(n)
    for i in range(N):
        exp[i::N] = np.arange(i, n, N) * 7.0 + 0.5
    ok = r == list(range(N)) and bool(np.array_equal(out, exp))
    return {"ok": ok, "stats": st, "nbytes": out.nbytes, "mode": _mode()}


def case_blocks():
    """Contiguous blocks, through map, imap (each part in place when its result
    arrives) and apply_async."""
    n = 64 * MB // 8
    k = n // N
    out = lazyshare.shared(np.zeros(n))
    seen_in_place = []
    with lazyshare.Pool(2) as p:
        for i in p.imap(_fill_block_1, [(out, i) for i in range(N)]):
            block = out[i * k : (i + 1) * k]
            seen_in_place.append(bool(np.array_equal(block, np.arange(i * k, (i + 1) * k) * 3.0 + 1)))
        ok_imap = bool(np.array_equal(out, np.arange(n) * 3.0 + 1))
        out[:] = 0
        p.starmap(fill_block, [(out, i) for i in range(N)], chunksize=3)
        ok_map = bool(np.array_equal(out, np.arange(n) * 3.0 + 1))
        out2 = lazyshare.shared(np.zeros(n, np.int32))
        rs = [p.apply_async(fill_block, (out2, i, N, i + 1)) for i in range(N)]
        [r.get(60) for r in rs]
        ok_apply = bool(np.array_equal(out2, np.repeat(np.arange(1, N + 1, dtype=np.int32), k)))
        st = p.stats(0)["outputs"]
    return {
        "in_place": seen_in_place,
        "imap": ok_imap,
        "map": ok_map,
        "apply": ok_apply,
        "stats": st,
        "mode": _mode(),
    }


def _fill_block_1(args):
    return fill_block(*args)


def case_conflict():
    """Two tasks change the same bytes to different values; the same value twice
    is no conflict; conflicts="last" lets the later one win."""
    out = lazyshare.shared(np.zeros(MB // 8))
    res = {}
    with lazyshare.Pool(2) as p:
        a = p.apply_async(write_then, (out, [(0, 10), (1000, 1010)], 1.0))
        a.get(60)
        b = p.apply_async(write_then, (out, [(5, 15), (2000, 2010)], 2.0))
        try:
            b.get(60)
            res["error"] = None
        except lazyshare.WriteConflictError as e:
            res["error"] = [e.start, e.stop, e.nbytes, str(e)]
        res["first"] = out[:15].tolist()
        res["others"] = [out[1000], out[1009], out[2000], out[2009]]
        # the same value twice: no conflict
        same = lazyshare.shared(np.zeros(MB // 8))
        p.starmap(write_then, [(same, [(0, 100)], 4.0), (same, [(50, 150)], 4.0)])
        res["same"] = [float(same[0]), float(same[149])]
        # a conflict inside one call (map), then "last"
        both = lazyshare.shared(np.zeros(MB // 8))
        try:
            p.starmap(write_then, [(both, [(0, 10)], 1.0), (both, [(0, 10)], 2.0, None, 0.5)], chunksize=1)
            res["map_error"] = None
        except lazyshare.WriteConflictError as e:
            res["map_error"] = e.nbytes
        res["map_first"] = float(both[0])
        last = lazyshare.shared(np.zeros(MB // 8), conflicts="last")
        p.starmap(write_then, [(last, [(0, 10)], 1.0), (last, [(0, 10)], 2.0, None, 0.5)], chunksize=1)
        res["last"] = float(last[0])
        res["stats"] = p.stats(0)["outputs"]
    return res


def case_failures():
    """A task that raises after writing, and one whose worker dies after
    writing, merge nothing; the retry's writes land once."""
    n = 16 * MB // 8
    out = lazyshare.shared(np.zeros(n))
    res = {}
    with lazyshare.Pool(2) as p:
        try:
            p.apply(write_then, (out, [(0, n)], 9.0, "raise"))
        except ValueError:
            res["raised"] = True
        res["after_raise"] = float(np.abs(out).max())
        try:
            p.apply(write_then, (out, [(0, n)], 9.0, "die"))
        except lazyshare.WorkerLostError:
            res["lost"] = True
        res["after_death"] = float(np.abs(out).max())
        p.starmap(bump, [(out, i) for i in range(N)])  # the retry: += 1 everywhere
        res["retry"] = [float(out.min()), float(out.max())]
        # a failing task among good ones: the good ones land
        out2 = lazyshare.shared(np.zeros(n))
        rs = [
            p.apply_async(write_then, (out2, [(i * 1000, i * 1000 + 10)], 1.0, "raise" if i == 3 else None))
            for i in range(8)
        ]
        for r in rs:
            try:
                r.get(60)
            except ValueError:
                pass
        res["mixed"] = [float(out2[i * 1000]) for i in range(8)]
    return res


def case_views():
    """A non-contiguous view marked: the tasks write its elements; marking a
    view merges only its bytes (writes elsewhere in its base stay private)."""
    base = np.zeros((512, 1024))
    view = lazyshare.shared(base[:, ::2])  # every other column
    res = {}
    with lazyshare.Pool(2) as p:
        p.starmap(_fill_rows, [(view, i) for i in range(8)])
        exp = np.zeros((512, 1024))
        for i in range(8):
            exp[i * 64 : (i + 1) * 64, ::2] = i + 1
        res["view"] = bool(np.array_equal(base, exp))
        a = np.zeros((256, 1024))
        lazyshare.shared(a[64:128])
        p.apply(write_all, (a,))  # the task gets all of a and writes all of it
        res["only_view"] = [float(a[64:128].min()), float(a[:64].max()), float(a[128:].max())]
        # A marked span that starts and ends inside pages, written sparsely
        # (every 16th element: the words go back, not the pages) across the
        # whole base: only the span's elements land, the pages it shares with
        # the unmarked bytes too.
        b = np.zeros(300_000)
        lazyshare.shared(b[1000:250_001])
        p.starmap(fill_strided, [(b, i) for i in range(N)])
        exp = np.zeros(300_000)
        for i in range(N):
            exp[i::N] = np.arange(i, 300_000, N) * 7.0 + 0.5
        exp[:1000] = exp[250_001:] = 0
        res["span"] = bool(np.array_equal(b, exp))
        # One task writes an element in each of three pages of a fresh output's
        # marked span: the first and last cross the span's ends. Each goes as a
        # sparse page (80 bytes), whatever it is cut into for the merge.
        c = np.zeros(8 << 20)  # 64 MiB: a fresh mapping, never written
        v = lazyshare.shared(c[1000:-1000])
        k = len(v)
        sent = p.stats(0)["outputs"]["bytes_sent"]
        p.apply(write_then, (v, [(0, 1), (k // 2, k // 2 + 1), (k - 1, k)], 3.0))
        res["ends_sent"] = p.stats(0)["outputs"]["bytes_sent"] - sent
        res["ends"] = [
            float(c[999]),
            float(c[1000]),
            float(c[1000 + k // 2]),
            float(c[-1001]),
            float(c[-1000]),
        ]
        res["ends_sum"] = float(c.sum())
        # a small one (below the export threshold) goes lazily too
        small = lazyshare.shared(np.zeros(10))
        p.starmap(write_then, [(small, [(i, i + 1)], float(i + 1)) for i in range(10)])
        res["small"] = small.tolist()
        lazyshare.unshare(small)
        p.starmap(write_then, [(small, [(0, 10)], 0.0)])
        res["unshared"] = small.tolist()
    return res


def _fill_rows(view, i):
    view[i * 64 : (i + 1) * 64] = i + 1
    return i


def case_sparse():
    """Each task changes one float64 in 1% of the pages: bytes sent back
    against bytes changed (whole pages)."""
    page = os.sysconf("SC_PAGE_SIZE")
    n = 256 * MB // 8
    npages = n * 8 // page
    out = lazyshare.shared(np.zeros(n))
    rng = np.random.default_rng(1)
    picks = [
        sorted(rng.choice(np.arange(i, npages, N), npages // 100 // N, replace=False).tolist())
        for i in range(N)
    ]
    with lazyshare.Pool(2) as p:
        p.starmap(touch_pages, [(out, picks[i], page) for i in range(N)])
        st = p.stats(0)["outputs"]
    exp = np.zeros(n)
    touched = sorted(q for ps in picks for q in ps)
    for q in touched:
        exp[q * (page // 8)] = q + 1.0
    return {
        "ok": bool(np.array_equal(out, exp)),
        "pages_changed": len(touched),
        "bytes_sent": st["bytes_sent"],
        "page": page,
        "mode": _mode(),
    }


def check_then_fill(out, i, keep=False):
    """Task i sees the output as of submission (all zeros: never written),
    whatever this worker's earlier tasks wrote, then writes out[i::16]."""
    from lazyshare import output

    clean = not out.any()
    out[i::N] = i + 1.0
    if keep:  # held past the task (in a list this process keeps): its region cannot be taken back
        sys.__dict__.setdefault("_kept_by_tasks", []).append(out)
    return clean, os.getpid(), output._reused


def case_reuse():
    """A worker gives a shared output's region to the call's next task once it
    has cleared what the last one wrote: every task still sees zeros, and
    every element lands; a region a task kept a reference to is not reused.
    64 MiB: above glibc's largest mmap threshold (32 MiB), so each output is
    fresh, never-written memory (a heap block that calloc zeroed was written:
    its tasks would fetch it, and see other tasks' merged elements)."""
    n = 64 * MB // 8
    res = {}
    with lazyshare.Pool(2) as p:
        for keep in (False, True):
            out = lazyshare.shared(np.zeros(n))
            r = p.starmap(check_then_fill, [(out, i, keep) for i in range(N)], chunksize=1)
            exp = np.repeat(np.arange(1.0, N + 1)[None, :], n // N, axis=0).reshape(-1)
            by_pid: dict = {}
            for _, pid, count in r:  # each worker's count of regions given again
                by_pid.setdefault(pid, []).append(count)
            res["kept" if keep else "plain"] = {
                "clean": all(c for c, _, _ in r),
                "exact": bool(np.array_equal(out, exp)),
                "reused": sum(max(c) - min(c) for c in by_pid.values()),
            }
            del out
            if not keep:
                # Parked regions hold the output's segment: an idle worker lets go.
                t0 = time.monotonic()
                while handler.pinned_segments() and time.monotonic() - t0 < 10:
                    time.sleep(0.01)
                res["unpinned_after"] = time.monotonic() - t0
    return res


def read_last_after(out, delay):
    time.sleep(delay)
    return float(out[-1])


def case_parent_writes():
    """The parent writes a page of the output while a task runs; the task
    writes another page: both land (the task's merge applies only what it
    changed). The page was never written when the call was submitted: a task
    reading it after the parent's write still sees zeros (as of submission)."""
    out = lazyshare.shared(np.zeros(MB // 8))
    with lazyshare.Pool(2) as p:
        r = p.apply_async(write_then, (out, [(0, 8)], 3.0, None, 0.5))
        seen = p.apply_async(read_last_after, (out, 0.5))
        time.sleep(0.1)
        out[-1] = 99.0
        r.get(60)
        seen = seen.get(60)
    return {"task": float(out[0]), "parent": float(out[-1]), "seen": seen, "mode": _mode()}


def case_prefilled():
    """An output whose first half the parent wrote before the call (fetched
    lazily by the tasks) and whose second half it never wrote (plain zero
    memory in the tasks): a read-modify-write by 16 tasks lands everywhere;
    zeros written over data land; zeros written over never-written pages
    change nothing and are not sent."""
    n = 32 * MB // 8
    out = np.zeros(n)
    out[: n // 2] = np.arange(n // 2)
    lazyshare.shared(out)
    exp = np.zeros(n)
    exp[: n // 2] = np.arange(n // 2)
    exp += 1
    res = {"mode": _mode()}
    with lazyshare.Pool(2) as p:
        p.starmap(bump, [(out, i) for i in range(N)])
        res["bump"] = bool(np.array_equal(out, exp))
        p.apply(write_then, (out, [(0, 1000), (n - 1000, n)], 0.0))
        exp[:1000] = exp[-1000:] = 0
        res["zeros_over_data"] = bool(np.array_equal(out, exp))
        fresh = lazyshare.shared(np.zeros(n))
        before = p.stats(0)["outputs"]["bytes_sent"]
        p.apply(write_then, (fresh, [(0, n)], 0.0))
        res["zeros_over_zeros_sent"] = p.stats(0)["outputs"]["bytes_sent"] - before
        res["fresh_zero"] = not fresh.any()
    return res


def case_executor_joblib():
    n = 16 * MB // 8
    k = n // N
    out = lazyshare.shared(np.zeros(n))
    with lazyshare.Executor(2) as ex:
        list(ex.map(fill_block, [out] * N, range(N)))
    res = {"executor": bool(np.array_equal(out, np.arange(n) * 3.0 + 1))}
    try:
        import joblib

        importlib.import_module("lazyshare.joblib")  # registers the backend
    except ImportError:
        res["joblib"] = "missing"
        return res
    out2 = lazyshare.shared(np.zeros(n))
    with joblib.parallel_config(backend="lazyshare", n_jobs=2):
        joblib.Parallel()(joblib.delayed(fill_block)(out2, i, N, float(i)) for i in range(N))
    res["joblib"] = bool(np.array_equal(out2, np.repeat(np.arange(N, dtype=float), k)))
    return res


def case_refused():
    res = {}
    readonly = np.zeros(8)
    readonly.setflags(write=False)
    for name, arr in [
        ("readonly", readonly),
        ("object", np.array([1, None], dtype=object)),
        ("list", [1, 2]),
    ]:
        try:
            lazyshare.shared(arr)
            res[name] = None
        except (TypeError, ValueError) as e:
            res[name] = f"{type(e).__name__}: {e}"
    try:
        lazyshare.shared(np.zeros(8), conflicts="first")
        res["conflicts"] = None
    except ValueError as e:
        res["conflicts"] = str(e)
    empty = np.zeros(0)
    res["empty"] = lazyshare.shared(empty) is empty
    with lazyshare.Pool(1) as p:
        res["empty_call"] = p.apply(read_sum, (empty,))
    return res


if __name__ == "__main__":
    out = globals()["case_" + sys.argv[1]]()
    print(json.dumps(out))
