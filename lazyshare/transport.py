"""The wire formats of both planes, and the ZeroMQ plumbing they share.

Owns: the socket directory and endpoints, the process's ZeroMQ context, the
page protocol's constants and layouts (read from the compiled header, never
copied), and the pool's control-plane messages (kinds, headers, framing). Run
by whichever thread sends or receives: the pool's dispatcher thread, the
worker's main thread, the tests; the native core speaks the page protocol
itself (csrc/). Nothing here calls the core: ``handler`` is the one module
that does.

Endpoints
    Every socket lazyshare binds is an ``ipc://`` socket file inside one private
    directory per process: ``<base>/p<pid>-<random>/``, mode 0700, where
    ``<base>`` is ``$LAZYSHARE_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/lazyshare``,
    else ``/tmp/lazyshare-<uid>`` (created 0700 and checked to be ours and not a
    symlink). Only the same user can reach them; nothing listens on a network
    interface. The directory is removed at exit, and directories left by dead
    processes are swept the next time a process creates its own.

Page protocol (version 1, little-endian; the constants are those ``#define``'d in
``csrc/lazyshare.h``, the sizes checked against it; the C structs are in ``csrc/internal.h``)
    request, one frame of 56 bytes (client DEALER -> server ROUTER)::

        u32 magic 'LZS1' | u16 version | u16 op | u32 pid | u32 flags
        u64 tag | u64 offset | u64 length | u8[16] segment id

    an INSTALL request is 64 bytes: the same, then ``u64 dst`` (an address in
    the requesting process).

    reply, a 48-byte header frame, then for a successful READ one data frame of
    ``length`` bytes (page-padded with zeros past the segment's end)::

        u32 magic | u16 version | u16 op | i32 status (0 or -errno) | u32 flags
        u64 tag | u64 offset | u64 length | u64 segment length

    A READ reply with flag ZERO (1) has no data frame: the range reads as zeros
    (pages the owner never touched; only for private anonymous memory).

    ops: READ (bytes of a segment), HOLD (a mapping of it now exists in ``pid``),
    RELEASE (that mapping is gone), PING, UFFD and INSTALL. A request the server
    cannot parse gets a reply with ``-EPROTO``; an unknown or released segment
    ``-ENOENT``; a range outside the segment ``-ERANGE``; a too-long read
    ``-EINVAL``.

    UFFD carries the requester's userfaultfd as SCM_RIGHTS ancillary data on the
    Unix socket (``-EBADF`` if none came, or another kind of fd). From then on
    INSTALL asks the owner to ``UFFDIO_COPY`` the range (``offset``, ``length``,
    both page-aligned) from its own memory into the requester's mapping at
    ``dst`` through that userfaultfd, instead of sending it: one copy per byte
    instead of three. Request flags: WP (1) installs write-protected, DONTWAKE
    (2) does not wake faulting threads. The reply has no data frame; its last
    field is the number of bytes copied (the rest were mapped as zero pages),
    and flag ZERO is set if that is 0. A consumer that cannot pass its fd, or
    runs with ``LAZYSHARE_DATA_PATH=wire``, uses READ. No READ asks for more
    than ``MAX_READ`` bytes.

Control plane (the pool's ROUTER in the parent, one DEALER per worker whose
identity is its ``wid``; every receive is bounded by ``POLL_MS``)::

    parent -> worker  TASK, TASK_HDR, *frames      a task (``serialization`` task frames)
                      STOP                         finish and leave
                      ACK                          your READY/BYE/INIT_FAILED arrived
    worker -> parent  READY                        the initializer is done
                      RESULT, RESULT_HDR, *frames  a result (serialization.dumps_result)
                      INIT_FAILED, *frames         the initializer raised (then exits)
                      COUNTERS, COUNTERS_HDR       the counters, settled (idle, after a
                                                   result whose counters were not)
                      BYE, COUNTERS_HDR            leaving (maxtasksperchild or STOP)

    TASK_HDR     u64 job | u64 index | u8 mode (APPLY, MAP or STARMAP)
    RESULT_HDR   u64 job | u64 index | f64 run seconds | COUNTERS_HDR
    COUNTERS_HDR u64 bytes_lazy | u64 faults | u8 settled
                 (cumulative, as the worker's native counters are when it sends
                 them, never after waiting; settled: no page request of the
                 worker was in flight, so they include every page it fetched)
"""

from __future__ import annotations

import atexit
import errno
import os
import secrets
import shutil
import stat
import struct
import threading

import zmq

from . import settings

# The compiled module, for its constants only: transport never calls the native
# core (handler.py is the one module that does).
from ._native import lib

__all__ = [
    "runtime_dir",
    "new_endpoint",
    "context",
    "REQUEST",
    "REPLY",
    "MAGIC",
    "VERSION",
    "OP_READ",
    "OP_HOLD",
    "OP_RELEASE",
    "OP_PING",
    "OP_INSTALL",
    "OP_UFFD",
    "INSTALL_REQUEST",
    "MAX_READ",
    "pack_request",
    "unpack_reply",
]

