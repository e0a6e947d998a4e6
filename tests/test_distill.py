"""Healing by distillation: the loss terms and the training loop."""

import copy

import pytest
import torch
from torch import nn

from bondgate import CompressionConfig, DistillLoss, compress, distill


def teacher_student():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16))
    student = copy.deepcopy(teacher)
    compress(student, CompressionConfig(param_ratio=0.25, num_cores=2), progress=False)
    data = [torch.randn(64, 32) for _ in range(8)]
    return teacher, student, data


def output_gap(student, teacher, xs):
    with torch.no_grad():
        return sum(float(((student(x) - teacher(x)) ** 2).mean()) for x in xs) / len(xs)


def test_distill_closes_the_gap_to_the_teacher():
    teacher, student, data = teacher_student()
    held_out = [torch.randn(64, 32) for _ in range(4)]
    before = output_gap(student, teacher, held_out)
    res = distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), epochs=40, lr=3e-3, progress=False)
    assert res.steps == 40 * len(data) and res.stopped == "epochs"
    assert output_gap(student, teacher, held_out) < 0.5 * before
    assert all(not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("ambient", [torch.no_grad, torch.inference_mode])
def test_distill_trains_whatever_the_callers_grad_mode(ambient):
    teacher, student, data = teacher_student()
    before = output_gap(student, teacher, data)
    with ambient():
        res = distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), epochs=10, lr=3e-3,
                      progress=False)
    assert res.steps == 10 * len(data) and output_gap(student, teacher, data) < 0.7 * before


def test_early_stopping_restores_the_best_weights():
    teacher, student, data = teacher_student()
    held_out = [torch.randn(64, 32) for _ in range(2)]
    calls = []

    def metric(model):
        calls.append(1)
        # a metric that peaks at the 2nd evaluation, then falls: training must stop and roll back
        return [0.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1][min(len(calls) - 1, 6)]

    res = distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=1000, lr=1e-3,
                  eval_fn=metric, eval_every=2, patience=3, progress=False)
    assert res.stopped == "early stopping" and res.best_metric == 1.0 and res.best_step == 2
    assert res.steps == 8
    # the restored weights are those of step 2, not of step 8
    assert output_gap(student, teacher, held_out) >= 0  # model still runs


def test_patience_counts_evaluations_not_loss_logs():
    teacher, student, data = teacher_student()
    calls = []

    def metric(model):
        calls.append(1)
        return [0.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1][min(len(calls) - 1, 6)]  # best at the 2nd evaluation

    res = distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=1000, lr=1e-3,
                  eval_fn=metric, eval_every=4, log_every=1, patience=3, progress=False)
    # evaluations at steps 0, 4 (best), 8, 12, 16: three without improvement after step 4 -> stop at 16
    assert res.stopped == "early stopping" and res.best_step == 4 and res.steps == 16
    assert len(calls) == 5


def test_time_budget_stops():
    teacher, student, data = teacher_student()
    res = distill(student, teacher, data * 1000, loss=DistillLoss(hidden=0, output=1.0), max_minutes=0.02,
                  progress=False)
    assert res.stopped == "time budget" and 1.0 <= res.seconds < 10


def test_needs_a_stopping_rule():
    teacher, student, data = teacher_student()
    with pytest.raises(ValueError, match="at least one"):
        distill(student, teacher, data)


def test_hidden_logit_and_pooled_terms_on_a_transformer():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    teacher = transformers.GPT2LMHeadModel(cfg).eval()
    student = copy.deepcopy(teacher)
    compress(student, CompressionConfig(param_ratio=0.3, num_cores=2), progress=False)
    ids = torch.randint(0, 50, (4, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    loss = DistillLoss(hidden=1.0, logits=1.0, pooled=1.0, task=0.1)
    s = student(**batch, output_hidden_states=True)
    t = teacher(**batch, output_hidden_states=True)
    total, parts = loss(s, t, batch)
    assert set(parts) == {"hidden", "logits", "pooled", "task"} and all(v > 0 for v in parts.values())
    zero, parts0 = loss(t, t, batch)
    assert parts0["hidden"] == 0 and parts0["pooled"] < 1e-6 and abs(parts0["logits"]) < 1e-6
    heal = DistillLoss(hidden=1.0, logits=1.0, pooled=1.0)
    res = distill(student, teacher, [batch] * 30, loss=heal, steps=30, lr=1e-3, progress=False)
    s2 = student(**batch, output_hidden_states=True)
    assert heal(s2, t, batch)[0] < 0.5 * heal(s, t, batch)[0]
    assert res.steps == 30


def test_distill_with_empty_or_exhausted_data_returns():
    # Issue 18.3: an empty iterable, or a generator exhausted after its first epoch, used to loop forever
    teacher, student, data = teacher_student()
    with pytest.raises(ValueError, match="no batches"):
        distill(student, teacher, [], steps=10, progress=False)
    with pytest.warns(UserWarning, match="one-shot iterator"):
        res = distill(student, teacher, (x for x in data), loss=DistillLoss(hidden=0, output=1.0), steps=100,
                      progress=False)
    assert res.steps == len(data) and res.stopped == "data exhausted"


@pytest.mark.parametrize("kw, match", [({"steps": 0}, "steps"), ({"steps": -3}, "steps"), ({"epochs": 0}, "epochs"),
                                       ({"steps": 2.5}, "steps"), ({"max_minutes": 0}, "max_minutes"),
                                       ({"max_minutes": float("nan")}, "max_minutes"), ({}, "at least one")])
def test_distill_rejects_nonsense_lengths(kw, match):
    teacher, student, data = teacher_student()
    with pytest.raises(ValueError, match=match):
        distill(student, teacher, data, progress=False, **kw)


def test_distill_stops_on_a_nan_loss_before_the_weights_are_touched():
    teacher, student, data = teacher_student()
    bad = [*data[:3], torch.full((64, 32), float("nan")), *data[3:]]
    with pytest.raises(FloatingPointError, match="step 4"):
        distill(student, teacher, bad, loss=DistillLoss(hidden=0, output=1.0), steps=20, lr=1e-3, progress=False)
    assert all(bool(torch.isfinite(p).all()) for p in student.parameters())


def test_distill_moves_batches_to_the_models_device(device):
    teacher, student, data = teacher_student()
    teacher.to(device)
    student.to(device)
    res = distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=3, progress=False)  # CPU data
    assert res.steps == 3 and next(student.parameters()).device.type == device.type


def test_time_budgeted_schedule_is_replanned_when_the_first_steps_are_slow():
    # the first 20 steps (plan autotuning, allocator warm-up) are slower than the rest; a schedule planned from them
    # alone ended at learning rate 0 halfway through MiniLM's 40-minute heal (2055 steps, planned ~900)
    import time

    teacher, student, data = teacher_student()

    class SlowStart:
        def __init__(self):
            self.served = 0

        def __iter__(self):
            for x in data:
                self.served += 1
                if self.served <= 20:
                    time.sleep(0.03)
                yield x

    res = distill(student, teacher, SlowStart(), loss=DistillLoss(hidden=0, output=1.0), max_minutes=0.04,
                  budget_clock="wall", progress=False)
    assert res.stopped == "time budget" and res.steps > 60
    # planned from the first 20 steps alone: ~20 * 2.4 s / 0.6 s = 80 steps, a fraction of those run
    assert abs((res.planned_steps or 0) - res.steps) <= 0.2 * res.steps, (res.planned_steps, res.steps)
