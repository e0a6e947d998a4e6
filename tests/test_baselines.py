"""Baselines at equal stored size: low-rank SVD, magnitude pruning, dynamic int8, sizes, latency."""

import copy
import io
import math
import re
import warnings

import pytest
import torch
from torch import nn

import bondgate
from bondgate import (
    LowRankLinear,
    MPOLinear,
    PlanPolicy,
    latency,
    magnitude_prune,
    quantize_int8,
    size_on_disk,
    svd_compress,
)
from bondgate.baselines import load_sparse_state_dict, mpo_budget, stored_bytes


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 40), nn.ReLU(), nn.Linear(40, 12))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _snapshot(model: nn.Module) -> tuple[dict, list]:
    return copy.deepcopy(model.state_dict()), [(n, type(m)) for n, m in model.named_modules()]


def _assert_unchanged(model: nn.Module, snap: tuple[dict, list]) -> None:
    state, structure = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 10))
    return model, ids


def _conv1d_names(model: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, Conv1D)]


# ------------------------------------------------------------------------------------ LowRankLinear
def test_low_rank_full_rank_reproduces_linear():
    lin = nn.Linear(40, 24)
    layer = LowRankLinear.from_linear(lin, rank=24)
    x = torch.randn(3, 5, 40)
    assert torch.allclose(layer(x), lin(x), atol=1e-5)
    assert layer.error < 1e-6
    assert torch.allclose(layer.to_linear().weight, lin.weight, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 17])
def test_low_rank_param_count(k):
    layer = LowRankLinear.from_linear(nn.Linear(40, 24), rank=k)
    assert layer.U.shape == (24, k) and layer.V.shape == (k, 40)
    assert layer.num_params == k * (40 + 24)
    assert sum(p.numel() for n, p in layer.named_parameters() if n != "bias") == k * 64
    assert layer(torch.randn(7, 40)).shape == (7, 24)


def test_low_rank_without_bias_and_bad_rank():
    lin = nn.Linear(10, 6, bias=False)
    layer = LowRankLinear.from_linear(lin, rank=6)
    assert layer.bias is None
    assert torch.allclose(layer(torch.ones(2, 10)), lin(torch.ones(2, 10)), atol=1e-5)
    with pytest.raises(ValueError):
        LowRankLinear.from_linear(lin, rank=7)
    with pytest.raises(ValueError):
        LowRankLinear.from_linear(lin, rank=0)


def test_low_rank_parameters_are_tracked_through_copies_moves_and_loads(tmp_path):
    """U, V and the bias are TrackedParameters (a write through .data moves their version counter), also after
    deepcopy, pickling, dtype moves, load_state_dict(assign=True) and bondgate.load: what lets Recurrent keep
    U @ V between inference calls."""
    import copy
    import pickle

    import bondgate
    from bondgate.layer import TrackedParameter

    low = LowRankLinear.from_linear(nn.Linear(12, 10), 4)
    fresh = LowRankLinear(12, 10, 4)
    fresh.load_state_dict({k: v.clone() for k, v in low.state_dict().items()}, assign=True)
    loaded = bondgate.load(bondgate.save(nn.Sequential(low), tmp_path / "ckpt"),
                           model=nn.Sequential(nn.Linear(12, 10)))[0]
    for layer in (low, copy.deepcopy(low), pickle.loads(pickle.dumps(low)), copy.deepcopy(low).double(), fresh,
                  loaded):
        assert all(type(p) is TrackedParameter for p in layer.parameters()), layer
        before = layer.V._version
        layer.V.data.mul_(2)
        assert layer.V._version > before


