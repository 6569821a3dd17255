"""The merge's native entry points (csrc/merge.c) called directly: the sparse
form a worker sends for pages whose twin is zeros (a mask and the non-zero
words), and the checks that refuse a malformed one whole."""

from __future__ import annotations

import errno
import mmap

import numpy as np
import pytest

from lazyshare.handler import ffi, lib

pytestmark = pytest.mark.timeout(60)

PS = mmap.PAGESIZE
PER = PS // 512  # mask words per page


@pytest.fixture
def seg():
    """A fresh 16-page anonymous array (never written: every page's twin is
    zeros) and its merge context."""
    buf = mmap.mmap(-1, 16 * PS)
    arr = np.frombuffer(buf, np.uint64)
    base = arr.ctypes.data
    ctx = lib.ls_merge_new(16 * PS)
    assert ctx != ffi.NULL
    zeros = np.empty(2 * 16, np.uint64)
    n = lib.ls_merge_zeros(ctx, base, ffi.cast("uint64_t *", zeros.ctypes.data), 16)
    if n == -errno.ENOTTY:
        lib.ls_merge_free(ctx)
        pytest.skip("no PAGEMAP_SCAN (Linux 6.7+): no page has zeros for twin")
    assert n >= 1 and zeros[0] == 0 and zeros[2 * n - 1] >= 16 * PS
    try:
        yield arr, base, ctx
    finally:
        lib.ls_merge_free(ctx)  # the mapping goes with the last array over it


def sparse(pages: dict[int, dict[int, int]]):
    """{page: {word: value}} as (offsets, masks, words)."""
    offs, masks, words = [], [], []
    for p in sorted(pages):
        offs.append(p * PS)
        m = np.zeros(PER, np.uint64)
        for w in sorted(pages[p]):
            m[w // 64] |= np.uint64(1 << (w % 64))
            words.append(pages[p][w])
        masks.extend(m.tolist())
    return np.array(offs, np.uint64), np.array(masks, np.uint64), np.array(words, np.uint64)


def native(fn, ctx, base, *args, unit=8, last=0):
    """fn(ctx, base, *args, unit, last, conflict): (its return, the conflict)."""
    conflict = ffi.new("uint64_t[3]")
    rc = fn(ctx, ffi.cast("uint8_t *", base), *args, unit, last, conflict)
    return rc, list(conflict)


def u64p(a: np.ndarray):
    return ffi.cast("uint64_t *", a.ctypes.data)


def apply(ctx, base, offs, masks, words, unit=8, last=0):
    """ls_merge_sparse of (offsets, masks, words)."""
    args = u64p(offs), len(offs), u64p(masks), u64p(words), len(words)
    return native(lib.ls_merge_sparse, ctx, base, *args, unit=unit, last=last)


def test_sparse_words_land_and_conflict_by_element(seg):
    arr, base, ctx = seg
    rc, c = apply(ctx, base, *sparse({0: {0: 5, 511: 7}, 3: {100: 0x0102}}))
    assert rc == 4 and c[0] == 0  # bytes changed: those of 5, 7 and 0x0102
    w = PS // 8
    assert arr[0] == 5 and arr[511] == 7 and arr[3 * w + 100] == 0x0102
    assert np.count_nonzero(arr) == 3
    # Another task: the same value again is no conflict; another value is.
    rc, c = apply(ctx, base, *sparse({0: {0: 5, 1: 9}, 3: {100: 0x0203}}))
    assert rc == 1 and c[0] == 8 and c[1] == 3 * PS + 800 and c[2] == 3 * PS + 808
    assert arr[3 * w + 100] == 0x0102 and arr[1] == 9  # the earlier value stays; the rest lands
    # 1-byte items: the bytes nobody else changed land, the one both did is a conflict
    rc, c = apply(ctx, base, *sparse({3: {100: 0x0300FF}}), unit=1)
    assert rc == 1 and c[0] == 1 and arr[3 * w + 100] == 0x030102
    rc, c = apply(ctx, base, *sparse({3: {100: 0x0909}}), unit=8, last=1)
    assert c[0] == 8 and arr[3 * w + 100] == 0x0909  # last writer wins, whole


def test_a_malformed_message_is_refused_whole(seg):
    arr, base, ctx = seg
    offs, masks, words = sparse({0: {0: 1}, 1: {0: 2, 1: 3}})
    # one word short, one word too many: nothing applied
    assert apply(ctx, base, offs, masks, words[:-1])[0] == -errno.EPROTO
    assert apply(ctx, base, offs, masks, np.append(words, 4).astype(np.uint64))[0] == -errno.EPROTO
    # a page past the end, or not on a page boundary
    assert apply(ctx, base, np.array([0, 16 * PS], np.uint64), masks, words)[0] == -errno.ERANGE
    assert apply(ctx, base, np.array([8, PS], np.uint64), masks, words)[0] == -errno.ERANGE
    assert not arr.any()


def test_a_page_whose_twin_is_not_zeros_is_refused(seg):
    arr, base, ctx = seg
    buf = mmap.mmap(-1, 4 * PS)
    other = np.frombuffer(buf, np.uint64)
    other[:] = 1  # written before the merge's context: no page has zeros for twin
    ctx2 = lib.ls_merge_new(4 * PS)
    try:
        zeros = np.empty(8, np.uint64)
        n = lib.ls_merge_zeros(ctx2, other.ctypes.data, ffi.cast("uint64_t *", zeros.ctypes.data), 4)
        assert n == 0
        rc, _ = apply(ctx2, other.ctypes.data, *sparse({1: {0: 9}}))
        assert rc == -errno.EPROTO and (other == 1).all()
    finally:
        lib.ls_merge_free(ctx2)


def apply_dense(ctx, base, runs, src, unit=8, last=0):
    """ls_merge_apply of (offset, length) runs whose bytes follow each other in src."""
    runs = np.array(runs, np.uint64).reshape(-1, 2)
    return native(
        lib.ls_merge_apply, ctx, base, u64p(runs), len(runs), ffi.from_buffer(src), unit=unit, last=last
    )


def test_whole_pages_over_zeros(seg):
    arr, base, ctx = seg
    w = PS // 8
    first = np.arange(1, w + 1, dtype=np.uint64)
    rc, c = apply_dense(ctx, base, [(2 * PS, PS)], first)
    assert c[0] == 0 and rc == np.count_nonzero(first.view(np.uint8))  # the bytes changed
    assert (arr[2 * w : 3 * w] == first).all()
    # A second task: its zeros change nothing, the same value is no conflict,
    # another value where the first wrote is one (and stays the first's).
    second = np.zeros(w, np.uint64)
    second[0] = first[0]
    second[5] = 99
    rc, c = apply_dense(ctx, base, [(2 * PS, PS)], second)
    assert rc == 0 and c[0] == 8 and c[1] == 2 * PS + 40 and c[2] == 2 * PS + 48
    assert (arr[2 * w : 3 * w] == first).all()
    # A run that is not whole words: byte items, all of them over zeros.
    tail = np.arange(1, 101, dtype=np.uint8)
    rc, c = apply_dense(ctx, base, [(3 * PS, 100)], tail, unit=1)
    assert rc == 100 and c[0] == 0
    assert bytes(arr[3 * w : 3 * w + 13].view(np.uint8)[:100]) == bytes(tail)
