"""Per-input bond gating: equivalence of the training and inference paths, budget, save/load, errors."""

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import bondgate
from bondgate import GatedMPOLinear, GatingConfig, MPOLinear, gate, gating_report, set_budget, set_mode
from bondgate.gating import PriceTracker, average_flops, width_error_curve
from bondgate.layer import TrackedParameter


def model_with_mpo(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 80))
    net[2] = MPOLinear.from_linear(net[2], max_bond=12, num_cores=3)
    return net


def gated_layer():
    net = gate(model_with_mpo(), GatingConfig(levels=(0.25, 0.5, 0.75, 1.0)))
    return net, net[2]


@pytest.mark.parametrize("executor", ["autotuned", "sweep-l2r", "sweep-r2l"])
@pytest.mark.parametrize("case", ["all_levels", "one_level", "empty_groups", "single_row"])
def test_grouped_inference_equals_training_forward(case, executor, monkeypatch):
    if executor != "autotuned":  # every level through the sweep: inference runs on views of one core copy
        from bondgate.planner import SPEED, _build_candidates

        def sweep_plan(out_f, in_f, ranks, rows, dtype, device, policy, grad):  # SPEED: not memory-screened
            return next(c for c in _build_candidates(tuple(out_f), tuple(in_f), tuple(ranks), rows, SPEED, grad)
                        if c.name == f"cores/{executor}")

        monkeypatch.setattr(bondgate.gating, "get_plan", sweep_plan)
    net, layer = gated_layer()
    rows = 1 if case == "single_row" else 37
    x = torch.randn(rows, 96)
    levels = {"all_levels": torch.arange(rows) % 4, "one_level": torch.full((rows,), 2),
              "empty_groups": torch.where(torch.arange(rows) % 3 == 0, 0, 3), "single_row": torch.tensor([1])}[case]
    layer.eval()
    with torch.no_grad():
        y_inf = layer(x, levels=levels)
    if executor != "autotuned":  # one copy of the cores in the sweep's layout, whatever the levels used (less a core
        # whose layout is the parameter itself: 10,368 of 11,328 bytes for r2l)
        assert 4 * layer.num_params - 4 * 12 * 5 * 4 <= layer.cache_nbytes <= 4 * layer.num_params
    layer.train()
    y_train = layer(x, levels=levels)
    torch.testing.assert_close(y_train.detach(), y_inf, rtol=1e-5, atol=1e-5)
    # and each row equals the product with its own sliced MPO
    for i in range(rows):
        w = layer.level_widths[int(levels[i])]
        ref = x[i] @ layer.to_mpo().slice_bonds(w).to_matrix().T + layer.bias
        torch.testing.assert_close(y_inf[i], ref, rtol=1e-4, atol=1e-4)


def test_gated_layer_built_under_inference_mode_runs_and_follows_edits():
    with torch.inference_mode():  # inference tensors: no version counters, so nothing cached is reused
        net, layer = gated_layer()
        layer.eval()
        x, lv = torch.randn(5, 96), torch.tensor([0, 1, 2, 3, 0])
        ref = torch.stack([x[i] @ layer.to_mpo().slice_bonds(layer.level_widths[int(lv[i])]).to_matrix().T
                           for i in range(5)]) + layer.bias
        torch.testing.assert_close(layer(x, levels=lv), ref, rtol=1e-4, atol=1e-4)
        layer.cores[0].mul_(2.0)
        torch.testing.assert_close(layer(x, levels=lv), 2 * (ref - layer.bias) + layer.bias, rtol=1e-4, atol=1e-4)


def test_full_width_row_equals_static_mpo():
    net, layer = gated_layer()
    static = model_with_mpo()[2]
    x = torch.randn(9, 96)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x, levels=torch.full((9,), 3)), static(x), rtol=1e-6, atol=1e-6)
        set_mode(net, "full")
        assert torch.equal(layer(x), static(x))


def test_nested_training_makes_every_prefix_good_and_monotone():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(96, 96), nn.Tanh(), nn.Linear(96, 80))
    student = copy.deepcopy(teacher)
    student[2] = MPOLinear.from_linear(student[2], max_bond=16, num_cores=3)
    gate(student, GatingConfig())
    set_mode(student, "nested")
    data = [torch.randn(128, 96) for _ in range(10)]
    held = torch.randn(512, 96)

    def errs():
        out = []
        with torch.no_grad():
            for lv in range(4):
                y = student[2](torch.tanh(student[0](held)), levels=torch.full((512,), lv))
                t = teacher[2](torch.tanh(teacher[0](held)))
                out.append(float((y - t).norm() / t.norm()))
        return out

    before = errs()
    bondgate.distill(student, teacher, data, loss=bondgate.DistillLoss(hidden=0, output=1.0), epochs=20, lr=2e-3,
                     progress=False)
    after = errs()
    assert all(a <= b + 1e-6 for a, b in zip(after[1:], after[:-1]))  # error falls with width
    assert after[0] < before[0] and after[1] < before[1]  # the thin prefixes learned
    curve = width_error_curve(student[2])
    assert curve[-1] < 1e-6 and all(a >= b - 1e-9 for a, b in zip(curve, curve[1:]))


def _three_layer_nested(seed=0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(96, 96), nn.Tanh(), nn.Linear(96, 96), nn.Tanh(), nn.Linear(96, 80))
    student = copy.deepcopy(teacher)
    for i in (0, 2, 4):
        student[i] = MPOLinear.from_linear(student[i], max_bond=8, num_cores=3)
    gate(student, GatingConfig())
    return teacher, set_mode(student, "nested")


@pytest.mark.parametrize("sandwich", [False, True])
def test_sandwich_keeps_the_full_width_trained(sandwich):
    # per-row random widths in every layer almost never train the whole model at full width
    teacher, student = _three_layer_nested()
    data = [torch.randn(128, 96) for _ in range(10)]
    bondgate.distill(student, teacher, data, loss=bondgate.DistillLoss(hidden=0, output=1.0), epochs=20, lr=2e-3,
                     progress=False, sandwich=sandwich)
    held = torch.randn(512, 96)
    err = {}
    with torch.no_grad():
        t = teacher(held)
        for mode in ("full", 0.5, 0.25):
            err[mode] = float((set_mode(student, mode)(held) - t).norm() / t.norm())
    assert err["full"] < err[0.5] < err[0.25]
    if sandwich:  # measured: 0.58 with the sandwich, 0.73 without (the 50% prefix: 0.87 vs 0.84)
        assert err["full"] < 0.65
    else:
        assert err["full"] > 0.68


def test_sandwich_needs_nested_layers_and_full_width_restores_modes():
    teacher, student = _three_layer_nested()
    set_mode(student, "gate")
    with pytest.raises(ValueError, match="sandwich=True needs gated layers in 'nested' mode"):
        bondgate.distill(student, teacher, [torch.randn(8, 96)], steps=1, progress=False, sandwich=True)
    set_mode(student, 0.5)
    with pytest.raises(RuntimeError, match="boom"), bondgate.gating.full_width(student):
        assert [student[i].mode for i in (0, 2, 4)] == ["full"] * 3
        raise RuntimeError("boom")
    assert [student[i].mode for i in (0, 2, 4)] == [0.5] * 3


def test_distillation_trainer_sandwich_adds_the_full_width_loss(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import TrainingArguments

    teacher, student = _three_layer_nested()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    loss = bondgate.DistillLoss(hidden=0, output=1.0)
    x = torch.randn(64, 96)
    plain = bondgate.DistillationTrainer(model=student, teacher=teacher, distill_loss=loss, args=args)
    sandwich = bondgate.DistillationTrainer(model=student, teacher=teacher, distill_loss=loss, args=args, sandwich=True)
    with torch.no_grad():
        torch.manual_seed(1)
        nested = float(plain.compute_loss(student, x))
        torch.manual_seed(1)
        both = float(sandwich.compute_loss(student, x))
        t = teacher(x)
        with bondgate.gating.full_width(student):
            full = float(loss(student(x), t)[0])
    assert full < nested and both == pytest.approx(nested + full, rel=1e-6)
    student.eval()  # the full-width pass is a training rule: evaluation's loss is the plain one
    with torch.no_grad():
        torch.manual_seed(1)
        alone = float(plain.compute_loss(student, x))
        torch.manual_seed(1)
        assert float(sandwich.compute_loss(student, x)) == alone
    set_mode(student, "full")
    with pytest.raises(ValueError, match="sandwich=True needs gated layers in 'nested' mode"):
        bondgate.DistillationTrainer(model=student, teacher=teacher, args=args, sandwich=True)


def _controller_student(penalty=5.0):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(96, 96), nn.Tanh(), nn.Linear(96, 80))
    student = copy.deepcopy(teacher)
    student[2] = MPOLinear.from_linear(student[2], max_bond=16, num_cores=3)
    gate(student, GatingConfig(budget=0.5, controller="linear", penalty=penalty))  # the Gumbel-trained probe
    set_mode(student, "gate")
    return teacher, student


def _expected_controller_cost(student, x):
    """The controller's expected relative cost on ``x`` (softmax of its scores over the levels' relative costs, plus
    the controller itself): what the budget penalty ``penalty * (expected - budget)^2`` pushes toward the budget."""
    layer = student[2]
    with torch.no_grad():
        probs = torch.softmax(layer.controller(torch.tanh(student[0](x))) / layer.temperature, -1)
        return float((probs * layer.rel_cost).sum(-1).mean() + layer.controller_cost / layer.full_cost)


def test_controller_training_and_budget_on_held_out_rows():
    teacher, student = _controller_student()
    # easy rows (small inputs) and hard rows (large inputs): the controller can tell them apart
    def batch(n):
        scale = torch.where(torch.rand(n, 1) < 0.5, 0.1, 3.0)
        return torch.randn(n, 96) * scale
    probe = torch.cat([batch(256) for _ in range(4)])
    assert _expected_controller_cost(student, probe) > 0.7  # untrained: far above the 0.5 budget
    res = bondgate.distill(student, teacher, [batch(128) for _ in range(10)],
                           loss=bondgate.DistillLoss(hidden=0, output=1.0), epochs=10, lr=3e-3, progress=False,
                           log_every=10)
    logs = [h["loss"] for h in res.history if "loss" in h]
    assert len(logs) == 10 and all("aux" in h for h in logs)  # the budget penalty is part of every step's loss
    assert logs[-1]["aux"] < 0.1 * logs[0]["aux"]
    # trained with the penalty, the controller's expected cost sits at the budget (measured 0.495; without the
    # penalty reaching the loss 0.91: the output loss alone pushes every row to the widest level)
    assert _expected_controller_cost(student, probe) == pytest.approx(0.5, abs=0.04)
    achieved = set_budget(student, 0.5, [batch(256) for _ in range(4)])
    assert achieved == pytest.approx(0.5, abs=0.05)
    student.eval()
    gating_report(student, reset=True)
    with torch.no_grad():
        for _ in range(4):
            student(batch(256))  # held-out rows
    assert average_flops(student) == pytest.approx(0.5, rel=0.05)
    rep = gating_report(student)[0]
    assert rep["rows"] == 1024 and abs(sum(rep["histogram"]) - 1) < 1e-9
    assert rep["controller_fraction"] < 0.05


def test_without_the_budget_penalty_the_controller_drifts_to_the_widest_levels():
    # the control for the test above: the same training with penalty=0 ends far above the budget, so the expected
    # cost near 0.5 there is the penalty's doing (and a penalty that never reaches the loss is caught)
    teacher, student = _controller_student(penalty=0.0)

    def batch(n):
        scale = torch.where(torch.rand(n, 1) < 0.5, 0.1, 3.0)
        return torch.randn(n, 96) * scale
    probe = torch.cat([batch(256) for _ in range(4)])
    res = bondgate.distill(student, teacher, [batch(128) for _ in range(10)],
                           loss=bondgate.DistillLoss(hidden=0, output=1.0), epochs=10, lr=3e-3, progress=False,
                           log_every=10)
    assert all(h["loss"].get("aux") == 0.0 for h in res.history if "loss" in h)  # reported, and zero
    assert _expected_controller_cost(student, probe) > 0.75


def _anisotropic_rows(n, gen, d=96):
    """Rows whose scale and direction vary: a few strong directions, log-normal norms."""
    basis = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(7)))[0]
    spectrum = torch.logspace(0, -1.5, d)
    z = torch.randn(n, d, generator=gen) * spectrum
    return (z @ basis.T) * torch.exp(torch.randn(n, 1, generator=gen))


def test_error_controller_predicts_errors_and_beats_static_truncation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Identity(), nn.Identity(), MPOLinear.from_linear(nn.Linear(96, 80), max_bond=16,
                                                                             num_cores=3))
    gate(net, GatingConfig(levels=(0.25, 0.5, 0.75, 1.0), controller="error", rank=8))
    layer = net[2]
    gen = torch.Generator().manual_seed(1)
    fit = bondgate.fit_controllers(net, [_anisotropic_rows(256, gen) for _ in range(8)])
    assert fit[0]["rows"] == 2048 and fit[0]["r2"][-1] == 1.0
    assert min(fit[0]["r2"][:-1]) > 0.9, fit  # per-row errors are predicted, not just their mean
    held = _anisotropic_rows(4096, gen)
    W = layer.weight_matrix().detach()
    for budget in (0.3, 0.5, 0.75):
        achieved = set_budget(net, budget, [_anisotropic_rows(512, gen) for _ in range(4)])
        assert achieved == pytest.approx(budget, abs=0.02)
        net.eval()
        gating_report(net, reset=True)
        with torch.no_grad():
            y = net(held)
        assert average_flops(net) == pytest.approx(budget, rel=0.05)  # held-out rows
        err_gated = float((y - layer.bias.detach() - held @ W.T).pow(2).sum())
        # static truncation with the same FLOPs on these rows (the FLOP cost is linear between widths)
        costs = [c / layer.full_cost for c in layer.level_cost]
        lo = max(i for i, c in enumerate(costs) if c <= average_flops(net))
        errs = [float((held @ (layer.to_mpo().slice_bonds(w).to_matrix() - W).T).pow(2).sum())
                for w in layer.level_widths]
        hi = min(lo + 1, len(costs) - 1)
        t = 0.0 if hi == lo else (average_flops(net) - costs[lo]) / (costs[hi] - costs[lo])
        err_static = (1 - t) * errs[lo] + t * errs[hi]  # best static mix of the two neighbouring widths
        assert err_gated < 0.9 * err_static, (budget, err_gated, err_static)


def test_controller_cost_is_small_for_a_real_layer():
    for kind in ("linear", "error"):
        layer = GatedMPOLinear.from_mpo_linear(MPOLinear.from_linear(nn.Linear(384, 1536), max_bond=48),
                                               GatingConfig(controller=kind))
        assert layer.controller_cost / layer.full_cost <= 0.05, kind
    assert layer.level_cost == sorted(layer.level_cost) and layer.level_cost[-1] == pytest.approx(layer.full_cost)


@pytest.mark.parametrize("mode", ["full", 0.5, "nested", "gate"])
def test_a_loaded_layer_trains_its_controller_only_where_set_mode_does(tmp_path, mode):
    """set_mode freezes a linear controller outside 'gate'; a loaded model in that mode had it trainable again (an
    optimizer, DDP's unused-parameter check and trainable-parameter counts saw parameters the mode never uses)."""
    net = gate(model_with_mpo(), GatingConfig(controller="linear"))
    set_mode(net, mode)
    want = [p.requires_grad for p in net[2].controller.parameters()]
    assert want and set(want) == {mode == "gate"}
    back = bondgate.load(bondgate.save(net, tmp_path / "g"))
    assert [p.requires_grad for p in back[2].controller.parameters()] == want
    assert all(p.requires_grad for n, p in back.named_parameters() if "controller" not in n)


@pytest.mark.parametrize("kind", ["linear", "error"])
def test_save_load_reproduces_decisions_and_outputs(tmp_path, kind):
    net = gate(model_with_mpo(), GatingConfig(levels=(0.25, 0.5, 0.75, 1.0), controller=kind))
    layer = net[2]
    with torch.no_grad():
        layer.controller.proj.weight.normal_()
    set_budget(net, 0.6, [torch.randn(64, 96)])
    net.eval()
    x = torch.randn(50, 96)
    with torch.no_grad():
        h = torch.relu(net[0](x))
        lv = layer.decide(h)
        y = net(x)
    assert len(set(lv.tolist())) > 1
    bondgate.save(net, tmp_path / "g")
    back = bondgate.load(tmp_path / "g")
    assert isinstance(back[2], GatedMPOLinear) and back[2].controller_kind == kind
    with torch.no_grad():
        assert torch.equal(back[2].decide(torch.relu(back[0](x))), lv)
        assert torch.equal(back(x), y)
        # one-row calls take the one-level path (no routing tensors): the same level as decide, the same output
        for row in h[:10].split(1):
            assert layer._one_level(row) == int(layer.decide(row)[0])
            assert torch.equal(layer(row), layer(row, levels=layer.decide(row)))
    with torch.inference_mode():  # loaded in inference mode, as a server may: normal tensors all the same
        frozen = bondgate.load(tmp_path / "g")
        assert not any(t.is_inference() for t in [*frozen.parameters(), *frozen.buffers()])
        assert torch.equal(frozen(x), y) and torch.equal(frozen(x[:1]), back(x[:1]))
        copied = copy.deepcopy(frozen)  # a copy made here holds inference tensors: no version counters
        assert torch.equal(copied(x), y) and torch.equal(copied(x[:1]), back(x[:1]))
    # used outside inference mode, the copy's buffers (inference tensors) are replaced before being written
    assert gating_report(copied, reset=True)[0]["rows"] > 0 and gating_report(copied)[0]["rows"] == 0
    assert set_budget(copied, 0.3, [torch.randn(64, 96)]) == pytest.approx(0.3, abs=0.05)
    with torch.no_grad():
        assert copied(x).shape == y.shape and gating_report(copied)[0]["rows"] == 50


