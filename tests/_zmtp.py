"""A raw ZMTP 3.0 (NULL mechanism) DEALER on the page server's Unix socket, for
tests that need what a ZeroMQ socket cannot do: malformed byte streams, and
file descriptors passed as SCM_RIGHTS (the consumer's userfaultfd)."""

from __future__ import annotations

import array
import socket
import struct


def greeting() -> bytes:
    g = bytearray(64)
    g[0], g[9], g[10], g[11] = 0xFF, 0x7F, 3, 0
    g[12:16] = b"NULL"
    return bytes(g)


def frame(body: bytes, flags: int = 0) -> bytes:
    if len(body) < 256:
        return bytes([flags, len(body)]) + body
    return bytes([flags | 0x02]) + struct.pack(">Q", len(body)) + body


READY = frame(b"\x05READY\x0bSocket-Type\x00\x00\x00\x06DEALER", 0x04)


class RawPeer:
    """One connection: greeting and READY exchanged, then request/reply."""

    def __init__(self, path: str, timeout: float = 10):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.sock.sendall(greeting() + READY)
        self.buf = b""
        assert self._take(64)[:1] == b"\xff"
        flags, _ = self._frame()
        assert flags & 0x04, "the server's READY"

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _frame(self) -> tuple[int, bytes]:
        flags = self._take(1)[0]
        n = struct.unpack(">Q", self._take(8))[0] if flags & 0x02 else self._take(1)[0]
        return flags, self._take(n)

    def send(self, body: bytes, fds: tuple[int, ...] = ()) -> None:
        data = frame(body)
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.sendall(data)

    def recv(self) -> list[bytes]:
        """The next message (commands skipped), as its frames."""
        msg = []
        while True:
            flags, body = self._frame()
            if flags & 0x04:
                continue
            msg.append(body)
            if not flags & 0x01:
                return msg

    def close(self) -> None:
        self.sock.close()
