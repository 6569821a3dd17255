"""Lazy arrays for tasks on Dask distributed: workers map the client's arrays
as missing pages and fetch only what their tasks touch.

::

    from distributed import Client
    import lazyshare.dask

    client = Client(...)
    lazyshare.dask.install(client)           # the one added line
    futs = client.map(score, [big] * 16, range(16))   # big is never pickled

Owns: the owner registry in the client process (what is shared, for how long),
the handle that stands for an array in a task graph (:class:`SharedArray`),
the worker plugin, and the wrappers that :func:`install` puts on one client's
``submit`` and ``map``. The pages themselves move through the same native
handler and page server as in a :class:`lazyshare.Pool`: over the owner's Unix
socket when worker and client share a host, else over a :mod:`lazyshare.link`
(TCP, TLS 1.3 with the cluster's own certificates, both ends verified).

Requires ``pip install 'lazyshare[dask]'`` (dask and distributed 2025.1 or
newer: the handle is a ``dask._task_spec.Task`` node, which is resolved only
where the task runs, never on the scheduler). The scheduler and the workers
must be able to import lazyshare, as for any type in a task's arguments.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import warnings
import weakref
from typing import Any

import numpy as np
from dask._task_spec import Task
from distributed.diagnostics.plugin import WorkerPlugin

from . import handler, link, settings
from .errors import LinkError, SegmentError
from .handler import ArrayDescriptor, LazyshareWarning, SegmentDescriptor
from .serialization import DEFAULT_THRESHOLD

__all__ = ["install", "uninstall", "share", "SharedArray", "stats"]


# ---------------------------------------------------------------- node identity


def _node() -> str:
    """This host and mount namespace: processes with the same node reach each
    other's socket files (network namespaces do not matter to Unix sockets)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        mnt = os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return f"{socket.gethostname()}:?"
    return f"{boot}:{mnt}"


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What a worker needs to map a shared array: small, plain, picklable."""

    seg: bytes
    seg_nbytes: int
    offset: int
    shape: tuple
    strides: tuple
    dtype: Any
    endpoint: str  # the owner's page server (ipc://), for workers on its node
    pid: int
    node: str
    addr: tuple | None  # (host, port) of the owner's link, or None: this node only
    tls: bool
    tcp: bool  # always use the link (tests; LAZYSHARE_LINK=tcp on the worker does the same)
    keeper: int = 0  # the process whose handles and futures keep it shared (0: pid)
    node_of_keeper: str = ""

    def kept_here(self) -> bool:
        return (self.keeper or self.pid) == os.getpid() and (self.node_of_keeper or self.node) == _node()

    def __repr__(self) -> str:
        where = f"{self.addr[0]}:{self.addr[1]}" if self.addr else "this host only"
        return f"<{self.seg.hex()[:8]} {self.shape} {np.dtype(self.dtype)} from pid {self.pid}, {where}>"


# ---------------------------------------------------------------- the owner (client process)


class _Entry:
    __slots__ = ("desc", "array", "handles", "holds", "released", "pushed")

    def __init__(self, desc: ArrayDescriptor | None, array: np.ndarray, pushed=None):
        self.desc, self.array = desc, array
        self.pushed = pushed  # (client, scattered future, worker address): served by that worker
        self.handles = 0  # live SharedArray objects in this process
        self.holds = 0  # live futures built from them (install's wrappers)
        self.released = False


def _exported(desc: ArrayDescriptor) -> dict:
    """The _Spec fields that an export in this process gives."""
    seg = desc.segment
    return dict(
        seg=seg.id,
        seg_nbytes=seg.nbytes,
        offset=desc.offset,
        shape=tuple(desc.shape),
        strides=tuple(desc.strides),
        dtype=np.dtype(desc.dtype),
        endpoint=seg.endpoint,
        pid=seg.owner_pid,
        node=_node(),
    )


def _shareable(array) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype.hasobject:
        raise TypeError("lazyshare.dask.share: arrays of Python objects cannot be shared (pickle them)")
    if arr.size == 0:
        raise ValueError("lazyshare.dask.share: a zero-size array has nothing to share")
    return arr


class _Owner:
    """The client process's side: its listener and what it shares."""

    def __init__(self):
        self.lock = threading.RLock()
        self.entries: dict[bytes, _Entry] = {}
        self.listener: link.Listener | None = None
        self.tls = False
        self.tcp = False
        self.auto: dict[int, tuple] = {}  # id(array) -> (array ref, spec, mode): install's shares
        self.push_to = None  # the client whose workers get arrays pushed (they cannot reach us)
        self.insecure = False

    def addr(self) -> tuple | None:
        return (self.listener.host, self.listener.port) if self.listener else None

    def share(self, array: np.ndarray) -> SharedArray:
        arr = _shareable(array)
        desc = handler.export(arr)
        spec = _Spec(**_exported(desc), addr=self.addr(), tls=self.tls, tcp=self.tcp)
        with self.lock:
            self.entries[spec.seg] = _Entry(desc, arr)
        return SharedArray(None, _attach, spec)

    def mode(self) -> tuple:
        return (
            ("push", id(self.push_to))
            if self.push_to is not None
            else ("own", self.addr(), self.tls, self.tcp)
        )

    def push(self, client, array: np.ndarray) -> SharedArray:
        """Scatter array once to one worker, which serves its pages to the others."""
        arr = _shareable(array)
        workers = sorted(client.scheduler_info()["workers"])
        if not workers:
            raise LinkError("no worker to push the array to")
        worker = workers[0]
        fut = client.scatter(arr, workers=[worker], hash=False)
        kw = client.run(_serve_pushed, fut.key, self.insecure, workers=[worker])[worker]
        spec = _Spec(**kw, tcp=self.tcp, keeper=os.getpid(), node_of_keeper=_node())
        with self.lock:
            self.entries[spec.seg] = _Entry(None, arr, pushed=(client, fut, worker))
        return SharedArray(None, _attach, spec)

    def count(self, seg: bytes, field: str, delta: int) -> None:
        with self.lock:
            e = self.entries.get(seg)
            if e is None:
                return
            setattr(e, field, getattr(e, field) + delta)
            if e.handles <= 0 and e.holds <= 0:
                self._release(seg)

    def _release(self, seg: bytes) -> None:
        e = self.entries.pop(seg, None)
        if e is not None and not e.released:
            e.released = True
            try:
                if e.pushed is not None:
                    # From a thread of its own: this may run in a finalizer on the
                    # client's event loop, where a blocking call would deadlock.
                    client, _fut, worker = e.pushed  # the scattered copy goes with the entry
                    if client.status == "running":
                        threading.Thread(
                            target=client.run,
                            args=(_unserve, seg),
                            kwargs={"workers": [worker]},
                            daemon=True,
                        ).start()
                else:
                    handler.release(e.desc)
            except Exception:  # interpreter shutting down, or released by hand
                pass

    def release(self, seg: bytes) -> None:
        with self.lock:
            self._release(seg)


