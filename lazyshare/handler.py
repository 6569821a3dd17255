"""The one module that touches the compiled core (``lazyshare._native``).

Owner side::

    desc = export(arr)          # pin arr, offer it on this process's page server
    ...                         # other processes attach(desc)
    release(desc)               # no new attaches; unpinned once the last mapping is gone

Consumer side::

    a = attach(desc)            # anonymous mapping, every page missing; first touch
                                # of a page makes the native fault handler fetch it
    del a                       # last view gone -> unmapped, the owner is told
    arrays = attach_all(descs)  # one task's arguments: a region is the pages of
                                # one segment its views reach (views that overlap
                                # get regions of their own), all held in one round trip

Threads (all named, so ``top -H`` and py-spy are readable)::

    lazyshare-pages   native  page server loops (one per CPU): answer READ, HOLD,
                              RELEASE, PING; take a consumer's userfaultfd (UFFD)
                              and INSTALL pages through it (csrc/server.c)
    lazyshare-fault   native  fault handler: userfaultfd -> page requests; installs
                              READ payloads itself (csrc/client.c)
    lazyshare-watch   native  watchdog of the fault handler: a fault unanswered past
                              LAZYSHARE_FAULT_TIMEOUT ends the process with a message
    lazyshare-reaper  Python  drops the pins of segments whose last holder is gone

Settings come from :mod:`lazyshare.settings`, read when each part starts.

``_pins`` (segment id -> pinned object) is guarded by ``_lock``; the native
tables are guarded inside C. C returns 0 or -errno; :func:`_check` alone turns
that into exceptions.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import heapq
import os
import secrets
import select
import threading
import warnings
from typing import Any

import numpy as np

from . import output as _output
from . import settings, transport
from ._native import ffi, lib
from .errors import CapabilityError, LazyshareError, OwnerGoneError, ProtocolError, SegmentError

__all__ = [
    "SegmentDescriptor",
    "ArrayDescriptor",
    "Capabilities",
    "LazyshareWarning",
    "export",
    "exported",
    "attach",
    "attach_all",
    "release",
    "materialize",
    "capabilities",
    "stats",
    "counters",
    "lazy_overlap",
]

MODES = {"uffd": lib.LS_MODE_UFFD, "uffd-user-mode-only": lib.LS_MODE_UFFD_USER, "eager": lib.LS_MODE_EAGER}
_MODE_NAMES = {v: k for k, v in MODES.items()}

# Block sizes (lazyshare/settings.py): a random fault fetches one 4 KiB page (a
# round trip costs more than the copy; bigger first fetches cost scattered
# readers); sequential faults double the window up to 4 MiB, inside
# UFFDIO_COPY's best range on this kernel (256 KiB-2 MiB per call measured
# fastest, 4 MiB within 5% of it).


class LazyshareWarning(RuntimeWarning):
    """lazyshare fell back to a slower mechanism."""


# ---------------------------------------------------------------- errors


def _check(rc: int, what: str) -> int:
    """Turn the core's ``-errno`` into a typed exception; pass counts through."""
    if rc >= 0:
        return rc
    e = -rc
    msg = f"{what}: {os.strerror(e)}"
    if e == errno.ENOENT:
        raise SegmentError(f"{what}: unknown or already released segment")
    if e in (errno.ESRCH, errno.ETIMEDOUT):
        raise OwnerGoneError(
            f"{what}: the owner " + ("is gone" if e == errno.ESRCH else "did not answer in time")
        )
    if e in (errno.EPROTO, errno.EBADMSG):
        raise ProtocolError(msg)
    if e == errno.ENOTCONN:
        raise LazyshareError(f"{what}: the native fault handler is not running")
    raise OSError(e, msg)


# ---------------------------------------------------------------- capabilities


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """The capability-ladder rung in use and why (see :func:`capabilities`)."""

    mode: str  # "uffd" | "uffd-user-mode-only" | "eager"
    reason: str
    forced: bool
    devnode_errno: int
    syscall_errno: int
    usermode_errno: int

    @property
    def lazy(self) -> bool:
        return self.mode != "eager"

    @property
    def snapshots(self) -> bool:
        """Whether a pool's tasks see numpy arrays (that own their data) as of
        submission here, the parent's writes during a call held back: the full
        rung, write tracking (Linux 6.7+), ``LAZYSHARE_CACHE`` not 0. Elsewhere
        such writes are reported (a ``LazyshareWarning``), not held back."""
        from . import settings

        return self.mode == "uffd" and settings.read().cache and lib.ls_track_supported() == 1


