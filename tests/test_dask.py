"""lazyshare.dask on one host (LocalCluster): the API and its semantics.

Shared arrays stand for themselves in submit, map and delayed arguments at any
depth, are never pickled whole (the graph carries a few hundred bytes), are
never mapped on the scheduler, tokenize by segment, and stay shared exactly as
long as a handle or a future built from them lives. Pages go over the owner's
Unix socket on one host, over the TLS link when forced to TCP, and the
capability rung of each worker is reported. Across hosts (network namespaces):
tests/test_dask_hosts.py."""

from __future__ import annotations

import gc
import os
import pickle
import warnings

import numpy as np
import pytest
from conftest import DEADLINE, wait_for

pytest.importorskip(
    "distributed", minversion="2025.1", reason="lazyshare.dask needs dask.distributed 2025.1+ (Python 3.10+)"
)
import dask  # noqa: E402
from _dask_funcs import (  # noqa: E402
    Counter,
    chunk_sum,
    fault_handler_started,
    head,
    is_lazy,
    lazy_results,
    nested,
    served_here,
)
from distributed import Client, LocalCluster  # noqa: E402

import lazyshare.dask as ld  # noqa: E402
from lazyshare import LazyshareWarning, SegmentError  # noqa: E402
from lazyshare.errors import LinkError  # noqa: E402

pytestmark = pytest.mark.timeout(DEADLINE * 2)


def cluster(**kw):
    kw.setdefault("n_workers", 2)
    kw.setdefault("threads_per_worker", 1)
    return LocalCluster(dashboard_address=None, **kw)


def _shared_now():
    gc.collect()
    return ld.stats()["shared"]


def test_map_submit_and_delayed_on_one_host():
    a = np.arange(32 << 20, dtype=np.float64)  # 256 MiB
    with cluster() as cl, Client(cl) as c:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "large graph" warning from dask, no lazyshare warning
            report = ld.install(c)
            assert len(report) == 2
            for r in report.values():
                assert r["path"] == "ipc" and r["error"] is None
                assert r["rung"] in ("uffd", "uffd-user-mode-only", "eager")
            futs = c.map(chunk_sum, [a] * 16, range(16))
            res = c.gather(futs)
        step = len(a) // 16
        assert [r[0] for r in res] == [float(a[i * step : (i + 1) * step].sum()) for i in range(16)]
        assert len({r[1] for r in res}) == 2  # both workers took part
        # nested at any depth, through submit
        d = {"arrays": [(a,)], "other": [np.ones(3)]}
        assert c.submit(nested, d).result() == (float(a[:10].sum()) + 1.0, "ndarray")
        # share() by hand, in dask.delayed
        with ld.share(a) as h:
            assert len(pickle.dumps(h)) < 2000  # what the graph carries
            assert c.compute(dask.delayed(chunk_sum)(h, 3)).result()[0] == res[3][0]
        # the scheduler (in this process, for a LocalCluster) never mapped anything,
        # and this process never started a fault handler for it
        assert c.run_on_scheduler(fault_handler_started) is False
        del futs, res
        assert wait_for(lambda: _shared_now() == 0)


def test_tokenize_names_the_segment_not_the_bytes():
    from dask.base import tokenize

    a = np.zeros(1 << 20)
    h, h2 = ld.share(a), ld.share(a)
    try:
        t = tokenize(h)
        a[:] = 1.0  # the bytes change: the token does not (it never read them)
        assert tokenize(h) == t
        assert tokenize(h2) != t  # another segment
    finally:
        h.release()
        h2.release()


def test_lifetime_release_and_results_that_alias_lazy_memory():
    a = np.arange(1 << 22, dtype=np.float64)
    with cluster(n_workers=1) as cl, Client(cl) as c:
        ld.install(c)
        # a future keeps its auto-shared array shared; dropping it releases it
        f = c.submit(head, a)
        np.testing.assert_array_equal(f.result(), a[:100])
        assert _shared_now() == 1
        # the result the worker keeps is a copy, not a view of lazy memory
        assert c.run(lazy_results) == {w: ["False"] for w in c.run(lazy_results)}
        del f
        assert wait_for(lambda: _shared_now() == 0)
        # an explicit handle: released by hand, later tasks fail clearly
        h = ld.share(a)
        assert c.submit(is_lazy, h).result() is True  # the worker mapped it lazily
        h.release()
        with pytest.raises(SegmentError, match="unknown or already released"):
            c.submit(is_lazy, h, pure=False).result()
        # a dropped handle (no future) releases its array
        h = ld.share(a)
        assert _shared_now() == 1
        del h
        assert wait_for(lambda: _shared_now() == 0)
        # an actor class is instantiated as it is (its argument still shared)
        actor = c.submit(Counter, a, actor=True).result()
        assert actor.get().result() == float(a[:10].sum())
        del actor
        # bad input: clear errors, nothing shared
        with pytest.raises(TypeError, match="Python objects"):
            ld.share(np.array([object()]))
        with pytest.raises(ValueError, match="zero-size"):
            ld.share(np.zeros(0))
        assert _shared_now() == 0


