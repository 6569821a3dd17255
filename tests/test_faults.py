"""Fault injection (modelled on CPython's test_concurrent_futures/test_deadlock.py):
each fault ends in a clear error within a bounded time, never a hang, a leak or
a page of zeros; afterwards the pool keeps working or says plainly it is broken.

Pool-level faults run in a shared 2-worker pool; faults of the native fault
handler run in helper processes pointed at a real or a fake page server."""

from __future__ import annotations

import ctypes
import errno
import multiprocessing.pool
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import _fault_funcs as ff
import numpy as np
import pytest
import zmq
from conftest import DEADLINE, pid_alive, wait_for

import lazyshare
from lazyshare import handler, transport
from lazyshare.errors import WorkerLostError

pytestmark = pytest.mark.timeout(DEADLINE)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 1 << 20


def env_with(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def big():
    return np.random.default_rng(5).random(8 * MiB)  # 64 MiB


def pins_back_to(base, timeout=10.0):
    return wait_for(lambda: handler.pinned_segments() <= base, timeout)


def assert_pool_works(pool, big):
    lo, hi = 12345, 12345 + 3 * MiB
    assert pool.starmap(ff.slice_check, [(big, lo, hi)] * 2) == [ff.expected(big, lo, hi)] * 2


# ------------------------------------------------------------------ serialization faults


def test_argument_that_fails_to_pickle_releases_the_call_exports(pool, big):
    base = handler.pinned_segments()
    for _ in range(3):
        with pytest.raises(RuntimeError, match="cannot pickle this argument"):
            pool.starmap(ff.sum_with, [(big, 1), (big, ff.CannotPickle())])
        with pytest.raises(RuntimeError, match="cannot pickle this argument"):
            pool.apply(ff.sum_with, (big, ff.CannotPickle()))
    assert pins_back_to(base), "exports of a call that failed to pickle stay pinned"
    assert_pool_works(pool, big)


def test_argument_that_fails_to_unpickle_in_the_worker(pool, big):
    base = handler.pinned_segments()
    pids = {w.pid for w in pool._pool}
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="deliberately not unpicklable"):
        pool.apply(ff.sum_with, (big, ff.FailsToUnpickle()))
    with pytest.raises(ValueError, match="deliberately not unpicklable"):
        pool.starmap(ff.sum_with, [(big, 0), (big, ff.FailsToUnpickle())], chunksize=1)
    assert time.monotonic() - t0 < 10
    assert {w.pid for w in pool._pool} == pids  # the workers survived it
    assert pins_back_to(base)
    assert_pool_works(pool, big)


def test_result_that_fails_to_unpickle_in_the_parent(pool, big):
    with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="result deliberately not unpicklable"):
        pool.apply(ff.return_unloadable_result)
    with pytest.raises(multiprocessing.pool.MaybeEncodingError):
        pool.map(ff.return_unloadable_result, range(4))
    assert_pool_works(pool, big)


# ------------------------------------------------------------------ worker deaths


def test_worker_segfault_in_native_code_while_mapping_a_lazy_array(pool, big):
    base = handler.pinned_segments()
    t0 = time.monotonic()
    with pytest.raises(WorkerLostError, match="SIGSEGV") as info:
        pool.apply(ff.segfault, (big,))
    assert time.monotonic() - t0 < 10
    assert info.value.exitcode == -signal.SIGSEGV
    assert "while running this task" in str(info.value)
    assert pins_back_to(base), "a dead worker's mapping keeps the segment pinned"
    assert_pool_works(pool, big)


def test_worker_sigkilled_while_its_fault_handler_is_mid_request(pool, big, tmp_path):
    base = handler.pinned_segments()
    served0 = handler.stats()["requests_served"]
    path = str(tmp_path / "pid")
    r = pool.apply_async(ff.read_forever, (big, path))
    assert wait_for(lambda: os.path.exists(path) and open(path).read())
    pid = int(open(path).read())
    # faults are flowing: the worker is requesting pages from us right now
    assert wait_for(lambda: handler.stats()["requests_served"] > served0 + 200)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerLostError, match="SIGKILL") as info:
        r.get(10)
    assert time.monotonic() - t0 < 5
    assert info.value.pid == pid
    assert pins_back_to(base)
    # the page server dropped the dead peer (half-sent reply included) and serves on
    assert_pool_works(pool, big)


