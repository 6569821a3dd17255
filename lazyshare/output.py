"""Shared output arrays: the bytes tasks change in an array marked with
:func:`shared` are merged back into the parent's array.

Three places, one per process role::

    out = lazyshare.shared(np.zeros(n))     # parent: mark it (returns it)
    pool.starmap(fill, [(out, i) ...])      # its tasks get the usual lazy, private
                                            # mapping (exported whatever its size)
    collect(outputs)                        # worker, after a task that returned:
                                            # the pages it wrote, sent with the result
    merge(exports, job, index, writes)      # parent's result thread, before the
                                            # result is delivered: twin and diff

The worker finds the pages it wrote with ``PAGEMAP_SCAN`` (a lazy region's
clean pages are its cache's file pages, or absent; written ones are anonymous):
on the full and user-mode-only rungs with the page cache that is exactly the
written pages. Without the cache (a memory budget, the eager rung, caching
off) every page it fetched is a candidate: more bytes travel, the merge is as
exact. The parent compares each page with its *twin* -- its bytes as the
call's tasks saw them: from the call's snapshot where one is open (the full
rung), else from the array before the call's first merge into it -- and
applies the elements that differ, in native code. An element that an earlier
task of the call changed to another value is a conflict: the later task's result is a
:class:`~lazyshare.errors.WriteConflictError` (its other bytes land), or, with
``conflicts="last"``, the later value wins. A task that raises, or whose
worker dies, sends nothing: nothing of it is merged.

Pages the parent never wrote before the call exported the output (absent, or
the zero page; and the array's first and last pages, which it shares with the
heap, when its bytes there are zeros) have zeros for twin (no copy kept), and tasks map them as plain
zero memory, never fetched: they read them as of submission on every rung,
and a page left holding only zeros is not sent (it changed nothing). There the
worker diffs against the twin itself: a written page holding a quarter of
non-zero words or fewer goes as a bit per word and those words (16 tasks
writing ``out[i::16]`` send 1.3x the output, not 16x); a denser one goes
whole. A region all of whose written pages were such pages is cleared and
kept for the call's next task in that worker (see ``settle``).

Twin and diff cannot tell an element rewritten with its old value from one not
written at all: such a write is no change (and no conflict).
"""

from __future__ import annotations

import mmap
import threading
import weakref
from typing import Any

import numpy as np

from .errors import WriteConflictError

__all__ = ["shared", "unshare", "stats"]

_CONFLICTS = ("error", "last")
_PAGE = mmap.PAGESIZE
_lock = threading.Lock()
# id(root) -> _Mark: the marked byte ranges of one allocation
_marks: dict[int, _Mark] = {}


def new_totals() -> dict:
    """Counters of shared outputs (a pool keeps its own: ``pool.stats()["outputs"]``)."""
    return {"bytes_sent": 0, "bytes_merged": 0, "tasks_merged": 0, "conflicts": 0}


_totals = new_totals()  # this process's


class _Mark:
    __slots__ = ("ref", "ranges", "desc")

    def __init__(self, ref: weakref.ref, desc: str):
        self.ref = ref
        # (low, high address, last writer wins, item size the merge compares)
        self.ranges: list[tuple[int, int, bool, int]] = []
        self.desc = desc


def _bounds(arr: np.ndarray) -> tuple[int, int]:
    return getattr(np.lib, "array_utils", np).byte_bounds(arr)


def _root(arr: np.ndarray) -> Any:
    from .handler import root_extent

    return root_extent(arr)[0]


def _describe(arr: np.ndarray) -> str:
    return f"the {arr.dtype} array of shape {arr.shape} at {arr.ctypes.data:#x}"


