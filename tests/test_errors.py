"""Bad input gets a clear ValueError/TypeError naming the problem, never a silent wrong result."""

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn

import bondgate
from bondgate import MPO, MPOLinear, PlanPolicy
from bondgate.quant import dequantize, quantize


def test_input_last_dim_mismatch():
    layer = MPOLinear(64, 32, max_bond=4)
    with pytest.raises(ValueError, match="last dimension 64"):
        layer(torch.randn(8, 63))
    with pytest.raises(ValueError, match="last dimension 64"):
        layer(torch.randn(2, 4, 32))  # same numel as (1, 64) rows: must not be silently reshaped


@pytest.mark.parametrize("bad", [0, -3, [4, 0, 4]])
def test_max_bond_below_one(bad):
    with pytest.raises(ValueError, match="max_bond must be >= 1"):
        MPO.from_matrix(torch.randn(64, 64), max_bond=bad)
    with pytest.raises(ValueError, match="max_bond must be >= 1"):
        MPOLinear.from_linear(nn.Linear(64, 64), max_bond=bad)


def test_max_bond_wrong_length_or_type():
    with pytest.raises(ValueError, match="3 bonds"):
        MPO.from_matrix(torch.randn(64, 64), num_cores=4, max_bond=[4, 4])
    with pytest.raises(TypeError, match="max_bond"):
        MPO.from_matrix(torch.randn(64, 64), max_bond=2.5)


@pytest.mark.parametrize("tol", [-0.1, 1.0, 3, float("nan")])
def test_tol_outside_unit_interval(tol):
    with pytest.raises(ValueError, match=r"tol .* \[0, 1\)"):
        MPO.from_matrix(torch.randn(16, 16), tol=tol)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_matrix(value):
    W = torch.randn(32, 32)
    W[3, 5] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        MPO.from_matrix(W)
    lin = nn.Linear(32, 32)
    with torch.no_grad():
        lin.weight[0, 0] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        MPOLinear.from_linear(lin)


def test_factors_product_mismatch():
    with pytest.raises(ValueError, match=r"in_factors \(4, 4, 4\) multiply to 64, but in_features is 62"):
        MPO.from_matrix(torch.randn(64, 62), in_factors=(4, 4, 4))
    with pytest.raises(ValueError, match="out_factors"):
        MPO.from_matrix(torch.randn(64, 64), out_factors=(4, 4, 2))
    with pytest.raises(ValueError, match="same length"):
        MPO.from_matrix(torch.randn(64, 64), out_factors=(8, 8), in_factors=(4, 4, 4))
    with pytest.raises(ValueError, match="positive integers"):
        MPO.from_matrix(torch.randn(64, 64), in_factors=(8, 0, 8))


