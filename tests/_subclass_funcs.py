"""Functions and ndarray subclasses for tests/test_subclasses.py (importable by
reference, so that workers rebuild the same classes)."""

from __future__ import annotations

import numpy as np


class Tagged(np.ndarray):
    """A subclass that keeps an attribute through views (``__array_finalize__``)."""

    def __array_finalize__(self, obj):
        self.unit = getattr(obj, "unit", "none")


class OwnPickling(np.ndarray):
    """A subclass that pickles its own way (numpy's documented recipe)."""

    def __reduce__(self):
        rebuild, args, state = super().__reduce__()
        return rebuild, args, (*state, getattr(self, "unit", None))

    def __setstate__(self, state):
        self.unit = state[-1]
        super().__setstate__(state[:-1])


class TaggedMemmap(np.memmap):
    pass


def describe(a, lo, hi):
    """What a task sees of an argument: its class, attributes and a slice's sum."""
    d = {
        "type": type(a),
        "shape": a.shape,
        "dtype": a.dtype,
        "dict": {k: v for k, v in getattr(a, "__dict__", {}).items() if k != "_mask"},
        "sum": None if a.dtype.names else float(np.asarray(a[lo:hi]).sum()),
    }
    if isinstance(a, np.memmap):
        d["memmap"] = (a._mmap, a.filename, a.offset, a.mode)
    if isinstance(a, np.ma.MaskedArray):
        part = a[lo:hi]
        d["dict"] = {}
        d["masked"] = {
            "baseclass": a._baseclass,
            "data_type": type(a.data),
            "fill_value": a.fill_value.item(),
            "hardmask": a.hardmask,
            "count": int(part.count()),
            "masked_sum": float(part.sum()),
            "nomask": a.mask is np.ma.nomask,
            "filled": float(part.filled().sum()),
        }
        if a.flags.writeable:
            a[lo] = np.ma.masked
            a[lo] = 42.0  # a hard mask keeps a masked element masked
            d["masked"]["after_write"] = bool(a.mask[lo])
        d["unit"] = getattr(a, "unit", None)
    if isinstance(a, np.recarray):
        d["field_x"] = float(a.x[lo:hi].sum())
    if isinstance(a, np.matrix):
        d["matrix_row"] = type(a[lo]).__name__
    return d