@pytest.mark.parametrize("k", [1, 8, 20])
def test_svd_error_is_eckart_young(k):
    W = torch.randn(30, 50, dtype=torch.float64)
    lin = nn.Linear(50, 30, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(W)
    layer = LowRankLinear.from_linear(lin, rank=k)
    s = torch.linalg.svdvals(W)
    bound = float(s[k:].norm())
    err = float(torch.linalg.norm(W - layer.weight_matrix().detach()))
    assert err == pytest.approx(bound, rel=1e-10)
    assert layer.error == pytest.approx(bound / float(s.norm()), rel=1e-10)
    # sqrt(s) split: both factors carry the same column/row norms.
    assert torch.allclose(layer.U.norm(dim=0), layer.V.norm(dim=1))


def test_low_rank_accepts_conv1d():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(24, 40)  # nf=out=24, nx=in=40; weight (40, 24)
    layer = LowRankLinear.from_linear(conv, rank=24)
    assert (layer.in_features, layer.out_features) == (40, 24)
    x = torch.randn(4, 40)
    assert torch.allclose(layer(x), conv(x), atol=1e-5)


# ------------------------------------------------------------------------------------ svd_compress
def test_svd_compress_ratio_picks_floor_rank_and_leaves_input():
    model = _mlp()
    snap = _snapshot(model)
    new, info = svd_compress(model, param_ratio=0.25)
    _assert_unchanged(model, snap)
    # 48x96: budget 1152 -> rank 1152 // 144 = 8; 96x40: 960 // 136 = 7; 40x12: 120 // 52 = 2
    assert [info["layers"][n]["rank"] for n in ("0", "2", "4")] == [8, 7, 2]
    assert all(isinstance(new[i], LowRankLinear) for i in (0, 2, 4))
    assert info["params"] == 8 * 144 + 7 * 136 + 2 * 52
    assert all(d["params"] <= d["budget"] for d in info["layers"].values())
    assert info["dense_params"] == 48 * 96 + 96 * 40 + 40 * 12


def test_svd_compress_keeps_dense_when_rank_reaches_full():
    model = _mlp()
    new, info = svd_compress(model, param_ratio=1.0)
    assert all(d["kind"] == "dense" for d in info["layers"].values())
    assert all(type(new[i]) is nn.Linear for i in (0, 2, 4))
    x = torch.randn(3, 48)
    assert torch.equal(new(x), model(x))
    # Linear(40, 12): dense 480 weights, rank r stores 52 r; Linear(96, 40): rank r stores 136 r.
    _, info = svd_compress(model, params={"4": 480, "2": 3801})
    assert info["layers"]["4"]["kind"] == "dense" and info["layers"]["4"]["params"] == 480
    assert info["layers"]["2"]["rank"] == 27 and info["layers"]["2"]["params"] == 3672
    _, info = svd_compress(model, params={"4": 479, "2": 3})
    assert info["layers"]["4"]["rank"] == 9 and info["layers"]["4"]["params"] == 468
    assert info["layers"]["2"]["rank"] == 1  # rank >= 1 even when the budget is below one rank
    assert set(info["layers"]) == {"2", "4"}


def test_svd_compress_params_match_an_mpo_model():
    model = _mlp()
    mpo_model = copy.deepcopy(model)
    mpo_model[0] = MPOLinear.from_linear(model[0], max_bond=4, num_cores=2)
    budget = mpo_budget(mpo_model)
    assert budget == {"0": mpo_model[0].num_params}
    new, info = svd_compress(model, params=budget)
    layer = info["layers"]["0"]
    assert layer["budget"] == mpo_model[0].num_params
    assert layer["rank"] == max(1, layer["budget"] // 144)
    assert type(new[2]) is nn.Linear  # untargeted layers untouched


def test_svd_compress_targets():
    model = _mlp()
    _, info = svd_compress(model, param_ratio=0.3, target=["2"])
    assert set(info["layers"]) == {"2"}
    _, info = svd_compress(model, param_ratio=0.3, target=lambda name, m: m.out_features > 20)
    assert set(info["layers"]) == {"0", "2"}
    with pytest.raises(KeyError):
        svd_compress(model, param_ratio=0.3, target=["9"])
    with pytest.raises(TypeError):
        svd_compress(model, param_ratio=0.3, target=["1"])  # ReLU
    with pytest.raises(ValueError):
        svd_compress(model, param_ratio=0.3, params={"0": 100})
    with pytest.raises(ValueError):
        svd_compress(model, params={"0": 100}, target=["0"])
    # a string is a regex over whole names, as CompressionConfig.target_modules takes it (was: one exact name)
    _, info = svd_compress(model, param_ratio=0.3, target=r"[02]")
    assert set(info["layers"]) == {"0", "2"}
    assert set(magnitude_prune(model, param_ratio=0.3, target="2")[1]["layers"]) == {"2"}
    with pytest.raises(KeyError, match="matches none"):
        svd_compress(model, param_ratio=0.3, target=r"enc.*")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        svd_compress(model, param_ratio=0.3, target="(")


def test_replacing_baselines_skip_torch_transformer_layers():
    # nn.TransformerEncoderLayer's fast path reads linear1.weight etc. directly: even the bare
    # quantize_dynamic breaks it, so SVD and int8 leave layers inside torch's transformer modules alone.
    model = nn.Sequential(nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True),
                          nn.Linear(32, 32)).eval()
    x = torch.randn(2, 5, 32)
    new, info = svd_compress(model, param_ratio=0.3)
    assert set(info["skipped"]) == {"0.self_attn.out_proj", "0.linear1", "0.linear2"}
    assert set(info["layers"]) == {"1"} and isinstance(new[1], LowRankLinear)
    with torch.inference_mode():
        assert new(x).shape == (2, 5, 32)
        q = quantize_int8(model)
        assert _rel(q(x), model(x)) < 0.05
    with pytest.raises(ValueError, match="TransformerEncoderLayer"):
        svd_compress(model, param_ratio=0.3, target=["0.linear1"])
    _, info = magnitude_prune(model, param_ratio=0.3)  # pruning keeps the modules, so it may go in
    assert set(info["layers"]) == {"0.self_attn.out_proj", "0.linear1", "0.linear2", "1"}


def test_svd_compress_bare_linear_is_replaced():
    lin = nn.Linear(64, 64)
    new, info = svd_compress(lin, rank=4)
    assert isinstance(new, LowRankLinear) and new.num_params == 4 * 128
    assert isinstance(lin, nn.Linear)


def test_svd_compress_gpt2_conv1d_full_rank_matches(gpt2):
    model, ids = gpt2
    snap = _snapshot(model)
    ref = model(ids).logits
    convs = _conv1d_names(model)
    assert len(convs) == 8
    new, info = svd_compress(model, rank=64)  # every GPT-2 Conv1D here has min(in, out) = 64
    _assert_unchanged(model, snap)
    assert set(info["layers"]) == set(convs)
    assert info["skipped"] == {"lm_head": "weight is tied to another module"}
    assert all(isinstance(new.get_submodule(n), LowRankLinear) for n in convs)
    assert _conv1d_names(new) == []
    c_attn = new.transformer.h[0].attn.c_attn
    assert (c_attn.in_features, c_attn.out_features) == (64, 192)
    assert torch.allclose(new(ids).logits, ref, atol=1e-4)
    assert new.lm_head.weight is new.transformer.wte.weight  # tie survives


def test_svd_compress_gpt2_conv1d_budget(gpt2):
    model, ids = gpt2
    new, info = svd_compress(model, param_ratio=0.5)
    # c_attn 64->192: 6144 // 256 = 24; c_proj 64->64: 2048 // 128 = 16; c_fc / mlp.c_proj: 8192 // 320 = 25
    ranks = {n.split("h.0.")[-1]: d["rank"] for n, d in info["layers"].items() if ".h.0." in n}
    assert ranks == {"attn.c_attn": 24, "attn.c_proj": 16, "mlp.c_fc": 25, "mlp.c_proj": 25}
    conv = model.transformer.h[1].mlp.c_fc
    low = new.transformer.h[1].mlp.c_fc
    s = torch.linalg.svdvals(conv.weight.detach().double())
    err = torch.linalg.norm(conv.weight.detach().T.double() - low.weight_matrix().detach().double())
    assert float(err) == pytest.approx(float(s[25:].norm()), rel=1e-4)
    assert torch.isfinite(new(ids).logits).all()


# ------------------------------------------------------------------------------------ magnitude_prune
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.37, 1.0])
def test_magnitude_prune_keeps_exact_budget_of_largest(ratio):
    model = _mlp()
    snap = _snapshot(model)
    new, info = magnitude_prune(model, param_ratio=ratio)
    _assert_unchanged(model, snap)
    for name in ("0", "2", "4"):
        w_old, w_new = model.get_submodule(name).weight, new.get_submodule(name).weight
        budget = math.floor(ratio * w_old.numel() + 0.5)
        kept = w_new != 0
        assert int(kept.sum()) == budget == info["layers"][name]["params"]
        assert torch.equal(w_new[kept], w_old[kept])  # survivors unchanged
        if 0 < budget < w_old.numel():
            assert w_old[kept].abs().min() >= w_old[~kept].abs().max()
        removed = float(w_old[~kept].detach().double().norm() / w_old.detach().double().norm())
        assert info["layers"][name]["error"] == pytest.approx(removed, abs=1e-12)
    assert new[0].bias is not None and torch.equal(new[0].bias, model[0].bias)
    # Real zeros, no torch.nn.utils.prune reparametrization left behind.
    assert set(dict(new.named_parameters())) == set(dict(model.named_parameters()))
    assert not any(m._forward_pre_hooks for m in new.modules())
    assert list(new.buffers()) == []