@pytest.mark.parametrize("rank_form", [False, True])
@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickled_model_keeps_its_operands_between_calls(rank_form, legacy, monkeypatch):
    """torch.save of a whole model (pickle): the parameters come back tracked, so the operands a layer keeps
    between inference calls are reused (with plain parameters every call rebuilt them: a gated decode step 8x
    slower). ``legacy``: a file written when TrackedParameter still pickled as a plain parameter."""
    net = model_with_mpo()
    if rank_form:
        net[2] = bondgate.LowRankLinear.from_linear(nn.Linear(96, 80), rank=24).to_mpo_linear()
    net = gate(net, GatingConfig(levels=(0.25, 0.5, 0.75, 1.0), controller="error")).eval()
    set_budget(net, 0.5, [torch.randn(64, 96)])
    buf = io.BytesIO()
    with monkeypatch.context() as m:
        if legacy:
            m.setattr(TrackedParameter, "__reduce_ex__", nn.Parameter.__reduce_ex__)
        torch.save(net, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    layer = back[2]
    assert all(type(p) is TrackedParameter for p in layer.parameters())
    x = torch.randn(1, 96)
    with torch.inference_mode():
        assert torch.equal(back(x), net(x))
        before = {k: id(v[1]) for k, v in layer._slices.items()}
        assert before
        back(x)
        assert {k: id(v[1]) for k, v in layer._slices.items()} == before
    with torch.no_grad():
        layer.cores[0].mul_(2.0)  # a write after loading is still seen
    with torch.inference_mode():
        assert not torch.equal(back(x), net(x))


def test_fit_controllers_gives_the_same_fit_in_any_grad_mode():
    fits = []
    for ambient in (torch.enable_grad, torch.no_grad, torch.inference_mode):  # the model objective needs autograd
        net = gate(model_with_mpo(), GatingConfig(controller="error")).eval()
        data = [torch.randn(64, 96, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        with ambient():
            bondgate.fit_controllers(net, data, objective="model", loss=lambda out, batch: out.pow(2).mean())
        fits.append(net[2].controller.coef.detach().clone())
    assert all(torch.allclose(fits[0], f) for f in fits[1:]) and fits[0].abs().sum() > 0


def test_calibration_passes_stay_out_of_the_report():
    net = gate(model_with_mpo(), GatingConfig(controller="error")).eval()
    bondgate.fit_controllers(net, [torch.randn(64, 96)])
    set_budget(net, 0.4, [torch.randn(64, 96)], rounds=3)  # three forward passes over 64 rows
    assert gating_report(net)[0]["rows"] == 0 and net[2].record
    with torch.no_grad():
        net(torch.randn(10, 96))
    assert gating_report(net)[0]["rows"] == 10


@pytest.mark.parametrize("kind", ["error", "linear"])
def test_one_row_host_decision_matches_the_torch_objective(kind):
    """One-row CPU calls decide in numpy (_host_level): the same level as the torch objective, re-read
    whenever the price or the controller changes, and not used where it does not apply."""
    net = gate(model_with_mpo(), GatingConfig(levels=(0.125, 0.25, 0.5, 0.75, 1.0), controller=kind))
    layer = net[2]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.controller.proj.weight.normal_(generator=gen)
        second = layer.controller.coef if kind == "error" else layer.controller.proj.bias
        second.uniform_(0.0, 0.01 if kind == "error" else 1.0, generator=gen)
    net.eval()

    def agree(lay, rows):
        picks = [lay._host_level(r) for r in rows.split(1)]
        assert picks == [int(lay._objective(r).argmin()) for r in rows.split(1)]
        return picks

    rows = torch.randn(300, 96, generator=gen) * torch.rand(300, 1, generator=gen) * 3
    seen = []
    for budget in (0.3, 0.7):  # set_budget re-prices in place: the host copy of the price follows
        set_budget(net, budget, [torch.relu(net[0](torch.randn(128, 96, generator=gen)))])
        with torch.no_grad():
            seen.append(agree(layer, rows))
        assert len(set(seen[-1])) > 2, seen[-1]
    assert seen[0] != seen[1]
    with torch.no_grad():
        before = agree(layer, rows)
        second.mul_(3.0)  # an in-place edit of the controller
        assert agree(layer, rows) != before
        layer.controller.proj.weight = nn.Parameter(layer.controller.proj.weight * -1.0)  # a new parameter
        assert agree(layer, rows) != before
        agree(copy.deepcopy(layer).double(), rows.double())
        # the layer's own one-row forward uses it: the same output as routing the row explicitly
        for row in rows[:20].split(1):
            assert torch.equal(layer(row), layer(row, levels=layer.decide(row)))
        assert layer._host_level(rows[:1].bfloat16()) is None
    set_budget(net, 0.5, [torch.relu(net[0](torch.randn(128, 96, generator=gen)))], track=0.5)
    with torch.no_grad():  # the online tracker moves the price every call: the host price follows it
        prices = set()
        for r in rows[:30].split(1):
            net(torch.randn(1, 96, generator=gen))
            prices.add(float(layer.budget_lambda))
            h = torch.relu(net[0](r))
            assert layer._host_level(h) == int(layer._objective(h).argmin())
        assert len(prices) > 10
    with torch.inference_mode():  # a copy made here has no version counters: the torch path decides
        frozen = copy.deepcopy(layer)
        assert frozen._host_level(rows[:1]) is None
        for r in (rows[:1], rows[:7]):
            assert torch.equal(frozen(r), layer(r))


@pytest.mark.parametrize("kw,match", [({"budget": 0.0}, "budget"), ({"budget": 1.5}, "budget"),
                                      ({"levels": ()}, "empty"), ({"levels": (0.5, 0.25, 1.0)}, "increasing"),
                                      ({"levels": (0.5, 0.5)}, "increasing"), ({"levels": (0.0, 1.0)}, r"\(0, 1\]"),
                                      ({"controller": "mlp"}, "controller"), ({"rank": 0}, "rank")])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        GatingConfig(**kw)


@pytest.mark.parametrize("kind", ["linear", "error"])
def test_no_rows_and_bad_calibration_data(kind):
    net = gate(model_with_mpo(), GatingConfig(controller=kind))
    layer = net[2]
    with pytest.raises(ValueError, match="no input rows"):
        set_budget(net, 0.5, [])
    nan = torch.randn(16, 96)
    nan[3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite controller scores"):
        set_budget(net, 0.5, [nan])
    if kind == "error":
        with pytest.raises(ValueError, match="non-finite inputs"):
            bondgate.fit_controllers(net, [nan])
    set_budget(net, 0.5, [torch.randn(64, 96)])
    for training in (False, True):
        net.train(training)
        for mode in ("gate", "nested", "full", 0.5):
            bondgate.set_mode(net, mode)
            for max_groups in (None, 1, 2):
                layer.max_groups = max_groups
                y = net(torch.randn(0, 96))
                assert y.shape == (0, 80)
    net.eval()
    bondgate.set_mode(net, "gate")
    assert layer(torch.randn(2, 0, 96), levels=torch.zeros(0, dtype=torch.long)).shape == (2, 0, 80)
    with pytest.raises(ValueError, match="levels must be 0 indices"):
        layer(torch.randn(0, 96), levels=torch.zeros(3, dtype=torch.long))
    for bad in (0.0, 1.5, True, "fast"):
        with pytest.raises(ValueError, match="mode"):
            bondgate.set_mode(net, bad)


def test_one_level_is_refused_and_levels_of_one_width_are_named():
    """``levels=(1.0,)`` gated (a controller for nothing; set_budget then warned of unfitted controllers and an
    unreachable budget); levels that round to the same widths on narrow bonds were accepted in silence."""
    one = nn.Sequential(MPOLinear.from_linear(nn.Linear(64, 64), max_bond=8, num_cores=2))
    with pytest.raises(ValueError, match=r"at least two levels.*set_mode\(model, 0.5\)"):
        gate(one, GatingConfig(levels=(0.5,)))
    # a checkpoint saved with one level (gate took it before) still loads: GatingConfig itself takes one level
    assert GatingConfig(levels=(0.5,)).levels == (0.5,)
    net = nn.Sequential(MPOLinear.from_linear(nn.Linear(64, 64), max_bond=2, num_cores=3))
    with pytest.warns(UserWarning, match=r"same bond widths on 1 layer\(s\) \(0 \(bonds \(2, 2\)\)\)"):
        gate(net, GatingConfig(levels=(0.01, 0.02, 1.0)))
    assert net[0].level_widths == [(1, 1), (1, 1), (2, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gate(nn.Sequential(MPOLinear.from_linear(nn.Linear(64, 64), max_bond=8, num_cores=3)), GatingConfig())


def test_a_new_cost_rows_restarts_the_level_counts():
    """set_budget(cost_rows=32) kept the counts of rows served at cost_rows=1 and re-priced them: average_flops of
    the same 512 rows went 0.504 -> 0.722 with no new call. Those counts restart; same cost_rows: kept."""
    net, data = _error_gated()
    set_budget(net, 0.5, data)
    net.eval()
    with torch.no_grad():
        for x in data:
            net(x)
    before = average_flops(net)
    set_budget(net, 0.5, data)  # the same cost_rows: the counts stay
    assert average_flops(net) == before and gating_report(net)[0]["rows"] == 4 * 64
    with warnings.catch_warnings():  # a call that raises at its end (here a warning as an error) keeps them too
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="out of reach"):
            set_budget(net, 0.01, data, cost_rows=64)
    assert gating_report(net)[0]["rows"] == 4 * 64 and net[2].cost_rows == 1 and average_flops(net) == before
    set_budget(net, 0.5, data, cost_rows=32)
    assert gating_report(net)[0]["rows"] == 0 and math.isnan(average_flops(net))
    with torch.no_grad():
        for x in data:
            net(x)
    assert gating_report(net)[0]["rows"] == 4 * 64 and 0 < average_flops(net) <= 1.0


def test_a_mode_assigned_directly_is_checked_as_set_mode_checks_it(tmp_path):
    """``layer.mode = 1`` routed rows by the controller (an int is neither a fraction nor a name; saved as 1, loaded
    as 1.0: the loaded model ran full width, 0.6 off), and ``"Full"`` saved a checkpoint load refused."""
    net = gate(model_with_mpo(), GatingConfig(controller="error"))
    layer = net[2]
    layer.mode = 1
    assert layer.mode == 1.0 and isinstance(layer.mode, float)
    net.eval()
    x = torch.randn(16, 96)
    with torch.no_grad():
        y = net(x)
        set_mode(net, "full")
        assert torch.equal(y, net(x))
        layer.mode = 1
        back = bondgate.load(bondgate.save(net, tmp_path / "m"))
        assert back[2].mode == 1.0 and torch.equal(back(x), y)
    for bad in ("Full", 0, 2, True, None):
        with pytest.raises((ValueError, TypeError), match="mode"):
            layer.mode = bad
    assert layer.mode == 1.0  # a refused assignment leaves it as it was


@pytest.mark.parametrize("rows", [3, 100])
def test_data_of_the_wrong_width_is_refused_by_the_layer_not_a_reshape(rows):
    # 3 x 47 is no multiple of 48: the capture hooks' reshape raised "shape '[-1, 48]' is invalid for input of size
    # 141" before the layer could name the batch and the width it expects (as it did for 100 x 24)
    torch.manual_seed(0)
    net = gate(nn.Sequential(MPOLinear.from_linear(nn.Linear(48, 40), max_bond=8), nn.Tanh()),
               GatingConfig(controller="error"))
    bad = [torch.randn(rows, 47 if rows == 3 else 24)]
    for call in (lambda: bondgate.fit_controllers(net, bad), lambda: set_budget(net, 0.5, bad)):
        with pytest.raises(ValueError, match=r"calibration batch 0 .*expected input with last dimension 48"):
            call()


def test_set_budget_warns_about_gated_layers_the_data_does_not_reach():
    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = MPOLinear.from_linear(nn.Linear(96, 80), max_bond=8, num_cores=3)
            self.unused = MPOLinear.from_linear(nn.Linear(96, 80), max_bond=8, num_cores=3)

        def forward(self, x):
            return self.used(x)

    net = gate(TwoPaths(), GatingConfig(controller="error"))
    with pytest.warns(UserWarning, match=r"1 gated layer\(s\) saw no rows and keep their price: \['unused'\]"):
        set_budget(net, 0.5, [torch.randn(32, 96)])
    assert float(net.unused.budget_lambda) == 0.0 and float(net.used.budget_lambda) != 0.0


def test_gating_needs_mpo_layers():
    with pytest.raises(ValueError, match="no MPO or low-rank layers"):
        gate(nn.Sequential(nn.Linear(4, 4)), GatingConfig())
    with pytest.raises(ValueError, match="no gated layers"):
        set_budget(nn.Sequential(nn.Linear(4, 4)), 0.5, [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="controller='error'"):
        bondgate.fit_controllers(gate(model_with_mpo(), GatingConfig()), [torch.randn(2, 96)])
    net, layer = gated_layer()
    with pytest.raises(ValueError, match="rounds"):
        set_budget(net, 0.5, [torch.randn(2, 96)], rounds=0)
    with pytest.raises(ValueError, match="levels must be"):
        layer(torch.randn(3, 96), levels=torch.tensor([0, 1, 7]))


def test_regating_swaps_the_controller_and_keeps_the_cores():
    net = gate(model_with_mpo(), GatingConfig(controller="linear"))
    cores = [c.detach().clone() for c in net[2].cores]
    x = torch.randn(7, 96)
    set_mode(net, "full")
    with torch.no_grad():
        before = net(x)
    gate(net, GatingConfig(controller="error", levels=(0.5, 1.0)))
    assert isinstance(net[2], GatedMPOLinear) and net[2].controller_kind == "error" and net[2].levels == (0.5, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(cores, net[2].cores))
    set_mode(net, "full")
    with torch.no_grad():
        torch.testing.assert_close(net(x), before)


class _TwoBranches(nn.Module):
    """Two MPO layers on the same input; the first one's output counts 30x more in the model output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = MPOLinear.from_linear(nn.Linear(96, 80), max_bond=16, num_cores=3)
        self.b = MPOLinear.from_linear(nn.Linear(96, 80), max_bond=16, num_cores=3)

    def forward(self, x):
        return torch.cat([30.0 * self.a(x), self.b(x)], -1)


def test_output_sensitivity_is_the_squared_gradient_per_channel():
    from bondgate.calibration import output_sensitivity

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 5, bias=False))
    net[0].weight.requires_grad_(False)
    c = torch.randn(5)
    s = output_sensitivity(net, {"0": net[0]}, [torch.randn(7, 12), torch.randn(3, 12)],
                           loss=lambda out, batch: (out * c).sum())
    expect = (net[1].weight.detach().T @ c).double().pow(2)  # d(c . A y)/dy = A^T c for every row
    torch.testing.assert_close(s["0"], expect, rtol=1e-6, atol=1e-12)
    assert net[0].weight.grad is None and net[1].weight.grad is None and not net[0].weight.requires_grad
    # random probes of the output: E = diag(A^T A) / dim(f) on average
    probe = output_sensitivity(net, {"0": net[0]}, [torch.randn(64, 12)] * 8, probes=64)["0"]
    A = net[1].weight.detach().double()
    gn = (A * A).sum(0) / (64 * 5)
    assert float((probe / gn).mean()) == pytest.approx(1.0, rel=0.15)


def test_model_objective_spends_flops_where_the_model_output_is_sensitive():
    gen = torch.Generator().manual_seed(1)
    calib = [_anisotropic_rows(256, gen) for _ in range(4)]
    held = _anisotropic_rows(2048, gen)
    with torch.no_grad():
        ref = _TwoBranches()(held)
    errs, widths = {}, {}
    for objective in ("layer", "model"):
        net = gate(_TwoBranches(), GatingConfig(controller="error", levels=tuple(i / 8 for i in range(1, 9))))
        fit = bondgate.fit_controllers(net, calib, objective=objective)
        assert min(min(f["r2"][:-1]) for f in fit) > 0.8, fit
        set_budget(net, 0.5, calib)
        net.eval()
        gating_report(net, reset=True)
        with torch.no_grad():
            errs[objective] = float((net(held) - ref).pow(2).sum())
        assert average_flops(net) == pytest.approx(0.5, rel=0.05)
        widths[objective] = [sum(h * v for h, v in zip(r["histogram"], r["levels"])) for r in gating_report(net)]
    # the layer objective treats both layers alike; the model objective widens the 30x-amplified one
    assert widths["model"][0] > widths["layer"][0] + 0.1 and widths["model"][1] < widths["layer"][1]
    assert errs["model"] < 0.7 * errs["layer"], errs


def test_fit_controllers_bad_objective():
    net = gate(model_with_mpo(), GatingConfig(controller="error"))
    with pytest.raises(ValueError, match="objective"):
        bondgate.fit_controllers(net, [torch.randn(4, 96)], objective="task")
    with pytest.raises(ValueError, match="loss"):
        bondgate.fit_controllers(net, [torch.randn(4, 96)], loss=lambda out, batch: out.sum())


def test_level_counts_cover_single_rows_batches_and_checkpoints():
    net, layer = gated_layer()
    set_budget(net, 0.5, [torch.randn(64, 96)])
    net.eval()
    gating_report(net, reset=True)
    with torch.no_grad():
        for _ in range(5):
            net(torch.randn(1, 96))  # the one-row path counts in Python
        net(torch.randn(7, 96))
    assert float(layer.state_dict()["level_counts"].sum()) == 12  # pending counts reach the checkpoint
    with torch.no_grad():
        net(torch.randn(1, 96))
    assert gating_report(net)[0]["rows"] == 13


def test_route_with_max_groups_is_the_best_subset_of_levels():
    import itertools

    from bondgate.gating import route

    gen = torch.Generator().manual_seed(0)
    obj = torch.rand(40, 6, generator=gen, dtype=torch.float64)
    assert torch.equal(route(obj), obj.argmin(-1))
    for k in (1, 2, 3):
        lv = route(obj, max_groups=k)
        assert len(set(lv.tolist())) <= k
        total = float(obj.gather(1, lv[:, None]).sum())
        brute = min(float(obj[:, list(s)].min(-1).values.sum()) for s in itertools.combinations(range(6), k))
        assert total == pytest.approx(brute, rel=1e-12)
        assert total >= float(obj.min(-1).values.sum())  # the limit can only cost objective
    assert torch.equal(route(obj[:2], max_groups=2), obj[:2].argmin(-1))  # fewer rows than groups: free


def test_route_searches_beyond_the_enumeration_limit():
    """16 levels and max_groups=8 (12,870 subsets: enumerating them took ~15 ms a 32-row call): a swap search instead,
    at most k levels, within 2% of the best subset's total on these objectives (error falling with the level, a
    price rising with it) and never worse than the k levels best on their own; at most EXACT_SUBSETS: exact."""
    import itertools

    from bondgate.gating import EXACT_SUBSETS, _subsets, _total, route

    assert math.comb(16, 4) <= EXACT_SUBSETS < math.comb(16, 8)
    gen = torch.Generator().manual_seed(4)
    lv = torch.linspace(1 / 16, 1, 16, dtype=torch.float64)
    gaps = []
    for trial in range(12):
        scale = torch.rand(48, 1, generator=gen, dtype=torch.float64) * 3
        noise = torch.rand(48, 16, generator=gen, dtype=torch.float64) * 0.2 + 0.9
        obj = scale * (1 - lv) ** 2 * noise + 0.5 * lv
        obj[trial % 48] = float("nan")  # a NaN row (a NaN input): left out of the totals, as the exact search does
        k = (5, 6, 8)[trial % 3]
        got = route(obj, max_groups=k)
        assert len(set(got.tolist())) <= k and got.shape == (48,)
        fin = obj.nan_to_num(0.0)
        total = float(fin.gather(1, got[:, None]).sum())
        subsets = _subsets(16, k)
        best = float(fin[:, subsets].amin(-1).sum(0).min())
        top = fin.sum(0).topk(k, largest=False).indices
        assert best * (1 - 1e-12) <= total <= float(fin[:, top].amin(1).sum()) * (1 + 1e-12)
        gaps.append(total / best - 1)
    assert max(gaps) < 0.02 and sorted(gaps)[len(gaps) // 2] < 1e-9, gaps  # mostly the best subset itself
    # entries that overflowed (inf at some levels of a row) cost that row, not nothing: the search stays near the best
    obj = torch.rand(32, 16, generator=gen, dtype=torch.float64)
    obj[torch.rand(32, 16, generator=gen) < 0.05] = math.inf
    got = route(obj, max_groups=8)
    cost = obj.gather(1, got[:, None])
    best = float(_total(obj[:, _subsets(16, 8)].amin(-1)).min())
    assert bool(torch.isfinite(cost).all()) and float(cost.sum()) <= best * 1.1  # (13% over on average before)
    small = torch.rand(40, 8, generator=gen, dtype=torch.float64)  # C(8, 4) = 70: the exact enumeration
    total = float(small.gather(1, route(small, max_groups=4)[:, None]).sum())
    assert total == pytest.approx(min(float(small[:, list(c)].min(-1).values.sum())
                                      for c in itertools.combinations(range(8), 4)), rel=1e-12)


@pytest.mark.parametrize("kind", ["linear", "error"])
def test_max_groups_limits_levels_per_call_and_keeps_the_budget(tmp_path, kind):
    gen = torch.Generator().manual_seed(2)
    net = nn.Sequential(nn.Identity(), nn.Identity(), MPOLinear.from_linear(nn.Linear(96, 80), max_bond=16,
                                                                             num_cores=3))
    gate(net, GatingConfig(levels=tuple(i / 8 for i in range(1, 9)), controller=kind))
    layer = net[2]
    if kind == "error":
        bondgate.fit_controllers(net, [_anisotropic_rows(256, gen) for _ in range(4)])
    else:
        with torch.no_grad():
            layer.controller.proj.weight.normal_(generator=gen)
    calib = [_anisotropic_rows(32, gen) for _ in range(128)]  # the budget is met per call: many calls
    held = [_anisotropic_rows(32, gen) for _ in range(128)]
    achieved = set_budget(net, 0.5, calib, max_groups=2)
    assert layer.max_groups == 2 and achieved == pytest.approx(0.5, abs=0.03)
    net.eval()
    gating_report(net, reset=True)
    with torch.no_grad():
        for x in held:
            lv = layer.decide(x)
            assert len(set(lv.tolist())) <= 2
            torch.testing.assert_close(net(x), layer(x, levels=lv))  # forward runs exactly these decisions
    if kind == "error":  # held-out calls of the same size (a random linear probe's per-call picks are too lumpy)
        assert average_flops(net) == pytest.approx(0.5, rel=0.05)
    bondgate.save(net, tmp_path / "g")
    loaded = bondgate.load(tmp_path / "g")
    assert loaded[2].max_groups == 2
    with torch.no_grad():
        assert torch.equal(loaded[2].decide(held[0]), layer.decide(held[0]))
    set_budget(net, 0.5, calib, max_groups=1)  # one level per call: the forward skips the grouping
    gating_report(net, reset=True)
    with torch.no_grad():
        for x in held[:8]:
            lv = layer.decide(x)
            assert len(set(lv.tolist())) == 1 and lv.shape == (32,)
            torch.testing.assert_close(net(x), layer(x, levels=lv))
    assert gating_report(net)[0]["rows"] == 8 * 32
    set_budget(net, 0.5, calib)  # no limit unless asked again
    assert layer.max_groups is None
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_groups"):
            set_budget(net, 0.5, calib, max_groups=bad)


def _cheapest_contraction(out_f, in_f, widths, rows):
    """FLOPs (2 per multiply-add) of the cheapest order of pairwise contractions of the input ``(rows, in legs)`` and
    the MPO's cores, by brute force over every order: an independent count of what the cheapest plan costs."""
    import itertools
    import math

    d, r = len(out_f), [1, *widths, 1]
    size = {"b": rows}
    tensors = [frozenset({"b", *(f"i{k}" for k in range(d))})]
    for k in range(d):
        size[f"o{k}"], size[f"i{k}"], size[f"r{k}"], size[f"r{k + 1}"] = out_f[k], in_f[k], r[k], r[k + 1]
        tensors.append(frozenset({f"o{k}", f"i{k}"} | {f"r{j}" for j in (k, k + 1) if 0 < j < d}))
    final = {"b", *(f"o{k}" for k in range(d))}

    def best(ts):
        if len(ts) == 1:
            return 0
        out = math.inf
        for a, b in itertools.combinations(range(len(ts)), 2):
            rest = [t for j, t in enumerate(ts) if j not in (a, b)]
            keep = set(final).union(*rest)
            union = ts[a] | ts[b]
            out = min(out, 2 * math.prod(size[i] for i in union) + best([*rest, frozenset(union & keep)]))
        return out

    return best(tensors)


def test_cost_rows_prices_levels_at_the_call_size_and_keeps_the_budget(tmp_path):
    gen = torch.Generator().manual_seed(3)
    net = nn.Sequential(MPOLinear.from_linear(nn.Linear(96, 80), max_bond=16, num_cores=3))
    gate(net, GatingConfig(levels=tuple(i / 8 for i in range(1, 9)), controller="error"))
    layer = net[0]
    bondgate.fit_controllers(net, [_anisotropic_rows(256, gen) for _ in range(4)])
    one_row, one_row_cost = layer.rel_cost.clone(), list(layer.level_cost)
    calib = [_anisotropic_rows(64, gen) for _ in range(64)]
    held = [_anisotropic_rows(64, gen) for _ in range(64)]
    achieved = set_budget(net, 0.5, calib, cost_rows=64, max_groups=1)
    assert layer.cost_rows == 64 and achieved == pytest.approx(0.5, abs=0.03)
    # a level's cost is the cheapest plan for a 64-row call, per row: the cheapest order of pairwise contractions of
    # the input and the three cores, by brute force (at one row it is the left-to-right sweep, written out below)
    assert (layer.out_factors, layer.in_factors) == ((4, 4, 5), (6, 4, 4))
    for w, c, c1 in zip(layer.level_widths, layer.level_cost, one_row_cost):
        assert c == pytest.approx(_cheapest_contraction(layer.out_factors, layer.in_factors, w, 64) / 64)
        r1, r2 = w  # the sweep: core 1 on (6 | 4 4) inputs, core 2 on (r1 4 | 4) with 4 outputs done, core 3
        assert c1 == 2 * (r1 * 4 * 6 * 16 + r2 * 4 * (r1 * 4) * 4 * 4 + 5 * (r2 * 4) * 16)
    # e.g. (4, 4) at 64 rows: merge cores 2 and 3 (10240), contract the input with core 1 (196608), then with the
    # merged pair (655360), 862208 in all: less than 64 sweeps (64 * 13824)
    assert layer.level_cost[1] == 862208 / 64
    # merged plans amortize over the rows: thin levels save less of the full width's cost than at one row
    assert torch.all(layer.rel_cost[:-1] > one_row[:-1]) and float(layer.rel_cost[-1]) == 1.0
    net.eval()
    gating_report(net, reset=True)
    with torch.no_grad():
        for x in held:
            net(x)
    report = gating_report(net)[0]
    assert report["cost_rows"] == 64
    assert average_flops(net) == pytest.approx(0.5, rel=0.05)  # counted at the same call size
    bondgate.save(net, tmp_path / "g")
    loaded = bondgate.load(tmp_path / "g")
    assert loaded[0].cost_rows == 64 and torch.equal(loaded[0].rel_cost, layer.rel_cost)
    with torch.no_grad():
        assert torch.equal(loaded[0].decide(held[0]), layer.decide(held[0]))
    set_budget(net, 0.5, calib)  # back to one-row costs unless asked again
    assert layer.cost_rows == 1 and torch.equal(layer.rel_cost, one_row)
    with pytest.warns(UserWarning, match="calibration calls have 64 rows"):  # priced for calls of another size
        set_budget(net, 0.5, calib, cost_rows=256)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="cost_rows"):
            set_budget(net, 0.5, calib, cost_rows=bad)


def _shifted_setup(per_layer):
    """Two error-gated layers priced on calibration rows; held-out rows are 3x larger, so every
    predicted error is 9x larger and a fixed price buys wider levels than the budget."""
    net = gate(_TwoBranches(), GatingConfig(controller="error", levels=tuple(i / 8 for i in range(1, 9))))
    gen = torch.Generator().manual_seed(5)
    calib = [_anisotropic_rows(256, gen) for _ in range(4)]
    bondgate.fit_controllers(net, calib, objective="model")
    stream = [3.0 * _anisotropic_rows(32, gen) for _ in range(80)]
    return net, calib, stream


def _stream_flops(net, stream):
    net.eval()
    gating_report(net, reset=True)
    with torch.no_grad():
        for x in stream:
            net(x)
    return average_flops(net)


@pytest.mark.parametrize("per_layer", [False, True])
def test_price_tracking_holds_the_budget_on_shifted_inputs(per_layer):
    net, calib, stream = _shifted_setup(per_layer)
    assert set_budget(net, 0.5, calib, per_layer=per_layer) == pytest.approx(0.5, abs=0.02)
    fixed = _stream_flops(net, stream)
    assert fixed > 0.5 * 1.1, fixed  # the shift: a fixed price misses the budget
    lam0 = [float(m.budget_lambda) for m in (net.a, net.b)]
    # a fast gain: this stream is stationary (on real ones ~0.05, see set_budget)
    assert set_budget(net, 0.5, calib, per_layer=per_layer, track=0.5) == pytest.approx(0.5, abs=0.02)
    assert [float(m.budget_lambda) for m in (net.a, net.b)] == lam0  # calibration ran at fixed prices
    _stream_flops(net, stream[:40])  # the price settles (the excess spent meanwhile is ~log(price ratio) / track)
    tracked = _stream_flops(net, stream[40:])
    assert tracked == pytest.approx(0.5, rel=0.03), (fixed, tracked)
    lam = [float(m.budget_lambda) for m in (net.a, net.b)]
    assert all(b > a for a, b in zip(lam0, lam))  # the price rose to pay for the harder rows
    assert [r["track"] for r in gating_report(net)] == [0.5, 0.5]
    assert [r["lambda"] for r in gating_report(net)] == lam
    if not per_layer:
        assert lam[0] == lam[1] and net.a._tracker is net.b._tracker  # one shared price
    else:
        assert net.a._tracker is not net.b._tracker
        for r in gating_report(net):  # each layer meets the budget by itself
            assert r["avg_flops_fraction"] == pytest.approx(0.5, rel=0.05)
    set_budget(net, 0.5, calib, per_layer=per_layer)  # track=0: fixed prices again
    assert net.a._tracker is None and _stream_flops(net, stream) == fixed
    assert [r["track"] for r in gating_report(net)] == [0.0, 0.0]


def test_tracked_model_save_load_continues_the_same_decisions(tmp_path):
    net, calib, stream = _shifted_setup(False)
    set_budget(net, 0.5, calib, track=0.5)
    lam0 = float(net.a.budget_lambda)
    _stream_flops(net, [x[: 8 + 3 * i] for i, x in enumerate(stream[:10])])  # calls of different sizes
    assert float(net.a.budget_lambda) > lam0  # the price has moved
    bondgate.save(net, tmp_path / "t")
    back = bondgate.load(tmp_path / "t", model=_TwoBranches())
    assert back.a._tracker is back.b._tracker and back.a._tracker is not net.a._tracker
    assert back.a.spec()["track"] == net.a.spec()["track"] == {
        "rate": 0.5, "scale": net.a._tracker.scale, "shared": True, "rounds": 10,
        "typical_full": net.a._tracker.typical_full}
    with torch.no_grad():
        for i, x in enumerate(stream[10:30]):  # the same prices, hence the same decisions and outputs, call after call
            assert torch.equal(net(x[: 5 + 2 * i]), back(x[: 5 + 2 * i]))
    assert float(back.a.budget_lambda) == float(net.a.budget_lambda) > lam0  # ... and kept moving alike


def test_bad_track_values():
    net, layer = gated_layer()
    for bad in (-0.1, float("nan"), True, "0.5", 11.0):
        with pytest.raises(ValueError, match="track"):
            set_budget(net, 0.5, [torch.randn(8, 96)], track=bad)
    good = {"rate": 0.5, "scale": 1.0, "shared": False, "rounds": 3, "typical_full": 10.0}
    for bad in ({"rate": 0.5}, {**good, "rate": -1.0}, {**good, "scale": float("nan")}, {**good, "rounds": -2}):
        spec = {**layer.spec(), "track": bad}
        with pytest.raises(ValueError, match="track"):
            GatedMPOLinear.from_spec(spec)
    assert GatedMPOLinear.from_spec({**layer.spec(), "track": good}).spec()["track"] == good


def test_saved_mode_is_validated_on_load():
    _, layer = gated_layer()
    for bad in (5.0, 0.0, "fast", None):
        with pytest.raises(ValueError, match="mode"):
            GatedMPOLinear.from_spec({**layer.spec(), "mode": bad})
    for good in ("nested", "full", 0.5, 1):
        assert GatedMPOLinear.from_spec({**layer.spec(), "mode": good}).mode == good
    # a NaN temperature loaded and gave NaN outputs in training mode
    for key, bad in (("temperature", float("nan")), ("temperature", 0.0), ("penalty", -1.0), ("penalty", "5")):
        with pytest.raises(ValueError, match=key):
            GatedMPOLinear.from_spec({**layer.spec(), key: bad})


@pytest.mark.parametrize("executor", ["autotuned", "sweep-l2r"])
def test_gated_eval_operands_never_go_stale_after_data_writes(executor, monkeypatch):
    # Issue 18.2: the sliced cores, the sweep layout and its views, and the controller's host copy are kept
    # between inference calls; writes through .data must reach them
    if executor != "autotuned":
        from bondgate.planner import SPEED, _build_candidates

        def sweep_plan(out_f, in_f, ranks, rows, dtype, device, policy, grad):
            return next(c for c in _build_candidates(tuple(out_f), tuple(in_f), tuple(ranks), rows, SPEED, grad)
                        if c.name == f"cores/{executor}")

        monkeypatch.setattr(bondgate.gating, "get_plan", sweep_plan)
    net, layer = gated_layer()
    layer.eval()
    x = torch.randn(37, 96)
    levels = torch.arange(37) % 4
    with torch.no_grad():
        layer(x, levels=levels)
        layer(x[:1])  # one-row decision: keeps the controller's numpy operands
        layer.cores[1].data.mul_(-2.0)
        layer.controller.proj.weight.data.normal_()
        y = layer(x, levels=levels)
        one_row = layer._one_level(x[:1])
        want_level = int(layer._objective(x[:1]).argmin())
    for i in range(37):
        w = layer.level_widths[int(levels[i])]
        ref = x[i] @ layer.to_mpo().slice_bonds(w).to_matrix().T + layer.bias
        torch.testing.assert_close(y[i], ref, rtol=1e-4, atol=1e-4)
    assert one_row == want_level


@pytest.mark.parametrize("kw, match", [({"temperature": float("nan")}, "temperature must be a finite"),
                                       ({"penalty": float("nan")}, "penalty must be a finite"),
                                       ({"temperature": float("inf")}, "temperature"),
                                       ({"temperature": "1"}, "temperature"),
                                       ({"budget": float("nan")}, "budget"),
                                       ({"target_modules": "[bad"}, "regular expression")])
def test_nan_and_malformed_gating_configs_are_clear_errors(kw, match):
    # Issue 18.7: NaN temperature/penalty passed the `<= 0` checks
    with pytest.raises(ValueError, match=match):
        GatingConfig(**kw)


def test_gate_regex_matching_nothing_names_the_layers():
    with pytest.raises(ValueError, match=r"matches none of the model's 1 MPO or low-rank layers \(2\)"):
        gate(model_with_mpo(), GatingConfig(target_modules=r"encoder\..*"))


@pytest.mark.parametrize("levels", [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.5, 1.5, 2.5]),
                                    torch.tensor([True, False, True]), [0, 1, 2]])
def test_level_overrides_must_be_integer_tensors(levels):
    # Issue 18.7: float level indices were silently truncated to integers
    net, layer = gated_layer()
    layer.eval()
    with pytest.raises(TypeError, match="levels must be an integer tensor"):
        layer(torch.randn(3, 96), levels=levels)


# ---------------------------------------------------------------------------------------- issue 18.8: devices
def test_gated_layer_on_each_device_fits_budgets_and_matches_its_levels(device):
    # fit_controllers collects rows on the CPU (float64) while the layer's weight lives on the device
    torch.manual_seed(0)
    net = nn.Sequential(nn.Identity(), MPOLinear.from_linear(nn.Linear(96, 80), max_bond=12, num_cores=3))
    gate(net, GatingConfig(controller="error"))
    net.to(device)
    gen = torch.Generator().manual_seed(1)
    data = [_anisotropic_rows(128, gen) for _ in range(4)]  # CPU batches: moved to the model's device
    fit = bondgate.fit_controllers(net, data)
    assert min(fit[0]["r2"][:-1]) > 0.5
    assert set_budget(net, 0.5, data) == pytest.approx(0.5, abs=0.05)
    net.eval()
    layer = net[1]
    x = _anisotropic_rows(40, gen).to(device)
    with torch.no_grad():
        y = net(x)
        levels = layer.decide(x)
    for i in range(0, 40, 7):
        w = layer.level_widths[int(levels[i])]
        ref = x[i] @ layer.to_mpo().slice_bonds(w).to_matrix().T + layer.bias
        torch.testing.assert_close(y[i], ref, rtol=1e-4, atol=1e-4)


def test_gating_buffers_keep_float64_under_a_dtype_cast():
    # Issue 18.8: .to(torch.bfloat16) turned the price and the level counts into bf16 (a count stops at 256)
    net = gate(model_with_mpo(), GatingConfig(controller="error"))
    set_budget(net, 0.5, [torch.randn(64, 96)])
    layer = net[2]
    layer.level_counts.fill_(1000.0)
    lam = float(layer.budget_lambda)
    net.to(torch.bfloat16)
    assert layer.budget_lambda.dtype == layer.level_counts.dtype == torch.float64
    assert float(layer.budget_lambda) == lam and float(layer.level_counts[0]) == 1000.0
    assert layer.cores[0].dtype == torch.bfloat16 and layer.controller.coef.dtype == torch.bfloat16
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(3, 96, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("path", ["grouped", "one_group", "override", "nested_train", "static"])
def test_gated_forward_reads_the_device_at_most_once_per_call(path, monkeypatch):
    # Issue 18.8: on a GPU every device read is a host sync. Routing rows to kernels of different shapes needs the
    # rows per level on the host, so a gated call may wait for the device once (bondgate.gating.to_host), no more;
    # every other value it needs is kept on the host
    net = gate(model_with_mpo(), GatingConfig(controller="error"))
    set_budget(net, 0.5, [torch.randn(64, 96)], max_groups=1 if path == "one_group" else None, track=0.05)
    layer = net[2]
    if path == "static":
        set_mode(net, 0.5)
    reads = []
    real = bondgate.gating.to_host
    monkeypatch.setattr(bondgate.gating, "to_host", lambda t: reads.append(1) or real(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("a .item() in the gated forward"))
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: pytest.fail("an int(tensor) in the gated forward"))
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: pytest.fail("a float(tensor) in the gated forward"))
    if path == "nested_train":
        set_mode(net, "nested")
        net.train()
    else:
        net.eval()
    x = torch.randn(37, 96)
    levels = torch.arange(37) % 4 if path == "override" else None
    for call in range(3):
        reads.clear()
        with torch.no_grad():
            layer(x, levels=levels)
        assert len(reads) == (0 if path == "static" else 1), (path, call)


@pytest.mark.parametrize("executor", ["dense", "tensordot"])
def test_gated_eval_keeps_each_levels_precontracted_operands(executor, monkeypatch):
    # a LLaMA-shape decode ran 15x slower gated than full-width: every inference call re-contracted the level's
    # groups (for a dense plan: rebuilt the whole weight). In speed mode they are kept, like the full-width layer's
    # (memory mode: test_memory_mode_levels_keep_at_most_the_cores_size)
    from bondgate.planner import SPEED, ContractionPlan, _build_candidates

    def pick(out_f, in_f, ranks, rows, dtype, device, policy, grad):
        cands = _build_candidates(tuple(out_f), tuple(in_f), tuple(ranks), rows, SPEED, grad)
        return next(c for c in cands if c.cached and (c.dense if executor == "dense" else c.executor == "tensordot"))

    monkeypatch.setattr(bondgate.gating, "get_plan", pick)
    net, layer = gated_layer()
    layer.policy = "speed"
    layer.eval()
    calls = []
    real = ContractionPlan.group_operands
    monkeypatch.setattr(ContractionPlan, "group_operands", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    x = torch.randn(5, 96)
    with torch.no_grad():
        for level in range(4):
            layer(x, levels=torch.full((5,), level))
        first = len(calls)
        for level in range(4):
            y = layer(x, levels=torch.full((5,), level))
    assert first == 4 and len(calls) == first  # built once per level, then kept
    ref = x @ layer.to_mpo().slice_bonds(layer.level_widths[3]).to_matrix().T + layer.bias
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "error"])
def test_lowrank_pairs_are_gated_by_rank_prefix_with_the_nested_kernel(tmp_path, kind):
    """A low-rank pair gates as the 2-core MPO (out, 1) x (1, in) whose bond is the rank: a level keeps the
    leading ranks. The nested-prefix inference kernel (rows sorted by level, each rank block applied to the
    rows that need it) must equal each row's own prefix, the training path, and survive save/load."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 80))
    pair = bondgate.LowRankLinear.from_linear(net[2], 20)
    net[2] = pair
    x = torch.randn(41, 96)
    with torch.no_grad():
        h = torch.relu(net[0](x))
        y_pair = pair(h)
        as_mpo = pair.to_mpo_linear()
        assert as_mpo.in_factors == (1, 96) and as_mpo.out_factors == (80, 1) and as_mpo.bond_dims == (20,)
        assert torch.allclose(as_mpo(h), y_pair, atol=1e-5)
    gate(net, GatingConfig(levels=(0.25, 0.5, 0.75, 1.0), controller=kind))
    layer = net[2]
    assert isinstance(layer, GatedMPOLinear) and layer._rank_form
    assert layer.bond_dims == (20,) and [w[0] for w in layer.level_widths] == [5, 10, 15, 20]
    # FLOPs per row of a level: 2 x rank x (in + out)
    assert layer.level_cost == pytest.approx([2 * r * (96 + 80) for r in (5, 10, 15, 20)], rel=0.02)
    lv = torch.randint(0, 4, (41,), generator=torch.Generator().manual_seed(1))
    lv[:3] = torch.tensor([0, 3, 3])
    with torch.no_grad():
        ref = torch.stack([nn.functional.linear(nn.functional.linear(h[i], pair.V[:r]), pair.U[:, :r], pair.bias)
                           for i, r in enumerate((5 * (lv + 1)).tolist())])
        layer.eval()
        assert torch.allclose(layer(h, levels=lv), ref, atol=1e-5)
        assert torch.allclose(layer(h, levels=torch.full((41,), 3)), y_pair, atol=1e-5)
        assert torch.allclose(layer(h, levels=torch.full((41,), 1)),
                              nn.functional.linear(nn.functional.linear(h, pair.V[:10]), pair.U[:, :10], pair.bias),
                              atol=1e-5)
        no_top = lv.clamp(max=2)  # the widest level absent: its block is never read
        ref2 = torch.stack([nn.functional.linear(nn.functional.linear(h[i], pair.V[:r]), pair.U[:, :r], pair.bias)
                            for i, r in enumerate((5 * (no_top + 1)).tolist())])
        assert torch.allclose(layer(h, levels=no_top), ref2, atol=1e-5)
    layer.train()
    assert torch.allclose(layer(h, levels=lv), ref, atol=1e-5)  # the training path (grad) agrees
    # decisions, budget and save/load as for any gated layer
    calib = [torch.randn(64, 96)]
    if kind == "error":
        bondgate.fit_controllers(net, calib)
    else:
        with torch.no_grad():
            layer.controller.proj.weight.normal_()
    budget = 0.75 if kind == "error" else 0.5  # the error controller alone costs ~0.25 of this small layer
    assert set_budget(net, budget, calib) == pytest.approx(budget, abs=0.1)
    net.eval()
    with torch.no_grad():
        y = net(x)
        decided = layer.decide(h)
    assert len(set(decided.tolist())) > 1
    bondgate.save(net, tmp_path / "g")
    back = bondgate.load(tmp_path / "g")
    assert back[2]._rank_form
    with torch.no_grad():
        assert torch.equal(back(x), y) and torch.equal(back(x[:1]), net(x[:1]))


def _tracked_rank_net(kind: str):
    """A low-rank pair gated by rank prefix (5 levels), its controller fitted (error) or random (linear), priced by
    an online tracker, in eval mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(96, 96), nn.ReLU(), bondgate.LowRankLinear.from_linear(nn.Linear(96, 80), 40))
    gate(net, GatingConfig(levels=(0.125, 0.25, 0.5, 0.75, 1.0), controller=kind))
    calib = [torch.randn(256, 96)]
    if kind == "error":
        bondgate.fit_controllers(net, calib)
    else:
        with torch.no_grad():
            net[2].controller.proj.weight.normal_()
    set_budget(net, 0.6, calib, track=0.5)
    return net.eval()


