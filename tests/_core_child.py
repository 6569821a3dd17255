"""Code that runs in the attaching process of tests/test_core.py (spawned)."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np


def content(desc, idx, q):
    import lazyshare

    a = lazyshare.attach(desc)
    q.put(("ok", float(a.sum()), a[idx].tolist(), lazyshare.stats(), lazyshare.capabilities().mode))


def scattered(desc, pages, q):
    import lazyshare

    a = lazyshare.attach(desc)
    per_page = 4096 // a.itemsize
    vals = [float(a[p * per_page]) for p in pages]
    q.put((vals, lazyshare.stats()["bytes_fetched"], lazyshare.stats()["requests"]))


def python_loop(desc, q):
    """A pure-Python loop, holding the GIL, that faults hundreds of pages."""
    import lazyshare

    a = lazyshare.attach(desc)
    s = 0.0
    for i in scrambled_indices(a.size, a.itemsize):  # random order: read-ahead cannot help
        s += a[i]
    q.put((s, len(scrambled_indices(a.size, a.itemsize)), lazyshare.stats()["faults"], time.time()))


def scrambled_indices(size, itemsize, n=1000):
    per_page = 4096 // itemsize
    npages = size // per_page
    return [((k * 7919) % npages) * per_page + k % per_page for k in range(min(n, npages))]


def threads(desc, q):
    import lazyshare

    a = lazyshare.attach(desc)
    n = a.size
    out = {}
    barrier = threading.Barrier(4)

    def work(k):
        barrier.wait()
        # threads 0 and 1 scan the same half; 2 and 3 interleave over all pages
        if k < 2:
            out[k] = float(a[: n // 2].sum())
        else:
            per_page = 4096 // a.itemsize
            out[k] = float(a[(k - 2) * per_page :: 2 * per_page].sum())

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    q.put(out)


def hold(desc, q, go):
    """Attach, report, and keep the mapping until told to drop it."""
    import lazyshare

    a = lazyshare.attach(desc)
    q.put(float(a[:10].sum()))
    go.wait(30)
    del a
    import gc

    gc.collect()
    q.put("dropped")
    time.sleep(0.5)


def attach_error(desc, q):
    import lazyshare

    try:
        lazyshare.attach(desc)
    except Exception as e:
        q.put((type(e).__name__, str(e)))
    else:
        q.put(("no error", ""))


def user_mode_kernel_access(desc, q):
    """On the user-mode-only rung a kernel access to a missing page fails with
    EFAULT; materialize() first makes it work."""
    import lazyshare

    a = lazyshare.attach(desc)
    r, w = os.pipe()
    os.set_blocking(w, False)
    chunk = a[: 4096 // a.itemsize]
    try:
        os.write(w, chunk)
        before = "ok"
    except OSError as e:
        before = e.errno
    lazyshare.materialize(chunk)
    n = os.write(w, chunk)
    data = os.read(r, n)
    q.put((before, data == chunk.tobytes(), lazyshare.capabilities().mode))


# ---- run as a script: the owner-killed test needs real process boundaries


def _owner_main():
    """Export an array of ones, print its descriptor (pickled, hex), sleep."""
    import pickle

    import lazyshare

    a = np.ones(64 << 20 >> 3)  # 64 MiB
    desc = lazyshare.export(a)
    sys.stdout.write(pickle.dumps(desc).hex() + "\n")
    sys.stdout.flush()
    time.sleep(120)


def _consumer_main():
    """Read pages slowly, reporting progress; never accept a zero."""
    import pickle

    import lazyshare

    desc = pickle.loads(bytes.fromhex(sys.stdin.readline().strip()))
    a = lazyshare.attach(desc)
    per_page = 4096 // 8
    for p in range(a.size // per_page):
        v = a[p * per_page]
        if v != 1.0:
            print(f"WRONG {v} at page {p}", flush=True)
            os._exit(3)
        if p % 10 == 0:
            print(f"page {p}", flush=True)
        time.sleep(0.01)
    print("finished", flush=True)


if __name__ == "__main__":
    {"owner": _owner_main, "consumer": _consumer_main}[sys.argv[1]]()


def detach_on_gc(desc, q):
    import gc

    import lazyshare

    a = lazyshare.attach(desc)
    v = a[1:10]
    s = float(a.sum())
    n1 = lazyshare.stats()["regions_attached"]
    del a
    gc.collect()
    n2 = lazyshare.stats()["regions_attached"]  # the view keeps the mapping
    del v
    gc.collect()
    deadline = time.monotonic() + 10
    while lazyshare.stats()["regions_attached"] and time.monotonic() < deadline:
        time.sleep(0.01)  # the handler thread unmaps asynchronously
    q.put((n1, n2, lazyshare.stats()["regions_attached"], s))


def fork_after_attach(desc, q):
    import lazyshare

    a = lazyshare.attach(desc)
    pid = os.fork()
    if pid == 0:
        try:
            v = a[12345]
            os.write(1, b"child read %r\n" % v)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    q.put((os.WIFSIGNALED(status) and os.WTERMSIG(status), float(a[12345])))


def reexport(desc, q):
    """Attach, then export the attached (still lazy) array to a grandchild."""
    import multiprocessing as mp

    import lazyshare
    from lazyshare import handler

    a = lazyshare.attach(desc)
    zero_claimed = handler._untouched_pages_are_zero(a.ctypes.data, a.nbytes)
    d2 = lazyshare.export(a)
    ctx = mp.get_context("spawn")
    q2 = ctx.Queue()
    p = ctx.Process(target=content, args=(d2, [0, 1, a.size - 1], q2))
    p.start()
    _, total, vals, _, _ = q2.get(timeout=60)
    p.join()
    q.put((zero_claimed, total, vals))


def churn(desc_a, desc_b, rounds, q):
    """Attach, touch the start sequentially (read-ahead keeps requests in
    flight), drop at once, attach the other segment: whatever was still being
    installed for the dropped mapping must never land in the next one."""
    import gc

    import lazyshare

    wrong = 0
    for i in range(rounds):
        sign = 1.0 if i % 2 == 0 else -1.0
        a = lazyshare.attach(desc_a if i % 2 == 0 else desc_b)
        per = 4096 // a.itemsize
        for k in range(0, 48 * per, per):
            wrong += a[k] != sign * k
        if i % 8 == 7:
            wrong += float(a.sum()) != sign * float(a.size) * (a.size - 1) / 2
        del a
        gc.collect()
    time.sleep(0.2)
    q.put((wrong, lazyshare.stats()["regions_attached"]))
