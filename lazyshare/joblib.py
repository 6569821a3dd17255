"""A joblib backend: ``Parallel`` calls whose big arrays move only the pages touched.

Importing this module registers the backend under the name ``"lazyshare"``
(``lazyshare.register_joblib()`` does the same)::

    import lazyshare.joblib  # or: lazyshare.register_joblib()
    from joblib import Parallel, delayed, parallel_config

    with parallel_config(backend="lazyshare", n_jobs=4):
        out = Parallel()(delayed(f)(big, i) for i in range(100))

Libraries built on joblib (scikit-learn's ``n_jobs``, ...) pick it up the same way
when they use processes. Each ``Parallel`` call runs on a :class:`lazyshare.Pool`
(started for the call, or once for a ``with Parallel(...) as parallel:`` block, as
joblib's ``multiprocessing`` backend does) and joblib's batches of tasks travel as
pool tasks: big buffers in them are exported and fetched page by page on first
touch.

joblib's own auto-memmapping is not used: this backend never dumps arrays to a
temporary folder, so ``max_nbytes``, ``mmap_mode`` and ``temp_folder`` have no
effect. Buffers of at least ``threshold`` bytes (a backend parameter, default
1 MiB like joblib's ``max_nbytes``) go lazily, smaller ones are pickled::

    parallel_config(backend="lazyshare", threshold=16 << 20)

Workers receive writable private copies (joblib's memmapped arrays are read-only).
"""

from __future__ import annotations

from typing import Any

from joblib._parallel_backends import FallbackToBackend, MultiprocessingBackend, SequentialBackend
from joblib.parallel import register_parallel_backend

from . import serialization
from .pool import Pool

__all__ = ["LazyshareBackend", "register"]

NAME = "lazyshare"
_UNSET: Any = object()


class LazyshareBackend(MultiprocessingBackend):
    """joblib's ``multiprocessing`` backend with a :class:`lazyshare.Pool` in place
    of its memmapping pool: same batching, nesting rules and error handling.

    ``threshold``: as for :class:`lazyshare.Pool`. ``stats()`` returns the counters
    of the pool of the current (or last) ``Parallel`` call.
    """

    def __init__(self, nesting_level=None, inner_max_num_threads=None, threshold=_UNSET, **backend_kwargs):
        super().__init__(
            nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **backend_kwargs
        )
        self.threshold = serialization.DEFAULT_THRESHOLD if threshold is _UNSET else threshold
        self._last_stats: dict | None = None

    def configure(
        self,
        n_jobs: int = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **kwargs: Any,
    ) -> int:
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        opts = {**self.backend_kwargs, **kwargs}
        # joblib always passes its memmapping options and the default context; a
        # 'fork' context (the default on Linux before 3.14) means "unspecified".
        for ignored in ("max_nbytes", "mmap_mode", "temp_folder", "verbose", "idle_worker_timeout"):
            opts.pop(ignored, None)
        context = opts.pop("context", None)
        if context is not None and context.get_start_method() == "fork":
            context = None
        self._pool = Pool(n_jobs, context=context, threshold=self.threshold, **opts)
        self.parallel = parallel
        return n_jobs

    def terminate(self) -> None:
        if self._pool is not None:
            self._last_stats = self._pool.stats()
        super().terminate()

    def stats(self) -> dict | None:
        """``Pool.stats()`` of the running pool, or of the last one; None before any."""
        if self._pool is not None:
            return self._pool.stats()
        return self._last_stats


def register() -> None:
    """Register the backend with joblib as ``"lazyshare"`` (idempotent)."""
    register_parallel_backend(NAME, LazyshareBackend)


register()