_caps: Capabilities | None = None
_lock = threading.RLock()


def _probe() -> Capabilities:
    p = ffi.new("struct ls_probe *")
    _check(lib.ls_probe(p), "probing userfaultfd")
    best = _MODE_NAMES[p.mode]
    why = {
        "uffd": "userfaultfd handles user- and kernel-mode faults"
        + (" (/dev/userfaultfd)" if not p.err_devnode else " (userfaultfd(2), privileged)"),
        "uffd-user-mode-only": (
            "unprivileged userfaultfd (UFFD_USER_MODE_ONLY): /dev/userfaultfd "
            f"{os.strerror(p.err_devnode)}, userfaultfd(2) {os.strerror(p.err_syscall)}; "
            "a kernel access (os.write, socket.send of a lazy array) to a page not yet "
            "touched fails with EFAULT unless lazyshare.materialize() is called first"
        ),
        "eager": (
            f"userfaultfd unavailable (/dev/userfaultfd: {os.strerror(p.err_devnode)}; "
            f"userfaultfd(2): {os.strerror(p.err_syscall)}; user-mode-only: "
            f"{os.strerror(p.err_usermode)}): whole arrays are copied on attach"
        ),
    }[best]
    forced = settings.read().mode
    if forced:
        if forced not in MODES:
            raise CapabilityError(f"LAZYSHARE_MODE={forced!r}: expected one of {sorted(MODES)}")
        if MODES[forced] < MODES[best]:
            raise CapabilityError(f"LAZYSHARE_MODE={forced!r} is not available here: {why}")
        if forced != best:
            why = f"forced by LAZYSHARE_MODE (best available: {best})"
        best = forced
    return Capabilities(best, why, bool(forced), p.err_devnode, p.err_syscall, p.err_usermode)


def capabilities() -> Capabilities:
    """Which rung of the capability ladder this process uses, and why.

    Detected once; ``LAZYSHARE_MODE`` (``uffd``, ``uffd-user-mode-only``,
    ``eager``) forces a rung at or below the best available one.
    """
    global _caps
    with _lock:
        if _caps is None:
            _caps = _probe()
        return _caps


def detected_capabilities() -> Capabilities | None:
    """The rung this process uses if it was already detected, else None
    (nothing here attached or exported yet). Never probes: cheap on hot paths."""
    return _caps


# ---------------------------------------------------------------- descriptors


@dataclasses.dataclass(frozen=True)
class SegmentDescriptor:
    """A pinned byte range of an owner process, as other processes see it."""

    id: bytes  # 16 random bytes: unguessable, the only capability to read it
    nbytes: int
    endpoint: str
    owner_pid: int
    cache_fd: int = -1  # the segment's page cache on the owner's host (a memfd), if any
    cache_ino: int = 0  # its inode (0: no cache)

    def __repr__(self) -> str:
        return f"SegmentDescriptor({self.id.hex()[:8]}…, {self.nbytes} bytes, pid {self.owner_pid})"


@dataclasses.dataclass(frozen=True)
class ArrayDescriptor:
    """A numpy array (or a view) living in a segment: enough to rebuild it."""

    segment: SegmentDescriptor
    offset: int
    shape: tuple
    strides: tuple
    dtype: Any
    writeable: bool = True
    output: bool = False  # a shared output (lazyshare.shared): the task's writes go back
    # A shared output's (start, end) segment offsets, whole pages, that were zeros when
    # it was exported (flat): mapped as plain memory, never fetched.
    zeros: tuple = ()

    @classmethod
    def for_view(
        cls, seg: SegmentDescriptor, arr: np.ndarray, low: int, output: bool = False, zeros: tuple = ()
    ) -> ArrayDescriptor:
        return cls(
            seg,
            arr.ctypes.data - low,
            arr.shape,
            arr.strides,
            arr.dtype,
            bool(arr.flags.writeable),
            output,
            zeros,
        )

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


# ---------------------------------------------------------------- owner side

_pins: dict[bytes, Any] = {}
_server_endpoint: str | None = None
_server_pid: int | None = None
_reaper: threading.Thread | None = None
_stopping = threading.Event()