def test_wrong_dtype_mix():
    layer = MPOLinear(32, 16, max_bond=4)
    with pytest.raises(TypeError, match="dtype torch.float64 does not match"):
        layer(torch.randn(3, 32, dtype=torch.float64))
    layer(torch.randn(3, 32))  # the planned path still works afterwards
    with pytest.raises(TypeError, match="dtype"):  # a cached plan must not hide the check
        layer(torch.randn(3, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        MPO.from_matrix(torch.ones(8, 8, dtype=torch.int64))
    # a gated layer says the same in every mode and routing path, before a decision is counted
    gated = bondgate.gate(nn.Sequential(MPOLinear(32, 16, max_bond=4)),
                          bondgate.GatingConfig(controller="error", levels=(0.5, 1.0)))[0].eval()
    for mode, rows in (("gate", 1), ("gate", 5), (0.5, 3), ("full", 3)):
        bondgate.set_mode(gated, mode)
        with pytest.raises(TypeError, match="dtype torch.float64 does not match"), torch.no_grad():
            gated(torch.randn(rows, 32, dtype=torch.float64))
    assert sum(gated._pending) == 0
    bondgate.set_mode(gated, "gate")
    for rows in (1, 3):  # under autocast the kernel runs in the cores' dtype, whatever the input's
        x = torch.randn(rows, 32)
        with torch.no_grad():
            ref = gated(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = gated(x)
                assert gated(x.bfloat16()).dtype == torch.bfloat16
        assert y.dtype == torch.bfloat16 and torch.equal(y, ref.bfloat16())


def test_bad_shapes_and_modules():
    with pytest.raises(ValueError, match="2-D"):
        MPO.from_matrix(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="empty"):
        MPO.from_matrix(torch.randn(0, 4))
    with pytest.raises(TypeError, match="nn.Linear"):
        MPOLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="num_cores"):
        MPO.from_matrix(torch.randn(8, 8), num_cores=0)
    with pytest.raises(ValueError, match="policy"):
        MPOLinear(8, 8, policy="fast")
    with pytest.raises(ValueError, match="select"):
        PlanPolicy(select="guess")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_calibration_data(value):
    import bondgate

    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    bad = torch.randn(32, 64)
    bad[4, 7] = value
    with pytest.raises(ValueError, match="non-finite calibration inputs"):
        bondgate.compress(mlp, bondgate.CompressionConfig(param_ratio=0.5), calibration=[bad], progress=False)


def test_lowrank_from_factors_checks_the_bias_shape():
    U, V = torch.randn(16, 4), torch.randn(4, 8)
    for bias in (torch.zeros(1), torch.zeros(()), torch.zeros(8)):
        with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
            bondgate.LowRankLinear.from_factors(U, V, bias)


def test_lowrank_from_factors_names_the_inner_size_it_refuses():
    # was "rank must lie in [1, 4], got 6": the user passed factors, not a rank
    with pytest.raises(ValueError, match=r"factors \(8, 6\) and \(6, 4\) have inner size 6: .*\[1, min\(out, in\) = 4\]"):
        bondgate.LowRankLinear.from_factors(torch.randn(8, 6), torch.randn(6, 4))


@pytest.mark.parametrize("params", [float("nan"), float("inf"), "12", -5, 2.5])
def test_baseline_budgets_that_are_not_counts_are_refused_by_name(params):
    # NaN / inf raised Python's "cannot convert float NaN to integer" / OverflowError
    mlp = nn.Sequential(nn.Linear(32, 32))
    for baseline in (bondgate.svd_compress, bondgate.magnitude_prune):
        with pytest.raises(ValueError, match=r"params\['0'\] must be a non-negative integer"):
            baseline(mlp, params={"0": params})


@pytest.mark.parametrize("rank", [2.7, True, 0, {"0": 1.5}])
def test_svd_compress_refuses_a_rank_that_is_not_a_positive_integer(rank):
    # int() took 2.7 as rank 2 and True as rank 1 without a word (LowRankLinear refuses both)
    with pytest.raises(ValueError, match=r"rank(\['0'\])? must be a positive integer"):
        bondgate.svd_compress(nn.Sequential(nn.Linear(32, 32)), rank=rank)


def test_factor_sizes_name_the_dimension_and_stop_at_two_to_the_32():
    with pytest.raises(ValueError, match="in_features must be a positive integer, got 0"):
        bondgate.factorize_shape(64, 0, 3)
    with pytest.raises(ValueError, match="out_features must be a positive integer, got 0"):
        bondgate.factorize_shape(0, 64, 3)
    # the factor search of 2**61 - 1 in 3 legs ran for minutes
    with pytest.raises(ValueError, match=r"dimension must be at most 2\*\*32 = 4294967296"):
        bondgate.choose_factors(2**61 - 1, 3)
    assert bondgate.choose_factors(2**32, 2) == (2**32, (2**16, 2**16))


@pytest.mark.parametrize("field", [{"embedding_ratio": 0.1}, {"embedding_form": "lowrank"}, {"embedding_rows": 4}])
def test_embedding_options_without_embeddings_are_refused(field):
    with pytest.raises(ValueError, match=f"{next(iter(field))} needs embeddings=True"):
        bondgate.CompressionConfig(param_ratio=0.5, **field)


def test_edge_inputs_get_clear_errors_not_wrong_results(tmp_path):
    # from an edge-input review: each of these was accepted (silently wrong, or a no-op) or failed deep in torch
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    student = bondgate.compress(copy.deepcopy(teacher), bondgate.CompressionConfig(param_ratio=0.5, num_cores=2),
                                progress=False)
    data = [torch.randn(4, 8)]
    loss = bondgate.DistillLoss(hidden=0, output=1)
    for kw, match in [({"grad_clip": -1.0}, "grad_clip"), ({"grad_clip": math.nan}, "grad_clip"),
                      ({"weight_decay": math.nan}, "weight_decay"), ({"weight_decay": -0.1}, "weight_decay")]:
        before = [p.detach().clone() for p in student.parameters()]
        with pytest.raises(ValueError, match=match):  # grad_clip=-1 climbed the loss (0.81 -> 6990); NaN decay
            bondgate.distill(student, teacher, data, steps=2, loss=loss, progress=False, **kw)
        assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    with pytest.raises(ValueError, match="bare Linear"):  # came back unchanged, ratio 1.0
        bondgate.compress(nn.Linear(8, 8), bondgate.CompressionConfig(param_ratio=0.5), progress=False)

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ValueError, match="overrides forward"):  # the doubling was dropped
        bondgate.MPOLinear.from_linear(Scaled(8, 8), max_bond=64)
    for bad in ([None], "abc"):
        with pytest.raises(TypeError, match="not a tensor|tokenize it first"):
            bondgate.compress(copy.deepcopy(teacher), bondgate.CompressionConfig(param_ratio=0.5), calibration=bad,
                              progress=False)
    wide = bondgate.compress(copy.deepcopy(teacher), bondgate.CompressionConfig(max_bond=4, num_cores=2),
                             progress=False)  # bonds wider than 1: gate leaves bond-1 layers as they are
    gated = bondgate.gate(wide, bondgate.GatingConfig(levels=(0.5, 1.0), controller="error"))
    with pytest.raises(ValueError, match="saw no input rows"):  # a 0-row batch: linalg.eigh on NaN
        bondgate.fit_controllers(gated, [torch.randn(0, 8)])


def test_numpy_integers_are_sizes_and_bad_sizes_are_refused():
    """Sizes computed with numpy (np.int64) work everywhere an int does and come back as Python ints;
    floats, bools and non-positive sizes are refused with the argument's name."""
    np = pytest.importorskip("numpy")
    W = torch.randn(64, 48, dtype=torch.float64)
    mpo = MPO.from_matrix(W, num_cores=np.int64(3), max_bond=np.int64(6))
    assert mpo.num_cores == 3 and max(mpo.bond_dims) <= 6
    assert MPO.from_matrix(W, num_cores=np.int64(3), tol=np.float32(0.5)).error <= 0.5
    assert bondgate.factorize_shape(np.int64(62), np.int32(48), np.int64(3)) == ((4, 4, 4), (4, 4, 3))
    assert bondgate.factorize_shape(64, 48, 3, out_factors=[np.int64(4)] * 3)[0] == (4, 4, 4)
    padded, fac = bondgate.choose_factors(np.int64(62), 3)
    assert (padded, fac) == (64, (4, 4, 4)) and all(type(f) is int for f in fac)
    rnd = MPO.random(np.int64(64), np.int64(48), 4, 3)
    assert type(rnd.out_features) is int and type(rnd.in_features) is int
    low = bondgate.LowRankLinear(np.int64(10), np.int64(8), np.int64(3))
    assert low(torch.randn(2, 10)).shape == (2, 8)
    for bad in (2.0, True, 0, "3"):
        with pytest.raises(ValueError, match="num_cores must be a positive integer"):
            bondgate.choose_factors(10, bad)
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            bondgate.LowRankLinear(10, 8, bad)
    with pytest.raises(TypeError, match="floating point"):
        bondgate.LowRankLinear(10, 8, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="out_features must be a positive integer"):
        MPO([torch.randn(1, 4, 4, 1)], 0, 4)


def test_flops_of_a_row_count():
    """0 rows cost 0 FLOPs; a negative or fractional row count is an error, not the cost of one row."""
    layer = MPOLinear(48, 64, max_bond=4, num_cores=3)
    assert layer.flops(0) == 0 and layer.to_mpo().flops(0) == 0
    assert layer.flops(8) > layer.flops(1) > 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="number of input rows"):
            layer.flops(bad)
        with pytest.raises(ValueError, match="number of input rows"):
            layer.to_mpo().flops(bad)