@pytest.mark.parametrize("kind", ["error", "linear"])
def test_one_row_decode_short_path_equals_the_general_path(kind, monkeypatch):
    """A gated rank-form layer's one-row inference calls (an LLM decode step) take a short path after the first
    (_decode_step): the same outputs to the bit, the same decisions, counts and tracked price as the general path,
    whatever changes between calls (cores or controller written in place or replaced, the price moved, the mode,
    train / eval, autocast, an input needing a gradient or of another shape); it is refused where it does not apply."""
    net = _tracked_rank_net(kind)
    ref = copy.deepcopy(net)  # the general path only: never armed
    monkeypatch.setattr(ref[2], "_arm_decode", lambda x2d: None)
    layer, general = net[2], []
    real = GatedMPOLinear._one_level
    monkeypatch.setattr(GatedMPOLinear, "_one_level", lambda self, x2d: general.append(self is layer) or real(self, x2d))
    gen = torch.Generator().manual_seed(1)

    def step(shape=(1, 96), **kw):
        x = (torch.randn(shape, generator=gen) * torch.rand((), generator=gen) * 3).to(**kw)
        h, h_ref = torch.relu(net[0](x)), torch.relu(ref[0](x))
        y, y_ref = layer(h), ref[2](h_ref)
        assert torch.equal(y, y_ref) and y.shape == (*shape[:-1], 80)
        assert torch.equal(layer.budget_lambda, ref[2].budget_lambda)
        return y

    def short_calls(n, **kw):  # n calls, all on the short path (the general path's decision never runs)
        before = general.count(True)
        for i in range(n):
            step((1, 96) if i % 3 else (1, 1, 96), **kw)
        assert general.count(True) == before

    with torch.no_grad():
        step()  # the general path arms the short one
        assert "decode" in layer._host
        short_calls(40)
        for write, refused in ((lambda m: m.cores[0].mul_(0.9), 1),  # cores, controller written or replaced
                               (lambda m: m.controller.proj.weight.mul_(-1.5), 1),
                               (lambda m: m.controller.host_params()[-1].mul_(3.0), 1),  # coef / the linear's bias
                               (lambda m: m.cores.__setitem__(1, nn.Parameter(m.cores[1] * 1.1)), 1),
                               (lambda m: m.budget_lambda.mul_(1.7), 0),  # re-priced: the short path re-reads it
                               (lambda m: setattr(m.controller.proj, "weight",
                                                  nn.Parameter(m.controller.proj.weight * 0.5)), 1)):
            for m in (layer, ref[2]):
                write(m)
            before = general.count(True)
            step()
            assert general.count(True) == before + refused  # refused once, then armed again
            if any(type(p) is nn.Parameter for p in layer.parameters()):  # a plain parameter's .data writes go unseen
                step()
                assert general.count(True) == before + 2  # never armed
                for m in (layer, ref[2]):
                    bondgate.layer.track_parameters(m)
                step()
            short_calls(10)
        step((96,))  # a 1-d row: (out,)
        step((2, 96))  # two rows: the general path
        x = torch.randn(1, 96)
        for mode in ("full", 0.5):
            set_mode(net, mode)
            set_mode(ref, mode)
            step()
        set_mode(net, "gate")
        set_mode(ref, "gate")
        step()
        short_calls(5)
        h = torch.relu(net[0](torch.randn(1, 96)))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a float32 row: autocast's dtype out
            y = layer(h)
            assert y.dtype == torch.bfloat16 and torch.equal(y, ref[2](h))
        x = torch.randn(1, 96, requires_grad=True)
        assert torch.equal(layer(x), ref[2](x))
        assert layer(torch.empty(1, 96, device="meta")).shape == (1, 80)  # shape inference, as nn.Linear
        with pytest.raises(TypeError):
            layer(torch.randn(1, 96, dtype=torch.float64))
        with pytest.raises(ValueError):
            layer(torch.randn(1, 95))
    with torch.inference_mode():  # inference-tensor inputs: the short path as well
        short_calls(5)
    counts, ref_counts = layer.flush_counts(), ref[2].flush_counts()
    assert torch.equal(counts, ref_counts) and int((counts > 0).sum()) >= 3, counts
    step()  # grad enabled: the general path
    net.train()
    ref.train()
    x = torch.randn(1, 96)
    for grad in (False, True):  # training: the general path (the linear controller samples its level)
        with torch.set_grad_enabled(grad):
            torch.manual_seed(5)
            y = layer(x)
            torch.manual_seed(5)
            assert torch.equal(y, ref[2](x)) and y.requires_grad == grad


