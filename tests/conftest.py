"""Shared fixtures: nothing may hang, nothing may be left behind.

* Every test has a timeout (pytest-timeout, ``timeout`` in pyproject.toml) and a
  faulthandler dump before it fires.
* ``no_leftover_children`` (autouse) asserts that a test leaves no child process
  behind, except the long-lived helpers multiprocessing itself keeps (the
  forkserver and the resource tracker), and kills any it finds so that one
  failure does not cascade.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

#: The one deadline tests wait for; reached only on a deadlock.
DEADLINE = 60.0


def wait_for(cond, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    return _state(pid) not in ("Z", "X")


def _children(pid: int) -> set[int]:
    out = set()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return out
    for k in kids:
        out.add(k)
        out |= _children(k)
    return out


def _mp_helpers() -> set[int]:
    pids = set()
    try:
        from multiprocessing import forkserver, resource_tracker

        pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
        if pid:
            pids.add(pid)
        pid = getattr(resource_tracker._resource_tracker, "_pid", None)
        if pid:
            pids.add(pid)
    except Exception:
        pass
    return pids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def leftover_children(grace: float = 5.0) -> set[int]:
    """Children still alive (not zombies) after ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while True:
        helpers = _mp_helpers()
        # the helpers' own children (forked workers) count as ours
        kids = set()
        for k in _children(os.getpid()):
            if k in helpers:
                continue
            if _state(k) not in ("Z", "X"):
                kids.add(k)
        forked = set()
        for h in helpers:
            forked |= {k for k in _children(h) if _state(k) not in ("Z", "X")}
        kids |= forked
        if not kids or time.monotonic() > deadline:
            return kids
        time.sleep(0.05)


@pytest.fixture
def pool():
    """A two-worker lazyshare.Pool, terminated after the test."""
    from lazyshare.pool import Pool

    p = Pool(2)
    try:
        yield p
    finally:
        p.terminate()
        p.join()


@pytest.fixture(autouse=True)
def no_leftover_children():
    yield
    kids = leftover_children()
    if kids:
        desc = {k: _cmdline(k) for k in kids}
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
        pytest.fail(f"test left child processes behind: {desc}")
