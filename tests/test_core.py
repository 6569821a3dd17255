"""The lazy-page core: export in one process, attach in another."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import _core_child as child
import numpy as np
import pytest
import zmq
from _proc import as_user
from conftest import DEADLINE, wait_for

import lazyshare
from lazyshare import handler, settings, transport

CTX = mp.get_context("spawn")
HERE = os.path.dirname(os.path.abspath(__file__))


def run(target, *args, timeout=DEADLINE):
    """Run target(*args, q) in a spawned process; return what it put on q."""
    q = CTX.Queue()
    p = CTX.Process(target=target, args=(*args, q))
    p.start()
    try:
        return q.get(timeout=timeout)
    finally:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()


@pytest.fixture(autouse=True, params=["install", "wire"])
def data_path(request, monkeypatch):
    """Every test runs on both data paths: the owner installing pages through the
    consumer's userfaultfd (the default), and pages sent as payload."""
    monkeypatch.setenv("LAZYSHARE_DATA_PATH", request.param)
    return request.param


@pytest.fixture(scope="module")
def big():
    """A 256 MiB random array, exported once for the module."""
    a = np.random.default_rng(42).random(32 << 20)
    desc = lazyshare.export(a)
    yield a, desc
    lazyshare.release(desc)


def test_content_full_scan_and_random_reads(big, data_path):
    a, desc = big
    idx = np.random.default_rng(1).integers(0, a.size, 1000)
    status, total, vals, st, mode = run(child.content, desc, idx)
    assert mode == lazyshare.capabilities().mode
    assert total == float(a.sum())
    assert vals == a[idx].tolist()
    assert st["bytes_fetched"] >= a.nbytes  # every page came from the owner
    assert st["requests"] > 0
    assert st["installs"] == (st["requests"] if data_path == "install" and mode != "eager" else 0)


@pytest.mark.parametrize("offset", [1, 8, 123, 4095, 4097])
def test_data_not_on_a_page_boundary(offset):
    raw = bytearray(os.urandom(3 * 4096 + 777 + offset))
    a = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    assert a.ctypes.data % 4096 != 0 or offset % 4096 == 0
    desc = lazyshare.export(a)
    try:
        _, total, vals, _, _ = run(child.content, desc, np.arange(0, a.size, 97))
        assert total == float(a.sum())
        assert vals == a[::97].tolist()
    finally:
        lazyshare.release(desc)


def test_views_export_their_base_and_rebuild():
    base = np.arange(4 << 20, dtype=np.float64).reshape(2048, 2048)
    for view in (base[::3, 5:], base.T, base[100:200], base[:, ::-7]):
        desc = lazyshare.export(view)
        assert desc.segment.nbytes == base.nbytes  # the base, once
        try:
            _, total, _, _, _ = run(child.content, desc, [0])
            assert total == float(view.sum())
        finally:
            lazyshare.release(desc)


def test_mapping_dropped_while_pages_are_in_flight_never_gets_late_pages():
    a = np.arange(8 << 20, dtype=np.float64)  # 64 MiB each
    b = -a
    da, db = lazyshare.export(a), lazyshare.export(b)
    try:
        wrong, attached = run(child.churn, da, db, 40)
    finally:
        lazyshare.release(da)
        lazyshare.release(db)
    assert wrong == 0
    assert attached == 0


