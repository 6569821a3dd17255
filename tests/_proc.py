"""Running a test's child process as another user."""

from __future__ import annotations


def as_user(cmd: list, user) -> list:
    """``cmd`` run as ``user`` (a name or uid) with no capability but
    CAP_DAC_READ_SEARCH: enough to read this interpreter where it lives (under
    root's 0700 home), not to open /dev/userfaultfd (0600, needs write) or pass
    userfaultfd(2)'s CAP_SYS_PTRACE check."""
    return [
        "setpriv",
        f"--reuid={user}",
        f"--regid={user}",
        "--clear-groups",
        "--inh-caps=-all,+dac_read_search",
        "--ambient-caps=-all,+dac_read_search",
        "--",
    ] + list(cmd)