def test_warnings_point_at_the_callers_line():
    # compress runs under a decorator, so its fixed stacklevels named bondgate's own wrapper
    # ("bondgate/layer.py:215 ... return fn(*args, **kwargs)"): a filter on the caller's module missed them
    import warnings

    from bondgate import CompressionConfig, compress

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compress(model, CompressionConfig(param_ratio=0.5, target_modules=["0", "nothing"]),
                 calibration=[torch.randn(8, 32)], progress=False)
    ours = [w for w in caught if "compress:" in str(w.message)]
    assert len(ours) >= 2  # the selector that matches nothing, the few calibration rows
    assert all(w.filename == __file__ for w in ours), [(w.filename, w.lineno) for w in ours]


def test_a_warning_under_python_dash_c_is_a_warning():
    # warn_explicit(module_globals=__main__'s) asked the -c / REPL loader for the source, which raised ImportError
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "from bondgate._warn import warn_user; warn_user('careful'); print('ok')"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok" and "UserWarning: careful" in out.stderr, out.stderr


def test_a_path_for_a_model_or_a_name_for_a_loss_is_refused_clearly():
    # compress("model", ...) was "'str' object has no attribute 'named_modules'"; distill(loss="mse") was
    # "'str' object is not callable" from inside the training loop
    import bondgate

    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        bondgate.compress("model", bondgate.CompressionConfig(param_ratio=0.5))
    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(TypeError, match="loss must be a DistillLoss or a callable"):
        bondgate.distill(net, net, [torch.randn(4, 8)], loss="mse", steps=1, progress=False)


