"""The short CI version of benchmarks/soak.py: churn and random kills, every
result checked against numpy, every failure the WorkerLostError of a kill."""

from __future__ import annotations

import importlib.util
import os

import pytest
from conftest import DEADLINE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _soak():
    spec = importlib.util.spec_from_file_location("soak", os.path.join(ROOT, "benchmarks", "soak.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(DEADLINE * 2)
def test_short_soak_with_churn_and_kills():
    r = _soak().run(
        tasks=1000, size_gib=0.25, kill_every=150, maxtasksperchild=50, seed=7, log=lambda *_: None
    )
    assert r["tasks"] == 1000
    assert r["wrong"] == 0
    assert r["unexpected"] == []
    assert r["kills"] >= 4
    assert r["failures"] == r["expected_failures"]
    assert r["ok"] + r["failures"] == 1000 and r["ok"] >= 900
    assert r["seconds"] < 90
    assert r["rss_end"] < r["rss_start"] + (128 << 20), (r["rss_start"] >> 20, r["rss_end"] >> 20)