_owner = _Owner()
_owner_pid = os.getpid()


def _the_owner() -> _Owner:
    global _owner, _owner_pid
    if _owner_pid != os.getpid():  # a forked child owns nothing of its parent's
        _owner, _owner_pid = _Owner(), os.getpid()
    return _owner


class SharedArray(Task):
    """Stands for a numpy array in ``client.submit``, ``client.map`` and
    ``dask.delayed`` arguments, nested at any depth: where the task runs, it
    is the array, mapped lazily from the client. Made by :func:`share`.

    It is a ``dask._task_spec.Task`` node: the scheduler only carries it (a
    few hundred bytes), and a worker resolves it when it runs the task.
    ``tokenize`` names the segment, never hashes the bytes. The array stays
    shared while a handle or a future that :func:`install`'s wrappers built
    from it is alive, until :meth:`release`, or until a ``with`` block on the
    handle ends."""

    __slots__ = ("_owned",)

    def __init__(self, key, func, /, *args, **kwargs):
        super().__init__(key, func, *args, **kwargs)
        self._owned = False
        spec = args[0] if args else None
        if isinstance(spec, _Spec) and spec.kept_here():
            self._owned = True
            _the_owner().count(spec.seg, "handles", +1)

    def __setstate__(self, state):
        # An unpickled copy (the scheduler's, or a worker's) keeps nothing
        # shared, even in the owner's process (a LocalCluster's scheduler).
        super().__setstate__(state)
        self._owned = False

    def __del__(self):
        try:
            if self._owned:
                self._owned = False
                _the_owner().count(self.args[0].seg, "handles", -1)
        except Exception:  # interpreter shutdown, or a half-built object
            pass

    @property
    def spec(self) -> _Spec:
        return self.args[0]

    @property
    def shape(self) -> tuple:
        return self.spec.shape

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.spec.dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def array(self) -> np.ndarray:
        """The array itself (in the process that shared it)."""
        e = _the_owner().entries.get(self.spec.seg)
        if e is None:
            raise SegmentError("this SharedArray was released, or belongs to another process")
        return e.array

    def release(self) -> None:
        """Stop sharing now. Tasks that have not mapped the array yet fail
        with :class:`lazyshare.SegmentError`; mappings made already keep
        working until their tasks end."""
        if self.spec.kept_here():
            _the_owner().release(self.spec.seg)

    def __enter__(self) -> SharedArray:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __dask_tokenize__(self):
        s = self.spec
        return ("lazyshare.SharedArray", s.seg.hex(), s.offset, s.shape, s.strides, str(s.dtype))

    def _get_token(self) -> str:
        from dask.base import tokenize

        return tokenize(self.__dask_tokenize__())

    def __repr__(self) -> str:
        return f"<lazyshare.dask.SharedArray {self.spec!r}>"


