"""int8 MPO cores (issue 19.3): per-channel quantization, the fake-quantized forward (eager, kept, traced), QAT
through the straight-through gradient, int8 checkpoints that reload bit-exactly, and compress(quantize="int8")."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import bondgate
from bondgate import (
    MPO,
    CompressionConfig,
    GatingConfig,
    MPOEmbedding,
    MPOLinear,
    PlanPolicy,
    compress,
    distill,
    quantize_mpo,
)
from bondgate.factors import factorize_shape
from bondgate.gating import _widths
from bondgate.quant import dequantize, fake_quant, quantize

# plans by FLOPs (no autotuning): deterministic, and quick on a busy machine. MEMORY contracts the cores (with the
# fake-quantized cores kept between inference calls); SPEED keeps the dense weight (built from them) instead.
MEMORY = PlanPolicy(select="flops")
SPEED = PlanPolicy(cache_dense=True, select="flops")


def quantized_matrix(layer: MPOLinear) -> torch.Tensor:
    """The weight of the int8 cores, built from quantize/dequantize alone (not from the layer's forward code)."""
    cores = [dequantize(*quantize(c), c.dtype) for c in layer.cores]
    return MPO(cores, layer.out_features, layer.in_features).to_matrix()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------- quantize / dequantize
def test_quantize_error_bound_and_per_channel_scales():
    core = torch.randn(3, 4, 5, 6)
    core[1, 2] *= 1e-3  # a quiet channel: its own scale keeps its relative precision
    core[2, 0] = 0.0  # an all-zero channel
    q, s = quantize(core)
    assert q.dtype == torch.int8 and q.shape == core.shape and int(q.abs().max()) <= 127
    assert s.dtype == torch.float32 and s.shape == (3, 4)
    amax = core.abs().amax(dim=(2, 3))
    assert s[2, 0] == 0 and (q[2, 0] == 0).all()
    nz = amax > 0
    assert (s[nz] >= amax[nz] / 127).all() and (s[nz] <= amax[nz] / 127 * (1 + 2**-15)).all()
    assert (q.abs().amax(dim=(2, 3))[nz] == 127).all()  # every channel uses the full range
    dq = dequantize(q, s)
    assert torch.isfinite(dq).all() and (dq[2, 0] == 0).all()
    err = (core - dq).abs()
    assert (err <= s[:, :, None, None] / 2 * (1 + 1e-6)).all()
    quiet = rel(dq[1, 2], core[1, 2])
    assert quiet < 0.01, quiet  # a per-tensor scale would round this channel to zero
    assert torch.equal(fake_quant(core), dq)
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize(torch.full((1, 2, 2, 1), float("nan")))
    with pytest.raises(ValueError, match="MPO core"):
        quantize(torch.randn(4, 4, 4))
    rows = torch.randn(5, 7) * torch.tensor([1.0, 1e-3, 1.0, 5.0, 0.0])[:, None]  # a table: one scale per row
    q, s = quantize(rows)
    assert s.shape == (5,) and s[4] == 0 and (q.abs().amax(dim=1)[:4] == 127).all()
    assert rel(dequantize(q, s)[1], rows[1]) < 0.01 and torch.equal(fake_quant(rows), dequantize(q, s))


def test_state_dict_of_a_diverged_int8_layer_names_the_entry():
    # a NaN master core (a diverged QAT step) cannot be stored as int8: the error said so without naming the key
    torch.manual_seed(0)
    model = nn.Sequential(MPOLinear.from_linear(nn.Linear(32, 32), max_bond=4), nn.ReLU(),
                          MPOLinear.from_linear(nn.Linear(32, 32), max_bond=4))
    bondgate.quantize_mpo(model)
    with torch.no_grad():
        model[2].cores[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"state_dict entry '2\.cores\.1': cannot quantize a core holding NaN"):
        model.state_dict()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_fake_quant_is_exact_and_idempotent(dtype):
    # q * scale is representable in the cores' dtype: dequantizing what was saved gives the forward's values, and
    # quantizing those again changes nothing (a reloaded layer is bit-identical)
    core = torch.randn(4, 3, 5, 6, dtype=torch.float64).to(dtype)
    dq = fake_quant(core)
    assert dq.dtype == dtype
    assert torch.equal(dequantize(*quantize(core), dtype), dq)
    assert torch.equal(fake_quant(dq), dq)
    assert rel(dq.double(), core.double()) < 0.012


def test_fake_quant_gradient_is_straight_through():
    core = torch.randn(2, 3, 4, 5, requires_grad=True)
    g = torch.randn(2, 3, 4, 5)
    out = fake_quant(core)
    assert torch.equal(out.detach(), fake_quant(core.detach()))
    (out * g).sum().backward()
    assert torch.equal(core.grad, g)


# ---------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("policy", [MEMORY, SPEED], ids=["memory", "speed"])
@pytest.mark.parametrize("rows", [1, 64])
def test_quantized_layer_computes_the_int8_matrix(policy, rows):
    torch.manual_seed(1)
    layer = MPOLinear(384, 256, max_bond=24, num_cores=3, policy=policy)  # random cores: no SVD to wait for
    fp32 = copy.deepcopy(layer)
    assert layer.quantize_("int8") is layer and layer.quant == "int8" and "quant=int8" in repr(layer)
    x = torch.randn(rows, 384)
    Wq = quantized_matrix(layer)
    with torch.no_grad():
        want = x @ Wq.T + layer.bias
        for _ in range(3):  # planning, then the operands kept between calls
            y = layer(x)
            torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
        err = rel(y, fp32(x))
    assert 1e-4 < err < 0.02, err  # ~1 %: int8 is not free, but close
    # memory mode keeps the fake-quantized cores (one copy of the cores), speed mode only the dense weight built
    # from them
    assert layer.cache_nbytes == (4 * layer.num_params if policy is MEMORY else 4 * 384 * 256)
    torch.testing.assert_close(layer.weight_matrix().detach(), Wq)
    # the kept operands follow an in-place update of the master cores
    with torch.no_grad():
        layer.cores[1].mul_(-0.5)
        torch.testing.assert_close(layer(x), x @ quantized_matrix(layer).T + layer.bias, atol=1e-5, rtol=1e-5)
    # and dropping the quantization gives the master cores back
    layer.quantize_(None)
    assert layer.quant is None and "quant" not in layer.spec()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.weight_matrix().T + layer.bias, atol=1e-5, rtol=1e-5)
    assert all(t.dtype == torch.float32 for t in layer.state_dict().values())


