"""Every candidate plan computes the same product; the cache and policies behave."""

import math

import pytest
import torch

from bondgate import MPO, MPOLinear, PlanPolicy, clear_plan_cache
from bondgate.planner import _build_candidates, get_plan, plan_cache_info, sweep_matrix, sweep_views


@pytest.mark.parametrize("shape,d,bond,rows", [((256, 256), 4, 8, 3), ((62, 777), 3, 5, 17), ((40, 24), 2, 3, 1),
                                               ((30, 20), 1, None, 4)])
def test_all_candidates_agree(shape, d, bond, rows):
    W = torch.randn(*shape, dtype=torch.float64)
    mpo = MPO.from_matrix(W, num_cores=d, max_bond=bond)
    x = torch.randn(rows, shape[1], dtype=torch.float64)
    ref = x @ mpo.to_matrix().T
    cands = _build_candidates(mpo.out_factors, mpo.in_factors, mpo.bond_dims, rows,
                              PlanPolicy(cache_dense=True), grad=False)
    names = {c.name for c in cands}
    if d >= 2:
        assert {"rebuild+gemm", "dense-cached"} <= names
    if d >= 3:
        assert any(n.endswith("/l2r") for n in names) and any(n.startswith("merge") for n in names)
    if d >= 2:
        assert {c.executor for c in cands if not c.dense} == {"aten", "tensordot", "sweep"}
        assert {"cores/sweep-l2r", "cores/sweep-r2l", "cores/sweep-l2r/cached"} <= names
    for c in cands:
        y = c.run(x, c.group_operands(mpo.cores, shape[0], shape[1]), shape[0])
        assert y.shape == (rows, shape[0])
        assert torch.allclose(y, ref, atol=1e-10), c.name


@pytest.mark.parametrize("reverse", [False, True])
def test_sweep_executor_trains_like_the_reference(reverse):
    # grad mode re-arranges the cores on each call; the gradients reach the cores and the input
    mpo = MPO.from_matrix(torch.randn(62, 777, dtype=torch.float64), num_cores=3, max_bond=6)
    plan = next(c for c in _build_candidates(mpo.out_factors, mpo.in_factors, mpo.bond_dims, 4,
                                             PlanPolicy(cache_dense=True), grad=True)
                if c.executor == "sweep" and c.reverse == reverse)
    assert not plan.cached
    cores = [c.clone().requires_grad_() for c in mpo.cores]
    x = torch.randn(4, 777, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *cs: plan.run(x, plan.group_operands(cs, 62, 777), 62),
                                    (x, *cores), eps=1e-6, atol=1e-6)


def test_memory_policy_screens_big_intermediates():
    cands = _build_candidates((4, 4, 8, 8), (8, 8, 4, 4), (32, 64, 32), 2048, PlanPolicy(cache_dense=False), False)
    limit = max(1024 * 1024, 4 * 2048 * 2048)
    # memory mode keeps nothing between calls but the cores' sweep layout (never a pre-contracted group)
    assert cands and all(c.peak_elements <= limit and (not c.cached or c.executor == "sweep") for c in cands)
    few_rows = _build_candidates((4, 4, 8, 8), (8, 8, 4, 4), (32, 64, 32), 2, PlanPolicy(cache_dense=False), False)
    assert any(c.cached and c.executor == "sweep" for c in few_rows)
    assert not any(c.cached for c in _build_candidates((4, 8), (8, 4), (8,), 4, PlanPolicy(), grad=True))


