"""Reading the native counters never waits on requests in flight; stats() says when it gave up."""

import json
import pickle
import subprocess
import sys
import textwrap

import pytest
from test_faults import FakeOwner, env_with

from lazyshare import handler

pytestmark = pytest.mark.timeout(60)

CHILD = textwrap.dedent(
    """
    import ctypes, json, os, pickle, sys, threading, time
    from lazyshare import handler
    a = handler.attach(pickle.loads(bytes.fromhex(sys.argv[1])))
    sink = ctypes.create_string_buffer(8)
    # A read that waits (GIL released, as ctypes calls do) on an owner that never answers.
    threading.Thread(target=ctypes.memmove, args=(sink, a.ctypes.data, 8), daemon=True).start()
    time.sleep(0.3)
    t0 = time.monotonic(); handler.counters(); t_counters = time.monotonic() - t0
    t0 = time.monotonic(); s = handler.stats(timeout=0.3); t_stats = time.monotonic() - t0
    print(json.dumps({"counters": t_counters, "stats": t_stats, "settled": s["settled"], "faults": s["faults"]}))
    sys.stdout.flush()
    os._exit(0)  # before the fault timeout ends the process
    """
)


def test_counters_do_not_wait_for_a_request_in_flight(tmp_path):
    if handler.capabilities().mode == "eager":
        pytest.skip("the eager rung fetches a whole segment on attach: no request is left in flight")
    fake = FakeOwner(tmp_path, "silent")
    try:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, pickle.dumps(fake.desc).hex()],
            env=env_with(LAZYSHARE_FAULT_TIMEOUT="20"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout.splitlines()[-1])
        assert fake.reads >= 1 and r["faults"] >= 1
        assert r["counters"] < 0.05, r  # no wait at all
        assert r["settled"] is False, r  # the request never came back
        assert 0.25 <= r["stats"] < 2.0, r  # waited its timeout, then gave up saying so
    finally:
        fake.close()
