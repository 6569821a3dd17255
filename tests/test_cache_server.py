"""The owner's side of a segment's page cache (csrc/cache.c, server.c), in this
process: ls_server_cache makes a sealed memfd of the segment's padded length;
punch and resident account for its pages; it goes with the segment and with a
fork. Then the INSTALL path with LS_INSTALL_CACHED, driven by a raw ZMTP peer
acting as a consumer that maps the memfd privately (as one on this host would,
by /proc/<pid>/fd/<fd>) and registers it with its own userfaultfd: the bytes
land in the cache (never copied into the consumer), a waiting reader is woken,
never-written pages stay holes (zero pages in the consumer)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from _libc import libc
from _zmtp import RawPeer
from conftest import wait_for
from lazyshare._native import ffi, lib

import lazyshare
from lazyshare import handler, transport

pytestmark = pytest.mark.timeout(60)

PAGE = 4096
SEG_LEN = 5 * PAGE + 333
SEG_OFF = 100  # not page-aligned in the owner
PADDED = 6 * PAGE

SYS_userfaultfd = 323  # x86_64
UFFD_USER_MODE_ONLY = 1
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
PROT_RW, MAP_PRIVATE, MAP_ANON_PRIVATE = 3, 0x02, 0x22
MAP_FAILED = ctypes.c_void_p(-1).value

needs_uffd = pytest.mark.skipif(lazyshare.capabilities().mode == "eager", reason="needs userfaultfd")


def stats():
    s = ffi.new("struct ls_stats *")
    lib.ls_get_stats(s)
    return s


def make_cache(seg_id):
    fd, ino = ffi.new("int *"), ffi.new("uint64_t *")
    rc = lib.ls_server_cache(seg_id, fd, ino)
    return rc, fd[0], ino[0]


def punch(seg_id, *ranges):
    flat = [x for r in ranges for x in r]
    return lib.ls_server_cache_punch(seg_id, ffi.new("uint64_t[]", flat or [0]), len(ranges))


def fd_target(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return None


class Seg:
    """A numpy buffer exported at an unaligned address, content random."""

    def __init__(self, nbytes=SEG_LEN):
        self.buf = np.full(SEG_OFF + nbytes + PAGE, 0xEE, dtype=np.uint8)
        self.content = np.random.default_rng(1).integers(0, 0xEE, nbytes, dtype=np.uint8)
        self.buf[SEG_OFF : SEG_OFF + nbytes] = self.content
        self.desc = handler.export_memory(self.buf, self.buf.ctypes.data + SEG_OFF, nbytes)
        self.id = self.desc.id
        self.released = False

    def release(self):
        if not self.released:
            handler.release(self.desc)
            self.released = True


@pytest.fixture
def seg():
    s = Seg()
    yield s
    s.release()


@pytest.fixture
def cached(seg):
    rc, fd, ino = make_cache(seg.id)
    if rc == -errno.EOPNOTSUPP:
        pytest.skip("no userfaultfd for shmem here")
    assert rc == 0
    return seg, fd, ino


def test_the_cache_is_an_empty_sealed_memfd_of_the_padded_length(cached):
    seg, fd, ino = cached
    assert fd_target(fd).startswith("/memfd:lazyshare-cache")
    st = os.fstat(fd)
    assert st.st_size == PADDED and st.st_ino == ino and st.st_blocks == 0
    assert os.stat(f"/proc/self/fd/{fd}").st_ino == ino  # what a consumer checks
    assert lib.ls_server_cache_resident(seg.id) == 0
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    with pytest.raises(PermissionError):  # sealed: no consumer can resize it under the others
        os.ftruncate(fd, PAGE)
    assert os.fstat(fd).st_size == PADDED


def test_one_cache_per_live_segment(cached):
    seg, fd, _ = cached
    assert make_cache(seg.id) == (-errno.EEXIST, -1, 0)
    assert make_cache(os.urandom(16)) == (-errno.ENOENT, -1, 0)
    assert lib.ls_server_cache_resident(os.urandom(16)) == -errno.ENOENT
    assert fd_target(fd).startswith("/memfd:")  # the failed calls left it alone


def test_resident_and_punch(seg):
    assert punch(seg.id, (0, PAGE)) == -errno.ENOENT  # no cache yet
    assert lib.ls_server_cache_resident(seg.id) == -errno.ENOENT
    assert punch(os.urandom(16), (0, PAGE)) == -errno.ENOENT
    rc, fd, _ = make_cache(seg.id)
    if rc == -errno.EOPNOTSUPP:
        pytest.skip("no userfaultfd for shmem here")
    assert rc == 0
    assert punch(seg.id) == 0
    assert punch(seg.id, (0, PAGE)) == 0  # nothing cached: nothing dropped
    for bad in [(0, SEG_LEN + 1), (SEG_LEN + 1, 0), (PAGE, SEG_LEN), (2**64 - PAGE, 2 * PAGE)]:
        assert punch(seg.id, (0, PAGE), bad) == -errno.ERANGE, bad
    # Pages written through the fd stand for cached ones here (the INSTALL
    # path is below); holes are punched by whole pages, widened outwards.
    os.pwrite(fd, b"x" * PADDED, 0)
    assert lib.ls_server_cache_resident(seg.id) == PADDED
    assert punch(seg.id, (PAGE + 1, 1)) == PAGE  # inside page 1: the whole page
    assert punch(seg.id, (PAGE, PAGE)) == 0  # already a hole
    assert punch(seg.id, (3 * PAGE - 1, 2)) == 2 * PAGE  # straddles pages 2 and 3
    assert punch(seg.id, (SEG_LEN - 1, 1)) == PAGE  # the last page, padding included
    assert lib.ls_server_cache_resident(seg.id) == 2 * PAGE
    assert os.pread(fd, PAGE, PAGE) == bytes(PAGE) and os.pread(fd, 1, 0) == b"x"
    assert punch(seg.id, (0, SEG_LEN)) == 2 * PAGE
    assert lib.ls_server_cache_resident(seg.id) == 0
    assert os.fstat(fd).st_size == PADDED  # punching keeps the size


def test_release_frees_the_cache(seg):
    live = stats().caches_live
    rc, fd, ino = make_cache(seg.id)
    if rc == -errno.EOPNOTSUPP:
        pytest.skip("no userfaultfd for shmem here")
    assert rc == 0 and stats().caches_live == live + 1
    seg.release()  # nobody holds it: freed now, its cache with it
    assert stats().caches_live == live
    target = fd_target(fd)
    assert target is None or not target.startswith("/memfd:lazyshare-cache")
    assert make_cache(seg.id)[0] == -errno.ENOENT
    assert punch(seg.id, (0, PAGE)) == -errno.ENOENT
    assert lib.ls_server_cache_resident(seg.id) == -errno.ENOENT


def test_the_cache_lives_as_long_as_a_holder_keeps_the_segment(cached):
    seg, fd, ino = cached
    live = stats().caches_live
    peer = RawPeer(transport.endpoint_path(seg.desc.endpoint))
    try:
        peer.send(transport.pack_request(transport.OP_HOLD, seg.id, tag=1))
        assert transport.unpack_reply(peer.recv()[0])["status"] == 0
        seg.release()  # no longer offered, still mapped by the holder
        assert lib.ls_server_holders(seg.id) == 1
        assert make_cache(seg.id)[0] == -errno.ENOENT  # no new cache for a released segment
        assert lib.ls_server_cache_resident(seg.id) == 0 and os.fstat(fd).st_ino == ino
        assert stats().caches_live == live
    finally:
        peer.close()  # the holder goes: the segment and its cache with it
    assert wait_for(lambda: stats().caches_live == live - 1)
    assert lib.ls_server_cache_resident(seg.id) == -errno.ENOENT


def test_a_forked_child_keeps_no_cache(cached):
    seg, fd, _ = cached
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            lib.ls_reset_after_fork()
            target = fd_target(fd)
            ok = (target is None or "lazyshare-cache" not in target) and stats().caches_live == 0
            ok = ok and lib.ls_server_cache_resident(seg.id) == -errno.ENOENT
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert fd_target(fd).startswith("/memfd:")  # the parent's stays
    assert stats().caches_live >= 1


# ---- INSTALL with LS_INSTALL_CACHED, a consumer in this process ----


class CacheConsumer:
    """The cache memfd mapped privately (through /proc, as another process
    would) and registered MISSING with a userfaultfd of its own. Its pages are
    only read once known present (a hole would wait for a fill)."""

    def __init__(self, cache_fd, length):
        self.uffd = libc.syscall(SYS_userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
        if self.uffd < 0:
            pytest.skip(f"userfaultfd(2) unavailable here: errno {ctypes.get_errno()}")
        fcntl.ioctl(self.uffd, UFFDIO_API, bytearray(struct.pack("<QQQ", 0xAA, 0, 0)))
        fd = os.open(f"/proc/self/fd/{cache_fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.base = libc.mmap(None, length, PROT_RW, MAP_PRIVATE, fd, 0)
        finally:
            os.close(fd)
        assert self.base not in (None, MAP_FAILED)
        self.size = length
        fcntl.ioctl(self.uffd, UFFDIO_REGISTER, bytearray(struct.pack("<QQQQ", self.base, length, 1, 0)))

    def read(self, off, n):
        out = ctypes.create_string_buffer(n)
        ctypes.memmove(out, self.base + off, n)
        return out.raw

    def close(self):
        # Unregistering wakes any reader still waiting (it then reads the memfd).
        fcntl.ioctl(self.uffd, UFFDIO_UNREGISTER, struct.pack("<QQ", self.base, self.size))
        libc.munmap(self.base, self.size)
        os.close(self.uffd)


def install(peer, seg_id, offset, length, dst, flags, tag=7):
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
    rep = transport.unpack_reply(peer.recv()[0])
    assert rep["op"] == transport.OP_INSTALL and rep["tag"] == tag
    return rep


def offer(peer, fd):
    peer.send(transport.pack_request(transport.OP_UFFD, bytes(16)), fds=(fd,))
    return transport.unpack_reply(peer.recv()[0])["status"]


@pytest.fixture
def session(cached):
    seg, fd, _ = cached
    con = CacheConsumer(fd, PADDED)
    peer = RawPeer(transport.endpoint_path(seg.desc.endpoint))
    try:
        assert offer(peer, con.uffd) == 0
        yield seg, fd, con, peer
    finally:
        peer.close()
        con.close()


CACHED, DONTWAKE = lib.LS_INSTALL_CACHED, transport.INSTALL_DONTWAKE


@needs_uffd
def test_cached_read_ahead_fills_the_cache_and_maps_without_a_fault(session):
    seg, fd, con, peer = session
    image = seg.content.tobytes() + bytes(PADDED - SEG_LEN)
    before = stats()
    filled0, served0 = before.cache_bytes_filled, before.requests_served
    rep = install(peer, seg.id, PAGE, 3 * PAGE, con.base + PAGE, CACHED | DONTWAKE)
    assert rep["status"] == 0 and rep["seglen"] == 3 * PAGE
    assert lib.ls_server_cache_resident(seg.id) == 3 * PAGE
    assert os.pread(fd, 3 * PAGE, PAGE) == image[PAGE : 4 * PAGE]
    assert stats().cache_bytes_filled - filled0 == 3 * PAGE
    assert con.read(PAGE, 3 * PAGE) == image[PAGE : 4 * PAGE]  # page cache pages: no fault
    # Overlapping, and the unaligned last page (bytes, then zeros) through the bounce page:
    # the pages already cached are not copied again.
    rep = install(peer, seg.id, 0, PADDED, con.base, CACHED | DONTWAKE)
    assert rep["status"] == 0 and rep["seglen"] == SEG_LEN
    assert stats().cache_bytes_filled - filled0 == PADDED
    assert os.pread(fd, PADDED, 0) == image and con.read(0, PADDED) == image
    assert stats().requests_served - served0 == 2
    # A consumer's write stays its own: the cache never changes.
    ctypes.memset(con.base + 2 * PAGE, 0xAB, 10)
    assert os.pread(fd, 10, 2 * PAGE) == image[2 * PAGE : 2 * PAGE + 10]
    assert punch(seg.id, (0, PAGE)) == PAGE  # dropped: filled again when next asked for


@needs_uffd
def test_another_process_maps_the_cache_by_proc(session):
    seg, fd, con, peer = session
    assert install(peer, seg.id, 0, 2 * PAGE, con.base, CACHED | DONTWAKE)["status"] == 0
    ino = os.fstat(fd).st_ino
    child = textwrap.dedent(f"""
        import mmap, os
        fd = os.open("/proc/{os.getpid()}/fd/{fd}", os.O_RDONLY)
        assert os.fstat(fd).st_ino == {ino}
        m = mmap.mmap(fd, {2 * PAGE}, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        m[0:4] = b"mine"  # copy-on-write: the cache keeps its bytes
        print(m[4:{2 * PAGE}].hex())
    """)
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    assert out.returncode == 0, out.stderr
    assert bytes.fromhex(out.stdout.strip()) == seg.content.tobytes()[4 : 2 * PAGE]
    assert os.pread(fd, 4, 0) == seg.content.tobytes()[:4]


@needs_uffd
def test_cached_install_wakes_a_reader_waiting_on_a_hole(session):
    seg, fd, con, peer = session
    image = seg.content.tobytes()
    got = {}

    def reader():
        got["bytes"] = con.read(4 * PAGE + 5, 100)  # a hole: waits in the kernel, GIL released

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(0.2)
    assert t.is_alive(), "the page should have been missing"
    rep = install(peer, seg.id, 4 * PAGE, PAGE, con.base + 4 * PAGE, CACHED)
    assert rep["status"] == 0
    t.join(10)
    assert not t.is_alive() and got["bytes"] == image[4 * PAGE + 5 : 4 * PAGE + 105]
    assert lib.ls_server_cache_resident(seg.id) == PAGE


@needs_uffd
def test_cached_install_without_a_cache_is_refused(seg):
    con_fd = libc.syscall(SYS_userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
    if con_fd < 0:
        pytest.skip("userfaultfd(2) unavailable here")
    fcntl.ioctl(con_fd, UFFDIO_API, bytearray(struct.pack("<QQQ", 0xAA, 0, 0)))
    peer = RawPeer(transport.endpoint_path(seg.desc.endpoint))
    try:
        assert offer(peer, con_fd) == 0
        assert install(peer, seg.id, 0, PAGE, 1 << 30, CACHED | DONTWAKE)["status"] == -errno.EPROTO
        assert install(peer, seg.id, 0, PAGE, 1 << 30, CACHED)["status"] == -errno.EPROTO
        # the connection stays usable
        peer.send(transport.pack_request(transport.OP_PING, bytes(16)))
        assert transport.unpack_reply(peer.recv()[0])["status"] == 0
    finally:
        peer.close()
        os.close(con_fd)


@needs_uffd
def test_never_written_pages_stay_holes_in_the_cache():
    n = 8
    base = libc.mmap(None, n * PAGE, PROT_RW, MAP_ANON_PRIVATE, -1, 0)
    assert base not in (None, MAP_FAILED)
    try:
        for p in (0, 1, 5):
            ctypes.memset(base + p * PAGE, p + 1, PAGE)
        desc = handler.export_memory(object(), base, n * PAGE)
        try:
            rc, fd, _ = make_cache(desc.id)
            if rc == -errno.EOPNOTSUPP:
                pytest.skip("no userfaultfd for shmem here")
            assert rc == 0
            con = CacheConsumer(fd, n * PAGE)
            peer = RawPeer(transport.endpoint_path(desc.endpoint))
            try:
                assert offer(peer, con.uffd) == 0
                rep = install(peer, desc.id, 0, n * PAGE, con.base, CACHED | DONTWAKE)
                assert rep["status"] == 0
                if rep["seglen"] == n * PAGE:
                    pytest.skip("the owner cannot tell never-written pages here (no pagemap)")
                assert rep["seglen"] == 3 * PAGE
                assert lib.ls_server_cache_resident(desc.id) == 3 * PAGE  # no page spent on zeros
                want = b"".join(bytes([p + 1]) * PAGE if p in (0, 1, 5) else bytes(PAGE) for p in range(n))
                assert con.read(0, n * PAGE) == want  # zero pages in the consumer's mapping
                assert lib.ls_server_cache_resident(desc.id) == 3 * PAGE
            finally:
                peer.close()
                con.close()
        finally:
            handler.release(desc)
    finally:
        libc.munmap(base, n * PAGE)
