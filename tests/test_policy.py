"""The pool's scheduling decisions (lazyshare.policy) on plain numbers: no
processes, sockets or threads. Plus the dispatcher's wake-up object."""

import os

import pytest

from lazyshare import policy
from lazyshare.dispatcher import _Wakeup
from lazyshare.policy import FEED_AHEAD, FEED_BYTES, FEED_LIMIT, MAX_PREFETCH, QUEUED_WORK

pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20


# ---------------------------------------------------------------- task time and prefetch depth
def test_task_time_starts_at_the_first_measure_then_moves_a_fifth_of_the_way():
    assert policy.task_time(None, 0.5) == 0.5
    assert policy.task_time(1.0, 0.0) == pytest.approx(0.8)
    assert policy.task_time(1.0, 2.0) == pytest.approx(1.2)


def test_one_task_per_worker_until_task_time_is_known():
    assert policy.prefetch_depth(None) == 1
    assert policy.prefetch_depth(None, cap=16) == 1


def test_tasks_longer_than_the_queued_work_go_one_at_a_time():
    assert policy.prefetch_depth(QUEUED_WORK) == 2  # the running one and one queued
    assert policy.prefetch_depth(QUEUED_WORK * 1.01) == 1
    assert policy.prefetch_depth(10.0) == 1


def test_tiny_tasks_are_prefetched_up_to_the_cap():
    assert policy.prefetch_depth(0.0) == MAX_PREFETCH
    assert policy.prefetch_depth(1e-9) == MAX_PREFETCH
    assert policy.prefetch_depth(1e-9, cap=16) == 16  # the executor's cap
    assert policy.prefetch_depth(QUEUED_WORK / 10) == 11


def test_prefetch_depth_falls_as_tasks_get_longer():
    depths = [policy.prefetch_depth(t) for t in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)]
    assert depths == sorted(depths, reverse=True)
    assert all(1 <= d <= MAX_PREFETCH for d in depths)


# ---------------------------------------------------------------- how many tasks a worker gets now
def test_shallow_backlog_goes_one_task_per_worker():
    # [long, short, short] on 2 workers: the stdlib's shared queue balances it
    assert policy.send_limit(depth=100, pending=3, inflight=0, workers=2) == 1
    assert policy.send_limit(depth=100, pending=0, inflight=0, workers=4) == 1  # never 0


def test_deep_backlog_fills_workers_up_to_the_depth():
    assert policy.send_limit(depth=8, pending=1000, inflight=0, workers=2) == 8
    assert policy.send_limit(depth=100, pending=40, inflight=0, workers=2) == 10  # half the backlog each
    # what is already on the workers counts in the backlog
    assert policy.send_limit(depth=100, pending=20, inflight=20, workers=2) == 10


def test_unknown_task_time_never_queues_ahead():
    depth = policy.prefetch_depth(None)
    assert policy.send_limit(depth, pending=10_000, inflight=0, workers=2) == 1


# ---------------------------------------------------------------- the imap feed window
def room(ahead=0, pending=0, processes=2, last_bytes=0, held_bytes=0, refill=False):
    return policy.feed_has_room(ahead, pending, processes, last_bytes, held_bytes, refill)


def test_window_in_tasks():
    assert room(ahead=FEED_AHEAD - 1)
    assert not room(ahead=FEED_AHEAD)
    # a waiting feeder is woken only once the window drained to three quarters
    assert not room(ahead=FEED_AHEAD * 3 // 4, refill=True)
    assert room(ahead=FEED_AHEAD * 3 // 4 - 1, refill=True)


def test_window_in_tasks_waiting_to_be_sent():
    assert room(pending=FEED_LIMIT - 1)
    assert not room(pending=FEED_LIMIT)
    assert not room(pending=FEED_LIMIT // 2, refill=True)
    assert room(pending=FEED_LIMIT // 2 - 1, refill=True)


def test_window_in_bytes():
    big = 2 * MiB
    assert room(ahead=10, last_bytes=big, held_bytes=FEED_BYTES - 1)
    assert not room(ahead=10, last_bytes=big, held_bytes=FEED_BYTES)
    assert not room(ahead=10, last_bytes=big, held_bytes=FEED_BYTES, refill=True)


def test_room_for_two_tasks_per_worker_whatever_their_size():
    huge = 10 * FEED_BYTES
    assert room(ahead=3, processes=2, last_bytes=huge, held_bytes=huge)
    assert not room(ahead=4, processes=2, last_bytes=huge, held_bytes=huge)
    assert room(ahead=7, processes=4, last_bytes=huge, held_bytes=huge)


def test_a_task_that_added_little_makes_room_for_the_next():
    # views of a base already exported add nothing: the bytes window does not bind
    small = FEED_BYTES // FEED_AHEAD - 1
    assert room(ahead=100, last_bytes=small, held_bytes=10 * FEED_BYTES)
    assert not room(ahead=100, last_bytes=small + 1, held_bytes=10 * FEED_BYTES)


def test_count_limits_bind_before_the_floor_of_two_per_worker():
    assert not room(ahead=FEED_AHEAD, processes=FEED_AHEAD)
    assert not room(ahead=0, pending=FEED_LIMIT)


# ---------------------------------------------------------------- the dispatcher's wake-up
def _readable(fd):
    import select

    return bool(select.select([fd], [], [], 0)[0])


def test_wakeup_coalesces_until_drained():
    w = _Wakeup()
    try:
        fd = w.fileno()
        assert not _readable(fd)
        w.wake()
        w.wake()
        assert _readable(fd)
        assert len(os.read(fd, 4096)) == 1  # one byte for two wake-ups
        w.wake()  # not drained yet: still pending, nothing written
        assert not _readable(fd)
        w.drain()
        w.wake()
        assert _readable(fd)
        w.drain()
        assert not _readable(fd)
    finally:
        w.close()


def test_wakeup_is_safe_after_close():
    w = _Wakeup()
    fd = w.fileno()
    w.close()
    w.close()
    w.wake()
    w.drain()
    w.wake()
    assert w.fileno() == -1
    with pytest.raises(OSError):
        os.fstat(fd)  # both ends closed