@pytest.mark.parametrize("reverse", [False, True])
def test_sweep_views_are_the_narrower_mpo(reverse):
    # a prefix of every bond, taken as views of the full-width sweep matrices, is the MPO with sliced cores
    W = torch.randn(62, 777, dtype=torch.float64)  # both sides padded to the factor products
    mpo = MPO.from_matrix(W, num_cores=3, max_bond=9)
    mats = [sweep_matrix(c, reverse) for c in (mpo.cores[::-1] if reverse else mpo.cores)]
    x = torch.randn(5, 777, dtype=torch.float64)
    for widths in [(1, 1), (3, 7), mpo.bond_dims]:
        w = [1, *widths, 1]
        sliced = MPO([c[: w[k], :, :, : w[k + 1]] for k, c in enumerate(mpo.cores)], 62, 777)
        plan = next(c for c in _build_candidates(mpo.out_factors, mpo.in_factors, widths, 5, PlanPolicy(), False)
                    if c.name == f"cores/sweep-{'r2l' if reverse else 'l2r'}/cached")
        views = sweep_views(mats, mpo.out_factors, mpo.in_factors, widths, reverse)
        assert all(v.data_ptr() == m.data_ptr() for v, m in zip(views, mats))  # no copies
        assert torch.allclose(plan.run(x, views, 62), x @ sliced.to_matrix().T, atol=1e-10)


def test_plans_are_cached_per_bucket_and_shared():
    clear_plan_cache()
    a = MPOLinear(128, 128, max_bond=8)
    b = MPOLinear(128, 128, max_bond=8)
    with torch.no_grad():
        a(torch.randn(5, 128))
        n = plan_cache_info()["plans"]
        b(torch.randn(6, 128))  # same bucket (4..7), same shape: no new plan
        assert plan_cache_info()["plans"] == n
        b(torch.randn(9, 128))
        assert plan_cache_info()["plans"] == n + 1
    p1 = get_plan(a.out_factors, a.in_factors, a.bond_dims, 5, torch.float32, torch.device("cpu"))
    assert p1 is get_plan(a.out_factors, a.in_factors, a.bond_dims, 7, torch.float32, torch.device("cpu"))


def test_flops_policy_is_deterministic_and_minimal():
    layer = MPOLinear(256, 256, max_bond=8, policy=PlanPolicy(select="flops"))
    p = layer.plan(64)
    assert p.time_us is None
    assert p.flops == layer.to_mpo().flops(64)


def test_speed_mode_picks_dense_for_big_batches_of_wide_bonds():
    # rank 64 on a 256x256 layer has more FLOPs than dense at any batch: the cached weight must win
    layer = MPOLinear(256, 256, max_bond=64, policy=PlanPolicy(cache_dense=True, select="flops"))
    assert layer.plan(512).name == "dense-cached"


def test_saved_plan_choices_make_a_reloaded_layer_bit_exact():
    layer = MPOLinear(96, 80, max_bond=6, num_cores=3)
    layer._pinned = {"cpu:float32:3:0": "rebuild+gemm|linear"}  # pretend the autotuner picked this in "another process"
    x = torch.randn(5, 96)
    with torch.no_grad():
        y = layer(x)
    spec = layer.spec()
    assert spec["plans"]["cpu:float32:3:0"] == "rebuild+gemm|linear"
    clear_plan_cache()
    twin = MPOLinear.from_spec(spec)
    twin.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(twin(x), y)
    assert twin.plan(5).id == "rebuild+gemm|linear"
    with pytest.raises(ValueError, match="plans"):
        MPOLinear.from_spec({**spec, "plans": {"3:0": 7}})


def test_pinned_plans_are_keyed_by_device_and_dtype():
    # Issue 18.8: a plan the autotuner chose for float32 on the CPU is no choice for float64, or for a GPU
    flops = PlanPolicy(select="flops")
    layer = MPOLinear(96, 80, max_bond=6, num_cores=3, policy=flops)
    unpinned = layer.plan(5).id
    assert unpinned != "rebuild+gemm|linear"  # at 5 rows the factored plans have fewer FLOPs
    layer._pinned = {"cpu:float32:3:0": "rebuild+gemm|linear"}
    assert layer.plan(5).id == "rebuild+gemm|linear"
    spec = layer.spec()
    twin64 = MPOLinear.from_spec({**spec, "dtype": "float64"})
    assert twin64._pinned == {"cpu:float32:3:0": "rebuild+gemm|linear"}  # kept for a float32 copy ...
    assert twin64.plan(5).id == unpinned  # ... but not used by this float64 one
    legacy = MPOLinear.from_spec({**spec, "plans": {"3:0": "rebuild+gemm|linear"}})  # format before the keys
    assert legacy._pinned == {"cpu:float32:3:0": "rebuild+gemm|linear"} and legacy.plan(5).id == "rebuild+gemm|linear"


