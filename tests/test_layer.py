"""MPOLinear as a drop-in nn.Linear: workshop case, shapes, dtypes, gradients, training, caching."""

import copy
import math

import pytest
import torch
from torch import nn

import bondgate
from bondgate import MPO, MPOLinear
from bondgate.planner import PlanPolicy


def test_workshop_case_in_one_line():
    lin = nn.Linear(256, 256)
    layer = MPOLinear.from_linear(lin, max_bond=32, num_cores=4)
    assert layer.num_params == 16_896
    assert layer.bond_dims == (16, 32, 16)
    x = torch.randn(50, 256)
    assert torch.allclose(layer(x), layer.to_linear()(x), atol=1e-5)


def test_exact_decomposition_reproduces_linear():
    lin = nn.Linear(96, 80)
    layer = MPOLinear.from_linear(lin, num_cores=3)
    x = torch.randn(7, 96)
    assert torch.allclose(layer(x), lin(x), atol=1e-5)


def test_from_linear_takes_a_transformers_conv1d_as_low_rank_does():
    # Conv1D stores its weight as (in, out): the MPO must factor the transpose (was refused; LowRankLinear took it)
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(80, 96)  # nf=80 outputs, nx=96 inputs
    nn.init.normal_(conv.bias)
    x = torch.randn(7, 96)
    for cls in (MPOLinear, bondgate.GatedMPOLinear):
        layer = cls.from_linear(conv, num_cores=3)
        if isinstance(layer, bondgate.GatedMPOLinear):
            layer.mode = "full"  # an untrained controller would cut the bonds
        assert (layer.in_features, layer.out_features) == (96, 80)
        assert layer.error < 1e-6
        torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x=x), conv(x=x), atol=1e-5, rtol=1e-5)
    cut = MPOLinear.from_linear(conv, num_cores=3, max_bond=4)
    with torch.no_grad():
        lin = nn.Linear(96, 80)
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    ref = MPOLinear.from_linear(lin, num_cores=3, max_bond=4)
    assert cut.error == pytest.approx(ref.error, rel=1e-9)
    torch.testing.assert_close(cut(x), ref(x))
    with pytest.raises(TypeError, match="nn.Linear or a transformers Conv1D, got Conv1d"):
        MPOLinear.from_linear(nn.Conv1d(3, 4, 1))


@pytest.mark.parametrize("policy", ["memory", "speed"])
def test_leading_dims_and_no_bias(policy):
    lin = nn.Linear(62, 40, bias=False)
    layer = MPOLinear.from_linear(lin, num_cores=3, policy=policy)
    assert layer.bias is None
    x = torch.randn(2, 3, 5, 62)
    y = layer(x)
    assert y.shape == (2, 3, 5, 40)
    assert torch.allclose(y, lin(x), atol=1e-5)
    assert layer(torch.randn(62)).shape == (40,)  # a single vector, like nn.Linear


@pytest.mark.parametrize("policy", ["memory", "speed"])
@pytest.mark.parametrize("bias", [True, False])
def test_no_rows_give_an_empty_output_like_linear(policy, bias):
    lin = nn.Linear(64, 48, bias=bias)
    layer = MPOLinear.from_linear(lin, max_bond=8, policy=policy)
    for shape in [(0, 64), (3, 0, 64), (0, 5, 64)]:
        x = torch.randn(shape, requires_grad=True)
        y = layer(x)
        assert y.shape == lin(x).shape == (*shape[:-1], 48) and y.dtype == x.dtype
        layer.zero_grad(set_to_none=True)
        y.sum().backward()  # an empty batch still runs through training code: zero gradients, as for a dense layer
        assert x.grad is not None and x.grad.shape == x.shape
        assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())
    with torch.no_grad():
        assert layer(torch.randn(0, 64)).shape == (0, 48)
    assert layer(torch.randn(4, 64)).shape == (4, 48)  # and the layer works on rows afterwards


def test_padded_layer_outputs_only_real_rows():
    lin = nn.Linear(777, 62)
    layer = MPOLinear.from_linear(lin, max_bond=8)
    mpo = layer.to_mpo()
    assert (mpo.padded_out, mpo.padded_in) == (64, 784)
    x = torch.randn(9, 777)
    full = mpo.to_tensor().reshape(64, 784)
    ref = nn.functional.pad(x, (0, 7)) @ full.T
    y = layer(x)
    assert y.shape == (9, 62)
    assert torch.allclose(y - lin.bias, ref[:, :62], atol=1e-5)


def test_dtype_and_state_dict_round_trip():
    layer = MPOLinear(48, 36, max_bond=4, num_cores=2)
    x = torch.randn(4, 48)
    y32 = layer(x)
    layer64 = layer.double()
    assert layer64.cores[0].dtype == torch.float64
    assert torch.allclose(layer64(x.double()).float(), y32, atol=1e-5)
    other = MPOLinear(48, 36, max_bond=4, num_cores=2, dtype=torch.float64)
    other.load_state_dict(layer64.state_dict())
    assert torch.equal(other(x.double()), layer64(x.double()))


def test_gradcheck_cores_and_input():
    torch.manual_seed(1)
    layer = MPOLinear(12, 10, max_bond=3, num_cores=3, in_factors=(3, 2, 2), out_factors=(2, 5, 1),
                      dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]

    def f(x, *ps):  # the layer as a pure function of its input and all its parameters
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


def test_functional_call_swaps_are_seen_in_speed_mode():
    layer = MPOLinear(64, 32, max_bond=4, num_cores=2, policy="speed")
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = layer(x)  # fills the dense cache
        swapped = {n: p * 3 if n.startswith("cores.0") else p for n, p in layer.named_parameters()}
        y3 = torch.func.functional_call(layer, swapped, (x,))
        assert torch.allclose(y3 - layer.bias, 3 * (y - layer.bias), atol=1e-5)
        assert torch.equal(layer(x), y)  # and the original parameters are back


def test_training_lowers_loss_and_every_core_learns():
    torch.manual_seed(0)
    teacher = nn.Linear(64, 48)
    student = MPOLinear(64, 48, max_bond=8, num_cores=3)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    x = torch.randn(512, 64)
    target = teacher(x).detach()
    before = [c.detach().clone() for c in student.cores]
    first = None
    for _ in range(150):
        loss = nn.functional.mse_loss(student(x), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in student.cores)
        opt.step()
    assert loss.item() < 0.5 * first
    assert all(not torch.equal(b, c) for b, c in zip(before, student.cores))


def test_fresh_init_matches_linear_output_variance():
    x = torch.randn(2048, 256)
    ratios = []
    for seed in range(8):
        torch.manual_seed(seed)
        lin = nn.Linear(256, 256, bias=False)
        mpo = MPOLinear(256, 256, bias=False, max_bond=16)
        with torch.no_grad():
            ratios.append((mpo(x).var() / lin(x).var()).item())
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, rel=0.2)