def share(array: np.ndarray, *, push: bool = False, client=None) -> SharedArray:
    """A handle that stands for ``array`` in task arguments (see
    :class:`SharedArray`). Works without :func:`install` for workers on this
    host; workers on other hosts need the link that :func:`install` starts.
    As with a :class:`lazyshare.Pool`, do not write to the array while tasks
    may still read it.

    ``push=True`` is for workers that cannot reach this process (a client
    behind NAT): the array goes once, whole, to one worker of ``client``
    (default: the current one) through Dask's own connection, and that worker
    serves its pages to the others over its own link. The copy there is
    dropped when the handle is released."""
    if push:
        if client is None:
            from distributed import get_client

            client = get_client()
        return _the_owner().push(client, array)
    return _the_owner().share(array)


def stats() -> dict:
    """The owner's link: ``accepted``, ``refused`` (failed handshakes),
    ``bytes_in``, ``bytes_out``, ``broken``; and ``shared`` (arrays shared now)."""
    o = _the_owner()
    out = o.listener.stats() if o.listener else {}
    out["shared"] = len(o.entries)
    return out


# ---------------------------------------------------------------- the worker side


def _worker_tls(worker=None) -> link.TLS | None:
    if worker is None:
        try:
            from distributed import get_worker

            worker = get_worker()
        except ValueError:  # not in a worker
            return None
    return link.TLS.from_security(worker.security, "worker")


def _attach(spec: _Spec) -> np.ndarray:
    """Resolve a SharedArray where the task runs."""
    if spec.pid == os.getpid() and spec.node == _node():  # a thread of the client process itself
        e = _the_owner().entries.get(spec.seg)
        if e is None:
            raise SegmentError(f"shared array {spec!r} was released before its task ran")
        return e.array
    local = _local(spec.node, spec.endpoint, spec.tcp)
    if local:
        seg = SegmentDescriptor(spec.seg, spec.seg_nbytes, spec.endpoint, spec.pid)
    else:
        if spec.addr is None:
            raise LinkError(
                f"shared array {spec!r} lives on another host, and its owner offers no link: "
                "call lazyshare.dask.install(client) there (an unencrypted cluster also needs "
                "insecure=True)"
            )
        tls = None
        if spec.tls:
            tls = _worker_tls()
            if tls is None:
                raise LinkError(
                    f"the owner of {spec!r} requires TLS, and this worker has no TLS credentials "
                    "(distributed.Security)"
                )
        seg = SegmentDescriptor(spec.seg, spec.seg_nbytes, link.endpoint_for(*spec.addr, tls), 0)
    return handler.attach(ArrayDescriptor(seg, spec.offset, spec.shape, spec.strides, spec.dtype))


