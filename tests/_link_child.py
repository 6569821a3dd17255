"""Child processes for tests/test_link.py: an owner that serves one array over
a link, and a consumer that maps it through the link and reads it.

The link's settings come as JSON in $LZ_LINK: host, port, tls (ca/cert/key
PEM, or null for plaintext), and for a consumer the segment (id hex, nbytes).
Each prints one JSON line."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time

import numpy as np

from lazyshare import handler, link


def _tls(cfg):
    t = cfg.get("tls")
    return link.TLS(t["ca"], t["cert"], t["key"]) if t else None


def owner(cfg):
    data = np.random.default_rng(7).integers(0, 255, cfg["nbytes"], dtype=np.uint8)
    seg = handler.export_memory(data, data.ctypes.data, data.nbytes)
    lst = link.serve(cfg["host"], 0, _tls(cfg))
    print(json.dumps({"port": lst.port, "seg": seg.id.hex(), "nbytes": seg.nbytes}), flush=True)
    while True:  # until killed, or stdin closes
        if not sys.stdin.read(1):
            return
        time.sleep(0.1)


def consumer(cfg):
    ep = link.endpoint_for(cfg["host"], cfg["port"], _tls(cfg))
    seg = handler.SegmentDescriptor(bytes.fromhex(cfg["seg"]), cfg["nbytes"], ep, 0)
    arr = handler.attach(seg)
    if cfg.get("slow"):  # a page at a time, until the owner goes
        print(json.dumps({"reading": True}), flush=True)
        for off in range(0, arr.nbytes, 4096):
            int(arr[off])
            time.sleep(0.002)
    out = {"sha": [hashlib.sha256(arr[lo:hi]).hexdigest() for lo, hi in cfg["ranges"]]}
    if cfg.get("linger"):  # detach at once (read-ahead still in flight), then stay idle
        del arr
        gc.collect()
        time.sleep(cfg["linger"])
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    {"owner": owner, "consumer": consumer}[sys.argv[1]](json.loads(os.environ["LZ_LINK"]))