def test_speed_mode_cache_follows_in_place_updates():
    layer = MPOLinear.from_linear(nn.Linear(256, 256), max_bond=32, policy="speed")
    x = torch.randn(3, 256)
    with torch.no_grad():
        y0 = layer(x)
        layer.cores[1].mul_(2.0)  # in-place edit after the cache was filled
        y1 = layer(x)
    assert torch.allclose(y1 - layer.bias, 2 * (y0 - layer.bias), atol=1e-5)
    # an optimizer step is seen too
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).sum().backward()
    opt.step()
    with torch.no_grad():
        expected = x @ layer.weight_matrix().T + layer.bias
        assert torch.allclose(layer(x), expected, atol=1e-4)


@pytest.mark.parametrize("policy", ["memory", "speed"])
def test_kept_sweep_layout_follows_in_place_updates_and_inference_tensors(policy):
    # the cores' sweep layout is what either policy may keep between inference calls (pinned here: 3 rows)
    mpo = MPO.from_matrix(torch.randn(80, 96), num_cores=3, max_bond=8)
    x = torch.randn(3, 96)
    layer = MPOLinear.from_mpo(mpo, policy=policy)
    layer._pinned = {"cpu:float32:2:0": "cores/sweep-l2r/cached|sweep"}
    with torch.no_grad():
        y0 = layer(x)
        assert layer.plan(3).id == "cores/sweep-l2r/cached|sweep" and layer.cache_nbytes == 4 * layer.num_params
        layer.cores[1].mul_(2.0)  # in-place edit after the layout was kept
        assert torch.allclose(layer(x), 2 * y0, atol=1e-5)
    with torch.inference_mode():  # inference tensors have no version counter: nothing kept is reused
        frozen = MPOLinear.from_mpo(mpo, policy=policy)
        frozen._pinned = {"cpu:float32:2:0": "cores/sweep-l2r/cached|sweep"}
        assert torch.allclose(frozen(x), x @ mpo.to_matrix().T, atol=1e-5)
        frozen.cores[1].mul_(2.0)
        assert torch.allclose(frozen(x), 2 * (x @ mpo.to_matrix().T), atol=1e-5)


def test_memory_mode_never_caches_and_respects_memory_bound():
    layer = MPOLinear(1024, 1024, max_bond=16, policy="memory")
    for rows in (1, 64, 512):
        plan = layer.plan(rows)
        # the only thing memory mode may keep between calls: the cores in the sweep's layout
        assert not plan.cached or plan.executor == "sweep"
        with torch.no_grad():
            layer(torch.randn(rows, 1024))
        kept = sum(t.numel() for slot in layer._ops_cache.values() for t in slot[1])
        assert kept <= 2 * layer.num_params  # at most one copy per sweep direction
        limit = max(1024 * 1024, 4 * rows * (1024 + 1024))
        assert plan.peak_elements <= limit
        assert plan.flops > 0


def test_plan_is_inspectable_and_not_replanned():
    layer = MPOLinear(256, 256, max_bond=16)
    x = torch.randn(64, 256)
    layer(x)
    info = layer.plan(64).describe()
    assert set(info) >= {"name", "path", "flops", "peak_elements", "executor"}
    plan_obj = layer._plans[(64).bit_length() << 1 | True]
    layer(torch.randn(100, 256))  # same bucket (64..127)
    assert layer._plans[(64).bit_length() << 1 | True] is plan_obj
    assert layer.flops(64) == layer.plan(64).flops


def test_num_params_formula():
    layer = MPOLinear(384, 1536, max_bond=16, num_cores=3)
    r = [1, *layer.bond_dims, 1]
    expected = sum(r[k] * o * i * r[k + 1] for k, (o, i) in enumerate(zip(layer.out_factors, layer.in_factors)))
    assert layer.num_params == expected
    assert layer.num_params == MPO(list(c.detach() for c in layer.cores), 1536, 384).num_params
    assert math.prod(layer.in_factors) == 384 and math.prod(layer.out_factors) == 1536


@pytest.mark.parametrize("policy", ["memory", "speed"])
def test_autocast_runs_the_kernel_in_the_cores_dtype(policy):
    # the plans mix ops autocast casts (mm) with ones it does not (tensordot): they used to meet in two dtypes
    layer = MPOLinear(32, 16, max_bond=4, policy=policy)
    for rows in (1, 3, 300):
        x = torch.randn(rows, 32)
        with torch.no_grad():
            ref, ref16 = layer(x), layer(x.bfloat16().float())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y, y16 = layer(x), layer(x.bfloat16())
        assert y.dtype == y16.dtype == torch.bfloat16  # autocast's dtype, as nn.Linear gives
        assert torch.equal(y, ref.bfloat16()) and torch.equal(y16, ref16.bfloat16())
    x = torch.randn(8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(x).float().pow(2).sum()
    loss.backward()
    assert x.grad is not None and all(c.grad is not None and c.grad.dtype == torch.float32 for c in layer.cores)


CACHED_PLANS = ["dense-cached|linear", "cores/sweep-l2r/cached|sweep", "cores/sweep-r2l/cached|sweep",
                "merge01/optimal/cached|aten", "merge12/optimal/cached|tensordot"]


def _write_data_mul(layer):
    layer.cores[1].data.mul_(2.0)


def _write_data_assign(layer):
    layer.cores[0].data = layer.cores[0].detach() * -1.5


def _write_data_copy(layer):
    layer.cores[2].data.copy_(torch.randn_like(layer.cores[2]))


def _write_after_assign_load(layer):
    # load_state_dict(assign=True) puts new (plain) parameters in; a .data write on them must be seen too
    layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    layer(torch.randn(3, 96))  # fill the kept operands from the new parameters
    layer.cores[1].data.mul_(-3.0)


def _write_plain_parameter_swap(layer):
    # a user swaps in a plain nn.Parameter: its .data writes cannot be seen, so its operands are never kept
    layer.cores[1] = nn.Parameter(layer.cores[1].detach().clone())
    layer(torch.randn(3, 96))
    layer.cores[1].data.mul_(2.0)


def _write_inference_tensor_assign(layer):
    # .data = a tensor made under inference_mode: the parameter becomes an inference tensor (no version counter)
    with torch.inference_mode():
        t = layer.cores[1].detach() * 2.0
    layer.cores[1].data = t


@pytest.mark.parametrize("write", [_write_data_mul, _write_data_assign, _write_data_copy, _write_after_assign_load,
                                   _write_plain_parameter_swap, _write_inference_tensor_assign])
@pytest.mark.parametrize("plan_id", CACHED_PLANS)
def test_kept_operands_never_go_stale_after_data_writes(plan_id, write):
    # Issue 18.2: writes through .data used to bypass the version counters (p.data.mul_(2) -> 94% error in speed mode)
    torch.manual_seed(0)
    layer = MPOLinear.from_mpo(MPO.from_matrix(torch.randn(80, 96), num_cores=3, max_bond=6), torch.randn(80),
                               policy="speed")
    layer._pinned = {"cpu:float32:2:0": plan_id}  # every call below has 3 rows (bucket 2)
    x = torch.randn(3, 96)
    with torch.no_grad():
        layer(x)
        assert layer.plan(3).id == plan_id and layer.cache_nbytes > 0
        write(layer)
        got = layer(x)
        want = layer.to_linear()(x)
    assert float((got - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bad, err, match", [
    (torch.tensor(3.0), ValueError, r"last dimension 96, got shape \(\)"),
    ([[0.0] * 96], TypeError, "got list .*torch.as_tensor"),
    ("numpy", TypeError, "got ndarray .*torch.from_numpy"),
    (torch.randn(2, 95), ValueError, r"last dimension 96, got shape \(2, 95\)"),
])
def test_bad_inputs_are_clear_errors(gated, bad, err, match):
    # Issue 18.7: a 0-d tensor, a list or a numpy array gave IndexError/AttributeError tracebacks from inside forward
    import numpy as np

    import bondgate

    layer = MPOLinear.from_linear(nn.Linear(96, 80), max_bond=4)
    if gated:
        layer = bondgate.gate(nn.Sequential(layer), bondgate.GatingConfig())[0].eval()
    if isinstance(bad, str):
        bad = np.zeros((2, 96), dtype=np.float32)
    with pytest.raises(err, match=match):
        layer(bad)


@pytest.mark.parametrize("policy", ["memory", "speed"])
def test_layer_on_each_device_matches_linear_trains_and_reloads(device, policy, tmp_path):
    import bondgate

    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(96, 80), max_bond=8, policy=policy).to(device)
    for rows in (1, 7, 300):
        x = torch.randn(rows, 96, device=device)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.to_linear()(x), rtol=1e-4, atol=1e-4)
    loss = layer(torch.randn(16, 96, device=device)).square().mean()
    loss.backward()
    assert all(c.grad is not None and c.grad.device.type == device.type for c in layer.cores)
    out = bondgate.save(nn.Sequential(layer), tmp_path / "ckpt")
    loaded = bondgate.load(out, map_location=device)
    x = torch.randn(5, 96, device=device)
    with torch.no_grad():
        assert loaded[0].cores[0].device.type == device.type and torch.equal(loaded(x), layer(x))