def test_magnitude_prune_ties_are_deterministic():
    lin = nn.Linear(4, 5)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([1.0, -1.0, 0.5, 1.0] * 5).reshape(5, 4))
    new, info = magnitude_prune(lin, params={"": 7})
    # 15 entries tie at |w| = 1; the 7 with the lowest flat index survive.
    flat = new.weight.detach().reshape(-1)
    survivors = torch.nonzero(flat).flatten().tolist()
    assert survivors == [0, 1, 3, 4, 5, 7, 8]
    again, _ = magnitude_prune(lin, params={"": 7})
    assert torch.equal(again.weight, new.weight)


def test_magnitude_prune_params_dict_and_gpt2(gpt2):
    model, ids = gpt2
    name = "transformer.h.1.mlp.c_fc"
    new, info = magnitude_prune(model, params={name: 1000})
    assert set(info["layers"]) == {name}
    assert int(torch.count_nonzero(new.get_submodule(name).weight)) == 1000
    assert torch.equal(new.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)
    _, info = magnitude_prune(model, param_ratio=0.2)
    assert set(info["layers"]) == set(_conv1d_names(model)) and "lm_head" in info["skipped"]
    with pytest.raises(ValueError, match="tied"):
        magnitude_prune(model, params={"lm_head": 10})  # would prune the embedding too


# ------------------------------------------------------------------------------------ quantize_int8
def test_quantize_int8_mlp_close_to_fp32():
    model = _mlp().eval()
    snap = _snapshot(model)
    q = quantize_int8(model)
    _assert_unchanged(model, snap)
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    assert sum(isinstance(m, DynLinear) for m in q.modules()) == 3
    x = torch.randn(16, 48)
    with torch.inference_mode():
        assert _rel(q(x), model(x)) < 0.05


def test_quantize_int8_converts_gpt2_conv1d(gpt2):
    model, ids = gpt2
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear
    from torch.ao.quantization import quantize_dynamic

    # The documented caveat: quantize_dynamic matches nn.Linear by exact type, so Conv1D stays fp32.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        bare = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert len(_conv1d_names(bare)) == 8
    q = quantize_int8(model)
    assert _conv1d_names(q) == [] and _conv1d_names(model) != []
    assert sum(isinstance(m, DynLinear) for m in q.modules()) == 8
    assert type(q.lm_head) is nn.Linear and q.lm_head.weight is q.transformer.wte.weight
    with torch.inference_mode():
        assert _rel(q(ids).logits, model(ids).logits) < 0.05


def test_quantize_int8_bare_linear():
    lin = nn.Linear(32, 16)
    q = quantize_int8(lin)
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    assert isinstance(q, DynLinear)
    x = torch.randn(4, 32)
    assert _rel(q(x), lin(x)) < 0.05


# ------------------------------------------------------------------------------------ sizes
def test_size_of_fp32_linear():
    n = size_on_disk(nn.Linear(256, 256))
    assert 262_144 + 1_024 <= n < 262_144 + 4_096


def test_size_of_low_rank_model():
    new, _ = svd_compress(nn.Sequential(nn.Linear(256, 256)), rank=16)
    n = stored_bytes(new)
    assert 16 * 512 * 4 + 1_024 <= n < 16 * 512 * 4 + 1_024 + 1_024


@pytest.mark.parametrize("ratio, form", [(0.1, "mask"), (0.03, "csr"), (1.0, "dense")])
def test_pruned_layers_are_stored_in_their_smallest_form(tmp_path, ratio, form):
    # int32 CSR was the only sparse form (8 bytes per fp32 non-zero): at half the weights kept it stored more than
    # the dense matrix, and a layer that was not pruned (MiniLM's pooler) doubled
    model = nn.Sequential(nn.Linear(256, 256))
    pruned, info = magnitude_prune(model, param_ratio=ratio)
    nnz = info["layers"]["0"]["params"]
    payload = {"mask": nnz * 4 + 256 * 256 // 8, "csr": nnz * (4 + 2) + 257 * 4, "dense": 256 * 256 * 4}[form]
    payload += 256 * 4  # the bias
    dense = size_on_disk(pruned)
    stored = size_on_disk(pruned, sparse=True)
    assert payload <= stored < payload + 1_024
    assert dense >= 262_144 and (stored == dense) == (form == "dense")
    assert size_on_disk(pruned, sparse=info["layers"]) == stored
    path = tmp_path / "pruned.safetensors"
    assert size_on_disk(pruned, path, sparse=True) == stored == path.stat().st_size
    back = load_sparse_state_dict(path)
    assert back.keys() == pruned.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in pruned.state_dict().items())