def test_non_finite_calibration_inputs_name_the_first_bad_batch():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
    data = [torch.randn(256, 64) for _ in range(5)]
    data[3][7, 2] = float("nan")
    with pytest.raises(ValueError, match=r"module '0' got non-finite calibration inputs \(NaN or inf\) from batch 3 "):
        bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5), calibration=data, progress=False)
    data = [data[0]] * 3 + [data[3]]  # the same batch object three times: counted as read, not by identity
    with pytest.raises(ValueError, match=r"from batch 3 "):
        bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5), calibration=data, progress=False)


def test_the_most_cores_allowed_calibrate():
    # kron_whiteners named the legs with 16 letters while a layer may have 17 cores: IndexError
    from bondgate.calibration import kron_whiteners

    torch.manual_seed(0)
    x = torch.randn(400, 16, dtype=torch.float64) * torch.linspace(0.5, 2, 16, dtype=torch.float64)
    cov = x.T @ x / 400
    legs = (2, 2, 2, 2) + (1,) * 13  # 17 legs, as compress may give a layer's input side
    S, S_inv = kron_whiteners(cov, legs, damping=0.0)
    few = kron_whiteners(cov, (2, 2, 2, 2), damping=0.0)[0]
    for k in range(17):  # legs of 1 are scalars; the 2-legs are the 4-leg whiteners' up to scale (same partial traces)
        if k < 4:
            torch.testing.assert_close(S[k], few[k] * S[k][0, 0] / few[k][0, 0])
        assert S[k].shape == (legs[k], legs[k])
        torch.testing.assert_close(S[k] @ S_inv[k], torch.eye(legs[k], dtype=S[k].dtype))


def test_a_layer_gets_no_more_cores_than_its_legs_allow():
    # 128 x 128 at 12 cores was legs of 1 on one side or both (the middle bonds a cut between all inputs and all
    # outputs): 0.208 of the weights kept for param_ratio=0.5, held-out error 0.92; 7 cores of legs 2 now
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128))
    x = torch.randn(512, 128)
    bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, num_cores=12, kinds="mpo"), calibration=[x],
                      progress=False)
    layer = model[0]
    assert layer.in_factors == layer.out_factors == (2,) * 7
    assert model.bondgate_report.ratio == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("where", ["2.weight", "4.bias"])
@pytest.mark.parametrize("calibrate", [True, False])
def test_a_model_with_non_finite_parameters_is_refused(where, calibrate):
    # a NaN/inf weight was skipped with a warning (the call returned a NaN model) and a NaN bias went unchecked,
    # its layer reported with output error 0.0
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    with torch.no_grad():
        model.get_parameter(where).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=rf"compress: {where} contains NaN or inf \(1 entries\)"):
        bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5),
                          calibration=[torch.randn(512, 64)] if calibrate else None, progress=False)
    assert all(type(m) is not MPOLinear for m in model)  # nothing swapped