def _ensure_server() -> str:
    global _server_endpoint, _server_pid, _reaper
    with _lock:
        if _server_endpoint is None or _server_pid != os.getpid():
            ep = transport.new_endpoint("pages")
            cfg = settings.read()
            conf = ffi.new(
                "struct ls_server_config *", {"spin_us": cfg.spin_us, "threads": cfg.server_threads}
            )
            _check(lib.ls_server_start(ep.encode(), conf), f"starting the page server on {ep}")
            _server_endpoint, _server_pid = ep, os.getpid()
            _reaper = threading.Thread(target=_reap_loop, name="lazyshare-reaper", daemon=True)
            _reaper.start()
        return _server_endpoint


def _drop_freed() -> None:
    buf = ffi.new("uint8_t[]", 16 * 256)
    while True:
        n = lib.ls_server_pop_freed(buf, 256)
        if n <= 0:
            return
        raw = bytes(ffi.buffer(buf, 16 * n))
        with _lock:
            for i in range(n):
                _pins.pop(raw[16 * i : 16 * i + 16], None)


def _reap_loop() -> None:
    fd = lib.ls_server_freed_fd()
    while not _stopping.is_set():
        try:
            select.select([fd], [], [], 1.0)
        except (OSError, ValueError):
            return
        _drop_freed()


def root_extent(arr: np.ndarray) -> tuple[Any, int, int]:
    """The allocation ``arr`` lives in: (object to pin, low address, high address).

    A view (slice, transpose, strided) maps to its base array's whole extent, so
    that every view of one array shares one segment.
    """
    bounds = getattr(np.lib, "array_utils", np).byte_bounds
    root = arr
    while isinstance(root.base, np.ndarray):
        root = root.base
    low, high = bounds(root)
    vlow, vhigh = bounds(arr)
    if not (low <= vlow and vhigh <= high):  # a view built over foreign memory
        return arr, vlow, vhigh
    return root, low, high


def _untouched_pages_are_zero(address: int, nbytes: int) -> bool:
    """Whether [address, address+nbytes) is private anonymous memory of this
    process that is not itself a lazy mapping: there, a page absent from the page
    table was never written and reads as zeros, so the page server may answer it
    without payload. File-backed or shared memory, and regions attached from
    another owner (absent pages there are not fetched yet), do not qualify.

    Costs O(log n) in the mappings of this process (``PROCMAP_QUERY``, Linux
    6.11+); older kernels read and parse the whole of ``/proc/self/maps``."""
    if lazy_overlap(address, nbytes):
        return False
    rc = lib.ls_vma_anon(address, nbytes)
    if rc in (-errno.ENOTTY, -errno.EINVAL):
        return _anon_by_maps(address, nbytes)
    return _check(rc, "querying this process's memory map") == 1


def _anon_by_maps(address: int, nbytes: int) -> bool:
    """``ls_vma_anon`` without ``PROCMAP_QUERY``: the same test on the text of
    ``/proc/self/maps``."""
    end = address + nbytes
    covered = address
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if hi <= address or lo >= end:
                continue
            path = fields[5].strip() if len(fields) > 5 else ""
            inode = fields[4] if len(fields) > 4 else "0"
            named_anon = path in ("[heap]", "[stack]") or path.startswith("[anon:")
            if lo > covered or fields[1][3] != "p" or inode != "0" or (path and not named_anon):
                return False
            covered = hi
    return covered >= end


def export_memory(pin: Any, address: int, nbytes: int) -> SegmentDescriptor:
    """Offer ``nbytes`` at ``address`` (kept alive by ``pin``) to other processes."""
    if nbytes <= 0:
        raise ValueError("cannot export an empty buffer")
    ep = _ensure_server()
    anon = _untouched_pages_are_zero(address, nbytes)
    if not anon and capabilities().mode == "uffd-user-mode-only":
        # Re-exporting a lazy mapping: the page server's kernel-mode reads of
        # pages not fetched yet would fail with EFAULT on this rung.
        if lazy_overlap(address, nbytes):
            _check(
                lib.ls_client_materialize(address, nbytes), "fetching a lazy mapping before re-exporting it"
            )
    seg_id = secrets.token_bytes(16)
    with _lock:
        _pins[seg_id] = pin
    rc = lib.ls_server_export(seg_id, address, nbytes, anon)
    if rc < 0:
        with _lock:
            _pins.pop(seg_id, None)
        _check(rc, "exporting a segment")
    return SegmentDescriptor(seg_id, nbytes, ep, os.getpid())


