"""Links between hosts (lazyshare.link): the page protocol over TCP in mutual
TLS 1.3. On loopback here; across network namespaces in tests/test_dask_hosts.py.

Pages cross a link exactly (every byte checked), and only those touched;
a peer whose certificate another CA signed, a peer that speaks plaintext and
a peer that sends garbage are refused, and the listener serves others on;
the page protocol fuzz runs again over TLS; an owner that dies ends its
consumer's fault in a clear error at once."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from conftest import DEADLINE, wait_for

pytest.importorskip("cryptography", reason="test certificates need the cryptography package")
from _certs import CA  # noqa: E402

from lazyshare import handler, link, transport  # noqa: E402
from lazyshare.errors import LinkError  # noqa: E402

pytestmark = pytest.mark.timeout(DEADLINE * 2)
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ca():
    return CA()


@pytest.fixture(scope="module")
def listener(ca):
    lst = link.serve("127.0.0.1", 0, ca.tls("owner"))
    yield lst
    lst.close()


def _child(role, cfg, env=None, **kw):
    env = dict(
        os.environ,
        LZ_LINK=json.dumps(cfg),
        PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **(env or {}),
    )
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "_link_child.py"), role], env=env, text=True, **kw
    )


def _tls_cfg(t):
    return {"ca": t.ca, "cert": t.cert, "key": t.key} if t else None


def _consumer_cfg(port, tls, seg, **kw):
    """A consumer child's settings: segment seg (a descriptor, or (id hex, nbytes))
    behind the listener at port, reached with credentials tls (None: plaintext)."""
    sid, nbytes = (seg.id.hex(), seg.nbytes) if hasattr(seg, "id") else seg
    return dict(host="127.0.0.1", port=port, tls=_tls_cfg(tls), seg=sid, nbytes=nbytes, **kw)


def test_pages_cross_a_tls_link_exactly_and_only_those_touched(ca, listener):
    data = np.random.default_rng(1).integers(0, 255, 64 << 20, dtype=np.uint8)
    seg = handler.export_memory(data, data.ctypes.data, data.nbytes)
    try:
        ranges = [
            (0, 1),
            (4096 * 7, 4096 * 7 + 10),
            (5 << 20, (5 << 20) + 4096 * 3),
            (data.nbytes - 5, data.nbytes),
        ]
        before = listener.stats()["bytes_out"]
        cfg = _consumer_cfg(listener.port, ca.tls("consumer"), seg, ranges=ranges)
        p = _child("consumer", cfg, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=DEADLINE)
        assert p.returncode == 0, err
        got = json.loads(out.strip().splitlines()[-1])["sha"]
        assert got == [hashlib.sha256(data[lo:hi]).hexdigest() for lo, hi in ranges]
        sent = listener.stats()["bytes_out"] - before
        touched = 4 * 4096 + 3 * 4096  # pages of the ranges (a range's page each, 3 for the third)
        # only the touched pages (random faults fetch one page: no read-ahead
        # yet), plus protocol headers and TLS records
        assert touched <= sent < touched + 64 << 10, (sent, touched)
    finally:
        handler.release(seg)


def test_a_peer_signed_by_another_ca_is_refused_both_ways(ca, listener):
    refused = listener.stats()["refused"]
    other = CA("another-ca")
    # a consumer that trusts our CA but shows a certificate another CA signed:
    # the owner refuses it (TLS 1.3 tells the client after its handshake)
    cert, key = other.issue("intruder")
    with pytest.raises(LinkError, match="refused the link.*(certificate|alert)"):
        link.probe("127.0.0.1", listener.port, link.TLS(ca.pem, cert, key))
    assert wait_for(lambda: listener.stats()["refused"] > refused)
    # a consumer that trusts only another CA refuses our owner
    with pytest.raises(LinkError, match="certificate verify failed"):
        link.probe("127.0.0.1", listener.port, other.tls("consumer"))
    # an owner whose certificate another CA signed: a consumer of our CA refuses it
    cert, key = other.issue("impostor")
    impostor = link.serve("127.0.0.1", 0, link.TLS(ca.pem, cert, key))
    try:
        with pytest.raises(LinkError, match="certificate verify failed"):
            link.probe("127.0.0.1", impostor.port, ca.tls("consumer"))
    finally:
        impostor.close()
    link.probe("127.0.0.1", listener.port, ca.tls("consumer"))  # a good peer still gets in


def test_plaintext_and_garbage_peers_are_refused(ca, listener):
    with pytest.raises(LinkError, match="refused the link"):
        link.probe("127.0.0.1", listener.port, None)
    for junk in (
        b"GET / HTTP/1.1\r\n\r\n",
        b"\xff" + bytes(8) + b"\x7f\x03\x00NULL" + bytes(48),
        os.urandom(4096),
    ):
        with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as s:
            s.sendall(junk)
            s.settimeout(10)
            try:
                rest = s.recv(65536)
            except ConnectionResetError:
                rest = b""
            assert b"\xff" not in rest[:1]  # never the page server's greeting
    link.probe("127.0.0.1", listener.port, ca.tls("consumer"))


def test_a_consumer_with_credentials_nobody_signed_gets_a_clear_error(ca, tmp_path):
    bad = link.TLS(
        ca.pem, "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", ca.issue("x")[1]
    )
    with pytest.raises(LinkError, match="loading the certificate"):
        link.probe("127.0.0.1", 9, bad)
    with pytest.raises(LinkError, match="neither PEM text nor a readable file"):
        link.probe("127.0.0.1", 9, link.TLS(str(tmp_path / "missing.pem"), ca.pem, ca.pem))


def test_plaintext_link_when_asked_for():
    data = np.arange(1 << 20, dtype=np.uint8)
    seg = handler.export_memory(data, data.ctypes.data, data.nbytes)
    lst = link.serve("127.0.0.1", 0, None)
    try:
        assert "PLAINTEXT" in repr(lst)
        cfg = _consumer_cfg(lst.port, None, seg, ranges=[(0, data.nbytes)])
        p = _child("consumer", cfg, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=DEADLINE)
        assert p.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["sha"] == [hashlib.sha256(data).hexdigest()]
    finally:
        lst.close()
        handler.release(seg)


def test_an_owner_that_dies_ends_its_consumers_fault_in_a_clear_error(ca):
    owner = _child(
        "owner",
        {"host": "127.0.0.1", "nbytes": 256 << 20, "tls": _tls_cfg(ca.tls("owner"))},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    consumer = None
    try:
        spec = json.loads(owner.stdout.readline())
        cfg = _consumer_cfg(
            spec["port"], ca.tls("consumer"), (spec["seg"], spec["nbytes"]), ranges=[], slow=True
        )
        consumer = _child("consumer", cfg, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert json.loads(consumer.stdout.readline()) == {"reading": True}
        time.sleep(0.3)
        owner.kill()
        t = time.monotonic()
        _, err = consumer.communicate(timeout=DEADLINE)
        assert time.monotonic() - t < 5  # the connection's end tells at once: no timeout to wait out
        assert consumer.returncode == -signal.SIGBUS, err
        assert "lost the connection to the owner" in err, err
    finally:
        for p in (owner, consumer):
            if p and p.poll() is None:
                p.kill()
                p.wait()
        if owner.stdin:
            owner.stdin.close()
        transport._sweep(transport._base_dir())  # the killed owner's socket directory


# ------------------------------------------------------------------ the fuzz, over TLS


def test_page_protocol_fuzz_over_tls(ca, listener):
    import test_fuzz as fz
    from hypothesis import given, settings
    from hypothesis import strategies as st

    seg = fz.Segment()
    t = ca.tls("fuzzer")
    d = tempfile.mkdtemp()
    paths = []
    for name, pem in (("ca", t.ca), ("cert", t.cert), ("key", t.key)):
        paths.append(os.path.join(d, name + ".pem"))
        with open(paths[-1], "w") as f:
            f.write(pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(paths[0])
    ctx.load_cert_chain(paths[1], paths[2])

    def exchange(payload, greet=True):
        with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as raw:
            with ctx.wrap_socket(raw) as c:
                c.sendall((fz.zmtp_greeting() + fz.READY if greet else b"") + payload)
                got = bytearray()
                deadline = time.monotonic() + 2
                c.settimeout(0.1)
                while time.monotonic() < deadline:  # TLS has no half-close: read until quiet
                    try:
                        chunk = c.recv(1 << 20)
                    except (socket.timeout, TimeoutError):
                        break
                    except (ConnectionResetError, ssl.SSLError, OSError):
                        break
                    if not chunk:
                        break
                    got += chunk
                return bytes(got)

    counts = {"frames": 0}

    @settings(fz.FUZZ, max_examples=150)
    @given(fz.zmtp_stream(seg.id), st.booleans())
    def one(payload, greet):
        if not greet:
            payload = payload[:64].ljust(64, b"\0") + payload[64:]
        counts["frames"] += fz.parse_stream(seg, exchange(payload, greet))

    try:
        one()
        assert counts["frames"] > 20, counts
        # a well-formed READ after it all: exact bytes
        req = fz.transport.pack_request(fz.transport.OP_READ, seg.id, 0, fz.PADDED)
        got = exchange(fz.zmtp_frame(req, 0))
        assert fz.parse_stream(seg, got) == 2
    finally:
        handler.release(seg.seg)


def test_a_consumer_that_dies_releases_its_holds(ca, listener):
    data = np.ones(32 << 20, dtype=np.uint8)
    seg = handler.export_memory(data, data.ctypes.data, data.nbytes)
    consumer = None
    try:
        cfg = _consumer_cfg(listener.port, ca.tls("consumer"), seg, ranges=[], slow=True)
        consumer = _child("consumer", cfg, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert json.loads(consumer.stdout.readline()) == {"reading": True}
        assert handler.holders(seg) == 1  # its mapping, held through the link
        consumer.kill()
        consumer.wait(timeout=DEADLINE)
        assert wait_for(lambda: handler.holders(seg) == 0)
    finally:
        if consumer and consumer.poll() is None:
            consumer.kill()
            consumer.wait()
        for f in (consumer.stdout, consumer.stderr) if consumer else ():
            f.close()
        handler.release(seg)


def test_an_idle_consumer_after_a_detach_with_pages_in_flight_lives_on(ca, listener):
    # Detaching while read-ahead is on the wire (READ path) used to leave the
    # handler's published count of requests stale: the watchdog then saw
    # requests waiting while the loop slept, and killed the idle process
    # after LAZYSHARE_FAULT_TIMEOUT.
    data = np.random.default_rng(2).integers(0, 255, 64 << 20, dtype=np.uint8)
    seg = handler.export_memory(data, data.ctypes.data, data.nbytes)
    try:
        ranges = [(k << 20, (k << 20) + 4096) for k in range(0, 64, 8)] + [(0, 1 << 20)]
        procs = []
        for _ in range(4):  # a few, since the detach must catch requests in flight
            cfg = _consumer_cfg(listener.port, ca.tls("consumer"), seg, ranges=ranges, linger=3.5)
            procs.append(
                _child(
                    "consumer",
                    cfg,
                    env={"LAZYSHARE_FAULT_TIMEOUT": "1.5"},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        for p in procs:
            out, err = p.communicate(timeout=DEADLINE)
            assert p.returncode == 0, err
            assert json.loads(out.strip().splitlines()[-1])["sha"] == [
                hashlib.sha256(data[lo:hi]).hexdigest() for lo, hi in ranges
            ]
    finally:
        handler.release(seg)


@pytest.mark.parametrize("block", [None, 128 << 10])
def test_read_ahead_across_a_link_stays_within_two_link_windows(ca, listener, block):
    # A sequential read that stops leaves at most the demand window and the
    # one ahead of it on the wire; across a link the window is capped at
    # LAZYSHARE_LINK_MAX_BLOCK (default 512 KiB), not the local 4 MiB.
    data = np.random.default_rng(3).integers(0, 255, 64 << 20, dtype=np.uint8)
    seg = handler.export_memory(data, data.ctypes.data, data.nbytes)
    try:
        window = block or 512 << 10
        env = {"LAZYSHARE_LINK_MAX_BLOCK": str(block)} if block else {}
        before = listener.stats()["bytes_out"]
        cfg = _consumer_cfg(listener.port, ca.tls("consumer"), seg, ranges=[(0, 8 << 20)])
        p = _child("consumer", cfg, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=DEADLINE)
        assert p.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["sha"] == [
            hashlib.sha256(data[: 8 << 20]).hexdigest()
        ]
        sent = listener.stats()["bytes_out"] - before
        assert 8 << 20 <= sent <= (8 << 20) + 2 * window + (64 << 10), (sent, window)
    finally:
        handler.release(seg)
