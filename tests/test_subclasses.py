"""Big instances of ndarray subclasses go lazily and arrive as what they were
(or as numpy's own pickling would rebuild them)."""

from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import tracemalloc
import warnings

import _subclass_funcs as sf
import numpy as np
import pytest
from conftest import DEADLINE

from lazyshare import serialization
from lazyshare.handler import LazyshareWarning
from lazyshare.pool import Pool

pytestmark = pytest.mark.timeout(DEADLINE)

MiB = 1 << 20
N = 4 * MiB  # float64 elements: 32 MiB
LO, HI = N // 2, N // 2 + N // 64  # a task touches 1/64 of it


@pytest.fixture
def p():
    pool = Pool(1)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def run(p, arr, lo=LO, hi=HI):
    before = p.stats()["totals"]
    got = p.apply(sf.describe, (arr, lo, hi))
    after = p.stats()["totals"]
    moved = {k: after[k] - before[k] for k in ("bytes_pickled", "bytes_lazy")}
    return got, moved


def assert_lazy(moved, whole):
    assert moved["bytes_pickled"] < 64 << 10, moved
    assert 0 < moved["bytes_lazy"] < whole // 4, moved


def test_user_subclass_keeps_class_and_attributes(p):
    a = np.arange(N, dtype=np.float64).view(sf.Tagged)
    a.unit = "m"
    a.extra = {"k": 1}
    got, moved = run(p, a)
    assert got["type"] is sf.Tagged and got["shape"] == a.shape and got["dtype"] == a.dtype
    assert got["dict"] == {"unit": "m", "extra": {"k": 1}}  # numpy's pickling would lose them
    assert got["sum"] == float(np.asarray(a[LO:HI]).sum())
    assert_lazy(moved, a.nbytes)
    # a view of it: same base, same class (a range the first call did not read:
    # pages it read stay in the segment's cache and would not move again)
    lo, hi = LO // 2, LO // 2 + N // 64
    got, moved = run(p, a[1:], lo - 1, hi - 1)
    assert got["type"] is sf.Tagged and got["dict"]["unit"] == "m"
    assert got["sum"] == float(np.asarray(a[lo:hi]).sum())
    assert_lazy(moved, a.nbytes)


def test_unpicklable_attribute_is_dropped_with_a_warning(p):
    a = np.arange(N, dtype=np.float64).view(sf.Tagged)
    a.unit = "s"
    a.lock = __import__("threading").Lock()
    serialization._warned.discard(("state", sf.Tagged))
    with pytest.warns(LazyshareWarning, match="could not be pickled"):
        got, moved = run(p, a)
    assert got["type"] is sf.Tagged and got["dict"] == {"unit": "none"}  # as numpy's pickling
    assert_lazy(moved, a.nbytes)