def set_pin(seg_id: bytes, obj: Any) -> None:
    """Keep ``obj`` alive while segment ``seg_id`` is offered (None: stop keeping
    it; the caller then makes sure the memory outlives every mapping)."""
    with _lock:
        if obj is None:
            _pins.pop(seg_id, None)
        else:
            _pins[seg_id] = obj


def add_cache(seg: SegmentDescriptor) -> SegmentDescriptor:
    """``seg`` with a page cache shared by the consumers of this host (see
    ``ls_server_cache``), or ``seg`` itself where there can be none (no
    userfaultfd here)."""
    fd = ffi.new("int *")
    ino = ffi.new("uint64_t *")
    rc = lib.ls_server_cache(seg.id, fd, ino)
    if rc in (-errno.EOPNOTSUPP, -errno.ENOSYS, -errno.EPERM):
        return seg
    _check(rc, "creating a page cache")
    return dataclasses.replace(seg, cache_fd=int(fd[0]), cache_ino=int(ino[0]))


def _spans(ranges: list[tuple[int, int]]):
    """``(start, end)`` pairs as the (offset, length) array the core takes."""
    return ffi.new("uint64_t[]", [v for lo, hi in ranges for v in (lo, hi - lo)])


def cache_punch(seg: SegmentDescriptor, ranges: list[tuple[int, int]]) -> int:
    """Drop the cached pages of ``ranges`` (segment offsets ``(start, end)``):
    the bytes dropped."""
    if not ranges or not seg.cache_ino:
        return 0
    return _check(lib.ls_server_cache_punch(seg.id, _spans(ranges), len(ranges)), "dropping cached pages")


def cache_resident(seg: SegmentDescriptor) -> int:
    """Bytes resident in ``seg``'s page cache (0: none)."""
    if not seg.cache_ino:
        return 0
    rc = lib.ls_server_cache_resident(seg.id)
    return 0 if rc == -errno.ENOENT else _check(rc, "reading a page cache's size")


_track_rung_set = False


def track_add(address: int, nbytes: int, sync: bool = False) -> int:
    """Start recording writes to the page-aligned range: 0, or the -errno that
    says why it cannot be tracked (see ``ls_track_add``). ``sync``: a write
    waits while its block is copied into the open snapshots
    (``ls_track_add_sync``; -EPERM where the rung does not allow it)."""
    global _track_rung_set
    if not _track_rung_set:
        # The parent's tracker runs at the rung its pools run at (a forced
        # LAZYSHARE_MODE=uffd-user-mode-only holds for it too).
        mode = capabilities().mode
        if mode in ("uffd", "uffd-user-mode-only"):
            lib.ls_track_set_mode(MODES[mode])  # -EBUSY: already open and in use at a rung
        _track_rung_set = True
    rc = lib.ls_track_supported()
    if rc < 0:
        return rc
    rc = (lib.ls_track_add_sync if sync else lib.ls_track_add)(address, nbytes)
    return rc if rc < 0 else 0


def snap_begin(seg: SegmentDescriptor, address: int, nbytes: int) -> int:
    """Open a snapshot of ``seg`` over its sync-tracked range
    ``[address, address+nbytes)`` (see ``ls_server_snap_begin``): 0 or -errno."""
    return lib.ls_server_snap_begin(seg.id, address, nbytes)


def snap_end(seg: SegmentDescriptor, address: int) -> bool:
    """Close it: whether it was kept whole."""
    rc = lib.ls_server_snap_end(seg.id, address)
    return rc in (0, -errno.ENOENT)


def cache_refresh(seg: SegmentDescriptor, ranges: list[tuple[int, int]], punch: bool) -> int:
    """Of the byte ranges ``(start, end)`` (segment offsets), the bytes of the
    cached pages that differ from the memory now (punched if ``punch``)."""
    if not ranges or not seg.cache_ino:
        return 0
    return _check(
        lib.ls_server_cache_refresh(seg.id, _spans(ranges), len(ranges), int(punch)), "comparing cached pages"
    )


def cache_fill(seg: SegmentDescriptor, offset: int, nbytes: int) -> None:
    """Copy whole pages ``[offset, offset+nbytes)`` of ``seg`` into its cache now."""
    if nbytes and seg.cache_ino:
        _check(lib.ls_server_cache_fill(seg.id, offset, nbytes), "filling a page cache")