# ------------------------------------------------------------------------------------------- review fixes
@pytest.mark.parametrize("policy", ["memory", "speed"])
def test_a_frozen_first_core_leaves_the_other_cores_trainable(policy):
    # the forward decided "no gradient" from cores[0] alone: cores[1:] got none (kept, detached operands)
    torch.manual_seed(0)
    layer = MPOLinear(64, 64, max_bond=8, num_cores=3, policy=policy, bias=False)
    layer.cores[0].requires_grad_(False)
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer(x)  # an inference call first keeps operands
    layer(x).pow(2).sum().backward()
    got = [c.grad.clone() for c in layer.cores[1:]]
    for c in layer.cores:
        c.grad = None
    (x @ layer.weight_matrix().T).pow(2).sum().backward()
    for g, c in zip(got, layer.cores[1:], strict=True):
        assert torch.allclose(g, c.grad, rtol=1e-4, atol=1e-5) and c.grad.abs().max() > 0


@pytest.mark.parametrize("policy", ["memory", "speed"])
def test_a_frozen_layer_keeps_its_inference_operands_for_an_input_that_needs_a_gradient(policy):
    # a frozen compressed backbone behind trainable parts: the forward planned for a gradient because the input
    # needed one, so speed mode dropped its cached dense weight (1.8x nn.Linear's time at 256 x 512)
    torch.manual_seed(0)
    layer = MPOLinear(64, 48, max_bond=8, num_cores=3, policy=policy).requires_grad_(False)
    x = torch.randn(40, 64, requires_grad=True)
    with torch.inference_mode():  # operands kept there must be normal tensors ("cannot be saved for backward")
        layer(x.detach())
    y = layer(x)
    assert y.requires_grad and all(key & 1 == 0 for key in layer._plans)  # the inference plans only
    (y * torch.linspace(-1, 1, 48)).sum().backward()
    ref = torch.linspace(-1, 1, 48) @ layer.weight_matrix()
    assert torch.allclose(x.grad, ref.expand(40, -1), atol=1e-5)
    assert all(c.grad is None for c in layer.cores)


@pytest.mark.parametrize("policy", ["memory", "speed"])
def test_copies_and_pickles_never_reuse_the_originals_kept_operands(policy, monkeypatch):
    # a copy's parameters start new version counters: the operands copied with their stamps matched again after as
    # many writes (torch.optim.swa_utils.AveragedModel gave outputs 3.2 away from its parameters'), and a pickle
    # carried them (speed mode: the dense weight)
    import copy
    import pickle

    from bondgate import layer as layer_module
    from bondgate.planner import MEMORY, SPEED, _build_candidates

    # plans that keep operands, given rather than timed (the timed choice need not keep any: CI's did not)
    kept = "cores/sweep-l2r/cached" if policy == "memory" else "dense-cached"
    monkeypatch.setattr(layer_module, "get_plan", lambda out_f, in_f, ranks, rows, *args, **kwargs: next(
        c for c in _build_candidates(tuple(out_f), tuple(in_f), tuple(ranks), rows,
                                     MEMORY if policy == "memory" else SPEED, False) if c.name == kept))
    torch.manual_seed(0)
    layer = MPOLinear.from_mpo(MPO.from_matrix(torch.randn(80, 96), num_cores=3, max_bond=6), torch.randn(80),
                               policy=policy)
    x = torch.randn(3, 96)
    before = len(pickle.dumps(layer))
    with torch.no_grad():
        for c in layer.cores:
            c.mul_(1.0)  # one write each: versions (1, 1, 1) when the operands are kept
        layer(x)
        assert layer.cache_nbytes > 0
        for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            for c in twin.cores:
                c.mul_(2.0)  # the twin's counters reach (1, 1, 1) too
            assert torch.allclose(twin(x), twin.to_linear()(x), atol=1e-4)
    assert len(pickle.dumps(layer)) < before + 1024


def test_a_pickled_tracked_parameter_loads_with_torch_loads_default(tmp_path):
    torch.manual_seed(0)
    layer = MPOLinear(12, 10, max_bond=3, num_cores=2)
    torch.save(layer.state_dict(keep_vars=True), tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "sd.pt")  # weights_only=True (torch's default)
    assert all(torch.equal(loaded[k], v) for k, v in layer.state_dict().items())


def test_a_core_given_new_bonds_through_data_is_replanned():
    torch.manual_seed(0)
    layer = MPOLinear(60, 70, max_bond=6, num_cores=3)
    x = torch.randn(5, 60)
    with torch.no_grad():
        layer(x)
        c0, c1 = layer.cores[0].detach(), layer.cores[1].detach()
        layer.cores[0].data = c0[..., :3].clone()
        layer.cores[1].data = c1[:3].clone()  # manual truncation of bond 0 from 6 to 3
        assert layer.bond_dims == (3, 6)
        assert torch.allclose(layer(x), layer.to_linear()(x), atol=1e-5)
        layer.cores[1].data = c1[:2].clone()  # left bond 2 against core 0's right bond 3
        with pytest.raises(ValueError, match="core 1 has left bond 2, expected 3"):
            layer(x)