# ---------------------------------------------------------------------------------- review fixes (gating)
def _fitted_error_net():
    """``model_with_mpo()`` gated with a fitted error controller, and its three ``(64, 96)`` fitting batches."""
    net = gate(model_with_mpo(), GatingConfig(controller="error"))
    data = [torch.randn(64, 96) for _ in range(3)]
    bondgate.fit_controllers(net, data)
    return net, data


def _error_gated(seed=0, scale=1.0):
    """A fitted error-controlled model and model inputs ``(64, 96)`` (``scale`` x standard normal)."""
    net = gate(model_with_mpo(seed), GatingConfig(controller="error", levels=(0.25, 0.5, 1.0)))
    gen = torch.Generator().manual_seed(seed)
    data = [scale * torch.randn(64, 96, generator=gen) for _ in range(4)]
    net.eval()
    bondgate.fit_controllers(net, data)
    return net, data


def test_set_cores_with_new_bonds_moves_the_levels():
    net, layer = gated_layer()
    mpo = bondgate.MPO.from_matrix(torch.randn(80, 96), num_cores=3, max_bond=20)
    layer.set_cores(mpo.cores)
    assert layer.level_widths[-1] == layer.bond_dims == mpo.bond_dims
    # one row through the left-to-right sweep of (4, 4, 5) x (6, 4, 4) at bonds (20, 20), written out
    assert (layer.out_factors, layer.in_factors, layer.bond_dims) == ((4, 4, 5), (6, 4, 4), (20, 20))
    assert layer.full_cost == 2 * (20 * 4 * 6 * 16 + 20 * 4 * (20 * 4) * 4 * 4 + 5 * (20 * 4) * 16) == 232960
    assert layer.full_cost == _cheapest_contraction(layer.out_factors, layer.in_factors, layer.bond_dims, 1)
    ref = MPOLinear.from_mpo(mpo, layer.bias.detach())
    x = torch.randn(5, 96)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x, levels=torch.full((5,), 3)), ref(x), rtol=1e-5, atol=1e-5)


def test_gate_keeps_a_shared_layer_shared_and_the_layers_own_parameters():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = self.second = MPOLinear.from_linear(nn.Linear(64, 64), max_bond=8, num_cores=3)

        def forward(self, x):
            return self.second(torch.relu(self.first(x)))

    m = Twice().requires_grad_(False)
    cores = list(m.first.cores)
    gate(m, GatingConfig())
    assert isinstance(m.first, GatedMPOLinear) and m.first is m.second
    assert all(a is b for a, b in zip(m.first.cores, cores))  # the very parameters: an optimizer keeps them
    assert not any(p.requires_grad for p in m.first.cores) and not m.first.bias.requires_grad  # frozen stays frozen


def test_gate_keeps_an_lm_head_tied_to_its_compressed_table():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid = nn.Embedding(512, 64), nn.Linear(64, 64)
            self.head = nn.Linear(64, 512, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.relu(self.mid(self.emb(ids))))

    torch.manual_seed(0)
    model = LM()
    calib = [torch.randint(512, (8, 16)) for _ in range(4)]
    bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, embeddings=True), calibration=calib,
                      progress=False)
    assert model.head.cores is model.emb.cores
    gate(model, GatingConfig())
    assert isinstance(model.head, GatedMPOLinear) and model.head.cores is model.emb.cores
    set_mode(model, "nested")
    model.train()
    model(calib[0]).logsumexp(-1).mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(a is b for a, b in zip(model.head.cores, model.emb.cores))


@pytest.mark.parametrize("max_groups", [1, 2])
def test_a_nan_row_does_not_choose_the_level_of_the_other_rows(max_groups):
    net, data = _error_gated()
    set_budget(net, 0.6, data, max_groups=max_groups)
    with torch.no_grad():
        x = torch.relu(net[0](data[0][:8]))  # the gated layer's inputs
    bad = x.clone()
    bad[0] = float("nan")
    with torch.no_grad():
        y, y_bad = net[2](x), net[2](bad)
        assert net[2].decide(bad)[1:].tolist() == net[2].decide(x)[1:].tolist()
    assert torch.isnan(y_bad[0]).all()
    torch.testing.assert_close(y_bad[1:], y[1:], rtol=1e-5, atol=1e-5)  # before the fix: off by ~1


def test_error_controller_decides_alike_in_float16_for_large_rows():
    net, data = _error_gated(scale=100.0)
    layer = net[2]
    set_budget(net, 0.5, data)
    half = copy.deepcopy(layer).half()
    with torch.no_grad():
        x = torch.relu(net[0](100.0 * torch.randn(16, 96)))  # |x| in the hundreds: |x|^2 overflows float16
        assert x.norm(dim=1).min() > 256
        lv32, lv16 = layer.decide(x), half.decide(x.half())
        assert torch.isfinite(half._objective(x.half())).all()
    assert (lv32 == lv16).float().mean() >= 0.9 and len(set(lv32.tolist())) > 1