def track_dirty(address: int, nbytes: int, reprotect: bool) -> list[tuple[int, int]] | None:
    """The written page ranges ``(start, end)`` of a tracked range since it was
    last scanned with ``reprotect``, or None if tracking was lost (the memory
    was moved, unmapped or mapped anew: treat all of it as written)."""
    out: list[tuple[int, int]] = []
    cap = 256
    buf = ffi.new("uint64_t[]", 2 * cap)
    cur, end = address, address + nbytes
    while cur < end:
        n = lib.ls_track_dirty(cur, end - cur, buf, cap, int(reprotect))
        if n == -errno.ENXIO:
            return None
        _check(n, "scanning for written pages")
        out.extend((int(buf[2 * i]), int(buf[2 * i + 1])) for i in range(n))
        if n < cap:
            break
        cur = int(buf[2 * n - 1])
    return out


def track_remove(address: int, nbytes: int) -> None:
    rc = lib.ls_track_remove(address, nbytes)
    if rc != -errno.ENOENT:
        _check(rc, "stopping write tracking")


def _as_array(obj: Any) -> np.ndarray:
    if isinstance(obj, np.ndarray):
        arr = obj
    else:
        try:
            arr = np.frombuffer(memoryview(obj).cast("B"), dtype=np.uint8)
        except TypeError as e:
            raise TypeError(f"export() takes a numpy array or a buffer, not {type(obj).__name__}") from e
    if arr.dtype.hasobject:
        raise TypeError("cannot export an array of Python objects (dtype=object): pickle it instead")
    if arr.size == 0:
        raise ValueError("cannot export a zero-size array: there are no pages to share")
    return arr


def export(obj: Any) -> ArrayDescriptor:
    """Pin ``obj`` (a numpy array or any buffer) and return a picklable descriptor.

    Another process passes the descriptor to :func:`attach`. A view exports its
    base allocation; the descriptor rebuilds the view. The owner serves the
    bytes as they are when a page is first touched, so do not write to the array
    while others may still read it; call :func:`release` when done.
    """
    arr = _as_array(obj)
    pin, low, high = root_extent(arr)
    seg = export_memory(pin, low, high - low)
    return ArrayDescriptor.for_view(seg, arr, low)


def release(desc: ArrayDescriptor | SegmentDescriptor) -> None:
    """Stop offering a segment. Its buffer is unpinned as soon as no process maps it."""
    seg = desc.segment if isinstance(desc, ArrayDescriptor) else desc
    if seg.owner_pid != os.getpid():
        raise SegmentError("release() must be called by the process that exported the segment")
    rc = _check(lib.ls_server_unexport(seg.id), "releasing a segment")
    if rc == 1:
        with _lock:
            _pins.pop(seg.id, None)


class exported:
    """``with exported(arr) as desc:`` export for the duration of a block."""

    def __init__(self, obj: Any):
        self.desc = export(obj)

    def __enter__(self) -> ArrayDescriptor:
        return self.desc

    def __exit__(self, *exc) -> None:
        release(self.desc)


def holders(desc: ArrayDescriptor | SegmentDescriptor) -> int:
    """How many mappings of the segment other processes hold (owner side)."""
    seg = desc.segment if isinstance(desc, ArrayDescriptor) else desc
    return _check(lib.ls_server_holders(seg.id), "counting holders")


def pinned_segments() -> int:
    """Segments this process still pins (exported or mapped somewhere)."""
    with _lock:
        return len(_pins)


# ---------------------------------------------------------------- consumer side

_client_pid: int | None = None
_warned_eager = False


def lazy_overlap(address: int, nbytes: int) -> bool:
    """Whether [address, address+nbytes) overlaps a region this process attached
    (a lazy mapping: its absent pages are not fetched yet). O(log n) in the
    number of live regions (the fault handler's own address tree)."""
    if nbytes <= 0 or _client_pid != os.getpid():
        return False
    return lib.ls_client_overlaps(address, nbytes) == 1