def test_clear_plan_cache_makes_existing_layers_plan_again():
    from bondgate import clear_plan_cache
    from bondgate.planner import plan_cache_info

    layer = MPOLinear(48, 40, max_bond=4, num_cores=3)
    x = torch.randn(8, 48)
    with torch.no_grad():
        layer(x)
        clear_plan_cache()
        assert plan_cache_info()["plans"] == 0 and not layer._plans
        layer(x)  # plans again (it ran its own table's old plan)
    assert plan_cache_info()["plans"] == 1 and layer.plan(8) is layer._plans[(8).bit_length() << 1][0]


def test_first_call_inside_vmap_plans_without_torch_random():
    # the autotuner drew its timing operands with torch.randn, which vmap refuses ("random operation")
    from torch.func import vmap

    torch.manual_seed(0)
    layer = MPOLinear(12, 10, max_bond=3, num_cores=3)
    X = torch.randn(7, 5, 12)
    with torch.no_grad():
        y = vmap(layer)(X)
    assert torch.allclose(y, X @ layer.weight_matrix().T + layer.bias, atol=1e-5)


def test_memory_mode_does_not_time_a_dense_rebuild_its_flops_screen_out():
    # timing the rebuild+GEMM anchor first made a wide memory-mode layer's first call build its whole dense weight
    from bondgate.planner import PlanPolicy

    memory = MPOLinear(1024, 1024, max_bond=8, num_cores=4, policy=PlanPolicy(cache_dense=False, tune_seconds=0.05))
    speed = MPOLinear(1024, 1024, max_bond=8, num_cores=4, policy=PlanPolicy(cache_dense=True, tune_seconds=0.05))
    assert "rebuild+gemm" not in {c["name"] for c in memory.plan(1).candidates}
    assert "dense-cached" in {c["name"] for c in speed.plan(1).candidates}