def test_damaged_sparse_files_are_refused():
    # a negative column or unordered row pointers put values in the wrong places without a word; a short blob gave
    # struct.error, a huge header length UnicodeDecodeError
    from safetensors.torch import save

    from bondgate.baselines import sparse_state_dict

    torch.manual_seed(0)
    pruned, _ = magnitude_prune(nn.Sequential(nn.Linear(300, 40, bias=False)), param_ratio=0.03)
    tensors, meta = sparse_state_dict(pruned, sparse=True)
    assert "0.weight.csr_col_indices" in tensors

    def damaged(key, edit):
        t = {k: v.clone() for k, v in tensors.items()}
        edit(t[key])
        return save(t, meta)

    for data, match in [
        (damaged("0.weight.csr_col_indices", lambda c: c.__setitem__(0, -1)), "column index outside"),
        (damaged("0.weight.csr_col_indices", lambda c: c.__setitem__(0, 300)), "column index outside"),
        (damaged("0.weight.csr_crow_indices", lambda r: r.__setitem__(1, r[2] + 1)), "row pointers"),
        (damaged("0.weight.csr_crow_indices", lambda r: r.__setitem__(-1, r[-1] + 1)), "row pointers"),
        (b"", "not a readable safetensors file"), (b"\xff" * 8 + b"{}", "not a readable safetensors file"),
        (save(tensors, meta)[:-5], "not a readable safetensors file"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_sparse_state_dict(data)
    pruned, _ = magnitude_prune(nn.Sequential(nn.Linear(64, 64, bias=False)), param_ratio=0.5)
    tensors, meta = sparse_state_dict(pruned, sparse=True)
    with pytest.raises(ValueError, match="mask has 2048 entries set for 2047 values"):
        load_sparse_state_dict(save({**tensors, "0.weight.sparse_values": tensors["0.weight.sparse_values"][1:]},
                                    meta))
    # values as a column (2048, 1): the entry count matched, and filling the weight raised torch's RuntimeError
    with pytest.raises(ValueError, match=r"values are not a list \(shape \(2048, 1\)\)"):
        load_sparse_state_dict(save({**tensors, "0.weight.sparse_values": tensors["0.weight.sparse_values"][:, None]},
                                    meta))


def test_int8_model_is_over_3x_smaller():
    model = nn.Sequential(nn.Linear(1024, 1024))
    q = quantize_int8(model)
    fp32, int8 = stored_bytes(model), stored_bytes(q)
    assert fp32 > 3 * int8
    assert int8 > 1024 * 1024
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    assert int8 == len(buf.getvalue())
    with pytest.raises(ValueError):
        stored_bytes(q, sparse=True)


def test_tied_weights_are_stored_once(gpt2):
    model, _ = gpt2
    unique = sum(p.numel() for p in model.parameters())  # parameters() already dedups the tie
    n = stored_bytes(model)
    assert 4 * unique <= n < 4 * unique + 8_192
    assert n < 4 * (unique + model.lm_head.weight.numel())


# ------------------------------------------------------------------------------------ latency
def test_latency_reports_and_restores():
    model = _mlp()
    model[1].train(False)
    before = [m.training for m in model.modules()]
    threads = torch.get_num_threads()
    out = latency(model, torch.randn(8, 48), reps=9, warmup=2, threads=1)
    assert set(out) >= {"median", "p10", "p90", "mean", "min", "reps", "threads"}
    assert 0 < out["min"] <= out["p10"] <= out["median"] <= out["p90"] < 1.0
    assert out["reps"] == 9 and out["threads"] == 1
    assert torch.get_num_threads() == threads
    assert [m.training for m in model.modules()] == before
    assert latency(model, (torch.randn(2, 48),), reps=2, warmup=0)["reps"] == 2
    kwargs = {"input1": torch.randn(1, 3), "input2": torch.randn(1, 3)}
    assert latency(nn.Bilinear(3, 3, 2), kwargs, reps=1)["reps"] == 1


def test_mpo_budget_counts_lowrank_layers_and_refuses_an_uncompressed_model():
    model = _mlp()
    mixed = copy.deepcopy(model)
    mixed[0] = MPOLinear.from_linear(model[0], max_bond=4, num_cores=2)
    mixed[2] = LowRankLinear.from_linear(model[2], rank=3)
    assert mpo_budget(mixed) == {"0": mixed[0].num_params, "2": mixed[2].num_params}
    with pytest.raises(ValueError, match="no MPOLinear or LowRankLinear"):
        mpo_budget(model)


def test_pruning_refuses_nan_weights_and_ratios_must_be_finite():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"0\.weight holds NaN"):
        magnitude_prune(model, param_ratio=0.5)
    for fn in (magnitude_prune, svd_compress):
        for bad in (float("inf"), float("nan"), -0.5):
            with pytest.raises(ValueError, match=r"a number in \[0, 1\]"):
                fn(_mlp(), param_ratio=bad)


def test_latency_leaves_a_gated_model_as_it_was():
    import bondgate as bg

    torch.manual_seed(0)
    m = nn.Sequential(bg.MPOLinear.from_linear(nn.Linear(64, 64), max_bond=8, num_cores=3), nn.ReLU(), nn.Linear(64, 1))
    bg.gate(m, bg.GatingConfig(budget=0.5))
    calib = [torch.randn(32, 64) for _ in range(4)]
    bg.set_budget(m, 0.5, calib, track=0.05)
    m.eval()
    x = torch.randn(16, 64) * 3  # shifted inputs: each call moves the tracked price
    before = {k: v.clone() for k, v in m.state_dict().items()}
    tracker = vars(m[0]._tracker).copy()
    bg.latency(m, x, reps=20, warmup=2)
    after = m.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert {k: v for k, v in vars(m[0]._tracker).items() if k != "seen"} == \
        {k: v for k, v in tracker.items() if k != "seen"}
    with torch.no_grad():
        m(x)  # ... while an ordinary call still does
    assert not torch.equal(before["0.budget_lambda"], m.state_dict()["0.budget_lambda"])


def test_latency_and_quantize_int8_argument_checks():
    lin = nn.Linear(8, 8)
    for kwargs, match in (({"threads": 0}, "threads must be None or a positive integer, got 0"),
                          ({"reps": 2.0}, "reps must be a positive integer, got a float"),
                          ({"reps": 0}, "reps must be a positive integer, got 0"),
                          ({"warmup": -1}, "warmup must be an integer >= 0, got -1")):
        with pytest.raises(ValueError, match=re.escape(match)):
            latency(lin, torch.randn(2, 8), **kwargs)
    with pytest.raises(ValueError, match="needs float32 layers"):
        quantize_int8(nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16))


