"""A consumer process for tests/test_cache_client.py (spawned): attaches one
region with ls_client_attach itself (so that the test names the cache fd and
inode, and sees the ``cached`` outcome), then does what the test tells it."""

from __future__ import annotations

import hashlib
import traceback


def _stats():
    from lazyshare._native import ffi, lib

    lib.ls_client_sync(5000)
    s = ffi.new("struct ls_stats *")
    lib.ls_get_stats(s)
    names = (
        "faults",
        "requests",
        "installs",
        "bytes_fetched",
        "bytes_zero",
        "bytes_dropped",
        "cache_attaches",
        "cache_fallbacks",
    )
    return {k: int(getattr(s, k)) for k in names}


def _status():
    """RssAnon, RssFile and RssShmem of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _smaps(addr):
    """The /proc/self/smaps fields (bytes) of the mapping starting at addr."""
    out, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                if inside:
                    break
                inside = int(head.split("-")[0], 16) == addr
                continue
            if inside and line.split()[-1] == "kB":
                out[head.rstrip(":")] = int(line.split()[1]) * 1024
    return out


def consumer(cmds, out):
    import numpy as np
    from lazyshare._native import ffi, lib

    from lazyshare import handler

    handler._ensure_client()
    spec = view = None
    while True:
        cmd, *args = cmds.get()
        try:
            if cmd == "quit":
                out.put("bye")
                return
            if cmd == "attach":
                seg, map_off, map_len, cache_fd, cache_ino = args
                spec = ffi.new("struct ls_attach[]", 1)
                ffi.memmove(spec[0].id, seg.id, len(seg.id))
                spec[0].seglen = seg.nbytes
                spec[0].map_off = map_off
                spec[0].map_len = map_len
                spec[0].cache_fd = cache_fd
                spec[0].cache_ino = cache_ino
                spec[0].cached = 7  # an out field: must be written
                before = _stats()
                rc = lib.ls_client_attach(seg.endpoint.encode(), seg.owner_pid, spec, 1, 20000)
                if rc == 0:
                    raw = np.frombuffer(
                        ffi.buffer(ffi.cast("char *", spec[0].addr), spec[0].map_len), np.uint8
                    )
                    view = raw[map_off - spec[0].off : map_off - spec[0].off + map_len]
                after = _stats()
                out.put(
                    {
                        "rc": rc,
                        "cached": int(spec[0].cached),
                        "addr": int(spec[0].addr),
                        "attaches": after["cache_attaches"] - before["cache_attaches"],
                        "fallbacks": after["cache_fallbacks"] - before["cache_fallbacks"],
                    }
                )
            elif cmd == "read":  # every byte, in order; what it cost and where the pages are
                before, rss0 = _stats(), _status()
                digest = hashlib.sha256(view.tobytes()).hexdigest()
                after, rss1 = _stats(), _status()
                cost = {k: after[k] - before[k] for k in after}
                rss = {k: rss1[k] - rss0[k] for k in rss1}
                out.put((digest, cost, rss, _smaps(int(spec[0].addr))))
            elif cmd == "write":
                pos, data = args
                view[pos : pos + len(data)] = np.frombuffer(data, np.uint8)
                out.put("ok")
            elif cmd == "peek":
                pos, n = args
                out.put(view[pos : pos + n].tobytes())
            elif cmd == "budget":
                out.put(lib.ls_client_set_budget(args[0]))
            elif cmd == "detach":
                view = None
                rc = lib.ls_client_detach(spec[0].region)
                out.put(rc)
            else:
                out.put(("unknown", cmd))
        except Exception:
            out.put(("error", traceback.format_exc()))
