"""lazyshare.dask across hosts: network namespaces joined by a shaped veth.

    python benchmarks/bench_dask.py [--size-mib 1024] [--runs 3] [--rates 1gbit,10gbit]
                                    [--transports tls,tcp]

Needs root (network namespaces, tc) and dask[distributed] + cryptography. The
client and its array (float64, --size-mib) sit in one namespace; the scheduler
and 2 single-thread workers in another; the veth between them is shaped with
``tbf`` to each rate in both directions. Transports: ``tls`` (the cluster and
lazyshare's link in TLS 1.3, Security.temporary()) and ``tcp`` (plaintext
both, install(insecure=True)). Every process runs under ``ip netns exec``
(a mount namespace of its own), so lazyshare takes its TCP link, as between
hosts.

Workloads, 16 tasks each (results checked against the client's own numpy):

1%      task i sums a different 1% of the array (a[i*k:(i+1)*k], k = n/100).
        lazyshare: client.map after install(client).
        embedded: Client.map with the array in the arguments (not the wrapped
        map: Dask puts the array in the graph), in 8 waves of 2 tasks (one
        per worker), each wave's futures released before the next: every
        task's message to its worker carries the whole array, and the 16
        tasks submitted at once paused a worker at 11 GiB of 11.8.
        scatter-bcast: client.scatter(a, broadcast=True), then the map.
1/16    task i sums a different 1/16 of the array.
        lazyshare, and scatter: one client.scatter(a) (no broadcast) + the map.

Reported per row: time to the first result and to the last (medians of
--runs), bytes that crossed the veth towards the workers, and the peak RSS of
the scheduler and of the biggest worker (VmHWM, reset before each run). Read
the ratios. Aims (issue): 1% >= 20x faster than embedded and than
scatter-bcast; 1/16 no slower than scatter; bytes <= 1.1x touched plus
read-ahead; the scheduler never holds the array.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.abspath(__file__)
N = 16


# ------------------------------------------------------------------ roles (inside a namespace)


def _security(cfg):
    if not cfg.get("ca"):
        return None
    from distributed import Security

    kw = {}
    for role in ("client", "scheduler", "worker"):
        kw[f"tls_{role}_cert"], kw[f"tls_{role}_key"] = cfg["cert"], cfg["key"]
    return Security(require_encryption=True, tls_ca_file=cfg["ca"], **kw)


async def _scheduler(cfg):
    from distributed import Scheduler

    sec = _security(cfg)
    proto = "tls" if sec else "tcp"
    async with Scheduler(host=cfg["host"], port=0, security=sec, protocol=proto, dashboard=False) as s:
        with open(cfg["file"] + ".tmp", "w") as f:
            f.write(s.address)
        os.rename(cfg["file"] + ".tmp", cfg["file"])
        await s.finished()


async def _worker(cfg):
    from distributed import Worker

    async with Worker(cfg["scheduler"], host=cfg["host"], nthreads=1, security=_security(cfg)) as w:
        await w.finished()


def part_sum(a, i, parts):
    k = len(a) // parts
    return float(a[i * k : (i + 1) * k].sum())


def _tx(dev):
    with open(f"/sys/class/net/{dev}/statistics/tx_bytes") as f:
        return int(f.read())


def _client(cfg):
    import numpy as np
    from distributed import Client, wait

    import lazyshare.dask as ld

    sec = _security(cfg)
    # the task function by reference (the workers import this file as a module),
    # not pickled by value from __main__ on every submission
    sys.path.insert(0, os.path.dirname(HERE))
    from bench_dask import part_sum

    n = cfg["size_mib"] << 17
    a = np.arange(n, dtype=np.float64)
    expect = {p: [float(a[i * (n // p) : (i + 1) * (n // p)].sum()) for i in range(N)] for p in (100, N)}
    # One client: lazyshare through the instance's submit/map that install()
    # wraps, the baselines through Client.map itself. (Two clients in one
    # process run two event loops, and distributed.wait, which uses the
    # default client's loop, then sees the other client's futures late.)
    with Client(cfg["scheduler"], security=sec) as c:
        c.wait_for_workers(2)
        report = ld.install(c, insecure=sec is None)
        assert all(r["path"] in ("tls", "tcp (plaintext)") for r in report.values()), report
        for line in sys.stdin:  # one command per line: the system and workload to run
            system, parts = line.split()
            parts = int(parts)
            cmap = c.map if system == "lazyshare" else functools.partial(Client.map, c)
            tx = _tx(cfg["dev"])
            t0 = time.perf_counter()
            arg = a
            if system.startswith("scatter"):
                arg = c.scatter(a, broadcast=system == "scatter-bcast")
            # embedded: in waves of 2 (one task per worker at a time), each
            # wave's graph released before the next
            wave = 2 if system == "embedded" else N
            res, first = [], None
            for w0 in range(0, N, wave):
                idx = range(w0, w0 + wave)
                futs = cmap(part_sum, [arg] * wave, idx, [parts] * wave, pure=False)
                if first is None:
                    submitted = time.perf_counter() - t0
                    wait(futs, return_when="FIRST_COMPLETED")
                    first = time.perf_counter() - t0
                got = dict(zip([f.key for f in futs], c.gather(futs)))
                res += [got[f.key] for f in futs]
                del futs, got
            total = time.perf_counter() - t0
            ok = res == expect[parts]
            del arg
            c.run(
                lambda dask_worker: dask_worker.data.clear() if hasattr(dask_worker.data, "clear") else None
            )
            print(
                json.dumps(
                    {
                        "ok": ok,
                        "submitted": submitted,
                        "first": first,
                        "total": total,
                        "tx": _tx(cfg["dev"]) - tx,
                    }
                ),
                flush=True,
            )


# ------------------------------------------------------------------ the harness (root namespace)


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Net:
    def __init__(self):
        tag = secrets.token_hex(3)
        self.a, self.b, self.va, self.vb = f"lbA{tag}", f"lbB{tag}", f"ba{tag}", f"bb{tag}"
        self.ip_a, self.ip_b = "10.251.0.1", "10.251.0.2"
        _ip("netns", "add", self.a)
        _ip("netns", "add", self.b)
        _ip("link", "add", self.va, "type", "veth", "peer", "name", self.vb)
        _ip("link", "set", self.va, "netns", self.a)
        _ip("link", "set", self.vb, "netns", self.b)
        for ns, dev, addr in ((self.a, self.va, self.ip_a), (self.b, self.vb, self.ip_b)):
            _ip("-n", ns, "addr", "add", addr + "/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def shape(self, rate):
        burst = "4mb" if rate.startswith("10") else "1mb"
        for ns, dev in ((self.a, self.va), (self.b, self.vb)):
            subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True
            )
            if rate == "none":
                continue
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    burst,
                    "latency",
                    "100ms",
                ],
                check=True,
            )

    def close(self):
        _ip("netns", "del", self.a, check=False)
        _ip("netns", "del", self.b, check=False)


def _hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) << 10


def _reset_hwm(pid):
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def _start(ns, role, cfg, **kw):
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, HERE, "--role", role, json.dumps(cfg)], env=env, **kw
    )


def run_transport(net, transport, rates, args, certs, tmp):
    cfg = dict(certs if transport == "tls" else {})
    sfile = os.path.join(tmp, f"sched-{transport}")
    procs = [_start(net.a, "scheduler", dict(cfg, host=net.ip_a, file=sfile))]
    while not os.path.exists(sfile):
        time.sleep(0.05)
    with open(sfile) as f:
        addr = f.read()
    procs += [_start(net.a, "worker", dict(cfg, host=net.ip_a, scheduler=addr)) for _ in range(2)]
    client = _start(
        net.b,
        "client",
        dict(cfg, scheduler=addr, size_mib=args.size_mib, dev=net.vb),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    rows = []
    try:
        for rate in rates:
            net.shape(rate)
            for system, parts in (
                ("lazyshare", 100),
                ("embedded", 100),
                ("scatter-bcast", 100),
                ("lazyshare", N),
                ("scatter", N),
            ):
                runs = []
                for _ in range(args.runs):
                    for p in procs:
                        _reset_hwm(p.pid)
                    client.stdin.write(f"{system} {parts}\n")
                    client.stdin.flush()
                    line = client.stdout.readline()
                    if not line:
                        raise SystemExit(f"the client died ({transport} {rate} {system})")
                    r = json.loads(line)
                    if not r["ok"]:
                        raise SystemExit(f"wrong result: {transport} {rate} {system} {parts}")
                    r["sched_hwm"] = _hwm(procs[0].pid)
                    r["worker_hwm"] = max(_hwm(p.pid) for p in procs[1:])
                    runs.append(r)
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "ok"}
                rows.append((transport, rate, system, parts, med))
                print(_fmt(rows[-1], args.size_mib), flush=True)
    finally:
        client.stdin.close()
        for p in [client] + procs:
            p.kill()
            p.wait()
    return rows


def _fmt(row, size_mib):
    transport, rate, system, parts, m = row
    work = "1%" if parts == 100 else "1/16"
    touched = (size_mib << 20) * (16 / parts if parts == 100 else 1)
    return (
        f"{transport:4} {rate:7} {work:5} {system:14} first {m['first']:7.3f} s  total {m['total']:7.3f} s  "
        f"veth {m['tx'] / 2**20:8.1f} MiB ({m['tx'] / touched:5.2f}x touched)  "
        f"RSS sched {m['sched_hwm'] / 2**20:6.0f} MiB  worker {m['worker_hwm'] / 2**20:6.0f} MiB"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--role")
    ap.add_argument("cfg", nargs="?")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rates", default="1gbit,10gbit")
    ap.add_argument("--transports", default="tls,tcp")
    args = ap.parse_args()
    if args.role:
        cfg = json.loads(args.cfg)
        if args.role == "client":
            _client(cfg)
        else:
            asyncio.run({"scheduler": _scheduler, "worker": _worker}[args.role](cfg))
        return
    if os.geteuid() != 0:
        raise SystemExit("bench_dask needs root: network namespaces and tc")
    from distributed import Security

    sec = Security.temporary()
    tmp = tempfile.mkdtemp(prefix="bench-dask-")
    certs = {}
    for name, pem in (("ca", sec.tls_ca_file), ("cert", sec.tls_worker_cert), ("key", sec.tls_worker_key)):
        certs[name] = os.path.join(tmp, name + ".pem")
        with open(certs[name], "w") as f:
            f.write(pem)
    net = Net()
    rows = []
    try:
        for transport in args.transports.split(","):
            rows += run_transport(net, transport, args.rates.split(","), args, certs, tmp)
    finally:
        net.close()
    print(f"\nratios (medians of {args.runs} runs)")
    by = {(t, r, s, p): m for t, r, s, p, m in rows}
    for t in args.transports.split(","):
        for r in args.rates.split(","):
            ls1, ls16 = by[(t, r, "lazyshare", 100)], by[(t, r, "lazyshare", N)]
            print(
                f"{t:4} {r:7} 1%: embedded/lazyshare {by[(t, r, 'embedded', 100)]['total'] / ls1['total']:5.1f}x  "
                f"scatter-bcast/lazyshare {by[(t, r, 'scatter-bcast', 100)]['total'] / ls1['total']:5.1f}x   "
                f"1/16: scatter/lazyshare {by[(t, r, 'scatter', N)]['total'] / ls16['total']:5.2f}x"
            )


if __name__ == "__main__":
    main()