def shared(array: np.ndarray, conflicts: str = "error") -> np.ndarray:
    """Mark ``array`` as a shared output of pool calls and return it.

    Tasks that get ``array`` (or a view of it) as an argument see it as of
    submission plus their own writes, as usual; when a task returns, exactly the
    bytes it changed are written into ``array`` before its result is delivered
    (``map`` returns with the array complete; an ``imap`` consumer finds each
    task's part in place when its result arrives). Two tasks of one call that
    change the same byte to different values: the later one's result is a
    :class:`~lazyshare.WriteConflictError`, unless ``conflicts="last"`` (the
    later value wins). A task that raises, or whose worker dies, merges nothing.

    ``array``: a writable numpy array or view of any layout. A view marks the
    bytes it spans, from its first element to its last: tasks' writes to its
    base outside that span stay private (a strided view spans the bytes between
    its elements too). The mark lasts as long as the array's base, or until
    :func:`unshare`; marking it again changes ``conflicts``.

    What is compared is the element (for 1, 2, 4 and 8-byte items; other
    dtypes, the byte): tasks writing different elements of one page never
    conflict, and with ``conflicts="last"`` an element is never torn.
    """
    if not isinstance(array, np.ndarray):
        raise TypeError(f"lazyshare.shared() takes a numpy array, not {type(array).__name__}")
    if conflicts not in _CONFLICTS:
        raise ValueError(f"conflicts must be one of {_CONFLICTS}, not {conflicts!r}")
    if array.dtype.hasobject:
        raise TypeError(
            "lazyshare.shared(): an array of Python objects cannot be shared (its items are pointers)"
        )
    if not array.flags.writeable:
        raise ValueError(
            "lazyshare.shared(): the array is read-only, so tasks' writes could not be merged into it"
        )
    if array.size == 0:
        return array  # nothing to write
    root = _root(array)
    lo, hi = _bounds(array)
    with _lock:
        m = _marks.get(id(root))
        if m is None or m.ref() is not root:
            key = id(root)
            try:
                ref = weakref.ref(root, lambda _r, key=key: _forget(key, _r))
            except TypeError:
                raise TypeError(
                    f"lazyshare.shared(): the memory of this array belongs to a {type(root).__name__}, "
                    "which cannot be tracked"
                ) from None
            m = _marks[key] = _Mark(ref, _describe(array))
        m.ranges = [r for r in m.ranges if r[1] <= lo or r[0] >= hi]
        item = array.dtype.itemsize
        unit = item if item in (1, 2, 4, 8) and lo % item == 0 else 1
        m.ranges.append((lo, hi, conflicts == "last", unit))
        m.ranges.sort()
        if len(m.ranges) == 1:
            m.desc = _describe(array)
    return array


def unshare(array: np.ndarray) -> np.ndarray:
    """Undo :func:`shared` for ``array``'s bytes (calls submitted afterwards
    treat it as an input again). Returns it."""
    if not isinstance(array, np.ndarray) or array.size == 0:
        return array
    root = _root(array)
    lo, hi = _bounds(array)
    with _lock:
        m = _marks.get(id(root))
        if m is not None and m.ref() is root:
            m.ranges = [r for r in m.ranges if r[1] <= lo or r[0] >= hi]
            if not m.ranges:
                del _marks[id(root)]
    return array


def _forget(key: int, ref: weakref.ref) -> None:
    with _lock:
        m = _marks.get(key)
        if m is not None and m.ref is ref:
            del _marks[key]


def marked(arr: np.ndarray) -> list[tuple[int, int, bool]] | None:
    """The marked ranges (addresses) of ``arr``'s allocation if ``arr`` overlaps
    one, else None. Costs a dict lookup when nothing is marked."""
    if not _marks or arr.size == 0:
        return None
    root = _root(arr)
    m = _marks.get(id(root))
    if m is None or m.ref() is not root:
        return None
    lo, hi = _bounds(arr)
    ranges = m.ranges
    if any(r[0] < hi and r[1] > lo for r in ranges):
        return ranges
    return None


def description(arr_root: Any) -> str:
    m = _marks.get(id(arr_root))
    return m.desc if m is not None else "a shared output array"


# ---------------------------------------------------------------- worker side

#: The most bytes of a task's writes one frame carries: the parent receives a frame
#: into a malloc'd buffer, which glibc serves from the heap it reuses up to 32 MiB
#: (bigger ones are fresh mmaps: every page faulted and zeroed again).
_FRAME = 4 << 20
#: Runs at least this long go as zero-copy views of the mapping; shorter ones are
#: gathered into frames (one copy, fewer frames).
_VIEW_MIN = 256 << 10


