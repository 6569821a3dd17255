"""How much work goes where and when: the pool's scheduling decisions, as plain
functions over plain numbers (no sockets, threads or processes), so that they
can be read and tested on their own.

* :func:`task_time` and :func:`prefetch_depth`: how many tasks a worker may
  hold, from the moving average of measured task time.
* :func:`send_limit`: how many of them each worker gets *now*, given the
  backlog (queue ahead only while it is deep).
* :func:`feed_has_room`: whether the feeder of an ``imap`` may pull the next
  item of its iterable (the window a stream runs ahead of its results, in
  tasks and in bytes).

Called by the dispatcher thread (``task_time``, ``prefetch_depth``,
``send_limit``), by the feeder, result and dispatcher threads
(``feed_has_room``) and by ``lazyshare.Executor``'s threads
(``prefetch_depth``). Nothing here keeps state.
"""

from __future__ import annotations

import sys

__all__ = [
    "QUEUED_WORK",
    "MAX_PREFETCH",
    "FEED_LIMIT",
    "FEED_AHEAD",
    "FEED_BYTES",
    "task_time",
    "prefetch_depth",
    "send_limit",
    "feed_has_room",
]

#: Queued work per worker the dispatcher aims for (seconds, by the moving average
#: of a worker's time per task, unpickling and pickling included). It must cover
#: the dispatcher's reaction time: a round trip is ~0.6 ms on the 2-vCPU VM
#: (sequential ``apply``; the stdlib's too), but while the caller's thread runs
#: Python (a loop of ``apply_async``) the dispatcher gets the GIL only every switch
#: interval (5 ms). With 64 tasks in flight, 10,000 tiny ``apply_async`` took 2x the
#: stdlib's time, workers idling between GIL slots. Tasks longer than this go one
#: at a time, balanced exactly as by the stdlib's shared queue.
QUEUED_WORK = max(0.002, 2 * sys.getswitchinterval())
#: Cap on tasks in flight per worker.
MAX_PREFETCH = 512
#: The feeder stops pulling from an imap iterable while this many tasks wait to be
#: sent (tasks go out in batches: it refills at half), and while the stream's
#: tasks not done yet (sent, waiting, or their result not handled yet) reach
#: ``FEED_AHEAD`` (it refills at three quarters) or hold ``FEED_BYTES`` (bytes
#: exported and pickled for them): the window a stream runs ahead of its results.
#: 10,000 tiny tasks keep 500-650 in the window (``FEED_LIMIT`` binds); a stream
#: of 2 MiB arrays holds ~32 of them. Below ``2 * processes`` tasks there is always
#: room (a worker has one running and one queued), and a task that added less
#: than ``FEED_BYTES // FEED_AHEAD`` makes room for the next (views of a base
#: already exported add nothing), so the window holds at most ~2 * ``FEED_BYTES``
#: plus one task.
FEED_LIMIT = 256
FEED_AHEAD = 1024
FEED_BYTES = 64 << 20


def task_time(average: float | None, seconds: float) -> float:
    """The moving average of task run time after one more task took ``seconds``
    (``average`` None: the first)."""
    return seconds if average is None else 0.8 * average + 0.2 * seconds


def prefetch_depth(
    task_seconds: float | None, cap: int = MAX_PREFETCH, queued_work: float = QUEUED_WORK
) -> int:
    """Tasks a worker may hold (running one included): one, plus as many as fit
    ``queued_work`` seconds at ``task_seconds`` each, at most ``cap`` in all.
    One while task time is unknown (``None``)."""
    if task_seconds is None:
        return 1
    return 1 + min(cap - 1, int(queued_work / max(task_seconds, 1e-6)))


def send_limit(depth: int, pending: int, inflight: int, workers: int) -> int:
    """How many tasks each of ``workers`` ready workers may hold now, with
    ``pending`` tasks waiting and ``inflight`` already on those workers.

    Queue ahead (up to ``depth``) only while the backlog is deep: a task queued
    behind a long one waits for it, where the stdlib's shared queue would hand
    it to an idle worker. With a shallow backlog (a few tasks, or the tail of a
    map) every worker gets one task at a time, so the order of [long, short,
    short] and tasks that wait for one another behave as with the stdlib."""
    return max(1, min(depth, (pending + inflight) // (2 * workers)))


def feed_has_room(
    ahead: int,
    pending: int,
    processes: int,
    last_bytes: int,
    held_bytes: int,
    refill: bool = False,
) -> bool:
    """Whether an ``imap`` feeder may pull its next task: ``ahead`` of the
    stream's tasks are not done yet, ``pending`` tasks (of any call) wait to be
    sent, the last task added ``last_bytes`` (pickled and newly exported) and
    the stream's tasks not done hold ``held_bytes``. ``refill``: whether a
    waiting feeder should be woken (the counts with hysteresis: it waits until
    the window drained to three quarters, the queue to half)."""
    if ahead >= (FEED_AHEAD * 3 // 4 if refill else FEED_AHEAD):
        return False
    if pending >= (FEED_LIMIT // 2 if refill else FEED_LIMIT):
        return False
    if ahead < 2 * processes or last_bytes < FEED_BYTES // FEED_AHEAD:
        return True
    return held_bytes < FEED_BYTES