_worker_listener: tuple | None = None  # (pid, Listener): this worker's link, for pushed arrays


def _serve_pushed(key, insecure: bool, dask_worker=None) -> dict:
    """On the worker a pushed array was scattered to: export it and serve it
    to the other workers over this worker's own link."""
    global _worker_listener
    arr = np.asarray(dask_worker.data[key])
    tls = _worker_tls(dask_worker)
    addr = None  # without TLS (and no insecure=True), workers on this host only
    if tls is not None or insecure:
        if _worker_listener is None or _worker_listener[0] != os.getpid():
            host = dask_worker.address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
            _worker_listener = (os.getpid(), link.serve(host, 0, tls))
        addr = (_worker_listener[1].host, _worker_listener[1].port)
    desc = handler.export(arr)
    o = _the_owner()
    with o.lock:
        o.entries[desc.segment.id] = _Entry(desc, arr)  # until _unserve
    return dict(_exported(desc), addr=addr, tls=tls is not None)


def _unserve(seg: bytes, dask_worker=None) -> None:
    _the_owner().release(seg)


def _lazy(a: np.ndarray) -> bool:
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(a, handler._Mapping)


class _CopyResult:
    """Calls func; a result that aliases lazy memory is copied, so Dask stores
    (and may spill or send) plain memory that no owner has to keep serving."""

    def __init__(self, func):
        self.func = func
        self.__name__ = getattr(func, "__name__", type(func).__name__)
        self.__qualname__ = getattr(func, "__qualname__", self.__name__)
        self.__module__ = getattr(func, "__module__", None)

    def __call__(self, *args, **kwargs):
        out = self.func(*args, **kwargs)
        if isinstance(out, np.ndarray) and _lazy(out):
            return out.copy()
        if isinstance(out, (tuple, list)) and any(isinstance(x, np.ndarray) and _lazy(x) for x in out):
            return type(out)(x.copy() if isinstance(x, np.ndarray) and _lazy(x) else x for x in out)
        return out

    def __dask_tokenize__(self):
        from dask.base import tokenize

        return ("lazyshare._CopyResult", tokenize(self.func))

    def __reduce__(self):
        return (_CopyResult, (self.func,))


class _WorkerSetup(WorkerPlugin):
    """Worker plugin: start the native fault handler in every worker process,
    current and future, and keep its capability rung where :func:`install`
    reads it."""

    idempotent = True
    name = "lazyshare"

    def setup(self, worker=None):
        caps = handler._ensure_client()
        if worker is not None:
            worker._lazyshare_rung = caps.mode


def _local(node: str, endpoint: str, tcp: bool) -> bool:
    """Whether the owner's page server is reachable here over its Unix socket:
    the same node, not forced onto the link, and a socket this user may use (a
    worker of another user on the same host takes the link)."""
    if node != _node() or tcp or settings.read().link == "tcp":
        return False
    from . import transport

    return os.access(transport.endpoint_path(endpoint), os.W_OK)


def _worker_report(
    addr, tls_required: bool, node: str, tcp: bool, endpoint: str = "", dask_worker=None
) -> dict:
    caps = handler._ensure_client()
    out = {"rung": caps.mode, "reason": caps.reason, "path": None, "error": None}
    if _local(node, endpoint, tcp):
        out["path"] = "ipc"
        return out
    if addr is None:
        out["error"] = "the client offers no link (the cluster is not encrypted: install(insecure=True))"
        return out
    tls = _worker_tls(dask_worker) if tls_required else None
    if tls_required and tls is None:
        out["error"] = "this worker has no TLS credentials (distributed.Security)"
        return out
    try:
        link.probe(addr[0], addr[1], tls)
        out["path"] = "tls" if tls_required else "tcp (plaintext)"
    except LinkError as e:
        out["error"] = str(e)
    return out


