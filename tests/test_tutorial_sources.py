"""The committed notebooks are what tutorials/_build.py generates (edit _build.py, then regenerate)."""

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


def _build_module():
    spec = importlib.util.spec_from_file_location("tutorials_build", TUTORIALS / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", sorted(p.name for p in TUTORIALS.glob("*.ipynb")))
def test_notebook_sources_match_build(name):
    cells = _build_module().NOTEBOOKS[name]
    committed = nbformat.read(TUTORIALS / name, as_version=4).cells
    assert [(c.cell_type, c.source) for c in committed] == [(c.cell_type, c.source) for c in cells]
