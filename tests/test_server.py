"""The page server's own life cycle (csrc/server.c), driven through the compiled
module in a fresh interpreter: a start that fails part-way leaves the process as
it found it (no fd closed that it did not open, none left open, no thread, no
socket file), and a later start succeeds."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import DEADLINE

pytestmark = pytest.mark.timeout(DEADLINE * 2)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_script(src: str, tmp_path, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, LAZYSHARE_RUNTIME_DIR=str(tmp_path), **env)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, HERE, e.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(src)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=e,
    )


# Starts the server with as few free descriptors as it needs to get past its
# first steps and into its loops (a socket, two eventfds, /proc/self/pagemap,
# then one epoll per loop): for each n, setup stops at a different loop. Every
# failure must leave the descriptor table as it was: the same fds, pointing at
# the same files.
FAILING_STARTS = """
    import errno, os, resource, threading
    from lazyshare._native import ffi, lib
    from lazyshare import transport

    def fds():
        out = {}
        for name in os.listdir("/proc/self/fd"):
            try:
                out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
            except FileNotFoundError:
                pass  # the listing's own directory fd
        return out

    def tasks():
        return len(os.listdir("/proc/self/task"))

    def free_below(limit, taken):
        return sum(1 for fd in range(limit) if fd not in taken)

    cfg = ffi.new("struct ls_server_config *", {"spin_us": 0, "threads": 8})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert 0 in fds(), "stdin must be open for this test to mean anything"
    rundir = transport.runtime_dir()
    failures = 0
    for nfree in range(1, 20):
        before, ntasks = fds(), tasks()
        limit = 0
        while free_below(limit, before) < nfree:
            limit += 1
        ep = transport.new_endpoint("pages")
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            rc = lib.ls_server_start(ep.encode(), cfg)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if rc == 0:
            lib.ls_server_stop()
            break
        failures += 1
        assert rc == -errno.EMFILE, (nfree, rc)
        after = fds()
        assert after == before, (nfree, before, after)
        assert tasks() == ntasks, (nfree, ntasks, tasks())
        assert not os.path.exists(transport.endpoint_path(ep)), nfree
    else:
        raise AssertionError("never started")
    assert failures >= 6, failures  # failed inside the loops' setup, at several loops
    ep = transport.new_endpoint("pages")
    assert lib.ls_server_start(ep.encode(), cfg) == 0
    assert os.path.exists(transport.endpoint_path(ep))
    assert lib.ls_server_stop() == 0
    assert not os.listdir(rundir), os.listdir(rundir)
    print("ok", failures)
"""


def test_a_start_failing_part_way_closes_only_what_it_opened(tmp_path):
    r = run_script(FAILING_STARTS, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok"), r.stdout + r.stderr


# The server out of descriptors: a connection it cannot accept would keep the
# listening socket ready, and loop 0 spinning on it. It is refused instead (the
# peer sees it closed), and connections are accepted again once fds are free.
OUT_OF_FDS = """
    import os, resource, socket, time
    from lazyshare._native import ffi, lib
    from lazyshare import transport

    cfg = ffi.new("struct ls_server_config *", {"spin_us": 0, "threads": 1})
    ep = transport.new_endpoint("pages")
    path = transport.endpoint_path(ep)
    assert lib.ls_server_start(ep.encode(), cfg) == 0
    for _ in range(1000):  # the thread names itself once running
        tids = [t for t in os.listdir("/proc/self/task")
                if open(f"/proc/self/task/{t}/comm").read().strip() == "lazyshare-pages"]
        if tids:
            break
        time.sleep(0.01)
    (tid,) = tids
    stat = os.open(f"/proc/self/task/{tid}/stat", os.O_RDONLY)  # opened while fds are free

    def loop_cpu():
        fields = os.pread(stat, 4096, 0).decode().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    def is_open(fd):
        try:
            return os.fstat(fd) is not None
        except OSError:
            return False

    taken = {fd for fd in map(int, os.listdir("/proc/self/fd")) if is_open(fd)}
    limit = 0
    while sum(1 for fd in range(limit) if fd not in taken) < 1:  # room for our socket only
        limit += 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        got = s.recv(64)  # the server cannot take one more fd
        cpu0 = loop_cpu()
        time.sleep(0.5)
        spun = loop_cpu() - cpu0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    s.close()
    assert got == b"", got
    assert spun < 0.2, spun
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        assert s.recv(1) == b"\\xff"  # the greeting: served again
    assert lib.ls_server_stop() == 0
    os.close(stat)
    print("ok")
