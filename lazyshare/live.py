"""Segments that outlive a call (owner side).

A pool call exports each base allocation its arguments live in (see
:class:`lazyshare.serialization.CallExports`). Here such a segment is kept for
as long as the parent's array lives, instead of for one call:

* **a page cache shared by the workers of this host** (``ls_server_cache``: a
  memfd each worker maps privately): pages one task fetched map into every later
  task, in any worker, without a request, and a task's writes stay its own;
* **write tracking** in the parent, before a call reuses the segment, drops
  from the cache the pages the parent changed since the previous call, so only
  they move again. Two trackers:

  - **snapshots** (``ls_track_add_sync``; the full rung, numpy arrays that own
    their data): the array's own pages are write-protected synchronously. The
    parent's first write to a 2 MiB block (from user or kernel mode) waits
    while the block is copied into the cache of every call running on it, so
    each task reads the array as of its submission, whatever the parent writes
    meanwhile; the pages the array shares with its neighbours (the heap) are
    copied into the cache when a call begins instead (a write there must never
    wait). Which pages changed is then told by comparing the written blocks'
    cached pages with the array (a rewrite of the same bytes moves nothing).
  - **reports** (``ls_track_add``: ``UFFD_FEATURE_WP_ASYNC`` and
    ``PAGEMAP_SCAN``; the user-mode-only rung, and other buffers): the writer
    never waits (a synchronous write-protect fault taken in kernel mode fails
    with EFAULT on that rung). A write while a call runs cannot be held back:
    it is detected, later calls see it, and a warning names the array once
    (tasks of the running call may have seen the new bytes in pages they had
    not read yet).

* **released when the array dies** (a weakref callback): tracking stops, the
  segment is unexported and its cache goes with it; workers keep nothing between
  tasks, so nothing is left in them either.

A segment's bytes are one *generation* of the array. A call that finds the
array changed since the generation began starts a new one: in place (the
changed pages are dropped from the cache) when no running call uses the old
one, else as a fresh segment with an empty cache (the running call keeps the
old one until its tasks are done).

Memory that cannot be tracked (file-backed, shared, KSM-mergeable, or already
tracked through a neighbouring array sharing a page) still gets the shared
cache, but every call drops the whole of it: correct, with no reuse across
calls. ``LAZYSHARE_CACHE=0`` turns all of this off (one export per call, as
before).

A segment is kept while a pool whose calls used it runs: when the last such
pool ends (closed and joined, terminated, or collected), the segment and its
cache go, though the array lives on (a later pool exports it afresh).

The owner's memory stays pinned (a strong reference in
:mod:`lazyshare.handler`) while a call uses it and until no worker maps it any
more; between calls only a weak reference is kept, so the array dies when the
program drops it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import warnings
import weakref
from typing import Any

from . import settings

__all__ = ["acquire", "release", "stats", "live_segments"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _handler():
    global _h
    if _h is None:
        from . import handler

        _h = handler
    return _h


_h = None


class _Gen:
    """One exported segment (with its cache) and the calls using it. The
    segment covers the allocation's pages whole, from ``base`` (its first
    page): the cache's pages are then the parent's pages, so a parent write to
    one page drops one cached page, not the two it would straddle if the
    segment began where the allocation does (inside its first page)."""

    __slots__ = ("seg", "entry", "users", "snap", "direct", "_direct_desc", "last_used")

    def __init__(self, seg, entry: _Entry):
        self.seg = seg
        self.entry = entry
        self.users = 0  # calls (CallExports) using it now
        self.snap = False  # a snapshot is open on it (sync entries, while users > 0)
        # The calls using it now read the array directly, not through the cache
        # (see _refresh_sync): set when its first user comes.
        self.direct = False
        self._direct_desc = None
        self.last_used = 0.0  # time.monotonic() when its last call released it

    @property
    def desc(self):
        """The segment as the workers of the calls using it now get it."""
        if not self.direct:
            return self.seg
        if self._direct_desc is None:
            self._direct_desc = dataclasses.replace(self.seg, cache_fd=-1, cache_ino=0)
        return self._direct_desc

    @property
    def base(self) -> int:
        return self.entry.page_lo


class _Entry:
    """A base allocation of this process that calls have exported."""

    __slots__ = (
        "key",
        "ref",
        "gen",
        "tracked",
        "trackable",
        "between",
        "calls_untracked",
        "page_lo",
        "page_len",
        "warned",
        "desc",
        "dead",
        "pools",
        "sync",
        "in_lo",
        "in_hi",
    )

    def __init__(self, key: tuple[int, int], ref: weakref.ref, desc: str):
        self.key = key
        self.ref = ref
        self.gen: _Gen | None = None
        self.tracked = False
        self.page_lo = key[0] // _PAGE * _PAGE
        self.page_len = -(-key[1] // _PAGE) * _PAGE - self.page_lo
        self.warned = False
        self.desc = desc
        self.dead = False
        self.trackable = False  # tracking was accepted for this memory
        self.between = True  # tracked between calls too (else only while calls run)
        self.calls_untracked = 0  # calls since tracking between calls stopped
        self.pools: set[int] = set()  # ids of the running pools whose calls used it
        # Snapshot entries (see _snapshots_allowed): the pages lying wholly
        # in the array, [in_lo, in_hi), are tracked synchronously; the one or
        # two pages it shares with its neighbours (the heap) are compared at
        # each call instead, and copied into the cache when a call begins.
        self.sync = False
        self.in_lo = -(-key[0] // _PAGE) * _PAGE
        self.in_hi = max(self.in_lo, key[1] // _PAGE * _PAGE)

    def edges(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The array's bytes in pages it shares, and those pages: ([(lo, hi)
        byte ranges], [(lo, hi) page ranges]), in addresses."""
        low, high = self.key
        if self.in_lo >= self.in_hi:
            return [(low, high)], [(self.page_lo, self.page_lo + self.page_len)]
        b, p = [], []
        if low < self.in_lo:
            b.append((low, self.in_lo))
            p.append((self.page_lo, self.in_lo))
        if self.in_hi < high:
            b.append((self.in_hi, high))
            p.append((self.in_hi, self.page_lo + self.page_len))
        return b, p