def _ensure_client() -> Capabilities:
    global _client_pid, _warned_eager
    caps = capabilities()
    with _lock:
        if _client_pid != os.getpid():
            cfg = settings.read()
            conf = ffi.new(
                "struct ls_client_config *",
                {
                    "mode": MODES[caps.mode],
                    "min_block": cfg.min_block,
                    "max_block": cfg.max_block,
                    "fault_timeout_ms": int(cfg.fault_timeout * 1000),
                    "spin_us": cfg.spin_us,
                    "wire": cfg.data_path == "wire",
                    "link_max_block": min(max(cfg.link_max_block, cfg.min_block), cfg.max_block),
                },
            )
            rc = lib.ls_client_start(conf)
            _check(rc, f"starting the fault handler ({caps.mode})")
            _client_pid = os.getpid()
            if caps.mode == "eager" and not _warned_eager:
                _warned_eager = True
                warnings.warn(
                    f"lazyshare: {caps.reason}. To get lazy paging, run on Linux 5.11+ with "
                    "/dev/userfaultfd readable by this user (Linux 6.1+), or "
                    "sysctl vm.unprivileged_userfaultfd=1, or allow the userfaultfd syscall "
                    "in the container's seccomp profile. See `python -m lazyshare doctor`.",
                    LazyshareWarning,
                    stacklevel=3,
                )
    return caps


class _Mapping:
    """Owns one attached region; numpy arrays over it keep it alive as ``.base``."""

    __slots__ = ("address", "nbytes", "region", "segoff", "pid", "park", "__array_interface__", "__weakref__")

    def __init__(self, address: int, nbytes: int, region: int, segoff: int = 0, park=None):
        self.address, self.nbytes, self.region, self.pid = address, nbytes, region, os.getpid()
        self.segoff = segoff  # the segment offset mapped at address
        self.park = park  # a shared output's region: its key among parked ones (lazyshare.output)
        self.__array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
        }

    def __del__(self, _warn=warnings.warn):
        if self.pid != os.getpid():  # a forked child has no such region
            return
        rc = lib.ls_client_detach(self.region)
        if rc < 0:  # no memory for the command: the region stays mapped until exit
            _warn(
                f"could not detach a lazy region of {self.nbytes} bytes ({os.strerror(-rc)}); "
                "it stays mapped until the process exits",
                LazyshareWarning,
                stacklevel=2,
            )


def _view_extent(desc: ArrayDescriptor) -> tuple[int, int]:
    """The byte range of the segment the described view can reach (at least
    one byte, inside the segment)."""
    itemsize = np.dtype(desc.dtype).itemsize
    if not desc.shape or 0 in desc.shape:
        lo, hi = desc.offset, desc.offset + itemsize
    else:
        lo = hi = desc.offset
        for n, st in zip(desc.shape, desc.strides):
            if st < 0:
                lo += (n - 1) * st
            else:
                hi += (n - 1) * st
        hi += itemsize
    n = desc.segment.nbytes
    lo = min(max(lo, 0), n - 1)
    return lo, min(max(hi, lo + 1), n)


#: Views of one segment that share a region but lie further apart than this go
#: to separate regions (a region is one mapping from its first view's first page
#: to its last view's last one).
_REGION_GAP = 64 << 20


def _plan_regions(extents: list[tuple[int, int]]) -> list[list[int]]:
    """Group the views of one segment (their byte ranges, by index) into regions.

    Views that overlap go to different regions, so that each is as private as
    the copy unpickling would give it (a write through one never shows through
    another); views that are disjoint share one (nothing can tell, but each
    region costs an ``mmap``, a ``UFFDIO_REGISTER``, a kernel VMA and a hold
    round trip). Sorted by start, each view joins the region ("layer") whose
    last view ended first, if that one ended before it starts: as many layers as
    views overlap at the deepest point, the fewest possible."""
    order = sorted(range(len(extents)), key=lambda i: extents[i][0])
    ends: list[tuple[int, int]] = []  # heap of (end of its last view, layer)
    layers: list[list[list[int]]] = []  # layer -> its regions -> view indices
    for i in order:
        lo, hi = extents[i]
        if ends and ends[0][0] <= lo:
            last, k = heapq.heappop(ends)
            if lo - last > _REGION_GAP:
                layers[k].append([i])
            else:
                layers[k][-1].append(i)
        else:
            k = len(layers)
            layers.append([[i]])
        heapq.heappush(ends, (hi, k))
    return [region for layer in layers for region in layer]


def attach(desc: ArrayDescriptor | SegmentDescriptor) -> np.ndarray:
    """Map a segment exported by another process; pages arrive on first touch.

    Returns a private, writable array (as unpickling would give): writes stay in
    this process. The mapping lives as long as any view of the array.
    """
    return attach_all([desc])[0]