def test_quantized_layer_under_inference_mode_keeps_its_operands():
    layer = MPOLinear.from_linear(nn.Linear(128, 64), max_bond=16, policy=MEMORY).quantize_()
    x = torch.randn(5, 128)
    with torch.no_grad():
        want = layer(x)
    with torch.inference_mode():
        y1 = layer(x)
        kept = dict(layer._quant_cache), {k: v[1] for k, v in layer._ops_cache.items()}
        y2 = layer(x)
        assert torch.equal(y1, want) and torch.equal(y2, want)
        assert all(v[1] is kept[0][k][1] for k, v in layer._quant_cache.items())


def test_qat_with_distill_heals_the_quantized_student():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16))
    student = nn.Sequential(MPOLinear.from_linear(teacher[0], max_bond=4, num_cores=2, policy=MEMORY), nn.Tanh(),
                            MPOLinear.from_linear(teacher[2], max_bond=4, num_cores=2, policy=MEMORY))
    quantize_mpo(student)
    layers = [m for m in student.modules() if isinstance(m, MPOLinear)]
    assert layers and all(m.quant == "int8" for m in layers)
    data = [torch.randn(64, 32) for _ in range(4)]

    def gap():
        with torch.no_grad():
            return sum(float((student(x) - teacher(x)).pow(2).mean()) for x in data) / len(data)

    masters = [c.detach().clone() for m in layers for c in m.cores]
    before = gap()
    distill(student, teacher, data, loss=bondgate.DistillLoss(hidden=0, output=1.0), epochs=10, lr=3e-3,
            progress=False)
    after = gap()
    assert after < 0.7 * before, (before, after)
    assert any(not torch.equal(a, c) for a, c in zip(masters, (c for m in layers for c in m.cores)))
    assert all(m.quant == "int8" for m in layers)
    # gradients reach every master core through the fake quantization
    student.zero_grad()
    student(data[0]).pow(2).sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for m in layers for c in m.cores)


def test_gated_layer_slices_the_quantized_cores():
    torch.manual_seed(2)
    model = nn.Sequential(MPOLinear.from_linear(nn.Linear(96, 64), max_bond=16, policy=MEMORY))
    bondgate.gate(model, GatingConfig(budget=0.5))
    quantize_mpo(model)
    g = model[0].eval()
    assert g.quant == "int8" and g.spec()["quant"] == "int8"
    x = torch.randn(6, 96)
    fq = [fake_quant(c) for c in g.cores]
    for frac in (0.5, 1.0):
        bondgate.set_mode(model, frac)
        widths = [1, *_widths(g.bond_dims, frac), 1]
        Wq = MPO([c[: widths[k], :, :, : widths[k + 1]] for k, c in enumerate(fq)], 64, 96).to_matrix()
        with torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(g(x), x @ Wq.T + g.bias, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # gating's kept operands are rebuilt when the masters change
        g.cores[0].mul_(2)
        Wq = MPO([fake_quant(c) for c in g.cores], 64, 96).to_matrix()
        torch.testing.assert_close(g(x), x @ Wq.T + g.bias, atol=1e-5, rtol=1e-5)


def test_quantized_embedding_and_tied_head():
    torch.manual_seed(3)
    emb = MPOEmbedding.from_embedding(nn.Embedding(300, 48), max_bond=12)
    head = emb.as_linear(policy=MEMORY)
    emb.quantize_()
    assert head.quant is None and emb.as_linear().quant == "int8"
    head.quantize_()
    ids = torch.randint(0, 300, (4, 7))
    table = MPO([fake_quant(c) for c in emb.cores], 300, 48).to_matrix()
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), table[ids], atol=1e-6, rtol=1e-6)
        h = torch.randn(3, 48)
        torch.testing.assert_close(head(h), h @ table.T, atol=1e-5, rtol=1e-5)
    # training the lookup reaches the masters straight through
    emb(ids).sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in emb.cores)