_lock = threading.RLock()
_entries: dict[tuple[int, int], _Entry] = {}
_by_root: dict[int, _Entry] = {}  # id(root object) -> its entry (a resized array moves)
_idle: set[_Gen] = set()  # generations no call uses, still pinned until no worker maps them
_idle_wake = threading.Event()
_idle_thread: threading.Thread | None = None
_totals = {"bytes_invalidated": 0, "generations": 0, "bytes_reused": 0, "bytes_evicted": 0}
_pools: set[int] = set()  # ids of this process's pools running now
#: A segment found mostly rewritten stops being tracked for this many calls.
_RETRACK_AFTER = 8


def _dead_ref():
    return None


def _describe(root: Any) -> str:
    shape = getattr(root, "shape", None)
    dtype = getattr(root, "dtype", None)
    if shape is not None and dtype is not None:
        return f"a {dtype} array of shape {tuple(shape)}"
    return f"a {type(root).__name__}"


def enabled() -> bool:
    """Whether segments outlive calls here: the setting, and a rung on which
    workers map pages lazily (on the eager rung they copy whole segments)."""
    return settings.read().cache and _handler().capabilities().mode != "eager"


def acquire(root: Any, low: int, high: int, pool: Any) -> _Gen | None:
    """The generation of the segment for ``[low, high)`` (the allocation of
    ``root``) that a new call of ``pool`` uses, or None where segments cannot
    outlive the call (then the caller exports for the call alone)."""
    if not enabled():
        return None
    key = (low, high)
    h = _handler()
    with _lock:
        if id(pool) not in _pools:
            return None  # not started, or ended: nothing would let it go
        e = _entries.get(key)
        if e is not None and e.ref() is not root:
            return None  # the same memory reached through another object: not ours to keep
        if e is None:
            old = _by_root.get(id(root))
            if old is not None and old.ref() is root:
                _retire(old)  # resized (moved or shrunk): the old extent is gone
            try:
                ref = weakref.ref(root, _died)
            except TypeError:
                return None
            e = _Entry(key, ref, _describe(root))
            e.gen = _new_gen(e, root)
            _track(e, root)
            _entries[key] = e
            _by_root[id(root)] = e
            if e.sync:
                _open_snap(e, e.gen)
                _sync_dirty(e)  # written since tracking began: the cache is empty yet
                _fill_edges(e, e.gen)
        elif e.sync:
            _refresh_sync(e, root)
        else:
            _refresh(e, root)
        e.pools.add(id(pool))
        g = e.gen
        g.users += 1
        if g.users == 1:
            _idle.discard(g)
            h.set_pin(g.seg.id, root)
        return g