# ---------------------------------------------------------------- page protocol
MAGIC = lib.LS_MAGIC  # b"LZS1" little-endian
VERSION = lib.LS_VERSION
OP_READ = lib.LS_OP_READ
OP_HOLD = lib.LS_OP_HOLD
OP_RELEASE = lib.LS_OP_RELEASE
OP_PING = lib.LS_OP_PING
OP_INSTALL = lib.LS_OP_INSTALL
OP_UFFD = lib.LS_OP_UFFD
FLAG_ZERO = lib.LS_REP_ZERO
INSTALL_WP, INSTALL_DONTWAKE = lib.LS_INSTALL_WP, lib.LS_INSTALL_DONTWAKE
MAX_READ = lib.LS_MAX_READ
REQUEST = struct.Struct("<IHHIIQQQ16s")
INSTALL_REQUEST = struct.Struct("<IHHIIQQQ16sQ")
REPLY = struct.Struct("<IHHiIQQQQ")
if (REQUEST.size, INSTALL_REQUEST.size, REPLY.size) != (
    lib.LS_REQ_BYTES,
    lib.LS_REQ_INSTALL_BYTES,
    lib.LS_REP_BYTES,
):
    raise ImportError("lazyshare.transport: the page protocol layouts differ from the compiled core's")


def pack_request(
    op: int, seg: bytes, offset: int = 0, length: int = 0, tag: int = 0, pid: int | None = None
) -> bytes:
    return REQUEST.pack(MAGIC, VERSION, op, os.getpid() if pid is None else pid, 0, tag, offset, length, seg)


def unpack_reply(frame: bytes) -> dict:
    magic, version, op, status, flags, tag, offset, length, seglen = REPLY.unpack(frame)
    return dict(
        magic=magic,
        version=version,
        op=op,
        status=status,
        flags=flags,
        tag=tag,
        offset=offset,
        length=length,
        seglen=seglen,
    )


# ---------------------------------------------------------------- control plane
TASK, STOP, ACK = b"T", b"S", b"A"
READY, RESULT, INIT_FAILED, BYE, COUNTERS = b"R", b"D", b"I", b"B", b"C"
TASK_HDR = struct.Struct("<QQB")  # job, index, mode
RESULT_HDR = struct.Struct("<QQdQQ?")  # job, index, run seconds, bytes_lazy, faults, settled
COUNTERS_HDR = struct.Struct("<QQ?")  # bytes_lazy, faults (cumulative), settled
APPLY, MAP, STARMAP = 0, 1, 2  # TASK_HDR's mode: func(*args, **kwds), map(func, chunk), starmap
#: Poll timeout of the dispatcher, the feeder and the worker loop: every wait is bounded.
POLL_MS = 1000
#: Frames at least this big are sent zero-copy (pyzmq's own copy_threshold):
#: libzmq's I/O thread then reads them with send(2), a kernel-mode read.
ZERO_COPY = 65536
NOBLOCK = int(zmq.NOBLOCK)

# pyzmq's Python-level send_multipart/recv_multipart cost ~21 us per 5-frame round
# trip (enum flag arithmetic, a getsockopt per part); the Cython methods ~7 us.
_send_frame = zmq.backend.Socket.send
_recv_frame = zmq.backend.Socket.recv
_SNDMORE = int(zmq.SNDMORE)


def send(sock, parts: list) -> None:
    """Send a multipart message; raises zmq.ZMQError (EHOSTUNREACH on a ROUTER)."""
    last = len(parts) - 1
    for i, part in enumerate(parts):
        _send_frame(sock, part, _SNDMORE if i < last else 0, len(part) < ZERO_COPY)


def recv(sock, flags: int = 0) -> list:
    """Receive a multipart message as zmq.Frame objects (writable buffers)."""
    frame = _recv_frame(sock, flags, False)
    parts = [frame]
    while frame.more:
        frame = _recv_frame(sock, 0, False)
        parts.append(frame)
    return parts


# ---------------------------------------------------------------- endpoints
_lock = threading.Lock()
_dir: str | None = None
_dir_pid: int | None = None


def _base_dir() -> str:
    base = settings.read().runtime_dir
    if not base:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        base = (
            os.path.join(xdg, "lazyshare") if xdg and os.path.isdir(xdg) else f"/tmp/lazyshare-{os.getuid()}"
        )
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(
            f"lazyshare runtime directory {base!r} must be a directory owned by uid {os.getuid()} "
            f"with mode 0700 (set LAZYSHARE_RUNTIME_DIR to use another)"
        )
    return base


def _sweep(base: str) -> None:
    """Remove directories left by processes that died without cleaning up."""
    for name in os.listdir(base):
        if not name.startswith("p") or "-" not in name:
            continue
        try:
            pid = int(name[1:].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        except PermissionError:
            pass


def runtime_dir() -> str:
    """This process's private socket directory (created on first use)."""
    global _dir, _dir_pid
    with _lock:
        if _dir is None or _dir_pid != os.getpid():
            base = _base_dir()
            _sweep(base)
            path = os.path.join(base, f"p{os.getpid()}-{secrets.token_hex(4)}")
            os.mkdir(path, 0o700)
            _dir, _dir_pid = path, os.getpid()
            atexit.register(_remove_dir, path, os.getpid())
        return _dir


def _remove_dir(path: str, pid: int) -> None:
    if os.getpid() == pid:
        shutil.rmtree(path, ignore_errors=True)


def new_endpoint(name: str) -> str:
    """A fresh ``ipc://`` endpoint in the private directory."""
    path = os.path.join(runtime_dir(), f"{name}-{secrets.token_hex(4)}.sock")
    if len(path.encode()) > 107:  # sun_path limit
        raise OSError(
            errno.ENAMETOOLONG, f"socket path too long: {path!r}; set LAZYSHARE_RUNTIME_DIR shorter"
        )
    return "ipc://" + path


def endpoint_path(endpoint: str) -> str:
    assert endpoint.startswith("ipc://")
    return endpoint[len("ipc://") :]


def context() -> zmq.Context:
    """The process's ZeroMQ context for Python sockets (re-created after fork)."""
    return zmq.Context.instance()
