"""Tasks for test_worker.py (importable by the workers)."""

import ctypes
import threading
import time

_kept: list = []


def leave_a_page_request_in_flight(desc, delay):
    """Attach ``desc`` (an owner that never answers a page), fault on it from
    another thread and return while that request is still on the wire."""
    from lazyshare import handler

    a = handler.attach(desc)
    _kept.append(a)  # mapped while that thread waits in it (else unmapped under it: SIGSEGV)
    dst = ctypes.create_string_buffer(8)
    # ctypes releases the GIL around memmove: only that thread waits for the page
    # (until the worker exits)
    threading.Thread(target=ctypes.memmove, args=(dst, a.ctypes.data, 8), daemon=True).start()
    time.sleep(delay)  # the request is out
    return "returned"


def quick():
    return 42
