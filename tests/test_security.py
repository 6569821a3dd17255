"""Security and the capability ladder, beyond tests/test_core.py: segment ids,
no network listener, no abstract Unix socket, the user-mode-only rung's kernel
accesses as a real unprivileged user, and a real seccomp filter refusing
userfaultfd (as Docker's default profile does)."""

from __future__ import annotations

import os

import _fault_funcs as ff
import numpy as np
import pytest
from conftest import DEADLINE
from test_core import _run_script, run_as_nobody

import lazyshare
from lazyshare import handler, transport
from lazyshare.pool import Pool

pytestmark = pytest.mark.timeout(DEADLINE * 2)

MiB = 1 << 20


def test_segment_ids_are_128_unguessable_bits():
    a = np.ones(1 << 16)
    descs = [lazyshare.export(a) for _ in range(256)]
    try:
        ids = [d.segment.id for d in descs]
        assert all(len(i) == 16 for i in ids) and len(set(ids)) == 256
        # every bit varies (not a counter, an address or a pid in disguise)
        ones = [sum((int.from_bytes(i, "little") >> b) & 1 for i in ids) for b in range(128)]
        assert min(ones) > 64 and max(ones) < 192, (min(ones), max(ones))
    finally:
        for d in descs:
            lazyshare.release(d)


def _socket_inodes(pid):
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def _proc_net_inodes(name):
    try:
        with open(f"/proc/net/{name}") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return {}
    col = 9 if name != "unix" else 6
    res = {}
    for line in lines:
        fields = line.split()
        if len(fields) > col:
            res[fields[col]] = fields
    return res


def test_nothing_listens_on_a_network_interface_nor_an_abstract_socket():
    a = np.random.default_rng(2).random(2 * MiB)
    with Pool(2) as p:
        assert p.starmap(ff.slice_check, [(a, 0, a.size)] * 2) == [ff.expected(a, 0, a.size)] * 2
        pids = [os.getpid()] + [w.pid for w in p._pool]
        inodes = set().union(*(_socket_inodes(pid) for pid in pids))
        unix = _proc_net_inodes("unix")
        base = os.path.dirname(transport.runtime_dir())
        for name in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6", "udplite", "udplite6"):
            assert not inodes & set(_proc_net_inodes(name)), f"an inet socket ({name}) is open"
        for ino in inodes & set(unix):
            fields = unix[ino]
            listening = int(fields[3], 16) & 0x10000  # __SO_ACCEPTCON
            path = fields[7] if len(fields) > 7 else ""
            if listening:
                assert path.startswith(base + "/"), f"a listening socket outside the private dir: {path!r}"
            assert not path.startswith("@"), f"an abstract socket (no file permissions): {path!r}"
        assert inodes & set(unix), "expected our ipc sockets to be visible"
        p.close()
        p.join()


SECCOMP_PRELUDE = r"""
import ctypes, errno, struct
def refuse_userfaultfd():
    # BPF: on x86_64 refuse userfaultfd(2) (nr 323) and ioctl(USERFAULTFD_IOC_NEW)
    # with EPERM, as Docker's default seccomp profile does (it has no /dev/userfaultfd
    # either); allow everything else. Inherited by every child process.
    LD, JEQ, RET = 0x20, 0x15, 0x06
    ALLOW, EPERM = 0x7FFF0000, 0x00050000 | errno.EPERM
    prog = [
        (LD, 0, 0, 4),                 # arch
        (JEQ, 0, 6, 0xC000003E),       # not x86_64: allow (jump to the end)
        (LD, 0, 0, 0),                 # nr
        (JEQ, 3, 0, 323),              # userfaultfd -> refuse
        (JEQ, 0, 3, 16),               # not ioctl -> allow
        (LD, 0, 0, 24),                # ioctl request (low 32 bits of args[1])
        (JEQ, 0, 1, 0xAA00),           # USERFAULTFD_IOC_NEW -> refuse
        (RET, 0, 0, EPERM),
        (RET, 0, 0, ALLOW),
    ]
    raw = b"".join(struct.pack("<HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw)
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fp = Fprog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.byref(fp), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")
refuse_userfaultfd()
"""

