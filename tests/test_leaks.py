"""No leaks: 1,000 calls over fresh large arrays leave the parent and the workers
as they were; no file stays in the runtime directory after a pool closes,
is terminated, or loses a worker."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import time

import _fault_funcs as ff
import numpy as np
import pytest
from conftest import DEADLINE, wait_for

from lazyshare import handler, transport
from lazyshare.pool import Pool

pytestmark = pytest.mark.timeout(DEADLINE * 2)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 1 << 20


def snapshot():
    gc.collect()
    nfd, nmaps, ntasks = ff.proc_counts_of(os.getpid())
    return {
        "fds": nfd,
        "maps": nmaps,
        "tasks": ntasks,
        "threads": threading.active_count(),
        "pinned": handler.pinned_segments(),
        "rss": ff.rss_bytes(),
    }


def run_calls(pool, n, rng):
    for i in range(n):
        size = int(rng.integers(2 * MiB, 4 * MiB)) // 8  # 2-4 MiB: above the 1 MiB threshold
        a = rng.random(size)
        cut = int(rng.integers(1, size))
        got = pool.starmap(ff.slice_check, [(a, 0, cut), (a, cut, size)], chunksize=1)
        assert got == [ff.expected(a, 0, cut), ff.expected(a, cut, size)], f"call {i}"


def test_a_thousand_calls_over_fresh_arrays_leak_nothing():
    rng = np.random.default_rng(2024)
    with Pool(2) as pool:
        run_calls(pool, 50, rng)  # warm-up: imports, sockets, allocator arenas
        assert wait_for(lambda: handler.pinned_segments() == 0)
        workers = [w.pid for w in pool._pool]
        w0 = {pid: ff.proc_counts_of(pid) for pid in workers}
        before = snapshot()
        t0 = time.monotonic()
        run_calls(pool, 1000, rng)
        elapsed = time.monotonic() - t0
        assert wait_for(lambda: handler.pinned_segments() == 0), (
            "segments still pinned after every call ended"
        )
        after = snapshot()
        assert [w.pid for w in pool._pool] == workers  # same workers throughout
        w1 = {pid: ff.proc_counts_of(pid) for pid in workers}
        st = pool.stats()["totals"]
        pool.close()
        pool.join()
    assert elapsed < 60, f"1,000 calls took {elapsed:.1f}s"
    assert st["bytes_lazy"] > 0 and st["bytes_pickled"] < 1050 * 2 * MiB // 100
    for k in ("fds", "maps", "tasks", "threads"):
        assert after[k] <= before[k] + 2, (k, before, after)
    assert after["pinned"] == 0
    assert after["rss"] < before["rss"] + 64 * MiB, (before["rss"] >> 20, after["rss"] >> 20)
    for pid in workers:
        (fd0, maps0, th0), (fd1, maps1, th1) = w0[pid], w1[pid]
        assert fd1 <= fd0 + 2 and maps1 <= maps0 + 8 and th1 <= th0, (pid, w0[pid], w1[pid])


LEFTOVERS_SCRIPT = """
import os, signal, time, numpy as np
import _fault_funcs as ff
from lazyshare import transport
from lazyshare.pool import Pool
from lazyshare.errors import WorkerLostError

def listing():
    base = os.environ["LAZYSHARE_RUNTIME_DIR"]
    out = []
    for d in sorted(os.listdir(base)):
        for n in sorted(os.listdir(os.path.join(base, d))):
            out.append(n.split("-")[0])
    return ",".join(out) or "-"

if __name__ == "__main__":
    a = np.random.default_rng(0).random(1 << 20)
    want = ff.expected(a, 0, a.size)
    for how in ("close", "terminate", "crash"):
        p = Pool(2)
        assert p.starmap(ff.slice_check, [(a, 0, a.size)] * 4) == [want] * 4
        if how == "crash":
            r = p.apply_async(ff.read_forever, (a, os.path.join(os.environ["TMP_FOR_PID"], "pid")))
            path = os.path.join(os.environ["TMP_FOR_PID"], "pid")
            while not (os.path.exists(path) and open(path).read()):
                time.sleep(0.02)
            os.kill(int(open(path).read()), signal.SIGKILL)
            try:
                r.get(30)
            except WorkerLostError:
                pass
            assert p.starmap(ff.slice_check, [(a, 0, a.size)] * 2) == [want] * 2
            p.close()
        else:
            getattr(p, how)()
        p.join()
        print(how, listing(), flush=True)
"""


def test_runtime_directory_is_empty_after_close_terminate_and_a_crash(tmp_path):
    rt = tmp_path / "rt"
    env = dict(os.environ, LAZYSHARE_RUNTIME_DIR=str(rt), TMP_FOR_PID=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LEFTOVERS_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert r.returncode == 0, r.stderr
    lines = dict(line.split() for line in r.stdout.splitlines())
    # While the process lives, only its own page server's socket remains (one per
    # process, not per pool): no pool control socket, nothing of any worker.
    assert lines == {"close": "pages", "terminate": "pages", "crash": "pages"}, r.stdout
    assert os.listdir(rt) == [], "the process's private directory outlived it"


def test_parent_runtime_directory_is_private():
    d = transport.runtime_dir()
    assert os.stat(d).st_mode & 0o777 == 0o700
    assert os.stat(os.path.dirname(d)).st_mode & 0o777 == 0o700
