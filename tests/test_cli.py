"""``python -m lazyshare doctor`` (every rung's advice) and ``python -m lazyshare demo``."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys

import pytest

import lazyshare
from lazyshare import handler
from lazyshare.__main__ import main
from lazyshare.handler import Capabilities


def _doctor(capsys) -> str:
    assert main(["doctor"]) == 0
    return capsys.readouterr().out


def test_doctor_reports_this_machine(capsys, monkeypatch):
    monkeypatch.delenv("LAZYSHARE_MODE", raising=False)
    out = _doctor(capsys)
    caps = lazyshare.capabilities()
    assert f"kernel: {platform.release()}" in out
    assert re.search(r"^vm\.unprivileged_userfaultfd: \S", out, re.M)
    assert re.search(r"^/dev/userfaultfd: ", out, re.M)
    assert re.search(r"^seccomp: (off|strict|filter|unknown)", out, re.M)
    assert f"uid {os.getuid()}, euid {os.geteuid()}" in out
    assert f"rung in use: {caps.mode}\n  {caps.reason}" in out
    assert re.search(r"^data path: (install|wire) \(", out, re.M)
    assert re.search(
        r"^links to other hosts: TLS 1\.3 with OpenSSL .*libssl.*silent links end after 10 s", out, re.M
    )
    monkeypatch.setenv("LAZYSHARE_DATA_PATH", "wire")
    assert "data path: wire (pages sent in the reply, as LAZYSHARE_DATA_PATH=wire asks)" in _doctor(capsys)
    if os.path.exists("/dev/userfaultfd"):
        usable = os.access("/dev/userfaultfd", os.R_OK | os.W_OK)
        assert f"usable by this process: {usable}" in out


def _fake(mode: str) -> Capabilities:
    return Capabilities(mode, f"because {mode}", False, 13, 1, 0 if mode != "eager" else 1)


def test_doctor_best_rung(capsys, monkeypatch):
    monkeypatch.setattr(handler, "_probe", lambda: _fake("uffd"))
    out = _doctor(capsys)
    assert "rung in use: uffd\n  because uffd" in out
    assert "nothing to do" in out
    assert "chmod" not in out


def test_doctor_user_mode_only_advice(capsys, monkeypatch):
    monkeypatch.setattr(handler, "_probe", lambda: _fake("uffd-user-mode-only"))
    out = _doctor(capsys)
    assert "rung in use: uffd-user-mode-only" in out
    assert "/dev/userfaultfd: Permission denied" in out  # errno 13, spelled out
    assert "chgrp userfaultfd /dev/userfaultfd && chmod 0660 /dev/userfaultfd" in out
    assert "usermod -aG userfaultfd" in out and "udev" in out
    assert "sysctl -w vm.unprivileged_userfaultfd=1" in out
    assert "CAP_SYS_PTRACE" in out
    assert "lazyshare.materialize(arr)" in out
    assert "seccomp profile" not in out


def test_doctor_eager_advice(capsys, monkeypatch):
    monkeypatch.setattr(handler, "_probe", lambda: _fake("eager"))
    out = _doctor(capsys)
    assert "rung in use: eager" in out
    assert "seccomp profile" in out
    assert "sysctl -w vm.unprivileged_userfaultfd=1" in out


def test_doctor_forced_rung_names_the_best(capsys, monkeypatch):
    best = lazyshare.capabilities().mode
    monkeypatch.setenv("LAZYSHARE_MODE", "eager")
    out = _doctor(capsys)
    assert "rung in use: eager" in out
    assert os.environ["LAZYSHARE_MODE"] == "eager"  # restored after probing
    if best != "eager":
        assert f"best rung available: {best} (unset LAZYSHARE_MODE to use it)" in out


def test_doctor_bad_mode(capsys, monkeypatch):
    monkeypatch.setenv("LAZYSHARE_MODE", "bogus")
    assert main(["doctor"]) == 2
    out = capsys.readouterr().out
    assert "LAZYSHARE_MODE" in out and "expected one of" in out
    assert "best rung available:" in out


def test_demo_small():
    proc = subprocess.run(
        [sys.executable, "-m", "lazyshare", "demo", "--size-mib", "32", "--tasks", "4"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "32.0 MiB float64 array, 4 tasks" in out
    mp = re.search(r"^multiprocessing\.Pool\s+([\d.]+)s\s+([\d.]+) (\w+)", out, re.M)
    lz = re.search(r"^lazyshare\.Pool\s+([\d.]+)s\s+([\d.]+) (\w+)", out, re.M)
    assert mp and lz, out
    m = re.search(r"speed-up ([\d.]+)x, (\d+)x fewer bytes moved", out)
    assert m, out
    assert float(m.group(1)) > 0
    assert int(m.group(2)) >= 2  # 4 tasks each reading 1%: far fewer bytes than 4 pickles


@pytest.mark.parametrize("argv", [[], ["bogus"]])
def test_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
