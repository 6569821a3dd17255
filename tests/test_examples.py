"""The example scripts (small sizes) and the notebook, executed as a user would."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str, beside_the_stdlib: bool = True) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    if not beside_the_stdlib:
        return out
    # every pool example prints time and bytes moved beside the stdlib pool
    assert re.search(r"^lazyshare\.Pool\s+[\d.]+s\s+[\d.]+ \w*B\s+\(lazy", out, re.M), out
    assert re.search(r"^multiprocessing\.Pool\s+[\d.]+s\s+[\d.]+ \w*B\s+\(pickled\)", out, re.M), out
    assert re.search(r"x faster, [\d.]+x fewer bytes moved", out), out
    return out


def test_feature_extraction():
    _run("feature_extraction.py", "--rows", "40000", "--cols", "32", "--chunks", "8")


def test_bootstrap():
    out = _run("bootstrap.py", "--size-mib", "16", "--tasks", "4", "--replicates", "3", "--blocks", "4")
    assert "95% interval of the mean" in out


def test_groupwise_pandas():
    pytest.importorskip("pandas")
    out = _run("groupwise_pandas.py", "--rows", "200000", "--stores", "50", "--tasks", "4")
    assert "median elasticity" in out


def test_notebook_executes():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    path = EXAMPLES / "lazyshare_tour.ipynb"
    nb = nbformat.read(path, as_version=4)
    # stored without outputs
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    client = nbclient.NotebookClient(
        nb, timeout=100, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    )
    client.execute()  # raises CellExecutionError if any cell fails
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "BrokenWorkerError" in text and "still working" in text
    try:
        import distributed  # noqa: F401

        assert "big was never pickled" in text  # the Dask cell ran
    except ImportError:
        assert "skipped: lazyshare.dask needs" in text
    assert "lazyshare.Pool" in text and "multiprocessing.Pool" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the chart was not drawn"


def test_fill_output():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "fill_output.py"), "--rows", "8192", "--cols", "256", "--tasks", "8"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identical outputs" in proc.stdout, proc.stdout
    assert re.search(
        r"^lazyshare\.Pool\s+[\d.]+s\s+[\d.]+ \w*B\s+\(lazy in \+ written back\)", proc.stdout, re.M
    )


def test_dask_windows():
    pytest.importorskip(
        "distributed",
        minversion="2025.1",
        reason="lazyshare.dask needs dask.distributed 2025.1+ (Python 3.10+)",
    )
    out = _run("dask_windows.py", "--size-mib", "32", "--tasks", "4", beside_the_stdlib=False)
    assert re.search(r"^lazyshare\.dask\s+[\d.]+s\s+[\d.]+ \w*B fetched by the workers", out, re.M), out
    assert re.search(r"^dask \(pickled\)\s+[\d.]+s", out, re.M), out
    assert "mean block maximum over 4 tasks" in out