def test_lowrank_alone_needs_no_mpo_cores_and_an_empty_target_list_warns():
    # kinds=("lowrank",) with num_cores=1 skipped every layer: "no 1-core MPO ... is smaller"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128))
    bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, num_cores=1, kinds=("lowrank",)),
                      calibration=[torch.randn(512, 128)], progress=False)
    assert isinstance(model[0], bondgate.LowRankLinear) and model[0].rank == 32
    model = nn.Sequential(nn.Linear(16, 16))
    with pytest.warns(UserWarning, match=r"target_modules=\[\] selects no layer"):
        bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, target_modules=[]), progress=False)
    assert isinstance(model[0], nn.Linear)


def test_int8_low_rank_pairs_are_stored_as_int8_two_core_layers(tmp_path):
    # kinds=("lowrank",) with quantize="int8" used to give an all-fp32 model (with a warning): the pairs are now
    # rank-form MPO layers (legs (out, 1) x (1, in), the bond the rank) with int8 cores, a scale per factor row
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 80), nn.ReLU(), nn.Linear(80, 64))
    dense = copy.deepcopy(model)
    x = torch.randn(256, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about any more
        bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, kinds=("lowrank",), quantize="int8"),
                          calibration=[x], progress=False)
    report = model.bondgate_report
    for i, (out_f, in_f) in ((0, (80, 64)), (2, (64, 80))):
        m, row = model[i], report.layers[i // 2]
        assert type(m) is MPOLinear and m.is_rank_form and m.quant == "int8"
        r = m.bond_dims[0]
        assert (row.form, row.quant, row.rank, row.params_after) == ("lowrank", "int8", r, r * (in_f + out_f))
        for core in m.cores:  # the master cores are the int8 values themselves: quantizing again changes nothing
            assert torch.equal(dequantize(*quantize(core.detach())), core.detach())
        W = dense[i].weight.detach().double()
        err = float((W - m.weight_matrix().double()).norm() / W.norm())
        assert row.weight_error == pytest.approx(err, rel=1e-4) and 0 < err < 1
    # the int8 cores are what the checkpoint holds, and the loaded model computes the same outputs, bit for bit
    bondgate.save(model, tmp_path / "q")
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "q" / "model.safetensors")
    assert sd["0.cores.0"].dtype == sd["0.cores.1"].dtype == torch.int8
    assert sd["0.cores.0_scale"].shape == (1, 80) and sd["0.cores.1_scale"].shape == (model[0].bond_dims[0], 1)
    loaded = bondgate.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


class _ReadsWeight(nn.Module):
    """A block that calls one layer and reads another's weight directly (Mamba's dt_proj: weight @ x), and holds
    fused experts as a 3-D parameter (transformers 5's MoE blocks)."""

    def __init__(self):
        super().__init__()
        self.called, self.read = nn.Linear(32, 32), nn.Linear(32, 32)
        self.experts = nn.Parameter(torch.randn(4, 32, 32) / 6)

    def forward(self, x):
        h = torch.relu(self.called(x))
        return h @ self.read.weight.T + torch.einsum("bi,eoi->bo", h, self.experts) / 4


def test_a_layer_whose_weight_is_read_directly_is_skipped_and_fused_experts_are_named():
    # with calibration: "module 'read' saw no calibration rows" aborted compress; fused 3-D expert weights were left
    # dense without a word (the report still said 50% kept)
    torch.manual_seed(0)
    model = _ReadsWeight()
    x = torch.randn(256, 32)
    with torch.no_grad():
        want = model(x)
    with pytest.warns(UserWarning) as record:
        bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, kinds="mpo"), calibration=[x],
                          progress=False)
    said = " | ".join(str(w.message) for w in record)
    assert "skipping 1 layer(s) whose forward never ran on the calibration data (read)" in said
    assert "1 weight(s) are 3-D parameters, not linear layers (experts (4, 32, 32)" in said
    assert isinstance(model.called, MPOLinear) and type(model.read) is nn.Linear
    with torch.no_grad():
        got = model(x)  # runs: the weight read directly is still a dense one
    assert float((got - want).norm() / want.norm()) < 1
    assert {r.name: r.status for r in model.bondgate_report.layers}["read"].startswith("skipped: its forward never ran")


