"""Links between hosts: the page protocol over TCP, in TLS 1.3 with both ends
authenticated (``csrc/link.c``).

Owns: finding and loading the OpenSSL that Python's own :mod:`ssl` module
loaded, the certificate files the native side reads, the owner's listener
(:func:`serve`) and the consumer's local end of each link (:func:`endpoint_for`).
Nothing here is on the fault path: the native "lazyshare-link" threads relay
bytes without Python, so a faulting thread that holds the GIL never waits for
it.

How a link works
    The owner's page server and the consumer's fault handler are the ones every
    local consumer uses; they speak the page protocol over a Unix socket. On
    the owner's host a listener accepts TCP connections, completes a TLS 1.3
    handshake that demands a certificate signed by the cluster's CA, and
    relays the connection to the page server. On the consumer's host, the
    fault handler connects to a private Unix socket whose link makes the TCP
    connection and the same handshake (it checks the owner's certificate
    against the same CA). Pages travel as READ replies, never installed by the
    owner: that needs the consumer's userfaultfd, which does not cross hosts.

Liveness
    Every TCP connection has ``TCP_USER_TIMEOUT`` and keepalive set from
    ``LAZYSHARE_LINK_TIMEOUT`` (default 10 s): a peer that dies or a link that
    goes down ends the connection within that time plus about a quarter of
    it, with a line on stderr naming the peer. A consumer that loses its owner
    mid-fault dies with SIGBUS and a message, as it does for a local owner; an
    owner that loses a consumer drops that consumer's holds.
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import os
import secrets
import ssl  # noqa: F401 (loads the OpenSSL this module then finds in the process's maps)
import threading

from . import settings, transport
from ._native import ffi, lib
from .errors import LinkError

__all__ = ["TLS", "Listener", "serve", "probe", "endpoint_for", "openssl"]

_lock = threading.Lock()
_loaded: tuple[str, str] | None = None


def _loaded_libraries() -> dict[str, str]:
    """The OpenSSL libraries mapped into this process (by Python's ssl module)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1] if "/" in line else ""
                name = os.path.basename(path)
                for lib_name in ("libssl", "libcrypto"):
                    if name.startswith(lib_name + ".so") and lib_name not in found:
                        found[lib_name] = path
    except OSError:
        pass
    return found


def openssl() -> tuple[str, str]:
    """Load OpenSSL into the native core once: (libcrypto, libssl) paths.

    The libraries are those Python's ``ssl`` module uses (found in
    ``/proc/self/maps``), else the system's. :class:`LinkError` if there are
    none or they lack what TLS 1.3 needs."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        found = _loaded_libraries()
        crypto = found.get("libcrypto") or ctypes.util.find_library("crypto")
        libssl = found.get("libssl") or ctypes.util.find_library("ssl")
        if not crypto or not libssl:
            raise LinkError(
                "TLS links need OpenSSL's libssl and libcrypto, and this Python's ssl module "
                "does not load them as shared libraries"
            )
        err = ffi.new("char[]", 512)
        rc = lib.ls_tls_load(crypto.encode(), libssl.encode(), err, 512)
        if rc < 0:
            raise LinkError(ffi.string(err).decode(errors="replace"))
        _loaded = (crypto, libssl)
        return _loaded


@dataclasses.dataclass(frozen=True)
class TLS:
    """One end's credentials: the CA that signs every peer, and this end's
    certificate and key. Each is PEM text or the path of a PEM file, as in
    :class:`distributed.Security`."""

    ca: str
    cert: str
    key: str

    @classmethod
    def from_security(cls, security, role: str) -> TLS | None:
        """The credentials a ``distributed.Security`` gives ``role`` (``"client"``,
        ``"worker"`` or ``"scheduler"``), or None if it has none."""
        ca = getattr(security, "tls_ca_file", None)
        cert = getattr(security, f"tls_{role}_cert", None)
        key = getattr(security, f"tls_{role}_key", None) or cert  # a combined PEM file
        if not (ca and cert and key):
            return None
        return cls(ca, cert, key)

    def __repr__(self) -> str:  # never the key
        return "TLS(...)"


_files: dict[tuple[int, TLS], tuple[str, str, str]] = {}


def _paths(tls: TLS) -> tuple[str, str, str]:
    """File paths for the native side: PEM text goes to files (0600) in this
    process's private runtime directory, removed with it at exit."""
    key = (os.getpid(), tls)
    with _lock:
        if key in _files:
            return _files[key]
        out = []
        for kind, value in (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)):
            if "-----BEGIN" in value:
                path = os.path.join(transport.runtime_dir(), f"tls-{kind}-{secrets.token_hex(4)}.pem")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(value)
                out.append(path)
            elif os.path.isfile(value):
                out.append(value)
            else:
                raise LinkError(f"the TLS {kind} {value!r} is neither PEM text nor a readable file")
        _files[key] = (out[0], out[1], out[2])
        return _files[key]