"""


def test_a_server_out_of_fds_refuses_connections_instead_of_spinning(tmp_path):
    r = run_script(OUT_OF_FDS, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok"), r.stdout + r.stderr


# After fork the child runs the resets the core's sides registered (common.c's
# registry): the page server's forgets the parent's server and segments, so the
# child can start its own, while the parent's goes on serving.
FORKED_OWNER = """
    import errno, os, socket
    import numpy as np
    import lazyshare
    from lazyshare import handler
    from lazyshare._native import lib

    a = np.ones(1 << 16)
    desc = lazyshare.export(a)
    path = handler._server_endpoint[len("ipc://"):]
    assert lib.ls_server_holders(desc.segment.id) == 0
    pid = os.fork()
    if pid == 0:
        ok = lib.ls_server_holders(desc.segment.id) == -errno.ENOENT
        ok = ok and lazyshare.export(np.zeros(4096)).segment.endpoint != desc.segment.endpoint
        ok = ok and lib.ls_server_stop() == 0 and os.path.exists(path)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        assert s.recv(1) == b"\\xff"  # the parent's server still answers
    assert lib.ls_server_holders(desc.segment.id) == 0
    lazyshare.release(desc)
    print("ok")
"""


def test_a_forked_owner_starts_its_own_server_and_the_parents_goes_on(tmp_path):
    r = run_script(FORKED_OWNER, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok"), r.stdout + r.stderr


# ---- the event loop (csrc/loop.c), built alone with a small C harness ----

LOOP_CDEF = """
    int t_init(uint64_t spin_ns);
    void t_close(void);
    int t_add(int i, int fd, uint32_t events);
    int t_mod(int i, uint32_t events);
    void t_del(int i);
    void t_on_call_del(int i, int j);
    void t_on_call_free(int i);
    int t_run(int timeout_ms);
    void t_touch(void);
    int t_calls(int i);
    uint32_t t_last_events(int i);
    int t_registered(int i);
    int t_add_from_thread(int i, int fd, uint32_t events);
"""

LOOP_SRC = """
    #include <pthread.h>
    #include <stdlib.h>
    #include "loop.h"

    #define N 8
    struct rec { int calls; uint32_t last; struct ls_io *io; int del[N]; int free_self; };
    static struct ls_loop L;
    static struct rec recs[N];

    static void cb(int fd, uint32_t events, void *arg)
    {
        (void)fd;
        struct rec *r = arg;
        r->calls++;
        r->last = events;
        for (int j = 0; j < N; j++)
            if (r->del[j] && recs[j].io)
                ls_loop_del(recs[j].io);
        if (r->free_self) { /* removed and freed inside its own callback */
            ls_loop_del(r->io);
            free(r->io);
            r->io = NULL;
        }
    }
    int t_init(uint64_t spin_ns) { return ls_loop_init(&L, spin_ns); }
    void t_close(void)
    {
        ls_loop_close(&L);
        for (int i = 0; i < N; i++) {
            free(recs[i].io);
            recs[i] = (struct rec){0};
        }
    }
    int t_add(int i, int fd, uint32_t events)
    {
        if (recs[i].io && recs[i].io->loop) /* registered: the loop refuses */
            return ls_loop_add(&L, recs[i].io, events);
        if (!recs[i].io && !(recs[i].io = malloc(sizeof *recs[i].io)))
            return -12;
        ls_io_init(recs[i].io, fd, cb, &recs[i]);
        return ls_loop_add(&L, recs[i].io, events);
    }
    int t_mod(int i, uint32_t events) { return ls_loop_mod(recs[i].io, events); }
    void t_del(int i) { ls_loop_del(recs[i].io); }
    void t_on_call_del(int i, int j) { recs[i].del[j] = 1; }
    void t_on_call_free(int i) { recs[i].free_self = 1; }
    int t_run(int timeout_ms) { return ls_loop_run_once(&L, timeout_ms); }
    void t_touch(void) { ls_loop_touch(&L); }
    int t_calls(int i) { return recs[i].calls; }
    uint32_t t_last_events(int i) { return recs[i].last; }
    int t_registered(int i) { return recs[i].io && recs[i].io->loop != NULL; }

    struct adder { int i, fd; uint32_t events; int rc; };
    static void *add_main(void *arg)
    {
        struct adder *a = arg;
        a->rc = t_add(a->i, a->fd, a->events);
        return NULL;
    }
    int t_add_from_thread(int i, int fd, uint32_t events)
    {
        struct adder a = {i, fd, events, 0};
        pthread_t t;
        if (pthread_create(&t, NULL, add_main, &a))
            return -1;
        pthread_join(t, NULL);
        return a.rc;
    }
