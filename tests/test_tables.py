"""Costs that must not grow with table sizes: structural checks (no timings;
those are in benchmarks/bench_tables.py)."""

from __future__ import annotations

import pytest
from conftest import DEADLINE

from lazyshare import handler

pytestmark = pytest.mark.timeout(DEADLINE)


def test_lazy_overlap_finds_the_one_candidate_mapping():
    base = 1 << 44  # far from anything this process maps
    regions = {}
    try:
        for k in range(1000):
            regions[10**9 + k] = (base + k * 3 * 4096, 2 * 4096)  # gaps of a page between them
            handler._attached_add(10**9 + k, *regions[10**9 + k])
        assert handler.lazy_overlap(base, 1)
        assert handler.lazy_overlap(base + 2 * 4096 - 1, 1)
        assert not handler.lazy_overlap(base + 2 * 4096, 4096)  # the gap
        assert handler.lazy_overlap(base + 2 * 4096, 4097)  # reaches the next one
        assert not handler.lazy_overlap(base - 4096, 4096)
        assert handler.lazy_overlap(base - 4096, 4097)
        assert handler.lazy_overlap(base + 500 * 3 * 4096 + 100, 8)
        assert not handler.lazy_overlap(base + 999 * 3 * 4096 + 2 * 4096, 1 << 20)
        assert not handler.lazy_overlap(base, 0)
        for k in range(0, 1000, 2):
            handler._attached_remove(10**9 + k)
        assert not handler.lazy_overlap(base, 2 * 4096)
        assert handler.lazy_overlap(base + 3 * 4096, 1)
        assert handler.lazy_overlap(base, 1 << 40)
    finally:
        for r in regions:
            handler._attached_remove(r)
    assert not handler.lazy_overlap(base, 1 << 40)