# ---------------------------------------------------------------- install


def _reachable_host(client) -> str:
    """The address of this host that the scheduler's network reaches (workers
    are on it too)."""
    addr = getattr(getattr(client, "scheduler", None), "address", "") or ""
    hostport = addr.split("://", 1)[-1]
    host = hostport.rsplit(":", 1)[0].strip("[]")
    if not host or addr.startswith("inproc"):
        return "127.0.0.1"
    try:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return host


_SUBMIT_OPTIONS = frozenset(
    (
        "key",
        "workers",
        "resources",
        "retries",
        "priority",
        "fifo_timeout",
        "allow_other_workers",
        "actor",
        "actors",
        "pure",
        "batch_size",
    )
)


def _share_deep(obj, threshold: int, holds: list, depth: int = 0):
    """obj with every numpy array of at least threshold bytes (in lists,
    tuples, dicts and sets, at any depth) replaced by a SharedArray."""
    if isinstance(obj, np.ndarray):
        if type(obj) is not np.ndarray or obj.nbytes < threshold or obj.dtype.hasobject or obj.size == 0:
            return obj  # subclasses (masked, matrix) keep their own pickling
        h = _auto_handle(obj)
        holds.append(h)
        return h
    if depth > 32:
        return obj
    t = type(obj)
    if t in (list, tuple, set, frozenset):
        items = [_share_deep(x, threshold, holds, depth + 1) for x in obj]
        return t(items)
    if t is dict:
        return {k: _share_deep(v, threshold, holds, depth + 1) for k, v in obj.items()}
    return obj


def _auto_handle(arr: np.ndarray) -> SharedArray:
    """A handle for arr, reusing its segment while futures built on it live
    (they, not the handle, keep it shared: see _hold)."""
    o = _the_owner()
    with o.lock:
        mode = o.mode()
        hit = o.auto.get(id(arr))
        if hit is not None and hit[0]() is arr and hit[1].seg in o.entries and hit[2] == mode:
            return SharedArray(None, _attach, hit[1])
        h = o.push(o.push_to, arr) if o.push_to is not None else o.share(arr)
        key = id(arr)
        o.auto[key] = (weakref.ref(arr, lambda _r, k=key: o.auto.pop(k, None)), h.spec, mode)
        return h


def _hold(fut, holds: list) -> None:
    segs = {h.spec.seg for h in holds}
    o = _the_owner()
    for seg in segs:
        o.count(seg, "holds", +1)
    weakref.finalize(fut, _unhold, segs)


def _unhold(segs) -> None:
    o = _the_owner()
    for seg in segs:
        o.count(seg, "holds", -1)