def test_unseen_layers_do_not_hold_the_calibration_pass_open_and_no_run_layer_is_refused():
    # a layer read directly kept max_calibration_rows from stopping the pass (all 40 batches ran instead of 1); a
    # pass that ran no targeted layer at all is wrong data, not 12 skips; ViT's (1, 1, d) cls token is no expert
    torch.manual_seed(0)
    model, batches = _ReadsWeight(), [torch.randn(64, 32) for _ in range(40)]
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(1))
    with pytest.warns(UserWarning):
        bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, max_calibration_rows=64),
                          calibration=batches, progress=False)
    assert len(seen) < 5  # the calibration pass stopped after the first batch (later passes: refinement etc.)

    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.cls = nn.Parameter(torch.zeros(1, 1, 8))

        def forward(self, x):
            return x * 2  # a branch that uses no layer

    with pytest.raises(ValueError, match=r"no targeted layer ran on the calibration data \(a, b\)"):
        bondgate.compress(Bypass(), bondgate.CompressionConfig(param_ratio=0.5), calibration=[torch.randn(64, 8)],
                          progress=False)
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bondgate.compress(Bypass(), bondgate.CompressionConfig(param_ratio=0.5, calibrate=False), progress=False)
    assert not any("3-D parameters" in str(w.message) for w in record)


@pytest.mark.parametrize("batch, holds", [
    (["a man plays a guitar", "the cat sat on the mat"], "list of 2 str"),             # text, not tokenized
    ({"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1, 1]]}, "input_ids: list"),    # a tokenizer without return_tensors
    ({"input_ids": __import__("numpy").array([[5, 6, 7]])}, "input_ids: ndarray"),     # return_tensors="np"
])
def test_calibration_items_without_tensors_are_named(batch, holds):
    # each failed deep inside transformers ("'str' object has no attribute 'size'", "'int' object is not callable")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).eval()
    with pytest.raises((TypeError, AttributeError), match=f"holds no torch tensor: it is a .*{holds}.*"
                                                          f"return_tensors='pt'"):
        bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5), calibration=[batch], progress=False)


def test_a_batch_of_other_objects_keeps_the_models_own_error():
    # a batch object the library cannot see into is no evidence of a missing tokenization: the error stays as raised
    class Batch:
        def __init__(self, x):
            self.x = x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, b):
            return self.fc(b.x).nonexistent_helper()

    with pytest.raises(AttributeError) as info:
        bondgate.compress(Net(), bondgate.CompressionConfig(param_ratio=0.5), calibration=[Batch(torch.randn(4, 8))],
                          progress=False)
    assert "nonexistent_helper" in str(info.value) and "no torch tensor" not in str(info.value)


def test_numpy_numbers_are_numbers_in_gating_distill_deploy_and_latency():
    # refused as "out of range" ("must lie in (0, 1], got np.float32(0.5)"), where CompressionConfig took them
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(128, 32)
    bondgate.compress(model, bondgate.CompressionConfig(max_bond=4, policy="memory", refine_steps=0),
                      calibration=[x], progress=False)
    cfg = bondgate.GatingConfig(budget=np.float64(0.5), rank=np.int64(4), controller="error")
    assert (type(cfg.budget), type(cfg.rank)) == (float, int)
    gated = bondgate.gate(copy.deepcopy(model), cfg)
    bondgate.fit_controllers(gated, [x], rows_per_batch=np.int64(128))
    bondgate.set_mode(gated, np.float32(0.5))
    bondgate.set_mode(gated, "gate")
    achieved = bondgate.set_budget(gated, np.float32(0.5), [x], max_groups=np.int64(1))
    assert abs(achieved - 0.5) < 0.1
    loss = bondgate.DistillLoss(hidden=0, output=np.float32(1))
    assert type(loss.output) is float
    history = bondgate.distill(copy.deepcopy(model), model, [x], loss=loss, steps=np.int64(2), lr=np.float32(1e-3),
                               progress=False)
    assert history is not None
    assert isinstance(bondgate.deploy_int8(copy.deepcopy(model), rows=np.int64(8)), nn.Module)
    assert bondgate.latency(model, x, reps=np.int64(2), warmup=np.int64(0))["reps"] == 2