def _config(tls: TLS | None, timeout: float | None):
    """The native config, and the buffers it points into (keep them alive)."""
    if timeout is None:
        timeout = settings.read().link_timeout
    keep = []
    cfg = ffi.new("struct ls_link_config *")
    cfg.timeout_ms = max(100, int(timeout * 1000))
    if tls is not None:
        openssl()
        cfg.tls = 1
        for field, path in zip(("ca_file", "cert_file", "key_file"), _paths(tls)):
            buf = ffi.new("char[]", path.encode())
            keep.append(buf)
            setattr(cfg, field, buf)
    return cfg, keep


def _error(err) -> str:
    return ffi.string(err).decode(errors="replace")


class Listener:
    """An owner's listener: TCP connections that authenticate are relayed to
    this process's page server."""

    def __init__(self, link_id: int, host: str, port: int, tls: bool):
        self.id, self.host, self.port, self.tls = link_id, host, port, tls
        self._closed = False

    def stats(self) -> dict:
        """accepted, refused (failed handshakes), bytes_in, bytes_out, broken."""
        st = ffi.new("struct ls_link_stats *")
        if lib.ls_link_stats(self.id, st) < 0:
            return dict.fromkeys(("accepted", "refused", "bytes_in", "bytes_out", "broken"), 0)
        return {k: getattr(st, k) for k in ("accepted", "refused", "bytes_in", "bytes_out", "broken")}

    def close(self) -> None:
        """Stop accepting; the connections open now end within a second (their
        consumers' holds are dropped)."""
        if not self._closed:
            self._closed = True
            lib.ls_link_stop(self.id)

    def __repr__(self) -> str:
        return f"<lazyshare.link.Listener {self.host}:{self.port} {'tls' if self.tls else 'PLAINTEXT'}>"


def serve(host: str = "", port: int = 0, tls: TLS | None = None, timeout: float | None = None) -> Listener:
    """Listen on ``host:port`` (``""``: every interface; port 0: any free one)
    for consumers on other hosts. ``tls=None`` serves plaintext: only for a
    network you trust, or tests."""
    from . import handler

    target = transport.endpoint_path(handler._ensure_server())
    cfg, _keep = _config(tls, timeout)
    err = ffi.new("char[]", 512)
    port_out = ffi.new("int *")
    rc = lib.ls_link_serve(host.encode(), port, target.encode(), cfg, port_out, err, 512)
    if rc < 0:
        raise LinkError(_error(err))
    return Listener(rc, host, port_out[0], tls is not None)


def probe(host: str, port: int, tls: TLS | None = None, timeout: float | None = None) -> None:
    """Connect to an owner's listener, authenticate both ways and wait for its
    page server's greeting. :class:`LinkError` with the reason if any step fails."""
    cfg, _keep = _config(tls, timeout)
    err = ffi.new("char[]", 512)
    if lib.ls_link_probe(host.encode(), port, cfg, err, 512) < 0:
        raise LinkError(_error(err))


_endpoints: dict[tuple, str] = {}


def endpoint_for(host: str, port: int, tls: TLS | None = None, timeout: float | None = None) -> str:
    """The local ``ipc://`` endpoint through which this process reaches the
    owner listening at ``host:port``: made once per process and owner, after a
    :func:`probe` that says why if it cannot be reached or refuses us."""
    key = (os.getpid(), host, port, tls)
    with _lock:
        ep = _endpoints.get(key)
    if ep is not None:
        return ep
    probe(host, port, tls, timeout)
    cfg, _keep = _config(tls, timeout)
    ep = transport.new_endpoint(f"link-{port}")
    err = ffi.new("char[]", 512)
    rc = lib.ls_link_connect(transport.endpoint_path(ep).encode(), host.encode(), port, cfg, err, 512)
    if rc < 0:
        raise LinkError(_error(err))
    with _lock:
        return _endpoints.setdefault(key, ep)