def attach_all(descs: list) -> list[np.ndarray]:
    """:func:`attach` for many descriptors at once (one task's arguments).

    Each array is as private as if attached alone: arrays whose bytes overlap
    never share memory. Those that do not overlap (rows or blocks of one array,
    say) share one region (one mapping and one kernel registration) when they
    come from one segment, and the holds of all regions are confirmed by their
    owners in one round trip. So 70,000 row views cost a few regions, not
    70,000 (which would also run into ``vm.max_map_count``). A region lives as
    long as any array over it."""
    descs = [
        ArrayDescriptor(d, 0, (d.nbytes,), (1,), np.dtype(np.uint8))
        if isinstance(d, SegmentDescriptor)
        else d
        for d in descs
    ]
    if not descs:
        return []
    pid = os.getpid()
    if any(d.segment.owner_pid == pid for d in descs):
        raise SegmentError("attach() in the exporting process: use the array itself")
    _ensure_client()
    extents = [_view_extent(d) for d in descs]
    by_seg: dict[bytes, list[int]] = {}
    for i, d in enumerate(descs):
        by_seg.setdefault(d.segment.id, []).append(i)
    by_owner: dict[tuple[str, int], list[tuple[SegmentDescriptor, list[int]]]] = {}
    for members in by_seg.values():
        seg = descs[members[0]].segment
        for region in _plan_regions([extents[i] for i in members]):
            by_owner.setdefault((seg.endpoint, seg.owner_pid), []).append((seg, [members[k] for k in region]))
    out: list = [None] * len(descs)
    attach_timeout = settings.read().attach_timeout
    if _output._parked:
        by_owner = _reuse_parked(by_owner, descs, extents, out)
    for (endpoint, owner_pid), regions in by_owner.items():
        specs = ffi.new("struct ls_attach[]", len(regions))
        keep = []  # the plain extents' arrays, alive until attached
        for spec, (seg, members) in zip(specs, regions):
            zeros = next((descs[i].zeros for i in members if descs[i].zeros), ())
            if zeros:
                keep.append(ffi.new("uint64_t[]", list(zeros)))
                spec.plain, spec.nplain = keep[-1], len(zeros) // 2
            ffi.memmove(spec.id, seg.id, len(seg.id))
            spec.seglen = seg.nbytes
            spec.map_off = min(extents[i][0] for i in members)
            spec.map_len = max(extents[i][1] for i in members) - spec.map_off
            if seg.cache_ino:
                spec.cache_fd, spec.cache_ino = seg.cache_fd, seg.cache_ino
        rc = lib.ls_client_attach(
            endpoint.encode(), owner_pid, specs, len(regions), int(attach_timeout * 1000)
        )
        what = regions[0][0].id.hex()[:8] + (f" and {len(regions) - 1} more" if len(regions) > 1 else "")
        _check(
            rc, f"attaching segment {what} of pid {owner_pid} at {endpoint} (timeout {attach_timeout:g} s)"
        )
        for spec, (seg, members) in zip(specs, regions):
            key = _park_key(seg, members, descs, extents)
            _views_over(_Mapping(spec.addr, spec.map_len, spec.region, spec.off, key), members, descs, out)
    return out


def _views_over(m: _Mapping, members: list[int], descs: list, out: list) -> None:
    raw = np.asarray(m)
    for i in members:
        d = descs[i]
        # Writable even if the owner's array is not (``desc.writeable``): the mapping
        # is private, and unpickling gives a writable copy too.
        out[i] = np.ndarray(
            d.shape, np.dtype(d.dtype), buffer=raw, offset=d.offset - m.segoff, strides=d.strides
        )


def _park_key(seg, members: list[int], descs: list, extents: list):
    """A region holding a shared output: what a later attach must ask for to
    be given it again once parked (see ``lazyshare.output.settle``)."""
    if not any(descs[i].output for i in members):
        return None
    zeros = next((descs[i].zeros for i in members if descs[i].zeros), ())
    lo = min(extents[i][0] for i in members)
    return (seg.id, lo, max(extents[i][1] for i in members) - lo, tuple(zeros))


def _reuse_parked(by_owner: dict, descs: list, extents: list, out: list) -> dict:
    """Give the regions that a parked mapping of this job matches that mapping
    (their views go in ``out``); the others, to attach."""
    left: dict = {}
    for owner, regions in by_owner.items():
        for seg, members in regions:
            m = _output.unpark(_park_key(seg, members, descs, extents))
            if m is None:
                left.setdefault(owner, []).append((seg, members))
            else:
                _views_over(m, members, descs, out)
    return left