def _frames(raw: np.ndarray, starts: np.ndarray, ends: np.ndarray):
    """The runs [starts, ends) of ``raw`` as frames of at most ``_FRAME`` bytes:
    ``(runs, chunks, counts)``, runs an (n, 2) array of (offset, length) in
    order, ``chunks[i]`` the bytes of the next ``counts[i]`` runs."""
    pieces = []
    for a, b in zip(starts.tolist(), ends.tolist()):
        for x in range(a, b, _FRAME):
            pieces.append((x, min(b, x + _FRAME)))
    chunks: list = []
    counts: list = []
    pending: list = []  # short pieces waiting to be gathered
    size = 0

    def gather():
        nonlocal size
        buf = np.empty(size, np.uint8)
        pos = 0
        for x, y in pending:
            buf[pos : pos + y - x] = raw[x:y]
            pos += y - x
        chunks.append(buf)
        counts.append(len(pending))
        pending.clear()
        size = 0

    for x, y in pieces:
        if y - x >= _VIEW_MIN:
            if pending:
                gather()
            chunks.append(raw[x:y])
            counts.append(1)
            continue
        if size + y - x > _FRAME:
            gather()
        pending.append((x, y))
        size += y - x
    if pending:
        gather()
    runs = np.array([(x, y - x) for x, y in pieces], np.uint64).reshape(-1, 2)
    return runs, chunks, counts


def _mapping_of(arr: np.ndarray):
    from .handler import _Mapping

    m = arr
    while m is not None and not isinstance(m, _Mapping):
        m = getattr(m, "base", None)
    return m


