"""Fuzzing checkpoints (issue 18): random models round-trip bit-exactly, and a randomly damaged or edited
checkpoint either loads the very same model or fails with a clear ``ValueError`` / ``FileNotFoundError`` —
never another exception, never a silently different model. (A re-stamped edit of a gated layer's ``mode`` to another
valid value may also load: then it must be the model ``set_mode`` with that value gives.)"""

import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bondgate
from bondgate import GatingConfig, MPOLinear, PlanPolicy
from bondgate.io import _meta_sha256

FLOPS = PlanPolicy(select="flops")  # no autotuning: the fuzzer builds many layers
CLEAR = (ValueError, FileNotFoundError)


@st.composite
def models(draw):
    widths = draw(st.lists(st.sampled_from([6, 8, 12, 16, 30]), min_size=2, max_size=4))
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        lin = nn.Linear(a, b, bias=draw(st.booleans()))
        if draw(st.booleans()):
            lin = MPOLinear.from_linear(lin, max_bond=draw(st.integers(1, 6)), num_cores=draw(st.integers(2, 3)),
                                        policy=FLOPS)
        layers += [lin] if i == 0 else [nn.ReLU(), lin]
    model = nn.Sequential(*layers)
    gateable = any(isinstance(m, MPOLinear) and max(m.bond_dims, default=0) > 1 for m in model)  # bonds of 1: one width
    if gateable and draw(st.booleans()):
        bondgate.gate(model, GatingConfig(controller=draw(st.sampled_from(["linear", "error"]))))
        bondgate.set_mode(model, draw(st.sampled_from(["full", 0.5])))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return model.to(dtype).eval(), widths[0], dtype


def _json_values():
    return st.one_of(st.none(), st.booleans(), st.integers(-3, 10**9), st.floats(allow_nan=True),
                     st.text(max_size=5), st.lists(st.integers(-2, 10**6), max_size=4), st.dictionaries(
                         st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def damages(draw):
    kind = draw(st.sampled_from(["flip", "truncate", "append", "delete", "edit", "edit_restamped"]))
    return kind, draw(st.integers(0, 2**31)), draw(st.integers(0, 7)), draw(_json_values())


def _damage(out: Path, damage) -> tuple[str | None, str] | None:
    """Damages the checkpoint ``out``; returns ``(layer name or None for the top level, key)`` of an edited field."""
    kind, where, bit, value = damage
    edited = None
    files = sorted(p for p in out.iterdir() if p.is_file())
    path = files[where % len(files)]
    data = bytearray(path.read_bytes())
    if kind == "flip" and data:
        data[where % len(data)] ^= 1 << bit
    elif kind == "truncate":
        del data[where % max(len(data), 1):]
    elif kind == "append":
        data += bytes([bit]) * (1 + where % 5)
    elif kind == "delete":
        path.unlink()
        return None
    elif kind.startswith("edit"):
        path = out / "bondgate.json"
        meta = json.loads(path.read_text())
        # a random field of a random layer spec, or of the top level
        layer = next(iter(meta["layers"]), None) if where % 2 else None
        spec = meta["layers"][layer] if layer is not None else meta
        keys = sorted(spec)
        edited = layer, keys[where % len(keys)]
        spec[edited[1]] = value
        if kind == "edit_restamped":  # consistent checksum: only the content is wrong
            meta["meta_sha256"] = _meta_sha256(meta)
        data = bytearray(json.dumps(meta).encode())
    path.write_bytes(bytes(data))
    return edited if kind == "edit_restamped" else None


def _as_set(model: nn.Module, edited: tuple[str | None, str], value) -> nn.Module | None:
    """``model`` with the edited setting applied through its public setter (a copy), or None for a field that is not
    such a setting: only a gated layer's ``mode`` (``set_mode``) may be edited to load another model."""
    layer, key = edited
    if layer is None or key != "mode" or not isinstance(model.get_submodule(layer), bondgate.GatedMPOLinear):
        return None
    twin = copy.deepcopy(model)
    bondgate.set_mode(twin.get_submodule(layer), value)  # load took the value: set_mode must too
    return twin.eval()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models(), damages())
def test_damaged_checkpoints_load_identically_or_fail_clearly(built, damage):
    model, width, dtype = built
    x = torch.randn(5, width, dtype=dtype)
    with torch.no_grad():
        want = model(x)
    tmp = Path(tempfile.mkdtemp())
    try:
        out = bondgate.save(model, tmp / "ckpt")
        with torch.no_grad():
            assert torch.equal(bondgate.load(out)(x), want)  # the round trip is bit-exact
        edited = _damage(out, damage)
        try:
            loaded = bondgate.load(out)
        except CLEAR:
            return
        with torch.no_grad():  # whatever loads must be the same model, or the one a re-stamped setting describes
            got = loaded(x)
            if not torch.equal(got, want):
                twin = _as_set(model, edited, damage[3]) if edited is not None else None
                assert twin is not None and torch.equal(got, twin(x)), damage
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_restamped_setting_edit_loads_the_model_it_describes(tmp_path):
    """Found by the fuzz test above (it called this a silently different model): a gated layer's ``mode`` edited from
    ``"full"`` to 0.5 with a re-stamped checksum is a valid setting, and loads as written."""
    torch.manual_seed(0)
    model = nn.Sequential(MPOLinear.from_linear(nn.Linear(6, 6, bias=False), max_bond=2, num_cores=2, policy=FLOPS))
    bondgate.gate(model, GatingConfig(controller="linear"))
    bondgate.set_mode(model, "full")
    out = bondgate.save(model.eval(), tmp_path / "ckpt")
    meta = json.loads((out / "bondgate.json").read_text())
    next(iter(meta["layers"].values()))["mode"] = 0.5
    meta["meta_sha256"] = _meta_sha256(meta)
    (out / "bondgate.json").write_text(json.dumps(meta))
    loaded = bondgate.load(out)
    bondgate.set_mode(model, 0.5)
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert loaded[0].mode == 0.5 and torch.equal(loaded(x), model(x))
        bondgate.set_mode(model, "full")
        assert not torch.equal(loaded(x), model(x))  # the edit is not a no-op


@pytest.mark.parametrize("field", ["in_features", "out_features"])
@pytest.mark.parametrize("value", [0, True, 6.0, "6"])
def test_layer_spec_edited_to_a_bad_size_fails_clearly(field, value, tmp_path):
    """Found by the fuzz test above: a re-stamped spec with ``in_features = 0`` loaded, and the layer refused every
    input; ``true`` loaded as a 1-wide layer (``int()`` takes bools, floats and strings)."""
    model = nn.Sequential(MPOLinear.from_linear(nn.Linear(6, 6, bias=False), max_bond=1, num_cores=2, policy=FLOPS))
    out = bondgate.save(model, tmp_path / "ckpt")
    meta = json.loads((out / "bondgate.json").read_text())
    next(iter(meta["layers"].values()))[field] = value
    meta["meta_sha256"] = _meta_sha256(meta)
    (out / "bondgate.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sizes must be positive integers"):
        bondgate.load(out)