# ---------------------------------------------------------------------------------------- checkpoints
def _model() -> nn.Sequential:
    torch.manual_seed(4)
    emb = MPOEmbedding.from_embedding(nn.Embedding(512, 64), max_bond=16)
    model = nn.Sequential(emb, MPOLinear.from_linear(nn.Linear(64, 256), max_bond=32, policy=MEMORY), nn.ReLU(),
                          MPOLinear.from_linear(nn.Linear(256, 64), max_bond=32, policy=SPEED), nn.ReLU(),
                          emb.as_linear(policy=MEMORY))
    gated = nn.Sequential(model[3])
    bondgate.gate(gated, GatingConfig(budget=0.5))
    model[3] = gated[0]
    return model.eval()


def _header(path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


def test_save_load_roundtrip_is_bit_exact_with_int8_cores(tmp_path):
    model = _model()
    assert type(model[3]).__name__ == "GatedMPOLinear"
    bondgate.save(model, tmp_path / "fp32")
    quantize_mpo(model)
    ids = torch.randint(0, 512, (3, 9))
    with torch.no_grad():
        want = model(ids)
        bondgate.set_mode(model, 0.5)
        want_half = model(ids)
        bondgate.set_mode(model, "gate")
    bondgate.save(model, tmp_path / "int8")
    loaded = bondgate.load(tmp_path / "int8")
    assert [type(m).__name__ for m in loaded] == [type(m).__name__ for m in model]
    assert all(m.quant == "int8" for m in loaded if isinstance(m, (MPOLinear, MPOEmbedding)))
    assert loaded[5].cores is loaded[0].cores  # the tied head is tied again
    with torch.no_grad():
        assert torch.equal(loaded(ids), want)
        bondgate.set_mode(loaded, 0.5)
        assert torch.equal(loaded(ids), want_half)
    # the master cores are the dequantized values: they quantize to themselves
    for a, b in zip(loaded[1].cores, model[1].cores):
        assert torch.equal(a, fake_quant(b)) and torch.equal(fake_quant(a), a)

    # on disk: the cores are int8 (the tied head's stored once), with fp32 scales (r_left, out)
    header = _header(tmp_path / "int8" / "model.safetensors")
    cores = {k: v for k, v in header.items() if ".cores." in k and not k.endswith("_scale")}
    assert cores and all(v["dtype"] == "I8" for v in cores.values())
    assert all(header[k + "_scale"]["dtype"] == "F32" and header[k + "_scale"]["shape"] == v["shape"][:2]
               for k, v in cores.items())
    assert not any(k.startswith("5.") for k in header)
    tensors = load_file(tmp_path / "int8" / "model.safetensors")
    assert tensors["1.cores.0"].dtype == torch.int8 and tensors["1.bias"].dtype == torch.float32
    assert meta_layers(tmp_path / "int8")["1"]["quant"] == "int8"

    # ~4x smaller for the cores: the file shrinks by ~3/4 of their fp32 bytes
    fp32_header = _header(tmp_path / "fp32" / "model.safetensors")
    core_bytes = sum(4 * _numel(v["shape"]) for k, v in fp32_header.items() if ".cores." in k)
    int8_bytes = sum((1 if v["dtype"] == "I8" else 4) * _numel(v["shape"]) for k, v in header.items()
                     if ".cores." in k)
    assert core_bytes / int8_bytes > 3.5, core_bytes / int8_bytes  # the scales: 1 fp32 per (r_left, out) slice
    saved = os.path.getsize(tmp_path / "fp32" / "model.safetensors") - os.path.getsize(
        tmp_path / "int8" / "model.safetensors")
    assert saved > 0.7 * core_bytes, (saved, core_bytes)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def meta_layers(directory) -> dict:
    return json.loads((directory / "bondgate.json").read_text())["layers"]


def test_quantized_state_dict_loads_into_any_mpo_layer_and_refuses_bad_scales():
    layer = MPOLinear.from_linear(nn.Linear(64, 48), max_bond=8, policy=MEMORY).quantize_()
    sd = layer.state_dict()
    assert sd["cores.0"].dtype == torch.int8 and sd["cores.0_scale"].shape == layer.cores[0].shape[:2]
    assert layer.state_dict()["cores.0"] is sd["cores.0"]  # one int8 tensor per unmodified core (tied cores: one)
    sd["cores.0"].add_(1)  # a write into a handed-out tensor is not handed out again
    assert torch.equal(layer.state_dict()["cores.0"], quantize(layer.cores[0])[0])
    sd = layer.state_dict()
    plain = MPOLinear.from_spec({**layer.spec(), "quant": None})
    assert plain.quant is None
    plain.load_state_dict(sd)  # an unquantized layer reads it: the dequantized cores
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert plain.quant is None and torch.equal(plain(x), layer(x))
    bad = dict(sd, **{"cores.1_scale": sd["cores.1_scale"][:1]})
    with pytest.raises(RuntimeError, match="scales of shape"):
        plain.load_state_dict(bad)
    bad = dict(sd, **{"cores.1_scale": -sd["cores.1_scale"]})
    with pytest.raises(RuntimeError, match="negative, NaN"):
        plain.load_state_dict(bad)
    bad = {k: v for k, v in sd.items() if k != "cores.2_scale"}
    with pytest.raises(RuntimeError, match="without its scales"):
        plain.load_state_dict(bad)
    with pytest.raises(ValueError, match="quantization must be"):
        layer.quantize_("int4")


# ---------------------------------------------------------------------------------------- compress
def structured_mlp() -> nn.Sequential:
    """An MLP whose hidden weights are low-bond MPOs (a random dense layer does not compress)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 8))
    with torch.no_grad():
        for i, (n, m) in ((0, (128, 64)), (2, (128, 128))):
            out_f, in_f = factorize_shape(n, m, 3)
            W = MPO.random(n, m, 6, 3, in_factors=in_f, out_factors=out_f).to_matrix()
            model[i].weight.copy_(W)
    return model


def test_compress_quantizes_the_new_layers():
    model = structured_mlp()
    ref = copy.deepcopy(model)
    calib = [torch.randn(64, 64) for _ in range(2)]
    compress(model, CompressionConfig(max_bond=16, quantize="int8", policy="memory", refine_steps=2,
                                      target_modules=["0", "2"]), calib, progress=False)
    layers = [m for m in model.modules() if isinstance(m, MPOLinear)]
    assert len(layers) == 2 and all(m.quant == "int8" for m in layers)
    rep = model.bondgate_report
    assert rep.config["quantize"] == "int8"
    assert all(r.quant == "int8" for r in rep.compressed) and "mpo int8" in rep.table()
    x = torch.randn(16, 64)
    with torch.no_grad():
        err = rel(model(x), ref(x))
        assert err < 0.05, err  # the bonds hold the weights: what is left is int8's ~1 %
        for m in layers:  # the masters lie on the int8 grid already, and the reported error is the layer's
            assert all(torch.equal(fake_quant(c), c) for c in m.cores)
    for r in rep.compressed:
        W = ref.get_submodule(r.name).weight.detach()
        got = rel(model.get_submodule(r.name).weight_matrix().detach(), W)
        assert 1e-3 < got < 0.05 and r.weight_error == pytest.approx(got, rel=1e-3)
    for bad in ("int4", True, 8):
        with pytest.raises(ValueError, match="quantization must be"):
            CompressionConfig(param_ratio=0.5, quantize=bad)


# ---------------------------------------------------------------------------------------- torch.compile
def test_compiled_quantized_layer_has_no_graph_breaks():
    torch._dynamo.reset()
    layer = MPOLinear.from_linear(nn.Linear(96, 80), max_bond=12, policy=MEMORY).quantize_()
    x = torch.randn(7, 96)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(layer, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)
    compiled(x).sum().backward()  # and it trains: straight through to the masters
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)
    # torch.export with a dynamic number of rows runs the fake quantization inside the graph too
    ep = torch.export.export(layer.eval(), (x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    with torch.no_grad():
        for rows in (3, 33):
            xr = torch.randn(rows, 96)
            torch.testing.assert_close(ep.module()(xr), layer(xr), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_values_near_the_dtypes_largest_stay_finite(dtype):
    big = torch.finfo(dtype).max
    core = torch.tensor([big, 1.0, -big / 3]).reshape(1, 1, 3, 1).to(dtype)
    q, s = quantize(core)
    back, fq = dequantize(q, s, dtype), fake_quant(core)
    assert torch.isfinite(back).all() and torch.equal(back, fq)
    assert float((back.float() - core.float()).abs().max()) <= float(s.max())  # within one step (clamped channel)


def test_master_state_holds_the_full_precision_masters_and_loads_them_exactly():
    # an int8 state dict restores the masters only to the int8 grid: a resumed training run lost its sub-level updates
    from bondgate.quant import master_state

    torch.manual_seed(0)
    layer = bondgate.MPOLinear(32, 24, max_bond=4, num_cores=2).quantize_("int8")
    assert layer.state_dict()["cores.0"].dtype == torch.int8
    with master_state():
        sd = layer.state_dict()
    assert sd["cores.0"].dtype == torch.float32 and "cores.0_scale" not in sd
    fresh = bondgate.MPOLinear(32, 24, max_bond=4, num_cores=2).quantize_("int8")
    fresh.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(fresh.cores, layer.cores, strict=True))
    rounded = bondgate.MPOLinear(32, 24, max_bond=4, num_cores=2).quantize_("int8")
    rounded.load_state_dict(layer.state_dict())
    assert not all(torch.equal(a, b) for a, b in zip(rounded.cores, layer.cores, strict=True))


def test_scales_outside_float32s_range():
    """A channel too small for a float32 scale (max below ~1.8e-43) keeps the bound |G - q s| <= s / 2 with the
    smallest scale instead of scale 0 (which marks all-zero channels); a float64 core whose scales would overflow
    float32 is refused instead of giving inf scales and NaN values."""
    torch.manual_seed(0)
    core = torch.randn(2, 3, 4, 2)
    for tiny in (core * 1e-44, core.double() * 1e-300):
        q, s = quantize(tiny)
        assert bool((s > 0).all())
        err = (tiny.double() - dequantize(q, s, torch.float64)).abs()
        assert bool((err <= s.double()[:, :, None, None] / 2).all())
    zero = core.clone()
    zero[1, 2] = 0
    assert int((quantize(zero)[1] == 0).sum()) == 1
    with pytest.raises(ValueError, match="overflow float32"):
        quantize(core.double() * 1e300)


def test_casting_int8_cores_across_grids_warns():
    # a bfloat16 int8 layer cast up with .float() moved its weight by 4.9% without a word (the 16-bit grid's
    # power-of-two scales against float32's 17-bit ones); a cast within one grid keeps the weight and says nothing
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(64, 48), max_bond=8, num_cores=2).bfloat16().quantize_("int8")
    x = torch.randn(4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.to("cpu")
        twin = copy.deepcopy(layer).half()  # one grid (power-of-two scales) for both 16-bit types
    with pytest.warns(UserWarning, match="casting an int8 MPO layer from torch.bfloat16 to torch.float32 re-rounds"):
        layer.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.double()  # float32 -> float64: the same 17-bit scales
    assert twin.weight.dtype == torch.float16 and layer(x.double()).dtype == torch.float64
    # downward too: a float32 int8 layer cast to float16 lands on the power-of-two grid (a GPT-2 layer's weight moved
    # 1.4%), which a check for upward casts only would let pass without a word
    layer = MPOLinear.from_linear(nn.Linear(64, 48), max_bond=8, num_cores=2).quantize_("int8")
    with pytest.warns(UserWarning, match="casting an int8 MPO layer from torch.float32 to torch.float16 re-rounds"):
        layer.half()


def test_loading_int8_cores_on_another_grid_warns():
    # a float32 int8 state dict loaded into a float16 / bfloat16 layer was re-quantized onto the power-of-two grid
    # without a word (the weight moved 1.0-1.1% here, where rounding it to the dtype moves it 0.02% / 0.16%), while
    # .half() on the same layer warns; a load within one grid keeps the weight bit for bit and says nothing
    def int8(dtype=torch.float32):
        return MPOLinear.from_linear(nn.Linear(64, 48), max_bond=8, num_cores=2, policy=MEMORY).to(dtype).quantize_()

    torch.manual_seed(0)
    layer = int8()
    sd, w32 = layer.state_dict(), layer.weight_matrix().detach()
    for dtype in (torch.float16, torch.bfloat16):
        twin = int8(dtype)
        with pytest.warns(UserWarning, match=f"loading int8 cores quantized in float32/float64 into a {dtype} "
                                             f"MPOLinear re-rounds them onto the int8 grid of {dtype}"):
            twin.load_state_dict(sd)
        assert rel(twin.weight_matrix().detach().float(), w32) > 0.008 and rel(w32.to(dtype).float(), w32) < 0.002
    back = int8()
    with pytest.warns(UserWarning, match="quantized in a 16-bit float into a torch.float32 MPOLinear"):
        back.load_state_dict(twin.state_dict())  # bfloat16 up to float32: the 17-bit grid
    rows = MPOEmbedding.from_embedding(nn.Embedding(40, 16), max_bond=4).quantize_()
    with pytest.warns(UserWarning, match="into a torch.float16 MPOEmbedding re-rounds"):
        MPOEmbedding.from_embedding(nn.Embedding(40, 16), max_bond=4).half().quantize_().load_state_dict(
            rows.state_dict())
    x = torch.randn(4, 64)
    for src, dst in [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                     (torch.float32, torch.float64), (torch.float16, torch.bfloat16)]:
        saved, loaded = int8(src), int8(dst)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded.load_state_dict(saved.state_dict())
        for a, b in zip(loaded.cores, saved.cores, strict=True):  # the saved int8 cores, and on the loader's grid
            assert torch.equal(a, fake_quant(b).to(dst)) and torch.equal(fake_quant(a), a)
        with torch.no_grad():
            assert src != dst or torch.equal(loaded(x.to(dst)), saved(x.to(dst)))


# ------------------------------------------------ from a mutation run of quant.py (each kills a mutant that lived)

def _int8_layer(dtype=torch.float32) -> MPOLinear:
    torch.manual_seed(0)
    return MPOLinear.from_linear(nn.Linear(64, 48), max_bond=8, num_cores=2, policy=MEMORY).to(dtype).quantize_()


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.bool])
def test_quantize_refuses_non_float_cores_with_a_value_error(dtype):
    # Q02: the docstring promises a ValueError naming the problem for anything but a floating-point core
    core = torch.ones(2, 3, 4, 2, dtype=dtype)
    with pytest.raises(ValueError, match="floating-point MPO core"):
        quantize(core)
    with pytest.raises(ValueError, match="floating-point MPO core"):
        quantize(torch.ones(5, 7, dtype=dtype))  # a table of rows, too


@pytest.mark.parametrize("scale", [1e-6, 1e-7])
def test_dequantize_in_float16_keeps_scales_below_float16s_range(scale):
    # Q14: a float16 core of small values gets power-of-two scales below float16's smallest subnormal (2**-24);
    # q * s must be formed in float32 and then cast (exact), not in float16, where the scales flush to zero
    torch.manual_seed(0)
    core = (torch.randn(2, 3, 4, 2) * scale).half()
    q, s = quantize(core)
    assert bool((s < 2.0**-24).any())  # the case under test
    back = dequantize(q, s, torch.float16)
    assert back.dtype == torch.float16 and torch.equal(back, fake_quant(core))
    err = (back.double() - core.double()).abs()
    assert bool((err <= s.double()[:, :, None, None] / 2).all())
    assert float(back.abs().max()) > 0.5 * float(core.abs().max())


def test_state_dict_follows_an_in_place_update_of_the_masters():
    # Q17: the int8 tensors handed out per core are reused only while the master is unmodified (version check);
    # an optimizer step between two state_dict() calls must show up while the first dict is still alive
    layer = _int8_layer()
    first = layer.state_dict()  # kept alive: its int8 tensors stay in the weak cache
    with torch.no_grad():
        layer.cores[0].mul_(-0.5)
    second = layer.state_dict()
    q, s = quantize(layer.cores[0])
    assert torch.equal(second["cores.0"], q) and torch.equal(second["cores.0_scale"], s)
    assert not torch.equal(first["cores.0"], second["cores.0"])
    fresh = _int8_layer()
    fresh.load_state_dict(second)
    assert torch.equal(fresh.cores[0], fake_quant(layer.cores[0]))


def test_fake_quant_matches_dequantize_bit_for_bit_including_the_sign_of_zero():
    # Q09: values that round to level 0 must come back as +0.0 from both paths (the module docstring: dequantizing
    # gives the values the fake-quantized forward computes "bit for bit"); torch.equal cannot see -0.0 vs 0.0
    core = torch.tensor([1.0, -1e-4, 1e-4, -0.3]).reshape(1, 1, 4, 1)
    fq, dq = fake_quant(core), dequantize(*quantize(core))
    assert torch.equal(fq.view(torch.int32), dq.view(torch.int32))
    assert not bool(fq.signbit()[0, 0, 1, 0])


def test_state_dict_sees_a_write_through_data_of_a_plain_parameter_core():
    # Q18: a core the user set to a plain nn.Parameter: writes through .data bypass its version counter, so the
    # int8 tensors of an earlier state_dict() must not be handed out again
    layer = _int8_layer()
    layer.cores[0] = nn.Parameter(layer.cores[0].detach().clone())
    assert type(layer.cores[0]) is nn.Parameter
    first = layer.state_dict()
    layer.cores[0].data.mul_(-0.5)
    second = layer.state_dict()
    assert torch.equal(second["cores.0"], quantize(layer.cores[0])[0])
    assert torch.equal(second["cores.0_scale"], quantize(layer.cores[0])[1])
    assert not torch.equal(first["cores.0"], second["cores.0"])


def test_state_dict_and_save_of_an_int8_model_under_inference_mode(tmp_path):
    # an eval function under @torch.inference_mode that saves the best model: the int8 tensors made there have no
    # version counter (reading it raised "Inference tensors do not track version counter")
    layer = _int8_layer()
    with torch.inference_mode():
        state = layer.state_dict()
        bondgate.save(nn.Sequential(layer), tmp_path / "ck")
        size = bondgate.size_on_disk(nn.Sequential(layer))
    q, s = quantize(layer.cores[0])
    assert torch.equal(state["cores.0"], q) and torch.equal(state["cores.0_scale"], s)
    assert size > 0
    x = torch.randn(3, layer.in_features)
    assert torch.equal(bondgate.load(tmp_path / "ck")(x), layer(x))


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_refresh_after_a_numpy_write_hands_out_new_int8_tensors(kind):
    # a write through a numpy view bypasses the version counter; refresh() is the documented step after it, and a
    # state dict taken while an earlier one is alive must hold the new values (it held the old int8 cores)
    torch.manual_seed(0)
    if kind == "linear":
        layer = _int8_layer()
    else:
        layer = MPOEmbedding.from_embedding(nn.Embedding(64, 16), max_bond=4).quantize_("int8")
    earlier = layer.state_dict()  # kept alive
    layer.cores[0].detach().numpy()[...] *= 2.0
    layer.refresh()
    now = layer.state_dict()
    q, s = quantize(layer.cores[0])
    assert torch.equal(now["cores.0"], q) and torch.equal(now["cores.0_scale"], s)
    assert torch.allclose(now["cores.0_scale"], 2 * earlier["cores.0_scale"])


def test_an_all_zero_channel_round_trips_through_the_int8_state_dict():
    # Q23: an all-zero (r_left, out) channel gets scale 0 (module docstring); loading such a state dict must work
    layer = _int8_layer()
    with torch.no_grad():
        layer.cores[1][0, 2] = 0.0  # e.g. a pruned output row
    sd = layer.state_dict()
    assert float(sd["cores.1_scale"][0, 2]) == 0.0
    fresh = _int8_layer()
    fresh.load_state_dict(sd)
    assert all(torch.equal(a, fake_quant(b)) for a, b in zip(fresh.cores, layer.cores, strict=True))
    assert bool((fresh.cores[1][0, 2] == 0).all())


def test_scales_that_overflow_a_float16_layer_are_refused_on_load():
    # Q24: scale_problem checks the values in the *layer's* dtype: 127 * 1000 overflows float16 (max 65504) though
    # not float32; without the check the float16 layer would load inf cores silently
    layer = _int8_layer(torch.float16)
    sd = layer.state_dict()
    sd["cores.1_scale"] = sd["cores.1_scale"].clone()
    sd["cores.1_scale"][0, 0] = 1000.0
    sd["cores.1"] = sd["cores.1"].clone()
    sd["cores.1"][0, 0] = 127
    fresh = _int8_layer(torch.float16)
    with pytest.raises(RuntimeError, match="overflow float16"):
        fresh.load_state_dict(sd)
    assert all(torch.isfinite(c).all() for c in fresh.cores)  # (torch copies the other keys, as always)


def test_dequantize_defaults_to_float32():
    # Q13: the signature's default dtype is float32 (torch.equal compares across dtypes, so the suite's
    # torch.equal(fake_quant(core), dequantize(q, s)) did not notice a float64 default)
    torch.manual_seed(0)
    core = torch.randn(2, 3, 4, 2)
    q, s = quantize(core)
    back = dequantize(q, s)
    assert back.dtype == torch.float32 and back.shape == core.shape
    rows = dequantize(*quantize(torch.randn(5, 7)))
    assert rows.dtype == torch.float32 and rows.shape == (5, 7)
    x = torch.randn(3, 7)
    assert (x @ rows.T).shape == (3, 5)  # usable with float32 activations as is


def test_scales_without_their_core_are_refused_on_load():
    """A state dict holding a core's scales but not the core fails with a message naming both, not an AttributeError."""
    sd = {k: v for k, v in _int8_layer().state_dict().items() if k != "cores.1"}
    with pytest.raises(RuntimeError, match=r"'cores\.1_scale' holds scales for a missing core 'cores\.1'"):
        _int8_layer().load_state_dict(sd)


def test_quantize_mpo_checks_its_arguments_even_without_mpo_layers():
    """quantize_mpo refuses an unknown mode or a non-module up front, also for a model with no MPO layer."""
    with pytest.raises(ValueError, match="quantization must be"):
        quantize_mpo(nn.Linear(4, 4), "int4")
    with pytest.raises(TypeError, match="quantize_mpo expects an nn.Module, got Tensor"):
        quantize_mpo(torch.zeros(3))


def test_quantize_mpo_back_to_full_precision_is_silent_on_a_dense_model():
    """quantize_mpo(model, None) on a model without MPO layers has nothing to undo: no warning."""
    model = nn.Sequential(nn.Linear(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quantize_mpo(model, None) is model
    with pytest.warns(UserWarning, match="no MPO layer"):
        quantize_mpo(model)


def test_quantize_mpo_stores_low_rank_pairs_as_int8_two_core_layers(tmp_path):
    """compress's default with a param_ratio may choose low-rank pairs: quantize_mpo makes each an int8 two-core
    MPOLinear (at every name it has, hooks and training mode kept), as compress(quantize="int8") stores its pairs:
    one scale per row of each factor, saved as int8, the map within int8 rounding of the pair's; silently."""
    from bondgate import LowRankLinear
    from bondgate.lowrank import rank_cores
    from bondgate.quant import dequantize, quantize

    torch.manual_seed(0)
    pair = LowRankLinear.from_linear(nn.Linear(16, 12), rank=3)
    model = nn.Sequential(MPOLinear.from_linear(nn.Linear(16, 16), num_cores=2, max_bond=2), pair.eval())
    model.tied = pair  # a second name for the same pair
    calls = []
    pair.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    x = torch.randn(5, 16)
    with torch.no_grad():
        want = pair(model[0](x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing stays float: nothing to warn about
        assert quantize_mpo(model) is model
    layer = model[1]
    assert isinstance(layer, MPOLinear) and layer.is_rank_form and model.tied is layer and not layer.training
    assert layer.quant == "int8" and model[0].quant == "int8" and layer.bond_dims == (3,)
    cores = rank_cores(pair.U.detach(), pair.V.detach())
    assert [tuple(quantize(c)[1].shape) for c in cores] == [(1, 12), (3, 1)]  # one scale per row of U and of V
    for got, core in zip(layer._core_tuple(), cores):
        assert torch.equal(got, dequantize(*quantize(core)))
    with torch.no_grad():
        got = model[1](model[0](x))
    assert calls[-1] == (5, 12)  # the pair's hook moved to the new layer
    assert float((got - want).norm() / want.norm()) < 0.05
    bondgate.save(model, tmp_path / "m")
    stored = load_file(tmp_path / "m" / "model.safetensors")
    assert sorted(tuple(t.shape) for t in stored.values() if t.dtype == torch.int8) == sorted(
        tuple(c.shape) for c in (*model[0].cores, *layer.cores))  # both layers' cores, int8 on disk
    reloaded = bondgate.load(tmp_path / "m")
    assert reloaded[1].quant == "int8" and reloaded.tied is reloaded[1]
    with torch.no_grad():
        torch.testing.assert_close(reloaded[1](reloaded[0](x)), got)
    float_pairs = nn.Sequential(LowRankLinear.from_linear(nn.Linear(8, 8), rank=1))
    assert quantize_mpo(float_pairs, None)[0].__class__ is LowRankLinear  # back to full precision: pairs stay pairs
    alone = LowRankLinear.from_linear(nn.Linear(8, 8), rank=1)
    new = quantize_mpo(alone)  # a model that is a pair: the new layer, in the pair's (training) mode
    assert new is not alone and isinstance(new, MPOLinear) and new.quant == "int8" and new.training


def test_quantize_mpo_stores_a_recurrent_layers_pairs_as_int8_too(tmp_path):
    # the pairs inside a bondgate.Recurrent (the default form of its projections) were skipped in silence: the LSTM's
    # matrices stayed float32 on disk while compress(quantize="int8") makes them int8
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(16, 32), nn.Linear(32, 32)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    x = torch.randn(10, 4, 16)
    model = bondgate.compress(Net().eval(), bondgate.CompressionConfig(param_ratio=0.6), [x], progress=False)
    assert isinstance(model.rnn.ih_l0, bondgate.LowRankLinear)
    with torch.no_grad():
        before = model(x)
    bondgate.quantize_mpo(model, "int8")
    assert all(isinstance(m, MPOLinear) and m.quant == "int8" for m in (model.rnn.ih_l0, model.rnn.hh_l0, model.head))
    with torch.no_grad():
        after = model(x)
    assert 0 < float((after - before).norm() / before.norm()) < 0.02  # the int8 grid, through the LSTM's kernel
    out = bondgate.save(model, tmp_path / "q")
    assert load_file(out / "model.safetensors")["rnn.ih_l0.cores.0"].dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(bondgate.load(out, model=Net())(x), after)
