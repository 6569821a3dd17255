"""Every ``LAZYSHARE_*`` environment setting, read in this one place.

Read when a part starts (the page server, the fault handler, a probe), not at
import, so that a process that sets one before its first pool -- or a test
that sets one before starting a child -- gets what it set. The native core
never reads the environment: :mod:`lazyshare.handler` hands it these values.

==========================  =========================================================
``LAZYSHARE_MODE``          force a capability rung: ``uffd``, ``uffd-user-mode-only``
                            or ``eager`` (default: the best this process can open)
``LAZYSHARE_DATA_PATH``     ``install`` (default: the owner installs pages through the
                            worker's userfaultfd) or ``wire`` (pages sent in the reply)
``LAZYSHARE_MIN_BLOCK``     first fetch of a random fault, bytes (default 4 KiB)
``LAZYSHARE_MAX_BLOCK``     largest read-ahead window, bytes (default 4 MiB)
``LAZYSHARE_FAULT_TIMEOUT`` seconds a fault may wait for its owner before the worker
                            dies with a clear message (default 60)
``LAZYSHARE_ATTACH_TIMEOUT`` seconds an attach may wait for the owner (default 30)
``LAZYSHARE_SPIN_US``       microseconds the native loops poll before sleeping after
                            activity (default 50; 0 sleeps at once)
``LAZYSHARE_SERVER_THREADS`` page-server loops (default: one per CPU, at most 8)
``LAZYSHARE_RUNTIME_DIR``   where socket files go (see :mod:`lazyshare.transport`)
``LAZYSHARE_CACHE``         ``1`` (default): arrays a call exports stay exported, with a
                            page cache shared by the workers, until the array dies, and
                            later calls fetch only pages written since; ``0``: one
                            export per call (see :mod:`lazyshare.live`)
``LAZYSHARE_CACHE_MAX``     bytes the page caches of this process may keep between
                            calls (default: half the machine's memory); past it, the
                            caches of arrays no call reads are emptied, least recently
                            used first
``LAZYSHARE_LINK_TIMEOUT``  seconds a link to another host may take to connect and
                            authenticate, and after which a silent one is declared
                            dead (default 10; see :mod:`lazyshare.link`)
``LAZYSHARE_LINK_MAX_BLOCK`` largest read-ahead window for an owner across a link, bytes
                            (default 512 KiB: there the bytes read ahead and never
                            touched cost time; at most ``LAZYSHARE_MAX_BLOCK``)
``LAZYSHARE_LINK``          ``auto`` (default): an owner on this host is reached over its
                            Unix socket, one on another over TCP; ``tcp``: always TCP
==========================  =========================================================
"""

from __future__ import annotations

import dataclasses
import os

__all__ = ["Settings", "read", "DATA_PATHS"]

DATA_PATHS = ("install", "wire")


def _half_the_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 1 << 62


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str | None = None
    data_path: str = "install"
    min_block: int = 4 << 10
    max_block: int = 4 << 20
    fault_timeout: float = 60.0
    attach_timeout: float = 30.0
    spin_us: int = 50
    server_threads: int = 0  # 0: one per CPU
    runtime_dir: str | None = None
    cache: bool = True
    cache_max: int = dataclasses.field(default_factory=_half_the_memory)
    link_timeout: float = 10.0
    link_max_block: int = 512 << 10
    link: str = "auto"


def _number(env, name: str, kind, default, minimum=0):
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r}: expected at least {minimum}")
    return value


def read(env=None) -> Settings:
    """The settings as ``env`` (default ``os.environ``) gives them now.

    Malformed values raise ``ValueError`` naming the variable."""
    env = os.environ if env is None else env
    d = Settings()
    path = env.get("LAZYSHARE_DATA_PATH") or d.data_path
    if path not in DATA_PATHS:
        raise ValueError(f"LAZYSHARE_DATA_PATH={path!r}: expected one of {list(DATA_PATHS)}")
    return Settings(
        mode=env.get("LAZYSHARE_MODE") or None,
        data_path=path,
        min_block=_number(env, "LAZYSHARE_MIN_BLOCK", int, d.min_block, 1),
        max_block=_number(env, "LAZYSHARE_MAX_BLOCK", int, d.max_block, 1),
        fault_timeout=_number(env, "LAZYSHARE_FAULT_TIMEOUT", float, d.fault_timeout),
        attach_timeout=_number(env, "LAZYSHARE_ATTACH_TIMEOUT", float, d.attach_timeout),
        spin_us=_number(env, "LAZYSHARE_SPIN_US", int, d.spin_us),
        server_threads=_number(env, "LAZYSHARE_SERVER_THREADS", int, d.server_threads),
        runtime_dir=env.get("LAZYSHARE_RUNTIME_DIR") or None,
        cache=_flag(env, "LAZYSHARE_CACHE", d.cache),
        cache_max=_number(env, "LAZYSHARE_CACHE_MAX", int, d.cache_max, 1),
        link_timeout=_number(env, "LAZYSHARE_LINK_TIMEOUT", float, d.link_timeout, 0.1),
        link_max_block=_number(env, "LAZYSHARE_LINK_MAX_BLOCK", int, d.link_max_block, 1),
        link=_choice(env, "LAZYSHARE_LINK", ("auto", "tcp"), d.link),
    )


def _choice(env, name: str, choices: tuple, default: str) -> str:
    raw = env.get(name) or default
    if raw not in choices:
        raise ValueError(f"{name}={raw!r}: expected one of {list(choices)}")
    return raw


def _flag(env, name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw not in ("0", "1"):
        raise ValueError(f"{name}={raw!r}: expected 0 or 1")
    return raw == "1"
