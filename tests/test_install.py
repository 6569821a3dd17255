"""The INSTALL data path at the protocol level: a consumer hands its
userfaultfd to the owner, which then copies pages straight into the consumer's
registered mapping. Driven by a raw ZMTP peer in this process (ZeroMQ sockets
cannot carry a file descriptor), with a userfaultfd opened through ctypes.

What must hold: only ranges registered with the passed userfaultfd are ever
written, with exactly the segment's bytes (zeros past its end, never the
owner's other memory); every malformed request is refused with a status and
leaves the connection usable; no fd the server receives is leaked.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import os
import struct
import time

import numpy as np
import pytest
from _libc import libc
from _zmtp import RawPeer
from _zmtp import frame as _zmtp_frame
from conftest import DEADLINE, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lazyshare
from lazyshare import handler, transport

pytestmark = [
    pytest.mark.timeout(DEADLINE * 2),
    pytest.mark.skipif(lazyshare.capabilities().mode == "eager", reason="needs userfaultfd"),
]

PAGE = 4096
SENTINEL = 0xEE
SEG_LEN = 5 * PAGE + 333
SEG_OFF = 100  # not page-aligned in the owner: every install reads across owner pages
PADDED = 6 * PAGE
NPAGES = 16  # the consumer's registered region

SYS_userfaultfd = 323  # x86_64
UFFD_USER_MODE_ONLY = 1
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01


class Consumer:
    """A userfaultfd and a registered anonymous region in this process. Its
    pages are read only where an install is known to have landed, or after
    unregistering (then the others read as zeros): never while missing."""

    def __init__(self, npages=NPAGES):
        fd = libc.syscall(SYS_userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
        if fd < 0:
            pytest.skip(f"userfaultfd(2) unavailable here: errno {ctypes.get_errno()}")
        self.fd = fd
        fcntl.ioctl(fd, UFFDIO_API, bytearray(struct.pack("<QQQ", 0xAA, 0, 0)))
        self.size = npages * PAGE
        self.base = libc.mmap(None, self.size, 3, 0x22, -1, 0)  # RW, PRIVATE|ANONYMOUS
        assert self.base not in (None, ctypes.c_void_p(-1).value)
        fcntl.ioctl(fd, UFFDIO_REGISTER, bytearray(struct.pack("<QQQQ", self.base, self.size, 1, 0)))
        self.registered = True

    def page(self, i):
        return ctypes.string_at(self.base + i * PAGE, PAGE)

    def unregister(self):
        if self.registered:
            fcntl.ioctl(self.fd, UFFDIO_UNREGISTER, struct.pack("<QQ", self.base, self.size))
            self.registered = False

    def close(self):
        self.unregister()
        libc.munmap(self.base, self.size)
        os.close(self.fd)


@dataclasses.dataclass
class Segment:
    id: bytes
    path: str
    image: bytes  # what the consumer must see: the bytes, then zeros to the page


@pytest.fixture(scope="module")
def seg():
    buf = np.full(SEG_OFF + SEG_LEN + 3 * PAGE, SENTINEL, dtype=np.uint8)
    content = np.random.default_rng(0).integers(0, SENTINEL, SEG_LEN, dtype=np.uint8)
    buf[SEG_OFF : SEG_OFF + SEG_LEN] = content
    desc = handler.export_memory(buf, buf.ctypes.data + SEG_OFF, SEG_LEN)
    yield Segment(
        desc.id, transport.endpoint_path(desc.endpoint), content.tobytes() + bytes(PADDED - SEG_LEN)
    )
    handler.release(desc)


@pytest.fixture
def consumer():
    c = Consumer()
    yield c
    c.close()


def install(peer, seg_id, offset, length, dst, flags=0, tag=7):
    peer.send(
        transport.INSTALL_REQUEST.pack(
            transport.MAGIC,
            transport.VERSION,
            transport.OP_INSTALL,
            os.getpid(),
            flags,
            tag,
            offset,
            length,
            seg_id,
            dst,
        )
    )
    reply = peer.recv()
    assert len(reply) == 1, "an INSTALL reply never has a payload"
    rep = transport.unpack_reply(reply[0])
    assert rep["op"] == transport.OP_INSTALL and rep["tag"] == tag
    return rep


def offer(peer, fds):
    peer.send(transport.pack_request(transport.OP_UFFD, bytes(16)), fds=fds)
    return transport.unpack_reply(peer.recv()[0])["status"]


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_install_writes_the_segment_into_the_registered_range_only(seg, consumer):
    peer = RawPeer(seg.path)
    try:
        assert offer(peer, (consumer.fd,)) == 0
        rep = install(peer, seg.id, 0, PADDED, consumer.base + 3 * PAGE)
        assert rep["status"] == 0 and rep["length"] == PADDED
        assert rep["seglen"] == SEG_LEN  # bytes copied; the tail of the last page is zeros
        got = b"".join(consumer.page(3 + i) for i in range(6))
        assert SENTINEL not in got[:SEG_LEN] and got == seg.image
        # again, and overlapping: pages already there are kept, the rest filled
        rep = install(
            peer, seg.id, PAGE, 4 * PAGE, consumer.base + 7 * PAGE, flags=transport.INSTALL_DONTWAKE
        )
        assert rep["status"] == 0
        assert consumer.page(8) == seg.image[5 * PAGE :]  # page 8 was there already, from offset 5 pages
        assert b"".join(consumer.page(9 + i) for i in range(2)) == seg.image[3 * PAGE : 5 * PAGE]
        consumer.unregister()
        zero = bytes(PAGE)
        assert [consumer.page(i) == zero for i in range(NPAGES)] == [True] * 3 + [False] * 8 + [True] * 5
    finally:
        peer.close()


def test_refusals_are_statuses_and_the_connection_stays_usable(seg, consumer):
    peer = RawPeer(seg.path)
    try:
        base = consumer.base
        assert install(peer, seg.id, 0, PAGE, base)["status"] == -errno.EBADF  # no fd handed over yet
        assert offer(peer, ()) == -errno.EBADF
        r, w = os.pipe()
        try:
            assert offer(peer, (r,)) == -errno.EBADF  # not a userfaultfd
        finally:
            os.close(r)
            os.close(w)
        assert offer(peer, (consumer.fd,)) == 0
        bad = [
            ((seg.id, 1, PAGE, base), -errno.EINVAL),  # unaligned offset
            ((seg.id, 0, PAGE + 1, base), -errno.EINVAL),  # unaligned length
            ((seg.id, 0, PAGE, base + 1), -errno.EINVAL),  # unaligned destination
            ((seg.id, 0, 0, base), -errno.EINVAL),
            ((seg.id, 0, 16 << 20, base), -errno.EINVAL),  # over the largest read
            ((seg.id, 0, PAGE, 2**64 - PAGE), -errno.EINVAL),  # wraps around
            ((bytes(16), 0, PAGE, base), -errno.ENOENT),
            ((seg.id, PADDED, PAGE, base), -errno.ERANGE),
            ((seg.id, 4 * PAGE, 3 * PAGE, base), -errno.ERANGE),
        ]
        for (sid, off, ln, dst), want in bad:
            assert install(peer, sid, off, ln, dst)["status"] == want, (off, ln, dst)
        # memory of this process that is not registered: the kernel refuses it
        scratch = np.zeros(4 * PAGE, np.uint8)
        dst = (scratch.ctypes.data + PAGE - 1) // PAGE * PAGE
        assert install(peer, seg.id, 0, PAGE, dst)["status"] < 0
        assert not scratch.any()
        # a range running off the end of the registered region
        assert install(peer, seg.id, 0, 2 * PAGE, base + (NPAGES - 1) * PAGE)["status"] < 0
        # and the connection still serves
        assert install(peer, seg.id, 0, PAGE, base)["status"] == 0
        assert consumer.page(0) == seg.image[:PAGE]
    finally:
        peer.close()


def test_fds_sent_to_the_server_are_never_leaked(seg, consumer):
    before = open_fds()
    for _ in range(20):
        peer = RawPeer(seg.path)
        r, w = os.pipe()
        try:
            assert offer(peer, (r, w, consumer.fd)) in (0, -errno.EBADF)  # only the first fits
            peer.send(transport.pack_request(transport.OP_PING, bytes(16)), fds=(w,))  # unclaimed
            assert transport.unpack_reply(peer.recv()[0])["status"] == 0
        finally:
            peer.close()
            os.close(r)
            os.close(w)
    # the server closes its side (and what it kept) when it sees each close
    assert wait_for(lambda: open_fds() <= before, DEADLINE / 4), (
        "the page server kept fds of closed connections"
    )


@st.composite
def requests(draw):
    inside = draw(st.booleans())
    npages = draw(st.integers(1, 6))
    off = (
        draw(st.integers(0, 6 - npages)) * PAGE if draw(st.integers(0, 9)) else draw(st.integers(0, 8 * PAGE))
    )
    if inside:
        dst_page = draw(st.integers(0, NPAGES - npages))
        dst = ("in", dst_page)
    else:
        dst = ("out", draw(st.sampled_from([0, PAGE, 2**47 - PAGE, 2**63, 2**64 - PAGE])))
    flags = draw(st.sampled_from([0, 0, 1, 2, 3, 0xFFFFFFFF]))
    return off, npages * PAGE, dst, flags


def test_install_fuzz_matches_a_model(seg):
    """Random INSTALLs into and outside the registered region: every reply
    is what the model says, and at the end each page of the region holds
    exactly what the first successful install into it carried, or zeros."""

    @settings(
        deadline=None,
        derandomize=True,
        database=None,
        max_examples=300,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(requests(), min_size=1, max_size=12))
    def one(reqs):
        c = Consumer()
        peer = RawPeer(seg.path)
        try:
            assert offer(peer, (c.fd,)) == 0
            model = {}
            for tag, (off, ln, (where, d), flags) in enumerate(reqs):
                dst = c.base + d * PAGE if where == "in" else d
                rep = install(peer, seg.id, off, ln, dst, flags=flags, tag=tag)
                if off % PAGE:
                    assert rep["status"] == -errno.EINVAL
                elif off + ln > PADDED:
                    assert rep["status"] == -errno.ERANGE
                elif where == "out" or flags & transport.INSTALL_WP:
                    assert rep["status"] < 0  # not registered (for write-protection)
                else:
                    assert rep["status"] == 0, rep
                    for k in range(ln // PAGE):
                        model.setdefault(d + k, seg.image[off + k * PAGE : off + (k + 1) * PAGE])
            c.unregister()
            for i in range(NPAGES):
                assert c.page(i) == model.get(i, bytes(PAGE)), i
        finally:
            peer.close()
            c.close()

    one()


def test_demand_installs_overtake_read_ahead():
    """A demand INSTALL (no DONTWAKE) queued behind an 8 MiB read-ahead is
    answered first: from the same read, and also when it arrives while the
    read-ahead is being installed (taken between its chunks). Every byte lands
    where it belongs either way."""
    big = np.random.default_rng(5).integers(0, 255, 8 << 20, dtype=np.uint8)
    desc = handler.export_memory(big, big.ctypes.data, big.nbytes)
    image = big.tobytes()
    path = transport.endpoint_path(desc.endpoint)
    try:
        order = []
        for trial in range(12):
            c = Consumer(npages=2 * (8 << 20) // PAGE)
            peer = RawPeer(path)
            try:
                assert offer(peer, (c.fd,)) == 0

                def req(tag, off, ln, dst, flags):
                    return _zmtp_frame(
                        transport.INSTALL_REQUEST.pack(
                            transport.MAGIC,
                            transport.VERSION,
                            transport.OP_INSTALL,
                            0,
                            flags,
                            tag,
                            off,
                            ln,
                            desc.id,
                            dst,
                        )
                    )

                ahead = req(1, 0, 8 << 20, c.base, transport.INSTALL_DONTWAKE)
                demand = req(2, 12 * PAGE, PAGE, c.base + (8 << 20), 0)
                if trial < 6:
                    peer.sock.sendall(ahead + demand)  # one read: the demand is taken first
                else:
                    peer.sock.sendall(ahead)
                    time.sleep(0.0005)  # most likely mid-install
                    peer.sock.sendall(demand)
                tags = []
                for _ in range(2):
                    rep = transport.unpack_reply(peer.recv()[0])
                    assert rep["status"] == 0, rep
                    tags.append(rep["tag"])
                order.append(tags)
                assert ctypes.string_at(c.base + (8 << 20), PAGE) == image[12 * PAGE : 13 * PAGE]
                assert ctypes.string_at(c.base, 8 << 20) == image
            finally:
                peer.close()
                c.close()
        assert order[:6] == [[2, 1]] * 6, order
    finally:
        handler.release(desc)