@pytest.mark.parametrize("policy, quant", [("memory", None), ("speed", None), ("memory", "int8")])
def test_kept_operands_follow_a_fused_optimizer_step(policy, quant):
    # AdamW(fused=True) (transformers.Trainer's default) updates parameters without moving their version counters:
    # evaluation after a step ran on the weights before it (0.35 off), and int8 state dicts were the old ones
    torch.manual_seed(0)
    layer = MPOLinear(64, 64, max_bond=8, num_cores=2, policy=policy)
    if quant:
        layer.quantize_(quant)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, fused=True)
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer(x)  # keeps operands
        before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(x).pow(2).sum().backward()
    opt.step()
    fresh = MPOLinear(64, 64, max_bond=8, num_cores=2, policy=policy)
    if quant:
        fresh.quantize_(quant)
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.allclose(layer(x), fresh(x), atol=1e-5)
        assert any(not torch.equal(before[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("kind", ["mpo", "lowrank"])
def test_weight_reports_shape_dtype_device_and_refuses_arithmetic(kind):
    # code written for nn.Linear reads weight.dtype (transformers' T5); a meta tensor stood in at first, but torch
    # multiplies a CPU input by a meta tensor and returns uninitialized memory: a tied decoder computed garbage
    import torch.nn.functional as F

    from bondgate import CompressionConfig, LowRankLinear, compress

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12).double())
    compress(model, CompressionConfig(param_ratio=0.6, kinds=kind, num_cores=2, policy="memory"),
             progress=False)
    layer = model[0]
    assert isinstance(layer, LowRankLinear if kind == "lowrank" else MPOLinear)
    w = layer.weight
    assert isinstance(w, torch.Tensor) and w.shape == (12, 16) and w.size(1) == 16 and w.dim() == 2
    assert w.dtype == torch.float64 and w.device == torch.device("cpu") and "12, 16" in repr(w)
    x = torch.randn(3, 16, dtype=torch.float64)
    for compute in (lambda: F.linear(x, w), lambda: x @ w.t(), lambda: w + 1, lambda: torch.nn.init.normal_(w)):
        with pytest.raises(RuntimeError, match="has no dense weight"):
            compute()
    assert torch.allclose(layer(x), F.linear(x, layer.weight_matrix(), layer.bias))
    compiled = torch.compile(lambda t: layer(t.to(layer.weight.dtype)))  # a read of .dtype traces
    assert torch.allclose(compiled(x.float()), layer(x))


@pytest.mark.parametrize("kind", ["mpo", "lowrank"])
def test_weight_stand_in_answers_trainability_and_metadata(kind):
    # code that lists trainable layers reads weight.requires_grad: it was False on every factored layer
    from bondgate import CompressionConfig, compress

    model = nn.Sequential(nn.Linear(16, 12))
    compress(model, CompressionConfig(param_ratio=0.6, kinds=kind, num_cores=2), progress=False)
    layer = model[0]
    assert layer.weight.requires_grad and not layer.weight.is_cuda and layer.weight.element_size() == 4
    layer.requires_grad_(False)
    assert not layer.weight.requires_grad
    with pytest.raises(RuntimeError, match=r"\(\.T was read\)"):
        _ = layer.weight.T


def test_pruned_or_parametrized_cores_are_refused_and_prune_remove_is_honoured():
    # torch's prune keeps the pruned core under "k_orig" and sets the masked one from a hook of the core list,
    # which is never called: the layer computed with unpruned (or re-ordered, "left bond 8, expected 1") cores
    import torch.nn.utils.parametrize as parametrize
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    x = torch.randn(5, 64)
    for k in range(3):
        layer = MPOLinear.from_linear(nn.Linear(64, 32), max_bond=8, num_cores=3)
        prune.l1_unstructured(layer.cores, str(k), amount=0.5)
        for call in (lambda: layer(x), layer.weight_matrix):
            with pytest.raises(RuntimeError, match="pruned or parametrized"):
                call()
        assert layer.bond_dims == (8, 8) and "bond_dims=(8, 8)" in repr(layer)  # it still prints
        prune.remove(layer.cores, str(k))  # the masked core, re-registered last: taken in its place
        masked = [c.detach().clone() for c in layer.cores]
        assert int((masked[k] == 0).sum()) == masked[k].numel() // 2
        want = torch.nn.functional.linear(x, MPO(masked, 32, 64).to_matrix(), layer.bias)
        with torch.no_grad():
            assert torch.allclose(layer(x), want, atol=1e-5)
    layer = MPOLinear.from_linear(nn.Linear(64, 32), max_bond=8, num_cores=3)
    parametrize.register_parametrization(layer.cores, "2", nn.Identity())
    with pytest.raises(RuntimeError, match="pruned or parametrized"):
        layer(x)

    class Double(nn.Module):
        def forward(self, b):
            return 2 * b

    layer = MPOLinear.from_linear(nn.Linear(64, 32), max_bond=8, num_cores=3)
    parametrize.register_parametrization(layer, "bias", Double())  # the layer's own parameters: honoured
    want = torch.nn.functional.linear(x, layer.weight_matrix(), 2 * layer.parametrizations.bias.original)
    assert torch.allclose(layer(x), want, atol=1e-5)
    table = bondgate.MPOEmbedding(100, 16, max_bond=4)
    prune.random_unstructured(table.cores, "1", amount=0.5)
    with pytest.raises(RuntimeError, match="pruned or parametrized"):
        table(torch.tensor([1, 2]))


@pytest.mark.parametrize("kind", ["mpo", "lowrank"])
def test_integer_input_under_autocast_is_refused_as_outside(kind):
    # autocast cast any input to the cores' dtype: a long input gave a bfloat16 output (nn.Linear raises)
    from bondgate import CompressionConfig, compress

    model = nn.Sequential(nn.Linear(16, 12))
    compress(model, CompressionConfig(param_ratio=0.6, kinds=kind, num_cores=2), progress=False)
    ids = torch.ones(3, 16, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises((TypeError, RuntimeError), match="dtype"):
        model(ids)


def test_nested_tensors_are_taken_as_nn_linear_takes_them():
    # MPOLinear raised on nested inputs ("NestedTensorImpl doesn't support sizes"; torch's TransformerEncoder makes
    # them from a padding mask in eval) where nn.Linear and LowRankLinear take them
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(12, 20), max_bond=4)
    gated = bondgate.gate(nn.Sequential(copy.deepcopy(layer)), bondgate.GatingConfig(levels=(0.5, 1.0)))[0].eval()
    seqs = [torch.randn(3, 12), torch.randn(5, 12)]
    with torch.no_grad():
        for layout in (torch.strided, torch.jagged):
            x = torch.nested.nested_tensor(seqs, layout=layout)
            for m in (layer, gated):
                y = m(x)
                assert y.is_nested and y.layout == layout
                for got, s in zip(y.unbind(), seqs):
                    torch.testing.assert_close(got, m(s))
        with pytest.raises(TypeError, match="nested tensor only as a whole"):
            gated(torch.nested.nested_tensor(seqs), levels=torch.zeros(8, dtype=torch.long))


def test_meta_inputs_give_shapes_as_nn_linear_does():
    # "unknown device type for autocast" before: nn.Linear on the meta device is how models are sized without memory
    layer = MPOLinear.from_linear(nn.Linear(12, 6), max_bond=4)
    assert layer(torch.empty(3, 5, 12, device="meta")).shape == (3, 5, 6)
    gated = bondgate.gate(nn.Sequential(layer), bondgate.GatingConfig(levels=(0.5, 1.0)))[0]
    out = gated(torch.empty(2, 12, device="meta"))
    assert out.is_meta and out.shape == (2, 6)


def test_float64_under_autocast_plan_sizes_dtypes_and_low_rank_inputs_as_nn_linear():
    # autocast leaves float64 alone: a float64 layer gave bf16 (nn.Linear keeps float64), and a float32 layer took a
    # float64 input silently; plan(-1) / plan(2.5) planned 1 / 2 rows; an int dtype failed in torch's init kernel;
    # LowRankLinear's wrong input was torch's "mat1 and mat2 shapes cannot be multiplied"
    from bondgate import LowRankLinear

    torch.manual_seed(0)
    layer = MPOLinear(64, 48, max_bond=8).double()
    x = torch.randn(3, 64, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        with pytest.raises(TypeError, match="does not match the layer's dtype"):
            MPOLinear(64, 48)(x)
    assert y.dtype == torch.float64 and torch.allclose(y, x @ layer.weight_matrix().T + layer.bias)
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="batch must be an integer >= 0"):
            layer.plan(bad)
    with pytest.raises(TypeError, match="cores are floating point"):
        MPOLinear(64, 48, dtype=torch.int64)
    low = LowRankLinear(64, 48, 4)
    with pytest.raises(ValueError, match="expected input with last dimension 64, got shape \\(5, 63\\)"):
        low(torch.randn(5, 63))
    with pytest.raises(TypeError, match="got list"):
        low([1.0] * 64)


def test_a_state_dict_of_a_layer_of_another_size_with_the_same_padding_is_refused(tmp_path):
    # 62 and 64 inputs pad to the same factors, so the cores had the same shapes: the 62-wide layer loaded the 64-wide
    # one's state dict in silence (and dropped its last two input columns); nn.Linear refuses it
    from bondgate import MPOEmbedding

    torch.manual_seed(0)
    wide, narrow = MPOLinear(64, 48, max_bond=8), MPOLinear(62, 48, max_bond=8)
    assert [c.shape for c in wide.cores] == [c.shape for c in narrow.cores]
    torch.save(wide.state_dict(), tmp_path / "sd.pt")
    for sd in (wide.state_dict(), torch.load(tmp_path / "sd.pt")):
        with pytest.raises(RuntimeError, match="the checkpoint's layer is 48 x 64 \\(out_features x in_features\\), this one 48 x 62"):
            narrow.load_state_dict(sd)
    same = MPOLinear(64, 48, max_bond=8)
    same.load_state_dict(wide.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(same.cores, wide.cores))
    outer = nn.Sequential(nn.Linear(3, 62), narrow)
    with pytest.raises(RuntimeError, match="size mismatch for 1: the checkpoint's layer is 48 x 64"):
        outer.load_state_dict(nn.Sequential(nn.Linear(3, 62), wide).state_dict(), strict=False)
    # keys deleted from a loaded dict keep its metadata: a dropped layer is missing, not mismatched
    sd = nn.Sequential(nn.Linear(3, 62), wide).state_dict()
    for k in [k for k in sd if k.startswith("1.")]:
        del sd[k]
    assert set(outer.load_state_dict(sd, strict=False).missing_keys) == {f"1.{k}" for k in narrow.state_dict()}
    tables = [MPOEmbedding.from_embedding(nn.Embedding(n, 32), max_bond=4) for n in (1000, 999)]
    assert [c.shape for c in tables[0].cores] == [c.shape for c in tables[1].cores]
    with pytest.raises(RuntimeError, match="is 1000 x 32 \\(num_embeddings x embedding_dim\\), this one 999 x 32"):
        tables[1].load_state_dict(tables[0].state_dict())
    head = tables[0].as_linear()  # the tied head: the same matrix, recorded alike
    head.load_state_dict(tables[0].state_dict())


def test_low_rank_pair_refuses_inf_and_reports_16_bit_rounding():
    # an inf weight gave inf factors and error 0.0 (MPOLinear refuses it); a bf16 pair at full rank reported 0
    # where its factors' rounding leaves 2.3e-3
    from bondgate import LowRankLinear

    lin = nn.Linear(32, 24)
    with torch.no_grad():
        lin.weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        LowRankLinear.from_linear(lin, 4)
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        lin = nn.Linear(64, 64).to(dtype)
        pair = LowRankLinear.from_linear(lin, 64)
        W = lin.weight.detach().double()
        true = float(torch.linalg.norm(W - pair.U.detach().double() @ pair.V.detach().double()) / torch.linalg.norm(W))
        assert true > 1e-4 and pair.error == pytest.approx(true, rel=1e-9)


# ---- cases a mutation run of layer.py showed untested
FLOPS = PlanPolicy(select="flops")


def test_from_mpo_casts_the_bias_to_the_cores_dtype_and_checks_its_shape():
    torch.manual_seed(0)
    mpo = MPO.random(80, 96, bond=4, num_cores=3, dtype=torch.float64)
    b = torch.randn(80)  # float32
    layer = MPOLinear.from_mpo(mpo, bias=b, policy=FLOPS)
    assert layer.bias.dtype == torch.float64
    x = torch.randn(5, 96, dtype=torch.float64)
    ref = x @ mpo.to_matrix().T + b.double()
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float64 and float((y - ref).norm() / ref.norm()) < 1e-12
    with pytest.raises(ValueError, match=r"bias must have shape \(80,\)"):
        MPOLinear.from_mpo(mpo, bias=torch.zeros(81, dtype=torch.float64))


def test_setting_the_policy_drops_the_pinned_plans():
    # documented: "setting it drops the plans and kept operands"; pins chosen under the old policy must not outlive it
    layer = MPOLinear(96, 80, max_bond=6, num_cores=3, policy=FLOPS)
    pins = {"cpu:float32:3:0": "rebuild+gemm|linear"}
    twin = MPOLinear.from_spec({**layer.spec(), "plans": pins})
    twin.load_state_dict(layer.state_dict())
    assert twin.plan(5).id == "rebuild+gemm|linear"
    twin.policy = FLOPS
    assert twin.spec()["plans"] == {}
    fresh = MPOLinear(96, 80, max_bond=6, num_cores=3, policy=FLOPS)
    assert twin.plan(5).id == fresh.plan(5).id != "rebuild+gemm|linear"


def test_a_spec_whose_factor_lists_differ_in_length_is_refused():
    spec = MPOLinear(48, 40, max_bond=3, num_cores=3).spec()
    for in_f in (spec["in_factors"] + [1], spec["in_factors"][:2]):
        with pytest.raises(ValueError, match="inconsistent layer spec"):
            MPOLinear.from_spec({**spec, "in_factors": in_f})


def test_no_rows_with_only_the_bias_trainable_still_reaches_the_bias_like_linear():
    # bias-only fine-tuning (cores frozen) on an empty batch: nn.Linear's output needs a gradient and the bias gets a
    # zero one; the layer's zero-row path must keep the bias in the graph
    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    layer = MPOLinear.from_linear(lin, max_bond=3, policy=FLOPS)
    for m in (lin, layer):
        m.weight.requires_grad_(False) if m is lin else [c.requires_grad_(False) for c in m.cores]
        y = m(torch.zeros(0, 48))
        assert y.shape == (0, 40) and y.requires_grad
        y.sum().backward()
        assert m.bias.grad is not None and not m.bias.grad.any()


def _warm_dense_cached_layer(seed: int = 0) -> MPOLinear:
    """A speed-mode layer whose 3-row calls run the dense-cached plan, called once under no_grad: its next
    inference calls of 3 rows take forward's short path (the kept dense weight, fewest checks)."""
    torch.manual_seed(seed)
    layer = MPOLinear.from_mpo(MPO.from_matrix(torch.randn(80, 96), num_cores=3, max_bond=6), torch.randn(80),
                               policy="speed")
    layer._pinned = {"cpu:float32:2:0": "dense-cached|linear", "cpu:float32:3:0": "dense-cached|linear"}  # 2-7 rows
    with torch.no_grad():
        layer(torch.randn(3, 96))
    assert layer._hot, "the dense-cached inference call should have armed the short path"
    return layer


def test_short_path_gives_the_general_paths_bits_for_any_leading_shape(monkeypatch):
    # the short path (kept dense weight, no freshness scan through is_fresh) must be the one taken, and give the
    # same bits as the general path and as nn.Linear holding that weight, whatever the input's leading dims
    import bondgate.layer as L

    layer = _warm_dense_cached_layer()
    weight = next(iter(layer._hot.values()))[0][1][0]
    xs = [torch.randn(3, 96), torch.randn(1, 3, 96), torch.randn(3, 1, 96), torch.randn(96, 3).T,
          torch.randn(3, 1, 2, 96)[:, :, 0], torch.randn(1, 1, 3, 96)]
    with torch.inference_mode():
        general = []
        for x in xs:  # the general path, the short one disarmed
            layer._hot.clear()
            general.append(layer(x))
        assert layer._hot
        monkeypatch.setattr(L, "is_fresh", lambda *a: pytest.fail("the general path ran"))
        for x, want in zip(xs, general):
            got = layer(x)
            assert got.shape == (*x.shape[:-1], 80) and torch.equal(got, want)
            assert torch.equal(got, torch.nn.functional.linear(x, weight, layer.bias))


@pytest.mark.parametrize("quant", [None, "int8"])
def test_a_rank_form_layer_runs_its_pairs_two_products_on_the_short_path(quant, monkeypatch):
    # a low-rank pair as two cores (compress's int8 pairs) must compute what the pair computes, bit for bit, on every
    # inference call: the first (general path, plan.chain) and the later ones (short path, no freshness scan), for
    # any leading shape; a write to a core is seen by the next call
    import bondgate.layer as L

    torch.manual_seed(0)
    layer = bondgate.LowRankLinear.from_linear(nn.Linear(96, 80), rank=12).to_mpo_linear(policy=PlanPolicy(select="flops"))
    if quant:
        bondgate.quantize_mpo(layer)
    pair = bondgate.LowRankLinear.from_mpo_linear(layer)
    xs = [torch.randn(3, 96), torch.randn(1, 96), torch.randn(2, 3, 96), torch.randn(96, 3).T, torch.randn(40, 96)]
    with torch.inference_mode():
        first = [layer(x) for x in xs]  # arms the short path for each row bucket
        assert layer.plan(3).chain and len(layer._hot) == 4
        with monkeypatch.context() as m:
            m.setattr(L, "is_fresh", lambda *a: pytest.fail("the general path ran"))
            for x, want in zip(xs, first):
                got = layer(x)
                assert got.shape == (*x.shape[:-1], 80) and torch.equal(got, want) and torch.equal(got, pair(x))
    with torch.no_grad():
        layer.cores[1].mul_(2.0)  # V doubled: the output less the bias doubles
        x = xs[0]
        torch.testing.assert_close(layer(x) - layer.bias, 2 * (first[0] - layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", [None, "int8"])
def test_a_one_core_layer_takes_the_short_path_in_memory_mode_without_a_copy(quant, monkeypatch):
    # a one-core layer (compress's kept-dense layers under quantize="int8") is its weight: memory mode keeps it as the
    # short path's operand, a view of the core (float) or the one fake-quantized weight (int8) and nothing more
    import bondgate.layer as L

    torch.manual_seed(1)
    lin = nn.Linear(96, 80)
    layer = MPOLinear.from_mpo(MPO.from_matrix(lin.weight.detach(), num_cores=1), lin.bias.detach(), policy="memory")
    if quant:
        bondgate.quantize_mpo(layer)
    x = torch.randn(2, 3, 96)
    with torch.inference_mode():
        first = layer(x)
        assert layer.plan(6).cached and len(layer._hot) == 1
        (slot, _), = layer._hot.values()
        kept = slot[1][0]
        if quant is None:
            assert kept.untyped_storage().data_ptr() == layer.cores[0].untyped_storage().data_ptr()
        assert not layer._quant_cache  # the fake-quantized weight is held once, by the short path's slot
        with monkeypatch.context() as m:
            m.setattr(L, "is_fresh", lambda *a: pytest.fail("the general path ran"))
            assert torch.equal(layer(x), first)
        torch.testing.assert_close(first, nn.functional.linear(x, layer.weight_matrix(), layer.bias))


def test_short_path_sees_an_appended_core_a_parametrized_bias_and_refuses_what_the_general_path_refuses():
    from torch.nn.utils import parametrize

    from bondgate.layer import TrackedParameter

    x = torch.randn(3, 96)
    layer = _warm_dense_cached_layer()
    with torch.no_grad():
        y = layer(x)
        # a core appended to the list (a trivial factor of 1 scaling by 2): its version sum and the first cores'
        # identities are unchanged; both paths returned the old map
        layer.cores.append(TrackedParameter(torch.full((1, 1, 1, 1), 2.0)))
        torch.testing.assert_close(layer(x) - layer.bias, 2 * (y - layer.bias))
        torch.testing.assert_close(layer(x), layer.to_linear()(x))

    class Double(nn.Module):
        def forward(self, b):
            return 2 * b

    layer = _warm_dense_cached_layer()
    parametrize.register_parametrization(layer, "bias", Double())  # no longer in the layer's own parameters
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - y, layer.parametrizations.bias.original.expand(3, 80))

    layer = _warm_dense_cached_layer()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"last dimension 96, got shape \(3, 95\)"):
            layer(torch.randn(3, 95))
        with pytest.raises(TypeError, match="input dtype torch.float64 does not match"):
            layer(x.double())
        with pytest.raises(RuntimeError, match="does not support TorchScript"):
            torch.jit.trace(layer, (x,))
        assert layer(x.to("meta")).shape == (3, 80)
        # a nested input goes as nn.Linear takes it (a strided one's sequences one by one, a jagged one's packed rows
        # in one call), whichever buckets earlier calls armed (its total rows, 7, in bucket 3 here: F.linear on the
        # whole strided nested tensor gave other bits, ~4e-6 off)
        seqs = [torch.randn(3, 96), torch.randn(4, 96)]
        layer(torch.randn(7, 96))
        assert len(layer._hot) == 2
        for layout in (torch.strided, torch.jagged):
            out = layer(torch.nested.nested_tensor(seqs, layout=layout))
            assert out.is_nested and out.layout == layout
            want = [layer(s) for s in seqs] if layout == torch.strided else layer(torch.cat(seqs)).split([3, 4])
            for got, w in zip(out.unbind(), want):
                assert torch.equal(got, w)


def test_short_path_refuses_cores_pruned_after_it_was_armed():
    """A warm layer whose cores torch then prunes refuses its next call, as a cold one does, whichever core: pruning
    the last core (or the last two, in order) leaves the kept tensors in the list's dict in their order, renamed."""
    import torch.nn.utils.prune as prune

    x = torch.randn(3, 96)
    for pruned in (["0"], ["1"], ["2"], ["1", "2"]):
        layer = _warm_dense_cached_layer()
        for name in pruned:
            prune.l1_unstructured(layer.cores, name, amount=0.5)
        with torch.no_grad(), pytest.raises(RuntimeError, match="pruned or parametrized"):
            layer(x)


def test_short_path_refuses_a_cores_list_holding_a_module_and_calls_a_patched_linear(monkeypatch):
    """A module appended to a warm layer's cores list, or a parametrized non-core tensor of it (names "0".."n-1"
    intact), is refused as on a cold call; F.linear patched after import (as DeepSpeed's zero.Init does) is the one
    the short path calls."""
    from torch.nn.utils import parametrize

    x = torch.randn(3, 96)
    layer = _warm_dense_cached_layer()
    layer.cores.append(nn.Identity())
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"named \['0', '1', '2'\], expected '0' to '3'"):
        layer(x)
    layer = _warm_dense_cached_layer()
    layer.cores.register_buffer("scale", torch.ones(1))
    parametrize.register_parametrization(layer.cores, "scale", nn.Identity())
    with torch.no_grad(), pytest.raises(RuntimeError, match="pruned or parametrized"):
        layer(x)

    layer = _warm_dense_cached_layer()
    calls, linear = [], torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(1) or linear(*a))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.to_linear()(x))
    assert layer._hot and len(calls) == 2  # the layer's call (the short path) and the reference nn.Linear's