def test_wrong_number_types_are_named_apart_from_values_out_of_range():
    # one checker for the public API's numbers: a string, a bool, a 0-d tensor or array was refused as "out of
    # range" ("must lie in (0, 1], got tensor(0.5000)"), a string level or numpy bool taken, probes=0 gave
    # every layer a sensitivity of 0 without a word
    np = pytest.importorskip("numpy")
    from bondgate._checks import NumberTypeError
    from bondgate.calibration import collect_input_stats, layer_sensitivity, output_sensitivity

    cases = [
        (lambda: bondgate.GatingConfig(budget=torch.tensor(0.5)), "budget must be a number in (0, 1] (a fraction of "
         "the full-width FLOPs), got a 0-d Tensor (0.5; pass .item())"),
        (lambda: bondgate.GatingConfig(budget=np.array(0.5)), "got a 0-d ndarray (0.5; pass .item())"),
        (lambda: bondgate.GatingConfig(levels=(0.25, "0.5", 1.0)), "each of levels must be a number in (0, 1] (a "
         "fraction of each bond), got the string '0.5'"),
        (lambda: bondgate.CompressionConfig(max_bond=np.True_), "max_bond must be None or a positive integer, got a "
         "bool (np.True_)"),
        (lambda: bondgate.CompressionConfig(param_ratio="0.5"), "param_ratio must be None or a number in (0, 1], got "
         "the string '0.5'"),
        (lambda: bondgate.DistillLoss(temperature=True), "DistillLoss.temperature must be a finite number > 0, got a "
         "bool (True)"),
    ]
    for make, message in cases:
        with pytest.raises(NumberTypeError, match=re.escape(message)) as info:
            make()
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)  # (ValueError as before)
    from bondgate.recurrent import Recurrent

    with pytest.raises(NumberTypeError, match=re.escape("dropout must be a number in [0, 1], got a bool (True)")):
        Recurrent("LSTM", 8, 16, num_layers=2, dropout=True)  # (taken as dropout 1.0 before)
    rec = Recurrent("LSTM", np.int64(8), np.int64(16), num_layers=np.int64(2))  # refused before
    assert (type(rec.input_size), type(rec.hidden_size), type(rec.num_layers)) == (int, int, int)
    np_levels, torch_levels = np.linspace(0.25, 1, 4), torch.linspace(0.25, 1, 4)  # 1-D: their numbers are taken
    assert bondgate.GatingConfig(levels=np_levels).levels == bondgate.GatingConfig(levels=torch_levels).levels == (
        0.25, 0.5, 0.75, 1.0)
    for make, message in [
        (lambda: bondgate.GatingConfig(budget=1.5), "budget must be a number in (0, 1] (a fraction of the full-width "
         "FLOPs), got 1.5"),
        (lambda: bondgate.CompressionConfig(max_bond=0), "max_bond must be None or a positive integer, got 0"),
        (lambda: bondgate.DistillLoss(hidden=math.nan), "DistillLoss.hidden must be a finite number >= 0, got nan"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            make()
        assert not isinstance(info.value, TypeError)

    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    modules, data = {"0": net[0]}, [torch.randn(16, 8)]
    assert layer_sensitivity(net, modules, data, probes=1)["0"] > 0
    for call, message in [
        (lambda: layer_sensitivity(net, modules, data, probes=0), "probes must be a positive integer, got 0"),
        (lambda: layer_sensitivity(net, modules, data, max_batches=0), "max_batches must be None or a positive"),
        (lambda: output_sensitivity(net, modules, data, probes=-1), "probes must be a positive integer, got -1"),
        (lambda: collect_input_stats(net, modules, data, max_rows=0), "max_rows must be None or a positive integer"),
        (lambda: collect_input_stats(net, modules, data, unseen="Skip"), "unseen must be 'raise' or 'skip'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


def test_torch_dynamic_int8_models_are_refused_by_save_with_the_way_out(tmp_path):
    # was "state_dict entry '0._packed_params.dtype' is a dtype; bondgate checkpoints hold tensors only"
    model = bondgate.quantize_int8(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
    with pytest.raises(TypeError, match=r"torch's quantized layers \(0: .*save the float model and quantize after "
                                        r"loading, or use compress\(\.\.\., quantize='int8'\)"):
        bondgate.save(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_int8_conversions_refuse_nan_weights_by_name():
    # both returned a model whose first call failed inside torch ("min should be less than or equal to max")
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    for convert in (bondgate.quantize_int8, bondgate.deploy_int8):
        with pytest.raises(ValueError, match=r"2\.weight contains NaN or inf \(1 entries\)"):
            convert(model)


def test_fx_symbolic_trace_is_told_to_use_export_or_compile():
    # the message advised torch.from_numpy for the fx Proxy it got
    model = nn.Sequential(bondgate.MPOLinear(64, 32, max_bond=4, num_cores=2), nn.ReLU())
    with pytest.raises(TypeError, match="torch.fx.symbolic_trace cannot trace MPOLinear .*use torch.export.export or "
                                        "torch.compile"):
        torch.fx.symbolic_trace(model)


def test_compress_of_a_model_with_lazy_layers_says_to_run_it_first():
    # torch's "Attempted to use an uninitialized parameter in <method 'dim' ...>", naming no layer
    model = nn.Sequential(nn.LazyLinear(64), nn.ReLU(), nn.Linear(64, 32))
    with pytest.raises(ValueError, match=r"compress: 0 is a lazy layer not initialized yet .*run the model on one "
                                         r"input first, or exclude it"):
        bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5), progress=False)
    # one the selection leaves out is no obstacle
    bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, target_modules=["2"], calibrate=False),
                      progress=False)
    assert type(model[0]) is nn.LazyLinear and [r.name for r in model.bondgate_report.layers] == ["2"]
    model = nn.Sequential(nn.LazyLinear(64), nn.ReLU(), nn.Linear(64, 32))
    model(torch.randn(2, 16))
    bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5), calibration=[torch.randn(256, 16)],
                      progress=False)
    assert [r.name for r in model.bondgate_report.layers] == ["0", "2"]


