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


def run_case(
    script: str, name: str, rung: str = "uffd", env: dict | None = None, timeout: float = 110
) -> dict:
    """Run ``script NAME`` (a tests/_*_child.py) in a fresh interpreter at
    ``rung`` and return the dict it prints as JSON on its last line: as root
    for ``uffd``; as user nobody (no capability to open /dev/userfaultfd) for
    ``uffd-user-mode-only``; with ``LAZYSHARE_MODE=eager`` for ``eager``."""
    import json
    import os
    import pwd
    import shutil
    import subprocess
    import sys
    import tempfile

    here = os.path.dirname(os.path.abspath(__file__))
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    full_env.update(env or {})
    cmd = [sys.executable, os.path.join(here, script), name]
    rt = None
    if rung == "eager" or (rung != "uffd" and os.geteuid() != 0):
        full_env["LAZYSHARE_MODE"] = rung
    elif rung == "uffd-user-mode-only":
        nobody = pwd.getpwnam("nobody")
        rt = tempfile.mkdtemp()
        os.chown(rt, nobody.pw_uid, nobody.pw_gid)
        full_env.update(LAZYSHARE_RUNTIME_DIR=os.path.join(rt, "ls"), HOME=rt, TMPDIR=rt)
        cmd = as_user(cmd, nobody.pw_uid)
    try:
        r = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=rt or here)
    finally:
        if rt:
            shutil.rmtree(rt, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if "mode" in out:
        assert out["mode"] == rung
    return out