"""

EPOLLIN, EPOLLOUT = 0x001, 0x004


@pytest.fixture(scope="module")
def looplib(tmp_path_factory):
    import importlib.util

    from cffi import FFI

    out = tmp_path_factory.mktemp("loop")
    ffi = FFI()
    ffi.cdef(LOOP_CDEF)
    csrc = os.path.join(ROOT, "csrc")
    ffi.set_source(
        "_looptest",
        textwrap.dedent(LOOP_SRC),
        sources=[os.path.join(csrc, "loop.c")],
        include_dirs=[csrc],
        extra_compile_args=["-std=gnu11", "-O1", "-Wall", "-Wextra", "-Werror"],
        libraries=["pthread"],
    )
    so = ffi.compile(tmpdir=str(out))
    spec = importlib.util.spec_from_file_location("_looptest", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.lib


_libc_eventfd = ctypes.CDLL(None, use_errno=True).eventfd
_libc_eventfd.argtypes = [ctypes.c_uint, ctypes.c_int]


@pytest.fixture
def loop(looplib):
    fds = []

    def evfd(readable=True):
        # libc's eventfd (os.eventfd is Python 3.10+); EFD_* equal O_* on Linux
        fd = _libc_eventfd(1 if readable else 0, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "eventfd")
        fds.append(fd)
        return fd

    assert looplib.t_init(0) == 0
    yield looplib, evfd
    looplib.t_close()
    for fd in fds:
        os.close(fd)


def test_loop_dispatches_level_triggered_until_removed(loop):
    lib, evfd = loop
    a, b = evfd(), evfd(readable=False)
    assert lib.t_add(0, a, EPOLLIN) == 0 and lib.t_add(1, b, EPOLLIN) == 0
    assert lib.t_add(0, a, EPOLLIN) == -errno.EEXIST
    assert lib.t_run(1000) == 1
    assert lib.t_calls(0) == 1 and lib.t_calls(1) == 0 and lib.t_last_events(0) & EPOLLIN
    assert lib.t_run(1000) == 1 and lib.t_calls(0) == 2  # not drained: reported again
    lib.t_del(0)
    lib.t_del(0)  # twice: a no-op
    assert not lib.t_registered(0)
    assert lib.t_mod(0, EPOLLOUT) == -errno.ENOENT
    t = time.monotonic()
    assert lib.t_run(50) == 0  # a timeout
    assert time.monotonic() - t >= 0.04
    assert lib.t_calls(0) == 2


def test_loop_mod_switches_the_events_waited_for(loop):
    lib, evfd = loop
    a = evfd(readable=False)  # writable, not readable
    assert lib.t_add(0, a, EPOLLIN) == 0
    assert lib.t_run(0) == 0
    assert lib.t_mod(0, EPOLLOUT) == 0 and lib.t_mod(0, EPOLLOUT) == 0
    assert lib.t_run(1000) == 1 and lib.t_last_events(0) & EPOLLOUT
    assert lib.t_mod(0, EPOLLIN) == 0
    assert lib.t_run(0) == 0 and lib.t_calls(0) == 1


def test_a_callback_removes_others_of_its_batch_and_frees_itself(loop):
    lib, evfd = loop
    fds = [evfd() for _ in range(6)]
    for i, fd in enumerate(fds):
        assert lib.t_add(i, fd, EPOLLIN) == 0
        lib.t_on_call_free(i)
        for j in range(6):
            if j != i:
                lib.t_on_call_del(i, j)
    # All six are ready in one batch; whichever runs first removes the other
    # five (their events are due later in the batch) and frees its own ls_io.
    assert lib.t_run(1000) == 6
    assert sum(lib.t_calls(i) for i in range(6)) == 1
    assert not any(lib.t_registered(i) for i in range(6))
    assert lib.t_run(0) == 0


def test_an_fd_removed_during_its_batch_can_be_registered_again(loop):
    lib, evfd = loop
    a, b = evfd(), evfd()
    assert lib.t_add(0, a, EPOLLIN) == 0 and lib.t_add(1, b, EPOLLIN) == 0
    lib.t_on_call_del(0, 1)
    lib.t_on_call_del(1, 0)
    assert lib.t_run(1000) == 2  # both were ready; the first called removed the other
    first = 0 if lib.t_calls(0) else 1
    assert lib.t_calls(1 - first) == 0 and not lib.t_registered(1 - first)
    lib.t_del(first)
    assert lib.t_add(2, (a, b)[1 - first], EPOLLIN) == 0
    assert lib.t_run(1000) == 1 and lib.t_calls(2) == 1 and lib.t_calls(1 - first) == 0


def test_loop_add_from_another_thread(loop):
    lib, evfd = loop
    assert lib.t_add_from_thread(0, evfd(), EPOLLIN) == 0
    assert lib.t_run(1000) == 1 and lib.t_calls(0) == 1
    assert lib.t_add_from_thread(1, -1, EPOLLIN) == -errno.EBADF
    assert not lib.t_registered(1)


def test_loop_spins_after_activity_then_sleeps(looplib):
    lib = looplib
    assert lib.t_init(20_000_000) == 0  # 20 ms
    try:
        t = time.monotonic()
        assert lib.t_run(0) == 0  # no activity yet: no spin
        assert time.monotonic() - t < 0.015
        lib.t_touch()
        t = time.monotonic()
        assert lib.t_run(0) == 0  # spins out the window, then gives up
        assert time.monotonic() - t >= 0.015
        t = time.monotonic()
        assert lib.t_run(0) == 0  # the window has passed
        assert time.monotonic() - t < 0.015
    finally:
        lib.t_close()
