"""Execute the tutorial notebooks in quick mode (``BONDGATE_QUICK=1``) and check they run cleanly.

Deselected by default (``addopts`` excludes the ``notebooks`` marker); run them with::

    python -m pytest -q -m notebooks tests/test_notebooks.py -s

Each notebook runs in a fresh kernel whose working directory is ``tutorials/``; the test fails on any
cell error or on a notebook without a single ``image/png`` output. Timings are printed to stdout, not asserted
(a timed test fails on a loaded machine without a bug; ``nbclient``'s per-cell timeout stops a hung one).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.notebooks

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(p.name for p in TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
TIMINGS: dict[str, float] = {}


def test_the_four_notebooks_exist():
    assert NOTEBOOKS == ["01_bank_marketing_mpo.ipynb", "02_dynamic_bond_gating.ipynb",
                         "03_compress_a_transformer.ipynb", "04_fast_inference.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_quick_mode(name, monkeypatch):
    monkeypatch.setenv("BONDGATE_QUICK", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(TUTORIALS)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    seconds = time.perf_counter() - t0
    TIMINGS[name] = seconds
    print(f"\n{name}: {seconds:.1f} s in quick mode")

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert pngs, f"{name} produced no image/png output"
