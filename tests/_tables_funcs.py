"""Functions run by pool workers in tests/test_tables.py."""

from __future__ import annotations

import numpy as np

from lazyshare import handler


def maps_lines() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def first_and_regions(view):
    return float(view[0]), handler.stats()["regions_attached"], maps_lines()


def write_then_read(x, y, i, j):
    """Write x[i], then read y[j]: the same byte of the owner's array if the
    views overlap there; return what y shows and how many regions are live."""
    x[i] = -1.0
    return float(y[j]), handler.stats()["regions_attached"]


def same_object(x, y):
    return x is y, handler.stats()["regions_attached"]


def overlap_probe(views):
    """In the worker: lazy_overlap of each view's bytes, and of a fresh array."""
    bounds = getattr(np.lib, "array_utils", np).byte_bounds
    inside = [handler.lazy_overlap(*_span(bounds(v))) for v in views]
    fresh = np.ones(1 << 18)
    lo, hi = bounds(fresh)
    return inside, handler.lazy_overlap(lo, hi - lo), handler.stats()["regions_attached"]


def _span(b):
    return b[0], b[1] - b[0]