def test_parent_sigkilled_while_workers_fault(tmp_path):
    rt = tmp_path / "rt"
    script = textwrap.dedent(
        f"""
        import os, time, numpy as np
        import _fault_funcs as ff
        from lazyshare.pool import Pool
        if __name__ == "__main__":
            a = np.random.default_rng(1).random(8 << 20)
            p = Pool(2)
            paths = [{str(tmp_path)!r} + "/w%d" % i for i in range(2)]
            r = p.starmap_async(ff.read_forever, [(a, q) for q in paths], chunksize=1)
            while not all(os.path.exists(q) and open(q).read() for q in paths):
                time.sleep(0.02)
            print(" ".join(open(q).read() for q in paths), flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        env=env_with(LAZYSHARE_RUNTIME_DIR=str(rt)),
        text=True,
    )
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        proc.kill()
        proc.wait(DEADLINE)
        t0 = time.monotonic()
        assert wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=5), "orphaned workers"
        assert time.monotonic() - t0 < 5
    finally:
        proc.kill()
        proc.wait()
    # A SIGKILLed owner cannot clean up: its private directory stays until the
    # next lazyshare process of this user sweeps it.
    left = os.listdir(rt)
    assert [n for n in left if n.startswith(f"p{proc.pid}-")], left
    r = subprocess.run(
        [sys.executable, "-c", "from lazyshare import transport; print(transport.runtime_dir())"],
        env=env_with(LAZYSHARE_RUNTIME_DIR=str(rt)),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert r.returncode == 0, r.stderr
    assert os.listdir(rt) == [], "stale runtime directory not swept (or the sweeper's own left behind)"


# ------------------------------------------------------------------ the native fault handler


class FakeOwner:
    """A page server that accepts HOLD but then never answers READ (``silent``)
    or answers it with -ENOENT (``enoent``): an owner alive but wedged, and an
    owner that dropped the segment under a live mapping."""

    def __init__(self, tmp_path, mode, nbytes=4 * MiB):
        self.mode = mode
        d = tmp_path / "fake"
        d.mkdir(mode=0o700)
        self.endpoint = f"ipc://{d}/pages.sock"
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(self.endpoint)
        self.reads = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        seg = handler.SegmentDescriptor(os.urandom(16), nbytes, self.endpoint, os.getpid())
        self.desc = handler.ArrayDescriptor(seg, 0, (nbytes // 8,), (8,), np.dtype(np.float64))

    def run(self):
        while not self.stop.is_set():
            if not self.sock.poll(100):
                continue
            ident, *frames = self.sock.recv_multipart()
            magic, version, op, pid, _, tag, offset, length, seg = transport.REQUEST.unpack(frames[0][:56])
            if op == transport.OP_UFFD:
                status = -errno.EBADF  # a ZeroMQ peer never sees the fd: the READ path
            elif op in (transport.OP_READ, transport.OP_INSTALL):
                self.reads += 1
                if self.mode == "silent":
                    continue
                status = -errno.ENOENT
            else:
                status = 0
            rep = transport.REPLY.pack(
                transport.MAGIC, transport.VERSION, op, status, 0, tag, offset, 0, self.desc.segment.nbytes
            )
            self.sock.send_multipart([ident, rep])

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def start_consumer(desc, **env):
    p = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "_fault_funcs.py"), "consumer", pickle.dumps(desc).hex()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env_with(**env),
        text=True,
    )
    line = p.stdout.readline()
    assert line.startswith("attached"), (line, p.stderr.read() if p.poll() is not None else "")
    return p, int(line.split()[1])


def finish(p):
    if p.poll() is None:
        p.kill()
    out, err = p.communicate(timeout=DEADLINE)
    return out, err


def test_owner_alive_but_never_answering_is_fatal_within_the_fault_timeout(tmp_path):
    fake = FakeOwner(tmp_path, "silent")
    p = None
    try:
        p, _ = start_consumer(fake.desc, LAZYSHARE_FAULT_TIMEOUT="2")
        t0 = time.monotonic()
        p.stdin.write("go\n")
        p.stdin.flush()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            pass
        elapsed = time.monotonic() - t0
        out, err = finish(p)
        assert p.returncode == -signal.SIGBUS, (p.returncode, out, err)
        assert "read " not in out, "a page nobody served was read"
        assert "lazyshare: fatal" in err and "no reply from the owner" in err, err
        assert 1.5 < elapsed < 10, elapsed
        assert fake.reads >= 1
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        fake.close()


def test_segment_unknown_to_its_owner_is_fatal_never_zeros(tmp_path):
    fake = FakeOwner(tmp_path, "enoent")
    p = None
    try:
        p, _ = start_consumer(fake.desc)
        p.stdin.write("go\n")
        p.stdin.flush()
        p.wait(15)
        out, err = finish(p)
        assert p.returncode == -signal.SIGBUS, (p.returncode, out, err)
        assert "read " not in out
        assert "lazyshare: fatal" in err and "released while this process still maps it" in err, err
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        fake.close()


def test_release_under_a_live_mapping_keeps_serving_the_true_bytes():
    """release() only stops new attaches: a holder keeps reading the real bytes,
    (never zeros), and the pin goes when the holder does."""
    a = np.random.default_rng(8).random(4 * MiB)  # 32 MiB, every page untouched by the holder
    base = handler.pinned_segments()
    desc = lazyshare.export(a)
    p, _ = start_consumer(desc)
    try:
        assert wait_for(lambda: handler.holders(desc) == 1)
        lazyshare.release(desc)
        assert handler.pinned_segments() == base + 1
        p.stdin.write("go\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=DEADLINE)
        assert p.returncode == 0, err
        assert out.split()[1] == repr(float(a[::512].sum())), out
        assert pins_back_to(base)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 17, 0x4206, 0x4207
_WALL = 0x40000000


def test_wedged_fault_handler_thread_is_noticed_by_a_watchdog(tmp_path):
    """Stop only the lazyshare-fault thread (ptrace, one thread; SIGSTOP would stop
    the whole process), then fault: a watchdog must turn the freeze into the
    fatal error within the fault timeout."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    a = np.ones(4 * MiB)
    desc = lazyshare.export(a)
    p, tid = start_consumer(desc, LAZYSHARE_FAULT_TIMEOUT="2")
    traced = False
    try:
        if libc.ptrace(PTRACE_SEIZE, tid, None, None) != 0:
            pytest.skip(f"cannot ptrace the fault thread: errno {ctypes.get_errno()} (needs CAP_SYS_PTRACE)")
        traced = True
        assert libc.ptrace(PTRACE_INTERRUPT, tid, None, None) == 0
        os.waitpid(tid, _WALL)  # the thread is now in a ptrace stop; the others run
        p.stdin.write("go\n")
        p.stdin.flush()
        deadline = time.monotonic() + 10
        while p.poll() is None and time.monotonic() < deadline:
            try:  # the traced thread's exit waits for its tracer (us) to reap it
                os.waitpid(tid, _WALL | os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.02)
        died = p.poll()
        assert died == -signal.SIGBUS, "the faulting thread is still blocked: nothing noticed the wedge"
        traced = False
        err = p.stderr.read()
        assert "lazyshare: fatal" in err and "fault-handler thread has not run" in err, err
    finally:
        if traced and p.poll() is None:
            libc.ptrace(PTRACE_DETACH, tid, None, 0)
        if p.poll() is None:
            p.kill()
        deadline = time.monotonic() + 10
        while p.poll() is None and time.monotonic() < deadline:
            try:  # a traced thread of a dying process must be reaped by its tracer
                os.waitpid(tid, _WALL | os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.02)
        p.communicate(timeout=DEADLINE)
        lazyshare.release(desc)


OTHER_UID_OWNER = """
import errno, os, sys, time, zmq
from lazyshare import transport
ep, nbytes = sys.argv[1], int(sys.argv[2])
s = zmq.Context.instance().socket(zmq.ROUTER)
s.linger = 0
s.bind(ep)
os.chmod(ep[6:], 0o666)
print("bound", flush=True)
offered, deadline = False, time.monotonic() + 30
while time.monotonic() < deadline and not os.path.exists(ep[6:] + ".stop"):
    if not s.poll(100):
        continue
    ident, *frames = s.recv_multipart()
    _, _, op, _, _, tag, offset, length, _ = transport.REQUEST.unpack(frames[0][:56])
    data = []
    if op == transport.OP_UFFD:
        offered, status = True, -errno.EBADF
    elif op == transport.OP_READ:
        status, data = 0, [bytes([7]) * length]
    elif op in (transport.OP_HOLD, transport.OP_RELEASE):
        status = 0
    else:
        status = -errno.EPROTO
    rep = transport.REPLY.pack(
        transport.MAGIC, transport.VERSION, op, status, 0, tag, offset, length if data else 0, nbytes
    )
    s.send_multipart([ident, rep, *data])
print("offered" if offered else "not offered", flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run an owner as another user")
def test_userfaultfd_is_never_handed_to_an_owner_of_another_uid(tmp_path):
    """The consumer gives its userfaultfd only to an owner running as its own
    uid (SO_PEERCRED); another one gets READ requests and pages as payload."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    d = tmp_path / "other"
    d.mkdir()
    os.chown(d, nobody.pw_uid, nobody.pw_gid)
    tmp_path.chmod(0o755)
    ep = f"ipc://{d}/pages.sock"
    nbytes = 1 << 20
    owner = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            "--inh-caps=-all,+dac_read_search",
            "--ambient-caps=-all,+dac_read_search",
            "--",
            sys.executable,
            "-c",
            OTHER_UID_OWNER,
            ep,
            str(nbytes),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_with(),
    )
    p = None
    try:
        assert owner.stdout.readline().strip() == "bound", owner.stderr.read()
        seg = handler.SegmentDescriptor(os.urandom(16), nbytes, ep, owner.pid)
        desc = handler.ArrayDescriptor(seg, 0, (nbytes,), (1,), np.dtype(np.uint8))
        p, _ = start_consumer(desc, LAZYSHARE_FAULT_TIMEOUT="10")
        p.stdin.write("go\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=DEADLINE)
        assert p.returncode == 0, err
        assert out.strip().startswith(f"read {7.0 * (nbytes // 4096)!r}"), (out, err)  # one byte per page
    finally:
        (d / "pages.sock.stop").touch()
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        try:
            rest, err = owner.communicate(timeout=DEADLINE)
        finally:
            if owner.poll() is None:
                owner.kill()
                owner.wait()
    assert rest.strip() == "not offered", (rest, err)