def test_paired_latency_interleaves_the_models_rounds_in_alternating_order():
    from bondgate.baselines import paired_latency

    calls = []

    class Probe(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            calls.append(self.tag)
            return x

    out = paired_latency({"a": Probe("A"), "b": Probe("B")}, torch.zeros(1), reps=6, rounds=3, warmup=1, threads=1)
    assert "".join(calls) == "AB" + "AABB" + "BBAA" + "AABB"
    assert set(out) == {"a", "b"} and all(r["reps"] == 6 and r["min"] <= r["median"] <= r["p90"] for r in out.values())
    with pytest.raises(ValueError, match="rounds"):
        paired_latency({"a": Probe("A")}, torch.zeros(1), rounds=0)
    with pytest.raises(ValueError, match="mapping"):
        paired_latency([Probe("A")], torch.zeros(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sparse_forms_round_trip_odd_sizes_and_half_precision(dtype):
    from safetensors.torch import save

    from bondgate.baselines import sparse_state_dict

    torch.manual_seed(0)
    for ratio in (0.5, 0.02):  # the bitmask (63 entries: not a whole number of bytes), then CSR
        model = nn.Sequential(nn.Linear(9, 7), nn.Linear(7, 300)).to(dtype)
        pruned, _ = magnitude_prune(model, param_ratio=ratio)
        tensors, meta = sparse_state_dict(pruned, sparse=True)
        back = load_sparse_state_dict(save(tensors, meta))
        assert all(torch.equal(back[k], v) and back[k].dtype == dtype for k, v in pruned.state_dict().items())


def test_tiny_pruned_layers_stay_dense():
    # the sparse forms' extra header entries were not counted: six 4x4 layers at half their weights took 1,772
    # bytes "sparse" against 1,280 dense
    pruned, _ = magnitude_prune(nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(6)]), param_ratio=0.5)
    assert size_on_disk(pruned, sparse=True) == size_on_disk(pruned)


def test_csr_files_with_entries_out_of_order_are_refused():
    from safetensors.torch import save

    from bondgate.baselines import sparse_state_dict

    pruned, _ = magnitude_prune(nn.Sequential(nn.Linear(300, 40, bias=False)), param_ratio=0.03)
    tensors, meta = sparse_state_dict(pruned, sparse=True)
    col = tensors["0.weight.csr_col_indices"].clone()
    col[[0, 1]] = col[[1, 0]]  # two entries of row 0 swapped: the same values would land elsewhere
    repeated = tensors["0.weight.csr_col_indices"].clone()
    repeated[1] = repeated[0]  # one column written twice in row 0: the second value overwrote the first, silently
    for edit, match in [({"0.weight.csr_col_indices": col}, "do not increase within a row"),
                        ({"0.weight.csr_col_indices": repeated}, "do not increase within a row"),
                        ({"0.weight.csr_values": tensors["0.weight.csr_values"][:, None]}, "row pointers")]:
        with pytest.raises(ValueError, match=match):
            load_sparse_state_dict(save({**tensors, **edit}, meta))
    with pytest.raises(ValueError, match="is not two sizes"):
        load_sparse_state_dict(save(tensors, {**meta, "bondgate.csr": '{"0.weight": [true, 300]}'}))


def test_wide_pruned_layers_store_int32_columns():
    # int16 column indices hold up to 32,767: a layer 40,000 inputs wide must store int32 ones (int16 wrapped
    # columns past 32,767 to negatives, and the file could not be read back)
    from safetensors.torch import save

    from bondgate.baselines import sparse_state_dict

    torch.manual_seed(0)
    pruned, info = magnitude_prune(nn.Sequential(nn.Linear(40_000, 2, bias=False)), param_ratio=0.02)
    assert info["layers"]["0"]["params"] == 1_600  # 2% of 80,000
    tensors, meta = sparse_state_dict(pruned, sparse=True)
    cols = tensors["0.weight.csr_col_indices"]
    assert cols.dtype == torch.int32 and int(cols.max()) > 2**15
    back = load_sparse_state_dict(save(tensors, meta))
    assert torch.equal(back["0.weight"], pruned[0].weight)


def test_a_sparse_form_smaller_than_the_dense_file_is_taken():
    # both forms pay a header entry per tensor (~ name + 64 bytes): counting it for the sparse tensors but not for the
    # dense one kept a 16x16 layer at 208 of 256 weights dense, although its bitmask (208 x 4 + 256 / 8 = 864 bytes
    # of data in two tensors) makes a file 32 bytes smaller than the dense 1,024 bytes in one tensor
    pruned, info = magnitude_prune(nn.Sequential(nn.Linear(16, 16, bias=False)), param_ratio=208 / 256)
    assert info["layers"]["0"]["params"] == 208
    assert size_on_disk(pruned, sparse=True) < size_on_disk(pruned)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_forms_store_negative_zeros_as_zeros_and_keep_nans(dtype):
    # -0.0 is a zero: a weight pruned by multiplying with a mask holds many (stored as values, a 90%-pruned layer's
    # file grew from 71 KB to 306 KB); NaN entries come back
    from safetensors.torch import save

    from bondgate.baselines import sparse_state_dict

    torch.manual_seed(0)
    for ratio, form in ((0.5, "mask"), (0.02, "csr")):
        pruned, _ = magnitude_prune(nn.Sequential(nn.Linear(128, 128, bias=False)).to(dtype), param_ratio=ratio)
        w = pruned[0].weight.detach()
        plain = len(save(*sparse_state_dict(pruned, sparse=True)))
        w.copy_(w * (w != 0).to(dtype) * -1.0)  # the zeros become -0.0, as a mask product leaves them
        assert int(torch.signbit(w[w == 0]).sum()) == int((w == 0).sum()) > 0
        tensors, meta = sparse_state_dict(pruned, sparse=True)
        assert f"bondgate.{form}" in meta and len(save(tensors, meta)) == plain
        w[5, 9] = float("nan")
        back = load_sparse_state_dict(save(*sparse_state_dict(pruned, sparse=True)))["0.weight"]
        assert back.dtype == dtype and torch.equal(back.nan_to_num(7.0), w.nan_to_num(7.0))
        assert bool(back[5, 9].isnan()) and not bool(torch.signbit(back[back == 0]).any())


def test_tied_weights_round_trip_through_sparse_files(tmp_path):
    # a tied tensor was written once under its first key and nothing else: the file came back without head.weight,
    # and a strict load_state_dict of it failed
    import json

    from safetensors.torch import save

    from bondgate.baselines import sparse_state_dict

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid, self.head = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.relu(self.mid(self.emb(x))))

    torch.manual_seed(0)
    pruned, _ = magnitude_prune(LM(), param_ratio=0.25)
    path = tmp_path / "tied.safetensors"
    n = size_on_disk(pruned, path, sparse=True)
    back = load_sparse_state_dict(path)
    assert back.keys() == pruned.state_dict().keys() and back["head.weight"] is back["emb.weight"]
    fresh = LM()
    fresh.load_state_dict(back, strict=True)
    ids = torch.arange(50)
    assert fresh.head.weight is fresh.emb.weight and torch.equal(fresh(ids), pruned(ids))
    # the alias costs its metadata only: the file is the one without it plus that entry (headers pad to 8 bytes)
    tensors, meta = sparse_state_dict(pruned, sparse=True)
    assert "head.weight" not in tensors and json.loads(meta["bondgate.aliases"]) == {"head.weight": "emb.weight"}
    entry = len(json.dumps({"bondgate.aliases": meta["bondgate.aliases"]}, separators=(",", ":"))) - 1
    without = len(save(tensors, {k: v for k, v in meta.items() if k != "bondgate.aliases"}))
    assert n == stored_bytes(pruned, sparse=True) == len(save(tensors, meta)) and 0 <= n - without - entry < 8
    for aliases in ('{"head.weight": "nothing"}', '{"mid.bias": "emb.weight"}', '["head.weight"]'):
        with pytest.raises(ValueError, match="tied key|bondgate.aliases"):
            load_sparse_state_dict(save(tensors, {**meta, "bondgate.aliases": aliases}))


