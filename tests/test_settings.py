"""lazyshare.settings: every LAZYSHARE_* variable read in one place and handed to the native core."""

import os
import subprocess
import sys
import textwrap

import pytest

from lazyshare import settings

pytestmark = pytest.mark.timeout(60)


def test_defaults_when_unset():
    s = settings.read({})
    assert s == settings.Settings()
    assert (s.min_block, s.max_block, s.spin_us, s.data_path) == (4096, 4 << 20, 50, "install")


def test_values_parsed():
    s = settings.read(
        {
            "LAZYSHARE_MODE": "eager",
            "LAZYSHARE_DATA_PATH": "wire",
            "LAZYSHARE_MIN_BLOCK": "8192",
            "LAZYSHARE_FAULT_TIMEOUT": "2.5",
            "LAZYSHARE_SPIN_US": "0",
            "LAZYSHARE_SERVER_THREADS": "3",
        }
    )
    assert (s.mode, s.data_path, s.min_block, s.fault_timeout, s.spin_us, s.server_threads) == (
        "eager",
        "wire",
        8192,
        2.5,
        0,
        3,
    )


@pytest.mark.parametrize(
    "name,value",
    [("LAZYSHARE_SPIN_US", "fast"), ("LAZYSHARE_MIN_BLOCK", "-1"), ("LAZYSHARE_DATA_PATH", "carrier-pigeon")],
)
def test_malformed_value_names_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        settings.read({name: value})


def test_server_threads_reach_the_native_core():
    # The page server starts as many loops as LAZYSHARE_SERVER_THREADS says:
    # the value went from the environment through settings into C.
    code = textwrap.dedent(
        """
        import os, sys, time, numpy as np
        from lazyshare import handler

        def loops():  # each loop names itself once it runs
            names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
            return names.count("lazyshare-pages")

        a = np.ones(1 << 20)
        handler.export(a)
        deadline = time.monotonic() + 5
        while loops() < int(sys.argv[1]) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        print(loops())
        """
    )
    for n in ("1", "3"):
        env = dict(os.environ, LAZYSHARE_SERVER_THREADS=n)
        out = subprocess.run(
            [sys.executable, "-c", code, n], env=env, capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == n