SECCOMP_POOL_SCRIPT = (
    SECCOMP_PRELUDE
    + """
import warnings, numpy as np
import lazyshare, _fault_funcs as ff
from lazyshare.pool import Pool

def mode(_=None):
    import lazyshare
    return lazyshare.capabilities().mode

if __name__ == "__main__":
    a = np.random.default_rng(4).random(4 << 20)  # 32 MiB
    with Pool(2, maxtasksperchild=2) as p:  # churn: 4+ workers over the run
        got = p.starmap(ff.slice_check, [(a, i << 18, (i + 3) << 18) for i in range(10)], chunksize=1)
        assert got == [ff.expected(a, i << 18, (i + 3) << 18) for i in range(10)]
        modes = set(p.map(mode, range(4), chunksize=1))
        moved = p.stats()["totals"]["bytes_lazy"]
        p.close(); p.join()
    print(lazyshare.capabilities().mode, ",".join(sorted(modes)), moved >= 10 * (3 << 18) * 8)
"""
)


def test_seccomp_refusing_userfaultfd_lands_on_eager_with_one_warning():
    if os.uname().machine != "x86_64":
        pytest.skip("the seccomp filter here is written for x86_64 syscall numbers")
    r = _run_script(SECCOMP_POOL_SCRIPT, {"PYTHONWARNINGS": "default"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["eager", "eager", "True"], r.stdout + r.stderr
    assert r.stderr.count("LazyshareWarning") == 1, r.stderr
    warning = r.stderr
    assert "Operation not permitted" in warning and "userfaultfd" in warning  # the cause
    assert "seccomp" in warning and "vm.unprivileged_userfaultfd" in warning  # the fix


KERNEL_PATHS_SCRIPT = """
import os, numpy as np, multiprocessing as mp
import lazyshare, _fault_funcs as ff
from lazyshare.pool import Pool

if __name__ == "__main__":
    a = np.random.default_rng(6).random(1 << 18)  # 2 MiB
    with lazyshare.exported(a) as desc:
        ctx = mp.get_context("spawn"); q = ctx.Queue()
        p = ctx.Process(target=ff.kernel_paths_child, args=(desc, q)); p.start()
        out = q.get(timeout=30); p.join()
    for k, v in sorted(out.items()):
        print(f"{k}={v}".replace(" ", "_"))
    with Pool(1) as pool:
        try:
            pool.apply(ff.tofile_task, (a, os.path.join(os.environ["HOME"], "t.bin")))
            print("pool_tofile=ok")
        except OSError as e:
            print("pool_tofile=" + ("explained" if "lazyshare.materialize" in " ".join(getattr(e, "__notes__", [])) else "bare"))
        pool.close(); pool.join()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges to another user")
def test_user_mode_only_rung_kernel_accesses_as_an_unprivileged_user():
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        if f.read().strip() != "0":
            pytest.skip("vm.unprivileged_userfaultfd=1: an ordinary user gets the full uffd rung here")
    r = run_as_nobody(KERNEL_PATHS_SCRIPT)
    assert r.returncode == 0, r.stderr
    out = dict(line.split("=", 1) for line in r.stdout.split())
    assert out["mode"] == "uffd-user-mode-only", out
    for path in ("os.write", "tofile", "np.save", "send"):
        # before: loud (EFAULT or numpy's short-write OSError), never wrong bytes;
        assert out[path] == "ok" or out[path].startswith("OSError"), (path, out[path])
        assert out[path] != "WRONG"
        # after materialize(): works
        assert out[path + "+materialize"] == "ok", (path, out)
    assert out["os.write"].startswith("OSError:14") and out["send"].startswith("OSError:14")
    # through the pool, the error says what to do
    assert out["pool_tofile"] == "explained", out


def test_eager_rung_decision_is_reported_by_capabilities(monkeypatch):
    monkeypatch.setenv("LAZYSHARE_MODE", "eager")
    caps = handler._probe()
    assert caps.mode == "eager" and caps.forced and not caps.lazy