def release(g: _Gen) -> None:
    """A call that acquired ``g`` is done with it."""
    h = _handler()
    with _lock:
        g.users -= 1
        if g.users > 0:
            return
        e = g.entry
        if g.snap:
            _close_snap(e, g)
        if e.dead or g is not e.gen:  # retired: gone once no worker maps it
            h.release(g.seg)
            return
        if not e.pools:  # no running pool left to reuse it
            _retire(e)
            return
        if e.sync:
            pass  # a write during the call was held back (its block copied first)
        elif e.tracked and not e.warned and _written_inside(e, h.track_dirty(e.page_lo, e.page_len, False)):
            _warn_written(e)
        if e.tracked and not e.between:
            h.track_remove(e.page_lo, e.page_len)
            e.tracked = False
        g.last_used = time.monotonic()
        _idle.add(g)
        _evict_over_cap()
    _unpin_when_unmapped()


def _evict_over_cap() -> None:
    """Keep the page caches within ``LAZYSHARE_CACHE_MAX`` between calls:
    empty those of arrays no call reads now, least recently used first (their
    next call fills them again). Caches that running calls read are never
    touched, so they may pass it while those calls run."""
    h = _handler()
    cap = settings.read().cache_max
    gens = [e.gen for e in _entries.values() if e.gen is not None]
    sizes = {g: h.cache_resident(g.seg) for g in gens}
    total = sum(sizes.values())
    for g in sorted((g for g in gens if g.users == 0 and sizes[g]), key=lambda g: g.last_used):
        if total <= cap:
            break
        _totals["bytes_evicted"] += h.cache_punch(g.seg, [(0, g.entry.page_len)])
        total -= sizes[g]


def _new_gen(e: _Entry, root: Any) -> _Gen:
    h = _handler()
    seg = h.export_memory(root, e.page_lo, e.page_len)
    try:
        seg = h.add_cache(seg)
    except BaseException:
        h.release(seg)
        raise
    _totals["generations"] += 1
    return _Gen(seg, e)


def _refresh(e: _Entry, root: Any) -> None:
    """Before a call reuses ``e``: start a new generation if the parent wrote
    to it since the current one began."""
    h = _handler()
    low, high = e.key
    whole = [(low, high)]
    if e.tracked:
        ranges = h.track_dirty(e.page_lo, e.page_len, reprotect=True)
        if ranges is None:  # tracking lost (moved, unmapped and mapped anew): all written
            h.track_remove(e.page_lo, e.page_len)
            e.tracked = h.track_add(e.page_lo, e.page_len) == 0
            ranges = whole
        elif e.between and sum(b - a for a, b in ranges) * 2 >= e.page_len:
            # Mostly rewritten since the last call: tracking between calls costs
            # the parent a fault per page it writes and saves little. Track only
            # while calls run (writes during a call are still reported) and drop
            # the whole cache at each call, until _RETRACK_AFTER calls from now.
            e.between = False
            e.calls_untracked = 0
    elif e.trackable and h.track_add(e.page_lo, e.page_len) == 0:
        e.tracked = True  # armed for this call (tracking only while calls run)
        e.calls_untracked += 1
        if e.calls_untracked >= _RETRACK_AFTER:
            e.between = True  # and between calls again: the writes may have calmed
        ranges = whole
    else:
        ranges = whole
    g = e.gen
    if not ranges:
        _totals["bytes_reused"] += h.cache_resident(g.seg)
        return
    if g.users > 0:  # a running call still reads this generation: keep it for that call
        if _written_inside(e, ranges):
            _warn_written(e)
        e.gen = _new_gen(e, root)
        return
    spans = []
    for a, b in ranges:
        a, b = max(a, e.page_lo) - e.page_lo, min(b, e.page_lo + e.page_len) - e.page_lo
        if a < b:
            spans.append((a, b))
    _totals["bytes_invalidated"] += h.cache_punch(g.seg, spans)
    _totals["bytes_reused"] += h.cache_resident(g.seg)