def test_a_pinned_plan_is_the_same_path_whatever_rows_plan_it():
    # a reloaded layer plans its pinned id at the rows of its first call; built at those rows, "cores/optimal" could
    # take another contraction path than in the saving process (first call 7 rows vs 5: same bucket, other rounding)
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(torch.nn.Linear(96, 80), max_bond=8)
    args = (layer.out_factors, layer.in_factors, layer.bond_dims)
    ids = [c.id for c in _build_candidates(*args, 4, PlanPolicy(), False)]
    assert len(ids) > 3
    for pid in ids:
        clear_plan_cache()
        a = get_plan(*args, 5, torch.float32, torch.device("cpu"), prefer=pid)
        clear_plan_cache()
        b = get_plan(*args, 7, torch.float32, torch.device("cpu"), prefer=pid)
        assert a.id == b.id == pid and a.path == b.path and a.planned_rows == b.planned_rows == 4
    clear_plan_cache()


def test_layer_flops_count_the_rows_of_the_call_not_of_its_bucket():
    layer = MPOLinear.from_mpo(MPO.from_matrix(torch.randn(64, 64), num_cores=3, max_bond=8))
    plan = layer.plan(100)
    assert plan.planned_rows == 64 and layer.flops(64) == layer.plan(64).flops
    assert layer.flops(100) == plan.flops_at(100) > plan.flops  # 100 rows cost more than the 64 it was planned at
    for p in _build_candidates((4, 4, 4), (4, 4, 4), (8, 8), 64, PlanPolicy(), grad=False):
        # the x-independent part (merging cores) stays, the rest grows with the rows
        per_row = (p.flops_at(128) - p.flops) / 64
        assert per_row > 0 and p.flops_at(256) == p.flops + 192 * per_row, p.name


def test_speed_mode_keeps_the_dense_weight_unless_a_factored_plan_wins_by_the_margin():
    # factored plans a few percent faster in tuning ran slower in the model (MiniLM, 256 sentences: 1.08x dense)
    from types import SimpleNamespace

    from bondgate.planner import DENSE_MARGIN, fastest

    dense = SimpleNamespace(name="dense-cached", time_us=100.0)
    close = SimpleNamespace(name="merge01/optimal/cached", time_us=100.0 * (1 - DENSE_MARGIN) + 0.5)
    clear = SimpleNamespace(name="cores/optimal", time_us=90.0)
    assert fastest([dense, close]) is dense
    assert fastest([close, dense, clear]) is clear
    assert fastest([close, clear]) is clear  # memory mode: no dense weight to keep


@pytest.mark.parametrize("plan_id", ["rebuild+gemm|linear", "dense-cached|linear"])
def test_layer_flops_of_a_dense_plan_count_the_layers_own_size(plan_id):
    # a padded layer (62 -> 34 on legs 9x7 / 5x7) multiplies its dense weight cut to 34 x 62: the padded GEMM
    # (35 x 63) was counted, 4.6% over
    layer = MPOLinear.from_linear(torch.nn.Linear(62, 34), max_bond=4, num_cores=2, policy="speed")
    assert math.prod(layer.out_factors) * math.prod(layer.in_factors) > 34 * 62
    layer._pinned = {"cpu:float32:7:0": plan_id}  # 64 rows: bucket 7
    plan = layer.plan(64)
    assert plan.id == plan_id
    merge = 0 if plan.cached else plan.group_flops
    assert layer.flops(64) == 2 * 64 * 34 * 62 + merge