def set_memory_budget(nbytes: int | None) -> None:
    """Keep at most ``nbytes`` of fetched pages in this process (None: no limit).

    Older pages this process has not written are dropped past the budget and
    fetched again if touched; pages it wrote are never dropped. Applies to arrays
    attached afterwards. Costs one extra fault per page written (the pages are
    write-protected so that writes are known)."""
    if nbytes is not None and nbytes < 0:
        raise ValueError("memory budget must be None or a non-negative number of bytes")
    _check(lib.ls_client_set_budget(nbytes or 0), "setting the memory budget")


def materialize(arr: np.ndarray) -> np.ndarray:
    """Fetch every page under ``arr`` now (from this thread, in user mode).

    Needed before handing a lazily attached array to the kernel (``os.write``,
    ``socket.send``, ``arr.tofile``) on the ``uffd-user-mode-only`` rung, where the
    kernel may not wait for a missing page. Returns ``arr``.
    """
    if arr.size:
        low, high = getattr(np.lib, "array_utils", np).byte_bounds(arr)
        _check(lib.ls_client_materialize(low, high - low), "materializing an array")
    return arr


# ---------------------------------------------------------------- stats


def counters() -> tuple[int, int, bool]:
    """``(bytes_fetched, faults, settled)`` of this process as they are now,
    without waiting for requests still on the wire; ``settled`` is False while
    some are (read-ahead may still add to the counts). Cheap: what a worker
    reports with every result."""
    settled = lib.ls_client_sync(0) != -errno.ETIMEDOUT
    s = ffi.new("struct ls_stats *")
    lib.ls_get_stats(s)
    return int(s.bytes_fetched), int(s.faults), settled


def owner_counters() -> dict:
    """This process's counters as owner, without waiting."""
    s = ffi.new("struct ls_stats *")
    lib.ls_get_stats(s)
    return {
        "cache_bytes_filled": s.cache_bytes_filled,
        "caches_live": s.caches_live,
        "snap_bytes_preserved": s.snap_bytes_preserved,
        "snap_faults": s.snap_faults,
    }


def stats(timeout: float = 1.0) -> dict:
    """This process's counters, as consumer and as owner.

    ``fault_latency_us`` is a histogram ``{upper bound in us: count}`` of the time
    from the handler reading a fault to its page being installed. ``installs``
    counts the requests the owner answered by installing the pages itself (see
    "How it works" in the README); the others came as payload.

    Waits (at most ``timeout`` seconds) for page requests still being answered,
    so that a thread sees the bytes of the faults it just took; ``settled`` is
    False if some were still on the wire when the wait ended (the byte counts
    may then grow). Never call it on a path that must not wait: use
    :func:`counters`.
    """
    rc = lib.ls_client_sync(max(0, int(timeout * 1000)))
    settled = rc != -errno.ETIMEDOUT
    if settled:
        _check(rc, "waiting for page requests in flight")
    s = ffi.new("struct ls_stats *")
    lib.ls_get_stats(s)
    hist = {2 ** (i + 1): s.hist[i] for i in range(lib.LS_HIST_BUCKETS) if s.hist[i]}
    return {
        "faults": s.faults,
        "requests": s.requests,
        "installs": s.installs,
        "bytes_fetched": s.bytes_fetched,
        "bytes_zero": s.bytes_zero,
        "regions_attached": s.regions_attached,
        "pages_already_present": s.eexist,
        "bytes_dropped": s.bytes_dropped,
        "fault_latency_us": hist,
        "requests_served": s.requests_served,
        "bytes_served": s.bytes_served,
        "errors_served": s.errors_served,
        "segments_exported": s.segments_exported,
        "caches_live": s.caches_live,
        "cache_bytes_filled": s.cache_bytes_filled,
        "cache_attaches": s.cache_attaches,
        "cache_fallbacks": s.cache_fallbacks,
        "mode": capabilities().mode,
        "settled": settled,
    }


# ---------------------------------------------------------------- process lifecycle


def _after_fork_in_child() -> None:
    global _server_endpoint, _server_pid, _reaper, _client_pid, _lock, _stopping
    lib.ls_reset_after_fork()
    _lock = threading.RLock()
    _pins.clear()
    _server_endpoint = _server_pid = _reaper = _client_pid = None
    _stopping = threading.Event()


def _at_exit() -> None:
    _stopping.set()
    if _server_pid == os.getpid():
        lib.ls_server_stop()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
