"""The page server's own life cycle (csrc/server.c), driven through the compiled
module in a fresh interpreter: a start that fails part-way leaves the process as
it found it (no fd closed that it did not open, none left open, no thread, no
socket file), and a later start succeeds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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