def _snapshots_allowed(root: Any) -> bool:
    """Whether writes to ``root``'s memory can be held back for snapshots: on
    the full rung (a synchronous write-protect fault taken in kernel mode fails
    with EFAULT on the user-mode-only one), for a numpy array that owns its data
    (its memory is freed only after the array dies, and so after tracking ends:
    numpy refuses to resize an array that has a weak reference)."""
    import numpy as np

    return (
        isinstance(root, np.ndarray)
        and root.base is None
        and root.flags.owndata
        and _handler().capabilities().mode == "uffd"
    )


def _track(e: _Entry, root: Any) -> None:
    """Start tracking a new entry: synchronously where snapshots are allowed
    (then ``e.sync``), else asynchronously (writes during a call are reported,
    not held back)."""
    h = _handler()
    if e.gen.seg.cache_ino and _snapshots_allowed(root):  # the cache keeps what a snapshot needs
        if e.in_lo >= e.in_hi or h.track_add(e.in_lo, e.in_hi - e.in_lo, sync=True) == 0:
            e.sync = e.tracked = e.trackable = True
            return
    if h.track_add(e.page_lo, e.page_len) == 0:
        e.tracked = e.trackable = True


def _tracked_range(e: _Entry) -> tuple[int, int]:
    if e.sync:
        return e.in_lo, e.in_hi - e.in_lo
    return e.page_lo, e.page_len


def _open_snap(e: _Entry, g: _Gen) -> None:
    """From now on, a write to the array's own pages first copies its block
    into ``g``'s cache."""
    if e.in_lo < e.in_hi and e.tracked:
        g.snap = _handler().snap_begin(g.seg, e.in_lo, e.in_hi - e.in_lo) == 0
    else:
        g.snap = True  # nothing tracked: the shared pages are copied in _fill_edges


def _close_snap(e: _Entry, g: _Gen) -> None:
    g.snap = False
    if e.in_lo < e.in_hi and not _handler().snap_end(g.seg, e.in_lo):
        _warn_broken(e)


def _fill_edges(e: _Entry, g: _Gen) -> None:
    """Copy the pages the array shares with other objects into ``g``'s cache
    now: they are not tracked (a write there by another object, or by malloc,
    must never wait), so their bytes as of this call are kept this way."""
    for lo, hi in e.edges()[1]:
        _handler().cache_fill(g.seg, lo - e.page_lo, hi - lo)


def _sync_dirty(e: _Entry) -> list[tuple[int, int]]:
    """The blocks of the array's own pages written since the last call (and
    protected again)."""
    if e.in_lo >= e.in_hi or not e.tracked:
        return [(e.in_lo, e.in_hi)] if e.in_lo < e.in_hi else []
    h = _handler()
    ranges = h.track_dirty(e.in_lo, e.in_hi - e.in_lo, reprotect=True)
    if ranges is None:  # part of it was unmapped: all written; track what is there now
        h.track_remove(e.in_lo, e.in_hi - e.in_lo)
        e.tracked = h.track_add(e.in_lo, e.in_hi - e.in_lo, sync=True) == 0
        ranges = [(e.in_lo, e.in_hi)]
    return ranges