def test_a_layer_compiled_after_eager_inference_traces_its_cores_and_sees_writes():
    # eager inference armed the short path; a compiled graph must not bake its kept weight in
    layer = _warm_dense_cached_layer()
    compiled = torch.compile(layer, backend="eager", fullgraph=True, dynamic=False)
    x = torch.randn(3, 96)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer.to_linear()(x))
        layer.cores[1].mul_(-2.0)
        torch.testing.assert_close(compiled(x), layer.to_linear()(x))


# ---- cases a second mutation run of layer.py showed untested
def test_cores_loaded_with_assign_are_tracked_and_their_kept_weight_is_reused():
    """load_state_dict(assign=True) puts plain parameters in: they must become TrackedParameters whose kept
    dense weight is reused, not rebuilt on every inference call."""
    from bondgate.layer import TrackedParameter

    layer = _warm_dense_cached_layer()
    layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    assert all(type(p) is TrackedParameter for p in layer.parameters())
    x = torch.randn(3, 96)
    with torch.no_grad():
        y = layer(x)
        kept = next(iter(layer._hot.values()))[0][1][0]
        assert torch.equal(layer(x), y) and next(iter(layer._hot.values()))[0][1][0] is kept


def test_cores_made_anew_by_to_are_tracked():
    """With torch's overwrite-on-conversion flag, .double() makes new parameters: they must be TrackedParameters."""
    from bondgate.layer import TrackedParameter

    layer = MPOLinear(12, 10, max_bond=3, num_cores=2)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        layer.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert all(type(p) is TrackedParameter and p.dtype == torch.float64 for p in layer.parameters())