def test_price_tracker_goes_on_from_a_loaded_price():
    import math

    net, data = _error_gated()
    other = copy.deepcopy(net)
    set_budget(other, 0.3, data)
    set_budget(net, 0.9, data, track=0.05)
    loaded = float(other[2].budget_lambda)
    assert abs(math.log(loaded / float(net[2].budget_lambda))) > 0.3
    net.load_state_dict(other.state_dict())
    with torch.no_grad():
        net(torch.randn(16, 96))
    assert abs(math.log(float(net[2].budget_lambda) / loaded)) < 0.1  # one small step from the loaded price


def test_fit_controllers_rejects_non_positive_row_counts():
    net, data = _error_gated()
    for kw in ({"rows_per_batch": 0}, {"max_rows": -1}):
        with pytest.raises(ValueError, match="positive int"):
            bondgate.fit_controllers(net, [torch.randn(8, 96)], **kw)


def test_gate_inside_inference_mode_then_fit_outside():
    net = model_with_mpo()
    with torch.inference_mode():
        gate(net, GatingConfig(controller="error", levels=(0.5, 1.0)))
    assert not net[2].controller.coef.is_inference()
    fit = bondgate.fit_controllers(net, [torch.randn(64, 96) for _ in range(2)])
    assert fit[0]["rows"] > 0


def test_fit_controllers_fits_a_model_copied_under_inference_mode():
    # the copy's controller parameters are inference tensors: writing them outside inference mode raised torch's raw
    # "Inplace update to inference tensor outside InferenceMode is not allowed" (set_budget clones such buffers)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))
    bondgate.compress(m, bondgate.CompressionConfig(param_ratio=0.5, calibrate=False, kinds=("mpo",)), progress=False)
    gate(m, GatingConfig(controller="error"))
    data = [torch.randn(32, 128) for _ in range(8)]
    with torch.inference_mode():
        frozen = copy.deepcopy(m)
    assert frozen[2].controller.coef.is_inference()
    fresh = copy.deepcopy(m)
    want = bondgate.fit_controllers(fresh, data)
    got = bondgate.fit_controllers(frozen, data)
    assert [r["rows"] for r in got] == [r["rows"] for r in want]
    for a, b in ((fresh[k], frozen[k]) for k in (0, 2)):
        for name, p in b.controller.named_parameters():
            assert type(p) is TrackedParameter and not p.is_inference() and not p.requires_grad, name
            assert torch.equal(p, a.controller.get_parameter(name)), name
    frozen.eval()
    set_budget(frozen, 0.5, data)
    assert frozen[2]._host_level(torch.randn(1, 256)) is not None  # normal tensors again: the one-row decision's numpy path applies
    with torch.no_grad():
        frozen(torch.randn(4, 128))
    assert gating_report(frozen)[0]["rows"] == 4
    # the model objective differentiates the model, whose other tensors are inference tensors too: refused, clearly
    with torch.inference_mode():
        frozen = copy.deepcopy(m)
    with pytest.raises(RuntimeError, match=r"objective='model'.*torch.inference_mode \(0.bias; .*objective='layer'"):
        bondgate.fit_controllers(frozen, data, objective="model")


def test_calibration_passes_are_not_inference_traffic():
    net, data = _error_gated()
    set_budget(net, 0.5, data, track=0.05)
    net.insert(3, nn.ReLU())
    net.append(nn.Linear(80, 64))
    price = float(net[2].budget_lambda)
    bondgate.compress(net, bondgate.CompressionConfig(param_ratio=0.5, target_modules=["4"]),
                      calibration=[torch.randn(32, 96) for _ in range(4)], progress=False)
    assert float(net[2].budget_lambda) == price
    assert sum(r["rows"] for r in gating_report(net)) == 0


def test_a_calibration_pass_leaves_out_only_the_model_it_calibrates():
    # the pass was process-global: while one thread ran fit_controllers / set_budget on model A, model B's inference
    # in another thread was left out of B's level counts and price tracker (2760 of 4800 rows counted, 345 of 600
    # tracker rounds)
    import threading

    a, data_a = _error_gated(0)
    b, data_b = _error_gated(1)
    set_budget(b, 0.5, data_b, track=0.05)
    gating_report(b, reset=True)
    tracker, rounds = b[2]._tracker, b[2]._tracker.rounds
    inside, stop, errors = threading.Event(), threading.Event(), []
    busy = [0]  # A's forward calls running now (inside its calibration passes)

    def enter(*_):
        busy[0] += 1
        inside.set()

    def leave(*_):
        busy[0] -= 1

    handles = [a.register_forward_pre_hook(enter), a.register_forward_hook(leave)]

    def calibrate():
        try:
            while not stop.is_set():
                bondgate.fit_controllers(a, data_a)
                set_budget(a, 0.4, data_a)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            inside.set()

    thread = threading.Thread(target=calibrate)
    thread.start()
    calls = overlapped = 0
    try:
        assert inside.wait(60)
        with torch.no_grad():
            for k in range(300):  # one-row calls (one level per call) and multi-row calls (grouped)
                x = torch.randn(1 if k % 3 == 0 else 8, 96)
                overlapped += busy[0] > 0
                b(x)
                calls += x.shape[0]
    finally:
        stop.set()
        thread.join()
        for h in handles:
            h.remove()
    assert not errors
    assert overlapped > 0  # B ran while A's calibration passes were open
    assert gating_report(b)[0]["rows"] == calls == 100 + 200 * 8
    assert tracker.rounds == rounds + 300  # one gated layer: a round per call
    assert sum(r["rows"] for r in gating_report(a)) == 0  # A's own passes stay out of A's counts


def test_a_budget_penalty_without_gradient_is_an_error_not_a_silent_zero():
    # reentrant activation checkpointing runs the forward under no_grad: the penalty reached the loss without a graph
    # and the controllers got ~0 budget gradient (3.55 -> 0.0098) in silence
    from torch.utils.checkpoint import checkpoint

    from bondgate.distill import aux_losses

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    bondgate.compress(body, bondgate.CompressionConfig(param_ratio=0.4), progress=False)
    gate(body, GatingConfig(budget=0.3))
    set_mode(body, "gate")
    body.train()
    x = torch.randn(32, 64, requires_grad=True)
    y = checkpoint(body, x, use_reentrant=False)
    (y.pow(2).mean() + aux_losses(body)).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in body.named_parameters() if "controller" in n)
    checkpoint(body, x, use_reentrant=True)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        aux_losses(body)


def test_set_budget_is_all_or_nothing_and_takes_one_batch():
    # a call that raised left the tracker dropped and max_groups / cost_rows replaced (0.506 -> 0.567 of full FLOPs
    # on the same traffic afterwards); one dict or tensor batch was iterated (its keys / rows went to the model)
    net, data = _fitted_error_net()
    set_budget(net, 0.5, data, track=0.05)
    layer = net[2]
    before = (layer._tracker, layer.max_groups, layer.cost_rows, float(layer.budget_lambda), layer.level_cost)
    bad = [torch.randn(8, 96), torch.randn(8, 95)]  # the second batch does not fit the model
    with pytest.raises(RuntimeError):
        set_budget(net, 0.3, bad, max_groups=1, cost_rows=64)
    assert (layer._tracker, layer.max_groups, layer.cost_rows, float(layer.budget_lambda), layer.level_cost) == before
    one = set_budget(net, 0.4, data[0])
    assert one == set_budget(net, 0.4, [data[0]])
    with pytest.raises(TypeError, match="iterable of model inputs"):
        set_budget(net, 0.4, 3)


def test_an_unreachable_budget_warns_and_the_tracked_price_stays_bounded():
    # budgets below the cheapest levels returned ~0.14 without a word; the tracker then grew the price to inf
    net, data = _fitted_error_net()
    net.eval()
    with pytest.warns(UserWarning, match="budget of 0.01 is out of reach"):
        got = set_budget(net, 0.01, data, track=0.5)
    assert got > 0.05
    with torch.no_grad():
        for _ in range(300):
            net(torch.randn(1, 96))
    assert float(net[2].budget_lambda) == bondgate.gating.PRICE_BOUND
    with torch.no_grad():  # and it comes down again once the budget is reachable
        net[2]._tracker.budget = 0.9
        for _ in range(50):
            net(torch.randn(4, 96))
    assert float(net[2].budget_lambda) < bondgate.gating.PRICE_BOUND


def test_a_copy_made_mid_round_tracks_its_own_layers():
    # the copy's tracker held the original layers' ids as the round in progress: its rounds closed at the wrong layer
    torch.manual_seed(0)
    net = nn.Sequential(MPOLinear.from_linear(nn.Linear(64, 64), max_bond=16), nn.ReLU(),
                        MPOLinear.from_linear(nn.Linear(64, 64), max_bond=16))
    gate(net, GatingConfig(controller="error"))
    net.eval()
    data = [torch.randn(32, 64) for _ in range(3)]
    bondgate.fit_controllers(net, data)
    set_budget(net, 0.5, data, track=0.05)
    with torch.no_grad():
        net[0](torch.randn(4, 64))  # one layer of two: a round in progress
    twin = copy.deepcopy(net)
    tracker = twin[0]._tracker
    assert tracker is twin[2]._tracker and not tracker.seen and tracker.layers == [twin[0], twin[2]]
    rounds = tracker.rounds
    with torch.no_grad():
        for k in range(1, 4):
            twin(torch.randn(4, 64))
            assert tracker.rounds == rounds + k and not tracker.seen  # a round per forward, closed at its end


def test_padding_rows_are_left_out_of_fitting_and_pricing():
    class Masked(nn.Module):  # takes transformers-style keyword batches
        def __init__(self):
            super().__init__()
            self.net = model_with_mpo()

        def forward(self, x, attention_mask=None):
            return self.net(x)

    torch.manual_seed(0)
    real = torch.randn(4, 6, 96)
    padded = torch.cat([real, 50 * torch.randn(4, 10, 96)], 1)  # pad positions with wild values
    mask = torch.cat([torch.ones(4, 6), torch.zeros(4, 10)], 1).long()
    got = []
    for batch in ({"x": real}, {"x": padded, "attention_mask": mask}):
        model = Masked()
        gate(model, GatingConfig(controller="error"))
        bondgate.fit_controllers(model, [batch])
        got.append((set_budget(model, 0.5, [batch]), float(model.net[2].budget_lambda),
                    model.net[2].controller.coef.detach().clone()))
    assert got[0][:2] == pytest.approx(got[1][:2], rel=1e-9) and torch.allclose(got[0][2], got[1][2])


def test_set_budget_returns_what_the_same_data_spends():
    """The returned fraction is what inference on the calibration data spends at the final prices: the price sits
    inside a step of the routing (not on a tie two levels share, where float32 scoring breaks the tie another way and
    with max_groups=1 a whole call flips: returned 0.481, spent 0.573), and it is measured after the last round."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    bondgate.compress(m, bondgate.CompressionConfig(param_ratio=0.5), calibration=[torch.randn(256, 64)],
                      progress=False)
    gate(m, GatingConfig(budget=0.5, controller="error"))
    data = [torch.randn(64, 64) for _ in range(8)]
    bondgate.fit_controllers(m, data)
    m.eval()
    for kw in ({"max_groups": 1, "cost_rows": 64}, {}, {"per_layer": True}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a coarse budget under max_groups=1 may warn
            returned = set_budget(m, 0.5, data, **kw)
        gating_report(m, reset=True)
        with torch.no_grad():
            for x in data:
                m(x)
        assert average_flops(m, reset=True) == pytest.approx(returned, abs=1e-9), kw
        assert abs(returned - 0.5) < 0.05, kw


def test_set_budget_warns_when_it_ends_far_under_the_budget():
    torch.manual_seed(0)
    m = model_with_mpo()
    gate(m, GatingConfig(budget=0.5, levels=(0.001, 1.0), controller="error"))
    data = [torch.randn(32, m[0].in_features)]
    with pytest.warns(UserWarning, match="under the budget of 0.5"):
        returned = set_budget(m, 0.5, data, max_groups=1, cost_rows=32)
    assert returned < 0.49
    for bad in ({"per_layer": "yes"}, {"rounds": 1.5}):
        with pytest.raises((TypeError, ValueError), match="per_layer|rounds"):
            set_budget(m, 0.5, data, **bad)
    with pytest.raises(TypeError, match="levels"):
        GatingConfig(levels=(True,))


def test_gate_leaves_layers_without_a_bond():
    """A dense weight kept as a one-core MPO (compress(quantize="int8") keeps one so) has one width: gating it
    would add a controller's FLOPs and a share of the budget for nothing."""
    torch.manual_seed(0)
    kept = MPOLinear.from_linear(nn.Linear(32, 48), num_cores=1)
    assert kept.bond_dims == ()
    m = nn.Sequential(kept, nn.ReLU(), MPOLinear.from_linear(nn.Linear(48, 64), max_bond=6))
    named = copy.deepcopy(m)
    gate(m, GatingConfig(budget=0.5))
    assert type(m[0]) is MPOLinear and isinstance(m[2], GatedMPOLinear)
    with pytest.warns(UserWarning, match="0 has no bond wider than 1"):  # named by the user: said, not silent
        gate(named, GatingConfig(budget=0.5, target_modules=["0", "2"]))
    with pytest.raises(ValueError, match="none of the targeted layers has a bond wider than 1"):
        gate(nn.Sequential(MPOLinear.from_linear(nn.Linear(32, 48), num_cores=1)), GatingConfig(budget=0.5))


def test_frozen_gated_layer_runs_its_inference_operands_for_an_input_that_needs_a_gradient():
    # the input's gradient alone made every call rebuild the level's operands (the grad path) instead of the kept ones
    net, layer = gated_layer()
    net.eval()
    x = torch.randn(30, 96)
    layer.requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    layer(xr).pow(2).sum().backward()
    want = xr.grad
    layer.requires_grad_(False)
    layer._level_plans.clear()
    with torch.inference_mode():  # operands kept there must be normal tensors ("cannot be saved for backward")
        layer(x)
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    with torch.no_grad():
        assert torch.allclose(y, layer(x), atol=1e-6)
    y.pow(2).sum().backward()
    assert layer._level_plans and not any(key[2] for key in layer._level_plans)
    assert torch.allclose(xr.grad, want, rtol=1e-4, atol=1e-5) and want.abs().max() > 0


def test_levels_given_as_one_number_or_a_generator():
    # levels=0.5 was Python's "'float' object is not iterable"; a generator was consumed by the check, then "empty"
    with pytest.raises(TypeError, match="levels are fractions of each bond \\(a sequence of numbers\\), got 0.5"):
        GatingConfig(levels=0.5)
    assert GatingConfig(levels=(v / 4 for v in (1, 2, 4))).levels == (0.25, 0.5, 1.0)


def test_a_shared_price_with_one_group_per_call_meets_a_reachable_budget():
    # the score-then-price iteration did not settle with max_groups=1 (each layer moves whole calls, and the second
    # layer's scores follow the first's widths): 0.342 then 0.715 for a budget of 0.5 that a price of 0.857 meets
    # (0.510), with warnings to pass more rounds, which did not help
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 64))
    net[2] = bondgate.MPOLinear.from_linear(net[2], max_bond=16, num_cores=3)
    net[4] = bondgate.MPOLinear.from_linear(net[4], max_bond=16, num_cores=3)
    bondgate.gate(net, bondgate.GatingConfig(controller="error"))
    net.eval()
    M = torch.randn(96, 96)
    cal = [torch.randn(64, 96) @ M * torch.rand(64, 1) * 2 for _ in range(16)]
    bondgate.fit_controllers(net, cal)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # met, so no warning
        got = bondgate.set_budget(net, 0.5, cal, max_groups=1)
    assert abs(got - 0.5) <= 0.02 * 0.5
    prices = {float(m.budget_lambda) for m in net.modules() if isinstance(m, bondgate.GatedMPOLinear)}
    assert len(prices) == 1  # still one shared price
    bondgate.gating_report(net, reset=True)
    with torch.no_grad():
        for x in cal:
            net(x)
    assert average_flops(net) == pytest.approx(got, rel=1e-9)  # what it returns is what inference spends


def test_level_counts_are_exact_when_one_model_serves_several_threads():
    # the counts were unlocked read-modify-writes: a thread switch between the read and the write of
    # `_pending[level] += rows` lost rows (133 of 200 counted here; 2-13 of ~1000 in a real 8-thread run)
    import time
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    model = nn.Sequential(bondgate.MPOLinear.from_linear(nn.Linear(16, 16), max_bond=4))
    bondgate.gate(model, bondgate.GatingConfig(levels=(0.5, 1.0)))
    model.eval()
    layer = model[0]

    class SwitchingList(list):
        def __getitem__(self, i):
            value = super().__getitem__(i)
            time.sleep(1e-4)  # hands the interpreter to another thread between the read and the write
            return value

    layer._pending = SwitchingList(layer._pending)
    xs = [torch.randn(1, 16) for _ in range(4)]
    with torch.inference_mode(), ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda x: [model(x) for _ in range(50)], xs))
    assert int(layer.flush_counts().sum()) == 4 * 50
    with torch.inference_mode():
        for x, ys in zip(xs, outs):
            assert all(torch.allclose(y, model(x), atol=1e-6) for y in ys)