def test_own_pickling_is_respected(p):
    a = np.arange(N // 8, dtype=np.float64).view(sf.OwnPickling)
    a.unit = "kg"
    serialization._warned.discard(("whole", sf.OwnPickling))
    with pytest.warns(LazyshareWarning, match="pickled whole"):
        got, moved = run(p, a, 0, 10)
    assert got["type"] is sf.OwnPickling and got["dict"] == {"unit": "kg"}
    assert moved["bytes_pickled"] >= a.nbytes  # its __reduce__ ran


def test_object_dtype_subclass_is_pickled(p):
    a = np.empty(300_000, dtype=object).view(sf.Tagged)  # 2.4 MB of pointers
    a[:] = 1
    got, moved = run(p, a, 0, 1000)
    assert got["type"] is sf.Tagged and got["sum"] == 1000.0
    assert moved["bytes_lazy"] == 0


def test_recarray(p):
    r = np.rec.fromarrays([np.arange(N // 2, dtype=np.float64), np.ones(N // 2)], names="x,y")
    expect = pickle.loads(pickle.dumps(r, 5))
    got, moved = run(p, r, LO // 2, HI // 2)
    assert got["type"] is type(expect) is np.recarray and got["dtype"] == expect.dtype
    assert got["field_x"] == float(r.x[LO // 2 : HI // 2].sum())
    assert_lazy(moved, r.nbytes)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_matrix(p):
    m = np.asmatrix(np.arange(N, dtype=np.float64).reshape(1024, -1))
    got, moved = run(p, m, 512, 520)
    assert got["type"] is np.matrix and got["shape"] == (1024, N // 1024)
    assert got["matrix_row"] == "matrix" and got["sum"] == float(m[512:520].sum())
    assert_lazy(moved, m.nbytes)


def test_masked_array_data_and_mask_lazy(p):
    data = np.arange(N, dtype=np.float64)
    mask = (np.arange(N) % 3) == 0  # 4 MiB of mask: big enough to go lazily too
    ma = np.ma.masked_array(data, mask=mask, fill_value=-1.0, hard_mask=True)
    got, moved = run(p, ma)
    part = ma[LO:HI]
    g = got["masked"]
    assert got["type"] is np.ma.MaskedArray and g["baseclass"] is np.ndarray
    assert g["fill_value"] == -1.0 and g["hardmask"] is True and not g["nomask"]
    assert g["count"] == int(part.count()) and g["masked_sum"] == float(part.sum())
    assert g["filled"] == float(part.filled().sum())
    assert g["after_write"] is True  # hard mask: the write did not unmask it
    assert_lazy(moved, data.nbytes + mask.nbytes)
    assert not ma.mask[LO + (-LO % 3)] or ma[LO + (-LO % 3)] is np.ma.masked  # parent untouched


def test_masked_array_without_mask_and_soft(p):
    ma = np.ma.masked_array(np.arange(N, dtype=np.float64))
    got, moved = run(p, ma)
    g = got["masked"]
    assert g["nomask"] and not g["hardmask"] and g["count"] == HI - LO
    assert g["after_write"] is False
    assert_lazy(moved, ma.nbytes)


@pytest.mark.parametrize("mode", ["r", "r+", "c"])
def test_memmap_arrives_as_unpickling_gives(p, tmp_path, mode):
    path = tmp_path / "m.bin"
    np.arange(N, dtype=np.float64).tofile(path)
    m = np.memmap(path, dtype=np.float64, mode=mode)
    expect = pickle.loads(pickle.dumps(m, 5))
    got, moved = run(p, m)
    assert got["type"] is type(expect) is np.memmap
    assert (
        got["memmap"]
        == (None, None, None, None)
        == (expect._mmap, expect.filename, expect.offset, expect.mode)
    )
    assert got["sum"] == float(m[LO:HI].sum())
    assert_lazy(moved, m.nbytes)
    tm = np.memmap(path, dtype=np.float64, mode=mode).view(sf.TaggedMemmap)
    got, moved = run(p, tm)
    assert got["type"] is sf.TaggedMemmap and got["memmap"] == (None, None, None, None)
    assert got["sum"] == float(m[LO:HI].sum())
    del m, tm


def test_masked_memmap(p, tmp_path):
    path = tmp_path / "m.bin"
    np.arange(N, dtype=np.float64).tofile(path)
    ma = np.ma.masked_array(np.memmap(path, dtype=np.float64, mode="r"), mask=np.zeros(N, bool))
    got, moved = run(p, ma)
    assert got["type"] is np.ma.MaskedArray and got["masked"]["baseclass"] is np.memmap
    assert got["masked"]["data_type"] is np.memmap
    assert got["masked"]["masked_sum"] == float(np.arange(N, dtype=np.float64)[LO:HI].sum())
    assert_lazy(moved, 2 * N * 8)


def _resident_pages(path) -> int:
    """Pages of the file in the page cache (mincore over a fresh mapping)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    try:
        npages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * npages)()
        arr = np.frombuffer(mm, dtype=np.uint8)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        if libc.mincore(ctypes.c_void_p(arr.ctypes.data), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        del arr
        return sum(v & 1 for v in vec)
    finally:
        mm.close()


def test_sparse_read_of_a_big_memmap_reads_only_what_is_touched(p, tmp_path):
    """The owner serves a file-backed export from the mapping itself: only the
    pages a task touches (plus read-ahead) are read from the file, never all
    of it to find which are zeros (a sparse file's holes are in the page
    cache once read)."""
    path = tmp_path / "big.bin"
    size = 1 << 30
    with open(path, "wb") as f:
        f.truncate(size)  # a hole: nothing in the page cache
        f.seek(size // 2)
        f.write(np.arange(1024, dtype=np.float64).tobytes())
    before = _resident_pages(path)
    assert before * mmap.PAGESIZE < 1 * MiB
    m = np.memmap(path, dtype=np.float64, mode="r")
    lo = size // 2 // 8
    got, moved = run(p, m, lo, lo + 2 * MiB // 8)  # touch 2 MiB of 1 GiB
    assert got["sum"] == float(np.arange(1024).sum())
    read = (_resident_pages(path) - before) * mmap.PAGESIZE
    assert read < 64 * MiB, read
    assert moved["bytes_lazy"] < 64 * MiB and moved["bytes_pickled"] < 64 << 10
    del m


def test_fast_path_stops_at_a_big_subclass_before_copying_it():
    r = np.zeros(N, dtype=[("x", "f8")]).view(np.recarray)
    tracemalloc.start()
    try:
        assert serialization._dumps_small(float(MiB), ((r, 1),)) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < r.nbytes // 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = np.zeros(100).view(sf.Tagged)
        frames = serialization._dumps_small(float(MiB), ((small, 1),))
        assert frames is not None and type(serialization.loads(frames)[0][0]) is sf.Tagged