def test_only_touched_pages_move(big):
    a, desc = big
    k = 50
    pages = sorted(np.random.default_rng(7).choice(a.nbytes // 4096 // 200, k, replace=False) * 200)
    vals, fetched, requests = run(child.scattered, desc, [int(p) for p in pages])
    assert vals == [float(a[p * 512]) for p in pages]
    assert requests <= k
    assert fetched <= k * settings.read().min_block
    assert fetched < a.nbytes / 1000


def test_gil_held_python_loop_faults_hundreds_of_pages():
    a = np.random.default_rng(3).random(4 << 20)  # 32 MiB, 8192 pages
    with lazyshare.exported(a) as desc:
        s, n, faults, _ = run(child.python_loop, desc)
    idx = child.scrambled_indices(a.size, a.itemsize)
    assert n == len(idx) == 1000
    assert s == pytest.approx(float(sum(a[i] for i in idx)), rel=1e-12)
    assert faults >= 500


def test_owner_serves_while_its_main_thread_spins():
    """The page server is native: the owner's GIL-holding loop cannot stall it."""
    a = np.random.default_rng(4).random(4 << 20)
    desc = lazyshare.export(a)
    q = CTX.Queue()
    p = CTX.Process(target=child.python_loop, args=(desc, q))
    p.start()
    try:
        spin_until = time.time() + 8.0
        x = 0
        while time.time() < spin_until and p.exitcode is None:
            x += 1  # pure Python: holds the GIL between switch intervals
            if x % 200_000 == 0 and not q.empty():
                break
        s, n, faults, finished_at = q.get(timeout=DEADLINE)
        assert faults >= 100
        assert finished_at < spin_until, "the attaching process had to wait for the owner's loop"
    finally:
        p.join(DEADLINE)
        lazyshare.release(desc)


def test_four_threads_fault_same_and_different_pages():
    a = np.random.default_rng(5).random(8 << 20)  # 64 MiB
    with lazyshare.exported(a) as desc:
        out = run(child.threads, desc)
    half = float(a[: a.size // 2].sum())
    assert out[0] == half and out[1] == half
    assert out[2] == float(a[0::1024].sum())
    assert out[3] == float(a[512::1024].sum())


def test_owner_killed_while_consumer_faults_ends_in_a_clear_error():
    script = os.path.join(HERE, "_core_child.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    owner = subprocess.Popen([sys.executable, script, "owner"], stdout=subprocess.PIPE, env=env, text=True)
    consumer = None
    try:
        line = owner.stdout.readline()
        assert line, "owner did not start"
        consumer = subprocess.Popen(
            [sys.executable, script, "consumer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        consumer.stdin.write(line)
        consumer.stdin.flush()
        first = consumer.stdout.readline()
        assert first.startswith("page 0"), (first, consumer.poll())
        owner.kill()
        owner.wait(DEADLINE)
        t0 = time.monotonic()
        out, err = consumer.communicate(timeout=30)
        elapsed = time.monotonic() - t0
        assert consumer.returncode == -signal.SIGBUS, (consumer.returncode, out, err)
        assert "WRONG" not in out and "finished" not in out
        assert "lazyshare: fatal" in err and "owner" in err, err
        assert elapsed < 30, (elapsed, err)
    finally:
        for p in (owner, consumer):
            if p and p.poll() is None:
                p.kill()
                p.wait()


def _dealer(endpoint):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.rcvtimeo = 5000
    s.connect(endpoint)
    return s


def _read(s, seg, offset, length, tag=1):
    s.send(transport.pack_request(transport.OP_READ, seg, offset, length, tag))
    frames = s.recv_multipart()
    return transport.unpack_reply(frames[0]), frames[1:]


def test_page_server_answers_bad_requests_and_keeps_serving():
    owner = np.full(3 * 4096, 0xAB, dtype=np.uint8)
    seg = handler.export_memory(owner, owner.ctypes.data, 5000)  # not a page multiple
    s = _dealer(seg.endpoint)
    try:
        rep, data = _read(s, seg.id, 0, 8192)
        assert rep["status"] == 0 and rep["seglen"] == 5000
        body = bytes(data[0])
        assert body[:5000] == b"\xab" * 5000
        assert body[5000:] == bytes(8192 - 5000), "bytes past the segment must be zeros"

        def expect(frames, status):
            s.send_multipart(frames)
            got = s.recv_multipart()
            assert transport.unpack_reply(got[0])["status"] == -status, got
            assert len(got) == 1

        import errno

        expect([b"garbage"], errno.EPROTO)
        expect([b"\0" * 56], errno.EPROTO)
        expect([transport.pack_request(transport.OP_READ, seg.id, 0, 4096)[:-1] + b"x" + b"y"], errno.EPROTO)
        expect([transport.pack_request(99, seg.id)], errno.EPROTO)
        expect([transport.pack_request(transport.OP_READ, seg.id), b"extra"], errno.EPROTO)
        expect([transport.pack_request(transport.OP_READ, os.urandom(16), 0, 4096)], errno.ENOENT)
        expect([transport.pack_request(transport.OP_READ, seg.id, 8192, 4096)], errno.ERANGE)
        expect([transport.pack_request(transport.OP_READ, seg.id, 4096, 8192)], errno.ERANGE)
        expect([transport.pack_request(transport.OP_READ, seg.id, 2**64 - 4096, 8192)], errno.ERANGE)
        expect([transport.pack_request(transport.OP_READ, seg.id, 0, 0)], errno.EINVAL)
        expect([transport.pack_request(transport.OP_READ, seg.id, 0, 1 << 30)], errno.EINVAL)

        # a peer that breaks the framing is dropped; others are unaffected
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(transport.endpoint_path(seg.endpoint))
        raw.sendall(b"\x00" * 200)
        raw.settimeout(5)
        got = b""
        while True:
            chunk = raw.recv(4096)
            if not chunk:
                break
            got += chunk
        raw.close()

        rep, data = _read(s, seg.id, 4096, 4096, tag=77)
        assert rep["status"] == 0 and rep["tag"] == 77
        assert bytes(data[0])[: 5000 - 4096] == b"\xab" * (5000 - 4096)
        assert handler.stats()["errors_served"] >= 11
    finally:
        s.close()
        handler.release(seg)


def test_release_unpins_after_the_last_mapping_is_gone():
    a = np.ones(1 << 20)
    base = handler.pinned_segments()
    desc = lazyshare.export(a)
    q, go = CTX.Queue(), CTX.Event()
    p = CTX.Process(target=child.hold, args=(desc, q, go))
    p.start()
    try:
        assert q.get(timeout=DEADLINE) == 10.0
        assert handler.holders(desc) == 1
        lazyshare.release(desc)
        assert handler.pinned_segments() == base + 1  # still mapped: still pinned
        go.set()
        assert q.get(timeout=DEADLINE) == "dropped"
        assert wait_for(lambda: handler.pinned_segments() == base)
    finally:
        p.join(DEADLINE)


def test_dead_holder_releases_its_hold():
    a = np.ones(1 << 20)
    base = handler.pinned_segments()
    desc = lazyshare.export(a)
    q, go = CTX.Queue(), CTX.Event()
    p = CTX.Process(target=child.hold, args=(desc, q, go))
    p.start()
    assert q.get(timeout=DEADLINE) == 10.0
    lazyshare.release(desc)
    p.kill()
    p.join()
    assert wait_for(lambda: handler.pinned_segments() == base)


def test_attach_after_release_is_a_segment_error():
    desc = lazyshare.export(np.ones(1 << 16))
    lazyshare.release(desc)
    kind, msg = run(child.attach_error, desc)
    assert kind == "SegmentError", msg


def test_attach_to_a_dead_owner_is_owner_gone():
    desc = lazyshare.export(np.ones(1 << 16))
    dead = lazyshare.SegmentDescriptor(
        desc.segment.id, desc.segment.nbytes, "ipc:///nonexistent/x.sock", 2**22 + 1
    )
    lazyshare.release(desc)
    kind, msg = run(child.attach_error, lazyshare.ArrayDescriptor(dead, 0, (8192,), (8,), np.dtype("f8")))
    assert kind == "OwnerGoneError", msg


@pytest.mark.parametrize(
    "bad, exc",
    [
        (np.array([object()] * 10), TypeError),
        (np.zeros(0), ValueError),
        (np.zeros((0, 5)), ValueError),
        ("a string", TypeError),
    ],
)
def test_export_rejects_bad_input_clearly(bad, exc):
    before = handler.pinned_segments()
    with pytest.raises(exc):
        lazyshare.export(bad)
    assert handler.pinned_segments() == before


def test_read_only_array_exports_marked_read_only_and_its_content_arrives():
    a = np.arange(1 << 18, dtype=np.int64)
    a.flags.writeable = False
    with lazyshare.exported(a) as desc:
        assert desc.writeable is False
        _, total, _, _, _ = run(child.content, desc, [0])
    assert total == float(a.sum())


def test_release_twice_or_from_elsewhere_is_an_error():
    desc = lazyshare.export(np.ones(1 << 16))
    lazyshare.release(desc)
    with pytest.raises(lazyshare.SegmentError):
        lazyshare.release(desc)
    with pytest.raises(lazyshare.SegmentError):
        lazyshare.attach(desc)  # in the owner itself


def test_capabilities_and_forced_mode(monkeypatch):
    caps = lazyshare.capabilities()
    assert caps.mode in ("uffd", "uffd-user-mode-only", "eager")
    assert caps.reason
    monkeypatch.setenv("LAZYSHARE_MODE", "warp-speed")
    with pytest.raises(lazyshare.CapabilityError):
        handler._probe()


def test_stats_histogram_and_descriptor_pickles(big):
    a, desc = big
    d2 = pickle.loads(pickle.dumps(desc))
    assert d2 == desc and len(desc.segment.id) == 16
    st = lazyshare.stats()
    assert st["bytes_served"] >= a.nbytes
    assert st["segments_exported"] >= 1


def _run_script(code, env_extra, user=None, timeout=DEADLINE):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]), **env_extra)
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    if user:
        cmd = as_user(cmd, user)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def run_as_nobody(code, env_extra=None):
    """Run ``code`` as user nobody with its own runtime directory (root only)."""
    nobody = pwd.getpwnam("nobody")
    rt = tempfile.mkdtemp()
    os.chown(rt, nobody.pw_uid, nobody.pw_gid)
    try:
        env = {"LAZYSHARE_RUNTIME_DIR": os.path.join(rt, "ls"), "HOME": rt, **(env_extra or {})}
        return _run_script(code, env, user=nobody.pw_uid)
    finally:
        shutil.rmtree(rt, ignore_errors=True)


RUNG_SCRIPT = """
import multiprocessing as mp, numpy as np, warnings, lazyshare, _core_child as child
if __name__ == "__main__":
    warnings.simplefilter("always")
    a = np.random.default_rng(9).random(4 << 20)
    desc = lazyshare.export(a)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=child.content, args=(desc, [0, 5, 4 << 19], q)); p.start()
    _, total, vals, st, mode = q.get(timeout=50); p.join()
    assert total == float(a.sum()) and vals == a[[0, 5, 4 << 19]].tolist()
    p = ctx.Process(target=child.user_mode_kernel_access, args=(desc, q)); p.start()
    before, same, _ = q.get(timeout=50); p.join()
    print(mode, before, same, st["bytes_fetched"] >= a.nbytes, st["installs"] > 0)
"""


def test_user_mode_only_rung_forced(data_path):
    r = _run_script(RUNG_SCRIPT, {"LAZYSHARE_MODE": "uffd-user-mode-only"})
    assert r.returncode == 0, r.stderr
    installs = str(data_path == "install")  # the owner installs through a user-mode-only uffd too
    assert r.stdout.split() == [
        "uffd-user-mode-only",
        str(14),
        "True",
        "True",
        installs,
    ]  # EFAULT, then works


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges to another user")
def test_unprivileged_user_gets_user_mode_only(data_path):
    r = run_as_nobody(RUNG_SCRIPT)
    assert r.returncode == 0, r.stderr
    mode, before, same, moved, installs = r.stdout.split()
    assert installs == str(data_path == "install")
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        sysctl = f.read().strip()
    assert mode == ("uffd" if sysctl == "1" else "uffd-user-mode-only")
    assert same == "True" and moved == "True"
    if mode == "uffd-user-mode-only":
        assert before == "14"  # EFAULT before materialize()


def test_eager_rung_pulls_whole_segment_with_one_warning():
    r = _run_script(RUNG_SCRIPT, {"LAZYSHARE_MODE": "eager"})
    assert r.returncode == 0, r.stderr
    mode, before, same, moved, installs = r.stdout.split()
    assert mode == "eager" and before == "ok" and same == "True" and moved == "True"
    assert installs == "False"  # no userfaultfd to hand over: pages come as payload
    assert r.stderr.count("LazyshareWarning") == 2  # once per attaching process (two children)


def test_other_users_cannot_reach_the_page_server():
    ep = transport.endpoint_path(handler._ensure_server())
    d = os.path.dirname(ep)
    assert os.stat(d).st_mode & 0o777 == 0o700
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    code = f"""
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect({ep!r}); print("connected")
    except OSError as e:
        print("refused", e.errno)
    """
    r = _run_script(code, {}, user=pwd.getpwnam("nobody").pw_uid)
    assert r.stdout.startswith("refused"), r.stdout + r.stderr


def test_gc_of_attached_array_detaches_in_the_consumer():
    """In the attaching process, dropping every view unmaps the region."""
    with lazyshare.exported(np.ones(1 << 20)) as desc:
        n1, n2, n3, s = run(child.detach_on_gc, desc)
    assert (n1, n2, n3, s) == (1, 1, 0, float(1 << 20))


def test_forked_child_does_not_read_zeros():
    """A child forked by an attaching process cannot see the lazy pages (DONTFORK)."""
    with lazyshare.exported(np.ones(1 << 20)) as desc:
        q = CTX.Queue()
        p = CTX.Process(target=child.fork_after_attach, args=(desc, q))
        p.start()
        sig, parent_val = q.get(timeout=DEADLINE)
        p.join(DEADLINE)
    assert sig == signal.SIGSEGV and parent_val == 1.0


def test_gc_collect_leaves_owner_clean(big):
    gc.collect()
    assert handler.pinned_segments() >= 1  # the module's array is still exported


def test_untouched_zero_pages_cost_no_bytes():
    a = np.zeros(256 << 20 >> 3)  # 256 MiB, never written but for two pages
    a[12345] = 1.5
    a[-1] = 2.5
    with lazyshare.exported(a) as desc:
        _, total, vals, st, _ = run(child.content, desc, [12345, a.size - 1, 0])
    assert total == 4.0 and vals == [1.5, 2.5, 0.0]
    assert st["bytes_fetched"] <= 16 << 20  # the two written pages: 2 MiB each under THP, plus windows
    assert st["bytes_zero"] + st["bytes_fetched"] >= a.nbytes


def test_file_backed_memory_is_never_taken_for_zeros(tmp_path):
    path = tmp_path / "data.bin"
    np.arange(1 << 20, dtype=np.float64).tofile(path)
    m = np.memmap(path, dtype=np.float64, mode="r")  # pages not yet read: absent, not zero
    assert not handler._untouched_pages_are_zero(m.ctypes.data, m.nbytes)
    with lazyshare.exported(m) as desc:
        _, total, vals, _, _ = run(child.content, desc, [0, 7, (1 << 20) - 1])
    assert total == float(np.arange(1 << 20, dtype=np.float64).sum())
    assert vals == [0.0, 7.0, float((1 << 20) - 1)]


def test_reexported_lazy_mapping_is_not_taken_for_zeros():
    a = np.random.default_rng(11).random(1 << 20)
    with lazyshare.exported(a) as desc:
        zero_claimed, total, vals = run(child.reexport, desc)
    assert zero_claimed is False
    assert total == float(a.sum()) and vals == [a[0], a[1], a[-1]]
