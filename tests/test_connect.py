"""Connection set-up never blocks the fault handler.

A consumer connects to each owner on its first attach. That set-up (connect,
ZMTP greeting and READY, the userfaultfd offer) runs on the fault-handler
thread, so it must never wait there: while an attach waits for an owner that
accepted the connection but never answers, faults on another owner's array go
on being served, and the waiting attach ends in a clear error once its timeout
passes. An owner that is not there at all (no socket file, nobody listening)
fails the attach at once."""

from __future__ import annotations

import errno
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import DEADLINE

import lazyshare
from lazyshare import handler

pytestmark = pytest.mark.timeout(DEADLINE)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 1 << 20
ATTACH_TIMEOUT = 2.0

# argv: <healthy desc hex> <bad desc hex>. Attaches the healthy array, then
# faults on fresh pages of it from the main thread (one byte each, timed) while
# a second thread attaches the bad descriptor; prints what happened as JSON.
CONSUMER = r"""
import json, os, pickle, sys, threading, time
import lazyshare

good, bad = (pickle.loads(bytes.fromhex(x)) for x in sys.argv[1:3])
a = lazyshare.attach(good)
per_page = 4096 // a.itemsize
npages = a.size // per_page
float(a[0])  # the healthy owner's connection is up
print("attached", flush=True)
sys.stdin.readline()

result = {"error": None}
started, done = threading.Event(), threading.Event()

def attach_bad():
    started.set()
    t0 = time.monotonic()
    try:
        lazyshare.attach(bad)
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    result["elapsed"] = time.monotonic() - t0
    done.set()

t = threading.Thread(target=attach_bad)
t.start()
started.wait()
lat, touched, k = [], {0}, 1
while not done.is_set() and len(touched) < npages:
    k = (k * 7919 + 104729) % npages
    if k in touched:
        continue
    touched.add(k)
    t0 = time.perf_counter()
    float(a[k * per_page])  # a page not touched before: one fault
    lat.append(time.perf_counter() - t0)
    time.sleep(0.002)
t.join()
result["faults"] = len(lat)
result["worst_ms"] = 1000 * max(lat, default=0.0)
result["sum"] = float(a[::per_page].sum())
print(json.dumps(result), flush=True)
"""


class MuteOwner:
    """Listens on a Unix socket, accepts, and never says a word."""

    def __init__(self, path: str):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.listener.settimeout(0.05)
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                c, _ = self.listener.accept()
            except OSError:
                continue
            self.conns.append(c)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """Whether every accepted connection was closed by the consumer."""
        deadline = time.monotonic() + timeout
        for c in self.conns:
            while True:
                c.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    if c.recv(4096) == b"":
                        break
                except OSError:
                    return False
        return bool(self.conns)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.listener.close()
        os.unlink(self.path)


def bad_desc(endpoint: str, nbytes: int = 4 * MiB) -> handler.ArrayDescriptor:
    seg = handler.SegmentDescriptor(os.urandom(16), nbytes, endpoint, os.getpid())
    return handler.ArrayDescriptor(seg, 0, (nbytes // 8,), (8,), np.dtype(np.float64))


def run_consumer(good, bad) -> dict:
    env = dict(os.environ, LAZYSHARE_ATTACH_TIMEOUT=str(ATTACH_TIMEOUT))
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")])
    p = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, pickle.dumps(good).hex(), pickle.dumps(bad).hex()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        line = p.stdout.readline()
        assert line.startswith("attached"), (line, p.stderr.read() if p.poll() is not None else "")
        p.stdin.write("go\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=DEADLINE / 2)
        assert p.returncode == 0, (out, err)
        return json.loads(out.strip().splitlines()[-1])
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.fixture(scope="module")
def healthy():
    a = np.random.default_rng(3).random(8 * MiB)  # 64 MiB: 16384 pages to fault on
    desc = lazyshare.export(a)
    yield a, desc
    lazyshare.release(desc)


def test_faults_on_a_healthy_owner_go_on_while_an_attach_waits_on_a_mute_one(healthy, tmp_path):
    path = str(tmp_path / "mute.sock")
    mute = MuteOwner(path)
    try:
        r = run_consumer(healthy[1], bad_desc(f"ipc://{path}"))
        assert mute.conns, "the consumer never connected to the mute owner"
        assert mute.closed_by_peer(), "the connection to the mute owner was left open"
    finally:
        mute.close()
    assert not os.path.exists(path)
    assert r["sum"] == float(healthy[0][::512].sum()), r
    # the attach ends in a clear error, when its timeout says and not much later
    assert r["error"] and r["error"].startswith("OwnerGoneError"), r
    assert "did not answer in time" in r["error"] and f"pid {os.getpid()}" in r["error"], r
    assert ATTACH_TIMEOUT - 0.2 < r["elapsed"] < ATTACH_TIMEOUT + 1.0, r
    # meanwhile the healthy owner's pages kept coming
    assert r["faults"] > 100, r
    assert r["worst_ms"] < 100, r


@pytest.mark.parametrize("how", ["no socket file", "nobody listening"])
def test_an_owner_that_is_not_there_fails_the_attach_at_once(healthy, tmp_path, how):
    path = str(tmp_path / "gone.sock")
    if how == "nobody listening":  # a socket file left by a dead owner: ECONNREFUSED
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.close()
    try:
        r = run_consumer(healthy[1], bad_desc(f"ipc://{path}"))
    finally:
        if os.path.exists(path):
            os.unlink(path)
    assert r["error"] and r["error"].startswith("OwnerGoneError"), r
    assert "is gone" in r["error"] and f"pid {os.getpid()}" in r["error"], r
    assert r["elapsed"] < 1.0, r
    assert r["sum"] == float(healthy[0][::512].sum()), r


# ------------------------------------------------------------------ starting the fault handler

# argv: <desc hex> <which thread fails>. Starts the fault handler with that
# thread's creation failing, then again; prints the threads and fds after each.
START = r"""
import errno, json, os, pickle, sys, time
import lazyshare
from lazyshare import handler
from lazyshare._native import lib

def threads():
    time.sleep(0.3)  # a new thread names itself
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

def fds():
    return sorted(os.readlink(f"/proc/self/fd/{f}") for f in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{f}"))

desc = pickle.loads(bytes.fromhex(sys.argv[1]))
which = {"fault": lib.LS_THREAD_FAULT, "watch": lib.LS_THREAD_WATCH}[sys.argv[2]]
handler.capabilities()
out = {"threads0": threads(), "fds0": fds()}
lib.ls_client_test_fail_thread(which, errno.EAGAIN)
try:
    lazyshare.attach(desc)
    out["first"] = "attached"
except OSError as e:
    out["first"] = e.errno
out["threads1"], out["fds1"] = threads(), fds()
a = lazyshare.attach(desc)
out["sum"] = float(a.sum())
out["threads2"] = threads()
print(json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("which", ["fault", "watch"])
def test_a_thread_that_fails_to_start_leaves_nothing_running_or_open(healthy, which):
    a, desc = healthy
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", START, pickle.dumps(desc).hex(), which],
        capture_output=True,
        text=True,
        env=env,
        timeout=DEADLINE / 2,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["first"] == errno.EAGAIN, out
    # the failed start left no thread and no fd (userfaultfd, command eventfd) behind
    assert out["threads1"] == out["threads0"], out
    assert out["fds1"] == out["fds0"], out
    # and the retry starts exactly one of each
    assert out["threads2"] == sorted(out["threads0"] + ["lazyshare-fault", "lazyshare-watch"]), out
    assert out["sum"] == float(a.sum())
