"""The README's quickstart runs as written, and says what it prints."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

import bondgate

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_as_written(tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    code = re.search(r"## Quickstart\s+```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it saves "mlp-mpo" into the working directory
    torch.manual_seed(0)
    ns: dict = {}
    with warnings.catch_warnings(record=True) as seen:  # as written, it is told nothing to do differently
        warnings.simplefilter("always")
        exec(compile(code, "README quickstart", "exec"), ns)
    assert not [str(w.message) for w in seen if issubclass(w.category, UserWarning)]
    layer, model2 = ns["layer"], ns["model2"]
    assert layer.num_params == 16_896 and layer.bond_dims == (16, 32, 16)  # its comments' figures
    assert "65,536 -> 16,896 weights" in code and "(16, 32, 16)" in code
    assert (tmp_path / "mlp-mpo" / "bondgate.json").is_file()
    gated = [m for m in model2.modules() if isinstance(m, bondgate.GatedMPOLinear)]
    assert gated and all(bool(m.controller.proj.weight.any()) for m in gated)  # fitted
    model2.eval()
    bondgate.gating.average_flops(model2, reset=True)
    with torch.no_grad():
        model2(ns["calib"][0])
    assert abs(bondgate.gating.average_flops(model2) - 0.5) < 0.02  # "half the FLOPs on average"
