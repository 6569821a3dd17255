"""``lazyshare.progress`` (defined here, in ``lazyshare.progressbar``): a progress bar (tqdm)
over results, with bytes moved.

It wraps any iterable of results, so the stdlib-compatible signatures keep their
defaults::

    with lazyshare.Pool() as pool:
        for r in lazyshare.progress(pool.imap(f, tasks), total=len(tasks)):
            ...

    with lazyshare.Executor() as ex:
        fs = [ex.submit(f, big, i) for i in range(n)]
        for fut in lazyshare.progress(as_completed(fs), total=n, pool=ex):
            ...

The bar counts items (tasks) and shows the bytes moved since it started: bytes
fetched lazily by the workers and bytes of task messages pickled, from
``pool.stats()``. ``pool`` is taken from the iterable when it is a ``Pool.imap``
or ``imap_unordered`` iterator (chunksize 1); pass it otherwise. In a Jupyter
kernel with ipywidgets the bar is a notebook widget, else text on stderr.
tqdm is an optional dependency: ``pip install 'lazyshare[progress]'``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["progress"]

T = TypeVar("T")

#: Reading pool.stats() takes a lock the dispatcher also takes: refresh the byte
#: count at most this often (tqdm itself redraws at most every 0.1 s).
_STATS_EVERY = 0.2


def _tqdm_class() -> Any:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        raise ImportError(
            "lazyshare.progress needs tqdm, an optional dependency: "
            "pip install 'lazyshare[progress]' (or pip install tqdm)"
        ) from None
    if _in_jupyter_kernel():
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm
        except ImportError:  # no widgets: text, as tqdm.auto would after a warning
            pass
    from tqdm.std import tqdm as std_tqdm

    return std_tqdm


def _in_jupyter_kernel() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _moved(pool: Any) -> tuple[int, int]:
    if pool is None:
        return (0, 0)
    try:
        st = pool.stats(timeout=0)  # never wait: the bar shows what is counted now
    except TypeError:  # a stats() without a timeout
        st = pool.stats()
    t = st["totals"]
    return (t["bytes_lazy"], t["bytes_pickled"])


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    *,
    pool: Any = None,
    desc: str | None = None,
    **tqdm_kwargs: Any,
) -> Iterator[T]:
    """Yield the items of ``iterable`` while a tqdm bar shows how many are done
    and how many bytes ``pool`` (a :class:`lazyshare.Pool` or
    :class:`lazyshare.Executor`, anything with ``stats()``) moved meanwhile.

    ``total`` defaults to ``len(iterable)`` when it has one. Other keyword
    arguments go to tqdm (``file``, ``leave``, ``disable`` ...). Raises
    ImportError at once when tqdm is not installed.
    """
    cls = _tqdm_class()
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            pass
    if pool is None:
        candidate = getattr(iterable, "_pool", None)  # Pool.imap's iterator
        if callable(getattr(candidate, "stats", None)):
            pool = candidate
    return _run(cls, iterable, total, pool, desc, tqdm_kwargs)


def _run(cls, iterable, total, pool, desc, kwargs) -> Iterator:
    kwargs.setdefault("unit", "task")
    kwargs.setdefault("dynamic_ncols", True)
    start = _moved(pool)
    last = 0.0

    def postfix() -> str:
        lazy, pickled = _moved(pool)
        lazy -= start[0]
        pickled -= start[1]
        return f"moved {_fmt_bytes(lazy + pickled)} (lazy {_fmt_bytes(lazy)}, pickled {_fmt_bytes(pickled)})"

    bar = cls(total=total, desc=desc, **kwargs)
    try:
        if pool is not None:
            bar.set_postfix_str(postfix(), refresh=False)
        for item in iterable:  # an item is here: its task is done
            if pool is not None:
                now = time.monotonic()
                if now - last >= _STATS_EVERY:
                    last = now
                    bar.set_postfix_str(postfix(), refresh=False)
            bar.update(1)
            yield item
        if pool is not None:
            bar.set_postfix_str(postfix(), refresh=False)  # close() draws it
    finally:
        bar.close()