def test_type_errors_on_a_calibration_batch_name_the_batch():
    # a wrong dtype ("input dtype torch.int64 does not match the layer's dtype torch.float32") or a dict key the forward
    # does not take (torch's "unexpected keyword argument 'x'") named no batch, where a wrong width did; set_budget's
    # scoring raised torch's "expected m1 and m2 to have the same dtype" for an integer batch
    class Keyword(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input):
            return self.inner(input)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, calibrate=False, kinds=("mpo",)),
                      progress=False)
    bondgate.gate(model, bondgate.GatingConfig(controller="error"))
    good = [torch.randn(4, 64) for _ in range(5)]
    for call in (bondgate.fit_controllers, lambda m, data: bondgate.set_budget(m, 0.5, data)):
        with pytest.raises(TypeError, match=r"^the model failed on calibration batch 5 \(\(4, 64\) int64\): input "
                                            r"dtype torch.int64 does not match the layer's dtype torch.float32$"):
            call(model, [*good, torch.randint(0, 5, (4, 64))])
        with pytest.raises(TypeError, match=r"^the model failed on calibration batch 0 \(\(4, 64\) float64\); the "
                                            r"model's weights are float32: cast the calibration data to it: input "
                                            r"dtype torch.float64"):
            call(model, [torch.randn(4, 64, dtype=torch.float64)])
        with pytest.raises(TypeError, match=r"^the model failed on calibration batch 1 \(x: \(4, 64\) float32\): "
                                            r".*unexpected keyword argument 'x'"):
            call(Keyword(model), [{"input": good[0]}, {"x": good[1]}])
    with pytest.raises(TypeError, match=r"^the model failed on calibration batch 0 \(x: \(4, 64\) float32\): "
                                        r".*unexpected keyword argument 'x'"):
        bondgate.compress(Keyword(nn.Linear(64, 64)), bondgate.CompressionConfig(param_ratio=0.5),
                          calibration=[{"x": good[0]}], progress=False)