@pytest.mark.parametrize("damage", ["dense twin", "int values", "shifted row pointer"])
def test_sparse_files_with_a_dense_twin_int_values_or_a_shifted_row_pointer_are_refused(damage):
    # a dense "0.weight" next to its sparse parts was dropped for them silently; int32 values gave an int32 weight;
    # a row pointer moved by one was reported as columns out of order
    from safetensors.torch import save

    from bondgate.baselines import sparse_state_dict

    model = nn.Sequential(nn.Linear(300, 40, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, [10, 200]] = 1.0
        model[0].weight[1, [5, 100]] = 2.0
        model[0].weight[2:, 7] = 3.0
    pruned, _ = magnitude_prune(nn.Sequential(nn.Linear(64, 64, bias=False)), param_ratio=0.5)
    for m, values in ((model, "0.weight.csr_values"), (pruned, "0.weight.sparse_values")):
        tensors, meta = sparse_state_dict(m, sparse=True)
        if damage == "dense twin":
            edit, match = {"0.weight": torch.zeros(m[0].weight.shape)}, "the file holds it both dense and in a sparse"
        elif damage == "int values":
            edit, match = {values: tensors[values].to(torch.int32)}, "its values are torch.int32, not floating point"
        elif m is model:
            crow = tensors["0.weight.csr_crow_indices"].clone()
            assert crow[:3].tolist() == [0, 2, 4]
            crow[1] += 1  # row 0 takes row 1's first entry (column 5 after 200)
            edit = {"0.weight.csr_crow_indices": crow}
            match = (r"its columns do not increase within a row \(row 0: entries 0 to 2 by its row pointers\): "
                     "a row pointer or a column index is wrong")
        else:
            continue
        with pytest.raises(ValueError, match="'0.weight' is damaged: " + match):
            load_sparse_state_dict(save({**tensors, **edit}, meta))


def test_baselines_refuse_a_ratio_above_one_a_non_module_and_say_when_nothing_is_quantized():
    # param_ratio=2.0 was accepted (CompressionConfig refuses it); size_on_disk(None) failed deep inside with an
    # AttributeError; quantize_mpo on a model without MPO layers returned it unchanged without a word
    import bondgate

    model = nn.Sequential(nn.Linear(8, 8))
    for fn in (bondgate.magnitude_prune, bondgate.svd_compress):
        with pytest.raises(ValueError, match=r"param_ratio must be a number in \[0, 1\], got 2.0"):
            fn(model, param_ratio=2.0)
    import numpy as np

    assert bondgate.magnitude_prune(model, param_ratio=np.float32(0.5))[1]["layers"]["0"]["params"] == 32
    with pytest.raises(TypeError, match="expected an nn.Module, got NoneType"):
        bondgate.size_on_disk(None)
    with pytest.warns(UserWarning, match="quantize_mpo: the model has no MPO layer"):
        assert bondgate.quantize_mpo(model) is model


def test_a_string_is_not_taken_as_a_list_of_layer_names():
    # list("10") selected layers "1" and "0" of an 11-layer Sequential: 11,960 bytes instead of layer 10's 12,744
    torch.manual_seed(0)
    pruned, _ = magnitude_prune(nn.Sequential(*[nn.Linear(16, 16) for _ in range(11)]), 0.1)
    with pytest.raises(TypeError, match=r"the string '10' \(for one layer: \['10'\]\)"):
        size_on_disk(pruned, sparse="10")
    assert size_on_disk(pruned, sparse=["10"]) > size_on_disk(pruned, sparse=["1", "0"])


@pytest.mark.parametrize("method", ["svd", "prune"])
def test_baselines_refuse_a_model_on_the_meta_device(method):
    # every meta tensor's storage is at address 0: each layer was skipped as "tied to another module"
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    fn = (lambda m: svd_compress(m, 0.5)) if method == "svd" else (lambda m: magnitude_prune(m, 0.5))
    with pytest.raises(ValueError, match=r"0\.weight is on the meta device .* materialize"):
        fn(model)


class _Shared(nn.Module):
    """One ``nn.Linear(32, 32)`` registered under two names (``a``, ``b``), and ``c``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = self.a
        self.c = nn.Linear(32, 32)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_quantize_int8_quantizes_every_name_of_a_shared_layer():
    # quantize_dynamic walks named_children(), which skips a module already seen: alias b stayed an fp32 nn.Linear
    # (the file grew, 10,249 bytes against the fp32 model's 8,832); under two parents it became two int8 copies
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    torch.manual_seed(0)
    lin = nn.Linear(128, 128)
    two_parents = nn.Sequential(nn.Sequential(lin, nn.ReLU()), nn.Sequential(lin))
    for model, get in ((_Shared(), lambda m: (m.a, m.b)), (two_parents, lambda m: (m[0][0], m[1][0]))):
        model.eval()
        q = quantize_int8(model)
        first, second = get(q)
        assert isinstance(first, DynLinear) and first is second
        assert size_on_disk(q) < size_on_disk(model)
        x = torch.randn(4, first.in_features)
        with torch.inference_mode():
            assert _rel(q(x), model(x)) < 0.05


def test_a_shared_int8_layer_is_stored_once_and_its_file_loads_strictly(tmp_path):
    # each name's packed parameters were unpacked into tensors of their own: a 256 x 256 layer under two names
    # measured 135,505 bytes against 69,149 for one
    torch.manual_seed(0)
    lin = nn.Linear(256, 256)
    shared = nn.Sequential(lin, nn.ReLU(), lin).eval()
    once = nn.Sequential(lin, nn.ReLU()).eval()
    q, q_once = quantize_int8(shared), quantize_int8(once)
    assert size_on_disk(q) - size_on_disk(q_once) < 1_000  # the second name's keys, not a second weight
    size_on_disk(q, tmp_path / "q.pt")
    fresh = quantize_int8(nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval())
    fresh.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=False), strict=True)
    x = torch.randn(3, 256)
    with torch.inference_mode():
        assert torch.equal(fresh(x), q(x))


def test_baselines_compress_a_shared_layer_once_under_any_of_its_names():
    # target=["a", "b"] counted the one 32x32 layer twice (dense_params 2048) and SVD factored it twice; the regex
    # "b" matched none of the names named_modules() lists (a, c)
    for fn in (svd_compress, magnitude_prune):
        for target, listed in ((["a", "b"], "a"), (["b", "a"], "b"), ("b", "b"), (lambda n, m: n == "b", "b")):
            new, info = fn(_Shared(), 0.5, target=target)
            assert list(info["layers"]) == [listed]
            assert (info["dense_params"], info["params"]) == (1024, 512)
            assert new.a is new.b and type(new.c) is nn.Linear
            if fn is svd_compress:
                assert isinstance(new.a, LowRankLinear)
            else:
                assert int(torch.count_nonzero(new.a.weight)) == 512
        assert list(fn(_Shared(), 0.5)[1]["layers"]) == ["a", "c"]
        assert list(fn(_Shared(), params={"a": 512, "b": 512})[1]["layers"]) == ["a"]
        with pytest.raises(ValueError, match=r"params gives 'a' and 'b', two names of one layer, different values"):
            fn(_Shared(), params={"a": 512, "b": 256})
        with pytest.raises(KeyError, match=r"matches none of the names of the 2 nn.Linear / Conv1D layers of _Shared "
                                           r"\(a, b, c\)"):
            fn(_Shared(), 0.5, target="d")
    with pytest.raises(ValueError, match=r"rank gives 'a' and 'b', two names of one layer, different values"):
        svd_compress(_Shared(), rank={"a": 2, "b": 4})
    assert svd_compress(_Shared(), rank={"b": 2, "a": 2})[1]["layers"]["b"]["rank"] == 2


def test_baselines_keep_a_layers_freezing_mode_and_hooks():
    # svd_compress's LowRankLinear trained (all requires_grad True), was in training mode and had lost the
    # replaced layer's forward hook, where bondgate.compress keeps all three
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    model[0].requires_grad_(False)
    model[2].weight.requires_grad_(False)  # BitFit: the bias still trains
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    for fn in (svd_compress, magnitude_prune):
        calls.clear()
        new, _ = fn(model, 0.5)
        if fn is svd_compress:
            assert isinstance(new[0], LowRankLinear) and isinstance(new[2], LowRankLinear)
        new(torch.randn(2, 32))
        assert calls and not new[0].training and not new[2].training
        assert not any(p.requires_grad for p in new[0].parameters())
        assert {n: p.requires_grad for n, p in new[2].named_parameters()}.pop("bias") is True
        assert not any(p.requires_grad for n, p in new[2].named_parameters() if n != "bias")
    new, _ = svd_compress(nn.Linear(64, 64).requires_grad_(False).eval(), rank=4)  # the model is the layer
    assert isinstance(new, LowRankLinear) and not new.training and not any(p.requires_grad for p in new.parameters())


def test_magnitude_prune_keeps_an_empty_layer_dense_as_svd_compress_does():
    # nn.Linear(16, 0): "density": nnz / numel divided by zero
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 0))
    _, info = magnitude_prune(model, 0.5)
    assert info["layers"]["1"] == {"shape": (0, 16), "budget": 0, "dense_params": 0, "params": 0, "density": 1.0,
                                   "error": 0.0}
    assert (info["dense_params"], info["params"]) == (512, 256)
    assert magnitude_prune(model, params={"1": 3})[1]["layers"]["1"]["params"] == 0
    layer = svd_compress(model, 0.5)[1]["layers"]["1"]
    assert (layer["kind"], layer["params"], layer["dense_params"]) == ("dense", 0, 0)


def test_baselines_refuse_a_target_that_selects_nothing_they_take():
    # target=123 failed with "'int' object is not iterable"; target=[0] with "no submodule named 0" (there is one)
    model = nn.Sequential(nn.Linear(8, 8))
    takes = "target takes None, a regex string, a callable (name, module) -> bool or a list of module names"
    fns = (lambda t: svd_compress(model, 0.5, target=t), lambda t: magnitude_prune(model, 0.5, target=t),
           lambda t: quantize_int8(model, target=t))
    for fn in fns:
        with pytest.raises(TypeError, match=re.escape(f"{takes}, got int")):
            fn(123)
        with pytest.raises(TypeError, match=re.escape("target's module names must be strings, got 0 (int)")):
            fn([0])


# ------------------------------------------------ from a mutation run of lowrank.py (each kills a mutant that lived)
def _mp_float64_pair(out_f=10, in_f=12, rank=4, bias=True):
    gen = torch.Generator().manual_seed(0)
    U = torch.randn(out_f, rank, dtype=torch.float64, generator=gen)
    V = torch.randn(rank, in_f, dtype=torch.float64, generator=gen)
    b = torch.randn(out_f, dtype=torch.float64, generator=gen) if bias else None
    x = torch.randn(5, in_f, dtype=torch.float64, generator=gen)
    return U, V, b, x


# kills L01 (from_factors: V not copied), L02 (from_factors: bias not copied), L10 (from_factors: dtype dropped)
@pytest.mark.parametrize("bias", [True, False])
def test_from_factors_holds_the_given_factors_and_bias(bias):
    U, V, b, x = _mp_float64_pair(bias=bias)
    layer = LowRankLinear.from_factors(U, V, b)
    assert layer.U.dtype == layer.V.dtype == torch.float64 and (layer.bias is None) == (not bias)
    assert torch.equal(layer.U, U) and torch.equal(layer.V, V)
    ref = x @ (U @ V).T + (0 if b is None else b)
    assert torch.allclose(layer(x), ref, rtol=1e-12, atol=1e-12)


# kills L03 (to_linear: bias not copied), L14 (to_linear: dtype dropped, float64 factors rounded to float32)
def test_to_linear_is_the_same_map_in_the_same_dtype():
    U, V, b, x = _mp_float64_pair()
    layer = LowRankLinear.from_factors(U, V, b)
    lin = layer.to_linear()
    assert lin.weight.dtype == torch.float64 and lin.weight.shape == (10, 12)
    assert torch.allclose(lin(x), x @ (U @ V).T + b, rtol=1e-12, atol=1e-12)


# kills L07 (to_mpo_linear: bias dropped), L13 (to_mpo_linear: U's values laid out transposed), L08 (requires_grad)
def test_to_mpo_linear_is_the_same_map_and_keeps_the_error_and_the_freezing():
    U, V, b, x = _mp_float64_pair(out_f=10, in_f=12, rank=4)
    layer = LowRankLinear.from_factors(U, V, b)
    layer.error = 0.25
    ref = x @ (U @ V).T + b
    mpo = layer.to_mpo_linear(policy=PlanPolicy(select="flops"))
    assert mpo.bond_dims == (4,) and mpo.error == 0.25
    with torch.no_grad():
        assert torch.allclose(mpo(x), ref, rtol=1e-10, atol=1e-10)
    assert all(p.requires_grad for p in mpo.parameters())
    frozen = layer.requires_grad_(False).to_mpo_linear(policy=PlanPolicy(select="flops"))
    assert not any(c.requires_grad for c in frozen.cores)
    # each parameter keeps its own flag, both ways (a frozen pair with a trainable bias; a trainable U, frozen V):
    # the layer's flag was U's for all of them, so gate / quantize_mpo froze a BitFit bias or thawed a frozen V
    for flags in [(False, False, True), (True, False, False), (False, True, True)]:
        for p, f in zip((layer.U, layer.V, layer.bias), flags):
            p.requires_grad_(f)
        mpo = layer.to_mpo_linear()
        assert tuple(p.requires_grad for p in (*mpo.cores, mpo.bias)) == flags
        back = LowRankLinear.from_mpo_linear(mpo)
        assert tuple(p.requires_grad for p in (back.U, back.V, back.bias)) == flags


def test_a_pair_refuses_an_input_of_another_dtype_as_mpo_layers_do():
    # torch's "expected m1 and m2 to have the same dtype" named neither the layer's dtype nor the input's
    layer = LowRankLinear.from_linear(nn.Linear(16, 12), 4)
    with pytest.raises(TypeError, match="input dtype torch.float64 does not match the layer's dtype torch.float32"):
        layer(torch.randn(3, 16, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's casts still apply
        assert layer(torch.randn(3, 16)).dtype == torch.bfloat16


# kills L04 (spec: dtype always "float32"), L12 (from_spec: dtype ignored), L05 (spec: error dropped)
def test_a_float64_pair_saves_and_loads_in_float64_with_its_error(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(24, 20, dtype=torch.float64)
    low = LowRankLinear.from_linear(lin, 5)
    assert 0 < low.error < 1
    spec = low.spec()
    assert spec["dtype"] == "float64" and spec["error"] == low.error
    twin = LowRankLinear.from_spec(spec)
    assert twin.U.dtype == torch.float64 and twin.error == low.error and twin.rank == 5
    ckpt = bondgate.save(nn.Sequential(low), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="dtype mismatch for '0': checkpoint has torch.float64, model has torch.float32"):
        bondgate.load(ckpt, model=nn.Sequential(nn.Linear(24, 20)))  # the model's dtypes, as load's docstring says
    loaded = bondgate.load(ckpt, model=nn.Sequential(nn.Linear(24, 20, dtype=torch.float64)))[0]
    x = torch.randn(3, 24, dtype=torch.float64)
    assert loaded.U.dtype == torch.float64 and loaded.error == low.error
    with torch.no_grad():
        assert torch.equal(loaded(x), low(x))
