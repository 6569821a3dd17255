"""Fuzzing the page server: malformed, truncated, oversized and out-of-range
messages, as pyzmq DEALER messages and as raw ZMTP bytes on the Unix socket.
The server must never crash, never stall a well-behaved client, and never send
a byte from outside the requested segment.

The segment sits inside a larger buffer filled with a sentinel byte that the
segment itself never contains, not on a page boundary: any byte of the owner's
other memory in a reply is detectable. Every reply is checked against a model
of the protocol (transport.py's docstring)."""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time

import numpy as np
import pytest
import zmq
from _zmtp import READY
from _zmtp import frame as zmtp_frame
from _zmtp import greeting as zmtp_greeting
from conftest import DEADLINE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyshare import handler, transport

pytestmark = pytest.mark.timeout(DEADLINE * 2)

PAGE = 4096
SENTINEL = 0xEE
SEG_LEN = 5 * PAGE + 333
SEG_OFF = 100  # the segment starts 100 bytes into a page of foreign bytes
MAX_READ = 8 << 20
PADDED = (SEG_LEN + PAGE - 1) // PAGE * PAGE
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


class Segment:
    def __init__(self):
        self.buf = np.full(SEG_OFF + SEG_LEN + 3 * PAGE, SENTINEL, dtype=np.uint8)
        content = np.random.default_rng(0).integers(0, SENTINEL, SEG_LEN, dtype=np.uint8)
        self.buf[SEG_OFF : SEG_OFF + SEG_LEN] = content
        self.image = content.tobytes() + bytes(PADDED - SEG_LEN)  # what any READ may show
        self.seg = handler.export_memory(self.buf, self.buf.ctypes.data + SEG_OFF, SEG_LEN)
        self.id = self.seg.id
        self.path = transport.endpoint_path(self.seg.endpoint)

    def expect(self, offset, length):
        return self.image[offset : offset + length]


@pytest.fixture(scope="module")
def seg():
    s = Segment()
    yield s
    handler.release(s.seg)


def dealer(endpoint, timeout_ms=5000):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.rcvtimeo = timeout_ms
    s.connect(endpoint)
    return s


def model(seg, frames):
    """The status the server must answer a DEALER message with."""
    sizes = (transport.REQUEST.size, transport.INSTALL_REQUEST.size)
    if len(frames) != 1 or len(frames[0]) not in sizes:
        return -errno.EPROTO
    magic, version, op, _pid, _res, _tag, offset, length, sid = transport.REQUEST.unpack(frames[0][:56])
    if magic != transport.MAGIC or version != transport.VERSION:
        return -errno.EPROTO
    if (len(frames[0]) == transport.INSTALL_REQUEST.size) != (op == transport.OP_INSTALL):
        return -errno.EPROTO
    if op == transport.OP_PING:
        return 0
    if op in (transport.OP_UFFD, transport.OP_INSTALL):
        return -errno.EBADF  # no userfaultfd can ride on a ZeroMQ message
    if op not in (transport.OP_READ, transport.OP_HOLD, transport.OP_RELEASE):
        return -errno.EPROTO
    if sid != seg.id:
        return -errno.ENOENT
    if op != transport.OP_READ:
        return 0
    if not length or length > MAX_READ:
        return -errno.EINVAL
    if offset >= PADDED or length > PADDED - offset:
        return -errno.ERANGE
    return 0


def check_reply(seg, reply, frames=None):
    """A reply's frames are consistent and carry only bytes of the segment."""
    rep = transport.unpack_reply(bytes(reply[0]))
    assert rep["magic"] == transport.MAGIC and rep["version"] == transport.VERSION
    if frames is not None:
        assert rep["status"] == model(seg, frames), (rep, [bytes(f)[:64] for f in frames])
    if rep["status"] == 0 and rep["op"] == transport.OP_READ and len(reply) > 1:
        data = bytes(reply[1])
        assert len(reply) == 2 and len(data) == rep["length"]
        assert SENTINEL not in data, "a byte from outside the segment"
        assert data == seg.expect(rep["offset"], rep["length"]), "wrong bytes"
    else:
        assert len(reply) == 1, reply