def test_a_gated_layer_built_directly_runs_and_gates():
    # GatedMPOLinear(16, 16) (the exported class, MPOLinear's constructor) had no gating: "no attribute 'mode'"
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    dense = nn.Linear(16, 16)
    built = (GatedMPOLinear(16, 16, max_bond=4), GatedMPOLinear.from_linear(dense, max_bond=4),
             GatedMPOLinear.from_mpo(bondgate.MPO.from_matrix(dense.weight.detach(), max_bond=4), dense.bias,
                                     gating=GatingConfig(levels=(0.5, 1.0), budget=0.3)))
    for layer in built:
        layer.eval()
        assert layer.mode == "gate" and isinstance(layer.controller, nn.Module)
        set_mode(layer, "full")
        with torch.no_grad():
            full = torch.nn.functional.linear(x, layer.weight_matrix(), layer.bias)
            torch.testing.assert_close(layer(x), full, rtol=0, atol=1e-5)
            set_mode(layer, 0.5)  # half of every bond: the sliced MPO's product
            half = layer.to_mpo().slice_bonds([max(1, b // 2) for b in layer.bond_dims]).to_matrix()
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, half, layer.bias), rtol=0, atol=1e-5)
    assert built[2].levels == (0.5, 1.0) and built[2].budget == 0.3
    with pytest.raises(TypeError, match="GatingConfig"):
        GatedMPOLinear(16, 16, gating={"budget": 0.5})


def test_training_keeps_a_fitted_error_controller_and_its_budget():
    # training in mode "gate" sampled levels by Gumbel noise around the tiny predicted errors and moved the fitted
    # coefficients (negative after 30 Adam steps): a budget of 0.25 spent 0.11 afterwards, at the same price
    net, data = _error_gated()
    spent = set_budget(net, 0.25, data)
    layer = net[2]
    coef, proj = layer.controller.coef.clone(), layer.controller.proj.weight.clone()
    core = layer.cores[0].detach().clone()
    assert not any(p.requires_grad for p in layer.controller.parameters())
    with torch.no_grad():
        expected = net(data[0])  # eval: routed by the controller at its price
    net.train()
    torch.testing.assert_close(net(data[0]), expected, rtol=0, atol=1e-6)  # training routes the rows alike
    with torch.no_grad(), bondgate.gating.full_width(net):
        targets = [net(x) for x in data]  # heal toward the full width (a loss that shrank the outputs moved the inputs)
    net[0].requires_grad_(False)  # the gated layer's inputs stay: its decisions depend on them and the controller
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for x, t in list(zip(data, targets)) * 5:
        loss = (net(x) - t).square().mean()
        aux = layer.bondgate_aux_loss()
        assert aux is None  # no penalty to train: the controller is not trained
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(layer.controller.coef, coef) and torch.equal(layer.controller.proj.weight, proj)
    assert not torch.equal(layer.cores[0], core)  # the cores trained
    set_mode(net, "gate")  # set_mode keeps an error controller frozen
    assert not any(p.requires_grad for p in layer.controller.parameters())
    net.eval()
    average_flops(net, reset=True)
    with torch.no_grad():
        for x in data:
            net(x)
    assert average_flops(net) == pytest.approx(spent, rel=1e-9)


def test_a_copy_made_in_inference_mode_decides_with_grad_enabled():
    # the decision built a graph through the controller: "Inference tensors cannot be saved for backward"
    import copy

    net, data = _error_gated()
    set_budget(net, 0.5, data)
    with torch.inference_mode():
        twin = copy.deepcopy(net)
    with torch.no_grad():
        h = net[1](net[0](data[0]))  # the gated layer's input
    # the copy decides as the original with grad enabled
    assert torch.equal(twin[2].decide(h), net[2].decide(h))
    # an input that requires grad: the decision must build no graph (it saved the copy's inference tensors for
    # backward and failed; on the original it kept a graph nobody would use)
    x = h.clone().requires_grad_()
    assert torch.equal(twin[2].decide(x), net[2].decide(h))
    assert not net[2]._objective(x).requires_grad
    assert not twin[2]._objective(x).requires_grad


def test_set_budget_on_untrained_controllers_warns():
    net = gate(model_with_mpo(), GatingConfig(controller="error", levels=(0.25, 0.5, 1.0)))
    net.eval()
    data = [torch.randn(64, 96)]
    with pytest.warns(UserWarning, match=r"controller of 2 has not been fitted or trained.*fit_controllers first"):
        set_budget(net, 0.5, data)
    with torch.no_grad():  # transformers' init_weights draws the projections: still not fitted
        net[2].controller.proj.weight.normal_()
    with pytest.warns(UserWarning, match="not been fitted or trained"):
        set_budget(net, 0.5, data)
    bondgate.fit_controllers(net, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_budget(net, 0.5, data)


@pytest.mark.parametrize("plan_name,policy", [("rebuild+gemm", "memory"), ("merge01/optimal", "memory"),
                                              ("dense-cached", "speed")])
def test_memory_mode_levels_keep_at_most_the_cores_size(plan_name, policy, monkeypatch):
    # a level whose plan merged cores or rebuilt the dense weight kept the result between calls whatever its size:
    # a memory-mode 512 -> 1024 layer held 10.7 MB (5x its dense weight) after calls at 1..2049 rows. Memory mode
    # keeps level operands up to the cores' own size in all; speed mode what its plans cache (a dense weight per level)
    from bondgate.planner import MEMORY, SPEED, _build_candidates

    def get_plan(out_f, in_f, ranks, rows, dtype, device, pol, grad):
        cands = _build_candidates(tuple(out_f), tuple(in_f), tuple(ranks), rows, SPEED if policy == "speed" else MEMORY,
                                  grad)
        return next(c for c in cands if c.name == (plan_name if not grad else "cores/optimal"))

    monkeypatch.setattr(bondgate.gating, "get_plan", get_plan)
    net, layer = gated_layer()
    layer.policy = policy
    layer.eval()
    x = torch.randn(37, 96)
    levels = torch.arange(37) % 4
    with torch.no_grad():
        y = layer(x, levels=levels)
        y2 = layer(x, levels=levels)  # a second call: whatever was kept is used
    merged = [1 * w[1] * 4 * 4 * 6 * 4 for w in layer.level_widths]  # group (0, 1): (1, o1 o2, i1 i2, r2) per level
    cores = 4 * layer.num_params
    if plan_name == "rebuild+gemm":  # a dense weight (80 x 96) per level: each alone beyond the cores' size
        assert layer.cache_nbytes == 0
    elif plan_name == "merge01/optimal":  # merged groups and core 2's copies, as long as they fit
        assert 4 * merged[0] <= layer.cache_nbytes <= cores
    else:
        assert layer.cache_nbytes == 4 * 4 * 80 * 96
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    for i in range(37):
        w = layer.level_widths[int(levels[i])]
        ref = x[i] @ layer.to_mpo().slice_bonds(w).to_matrix().T + layer.bias
        torch.testing.assert_close(y[i], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_error_controller_does_not_route_by_its_original_coefficients(how):
    # the kept coef.T travelled with copies and pickles; the copy's coef starts a new version counter, so after as
    # many writes as the stamp it read as fresh: decisions by the old coefficients (256 of 256 rows routed otherwise)
    torch.manual_seed(0)
    model = nn.Sequential(MPOLinear(64, 64, max_bond=8, num_cores=2))
    gate(model, GatingConfig(controller="error", levels=(0.25, 0.5, 1.0)))
    ctrl = model[0].controller
    with torch.no_grad():
        ctrl.coef.copy_(torch.randn_like(ctrl.coef))
    model.eval()
    with torch.no_grad():
        model(torch.randn(8, 64))  # keeps coef.T
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    c2 = twin[0].controller
    new = torch.randn_like(c2.coef)
    with torch.no_grad():
        while c2.coef._version < ctrl.coef._version:
            c2.coef.copy_(new)
    assert torch.equal(c2.coef_t(), new.T)


@pytest.mark.parametrize("quant", [None, "int8"])
def test_memory_mode_level_operands_stay_within_the_cores_size_across_writes(quant, monkeypatch):
    # the bound counted elements: parameters' own views (free) used it up, so levels that fit were rebuilt every
    # call; and with int8 cores, entries of levels not run since a write pinned the old fake-quantized cores (1.95x
    # the cores' bytes). Storages are counted now, and a write drops every stale entry
    from bondgate.layer import storage_nbytes

    layer = _gated_merge01_layer(monkeypatch)
    layer.quantize_(quant)
    bound = 4 * sum(c.numel() for c in layer.cores)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(5, 96)
    for level in range(4):
        layer.eval()
        with torch.no_grad():
            y = layer(x, levels=torch.full((5,), level))
        ref = x @ layer.to_mpo().slice_bonds(layer.level_widths[level]).to_matrix().T + layer.bias
        if quant is None:
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        layer.train()
        layer(x, levels=torch.full((5,), 3)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        ops = [t for k, (_, o, _) in layer._slices.items() if k[0] == "ops" for t in o]
        assert storage_nbytes(ops, exclude=layer.parameters()) <= bound
    if quant is None:  # the float cores' slices are views of the parameters: every level's operands kept
        layer.eval()
        with torch.no_grad():
            for level in range(4):  # (the last step's write left every entry stale: they go at the next miss)
                layer(x, levels=torch.full((5,), level))
        assert sum(k[0] == "ops" for k in layer._slices) == 4


def _gated_mlp_for_fit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(256, 32)
    bondgate.compress(model, bondgate.CompressionConfig(max_bond=8, policy="memory", refine_steps=0),
                      calibration=[x], progress=False)
    return bondgate.gate(model.eval(), bondgate.GatingConfig(controller="error", rank=4)), x


def test_fit_controllers_warns_on_few_rows():
    # 3 rows for rank 4 + 1 features: R^2 near 1 reported with no word (one row: 1.0 everywhere, and a held-out output
    # error of 0.51 at the budget vs 0.41 from 256 rows)
    model, x = _gated_mlp_for_fit()
    with pytest.warns(UserWarning, match=r"few input rows .*\(3 rows\).*fewer than 10 per feature"):
        bondgate.fit_controllers(model, [x[:3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = bondgate.fit_controllers(model, [x[:50]])  # 10 rows per feature
    assert all(-1 < v <= 1 for r in report for v in r["r2"])
    # repeated rows add no information: 3 rows passed 20 times were 60 rows and silenced the warning
    with pytest.warns(UserWarning, match=r"few input rows .*\(60 rows, 3 distinct\).*fewer than 10 per feature"):
        bondgate.fit_controllers(model, [x[:3]] * 20)


def test_fit_controllers_warns_on_input_rows_that_do_not_vary_and_reports_no_r2_for_them():
    # 64 copies of one row: R^2 of -6 to -78 reported without a word; warned (not refused: a layer fed a class
    # embedding sees one vector when the data holds one class, and fit_controllers cannot leave a layer out)
    model, x = _gated_mlp_for_fit()
    for data, what in (([x[:1].repeat(64, 1)], r"0 \(64 rows, one vector\)"), ([x[:1]], r"0 \(a single row\)")):
        with pytest.warns(UserWarning, match=f"input rows of 3 layer\\(s\\) do not vary \\({what}"):
            report = bondgate.fit_controllers(model, data)
        assert all(math.isnan(v) for r in report for v in r["r2"][:-1]) and all(r["r2"][-1] == 1.0 for r in report)


# ------------------------------------------------ from a mutation run of gating.py (each kills a mutant that lived)
def _mut_flops_planned_model():
    net = model_with_mpo()
    net[2].policy = bondgate.PlanPolicy(select="flops")  # plans by FLOPs: no autotuning (kept on save and load)
    return net


def _mut_two_gated_layers(controller="error"):
    torch.manual_seed(0)
    net = nn.Sequential(MPOLinear.from_linear(nn.Linear(64, 64), max_bond=16), nn.ReLU(),
                        MPOLinear.from_linear(nn.Linear(64, 64), max_bond=16))
    for m in (net[0], net[2]):
        m.policy = bondgate.PlanPolicy(select="flops")  # plans by FLOPs: no autotuning of a shape only these tests use
    gate(net, GatingConfig(controller=controller))
    net.eval()
    return net


def test_controller_cost_is_the_documented_flops_and_enters_the_report():
    # kills mutant M08
    # mutant: _linear_cost without the norm's 3 * in FLOPs (the budget then under-counts every row)
    net = gate(model_with_mpo(), GatingConfig(levels=(0.25, 0.5, 0.75, 1.0)))
    layer = net[2]
    assert layer.controller_cost == 2 * (96 + 1) * 4 + 3 * 96  # GateController's docstring
    err = gate(model_with_mpo(), GatingConfig(controller="error", rank=5))[2]
    assert err.controller_cost == 2 * 96 * 6 + 2 * 6 * 4  # ErrorController's docstring
    net.eval()
    x = torch.randn(20, 96)
    gating_report(net, reset=True)
    with torch.no_grad():
        net[2](torch.relu(net[0](x)))  # one routed call, counted
    counts = layer.flush_counts().tolist()
    want = (sum(c * f for c, f in zip(counts, layer.level_cost)) + 20 * layer.controller_cost) / (20 * layer.full_cost)
    rep = gating_report(net)[0]
    assert rep["rows"] == 20 and rep["avg_flops_fraction"] == pytest.approx(want, rel=1e-12)
    assert rep["controller_fraction"] == pytest.approx(layer.controller_cost / layer.full_cost, rel=1e-12)


def test_a_shared_tracker_closes_a_round_when_one_layer_reports_twice():
    # kills mutant M11
    # PriceTracker: a round ends when every layer has reported "or one reports a second time". Mutant: the second
    # report does not close the round: a shared price never moves while one of its layers gets no calls
    net = _mut_two_gated_layers()
    for m in (net[0], net[2]):
        m.budget_lambda.fill_(1e-3)  # (nearly) free FLOPs: the untrained controllers take the full level
    tracker = PriceTracker([net[0], net[2]], budget=0.5, rate=0.5, scale=1.0, shared=True)
    net[0]._tracker = net[2]._tracker = tracker
    with torch.no_grad():
        for _ in range(5):
            net[0](torch.randn(8, 64))  # only the first layer
    assert tracker.rounds == 4 and tracker.seen == {id(net[0])}
    assert float(net[0].budget_lambda) == float(net[2].budget_lambda) > 1e-3  # over budget: the price rose
    with torch.no_grad():
        net(torch.randn(8, 64))  # both layers: the round closes at the second
    assert tracker.rounds == 6 and not tracker.seen


def test_the_trackers_typical_call_follows_the_recent_call_size():
    # kills mutant M12
    # typical_full is a running mean over the last ~100 rounds (min(rounds, 100)), so the step's scale follows the
    # call size of the stream now. Mutant: a cumulative mean (/ rounds) stays at the average since the start
    layer = gate(model_with_mpo(), GatingConfig())[2]
    layer.budget_lambda.fill_(1.0)
    tracker = PriceTracker([layer], budget=0.5, rate=0.01, scale=1.0, shared=False)
    for rows in [1] * 150 + [16] * 300:
        tracker.report(layer, used=0.5 * layer.full_cost * rows, rows=rows)  # on budget: the price stays
    assert tracker.rounds == 450 and float(layer.budget_lambda) == pytest.approx(1.0, rel=1e-12)
    # window of 100 rounds: 16 - 15 * 0.99**300 = 15.26 full-width rows; a cumulative mean gives 11
    assert tracker.typical_full / layer.full_cost == pytest.approx(16 - 15 * 0.99 ** 300, rel=1e-9)
    # hence a round 10% over budget moves the price by exp(0.01 * 0.1 * 16 / 15.26), not exp(0.01 * 0.1 * 16 / 11)
    tracker.report(layer, used=0.55 * layer.full_cost * 16, rows=16)
    typical = tracker.typical_full
    assert float(layer.budget_lambda) == pytest.approx(math.exp(0.01 * 0.05 * 16 * layer.full_cost / (0.5 * typical)))


def test_a_non_positive_price_moves_by_the_step_times_the_calibrated_scale():
    # kills mutant M13
    # PriceTracker docstring: "a price <= 0 ... moves by rate * step * scale". Mutant: the scale is ignored
    layer = gate(model_with_mpo(), GatingConfig())[2]
    layer.budget_lambda.fill_(-0.5)
    tracker = PriceTracker([layer], budget=0.5, rate=0.1, scale=4.0, shared=False)
    tracker.report(layer, used=0.75 * layer.full_cost * 10, rows=10)  # a round spending 0.75 of full width
    # step = 0.1 * (0.75 - 0.5) / 0.5 = 0.05; price -0.5 + 0.05 * 4
    assert tracker.rounds == 1 and float(layer.budget_lambda) == pytest.approx(-0.3, rel=1e-12)
    layer.budget_lambda.fill_(2.0)
    tracker.lam = None
    tracker.report(layer, used=0.75 * layer.full_cost * 10, rows=10)  # a positive price: multiplicative
    assert float(layer.budget_lambda) == pytest.approx(2.0 * math.exp(0.05), rel=1e-12)


def _gated_merge01_layer(monkeypatch):
    """A gated 96 -> 80 layer (3 cores, levels 1/4..1) in memory mode, eval, its level plans forced to merge01 (one
    kept operand per level that is no view of the cores)."""
    from bondgate.planner import MEMORY, _build_candidates

    def get_plan(out_f, in_f, ranks, rows, dtype, device, policy, grad):
        cands = _build_candidates(tuple(out_f), tuple(in_f), tuple(ranks), rows, MEMORY, grad)
        return next((c for c in cands if c.name == "merge01/optimal"),
                    next(c for c in cands if c.name == "cores/optimal"))

    monkeypatch.setattr(bondgate.gating, "get_plan", get_plan)
    torch.manual_seed(0)
    net = nn.Sequential(MPOLinear.from_linear(nn.Linear(96, 80), max_bond=12, num_cores=3, out_factors=(2, 2, 20),
                                              in_factors=(2, 2, 24)))
    gate(net, GatingConfig(levels=(0.25, 0.5, 0.75, 1.0)))
    layer = net[0]
    layer.policy = "memory"
    layer.eval()
    return layer


def _mut_ops_entries(layer):
    from bondgate.layer import core_versions, is_fresh

    cores = layer._core_tuple()
    versions = core_versions(cores)
    return {k[1]: is_fresh(e, cores, versions) for k, e in layer._slices.items() if k[0] == "ops"}


def test_a_write_to_the_cores_drops_the_stale_level_operands(monkeypatch):
    # kills mutant M18
    # _bounded_kept: "a write to the cores drops every stale level entry (held, they would pin the old cores'
    # memory)". Mutant: stale entries are never dropped (they also count against the memory bound)
    layer = _gated_merge01_layer(monkeypatch)
    x = torch.randn(5, 96)
    with torch.no_grad():
        for level in range(4):
            layer(x, levels=torch.full((5,), level))
        assert list(_mut_ops_entries(layer).values()) == [True] * 4
        layer.cores[0].mul_(1.01)  # an in-place edit of the cores
        y = layer(x, levels=torch.full((5,), 3))
    assert _mut_ops_entries(layer) == {layer.level_widths[3]: True}
    ref = x @ layer.to_mpo().to_matrix().T + layer.bias
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_a_write_drops_stale_level_operands_when_the_next_calls_take_another_level(monkeypatch):
    # stale entries were dropped only when the level that hits one is called again: after a write followed by calls
    # at one level, the int8 layer held 23,616 bytes of operands built from the old cores (the memory bound's whole
    # allowance, 23,872) for as long as the other levels were not run, and the level called was rebuilt every call
    layer = _gated_merge01_layer(monkeypatch)
    layer.quantize_("int8")
    x = torch.randn(5, 96)
    with torch.no_grad():
        for level in range(4):
            layer(x, levels=torch.full((5,), level))
        assert _mut_ops_entries(layer) and all(_mut_ops_entries(layer).values())
        layer.cores[0].mul_(1.01)
        builds = []
        build = layer._bounded_kept
        monkeypatch.setattr(layer, "_bounded_kept", lambda key, b: build(key, lambda cs: builds.append(key) or b(cs)))
        for _ in range(5):
            layer(x, levels=torch.full((5,), 3))  # the widest level only
        entries = _mut_ops_entries(layer)  # (under no_grad: int8 cores outside it are new fake-quantized tensors)
    assert entries and all(entries.values()), entries  # before: {(1, 3): False, (2, 6): False}
    assert len(builds) == 1  # before: 5 (the stale entries used up the bound: the level was rebuilt every call)


@pytest.mark.parametrize("rows", [1, 8])
def test_the_tracker_is_charged_the_controllers_flops(rows):
    # kills mutant M24 (rows=1); rows=8 kills the same bug in the grouped path
    # the budget counts the controller's FLOPs on every row (set_budget, gating_report); so must the online tracker.
    # Mutant: the one-level path (one row) reports the level's FLOPs only
    net = _mut_two_gated_layers()
    for m in (net[0], net[2]):
        m.budget_lambda.fill_(0.0)  # free FLOPs: the untrained error controllers take the full level
    tracker = PriceTracker([net[0], net[2]], budget=0.5, rate=0.5, scale=1.0, shared=True)
    net[0]._tracker = net[2]._tracker = tracker
    layer = net[0]
    with torch.no_grad():
        layer(torch.randn(rows, 64))  # one layer of two: the round stays open and holds the call's FLOPs
    assert tracker.seen == {id(layer)}
    assert tracker.used == pytest.approx(rows * (layer.full_cost + layer.controller_cost), rel=1e-12)
    assert tracker.full == pytest.approx(rows * layer.full_cost, rel=1e-12)


def test_the_budget_penalty_is_of_the_tempered_level_distribution():
    # kills mutant M25 and M26 (the controller's FLOPs left out of E[cost])
    # _train_gate: the penalty is penalty * (E[cost] - budget)^2 with E over softmax(scores / temperature).
    # Mutant: the temperature is left out of the expectation
    torch.manual_seed(0)
    net = gate(model_with_mpo(), GatingConfig(temperature=0.3, penalty=2.0, budget=0.4))
    layer = net[2]
    bondgate.set_mode(net, "gate")
    with torch.no_grad():
        layer.controller.proj.weight.normal_(0.0, 0.5)
    layer.train()
    x = torch.randn(16, 96)
    layer(x)
    aux = layer.bondgate_aux_loss()
    with torch.no_grad():
        scores = layer.controller(x).double()
    probs = torch.softmax(scores / 0.3, -1)
    expected = (probs * layer.rel_cost).sum(-1).mean() + layer.controller_cost / layer.full_cost
    assert aux.requires_grad
    assert float(aux.detach()) == pytest.approx(float(2.0 * (expected - 0.4) ** 2), rel=1e-5)


def test_load_state_dict_replaces_the_rows_routed_before():
    # kills mutant M28
    # _load_from_state_dict: "the loaded counts replace everything routed before". Mutant: rows routed but not yet
    # flushed into level_counts are added on top of the loaded counts
    net = gate(model_with_mpo(), GatingConfig())
    other = gate(model_with_mpo(), GatingConfig())
    net.eval()
    other.eval()
    with torch.no_grad():
        other(torch.randn(7, 96))
        state = other.state_dict()  # flushed on save: 7 rows
        for _ in range(3):
            net(torch.randn(5, 96))  # 15 rows pending in net
    net.load_state_dict(state)
    assert net[2].flush_counts().tolist() == other[2].level_counts.tolist()
    assert gating_report(net)[0]["rows"] == 7


@pytest.mark.filterwarnings("ignore:set_budget")
@pytest.mark.parametrize("budget", [0.4, 0.5, 0.85])
def test_a_coarse_budget_lands_on_the_closest_reachable_fraction(budget):
    # kills mutant M32
    # rows alike: the fraction spent is a step function of the price (every row at one level), and no price meets
    # the budget; _calibrate_lambda takes "the side closer to the budget". Mutant: the farther side
    torch.manual_seed(0)
    net = nn.Sequential(MPOLinear.from_linear(nn.Linear(96, 80), max_bond=12, num_cores=3))
    gate(net, GatingConfig(controller="error"))
    layer = net[0]
    data = [torch.randn(1, 96).expand(16, 96).contiguous()]
    reachable = [float(c) + layer.controller_cost / layer.full_cost for c in layer.rel_cost]
    got = set_budget(net, budget, data, per_layer=True)
    closest = min(reachable, key=lambda f: abs(f - budget))
    assert got == pytest.approx(closest, rel=1e-9), (reachable, got)


@pytest.mark.filterwarnings("ignore:fit_controllers")
def test_a_tracked_model_keeps_set_budgets_budget_through_save_and_load(tmp_path):
    # kills mutant M33
    # set_budget records the budget on the layers; a loaded tracker is rebuilt from it (from_spec). Mutant: the
    # layers keep GatingConfig's budget (0.5): the loaded model's tracker steers to 0.5 instead of 0.3
    net = gate(_mut_flops_planned_model(), GatingConfig(controller="error"))
    data = [torch.randn(32, 96)]  # one row count throughout: one plan to tune
    bondgate.fit_controllers(net, data)
    net.eval()
    set_budget(net, 0.3, data, track=0.5, rounds=1)
    assert net[2].budget == 0.3 and net[2].spec()["budget"] == 0.3
    bondgate.save(net, tmp_path / "g")
    back = bondgate.load(tmp_path / "g", model=_mut_flops_planned_model())
    assert back[2]._tracker.budget == net[2]._tracker.budget == 0.3
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):  # the same prices, hence the same decisions, call after call
            x = 2.0 * torch.randn(32, 96, generator=gen)
            assert torch.equal(net(x), back(x))
    assert float(back[2].budget_lambda) == float(net[2].budget_lambda)


def test_set_budget_interrupted_after_pricing_leaves_the_price_as_it_was():
    # kills mutant M34
    # "A call that raises leaves the model's prices and settings as they were". Mutant: the price written by the
    # rounds before the error stays. The existing test raises in the first scoring pass, before any price is set
    net = gate(_mut_flops_planned_model(), GatingConfig(controller="error"))
    data = [torch.randn(64, 96) for _ in range(3)]
    bondgate.fit_controllers(net, data)
    net.eval()
    set_budget(net, 0.5, data)
    layer = net[2]
    before = (float(layer.budget_lambda), layer.budget)
    calls = []

    def interrupt(mod, args):
        calls.append(1)
        if len(calls) > len(data):  # the second scoring pass: round 0 has priced already
            raise KeyboardInterrupt

    handle = net[0].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        set_budget(net, 0.2, data)
    handle.remove()
    assert (float(layer.budget_lambda), layer.budget) == before


def test_fit_controllers_projects_on_the_dominant_error_directions():
    # kills mutant M35
    # fit_controllers: "proj holds the top-rank eigenvectors of sum_l D_l^T S D_l / mean target_l". Mutant: the
    # bottom ones. The existing test's rows have log-normal norms, which the |x|^2 term explains alone (R^2 > 0.9
    # either way); rows of one scale need the directions (min R^2 0.59 here, 0.41 with the bottom ones)
    torch.manual_seed(0)
    net = nn.Sequential(MPOLinear.from_linear(nn.Linear(96, 80), max_bond=16, num_cores=3))
    net[0].policy = bondgate.PlanPolicy(select="flops")  # plans by FLOPs: no autotuning of a shape only this test uses
    gate(net, GatingConfig(levels=(0.25, 0.5, 0.75, 1.0), controller="error", rank=8))
    layer = net[0]
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(256, 96, generator=gen) for _ in range(4)]
    fit = bondgate.fit_controllers(net, data)  # 256 rows per batch: every row is used
    assert fit[0]["rows"] == 1024 and min(fit[0]["r2"][:-1]) > 0.5, fit
    X = torch.cat(data).double()
    mpo = layer.to_mpo().to(dtype=torch.float64)
    W = mpo.to_matrix()
    G = torch.zeros(96, 96, dtype=torch.float64)
    for w in layer.level_widths[:-1]:
        D = W - mpo.slice_bonds(w).to_matrix()
        G += D.T @ D / float((X @ D.T).pow(2).sum(1).mean())
    top = torch.linalg.eigh(G).eigenvectors[:, -8:]  # (96, 8)
    U = layer.controller.proj.weight.detach().double()  # (8, 96), orthonormal rows
    assert float(torch.linalg.matrix_norm(U @ top) ** 2) == pytest.approx(8.0, rel=1e-4)


@pytest.mark.filterwarnings("ignore:fit_controllers")
def test_refitting_after_set_budget_fits_on_the_full_width_models_inputs():
    # kills mutant M36
    # fit_controllers samples "the full-width model's layer inputs". Mutant: the inputs of the gated model at its
    # current prices; a refit after set_budget then fits the second layer on inputs its first layer truncated
    net = _mut_two_gated_layers()
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(64, 64, generator=gen)]
    first = bondgate.fit_controllers(net, data)
    coefs = [m.controller.coef.detach().clone() for m in (net[0], net[2])]
    set_budget(net, 0.3, data, rounds=1)
    second = bondgate.fit_controllers(net, data)
    assert second == first
    for m, c in zip((net[0], net[2]), coefs):
        assert torch.equal(m.controller.coef, c)


def test_width_error_curve_is_the_relative_weight_error():
    # kills mutant M39
    # "Relative weight error of keeping each fraction of every bond". Mutant: the absolute error
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(96, 80), max_bond=12, num_cores=3)
    with torch.no_grad():
        layer.cores[0].mul_(7.0)  # a weight of norm far from 1
    curve = bondgate.gating.width_error_curve(layer, (0.25, 0.5, 1.0))
    W = layer.to_mpo().to(dtype=torch.float64).to_matrix()
    ref = []
    for f in (0.25, 0.5, 1.0):
        widths = tuple(max(1, math.ceil(f * r - 1e-9)) for r in layer.bond_dims)
        Wf = layer.to_mpo().to(dtype=torch.float64).slice_bonds(widths).to_matrix()
        ref.append(float(torch.linalg.norm(Wf - W) / torch.linalg.norm(W)))
    assert curve == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert curve[0] > curve[1] > curve[2] and curve[2] < 1e-6 and curve[0] < 1.0


def test_gating_an_int8_layer_keeps_it_int8():
    # kills mutant M40
    # from_mpo_linear: "the gated layer holds layer's very core and bias parameters, ... and its int8 quantization".
    # Mutant: the gated layer runs the float cores (outputs off the int8 model's by the quantization error)
    torch.manual_seed(0)
    net = model_with_mpo()
    net[2].quantize_("int8")
    x = torch.relu(net[0](torch.randn(9, 96)))
    with torch.no_grad():
        y_int8 = net[2](x)
    gate(net, GatingConfig())
    layer = net[2]
    assert layer.quant == "int8"
    bondgate.set_mode(net, "full")
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_int8, rtol=0, atol=1e-6)
        y_top = layer(x, levels=torch.full((9,), 3))
    torch.testing.assert_close(y_top, y_int8, rtol=1e-5, atol=1e-5)


# ------------------------------------------------ from a second mutation run of gating.py (each kills a mutant)
def test_an_error_controller_rank_above_the_input_width_is_capped():
    """rank=200 on a 96-wide layer: the controller holds 96 projections (its cost and spec say so)."""
    layer = gate(model_with_mpo(), GatingConfig(controller="error", rank=200))[2]
    assert layer.controller_rank == 96 and layer.spec()["controller_rank"] == 96
    assert tuple(layer.controller.proj.weight.shape) == (96, 96) and tuple(layer.controller.coef.shape) == (4, 97)
    assert layer.controller_cost == 2 * 96 * 97 + 2 * 97 * 4


def test_level_widths_round_each_bond_fraction_up_despite_float_error():
    """levels (0.15, 0.1 * 3, 1) of a bond of 10 keep 2 (1.5 up) and 3 (3.0000000000000004 is 3) channels."""
    # kills mutants G06 (no float tolerance: 0.1 * 3 of 10 kept 4) and G07 (fractions rounded down: 0.15 of 10 kept 1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 80))
    net[2] = MPOLinear.from_linear(net[2], max_bond=10, num_cores=3)
    layer = gate(net, GatingConfig(levels=(0.15, 0.1 * 3, 1.0)))[2]
    assert layer.bond_dims == (10, 10)
    assert layer.level_widths == [(2, 2), (3, 3), (10, 10)]
    assert gating_report(net)[0]["level_widths"] == [[2, 2], [3, 3], [10, 10]]
    layer.eval()
    x = torch.randn(3, 96)
    with torch.no_grad():
        y = layer(x, levels=torch.tensor([0, 1, 2]))
    for i, w in enumerate([(2, 2), (3, 3), (10, 10)]):  # each row really runs at its level's widths
        ref = x[i] @ layer.to_mpo().slice_bonds(w).to_matrix().T + layer.bias
        torch.testing.assert_close(y[i], ref, rtol=1e-4, atol=1e-4)


def test_a_zero_price_moves_additively_by_the_step_times_the_scale():
    """A tracked price of exactly 0 (a fresh layer's) must move: multiplying it would keep it at 0 forever."""
    layer = gate(model_with_mpo(), GatingConfig())[2]
    assert float(layer.budget_lambda) == 0.0
    tracker = PriceTracker([layer], budget=0.5, rate=0.1, scale=4.0, shared=False)
    tracker.report(layer, used=0.75 * layer.full_cost * 10, rows=10)  # step = 0.1 * (0.75 - 0.5) / 0.5 = 0.05
    assert float(layer.budget_lambda) == pytest.approx(0.2, rel=1e-12)


def test_a_copy_made_mid_round_drops_the_rounds_spent_flops():
    """A model copied mid-round: the copy's first round counts only its own calls, not the original's."""
    net = _mut_two_gated_layers()
    a, b = net[0], net[2]
    for m in (a, b):
        m.budget_lambda.fill_(1.0)
    tracker = PriceTracker([a, b], budget=0.5, rate=0.1, scale=1.0, shared=True)
    a._tracker = b._tracker = tracker
    tracker.report(a, used=a.full_cost * 10, rows=10)  # the original's round in progress: full width, over budget
    twin = copy.deepcopy(net)
    t2 = twin[0]._tracker
    assert t2 is twin[2]._tracker and (t2.used, t2.full, t2.seen) == (0.0, 0.0, set())
    for m in (twin[0], twin[2]):
        t2.report(m, used=0.5 * m.full_cost * 10, rows=10)  # exactly at the budget: the price stays
    assert t2.rounds == 1 and float(twin[0].budget_lambda) == float(twin[2].budget_lambda) == 1.0
    assert tracker.used == a.full_cost * 10  # the original's round goes on


def test_a_gated_spec_without_levels_is_a_clear_error():
    """A checkpoint record of a gated layer that lost its 'levels' entry: a ValueError naming it, not a KeyError."""
    spec = gated_layer()[1].spec()
    del spec["levels"]
    with pytest.raises(ValueError, match="missing 'levels'"):
        GatedMPOLinear.from_spec(spec)


def test_explicit_levels_override_the_full_mode():
    """forward(x, levels=...) in mode 'full' runs the given levels' widths, as in every other mode."""
    net, layer = gated_layer()
    set_mode(net, "full")
    layer.eval()
    x = torch.randn(4, 96)
    with torch.no_grad():
        y = layer(x, levels=torch.tensor([0, 0, 1, 3]))
    for i, lv in enumerate([0, 0, 1, 3]):
        ref = x[i] @ layer.to_mpo().slice_bonds(layer.level_widths[lv]).to_matrix().T + layer.bias
        torch.testing.assert_close(y[i], ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(y[0], layer.weight_matrix() @ x[0] + layer.bias, atol=1e-3)  # not the full width


def test_a_level_override_past_the_last_level_is_refused():
    """levels=[4] on a 4-level layer is out of range: a ValueError, not a silent run at some other width."""
    net, layer = gated_layer()
    layer.eval()
    with pytest.raises(ValueError, match=r"levels must be 3 indices in \[0, 4\)"):
        layer(torch.randn(3, 96), levels=torch.tensor([0, 3, 4]))
    with pytest.raises(ValueError, match=r"indices in \[0, 4\)"):
        layer(torch.randn(3, 96), levels=torch.tensor([4, 4, 4]))


def test_one_group_calibration_passes_stay_out_of_the_report():
    """set_budget(max_groups=1) routes each calibration call at one level: those rows are not counted as traffic."""
    net = gate(model_with_mpo(), GatingConfig(controller="error")).eval()
    bondgate.fit_controllers(net, [torch.randn(128, 96)])
    with warnings.catch_warnings():  # whole calls at one level: the budget is met only coarsely (not checked here)
        warnings.simplefilter("ignore")
        set_budget(net, 0.6, [torch.randn(16, 96) for _ in range(4)], rounds=2, max_groups=1)
    assert gating_report(net)[0]["rows"] == 0
    with torch.no_grad():
        net(torch.randn(10, 96))
        net(torch.randn(1, 96))
    assert gating_report(net)[0]["rows"] == 11


def test_gate_leaves_layers_whose_bonds_are_all_one():
    """An MPO whose every bond is 1 (or a rank-1 pair) has one width only: gate keeps it a plain layer."""
    torch.manual_seed(0)
    m = nn.Sequential(MPOLinear.from_linear(nn.Linear(32, 48), max_bond=1, num_cores=2), nn.ReLU(),
                      MPOLinear.from_linear(nn.Linear(48, 64), max_bond=6))
    assert m[0].bond_dims == (1,)
    gate(m, GatingConfig())
    assert type(m[0]) is MPOLinear and isinstance(m[2], GatedMPOLinear)
    with pytest.raises(ValueError, match="none of the targeted layers has a bond wider than 1"):
        gate(nn.Sequential(MPOLinear.from_linear(nn.Linear(32, 48), max_bond=1, num_cores=2)), GatingConfig())


def test_gating_a_bare_mpo_layer_is_refused():
    """gate(MPOLinear(...)) cannot swap the model itself: a ValueError says to pass a model containing it."""
    layer = model_with_mpo()[2]
    with pytest.raises(ValueError, match="pass a model containing MPO layers, not a bare MPOLinear"):
        gate(layer, GatingConfig())
    assert type(layer) is MPOLinear


def test_an_unreachable_budget_prices_at_the_bound_not_past_it():
    """set_budget(0.01) that no price can meet sets the price to PRICE_BOUND, the end of its search range."""
    net, data = _fitted_error_net()
    net.eval()
    with pytest.warns(UserWarning, match="budget of 0.01 is out of reach"):
        set_budget(net, 0.01, data)
    assert float(net[2].budget_lambda) == bondgate.gating.PRICE_BOUND
    assert gating_report(net)[0]["lambda"] == bondgate.gating.PRICE_BOUND


def test_latency_keeps_a_shared_trackers_round_in_progress():
    """bondgate.latency mid-round: the tracker's round (which layers reported, their FLOPs) is as before after it."""
    net = _mut_two_gated_layers()
    a, b = net[0], net[2]
    tracker = PriceTracker([a, b], budget=0.5, rate=0.1, scale=1.0, shared=True)
    a._tracker = b._tracker = tracker
    with torch.no_grad():
        a(torch.randn(4, 64))  # layer 0 of 2 has reported: a round in progress
    state = (set(tracker.seen), tracker.used, tracker.full, tracker.rounds)
    assert state[0] == {id(a)} and state[3] == 0
    bondgate.latency(net, torch.randn(4, 64), reps=3, warmup=0)
    assert (tracker.seen, tracker.used, tracker.full, tracker.rounds) == state
    with torch.no_grad():
        b(torch.randn(4, 64))  # the other layer closes that round
    assert tracker.rounds == 1 and not tracker.seen


def test_fit_controllers_samples_at_most_max_rows():
    """fit_controllers(max_rows=100, rows_per_batch=64) fits on exactly 100 rows: the last batch gives the rest."""
    net = gate(model_with_mpo(), GatingConfig(controller="error", rank=4))
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(80, 96, generator=gen) for _ in range(3)]
    report = bondgate.fit_controllers(net, data, rows_per_batch=64, max_rows=100)
    assert [r["rows"] for r in report] == [100]
    assert [r["rows"] for r in bondgate.fit_controllers(net, data, rows_per_batch=64, max_rows=1000)] == [192]


@pytest.mark.parametrize("kind", ["linear", "error"])
def test_a_float64_layer_gets_a_float64_controller(kind):
    """Gating a float64 MPO layer: its controller is float64 too, so a batch of float64 rows routes and runs."""
    net = model_with_mpo().double()
    layer = gate(net, GatingConfig(controller=kind))[2]
    assert {p.dtype for p in layer.controller.parameters()} == {torch.float64}
    layer.eval()
    x = torch.randn(5, 96, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float64 and gating_report(net)[0]["rows"] == 5
    lv = int(torch.tensor(gating_report(net)[0]["histogram"]).argmax())
    torch.testing.assert_close(y, layer(x, levels=torch.full((5,), lv)).detach())


def test_an_error_controller_fitted_on_the_norm_alone_counts_as_fitted():
    """A fit that moved only the norm term's coefficients (no projection matters) is a fit: set_budget does not warn."""
    net = gate(model_with_mpo(), GatingConfig(controller="error"))
    with torch.no_grad():
        net[2].controller.coef[:, -1] = torch.tensor([0.3, 0.2, 0.1, 0.0]) / 96
    assert not net[2].controller.coef[:, :-1].any()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_budget(net, 0.5, [torch.randn(64, 96)])
    assert [str(w.message) for w in caught if "not been fitted" in str(w.message)] == []
    with torch.no_grad():
        net[2].controller.coef[:, -1] = bondgate.gating.ErrorController.start_coef(net[2].levels, 96)
    with pytest.warns(UserWarning, match="not been fitted or trained"):  # back at its start: unfitted
        set_budget(net, 0.5, [torch.randn(64, 96)])



@pytest.mark.parametrize("mode", ["nested", "full", 0.5])
def test_set_budget_prices_and_leaves_the_gate_mode(mode):
    # called in another mode (nested after sandwich training), set_budget priced a routing that never ran: it
    # returned the budget while the model then spent 100%, or 0.24 / 0.48 once switched to "gate"
    torch.manual_seed(0)
    net = gate(model_with_mpo(), GatingConfig(controller="error"))
    data = [torch.randn(64, 96) for _ in range(4)]
    bondgate.fit_controllers(net, data)
    set_mode(net, mode)
    got = set_budget(net, 0.3, data)
    assert all(m.mode == "gate" for m in net.modules() if isinstance(m, GatedMPOLinear))
    net.eval()
    average_flops(net, reset=True)
    with torch.no_grad():
        for x in data:
            net(x)
    assert average_flops(net) == pytest.approx(got, abs=1e-6) and got == pytest.approx(0.3, abs=0.02)


class _ByKeyword(nn.Module):
    def __init__(self, net, keyword):
        super().__init__()
        self.net, self.keyword = net, keyword

    def forward(self, x):
        if self.keyword:  # nn.Linear.forward(input): valid torch, which some models write
            return self.net[2](input=torch.relu(self.net[0](input=x)))
        return self.net[2](torch.relu(self.net[0](x)))


def test_gated_layers_called_by_keyword_are_fitted_budgeted_and_run_as_called_by_position():
    # the calibration passes read positional inputs only ("GatedMPOLinear was called on NoneType"), and the gated
    # forward took x
    data = [torch.randn(128, 96, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    coefs, spent, outs = [], [], []
    for keyword in (True, False):
        model = _ByKeyword(gate(model_with_mpo(), GatingConfig(controller="error")), keyword)
        bondgate.fit_controllers(model, data)
        spent.append(set_budget(model, 0.5, data))
        coefs.append(model.net[2].controller.coef.detach().clone())
        model.eval()
        with torch.no_grad():
            outs.append([model(data[0]), model(data[0][:1]), model(data[0][:1])])  # the decode step: second call
    assert torch.equal(coefs[0], coefs[1]) and coefs[0].abs().sum() > 0 and spent[0] == spent[1]
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    layer, h = model.net[2], torch.relu(model.net[0](data[0]))
    levels = torch.arange(h.shape[0]) % len(layer.levels)
    with torch.no_grad():
        assert torch.equal(layer(input=h, levels=levels), layer(h, levels))


@pytest.mark.parametrize("field,value,error", [
    ("controller", "Error", ValueError), ("levels", (0.75, 0.25), ValueError), ("levels", (0.5, 2.0), ValueError),
    ("budget", 5.0, ValueError), ("rank", 0, ValueError), ("temperature", 0.0, ValueError),
    ("penalty", math.nan, ValueError), ("target_modules", 5, TypeError)])
def test_a_gating_config_changed_after_construction_is_checked_again(field, value, error):
    # gate took the changed field as it was: controller "Error" built a linear controller and bondgate.load refused the
    # checkpoint bondgate.save wrote; target_modules=5 raised "'int' object is not iterable"
    config = GatingConfig(controller="error")
    setattr(config, field, value)
    net = model_with_mpo()
    with pytest.raises(error, match=field):
        gate(net, config)
    assert type(net[2]) is MPOLinear  # untouched
    with pytest.raises(error, match=field):  # and every other entry that takes a GatingConfig
        GatedMPOLinear.from_mpo_linear(net[2], config)
    with pytest.raises(error, match=field):
        GatedMPOLinear.from_linear(nn.Linear(96, 80), max_bond=8, gating=config)
    fixed = GatingConfig()
    fixed.levels = [0.5, 1.0]  # a list: taken, as the constructor takes it
    assert gate(model_with_mpo(), fixed)[2].levels == (0.5, 1.0) and fixed.levels == (0.5, 1.0)


class _Twice(nn.Module):
    """One gated layer called on ``x`` and then on ``z`` (another row count) in every forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.g = MPOLinear.from_linear(nn.Linear(32, 32), max_bond=12)

    def forward(self, x, z):
        return self.g(x).sum() + self.g(torch.relu(z)).sum()


def _penalty_of(layer, inputs):
    """The budget penalty over every row of ``inputs`` (one tensor per call), row-weighted, differentiable."""
    means = []
    for x in inputs:
        probs = torch.softmax(layer.controller(x) / layer.temperature, -1)
        means.append((probs * layer.rel_cost.to(probs)).sum(-1).mean() + layer.controller_cost / layer.full_cost)
    rows = [x.shape[0] for x in inputs]
    mean = sum(m * n for m, n in zip(means, rows)) / sum(rows)
    return layer.penalty * (mean - layer.budget) ** 2


def test_the_budget_penalty_covers_every_call_of_a_layer_in_a_forward():
    # each training call overwrote the penalty: a layer called twice (shared) was penalized on its last call alone
    # (0.0539 where its rows over both calls give 0.1751), a gated Recurrent projection on its last time step only
    net = gate(_Twice(), GatingConfig(budget=0.3, penalty=5.0))
    layer = net.g
    with torch.no_grad():
        layer.controller.proj.weight.normal_()
    inputs = []
    layer.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach()))
    net.train()
    x, z = torch.randn(8, 32) * 5, torch.randn(3, 32)
    net(x, z)
    aux = bondgate.aux_losses(net)
    want = _penalty_of(layer, inputs)
    assert len(inputs) == 2 and aux.item() == pytest.approx(want.item(), rel=1e-5)
    assert aux.item() != pytest.approx(_penalty_of(layer, inputs[1:]).item(), rel=1e-2)  # not the last call's
    # its gradient reaches the controller from both calls
    got = torch.autograd.grad(aux, layer.controller.proj.weight)[0]
    torch.testing.assert_close(got, torch.autograd.grad(want, layer.controller.proj.weight)[0], rtol=1e-4, atol=1e-7)
    assert layer.bondgate_aux_loss() is None  # consumed
    # one call: the penalty as before, penalty * (E - budget)^2 of that call
    layer(x)
    assert layer.bondgate_aux_loss().item() == pytest.approx(_penalty_of(layer, [x]).item(), rel=1e-6)


def test_a_gated_recurrent_projection_is_penalized_at_every_time_step():
    torch.manual_seed(0)
    rnn = bondgate.Recurrent.from_torch(nn.GRU(16, 16))
    rnn.hh_l0 = MPOLinear.from_linear(rnn.hh_l0, max_bond=8)
    net = gate(nn.Sequential(rnn), GatingConfig(budget=0.3, target_modules=["hh_l0"]))
    layer = net[0].hh_l0
    with torch.no_grad():
        layer.controller.proj.weight.normal_()
    inputs = []
    layer.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach()))
    net.train()
    net(torch.randn(10, 4, 16))
    assert len(inputs) == 10  # one call per time step
    assert bondgate.aux_losses(net).item() == pytest.approx(_penalty_of(layer, inputs).item(), rel=1e-5)


def test_a_penalty_nobody_collects_is_dropped_after_the_backward_not_kept_step_after_step():
    # accumulated over the calls since it was collected, a penalty a training loop never collects must not hold every
    # step's autograd graph: the first call after a backward starts afresh; a no_grad call is not averaged in either
    import gc
    import weakref

    net = gate(_Twice(), GatingConfig(budget=0.3))
    layer = net.g
    with torch.no_grad():
        layer.controller.proj.weight.normal_()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 32), torch.randn(3, 32)).backward()
        opt.step()
    assert layer._aux[1] == 11  # one step's rows held
    with torch.no_grad():
        net(torch.randn(8, 32), torch.randn(3, 32))
    inputs = []
    hook = layer.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach()))
    x, z = torch.randn(8, 32), torch.randn(3, 32)
    net(x, z)
    hook.remove()
    assert bondgate.aux_losses(net).item() == pytest.approx(_penalty_of(layer, [x, torch.relu(z)]).item(), rel=1e-5)
    net(x, z)  # a penalty held when the model goes: freed with it (its autograd hooks hold the layer weakly)
    ref = weakref.ref(layer)
    del net, layer, opt
    gc.collect()
    assert ref() is None


@pytest.mark.filterwarnings("ignore:fit_controllers")
def test_fit_controllers_reports_nan_r2_for_a_target_that_is_zero_on_every_row():
    # all-zero inputs: every level's target is 0, and the branch meant for the full level recorded R^2 = 1.0 where the
    # docstring and the warning say NaN
    torch.manual_seed(0)
    net = nn.Sequential(MPOLinear.from_linear(nn.Linear(32, 32), max_bond=12), nn.ReLU(), nn.Linear(32, 8))
    gate(net, GatingConfig(controller="error"))
    with pytest.warns(UserWarning, match="R\\^2 NaN"):
        report = bondgate.fit_controllers(net, [torch.zeros(64, 32)])
    r2 = report[0]["r2"]
    assert all(math.isnan(v) for v in r2[:-1]) and r2[-1] == 1.0


def test_gate_warns_of_target_entries_that_select_no_mpo_layer():
    # a typo ("22" for "2") or a dense nn.Linear in target_modules was ignored in silence (compress warns of both)
    def net():
        torch.manual_seed(0)
        return nn.Sequential(MPOLinear.from_linear(nn.Linear(32, 32), max_bond=12), nn.ReLU(), nn.Linear(32, 32),
                             MPOLinear.from_linear(nn.Linear(32, 32), max_bond=12))

    with pytest.warns(UserWarning, match=r"target_modules \['22'\] match no module"):
        m = gate(net(), GatingConfig(target_modules=["0", "22"]))
    assert [type(x).__name__ for x in m] == ["GatedMPOLinear", "ReLU", "Linear", "MPOLinear"]
    with pytest.warns(UserWarning, match=r"select no MPO or low-rank layer, only 2 \(Linear\)"):
        gate(net(), GatingConfig(target_modules=["0", "2"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gate(net(), GatingConfig(target_modules=["0", "3"]))  # both MPO layers: no warning
        gate(net(), GatingConfig(target_modules="[03]"))  # a regex matching dense layers too is a pattern: fine
    # a layer shared by two parents is selected by either of its names (the second one selected nothing)
    shared = nn.Module()
    shared.a = shared.b = MPOLinear.from_linear(nn.Linear(32, 32), max_bond=12)
    gate(shared, GatingConfig(target_modules=["b"]))
    assert isinstance(shared.a, GatedMPOLinear) and shared.a is shared.b


@pytest.mark.parametrize("fractions,error", [((0.0, 1.0), ValueError), ((2.0,), ValueError), ((-1,), ValueError),
                                             ((math.nan,), ValueError), (("a",), TypeError), (0.5, TypeError)])
def test_width_error_curve_refuses_fractions_outside_zero_one(fractions, error):
    # 0, -1 and 2.0 gave numbers; NaN raised "cannot convert float NaN to integer"; "a" a raw TypeError
    _, layer = gated_layer()
    with pytest.raises(error, match="fractions"):
        width_error_curve(layer, fractions)
    assert width_error_curve(layer, torch.tensor([0.5, 1.0])) == width_error_curve(layer, (0.5, 1.0))


@pytest.mark.parametrize("rank_form", [False, True])
def test_a_gated_layers_flops_follow_its_fixed_width_mode(rank_form):
    # in mode 0.25 flops() returned the full width's FLOPs (14336 where the level's contraction costs 1280)
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    net = gate(nn.Sequential(bondgate.LowRankLinear.from_linear(lin, rank=16) if rank_form
                             else MPOLinear.from_linear(lin, max_bond=16)), GatingConfig())
    layer = net[0]
    full = [layer.flops(r) for r in (1, 8, 64)]
    for mode in ("full", "nested"):
        set_mode(net, mode)
        assert [layer.flops(r) for r in (1, 8, 64)] == full
    for frac in (0.25, 0.5):
        set_mode(net, frac)
        w = layer.level_widths[layer.levels.index(frac)]
        if rank_form:  # two matmuls on the rank's prefix
            want = [2 * r * w[0] * (64 + 64) for r in (1, 8, 64)]
        else:  # the plan of the level's sliced cores
            want = [MPOLinear.from_mpo(layer.to_mpo().slice_bonds(w), policy=layer.policy).flops(r) for r in (1, 8, 64)]
        got = [layer.flops(r) for r in (1, 8, 64)]
        assert got == want and got[0] < full[0] and layer.flops(0) == 0
        assert got[0] == layer.level_cost[layer.levels.index(frac)]  # one row: the level's cost per row


def test_distill_drops_the_penalty_a_failed_forward_left():
    # the penalty is a mean over a layer's training calls since collected: a forward that raised (an out-of-memory
    # retry) left its calls in, and the next step's penalty averaged them in
    torch.manual_seed(0)
    layer = bondgate.MPOLinear.from_linear(nn.Linear(32, 32), max_bond=12)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.g, self.fail = layer, False

        def forward(self, x):
            y = self.g(x)
            if self.fail:
                raise RuntimeError("out of memory")
            return y

    student = Net()
    bondgate.gate(student, GatingConfig(budget=0.3, penalty=5.0))
    with torch.no_grad():
        student.g.controller.proj.weight.normal_()
    teacher = nn.Sequential(nn.Linear(32, 32)).eval()
    student.train()
    student.fail = True
    with pytest.raises(RuntimeError, match="out of memory"):
        student(torch.randn(64, 32) * 5)  # its rows' expected cost, held
    student.fail = False
    x = torch.randn(8, 32)
    from bondgate.distill import _step_loss  # one step of distill's loop

    with torch.no_grad():
        t_out = teacher(x)
    _, parts, _ = _step_loss(student, x, t_out, bondgate.DistillLoss(hidden=0, output=1.0), False, False)
    student(x)  # the same step's penalty on its own rows alone
    alone = float(bondgate.aux_losses(student))
    assert parts["aux"] == pytest.approx(alone, rel=1e-6), (parts["aux"], alone)