def _sparse_groups(
    m, sp, counts: np.ndarray, pages: np.ndarray, masks: np.ndarray, words: np.ndarray
) -> list:
    """The sparse pages ls_written_pages found, as groups of at most ``_FRAME``
    bytes of words: ``[(segment offsets of the pages, their masks, their words)]``
    (views of the buffers, which they keep alive until sent)."""
    n = int(sp.npages)
    if not n:
        return []
    offs = pages[:n].astype(np.int64) - m.address + m.segoff
    ends = np.cumsum(counts[:n], dtype=np.int64)
    # page boundaries where the words so far pass a multiple of _FRAME
    cuts = np.searchsorted(ends, np.arange(_FRAME // 8, int(ends[-1]), _FRAME // 8), side="right")
    bounds = [0, *sorted(set(cuts.tolist()) - {0, n}), n]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        w0 = int(ends[a - 1]) if a else 0
        out.append((offs[a:b].astype(np.uint64), masks[a:b].reshape(-1), words[w0 : int(ends[b - 1])]))
    return out


def collect(outputs: list) -> list:
    """The pages the task wrote in the regions of its shared outputs:
    ``[(segment id, runs, chunks, counts, sparse)]`` where ``runs`` is an (n, 2)
    uint64 array of (segment offset, length), ``chunks[i]`` the bytes of the next
    ``counts[i]`` runs (a view of the mapping, which it keeps alive until sent,
    or a gathered buffer; see ``_frames``), and ``sparse`` the written pages
    whose twin is zeros that hold few non-zero words (a quarter at most), as
    ``(page offsets, masks, words)`` groups (see ``_sparse_groups``): an
    interleaved writer sends the words it wrote, not the pages."""
    from .handler import _check, ffi, lib

    out = []
    seen = set()
    ps = _PAGE
    for seg_id, seglen, arr, zeros in outputs:
        m = _mapping_of(arr)
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        npairs = m.nbytes // ps // 2 + 2
        buf = np.empty((npairs, 2), np.uint64)
        # The extents whose twin is zeros, as addresses of this mapping: their
        # pages holding only zeros changed nothing and stay here; their pages
        # with few words set go sparse. Only whole pages of the segment: its
        # last, partial page goes whole.
        z = np.asarray(zeros, np.int64).reshape(-1, 2) - m.segoff
        z = np.clip(z, 0, min(m.nbytes, (seglen - m.segoff) // ps * ps))
        z = np.ascontiguousarray(z[z[:, 1] > z[:, 0]] + m.address, np.uint64)
        zpages = int((z[:, 1] - z[:, 0]).sum()) // ps if len(z) else 0
        sp = ffi.new("struct ls_sparse *")
        if zpages:
            nw = ps // 8
            sp_pages = _scratch("pages", zpages)
            sp_counts = _scratch("counts", zpages, np.uint32)
            sp_masks = _scratch("masks", zpages * (ps // 512)).reshape(zpages, ps // 512)
            # a sparse page holds a quarter of its words at most; one page's worth
            # of room more is what the encoder wants free (np.empty: untouched
            # room costs no memory)
            sp_words = _scratch("words", zpages * (nw // 4) + nw)
            sp.pages = ffi.cast("uint64_t *", sp_pages.ctypes.data)
            sp.counts = ffi.cast("uint32_t *", sp_counts.ctypes.data)
            sp.masks = ffi.cast("uint64_t *", sp_masks.ctypes.data)
            sp.words = ffi.cast("uint64_t *", sp_words.ctypes.data)
            sp.max_pages, sp.max_words = zpages, len(sp_words)
        n = lib.ls_written_pages(
            m.address,
            m.nbytes,
            ffi.cast("uint64_t *", z.ctypes.data),
            len(z),
            ffi.cast("uint64_t *", buf.ctypes.data),
            npairs,
            sp if zpages else ffi.NULL,
        )
        sparse = []
        if n == -38 or n == -25:  # ENOSYS/ENOTTY: no PAGEMAP_SCAN here: every byte is a candidate
            pairs = np.array([[m.address, m.address + m.nbytes]], np.uint64)
        else:
            _check(int(n), "finding the pages a task wrote")
            pairs = buf[:n]
            if zpages:
                sparse = _sparse_groups(m, sp, sp_counts, sp_pages, sp_masks, sp_words)
        starts = pairs[:, 0].astype(np.int64) - m.address
        ends = np.minimum(pairs[:, 1].astype(np.int64) - m.address, seglen - m.segoff)
        keep = ends > starts
        starts, ends = starts[keep], ends[keep]
        if not len(starts) and not sparse:
            if m.park is not None and n >= 0:
                _candidates.append((m, None, None, starts, ends))
            continue
        raw = np.asarray(m)
        runs, chunks, counts = _frames(raw, starts, ends)
        runs[:, 0] += m.segoff
        out.append((seg_id, runs, chunks, counts, sparse))
        # Parked for the next task of the call in this process if what the task
        # wrote can be taken back: every page it wrote had zeros for twin, and
        # none is on its way as a view of the mapping (gathered copies only).
        if m.park is not None and n >= 0 and all(c.base is None for c in chunks):
            if _within(starts + m.address, ends + m.address, z):
                k = int(sp.npages)
                _candidates.append(
                    (m, sp_pages[:k] if k else None, sp_masks[:k] if k else None, starts, ends)
                )
    return out


_scratch_bufs: dict = {}  # what the sparse encoding writes into, kept between tasks


def _scratch(kind: str, n: int, dtype=np.uint64) -> np.ndarray:
    """n items of a buffer kept for the next task: the encoding's words of a
    task that wrote a GiB are 128 MiB, and a fresh buffer is faulted in page by
    page (the kernel zeroing each). A buffer is reused only once nothing else
    holds it (its frames sent: libzmq has let go of its views)."""
    import sys

    a = _scratch_bufs.pop(kind, None)
    if a is None or a.size < n or sys.getrefcount(a) > 2:  # this name and the argument
        a = np.empty(max(n, 1), dtype)
    _scratch_bufs[kind] = a
    return a[:n]


def _within(starts: np.ndarray, ends: np.ndarray, z: np.ndarray) -> bool:
    """Whether every run [starts, ends) lies inside one of the sorted, disjoint
    extents z (address pairs)."""
    if not len(starts):
        return True
    if not len(z):
        return False
    i = np.searchsorted(z[:, 0].astype(np.int64), starts, side="right") - 1
    ok = i >= 0
    i = np.maximum(i, 0)
    return bool((ok & (ends <= z[i, 1].astype(np.int64))).all())


# A shared output's region that a task of a call used is kept ("parked") for
# the next task of that call in this worker, restored to what it held at
# attach: the words the task wrote over zeros zeroed again (its sparse pages,
# and the few denser ones it wrote). A task of 16 that writes out[i::16] then
# faults no page in (each fresh page costs the kernel's zeroing and a fault:
# 1.3 s a GiB here, against 0.06 s to write and clear the words). Only a
# mapping nothing else holds is parked, and only until a task of another call
# starts or the worker idles (the parent's segment is held meanwhile).
_candidates: list = []  # (mapping, sparse page addresses, masks, dense starts, ends) of the running task
_parked: dict = {}  # park key -> (job, mapping)
_job: int | None = None  # the running task's
_reused = 0  # parked regions given to a later task (this process)


def begin(job: int) -> None:
    """A task of ``job`` starts in this worker: parked regions of other calls go."""
    global _job
    _job = job
    _candidates.clear()
    for key in [k for k, (j, _) in _parked.items() if j != job]:
        del _parked[key]


def unpark(key) -> Any:
    """The parked mapping for this key, if a task of the running call left one."""
    if key is None:
        return None
    ent = _parked.get(key)
    if ent is None or ent[0] != _job:
        return None
    del _parked[key]
    global _reused
    _reused += 1
    return ent[1]


def settle() -> None:
    """After the task's result was sent: restore and park its candidates that
    nothing else holds (no array over them left alive by the task)."""
    import sys

    from .handler import ffi, lib

    while _candidates:
        m, pages, masks, starts, ends = _candidates.pop()
        if sys.getrefcount(m) > 2:  # this name and the call's argument: nothing else
            continue
        if pages is not None:
            lib.ls_sparse_clear(
                ffi.cast("uint64_t *", pages.ctypes.data),
                ffi.cast("uint64_t *", masks.ctypes.data),
                len(pages),
            )
        raw = np.asarray(m)
        for a, b in zip(starts.tolist(), ends.tolist()):
            raw[a:b] = 0
        raw = None
        _parked[m.park] = (_job, m)


def holding() -> bool:
    """Whether this worker keeps parked regions or encoding buffers (its idle
    loop then wakes to drop them)."""
    return bool(_parked or _scratch_bufs)


def drop_parked() -> None:
    """Release every parked region and the encoding's buffers (the worker
    idles, or ends)."""
    _candidates.clear()
    _parked.clear()
    _scratch_bufs.clear()


# ---------------------------------------------------------------- parent side


class _Twins:
    """The twins of the pages merged into one array (``ls_merge``), shared by
    the calls running on it: their tasks read the array itself, so a page's
    twin is the array before the first of their merges into it. Merges hold
    ``lock`` (pools merge from their own result threads)."""

    def __init__(self, nbytes: int, key):
        from .handler import ffi, lib

        self.ctx = lib.ls_merge_new(nbytes)
        if self.ctx == ffi.NULL:
            raise MemoryError("no memory for the twins of a shared output array")
        self.lock = threading.Lock()
        self.users = 1
        self.key = key

    def release(self) -> None:
        from .handler import lib

        with _lock:
            self.users -= 1
            if self.users > 0:
                return
            if _epochs.get(self.key) is self:
                del _epochs[self.key]
        with self.lock:
            ctx, self.ctx = self.ctx, None
        if ctx is not None:
            lib.ls_merge_free(ctx)


_epochs: dict[tuple, _Twins] = {}  # (id(root), base, nbytes) -> twins of the calls running on it


def _acquire_twins(root: Any, base: int, nbytes: int) -> _Twins:
    key = (id(root), base, nbytes)
    with _lock:
        t = _epochs.get(key)
        if t is not None:
            t.users += 1
            return t
        t = _epochs[key] = _Twins(nbytes, key)
        return t


class CallOutputs:
    """The shared outputs one call exported, with the twins of their merges."""

    def __init__(self, totals: dict | None = None):
        self.totals = totals  # the pool's counters (None: this process's only)
        self.segs: dict[bytes, tuple] = {}  # segment id -> (seg, base, root, ranges, twins)
        self._lock = threading.Lock()
        self.closed = False

    def add(self, seg, base: int, root: Any, ranges: list) -> tuple:
        """``ranges``: the marks of ``root`` when the call exported it (a later
        ``shared``/``unshare`` applies to later calls). The twins are taken
        now, not at the first merge: a call that began before another one's
        merges compares with the array as it was before them.

        Returns the segment's extents that were never written (flat (start,
        end) segment offsets): their twin is zeros, and tasks map them as plain
        zero memory, as of submission, instead of fetching them."""
        with self._lock:
            ent = self.segs.get(seg.id)
            if ent is not None or self.closed:
                return ent[5] if ent is not None else ()
            twins = _acquire_twins(root, base, seg.nbytes)
            zeros = _zero_extents(twins, base, seg.nbytes)
            self.segs[seg.id] = (seg, base, root, ranges, twins, zeros)
            return zeros

    def merge(self, writes: list) -> WriteConflictError | None:
        """Apply a task's writes (from :func:`collect`); the conflict if any."""
        from .handler import _check, ffi, lib

        conflict = None
        sent = merged = conflicts = 0

        def step(where, fn, args, unit, last):
            """One native merge call, ``fn(twins, base, *args, unit, last, conflict)``,
            into the segment ``where`` = (twins, base, root, ranges)."""
            nonlocal merged, conflicts, conflict
            ctx, base, root, ranges = where
            cbuf = ffi.new("uint64_t[3]")
            rc = fn(ctx, ffi.cast("uint8_t *", base), *args, unit, 1 if last else 0, cbuf)
            merged += _check(int(rc), "merging a task's writes")
            if cbuf[0]:
                conflicts += 1
                if not last and conflict is None:
                    conflict = _conflict(root, ranges, base, cbuf)

        with self._lock:
            if self.closed:
                return None
            plan = [(self.segs.get(bytes(seg_id)), *rest) for seg_id, *rest in writes]
        for ent, runs, chunks, counts, sparse in plan:
            if ent is None:
                continue  # (never: only outputs of this call are sent)
            seg, base, root, ranges, twins, _ = ent
            runs = np.asarray(runs, np.uint64).reshape(-1, 2)
            bounds = np.cumsum([0, *counts]).tolist()
            groups = [(runs[bounds[i] : bounds[i + 1]], c) for i, c in enumerate(chunks)]
            with twins.lock:
                if twins.ctx is None:
                    continue
                where = (twins.ctx, base, root, ranges)
                nsent = len(groups)
                for offs, masks, words in sparse:
                    offs, masks, words = (_u64(x) for x in (offs, masks, words))
                    sent += offs.nbytes + masks.nbytes + words.nbytes
                    for last, unit, p, mk, w, dense in _clip_sparse(offs, masks, words, ranges, base):
                        if dense is not None:  # pages across a range's end: whole
                            groups.append(dense)
                            continue
                        pages = ffi.cast("uint64_t *", p.ctypes.data), len(p)
                        bits = (
                            ffi.cast("uint64_t *", mk.ctypes.data),
                            ffi.cast("uint64_t *", w.ctypes.data),
                            len(w),
                        )
                        step(where, lib.ls_merge_sparse, (*pages, *bits), unit, last)
                for k, (grp, data) in enumerate(groups):
                    data = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
                    if k < nsent:  # not a sparse page made whole (counted as sent above)
                        sent += data.nbytes
                    for last, unit, clipped, src in _clip(grp, data, ranges, base):
                        runs_at = ffi.cast("uint64_t *", clipped.ctypes.data), len(clipped)
                        step(where, lib.ls_merge_apply, (*runs_at, ffi.from_buffer(src)), unit, last)
        for t in (_totals, self.totals):
            if t is not None:
                t["bytes_sent"] += sent
                t["bytes_merged"] += merged
                t["tasks_merged"] += 1
                t["conflicts"] += conflicts
        return conflict

    def close(self) -> None:
        with self._lock:
            self.closed = True
            segs, self.segs = self.segs, {}
        for ent in segs.values():
            ent[4].release()


#: Extents of never-written pages a descriptor carries at most (the rest are fetched).
_MAX_ZEROS = 256


def _zero_extents(twins: _Twins, base: int, nbytes: int) -> tuple:
    """Mark the never-written pages of the segment at ``base`` as having zeros for
    twin; their extents (see :meth:`CallOutputs.add`). Only in private anonymous
    memory that is not itself lazy, where an absent page reads as zeros."""
    from .handler import _check, _untouched_pages_are_zero, ffi, lib

    if not _untouched_pages_are_zero(base, nbytes):
        return ()
    buf = np.empty(2 * _MAX_ZEROS, np.uint64)
    with twins.lock:
        if twins.ctx is None:
            return ()
        n = lib.ls_merge_zeros(twins.ctx, base, ffi.cast("uint64_t *", buf.ctypes.data), _MAX_ZEROS)
    if n == -25:  # ENOTTY: no PAGEMAP_SCAN (Linux < 6.7): every page is fetched
        return ()
    n = _check(int(n), "finding a shared output's never-written pages")
    return tuple(buf[: 2 * n].tolist())


def _clip(runs: np.ndarray, data: np.ndarray, ranges: list, base: int):
    """The runs (segment offsets) and their bytes, clipped to the marked ranges
    (addresses): ``(last writer wins, item size, runs, bytes)`` per range."""
    if not ranges:
        return
    starts = runs[:, 0].astype(np.int64)
    lens = runs[:, 1].astype(np.int64)
    pos = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else lens
    for lo, hi, last, unit in ranges:
        lo, hi = lo - base, hi - base
        a = np.maximum(starts, lo)
        b = np.minimum(starts + lens, hi)
        keep = b > a
        if not keep.any():
            continue
        if keep.all() and (a == starts).all() and (b == starts + lens).all():
            yield last, unit, np.ascontiguousarray(runs, np.uint64), data
            continue
        a, b, p = a[keep], b[keep], pos[keep] + (a[keep] - starts[keep])
        src = np.concatenate([data[x : x + (y - w)] for x, w, y in zip(p.tolist(), a.tolist(), b.tolist())])
        yield last, unit, np.stack([a, b - a], axis=1).astype(np.uint64), src


def _u64(x) -> np.ndarray:
    a = np.frombuffer(x, np.uint8) if not isinstance(x, np.ndarray) else x.view(np.uint8).reshape(-1)
    return a.view(np.uint64)


def _clip_sparse(offs: np.ndarray, masks: np.ndarray, words: np.ndarray, ranges: list, base: int):
    """Sparse pages (segment offsets, masks, words; see ``collect``) clipped to
    the marked ranges (addresses): ``(last writer wins, item size, pages, masks,
    words, None)`` for the pages wholly inside a range, then ``(..., None,
    (runs, bytes))`` for the pages that cross a range's end (made whole: their
    twin is zeros; ``_clip`` takes them apart); pages outside every range go."""
    if not ranges:
        return
    ps = _PAGE
    pos = offs.astype(np.int64)
    inside = np.zeros(len(pos), bool)
    touches = np.zeros(len(pos), bool)
    parts = []
    for lo, hi, last, unit in ranges:
        lo, hi = lo - base, hi - base
        sel = (pos >= lo) & (pos + ps <= hi)
        if sel.all():  # the usual case: the whole array is marked
            yield last, unit, offs, masks, words, None
            return
        if sel.any():
            parts.append((last, unit, sel))
            inside |= sel
        touches |= (pos < hi) & (pos + ps > lo)
    per = ps // 512
    masks = masks.reshape(-1, per)
    counts = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little").sum(axis=1, dtype=np.int64)
    ends = np.cumsum(counts)
    starts = ends - counts

    def take(idx):
        return (
            np.ascontiguousarray(offs[idx]),
            np.ascontiguousarray(masks[idx]).reshape(-1),
            np.concatenate([words[starts[i] : ends[i]] for i in idx.tolist()]),
        )

    for last, unit, sel in parts:
        yield (last, unit, *take(np.flatnonzero(sel)), None)
    # a page across a range's end: whole, for _clip to cut (it applies each
    # range's own rules)
    for i in np.flatnonzero(touches & ~inside).tolist():
        page = np.zeros(ps // 8, np.uint64)
        page[np.unpackbits(masks[i].view(np.uint8), bitorder="little").astype(bool)] = words[
            starts[i] : ends[i]
        ]
        yield None, None, None, None, None, (np.array([[offs[i], ps]], np.uint64), page.view(np.uint8))


def _conflict(root: Any, ranges: list, base: int, c) -> WriteConflictError:
    first, stop = int(c[1]) + base, int(c[2]) + base
    lo = next((r[0] for r in ranges if r[0] <= first < r[1]), first)
    desc = description(root)
    return WriteConflictError(
        f"two tasks of this call changed {int(c[0])} byte(s) of {desc} to different values "
        f"(bytes {first - lo}..{stop - lo} from its start): the earlier task's values are kept. "
        "Write disjoint parts of a shared output, or mark it lazyshare.shared(array, conflicts='last').",
        desc,
        first - lo,
        stop - lo,
        int(c[0]),
    )


def stats() -> dict:
    """Shared outputs, for this process: bytes tasks sent back, bytes merged
    (changed), tasks merged, conflicts seen."""
    with _lock:
        return dict(_totals)