class GoodClient(threading.Thread):
    """Reads valid random ranges all along, recording the slowest answer."""

    def __init__(self, seg):
        super().__init__(daemon=True)
        self.seg, self.stop, self.n, self.worst, self.errors = seg, threading.Event(), 0, 0.0, []

    def run(self):
        s = dealer(self.seg.seg.endpoint, timeout_ms=10000)
        rng = np.random.default_rng(1)
        try:
            while not self.stop.is_set():
                off = int(rng.integers(0, PADDED // PAGE)) * PAGE
                ln = int(rng.integers(1, PADDED - off + 1))
                t0 = time.monotonic()
                s.send(transport.pack_request(transport.OP_READ, self.seg.id, off, ln, tag=self.n))
                try:
                    reply = s.recv_multipart()
                except zmq.Again:
                    self.errors.append("no answer within 10 s")
                    return
                self.worst = max(self.worst, time.monotonic() - t0)
                try:
                    check_reply(self.seg, reply, None)
                    assert transport.unpack_reply(reply[0])["tag"] == self.n
                except AssertionError as e:
                    self.errors.append(str(e))
                self.n += 1
                time.sleep(0.001)
        finally:
            s.close()


@pytest.fixture(scope="module")
def good(seg):
    g = GoodClient(seg)
    g.start()
    yield g
    g.stop.set()
    g.join(15)
    assert not g.errors, g.errors[:3]
    assert g.n > 100
    assert g.worst < 2.0, f"a well-behaved client waited {g.worst:.2f}s"


# ------------------------------------------------------------------ strategies

u64 = st.one_of(
    st.sampled_from(
        [0, 1, PAGE - 1, PAGE, SEG_LEN - 1, SEG_LEN, PADDED - PAGE, PADDED - 1, PADDED, PADDED + PAGE]
        + [MAX_READ, MAX_READ + 1, 2**31, 2**32, 2**63, 2**64 - PAGE, 2**64 - 1]
    ),
    st.integers(0, 2 * PADDED),
    st.integers(0, 2**64 - 1),
)


@st.composite
def request(draw, seg_id):
    op = draw(st.one_of(st.sampled_from([1, 1, 1, 2, 3, 4, 5, 6]), st.integers(0, 2**16 - 1)))
    magic = draw(st.sampled_from([transport.MAGIC] * 8 + [0, transport.MAGIC ^ 1]))
    version = draw(st.sampled_from([transport.VERSION] * 8 + [0, 2, 0xFFFF]))
    sid = draw(st.one_of(st.just(seg_id), st.just(seg_id), st.binary(min_size=16, max_size=16)))
    raw = transport.REQUEST.pack(
        magic, version, op, draw(st.integers(0, 2**32 - 1)), 0, draw(u64), draw(u64), draw(u64), sid
    )
    cut = draw(
        st.one_of(
            st.just(None),
            st.integers(0, len(raw) - 1),
            st.binary(min_size=1, max_size=64),
            st.binary(min_size=8, max_size=8),  # the size of an INSTALL request
        )
    )
    if cut is None:
        return raw
    if isinstance(cut, int):
        return raw[:cut]  # truncated
    return raw + cut  # oversized


@st.composite
def valid_read(draw, seg_id):
    off = draw(st.integers(0, PADDED - 1))
    return transport.pack_request(transport.OP_READ, seg_id, off, draw(st.integers(1, PADDED - off)))


def messages(seg_id):
    frame = st.one_of(valid_read(seg_id), request(seg_id), request(seg_id), st.binary(max_size=300))
    return st.lists(frame, min_size=1, max_size=3)


def test_dealer_messages(seg, good):
    s = dealer(seg.seg.endpoint)
    seen = {"ok": 0, "err": 0}

    @settings(FUZZ, max_examples=1500)
    @given(messages(seg.id))
    def one(frames):
        s.send_multipart(frames)
        reply = s.recv_multipart()
        check_reply(seg, reply, frames)
        seen["ok" if transport.unpack_reply(reply[0])["status"] == 0 else "err"] += 1

    try:
        one()
    finally:
        s.close()
    # About 1 message in 12 is one valid READ: how many exactly depends on
    # hypothesis's version (derandomized, but its generation changes between
    # releases; one gave exactly 100). Enough of both kinds is what counts.
    assert seen["ok"] > 50 and seen["err"] > 500, seen


# ------------------------------------------------------------------ raw ZMTP


def parse_stream(seg, data):
    """Split the server's bytes into frames; check every READ payload."""
    assert data[:1] == b"\xff" and len(data) >= 64 or not data, data[:16]
    pos, frames = 64, []
    while pos < len(data):
        flags = data[pos]
        if flags & 0x02:
            if pos + 9 > len(data):
                break
            ln = struct.unpack(">Q", data[pos + 1 : pos + 9])[0]
            pos += 9
        else:
            if pos + 2 > len(data):
                break
            ln = data[pos + 1]
            pos += 2
        body = data[pos : pos + ln]
        pos += ln
        if len(body) < ln:
            break  # cut short by the close: fine, but check what came
        if not flags & 0x04:
            frames.append((flags, body))
    msg = []
    for flags, body in frames:
        msg.append(body)
        if not flags & 0x01:
            check_reply(seg, msg)
            msg = []
    return len(frames)


def raw_exchange(seg, payload, greet=True):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(10)
    try:
        c.connect(seg.path)
        c.sendall((zmtp_greeting() + READY if greet else b"") + payload)
        c.shutdown(socket.SHUT_WR)
        got = bytearray()
        while True:
            try:
                chunk = c.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        return bytes(got)
    finally:
        c.close()


@st.composite
def zmtp_stream(draw, seg_id):
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            parts.append(zmtp_frame(draw(request(seg_id)), draw(st.sampled_from([0, 0, 0, 1, 4]))))
        elif kind == 1:  # a header announcing a length it never delivers (or a huge one)
            parts.append(bytes([draw(st.sampled_from([0, 1, 2, 3, 4, 6]))]) + struct.pack(">Q", draw(u64)))
        elif kind == 2:
            parts.append(bytes([0, draw(st.integers(0, 255))]) + draw(st.binary(max_size=255)))
        else:
            parts.append(draw(st.binary(max_size=200)))
    return b"".join(parts)


def test_raw_zmtp_streams(seg, good):
    counts = {"frames": 0}

    @settings(FUZZ, max_examples=1200)
    @given(zmtp_stream(seg.id), st.booleans())
    def one(payload, greet):
        if not greet:
            payload = payload[:64].ljust(64, b"\0") + payload[64:]  # a bogus greeting
        counts["frames"] += parse_stream(seg, raw_exchange(seg, payload, greet))

    one()
    # About 400 replies come back; fewer when the server closes on a broken
    # frame while bytes are still unread and the reset discards replies the
    # client had not read yet (how many depends on scheduling). Enough to show
    # that valid frames inside the streams were answered and checked.
    assert counts["frames"] > 150, counts
    # and after it all, a fresh client gets exact bytes
    s = dealer(seg.seg.endpoint)
    try:
        s.send(transport.pack_request(transport.OP_READ, seg.id, 0, PADDED))
        check_reply(seg, s.recv_multipart(), [transport.pack_request(transport.OP_READ, seg.id, 0, PADDED)])
    finally:
        s.close()


def test_slow_readers_and_idle_connections_do_not_stall_others(seg, good):
    big = np.random.default_rng(3).random(2 << 20)  # 16 MiB
    bseg = handler.export_memory(big, big.ctypes.data, big.nbytes)
    hogs, idle = [], []
    try:
        # 8 clients each ask for 200 x 8 MiB and never read; 100 connect and say nothing
        req = zmtp_frame(transport.pack_request(transport.OP_READ, bseg.id, 0, MAX_READ))
        for _ in range(8):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(seg.path)
            c.setblocking(False)
            try:
                c.send(zmtp_greeting() + READY + req * 200)
            except BlockingIOError:
                pass
            hogs.append(c)
        for _ in range(100):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(seg.path)
            c.send(b"\xff")
            idle.append(c)
        n0 = good.n
        time.sleep(2.0)
        assert good.n > n0 + 50, "a well-behaved client starved while others hogged the server"
        s = dealer(seg.seg.endpoint, timeout_ms=5000)
        try:
            t0 = time.monotonic()
            s.send(transport.pack_request(transport.OP_READ, bseg.id, 8 << 20, 4096))
            rep = s.recv_multipart()
            assert time.monotonic() - t0 < 2.0
            assert bytes(rep[1]) == big.view(np.uint8)[8 << 20 : (8 << 20) + 4096].tobytes()
        finally:
            s.close()
    finally:
        for c in hogs + idle:
            c.close()
        handler.release(bseg)
    # the hogs' half-sent replies no longer pin the buffer
    deadline = time.monotonic() + 10
    while bseg.id in handler._pins and time.monotonic() < deadline:
        time.sleep(0.02)
    assert bseg.id not in handler._pins


def test_another_connections_release_cannot_drop_a_hold(seg):
    a = np.ones(1 << 18)
    s2 = handler.export_memory(a, a.ctypes.data, a.nbytes)
    holder, other = dealer(s2.endpoint), dealer(s2.endpoint)
    try:
        holder.send(transport.pack_request(transport.OP_HOLD, s2.id, tag=1))
        assert transport.unpack_reply(holder.recv_multipart()[0])["status"] == 0
        for _ in range(5):
            other.send(transport.pack_request(transport.OP_RELEASE, s2.id))
            other.recv_multipart()
        handler.release(s2)
        assert handler.holders(s2) == 1 and s2.id in handler._pins
        holder.send(transport.pack_request(transport.OP_READ, s2.id, 0, 4096))
        rep = holder.recv_multipart()
        assert transport.unpack_reply(rep[0])["status"] == 0  # the holder still reads true bytes
        assert bytes(rep[1]) == a.view(np.uint8)[:4096].tobytes()
    finally:
        holder.close()
        other.close()
    deadline = time.monotonic() + 10
    while s2.id in handler._pins and time.monotonic() < deadline:
        time.sleep(0.02)
    assert s2.id not in handler._pins
