"""lazyshare.dask across hosts: network namespaces on this machine.

A scheduler and workers in one namespace, the client in another, joined by a
veth pair with addresses inside them only. Every process runs under
``ip netns exec``, which gives it a mount namespace of its own too: the
workers cannot tell they share the client's host, so pages take the TCP link
in TLS 1.3 with the cluster's certificates, as between real hosts.

Content and only-touched-pages (bytes on the veth counted), the scheduler
never holding the array, the client killed mid-task and the link taken down
mid-task (each a clear error within a bounded time). Refused certificates,
plaintext peers and the fuzz over TLS: tests/test_link.py."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import DEADLINE

pytest.importorskip(
    "distributed", minversion="2025.1", reason="lazyshare.dask needs dask.distributed 2025.1+ (Python 3.10+)"
)
pytest.importorskip("cryptography", reason="Security.temporary needs cryptography")

pytestmark = pytest.mark.timeout(DEADLINE * 3)
HERE = os.path.dirname(os.path.abspath(__file__))
LINK_TIMEOUT = 3  # LAZYSHARE_LINK_TIMEOUT on the workers: a cut link ends within about this


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture(scope="module")
def net():
    """Two namespaces joined by a veth pair; deleted after the module."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2's ip")
    tag = secrets.token_hex(3)
    a, b = f"lzA{tag}", f"lzB{tag}"
    va, vb = f"la{tag}", f"lb{tag}"
    octet = 16 + secrets.randbelow(200)
    try:
        _ip("netns", "add", a)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"network namespaces unavailable: {e.stderr.strip()}")
    try:
        _ip("netns", "add", b)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", a)
        _ip("link", "set", vb, "netns", b)
        for ns, dev, host in ((a, va, 1), (b, vb, 2)):
            _ip("-n", ns, "addr", "add", f"10.{octet}.0.{host}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield {"a": a, "b": b, "va": va, "vb": vb, "ip_a": f"10.{octet}.0.1", "ip_b": f"10.{octet}.0.2"}
    finally:
        _ip("netns", "del", a, check=False)
        _ip("netns", "del", b, check=False)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from distributed import Security

    sec = Security.temporary()
    d = tmp_path_factory.mktemp("certs")
    paths = {}
    for name, pem in (("ca", sec.tls_ca_file), ("cert", sec.tls_worker_cert), ("key", sec.tls_worker_key)):
        paths[name] = str(d / f"{name}.pem")
        with open(paths[name], "w") as f:
            f.write(pem)
    return paths


class Cluster:
    """A scheduler and n workers in namespace a, started and killed per test."""

    def __init__(self, net, certs, tmp_path, workers):
        self.net, self.certs, self.procs, self.logs = net, certs, {}, {}
        self.tmp = tmp_path
        env = dict(
            os.environ,
            PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
            LAZYSHARE_LINK_TIMEOUT=str(LINK_TIMEOUT),
            PYTHONFAULTHANDLER="1",
        )
        self.env = env
        sfile = str(tmp_path / "scheduler")
        self.start("scheduler", net["a"], dict(certs, host=net["ip_a"], file=sfile))
        deadline = time.monotonic() + 30
        while not os.path.exists(sfile):
            assert time.monotonic() < deadline, self.log("scheduler")
            assert self.procs["scheduler"].poll() is None, self.log("scheduler")
            time.sleep(0.05)
        with open(sfile) as f:
            self.address = f.read()
        for i in range(workers):
            self.start(f"worker{i}", net["a"], dict(certs, host=net["ip_a"], scheduler=self.address))

    def start(self, name, ns, cfg, role=None, **kw):
        log = open(self.tmp / f"{name}.log", "w+")
        self.logs[name] = log
        cmd = ["ip", "netns", "exec", ns, sys.executable, os.path.join(HERE, "_dask_hosts_child.py")]
        p = subprocess.Popen(
            cmd + [role or name.rstrip("0123456789"), json.dumps(cfg)],
            env=self.env,
            stderr=log,
            text=True,
            **kw,
        )
        self.procs[name] = p
        return p

    def client(self, case, workers, **kw):
        cfg = dict(self.certs, scheduler=self.address, case=case, workers=workers, dev=self.net["vb"], **kw)
        return self.start("client", self.net["b"], cfg, stdout=subprocess.PIPE)

    def log(self, name):
        f = self.logs[name]
        f.flush()
        f.seek(0)
        return f.read()

    def pid_of(self, name):
        # `ip netns exec` execs the interpreter: the child's pid is the process's
        return self.procs[name].pid

    def close(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            if p.stdout:
                p.stdout.close()
        for f in self.logs.values():
            f.close()
        # killed processes leave their socket directories: remove those of dead pids
        from lazyshare import transport

        transport._sweep(transport._base_dir())


@pytest.fixture
def make_cluster(net, certs, tmp_path):
    made = []

    def make(workers):
        c = Cluster(net, certs, tmp_path, workers)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _line(p, timeout=60):
    """The client's next JSON line (within timeout)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise AssertionError("no output from the client in time")
    line = p.stdout.readline()
    assert line, "the client exited"
    return json.loads(line)


def test_tasks_on_other_hosts_fetch_only_the_pages_they_touch(make_cluster):
    cl = make_cluster(2)
    p = cl.client("touch", 2)
    try:
        report = _line(p)["report"]
        assert len(report) == 2
        assert {r["path"] for r in report.values()} == {"tls"}, report  # not the Unix socket
        m = _line(p, timeout=120)
    except AssertionError:
        raise AssertionError(cl.log("client")) from None
    assert m["ok"], m
    assert m["scheduler_mapped"] is False
    touched = m["touched"]  # 16 different 1% slices of 256 MiB: 41 MiB
    # every touched page crossed once; read-ahead past the end of a slice (at
    # most one 4 MiB window each) and Dask's own messages on top
    assert touched <= m["veth_tx"] < 1.1 * touched + 16 * (4 << 20), m
    assert m["link"]["refused"] == 0 and m["link"]["accepted"] >= 2, m
    # the scheduler never held the array (256 MiB): its peak RSS stays far below
    with open(f"/proc/{cl.pid_of('scheduler')}/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) << 10
    assert hwm < 200 << 20, hwm


def test_workers_that_cannot_reach_the_client_get_the_array_pushed_once(make_cluster):
    cl = make_cluster(2)
    # the client listens on its own loopback only: no worker can reach it (as behind NAT)
    p = cl.client("push", 2, listen="127.0.0.1")
    try:
        report = _line(p)["report"]
        assert all(r["error"] for r in report.values()), report
        m = _line(p, timeout=120)
    except AssertionError:
        raise AssertionError(cl.log("client")) from None
    assert m["ok"], m
    assert "goes once to one worker" in cl.log("client")
    array = 256 << 20
    # the array crossed the veth once (to the worker it was pushed to), not per task
    assert array <= m["veth_tx"] < 1.2 * array, m
    assert m["link"].get("bytes_out", 0) == 0  # the client's own link served nothing


def _worker_dies_clearly(cl, bound):
    w = cl.procs["worker0"]
    t = time.monotonic()
    try:
        w.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the worker still runs after {bound} s:\n{cl.log('worker0')[-3000:]}") from None
    log = cl.log("worker0")
    # The worker runs with faulthandler on, which walks every thread's frames
    # while the others keep running: now and then that walk itself faults, and
    # the process ends on SIGSEGV in the middle of reporting the SIGBUS.
    died_in_dump = w.returncode == -signal.SIGSEGV and "Fatal Python error: Bus error" in log
    assert w.returncode == -signal.SIGBUS or died_in_dump, log[-3000:]
    assert "lost the connection to the owner" in log, log[-3000:]
    return time.monotonic() - t, log


def test_the_client_killed_mid_task_ends_the_task_in_a_clear_error(make_cluster):
    cl = make_cluster(1)
    p = cl.client("slow", 1)
    _line(p)
    assert _line(p)["running"]
    p.kill()
    elapsed, _ = _worker_dies_clearly(cl, bound=10)
    assert elapsed < 5  # the connection's end tells at once


def test_a_link_taken_down_mid_task_ends_in_a_clear_error_within_the_bound(make_cluster, net):
    cl = make_cluster(1)
    p = cl.client("slow", 1)
    _line(p)
    assert _line(p)["running"]
    _ip("-n", net["b"], "link", "set", net["vb"], "down")
    try:
        elapsed, log = _worker_dies_clearly(cl, bound=LINK_TIMEOUT * 4 + 5)
    finally:
        _ip("-n", net["b"], "link", "set", net["vb"], "up")
    assert "broke: Connection timed out" in log, log[-3000:]
    assert elapsed >= LINK_TIMEOUT * 0.5  # it waited for the link, not less