def install(
    client,
    *,
    share_above: int | None = DEFAULT_THRESHOLD,
    host: str | None = None,
    port: int = 0,
    insecure: bool = False,
    transport: str = "auto",
    push: bool | str = "auto",
) -> dict:
    """Make ``client``'s tasks map big arrays lazily. Returns, per worker, its
    capability ``rung`` and the ``path`` its pages take (``ipc``, ``tls``) or
    the ``error`` that stops it.

    - Registers a worker plugin: every worker process, current and future,
      starts its native fault handler.
    - Starts this process's link for workers on other hosts: TCP on ``host``
      (default: this host's address on the scheduler's network) and ``port``
      (default: any), in TLS 1.3 with the certificates of ``client.security``;
      every worker must present one signed by the same CA. A cluster without
      encryption gets no link unless ``insecure=True`` (plaintext: only on a
      network you trust, or for tests).
    - Wraps this client's ``submit`` and ``map`` (this client only; pickling
      elsewhere is unchanged): numpy arrays of at least ``share_above`` bytes
      anywhere in the arguments (lists, tuples, dicts, sets) are shared, and a
      result that aliases lazy memory is copied before Dask keeps it.
      ``share_above=None`` wraps nothing; :func:`share` still works.
    - Checks that each worker can reach this process and warns
      (:class:`lazyshare.LazyshareWarning`) naming the reason if one cannot
      (a client behind NAT, a firewall, a certificate from another CA).

    ``transport="tcp"`` sends pages over the link even to workers on this
    host (as ``LAZYSHARE_LINK=tcp`` does on a worker).

    ``push``: where workers cannot reach this process, ``"auto"`` (default)
    has the wrappers push each shared array once to one worker, which serves
    its pages to the others (see :func:`share`); ``True`` always does;
    ``False`` never does (tasks on those workers then fail with the reason).
    """
    if transport not in ("auto", "tcp"):
        raise ValueError(f"transport={transport!r}: expected 'auto' or 'tcp'")
    if push not in ("auto", True, False):
        raise ValueError(f"push={push!r}: expected 'auto', True or False")
    o = _the_owner()
    tls = link.TLS.from_security(client.security, "client")
    with o.lock:
        o.tcp = transport == "tcp"
        o.insecure = insecure
        o.push_to = client if push is True else None
        if o.listener is None:
            if tls is None and not insecure:
                if getattr(client.security, "require_encryption", False):
                    raise LinkError("the cluster requires encryption, but the client has no TLS credentials")
            elif tls is not None or insecure:
                o.listener = link.serve(host or _reachable_host(client), port, tls)
                o.tls = tls is not None
    client.register_plugin(_WorkerSetup(), name="lazyshare")
    report = client.run(_worker_report, o.addr(), o.tls, _node(), o.tcp, handler._ensure_server())
    bad = {w: r["error"] for w, r in report.items() if r.get("error")}
    if bad:
        lines = "; ".join(f"{w}: {e}" for w, e in sorted(bad.items()))
        if push == "auto" and share_above is not None:
            o.push_to = client
            then = "so each shared array goes once to one worker, which serves its pages to the others"
        else:
            then = "and their tasks on shared arrays will fail"
        warnings.warn(
            f"lazyshare: {len(bad)} of {len(report)} workers cannot fetch pages from this process, {then}: "
            f"{lines}",
            LazyshareWarning,
            stacklevel=2,
        )
    if share_above is not None:
        _wrap(client, share_above)
    return report


def _wrap(client, threshold: int) -> None:
    cls = type(client)
    if getattr(client, "_lazyshare_wrapped", False):
        client._lazyshare_threshold = threshold
        return
    client._lazyshare_wrapped = True
    client._lazyshare_threshold = threshold

    def submit(func, *args, **kwargs):
        opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _SUBMIT_OPTIONS}
        holds: list = []
        t = client._lazyshare_threshold
        args = _share_deep(args, t, holds)
        kwargs = _share_deep(kwargs, t, holds)
        actor = opts.get("actor") or opts.get("actors")  # a class to instantiate: not wrapped
        fut = cls.submit(client, func if actor else _CopyResult(func), *args, **opts, **kwargs)
        if holds:
            _hold(fut, holds)
        return fut

    def map(func, *iterables, **kwargs):
        opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _SUBMIT_OPTIONS}
        holds: list = []
        t = client._lazyshare_threshold
        iterables = [[_share_deep(x, t, holds) for x in it] for it in iterables]
        kwargs = _share_deep(kwargs, t, holds)
        actor = opts.get("actor") or opts.get("actors")
        futs = cls.map(client, func if actor else _CopyResult(func), *iterables, **opts, **kwargs)
        if holds:
            for f in futs:
                _hold(f, holds)
        return futs

    submit.__doc__ = cls.submit.__doc__
    map.__doc__ = cls.map.__doc__
    client.submit = submit
    client.map = map


def uninstall(client) -> None:
    """Undo :func:`install`'s wrappers on ``client`` and stop the link (arrays
    shared now stay shared until released)."""
    if getattr(client, "_lazyshare_wrapped", False):
        del client.submit, client.map
        client._lazyshare_wrapped = False
    o = _the_owner()
    with o.lock:
        o.push_to = None
        if o.listener is not None:
            o.listener.close()
            o.listener = None