def test_a_plan_pinned_for_float32_is_not_run_after_double():
    """.double() drops the plans chosen for float32: a float64 call plans for float64 (and spec records that)."""
    layer = MPOLinear(96, 80, max_bond=6, num_cores=3, policy=FLOPS)
    layer._pinned = {"cpu:float32:2:0": "rebuild+gemm|linear"}
    x = torch.randn(3, 96)
    with torch.no_grad():
        layer(x)
        assert layer.spec()["plans"]["cpu:float32:2:0"] == "rebuild+gemm|linear"
        layer.double()
        y = layer(x.double())
    assert layer.spec()["plans"]["cpu:float64:2:0"] == layer.plan(3).id != "rebuild+gemm|linear"
    torch.testing.assert_close(y, layer.to_linear()(x.double()))


def test_an_empty_batch_without_input_grad_gives_the_cores_zero_gradients_like_linear():
    """nn.Linear on zero rows still gives its weight a zero gradient; the cores must get one too."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 40, bias=False)
    layer = MPOLinear.from_linear(lin, max_bond=3, policy=FLOPS)
    for m in (lin, layer):
        y = m(torch.zeros(0, 48))
        assert y.shape == (0, 40) and y.requires_grad
        y.sum().backward()
    assert all(c.grad is not None and c.grad.shape == c.shape and not c.grad.any() for c in layer.cores)


def test_weight_matrix_keeps_the_cores_dtype_under_autocast():
    """weight_matrix() inside torch.autocast is the float32 weight, as nn.Linear.weight is, not a bfloat16 product."""
    torch.manual_seed(0)
    layer = MPOLinear(64, 48, max_bond=8, num_cores=3)
    want = layer.weight_matrix()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer.weight_matrix()
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_refresh_drops_a_kept_weight_after_a_write_torch_cannot_see():
    """A write through a numpy view bypasses the version counters; refresh() makes the next call use it."""
    layer = _warm_dense_cached_layer()
    x = torch.randn(3, 96)
    with torch.no_grad():
        y = layer(x)
        layer.cores[1].detach().numpy()[...] *= 2.0  # unseen by torch: the kept weight is stale until refresh()
        layer.refresh()
        got = layer(x)
    torch.testing.assert_close(got, layer.to_linear()(x))
    torch.testing.assert_close(got - layer.bias, 2 * (y - layer.bias))


def test_cores_assigned_with_other_bonds_are_compiled_at_their_bonds():
    """layer.cores = a new ParameterList of other bond widths: a compiled forward must trace the new bonds."""
    from bondgate.layer import TrackedParameter

    torch.manual_seed(0)
    layer = MPOLinear(96, 80, max_bond=6, num_cores=3, policy=FLOPS)
    mpo = MPO.from_matrix(torch.randn(80, 96), num_cores=3, max_bond=3)
    assert (mpo.out_factors, mpo.in_factors) == (layer.out_factors, layer.in_factors)
    layer.cores = nn.ParameterList([TrackedParameter(c.clone()) for c in mpo.cores])
    assert layer.bond_dims == (3, 3)
    compiled = torch.compile(layer, backend="eager", fullgraph=True, dynamic=False)
    x = torch.randn(3, 96)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), x @ mpo.to_matrix().T + layer.bias)


@pytest.mark.parametrize("policy", ["memory", "speed"])
def test_set_cores_of_another_dtype_is_refused(policy):
    # float64 cores in a float32 layer ran in memory mode and with grad, but speed-mode inference failed inside
    # F.linear (the float32 bias): one behaviour, a clear refusal before anything changes
    torch.manual_seed(0)
    layer = MPOLinear(60, 40, num_cores=3, max_bond=4, policy=policy)
    before = [c.detach().clone() for c in layer.cores]
    other = MPO.random(40, 60, bond=3, num_cores=3, dtype=torch.float64).cores
    with pytest.raises(TypeError, match="set_cores: cores of dtype torch.float64 for a layer of dtype torch.float32"):
        layer.set_cores(other)
    assert all(torch.equal(a, b) for a, b in zip(layer.cores, before))
    layer.set_cores([c.float() for c in other])
    x = torch.randn(3, 60)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.weight_matrix().T + layer.bias, rtol=1e-5, atol=1e-5)
    assert layer.bond_dims == (3, 3)


def test_set_cores_keeps_a_frozen_layer_frozen():
    # the new cores were parameters with requires_grad=True: a frozen layer's cores trained again after a truncation
    layer = MPOLinear.from_linear(nn.Linear(64, 32), num_cores=3, max_bond=8)
    layer.requires_grad_(False)
    layer.set_cores(layer.to_mpo().truncate(max_bond=4).cores)
    assert layer.bond_dims == (4, 4)
    assert not any(c.requires_grad for c in layer.cores) and not layer.bias.requires_grad
    layer.cores[1].requires_grad_(True)  # partly frozen: each core by position
    old = list(layer.cores)
    layer.set_cores(layer.to_mpo().truncate(max_bond=2).cores)
    assert [c.requires_grad for c in layer.cores] == [False, True, False]
    assert not any(c is o for c, o in zip(layer.cores, old))  # new parameter objects (an optimizer is rebuilt)
    layer.set_cores(MPO.from_matrix(layer.weight_matrix().detach(), num_cores=2, max_bond=4).cores)
    assert [c.requires_grad for c in layer.cores] == [False, False]  # another count: trainable only if all were
    layer.requires_grad_(True)
    layer.set_cores(layer.to_mpo().truncate(max_bond=2).cores)
    assert all(c.requires_grad for c in layer.cores)


def test_an_input_given_by_position_and_as_x_is_refused():
    # the keyword won in silence: layer(a, x=b) returned b's rows (as nn.Linear, which has no x=, a TypeError)
    a, b = torch.randn(1, 8), torch.randn(5, 8)
    for layer in (MPOLinear(8, 4), bondgate.LowRankLinear(8, 4, 2),
                  bondgate.GatedMPOLinear.from_linear(nn.Linear(8, 4), num_cores=2)):
        name = type(layer).__name__
        with pytest.raises(TypeError, match=rf"{name}.forward\(\) got the input twice, as input and as x="):
            layer(a, x=b)
        with pytest.raises(TypeError, match="got the input twice"):
            layer(input=a, x=b)
        assert layer(x=b).shape == layer(b).shape == (5, 4)


def test_bad_layer_arguments_are_refused_clearly_and_early(monkeypatch):
    # num_cores="3" was compared with the 17-core limit ("'>' not supported"), a list bias read .shape, a meta
    # weight reached .item() in the finiteness check, and 18 cores were refused only after the whole TT-SVD
    for bad in ("3", None):
        with pytest.raises(TypeError, match="num_cores must be a positive integer"):
            MPOLinear(8, 8, num_cores=bad)
    assert len(MPOLinear(8, 8, num_cores=20, in_factors=(2, 4), out_factors=(2, 4)).cores) == 2  # (documented)
    with pytest.raises(TypeError, match=r"bias must be a tensor of shape \(8,\) or None, got a list"):
        MPOLinear.from_mpo(MPO.random(8, 8), bias=[0.0] * 8)
    with pytest.raises(ValueError, match="on the meta device"):
        MPOLinear.from_linear(nn.Linear(64, 32, device="meta"), max_bond=4)

    def no_tt_svd(*args, **kwargs):
        raise AssertionError("factored before the core count was checked")

    monkeypatch.setattr(MPO, "from_matrix", no_tt_svd)
    with pytest.raises(ValueError, match="at most 17 cores"):
        MPOLinear.from_linear(nn.Linear(2**10, 1), num_cores=18)