def _refresh_sync(e: _Entry, root: Any) -> None:
    """``_refresh`` for snapshot entries. Tracking says which blocks were
    written; comparing their cached pages with the array says which pages
    changed (a write of the same bytes changes nothing)."""
    h = _handler()
    g = e.gen
    idle = g.users == 0
    if idle:  # open first: a write from here on is held back for this call
        _open_snap(e, g)
    dirty = _sync_dirty(e)
    spans = [(a - e.page_lo, b - e.page_lo) for a, b in dirty + e.edges()[0]]
    if idle:
        # Mostly changed since the last call: the cache would be filled anew,
        # which costs more than the workers fetching directly (a page copied
        # into the cache, then mapped). This call bypasses it (the cache keeps
        # only what the snapshot needs); calls use it again once they find the
        # array mostly unchanged (after a call that bypassed it, the cache
        # cannot tell: mostly written counts as mostly changed).
        dropped = h.cache_refresh(g.seg, spans, punch=True)
        _totals["bytes_invalidated"] += dropped
        half = max(1, e.in_hi - e.in_lo) / 2
        g.direct = dropped >= half or (g.direct and sum(b - a for a, b in dirty) >= half)
        if not g.direct:
            _totals["bytes_reused"] += h.cache_resident(g.seg)
        _fill_edges(e, g)
        return
    if not h.cache_refresh(g.seg, spans, punch=False):
        _totals["bytes_reused"] += h.cache_resident(g.seg)
        return  # the running calls' snapshot is the array as it is now: share it
    # Changed since the running calls began: they keep their snapshot, this
    # call gets a new one (a fresh segment with an empty cache).
    e.gen = g2 = _new_gen(e, root)
    _open_snap(e, g2)
    _sync_dirty(e)  # written before it opened: in the array as this call sees it
    _fill_edges(e, g2)


def _written_inside(e: _Entry, ranges) -> bool:
    """Whether ``ranges`` (None: tracking lost) cover a page lying wholly in the
    array. The first and last pages may be shared with other objects (the heap)
    whose writes are no sign of the array being written: they are dropped from
    the cache like the others, but never warned about."""
    if ranges is None:
        return True
    return any(min(b, e.in_hi) > max(a, e.in_lo) for a, b in ranges)


def _warn_once(e: _Entry, message: str) -> None:
    """One ``LazyshareWarning`` per array, naming it."""
    if e.warned:
        return
    e.warned = True
    warnings.warn(f"lazyshare: {message}", _handler().LazyshareWarning, stacklevel=5)


def _warn_written(e: _Entry) -> None:
    _warn_once(
        e,
        f"this process wrote to {e.desc} while tasks that read it were running. "
        "Those tasks may have seen the new values in pages they had not read yet "
        "(lazyshare cannot hold back the parent's writes to this array here: see "
        "lazyshare.capabilities().snapshots); later calls see the new values. Write to "
        "it once the call's results are in, or pass a copy.",
    )


def _warn_broken(e: _Entry) -> None:
    _warn_once(
        e,
        f"the snapshot of {e.desc} could not be kept whole for a call "
        "(this process discarded pages of it with madvise, or copying a block "
        "before it was overwritten failed): tasks of that call may have seen "
        "newer values in pages they had not read yet.",
    )


def _retire(e: _Entry) -> None:
    """Forget ``e`` (its array died or moved): no new call gets it; its
    current generation goes once no call uses it."""
    h = _handler()
    if e.dead:
        return
    e.dead = True
    e.ref = _dead_ref  # the array's weak reference goes now (numpy's resize checks for one)
    if _entries.get(e.key) is e:
        del _entries[e.key]
    for k, v in list(_by_root.items()):
        if v is e:
            del _by_root[k]
    if e.tracked:
        try:
            h.track_remove(*_tracked_range(e))
        except OSError:
            pass
        e.tracked = False
    g = e.gen
    if g is not None and g.users == 0:
        _idle.discard(g)
        h.release(g.seg)  # its pin, if still held, goes once no worker maps it


