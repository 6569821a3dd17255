"""Processes for tests/test_dask_hosts.py, each started inside a network
namespace: a scheduler, a worker, and a client that shares an array.

Arguments: role, then a JSON object (certificate paths, addresses, the case).
The client prints JSON lines: its install report, then what the case measured."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import numpy as np


def security(cfg):
    from distributed import Security

    return Security(
        require_encryption=True,
        tls_ca_file=cfg["ca"],
        tls_client_cert=cfg["cert"],
        tls_client_key=cfg["key"],
        tls_scheduler_cert=cfg["cert"],
        tls_scheduler_key=cfg["key"],
        tls_worker_cert=cfg["cert"],
        tls_worker_key=cfg["key"],
    )


async def scheduler(cfg):
    from distributed import Scheduler

    async with Scheduler(
        host=cfg["host"], port=0, security=security(cfg), protocol="tls", dashboard=False
    ) as s:
        with open(cfg["file"] + ".tmp", "w") as f:
            f.write(s.address)
        os.rename(cfg["file"] + ".tmp", cfg["file"])
        await s.finished()


async def worker(cfg):
    from distributed import Worker

    async with Worker(cfg["scheduler"], host=cfg["host"], nthreads=1, security=security(cfg)) as w:
        await w.finished()


def out(**kw):
    print(json.dumps(kw), flush=True)


def veth_tx(dev):
    with open(f"/sys/class/net/{dev}/statistics/tx_bytes") as f:
        return int(f.read())


def client(cfg):
    from _dask_funcs import fault_handler_started, slice_sum, slow_read
    from distributed import Client

    import lazyshare.dask as ld

    with Client(cfg["scheduler"], security=security(cfg), timeout=30) as c:
        c.wait_for_workers(cfg["workers"], timeout=30)
        out(report=ld.install(c, host=cfg.get("listen")))
        a = np.arange(32 << 20, dtype=np.float64)  # 256 MiB
        if cfg["case"] in ("touch", "push"):
            tx = veth_tx(cfg["dev"])
            t = time.monotonic()
            res = c.gather(c.map(slice_sum, [a] * 16, range(16)))
            elapsed = time.monotonic() - t
            tx = veth_tx(cfg["dev"]) - tx
            n = int(len(a) * 0.01)
            ok = res == [float(a[i * n : (i + 1) * n].sum()) for i in range(16)]
            out(
                ok=ok,
                veth_tx=tx,
                touched=16 * n * a.itemsize,
                elapsed=elapsed,
                link=ld.stats(),
                scheduler_mapped=c.run_on_scheduler(fault_handler_started),
                workers=sorted(c.run(os.getpid).values()),
            )
        else:  # a task that fetches slowly; the test kills us or cuts the link meanwhile
            f = c.submit(slow_read, a, pure=False)
            while not c.processing() or not any(c.processing().values()):
                time.sleep(0.05)
            time.sleep(1.0)
            out(running=True, workers=sorted(c.run(os.getpid).values()))
            try:
                f.result(timeout=120)
            except Exception as e:
                out(error=repr(e))
            time.sleep(60)


if __name__ == "__main__":
    role, cfg = sys.argv[1], json.loads(sys.argv[2])
    if role == "client":
        client(cfg)
    else:
        asyncio.run({"scheduler": scheduler, "worker": worker}[role](cfg))