def test_forced_tcp_on_one_host_uses_the_tls_link():
    from distributed import Security

    pytest.importorskip("cryptography", reason="Security.temporary needs cryptography")
    sec = Security.temporary()
    a = np.arange(8 << 20, dtype=np.float64)  # 64 MiB
    with cluster(security=sec, protocol="tls") as cl, Client(cl, security=sec) as c:
        try:
            report = ld.install(c, transport="tcp")
            assert {r["path"] for r in report.values()} == {"tls"}, report
            before = ld.stats()["bytes_out"]
            res = c.gather(c.map(chunk_sum, [a] * 16, range(16)))
            step = len(a) // 16
            assert [r[0] for r in res] == [float(a[i * step : (i + 1) * step].sum()) for i in range(16)]
            sent = ld.stats()["bytes_out"] - before
            # every page at least once; read-ahead past the end of each 4 MiB chunk
            # (up to one 4 MiB window) fetches some twice
            assert a.nbytes <= sent < 2.5 * a.nbytes, sent
        finally:
            ld.uninstall(c)


def test_an_unencrypted_cluster_gets_no_link_unless_insecure():
    a = np.arange(1 << 20, dtype=np.float64)
    with cluster(n_workers=1) as cl, Client(cl) as c:
        try:
            with pytest.warns(LazyshareWarning, match="cannot fetch pages.*will fail.*not encrypted"):
                report = ld.install(c, transport="tcp", push=False)
            assert all("not encrypted" in r["error"] for r in report.values())
            with pytest.raises(LinkError, match="offers no link"):
                c.submit(is_lazy, a).result()
            ld.uninstall(c)
            # by default, workers that cannot reach the client get the arrays pushed
            with pytest.warns(LazyshareWarning, match="goes once to one worker"):
                ld.install(c, transport="tcp")
            assert c.submit(chunk_sum, a, 1).result()[0] == chunk_sum(a, 1)[0]
            ld.uninstall(c)
            report = ld.install(c, transport="tcp", insecure=True)
            assert {r["path"] for r in report.values()} == {"tcp (plaintext)"}
            assert c.submit(chunk_sum, a, 2).result()[0] == chunk_sum(a, 2)[0]
        finally:
            ld.uninstall(c)


@pytest.mark.parametrize("rung", ["uffd-user-mode-only", "eager"])
def test_each_rung_reports_itself_and_serves_the_same_bytes(rung):
    a = np.arange(1 << 22, dtype=np.float64)
    with cluster(n_workers=1, env={"LAZYSHARE_MODE": rung}) as cl, Client(cl) as c:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LazyshareWarning)  # the eager rung warns in the worker
            report = ld.install(c)
        assert [r["rung"] for r in report.values()] == [rung]
        assert c.submit(chunk_sum, a, 5).result()[0] == chunk_sum(a, 5)[0]


def test_push_mode_one_worker_serves_the_others():
    a = np.arange(8 << 20, dtype=np.float64)  # 64 MiB
    with cluster() as cl, Client(cl) as c:
        ld.install(c, share_above=None)
        with ld.share(a, push=True, client=c) as h:
            assert h.spec.pid != os.getpid()  # a worker owns the segment
            res = c.gather(c.map(chunk_sum, [h] * 16, range(16)))
            step = len(a) // 16
            assert [r[0] for r in res] == [float(a[i * step : (i + 1) * step].sum()) for i in range(16)]
            assert sorted(c.run(served_here).values()) == [0, 1]  # one worker serves it
            assert c.submit(is_lazy, h).result() in (True, False)  # the server itself gets its copy
        assert wait_for(lambda: sorted(c.run(served_here).values()) == [0, 0])
        assert _shared_now() == 0