def _died(ref: weakref.ref) -> None:
    # The array is being deallocated (its memory is freed right after this):
    # no worker maps it (it was unpinned only once none did).
    if _h is None or _lock is None:
        return
    try:
        with _lock:
            for e in list(_entries.values()):
                if e.ref is ref:
                    _retire(e)
    except Exception:  # interpreter shutdown: the process's exit frees it all
        if not sys.is_finalizing():
            raise


def _unpin_when_unmapped() -> None:
    """Drop the strong reference of idle generations whose last mapping is
    gone (workers detach right after their task; checked every 20 ms by a
    daemon thread while some are waiting)."""
    global _idle_thread
    h = _handler()
    with _lock:
        for g in list(_idle):
            if h.holders(g.seg) <= 0:
                _idle.discard(g)
                h.set_pin(g.seg.id, None)
        if _idle and (_idle_thread is None or not _idle_thread.is_alive()):
            _idle_thread = threading.Thread(target=_idle_loop, name="lazyshare-unpin", daemon=True)
            _idle_thread.start()


def _idle_loop() -> None:
    while True:
        _idle_wake.wait(0.02)
        with _lock:
            if not _idle:
                return
        try:
            _unpin_when_unmapped()
        except Exception:  # the page server is gone (exit): nothing left to unpin for
            return


def pool_started(pool: Any) -> None:
    """``pool`` (a pool's core) runs: its calls may keep segments."""
    with _lock:
        _pools.add(id(pool))


def pool_ended(pool: Any) -> None:
    """``pool``'s dispatcher is done (safe to call twice). The segments that no
    other running pool used are let go as their calls finish: the weak
    reference to each array goes too (numpy refuses ``ndarray.resize`` on an
    array that has one)."""
    with _lock:
        _pools.discard(id(pool))
        for e in list(_entries.values()):
            e.pools.discard(id(pool))
            if not e.pools and (e.gen is None or e.gen.users == 0):
                _retire(e)


def live_segments() -> int:
    """Allocations kept across calls now."""
    with _lock:
        return len(_entries)


def stats() -> dict:
    """This process's segments kept across calls (all its pools together):
    ``segments``: allocations kept now; ``segments_untracked``: of them, those
    whose memory cannot be tracked (file-backed, shared, KSM-mergeable, a lazy
    mapping, a page tracked through a neighbour): each call drops all of their
    cache; ``bytes_cached``: bytes in their page
    caches on this host now; ``bytes_filled``: bytes copied into page caches
    so far (what the workers fetched: each page once, whichever worker
    touched it first); ``bytes_invalidated``: cached bytes dropped because
    the parent wrote them (fetched again if touched); ``generations``:
    segments exported for them so far (a new one when the parent changed an
    array that a running call still reads); ``bytes_preserved``: bytes copied
    into caches because the parent was about to overwrite them while a call
    read them (snapshots, full rung); ``bytes_reused``: bytes a call found
    in the cache when it began, summed over the calls that reused a segment
    (what their tasks could map without a request: cache hits at most);
    ``bytes_evicted``: cached bytes dropped to stay within
    ``LAZYSHARE_CACHE_MAX``."""
    h = _handler()
    with _lock:
        gens = [e.gen for e in _entries.values() if e.gen is not None]
        cached = sum(h.cache_resident(g.seg) for g in gens) if gens else 0
        ctr = h.owner_counters()
        return {
            "segments": len(gens),
            "segments_untracked": sum(1 for e in _entries.values() if e.gen is not None and not e.trackable),
            "bytes_cached": cached,
            "bytes_filled": ctr["cache_bytes_filled"],
            "bytes_preserved": ctr["snap_bytes_preserved"],
            "bytes_reused": _totals["bytes_reused"],
            "bytes_evicted": _totals["bytes_evicted"],
            "bytes_invalidated": _totals["bytes_invalidated"],
            "generations": _totals["generations"],
        }


def _after_fork_in_child() -> None:
    global _lock, _idle_thread
    _lock = threading.RLock()
    _entries.clear()
    _by_root.clear()
    _idle.clear()
    _pools.clear()
    _idle_thread = None


os.register_at_fork(after_in_child=_after_fork_in_child)
