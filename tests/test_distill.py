"""Healing by distillation: the loss terms and the training loop."""

import copy
import math
import sys
import time
import types
import warnings

import pytest
import torch
from torch import nn

from bondgate import CompressionConfig, DistillLoss, compress, distill


def teacher_student():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16))
    student = copy.deepcopy(teacher)
    compress(student, CompressionConfig(param_ratio=0.25, num_cores=2, kinds="mpo"), progress=False)
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
    assert all(p.requires_grad for p in teacher.parameters())  # left as it was (it runs under no_grad)


@pytest.mark.parametrize("ambient", [torch.no_grad, torch.inference_mode])
def test_distill_trains_whatever_the_callers_grad_mode(ambient):
    teacher, student, data = teacher_student()
    before = output_gap(student, teacher, data)
    with ambient():
        res = distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), epochs=10, lr=3e-3,
                      progress=False)
    assert res.steps == 10 * len(data) and output_gap(student, teacher, data) < 0.7 * before


def test_data_made_under_inference_mode_trains_and_calibrates():
    # features cached under torch.inference_mode: autograd cannot save inference tensors for backward, so distill
    # and compress's sensitivity pass (a backward per batch) failed with torch's error; they are cloned at the call
    teacher, student, _ = teacher_student()
    with torch.inference_mode():
        data = [torch.randn(64, 32) for _ in range(8)]
        packed = [(torch.randn(64, 32),)]
    before = output_gap(student, teacher, data)
    distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), epochs=10, lr=3e-3, progress=False)
    assert output_gap(student, teacher, data) < 0.7 * before
    sens = compress(copy.deepcopy(teacher), CompressionConfig(param_ratio=0.4, layer_weighting="sensitivity"),
                    calibration=data + packed, progress=False)
    assert 0.3 < sens.bondgate_report.ratio <= 0.4 and all(not t.is_inference() for t in sens.state_dict().values())


def test_early_stopping_restores_the_best_weights():
    teacher, student, data = teacher_student()
    held_out = [torch.randn(64, 32) for _ in range(2)]
    seen = []  # the weights each evaluation saw

    def metric(model):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        # a metric that peaks at the 2nd evaluation, then falls: training must stop and roll back
        return [0.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1][min(len(seen) - 1, 6)]

    res = distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=1000, lr=1e-3,
                  eval_fn=metric, eval_every=2, patience=3, progress=False)
    assert res.stopped == "early stopping" and res.best_metric == 1.0 and res.best_step == 2
    assert res.steps == 8
    assert [h["step"] for h in res.history if "metric" in h] == [0, 2, 4, 6, 8] and len(seen) == 5
    # the restored weights are exactly those the step-2 evaluation saw, not those of step 8 (which differ)
    final = student.state_dict()
    assert set(final) == set(seen[1])
    assert all(torch.equal(final[k], seen[1][k]) for k in final)
    assert not all(torch.equal(final[k], seen[4][k]) for k in final)
    with torch.no_grad():
        x = held_out[0]
        twin = copy.deepcopy(student)
        twin.load_state_dict(seen[1])
        assert torch.equal(student(x), twin(x))
    assert output_gap(student, teacher, held_out) > 0  # a compressed model: not the teacher


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


def _step_clock(monkeypatch, student, seconds_of_call):
    """A fake wall clock for distill that advances only when ``student`` runs: call ``n`` (1, 2, ...) of its forward
    takes ``seconds_of_call(n)`` seconds. Returns the clock's state (``now``, ``calls``)."""
    clock = {"now": 0.0, "calls": 0}

    def tick(module, args, output):
        clock["calls"] += 1
        clock["now"] += seconds_of_call(clock["calls"])

    student.register_forward_hook(tick)
    module = sys.modules["bondgate.distill"]  # (bondgate.distill is the function)
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"],
                                                               process_time=time.process_time))
    return clock


def test_time_budget_stops(monkeypatch):
    teacher, student, data = teacher_student()
    # every training step takes 0.125 s on the fake clock (binary fractions: the sums are exact); an evaluation,
    # which is not charged to the budget, 10 s
    clock = _step_clock(monkeypatch, student, lambda n: 0.125)

    def slow_eval(model):
        clock["now"] += 10.0
        return 0.0

    res = distill(student, teacher, data * 1000, loss=DistillLoss(hidden=0, output=1.0), max_minutes=1 / 32,
                  eval_fn=slow_eval, eval_every=5, patience=None, progress=False)
    # 60 / 32 = 1.875 s of budget = 15 steps of 0.125 s; evaluations at steps 0, 5, 10, 15
    assert res.stopped == "time budget" and res.steps == 15 and clock["calls"] == 15
    assert res.budget_seconds == 1.875 and res.eval_seconds == 40.0 and res.seconds == 41.875
    assert [h["step"] for h in res.history if "metric" in h] == [0, 5, 10, 15]


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


def test_a_nan_score_is_never_the_best():
    # a collapsed zero-shot model can score NaN (Spearman of constant outputs): the training after it must count
    teacher, student, data = teacher_student()
    scores = iter([float("nan"), 0.1, 0.2, 0.3])
    res = distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=15, eval_fn=lambda m: next(scores),
                  eval_every=5, patience=2, progress=False)
    assert res.stopped == "steps" and res.best_step == 15 and res.best_metric == 0.3


class _Out:
    def __init__(self, hidden_states):
        self.hidden_states = hidden_states


def test_loss_refuses_outputs_that_do_not_correspond():
    h = [torch.randn(2, 5, 8) for _ in range(3)]
    with pytest.raises(ValueError, match="student returns 2 hidden states, the teacher 3"):
        DistillLoss()(_Out(h[:2]), _Out(h))
    with pytest.raises(ValueError, match=r"hidden state 1 has shape \(2, 5, 4\)"):
        DistillLoss(pooled=1.0)(_Out([h[0], h[1][..., :4], h[2]]), _Out(h))
    with pytest.raises(ValueError, match=r"output has shape \(8, 1\), the teacher's \(8, 4\)"):
        DistillLoss(hidden=0, output=1.0)(torch.randn(8, 1), torch.randn(8, 4))
    with pytest.raises(ValueError, match="distill asks transformers models for them .* when the loss wants them"):
        DistillLoss()(torch.randn(8, 4), torch.randn(8, 4))
    # a row without a real token has no embedding to match: the pooled term skips it instead of going NaN
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    ht = [torch.randn(2, 5, 8) for _ in range(3)]
    total, parts = DistillLoss(hidden=1.0, pooled=1.0)(_Out([x + 0.1 for x in ht]), _Out(ht), {"attention_mask": mask})
    assert torch.isfinite(total) and parts["pooled"] > 0
    one, _ = DistillLoss(hidden=0, pooled=1.0)(_Out([x[:1] + 0.1 for x in ht]), _Out([x[:1] for x in ht]),
                                               {"attention_mask": mask[:1]})
    assert parts["pooled"] == pytest.approx(float(one))


@pytest.mark.parametrize("kw, match", [({"hidden": -1.0}, "hidden must be a finite number >= 0"),
                                       ({"logits": float("nan")}, "logits"), ({"temperature": 0.0}, "temperature"),
                                       ({"temperature": -2.0}, "temperature")])
def test_loss_rejects_nonsense_weights(kw, match):
    with pytest.raises(ValueError, match=match):
        DistillLoss(**kw)


def test_time_budget_schedule_warms_up_on_the_budget_clock(monkeypatch):
    # the first steps ran at the full rate when only a time budget was given (no step plan before step 20)
    teacher, student, data = teacher_student()
    lrs = []
    step = torch.optim.AdamW.step

    def record(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    # a clock that advances 1 ms per reading: the schedule is tested, not this machine's speed (a loaded machine took
    # so few steps that none landed near the peak)
    ticks = iter(range(10**9))
    module = sys.modules["bondgate.distill"]  # (bondgate.distill is the function)
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks) * 1e-3,
                                                                         process_time=time.process_time))
    res = distill(student, teacher, data * 1000, loss=DistillLoss(hidden=0, output=1.0), max_minutes=0.01, lr=1e-3,
                  warmup=0.2, budget_clock="wall", progress=False)
    assert res.stopped == "time budget" and len(lrs) == res.steps > 10
    assert lrs[0] <= 1e-4 and max(lrs) > 0.9e-3 and lrs[-1] < 0.1e-3  # warmed up, reached lr, decayed
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # rises without a drop


def test_a_nan_gradient_stops_before_the_weights_are_touched():
    teacher, student, data = teacher_student()

    class Sqrt(nn.Module):  # d sqrt(x)/dx is infinite at 0: a finite loss, a NaN gradient
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.zeros(()))

        def forward(self, y):
            return y + 0 * self.g.sqrt()

    model = nn.Sequential(student, Sqrt())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="gradient norm is nan at step 1"):
        distill(model, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=5, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kw, match", [({"steps": 0}, "steps"), ({"steps": -3}, "steps"), ({"epochs": 0}, "epochs"),
                                       ({"steps": 2.5}, "steps"), ({"max_minutes": 0}, "max_minutes"),
                                       ({"max_minutes": float("nan")}, "max_minutes"), ({}, "at least one"),
                                       ({"steps": 5, "eval_every": 0}, "eval_every"),
                                       ({"steps": 5, "log_every": 0}, "log_every"),
                                       ({"steps": 5, "patience": 0}, "patience"),
                                       ({"steps": 5, "warmup": 1.0}, "warmup"), ({"steps": 5, "lr": 0.0}, "lr")])
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


def test_time_budgeted_schedule_is_replanned_when_the_first_steps_are_slow(monkeypatch):
    # the first 20 steps (plan autotuning, allocator warm-up) are slower than the rest; a schedule planned from them
    # alone ended at learning rate 0 halfway through MiniLM's 40-minute heal (2055 steps, planned ~900)
    teacher, student, data = teacher_student()
    # on a fake clock: the first 20 steps take 0.125 s each (2.5 s), the rest 1/128 s; a 3.75 s budget leaves
    # 1.25 s for 160 fast steps: 180 in all (binary fractions: every sum is exact)
    _step_clock(monkeypatch, student, lambda n: 0.125 if n <= 20 else 1 / 128)
    res = distill(student, teacher, data * 30, loss=DistillLoss(hidden=0, output=1.0), max_minutes=1 / 16,
                  budget_clock="wall", progress=False)
    assert res.stopped == "time budget" and res.steps == 180 and res.budget_seconds == 3.75
    # planned at step 20 from the slow steps alone: 20 + 8 steps/s * 1.25 s = 30; re-planned at step 50 from the 30
    # steps since (128 steps/s): 50 + 128 * (3.75 - 2.734375) = 180, where it stays
    assert res.planned_steps == 180


def test_masked_hidden_loss_with_a_float16_teacher():
    """tokens x hidden past float16's largest (65504): the masked mean's count must not overflow."""
    gen = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 300, 256, generator=gen) for _ in range(2)]  # [0]: the embeddings, not compared
    teacher = [torch.randn(2, 300, 256, generator=gen).half() for _ in range(2)]
    batch = {"attention_mask": torch.ones(2, 300, dtype=torch.long)}

    class Out(dict):
        def __getattr__(self, k):
            return self[k]

    loss = DistillLoss(hidden=1.0, logits=0.0)
    _, half = loss(Out(hidden_states=student), Out(hidden_states=teacher), batch)
    _, full = loss(Out(hidden_states=student), Out(hidden_states=[t.float() for t in teacher]), batch)
    assert half["hidden"] == pytest.approx(full["hidden"], rel=1e-3) and half["hidden"] > 0


def _tiny_gpt2_student(transformers, quantize=None):
    """A 1-layer GPT-2 teacher, its copy compressed to half, and 8 unlabelled 12-token rows."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    teacher = transformers.GPT2LMHeadModel(cfg).eval()
    student = copy.deepcopy(teacher)
    compress(student, CompressionConfig(param_ratio=0.5, policy="memory", quantize=quantize), progress=False)
    return teacher, student, [{"input_ids": torch.randint(0, 64, (12,))} for _ in range(8)]


def test_distillation_trainer_reports_an_eval_loss_on_unlabelled_data(tmp_path):
    # the stock prediction_step computes a loss only for batches with labels: distillation data (none) gave no
    # eval_loss, and load_best_model_at_end failed on the missing metric
    transformers = pytest.importorskip("transformers")
    import bondgate

    teacher, student, ds = _tiny_gpt2_student(transformers)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                          per_device_eval_batch_size=4, disable_tqdm=True)
    trainer = bondgate.DistillationTrainer(model=student, teacher=teacher, args=args, eval_dataset=ds,
                                           distill_loss=DistillLoss(hidden=0, logits=1.0))
    metrics = trainer.evaluate()
    losses = []
    with torch.no_grad():
        for i in (0, 4):  # the two eval batches; the Trainer averages their losses
            ids = torch.stack([d["input_ids"] for d in ds[i:i + 4]])
            losses.append(float(DistillLoss(hidden=0, logits=1.0)(student(ids), teacher(ids))[0]))
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / 2, rel=1e-4)


def test_distillation_trainer_evaluation_is_not_gating_traffic(tmp_path):
    # evaluate() added its rows to the level counts saved with checkpoints and moved a tracked price (distill's
    # eval_fn left both as they were)
    transformers = pytest.importorskip("transformers")
    import bondgate

    teacher, student, ds = _tiny_gpt2_student(transformers)
    bondgate.gate(student, bondgate.GatingConfig(levels=(0.25, 0.5, 1.0)))
    student.eval()
    calib = [{"input_ids": torch.stack([d["input_ids"] for d in ds])}]
    bondgate.set_budget(student, 0.5, calib, track=0.05)
    bondgate.gating_report(student, reset=True)
    price = {n: b.clone() for n, b in student.named_buffers() if n.endswith("budget_lambda")}
    assert price
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                          per_device_eval_batch_size=4, disable_tqdm=True)
    trainer = bondgate.DistillationTrainer(model=student, teacher=teacher, args=args, eval_dataset=ds,
                                           distill_loss=DistillLoss(hidden=0, logits=1.0))
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    assert all(row["rows"] == 0 for row in bondgate.gating_report(student))
    assert all(torch.equal(b, price[n]) for n, b in student.named_buffers() if n in price)
    with torch.no_grad():
        student(calib[0]["input_ids"])  # ordinary calls still count
    assert any(row["rows"] > 0 for row in bondgate.gating_report(student))


def test_distillation_trainer_checkpoints_hold_int8_layers_masters(tmp_path):
    # resuming from an int8 checkpoint rounded the masters to the int8 grid (resumed and straight runs diverged)
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    import bondgate

    teacher, student, ds = _tiny_gpt2_student(transformers, quantize="int8")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1,
                                          save_steps=1, per_device_train_batch_size=4, disable_tqdm=True)
    bondgate.DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=ds,
                                 distill_loss=DistillLoss(hidden=0, logits=1.0)).train()
    saved = load_file(str(next(tmp_path.glob("checkpoint-1/*.safetensors"))))
    mpo = {n: m for n, m in student.named_modules() if isinstance(m, bondgate.MPOLinear)}
    assert mpo and all(torch.equal(saved[f"{n}.cores.0"], m.cores[0].detach()) for n, m in mpo.items())
    assert student.state_dict()[f"{next(iter(mpo))}.cores.0"].dtype == torch.int8  # outside checkpoints: int8


def test_distillation_trainer_refuses_a_frozen_student_as_distill_does(tmp_path):
    transformers = pytest.importorskip("transformers")
    import bondgate

    teacher, student, ds = _tiny_gpt2_student(transformers)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1,
                                          per_device_train_batch_size=4, disable_tqdm=True)
    trainer = bondgate.DistillationTrainer(model=student.requires_grad_(False), teacher=teacher, args=args,
                                           train_dataset=ds)
    with pytest.raises(ValueError, match="the student has no trainable parameters"):
        trainer.train()


def test_distillation_trainer_writes_bondgate_checkpoints_that_resume_and_load(tmp_path):
    # transformers' save_pretrained refused a table compressed with its tied head (shared tensors: the first
    # checkpoint crashed training) and wrote int8 cores that neither bondgate.from_pretrained nor transformers read
    transformers = pytest.importorskip("transformers")
    import bondgate

    def run(out, steps, resume=None):
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
        teacher = transformers.GPT2LMHeadModel(cfg).eval()
        student = copy.deepcopy(teacher)
        # memory policy: "auto" picks kernels by timing, and two runs with different kernels round differently
        compress(student, CompressionConfig(param_ratio=0.5, embeddings=True, quantize="int8", policy="memory"),
                 progress=False)
        assert student.lm_head.cores is student.transformer.wte.cores  # the tied MPO head
        ds = [{"input_ids": torch.randint(0, 64, (12,))} for _ in range(8)]
        args = transformers.TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, max_steps=steps,
                                              save_steps=1, per_device_train_batch_size=4, disable_tqdm=True,
                                              learning_rate=1e-3)
        trainer = bondgate.DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=ds,
                                               distill_loss=DistillLoss(hidden=0, logits=1.0))
        trainer.train(resume_from_checkpoint=resume)
        with bondgate.quant.master_state():
            return trainer, {k: v.clone() for k, v in student.state_dict().items()}

    trainer, straight = run(tmp_path / "a", 2)
    trainer.save_model(str(tmp_path / "a" / "final"))
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        want = trainer.model.eval()(ids).logits
        for d in ("checkpoint-1", "checkpoint-2", "final"):  # masters in checkpoints, int8 in the final model
            assert (tmp_path / "a" / d / "bondgate.json").is_file()
            loaded = bondgate.from_pretrained(tmp_path / "a" / d)
            assert loaded.lm_head.cores is loaded.transformer.wte.cores
            if d != "checkpoint-1":
                assert torch.equal(loaded(ids).logits, want), d
    _, resumed = run(tmp_path / "b", 2, resume=str(tmp_path / "a" / "checkpoint-1"))
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)  # exact: the masters were restored


def test_encoder_decoder_outputs_match_both_streams_with_their_own_masks():
    # An encoder-decoder returns encoder_hidden_states and decoder_hidden_states (no hidden_states): the default
    # loss refused it, and its logits (decoder positions) were masked with the encoder's attention_mask.
    outputs = pytest.importorskip("transformers.modeling_outputs")
    torch.manual_seed(0)
    B, S, T, H, V = 2, 5, 5, 4, 7  # equal lengths: an encoder mask would fit the decoder's logits by shape

    def out(enc, dec, logits):
        return outputs.Seq2SeqLMOutput(logits=logits, encoder_last_hidden_state=enc[-1],
                                       encoder_hidden_states=tuple(enc), decoder_hidden_states=tuple(dec))

    enc_t, dec_t = [torch.randn(B, S, H) for _ in range(3)], [torch.randn(B, T, H) for _ in range(3)]
    enc_s, dec_s = [h + 0.1 * torch.randn_like(h) for h in enc_t], [h + 0.3 * torch.randn_like(h) for h in dec_t]
    z_t = torch.randn(B, T, V)
    z_s = z_t.clone()
    z_s[:, 3:] += torch.randn(B, 2, V)  # the student differs only where the decoder mask is 0
    enc_mask, dec_mask = torch.ones(B, S, dtype=torch.long), torch.ones(B, T, dtype=torch.long)
    enc_mask[0, 2:] = 0
    dec_mask[:, 3:] = 0
    batch = {"attention_mask": enc_mask, "decoder_attention_mask": dec_mask}

    def rel(a, b, m):
        w = m.unsqueeze(-1).float()
        return float(((a - b) ** 2 * w).sum() / (b**2 * w).sum())

    expected = [rel(a, b, enc_mask) for a, b in zip(enc_s[1:], enc_t[1:])]
    expected += [rel(a, b, dec_mask) for a, b in zip(dec_s[1:], dec_t[1:])]
    _, parts = DistillLoss(hidden=1.0, logits=1.0, pooled=1.0)(out(enc_s, dec_s, z_s), out(enc_t, dec_t, z_t), batch)
    assert parts["hidden"] == pytest.approx(sum(expected) / 4, rel=1e-5)
    assert parts["logits"] == pytest.approx(0.0, abs=1e-6)  # masked by decoder_attention_mask, not the encoder's
    pooled = lambda h: (h * enc_mask.unsqueeze(-1)).sum(1) / enc_mask.sum(1, keepdim=True)  # noqa: E731
    cos = torch.nn.functional.cosine_similarity(pooled(enc_s[-1]), pooled(enc_t[-1]), dim=-1)
    assert parts["pooled"] == pytest.approx(float((1 - cos).mean()), rel=1e-5)  # the encoder's sentence embedding


def test_encoder_decoder_decoder_padding_is_read_from_labels_without_a_decoder_mask():
    # a seq2seq collator pads labels with -100 and gives no decoder_attention_mask: the padded decoder positions
    # counted in the logits and decoder hidden terms (changing the student only there moved the loss 0.06 -> 25.6)
    outputs = pytest.importorskip("transformers.modeling_outputs")
    torch.manual_seed(0)
    B, S, T, H, V = 2, 4, 5, 3, 7

    def out(enc, dec, logits):
        return outputs.Seq2SeqLMOutput(logits=logits, encoder_last_hidden_state=enc[-1],
                                       encoder_hidden_states=tuple(enc), decoder_hidden_states=tuple(dec))

    enc, dec_t, z_t = [torch.randn(B, S, H) for _ in range(2)], [torch.randn(B, T, H) for _ in range(2)], \
        torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    labels[0, 3:] = -100
    labels[1, 4:] = -100
    pad = (labels == -100).unsqueeze(-1)
    dec_s = [h + 0.2 * torch.randn_like(h) for h in dec_t]
    z_s = z_t + 0.2 * torch.randn_like(z_t)
    far = out(enc, [torch.where(pad, h + 50, h) for h in dec_s], torch.where(pad, 5 * torch.randn_like(z_s), z_s))
    loss = DistillLoss(hidden=1.0, logits=1.0)
    parts = loss(out(enc, dec_s, z_s), out(enc, dec_t, z_t), {"labels": labels})[1]
    assert loss(far, out(enc, dec_t, z_t), {"labels": labels})[1] == pytest.approx(parts, rel=1e-6)
    explicit = {"labels": labels, "decoder_attention_mask": (labels != -100).long()}
    assert loss(out(enc, dec_s, z_s), out(enc, dec_t, z_t), explicit)[1] == pytest.approx(parts, rel=1e-6)
    # a given decoder mask wins over the labels
    all_on = {"labels": labels, "decoder_attention_mask": torch.ones(B, T, dtype=torch.long)}
    assert loss(far, out(enc, dec_t, z_t), all_on)[1]["logits"] > 20 * parts["logits"]


def test_a_tuple_batch_is_masked_like_the_dict_batch_and_gets_hidden_states():
    # (input_ids, attention_mask) was averaged over the padding (3.2x the dict batch's first loss) and, with
    # hidden > 0, refused for want of hidden states; a loss of one's own could not ask for them at all
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    teacher = transformers.BertForMaskedLM(cfg).eval()
    ids = torch.randint(0, 100, (4, 10))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    student = copy.deepcopy(teacher)
    compress(student, CompressionConfig(param_ratio=0.5), progress=False)

    def first_parts(batch, loss):
        res = distill(copy.deepcopy(student), teacher, [batch], loss=loss, steps=1, lr=1e-12, log_every=1,
                      progress=False)
        return {k: v for k, v in res.history[0]["loss"].items() if k in ("hidden", "logits")}

    for loss in (DistillLoss(hidden=0, logits=1), DistillLoss(hidden=1, logits=1)):
        as_dict = first_parts({"input_ids": ids, "attention_mask": mask}, loss)
        assert first_parts((ids, mask), loss) == pytest.approx(as_dict, rel=1e-6)
    with torch.no_grad():
        s, t = student(input_ids=ids, attention_mask=mask), teacher(input_ids=ids, attention_mask=mask)
    unmasked = DistillLoss(hidden=0, logits=1)(s, t, None)[1]["logits"]
    assert abs(as_dict["logits"] - unmasked) > 0.05 * unmasked  # the padding weighs in this batch (11%)

    class Own:
        inner = DistillLoss(hidden=1)

        def wants_hidden(self):
            return True

        def __call__(self, s_out, t_out, batch):
            return self.inner(s_out, t_out, batch)

    assert first_parts({"input_ids": ids, "attention_mask": mask}, Own())["hidden"] == pytest.approx(
        as_dict["hidden"], rel=1e-6)


def test_distill_heals_an_encoder_decoder_with_the_default_loss():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BartConfig(vocab_size=60, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=32, dropout=0.0, init_std=0.3)
    torch.manual_seed(0)
    teacher = transformers.BartForConditionalGeneration(cfg).eval()
    student = copy.deepcopy(teacher)
    data = [{"input_ids": torch.randint(3, 60, (4, 10)), "decoder_input_ids": torch.randint(3, 60, (4, 6))}
            for _ in range(4)]
    compress(student, CompressionConfig(param_ratio=0.4, num_cores=2), calibration=data, progress=False)
    loss = DistillLoss()
    with torch.no_grad():
        before = loss(student(**data[0], output_hidden_states=True), teacher(**data[0], output_hidden_states=True),
                      data[0])[0]
    distill(student, teacher, data * 10, steps=40, lr=1e-3, progress=False)
    with torch.no_grad():
        after = loss(student(**data[0], output_hidden_states=True), teacher(**data[0], output_hidden_states=True),
                     data[0])[0]
    assert after < 0.8 * before


def test_distill_leaves_the_teacher_as_it_was():
    # distill froze the teacher's parameters and left it in eval mode for good: a model copied from it afterwards
    # had no trainable parameters ("the student has no trainable parameters" on the next distill).
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.1), nn.ReLU(), nn.Linear(32, 8))
    teacher.train()
    teacher[1].eval()  # a submodule's own flag must come back too
    teacher[0].weight.requires_grad_(False)
    student = compress(copy.deepcopy(teacher), CompressionConfig(param_ratio=0.5, num_cores=2), progress=False)
    distill(student, teacher, [torch.randn(8, 16) for _ in range(3)], steps=3, loss=DistillLoss(hidden=0, output=1),
            progress=False)
    assert [m.training for m in teacher.modules()] == [True, True, False, True, True]
    assert [p.requires_grad for p in teacher.parameters()] == [False, True, True, True]


def test_sandwich_refuses_gradient_checkpointing(tmp_path):
    # checkpointed blocks recompute the full-width pass during backward, after the sandwich put the gated layers back
    # in nested mode: transformers' default (use_reentrant=False) raised a CheckpointError, use_reentrant=True trained
    # on gradients 68% off, in silence
    import bondgate

    transformers = pytest.importorskip("transformers")
    teacher, student, data = _tiny_gpt2_student(transformers)
    bondgate.gate(student, bondgate.GatingConfig(levels=(0.5, 1.0)))
    bondgate.set_mode(student, "nested")
    student.gradient_checkpointing_enable()
    batches = [{"input_ids": torch.stack([d["input_ids"] for d in data[:4]])}]
    with pytest.raises(ValueError, match="sandwich=True does not work with gradient checkpointing"), \
            warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the flag's old name warned on every read (transformers 5)
        distill(student, teacher, batches, steps=1, sandwich=True, progress=False)
    student.gradient_checkpointing_disable()
    assert distill(student, teacher, batches, steps=1, sandwich=True, progress=False).steps == 1
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                                          gradient_checkpointing=True, report_to=[], use_cpu=True, save_strategy="no")
    trainer = bondgate.DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=data,
                                           sandwich=True)
    with pytest.raises(ValueError, match="sandwich=True does not work with gradient checkpointing"):
        trainer.train()
    from bondgate.distill import aux_losses

    assert bondgate.aux_losses is aux_losses  # for a plain Trainer's loss (bondgate.distill is the function)


def test_distill_review_fixes():
    """From a plain-PyTorch review of distill: int8 masters kept through the best-step restore (they were rounded to
    the int8 grid: 4e-3 off), plain dict outputs for the hidden term, a tensor as one batch (was one row per step),
    the caller's random state given back, a student training the teacher's parameters refused, no gradients left,
    a custom loss's return checked."""
    import bondgate
    from bondgate.quant import master_state

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = [torch.randn(32, 32) for _ in range(4)]
    student = compress(copy.deepcopy(teacher), CompressionConfig(param_ratio=0.5, quantize="int8"), calibration=x,
                       progress=False)
    loss = DistillLoss(hidden=0, output=1)
    twin = copy.deepcopy(student)
    distill(student, teacher, x, steps=12, loss=loss, lr=3e-3, progress=False)
    calls = []  # a score that improves at every evaluation: the last step is the best
    res = distill(twin, teacher, x, steps=12, loss=loss, lr=3e-3, progress=False, eval_every=12,
                  eval_fn=lambda m: calls.append(1) or -len(calls), higher_is_better=False)
    assert res.best_step == 12
    with master_state():
        a, b = student.state_dict(), twin.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the restored masters are the trained ones
    assert all(p.grad is None for p in student.parameters())

    class DictOut(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, inp):
            h1 = torch.relu(self.net[0](inp))
            h2 = torch.relu(self.net[2](h1))
            return {"logits": self.net[4](h2), "hidden_states": (inp, h1, h2)}

    res = distill(DictOut(copy.deepcopy(student)), DictOut(teacher), x, steps=2, loss=DistillLoss(hidden=1),
                  progress=False)
    assert res.steps == 2

    counted = []
    res = distill(copy.deepcopy(student), teacher, torch.randn(16, 32), epochs=1, loss=loss, progress=False,
                  eval_fn=lambda m: counted.append(1) or 0.0)
    assert res.steps == 1  # one batch of 16 rows, not 16 one-row steps

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    distill(copy.deepcopy(student), teacher, x, steps=2, loss=loss, progress=False, seed=7)
    assert torch.equal(torch.rand(3), expected)

    shared = nn.Sequential(*list(teacher))  # the same modules: training it trains the teacher
    with pytest.raises(ValueError, match="trains parameters of the teacher"):
        distill(shared, teacher, x, steps=1, loss=loss, progress=False)
    listed = distill(copy.deepcopy(student), teacher, x, steps=1, progress=False,  # a list works as a pair does
                     loss=lambda s, t, b: [((s - t) ** 2).mean(), {"mse": 0.0}])
    assert listed.steps == 1
    with pytest.raises(TypeError, match="returns \\(total, \\{term: float\\}\\)"):
        distill(copy.deepcopy(student), teacher, x, steps=1, progress=False,
                loss=lambda s, t, b: ((s - t) ** 2).mean())
    gated = bondgate.gate(compress(copy.deepcopy(teacher), CompressionConfig(max_bond=8), progress=False),
                          bondgate.GatingConfig(controller="error"))
    bondgate.fit_controllers(gated, x)
    bondgate.set_budget(gated, 0.5, x)
    bondgate.gating_report(gated, reset=True)
    distill(gated, teacher, x, steps=1, loss=loss, progress=False, eval_fn=lambda m: float(m(x[0]).sum()))
    assert all(r["rows"] == 0 for r in bondgate.gating_report(gated))  # evaluation is not gating traffic


def test_logits_term_is_finite_where_a_vocabulary_entry_is_masked():
    # kl_div computed 0 * (-inf - x) = NaN for a teacher probability of exactly 0, and distill then blamed the data
    torch.manual_seed(0)
    zt, zs = torch.randn(2, 3, 5), torch.randn(2, 3, 5, requires_grad=True)
    zt_masked = zt.clone()
    zt_masked[..., 0] = float("-inf")
    loss = DistillLoss(hidden=0, logits=1.0, temperature=1.0)
    total, _ = loss({"logits": zs}, {"logits": zt_masked})
    pt = torch.softmax(zt_masked, -1)
    ref = (pt[..., 1:] * (torch.log(pt[..., 1:]) - torch.log_softmax(zs, -1)[..., 1:])).sum(-1).mean()
    assert float(total.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    total.backward()
    assert bool(torch.isfinite(zs.grad).all())
    both = zs.detach().clone()
    both[..., 0] = float("-inf")  # masked in both models: no term, no NaN
    assert math.isfinite(float(loss({"logits": both}, {"logits": zt_masked})[0]))
    # unmasked, the same value as torch's kl_div
    ref = torch.nn.functional.kl_div(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1), log_target=True,
                                     reduction="none").sum(-1).mean()
    assert float(loss({"logits": zs}, {"logits": zt})[0].detach()) == pytest.approx(float(ref.detach()), rel=1e-5)


def test_a_mask_that_does_not_fit_the_states_is_refused():
    # a (B, T) mask of another shape than the states' was ignored (padding counted) or broke with a broadcasting error
    torch.manual_seed(0)
    hs = [torch.randn(2, 4, 8) for _ in range(2)]
    ht = [torch.randn(2, 4, 8) for _ in range(2)]
    bad = {"attention_mask": torch.ones(2, 5)}
    for loss in (DistillLoss(hidden=1.0), DistillLoss(hidden=0, pooled=1.0),
                 DistillLoss(hidden=0, logits=1.0)):
        with pytest.raises(ValueError, match="attention mask has shape"):
            loss({"hidden_states": hs, "logits": hs[-1]}, {"hidden_states": ht, "logits": ht[-1]}, bad)
    good = {"attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    assert math.isfinite(float(DistillLoss(hidden=1.0, pooled=1.0)({"hidden_states": hs}, {"hidden_states": ht},
                                                                    good)[0]))
    # states with no token axis (a classifier's logits) are averaged plainly beside a sequence mask
    total, _ = DistillLoss(hidden=0, logits=1.0)({"logits": torch.randn(2, 3)}, {"logits": torch.randn(2, 3)}, good)
    assert math.isfinite(float(total))
    # pooled states already (B, H) are matched as they are (were broadcast against a (B, H) "mask")
    ps, pt = torch.randn(2, 8), torch.randn(2, 8)
    total, _ = DistillLoss(hidden=0, pooled=1.0)({"hidden_states": [ps]}, {"hidden_states": [pt]},
                                                {"attention_mask": torch.ones(2, 8)})
    ref = (1 - torch.nn.functional.cosine_similarity(ps, pt, dim=-1)).mean()
    assert float(total) == pytest.approx(float(ref), rel=1e-5)
    # a padded position whose teacher logits are all -inf (NaN there) is left out, not spread into the mean
    zt, zs = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    zt[1, 3] = float("-inf")
    total, _ = DistillLoss(hidden=0, logits=1.0)({"logits": zs}, {"logits": zt}, good)
    assert math.isfinite(float(total))


def test_distill_returns_the_student_in_eval_mode_when_it_stops_on_a_nan():
    teacher, student, data = teacher_student()
    with pytest.raises(FloatingPointError):
        distill(student, teacher, [torch.full((64, 32), float("nan"))], loss=DistillLoss(hidden=0, output=1.0),
                steps=2, progress=False)
    assert not any(m.training for m in student.modules())


def test_distillation_trainer_leaves_the_teacher_as_it_was(tmp_path):
    # constructing the trainer put the caller's teacher in eval mode and froze its parameters for good
    transformers = pytest.importorskip("transformers")
    import bondgate

    teacher, student, ds = _tiny_gpt2_student(transformers)
    teacher.train()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2,
                                          per_device_train_batch_size=4, disable_tqdm=True, save_strategy="no")
    trainer = bondgate.DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=ds,
                                           distill_loss=DistillLoss(hidden=0, logits=1.0))
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(m.training))
    trainer.train()
    assert calls and not any(calls)  # run in eval mode
    assert all(m.training for m in teacher.modules()) and all(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())
    shared = copy.deepcopy(teacher)
    with pytest.raises(ValueError, match="trains parameters of the teacher"):
        bondgate.DistillationTrainer(model=shared, teacher=shared, args=args, train_dataset=ds)


@pytest.mark.parametrize("T", [2.0, 3.0, 0.5])
def test_logits_term_is_the_temperature_scaled_kl_times_t_squared(T):
    # T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) per real token, averaged over the tokens the mask keeps; every
    # earlier test ran at T = 1, where T and T^2 agree
    gen = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64), 2 * torch.randn(2, 4, 6, generator=gen,
                                                                                      dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])

    def kl(t_row, s_row):  # by hand, one position: sum_v p_v (log p_v - log q_v)
        pt = [math.exp(v / T) for v in t_row]
        ps = [math.exp(v / T) for v in s_row]
        zp, zq = sum(pt), sum(ps)
        return sum(a / zp * (math.log(a / zp) - math.log(b / zq)) for a, b in zip(pt, ps))

    kept = [(b, i) for b in range(2) for i in range(4) if mask[b, i]]
    ref = T * T * sum(kl(zt[b, i].tolist(), zs[b, i].tolist()) for b, i in kept) / len(kept)
    loss = DistillLoss(hidden=0, logits=1.0, temperature=T)
    total, parts = loss({"logits": zs}, {"logits": zt}, {"attention_mask": mask})
    assert parts["logits"] == pytest.approx(ref, rel=1e-9) and float(total) == pytest.approx(ref, rel=1e-9)
    # weighted by the logits weight; a (B, V) classifier output is a plain mean over its rows
    assert float(DistillLoss(hidden=0, logits=0.5, temperature=T)({"logits": zs}, {"logits": zt},
                                                                  {"attention_mask": mask})[0]) == \
        pytest.approx(0.5 * ref, rel=1e-9)
    rows = [(0, 0), (1, 2)]
    flat_s, flat_t = torch.stack([zs[b, i] for b, i in rows]), torch.stack([zt[b, i] for b, i in rows])
    ref2 = T * T * sum(kl(zt[b, i].tolist(), zs[b, i].tolist()) for b, i in rows) / 2
    assert float(loss({"logits": flat_s}, {"logits": flat_t})[0]) == pytest.approx(ref2, rel=1e-9)


def test_16_bit_students_are_refused_or_warned():
    # float16: AdamW's first step wrote inf into every weight, and the FloatingPointError that followed said the
    # student kept the weights of step 1; bfloat16: most updates below the weights' precision were lost, silently
    student = nn.Sequential(nn.Linear(8, 8))
    teacher = copy.deepcopy(student)
    data = [torch.randn(4, 8)]
    before = student[0].weight.detach().clone()
    with pytest.raises(TypeError, match="float16 parameters, which AdamW cannot train"):
        distill(student.half(), teacher.half(), data, loss=DistillLoss(hidden=0, output=1), steps=1, progress=False)
    assert torch.equal(student[0].weight.float(), before.half().float())  # not touched
    with pytest.warns(UserWarning, match="bfloat16 parameters: AdamW updates below"):
        distill(student.bfloat16(), teacher.bfloat16(), [d.bfloat16() for d in data],
                loss=DistillLoss(hidden=0, output=1), steps=1, progress=False)


def test_a_student_with_some_16_bit_layers_is_refused_or_warned():
    # every parameter's dtype counts: looking at the first parameter only (or refusing float16 only when every
    # parameter is) let a float32 student with one float16 layer train, and its first AdamW step wrote inf there
    class Mixed(nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8).to(dtype)

        def forward(self, x):
            return self.b(self.a(x).to(self.b.weight.dtype)).float()

    torch.manual_seed(0)
    teacher = nn.Linear(8, 8)
    data = [torch.randn(4, 8)]
    student = Mixed(torch.float16)
    before = [p.detach().clone() for p in student.parameters()]
    with pytest.raises(TypeError, match="float16 parameters, which AdamW cannot train"):
        distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1), steps=1, progress=False)
    assert all(torch.equal(p, b) for p, b in zip(student.parameters(), before))  # no step taken
    with pytest.warns(UserWarning, match="bfloat16 parameters: AdamW updates below"):
        distill(Mixed(torch.bfloat16), teacher, data, loss=DistillLoss(hidden=0, output=1), steps=1, progress=False)


def test_sandwich_with_a_tuple_batch_for_a_forward_taking_star_args():
    # the tuple batch bound to the forward's names ({"xs": (a, b)}) was passed on to the full-width pass, which
    # called forward(xs=...): a TypeError where it had worked
    bondgate = pytest.importorskip("bondgate")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, *xs):
            return self.b(torch.relu(self.a(xs[0] + xs[1])))

    torch.manual_seed(0)
    teacher = Net()
    batches = [(torch.randn(16, 32), torch.randn(16, 32)) for _ in range(2)]
    student = compress(copy.deepcopy(teacher), CompressionConfig(param_ratio=0.5), calibration=batches,
                       progress=False)
    bondgate.gate(student, bondgate.GatingConfig(levels=(0.5, 1.0)))
    bondgate.set_mode(student, "nested")
    res = distill(student, teacher, batches, steps=2, loss=DistillLoss(hidden=0, output=1), sandwich=True,
                  log_every=1, progress=False)
    assert res.steps == 2 and "full_width" in res.history[0]["loss"]


def _mut_distill_pair(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 4))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    data = [torch.randn(16, 8) for _ in range(4)]
    return teacher, student, data


def test_hidden_term_leaves_out_the_embedding_output():
    # kills D2 (hidden_states[0] matched too): the docstring leaves the embedding output out of the hidden term
    torch.manual_seed(0)
    h1, h2 = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    student = {"hidden_states": (torch.randn(2, 3, 8), h1, h2)}
    teacher = {"hidden_states": (torch.randn(2, 3, 8), h1.clone(), h2 + 0.5)}
    _, parts = DistillLoss(hidden=1.0)(student, teacher)
    expect = (0 + float((0.5**2) / (teacher["hidden_states"][2] ** 2).mean())) / 2
    assert parts["hidden"] == pytest.approx(expect, rel=1e-6)


def test_output_term_is_relative_to_the_teachers_scale():
    # kills D5 (the normalization dropped): the docstring's "relative MSE between the model outputs"
    torch.manual_seed(0)
    yt = 100.0 * torch.randn(6, 5)
    ys = yt + torch.randn(6, 5)
    _, parts = DistillLoss(hidden=0, output=1.0)(ys, yt)
    assert parts["output"] == pytest.approx(float(((ys - yt) ** 2).mean() / (yt**2).mean()), rel=1e-6)
    _, scaled = DistillLoss(hidden=0, output=1.0)(10 * ys, 10 * yt)
    assert scaled["output"] == pytest.approx(parts["output"], rel=1e-5)  # no units


class _MutZeroGradExtras(nn.Module):
    """A linear layer plus a 1-D and a 2-D parameter whose gradients are exactly zero (they do not move the output):
    only weight decay can change them."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin
        self.vec = nn.Parameter(torch.ones(4))
        self.mat = nn.Parameter(torch.ones(4, 4))

    def forward(self, x):
        return self.lin(x) + 0 * self.vec.sum() + 0 * self.mat.sum()


def test_weight_decay_spares_one_dimensional_parameters():
    # kills D7 (every trainable parameter in the decayed group): biases and norms decayed toward 0, against the
    # docstring ("biases and other 1-D parameters get none")
    torch.manual_seed(0)
    teacher = nn.Linear(8, 4)
    student = _MutZeroGradExtras(copy.deepcopy(teacher))
    distill(student, _MutZeroGradExtras(teacher), [torch.randn(16, 8)], loss=DistillLoss(hidden=0, output=1.0),
            steps=5, lr=1e-2, weight_decay=0.5, progress=False)
    assert torch.equal(student.vec.detach(), torch.ones(4))  # 1-D: no decay
    assert float(student.mat.detach().max()) < 1.0  # 2-D: decayed


def _record_adamw(monkeypatch, read) -> list:
    """A list that gets ``read(optimizer)`` before each AdamW step (the learning rate, a gradient)."""
    seen, adamw_step = [], torch.optim.AdamW.step

    def record(self, *a, **k):
        seen.append(read(self))
        return adamw_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    return seen

def test_schedule_warms_up_from_the_first_step_and_decays(monkeypatch):
    # kills D8 (`(step + 1) / w` -> `step / w`): the first step ran at learning rate 0, i.e. was wasted
    lrs = _record_adamw(monkeypatch, lambda opt: opt.param_groups[0]["lr"])
    teacher, student, data = _mut_distill_pair()
    distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=100, lr=1e-3, warmup=0.1,
            progress=False)
    assert len(lrs) == 100
    assert lrs[:10] == pytest.approx([1e-3 * (k + 1) / 10 for k in range(10)], rel=1e-12)
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] < 1e-5


def test_grad_clip_bounds_the_gradient_norm(monkeypatch):
    # kills D10 (grad_clip ignored): the norm of the gradients AdamW saw was unbounded
    norms, adamw_step = [], torch.optim.AdamW.step

    def record(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return adamw_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    teacher, student, data = _mut_distill_pair()
    distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=4, grad_clip=1e-3, progress=False)
    assert len(norms) == 4 and max(norms) <= 1e-3 * (1 + 1e-5)


def test_logged_losses_are_the_documented_moving_average():
    # kills D14 (0.1 / 0.9 swapped): DistillResult documents 0.9 * previous + 0.1 * this step
    teacher, student, data = _mut_distill_pair()
    seen = []

    def loss(s, t, b):
        seen.append(float(len(seen)))
        return ((s - t) ** 2).mean(), {"v": seen[-1]}

    res = distill(student, teacher, data, loss=loss, steps=4, log_every=1, progress=False)
    want, run = [], None
    for v in seen:
        run = v if run is None else 0.9 * run + 0.1 * v
        want.append(run)
    assert [h["loss"]["v"] for h in res.history] == pytest.approx(want, rel=1e-12)


def test_seed_decides_the_run_not_the_callers_random_state():
    # kills D15 (seed ignored): with dropout in the student, runs with one seed differ by the caller's random state
    def run(global_seed, seed):
        teacher, student, data = _mut_distill_pair(dropout=0.5)
        torch.manual_seed(global_seed)
        distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=3, lr=1e-2, seed=seed,
                progress=False)
        return torch.cat([p.detach().reshape(-1) for p in student.parameters()])

    assert torch.equal(run(1, 5), run(2, 5))
    assert not torch.equal(run(1, 5), run(1, 6))


def test_a_student_may_share_frozen_parameters_with_the_teacher():
    # kills D18 (every shared parameter refused): the docstring refuses only a student that would *train* one of the
    # teacher's parameters; a frozen shared embedding is fine and the teacher stays as it was
    torch.manual_seed(0)
    emb = nn.Embedding(10, 8).requires_grad_(False)
    teacher = nn.Sequential(emb, nn.Linear(8, 4))
    student = nn.Sequential(emb, nn.Linear(8, 4))
    before = copy.deepcopy(teacher.state_dict())
    res = distill(student, teacher, [torch.randint(0, 10, (4, 3))], loss=DistillLoss(hidden=0, output=1.0), steps=2,
                  progress=False)
    assert res.steps == 2
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_eval_fn_runs_at_the_end_when_the_last_step_is_off_the_grid():
    # kills D19 (no final evaluation): documented "called before the first step, every eval_every steps and at the
    # end"; the weights of the last step were never scored, and could not be chosen as the best
    teacher, student, data = _mut_distill_pair()
    calls = []
    res = distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=7, eval_every=5,
                  eval_fn=lambda m: calls.append(1) or float(len(calls)), progress=False)
    assert [h["step"] for h in res.history if "metric" in h] == [0, 5, 7]
    assert res.best_step == 7


def test_a_fully_padded_batch_adds_zero_not_nan():
    """A batch whose attention mask is all 0 (no real token) gives hidden and logits terms of 0, not 0 / 0 = NaN."""
    torch.manual_seed(0)
    hs, ht = [torch.randn(2, 4, 8) for _ in range(2)], [torch.randn(2, 4, 8) for _ in range(2)]
    empty = {"attention_mask": torch.zeros(2, 4, dtype=torch.long)}
    total, parts = DistillLoss(hidden=1.0, logits=1.0)({"hidden_states": hs, "logits": hs[-1]},
                                                       {"hidden_states": ht, "logits": ht[-1]}, empty)
    assert parts == {"hidden": 0.0, "logits": 0.0} and float(total) == 0.0


def test_a_model_with_two_hidden_states_is_matched_on_the_second_only():
    """hidden_states (embeddings, one layer): the embedding output is left out, the layer's state is matched."""
    torch.manual_seed(0)
    h1 = torch.randn(2, 3, 8)
    student = {"hidden_states": (torch.randn(2, 3, 8), h1 + 0.5)}
    teacher = {"hidden_states": (torch.randn(2, 3, 8), h1)}
    _, parts = DistillLoss(hidden=1.0)(student, teacher)
    assert parts["hidden"] == pytest.approx(0.25 / float((h1**2).mean()), rel=1e-6)
    _, single = DistillLoss(hidden=1.0)({"hidden_states": (h1 + 0.5,)}, {"hidden_states": (h1,)})
    assert single["hidden"] == pytest.approx(parts["hidden"], rel=1e-6)  # one state: matched on itself


def test_hidden_states_without_a_token_axis_are_averaged_plainly_beside_a_sequence_mask():
    """(batch, features) hidden states with a (batch, tokens) attention mask in the batch: a plain relative MSE."""
    torch.manual_seed(0)
    hs, ht = [torch.randn(2, 8) for _ in range(2)], [torch.randn(2, 8) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    _, parts = DistillLoss(hidden=1.0)({"hidden_states": hs}, {"hidden_states": ht}, {"attention_mask": mask})
    assert parts["hidden"] == pytest.approx(float(((hs[1] - ht[1]) ** 2).mean() / (ht[1] ** 2).mean()), rel=1e-6)


def test_pooled_term_has_finite_gradients_with_a_row_of_padding_only():
    """A row with no real token is skipped by the pooled term without a NaN gradient (distill would stop on it)."""
    torch.manual_seed(0)
    ht = torch.randn(2, 5, 8)
    hs = (ht + 0.1 * torch.randn(2, 5, 8)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    total, _ = DistillLoss(hidden=0, pooled=1.0)({"hidden_states": [hs]}, {"hidden_states": [ht]},
                                                 {"attention_mask": mask})
    total.backward()
    assert bool(torch.isfinite(hs.grad).all()) and float(hs.grad[0, :3].abs().sum()) > 0
    assert float(hs.grad[0, 3:].abs().sum()) == 0 and float(hs.grad[1].abs().sum()) == 0


def test_task_term_needs_a_student_loss_and_is_weighted():
    """DistillLoss(task>0) on an output without .loss: a ValueError saying to pass labels; with one, weight * loss."""
    z = {"logits": torch.randn(2, 3)}
    with pytest.raises(ValueError, match=r"needs a student output with \.loss"):
        DistillLoss(hidden=0, task=1.0)(z, z)
    total, parts = DistillLoss(hidden=0, task=0.5)({"loss": torch.tensor(2.0), **z}, z)
    assert parts == {"task": 2.0} and float(total) == 1.0


def test_a_loss_with_every_weight_at_zero_is_refused():
    """DistillLoss(hidden=0) and nothing else: a ValueError, not a constant 0 loss that trains nothing."""
    with pytest.raises(ValueError, match="every weight at 0"):
        DistillLoss(hidden=0)(torch.randn(2, 3), torch.randn(2, 3))


def test_a_student_without_hidden_states_is_refused():
    """A student returning a plain tensor against a teacher with hidden states: a ValueError naming the field."""
    h = [torch.randn(2, 5, 8) for _ in range(2)]
    with pytest.raises(ValueError, match="needs outputs with hidden_states"):
        DistillLoss()(torch.randn(2, 5, 8), _Out(h))


def test_distill_asks_transformers_for_hidden_states_for_a_pooled_only_loss():
    """DistillLoss(hidden=0, pooled=1) on a transformers model: distill requests the hidden states it needs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    teacher = transformers.GPT2LMHeadModel(cfg).eval()
    student = transformers.GPT2LMHeadModel(cfg)  # another initialization: a gap to close
    batch = {"input_ids": torch.randint(0, 32, (4, 8))}
    res = distill(student, teacher, [batch], loss=DistillLoss(hidden=0, pooled=1.0), steps=1, log_every=1,
                  progress=False)
    assert res.steps == 1 and set(res.history[0]["loss"]) == {"pooled"} and res.history[0]["loss"]["pooled"] > 0


def test_a_generator_read_for_one_epoch_warns_only_about_the_schedule():
    """epochs=1 over a generator: no one-shot warning (one pass is all it needs), but the schedule's unknown end."""
    teacher, student, data = _mut_distill_pair()
    with pytest.warns(UserWarning) as record:
        res = distill(student, teacher, (x for x in data), loss=DistillLoss(hidden=0, output=1.0), epochs=1,
                      progress=False)
    messages = [str(w.message) for w in record]
    assert res.steps == len(data) and res.stopped == "epochs"
    assert any("no end to plan" in m for m in messages) and not any("one-shot" in m for m in messages)
    with pytest.warns(UserWarning) as record:
        distill(student, teacher, (x for x in data), loss=DistillLoss(hidden=0, output=1.0), epochs=2,
                progress=False)
    assert any("one-shot iterator, so it can be read for one epoch only" in str(w.message) for w in record)


def test_time_budgeted_warmup_starts_at_a_hundredth_of_lr_not_zero(monkeypatch):
    """Under a time budget the first step (no time spent yet) trains at lr / 100, then warms up linearly."""
    lrs = _record_adamw(monkeypatch, lambda opt: opt.param_groups[0]["lr"])
    teacher, student, data = _mut_distill_pair()
    _step_clock(monkeypatch, student, lambda n: 0.125)  # 1.875 s of budget: 15 steps, f = step / 15
    res = distill(student, teacher, data * 10, loss=DistillLoss(hidden=0, output=1.0), max_minutes=1 / 32, lr=1e-3,
                  warmup=0.5, progress=False)
    assert res.steps == 15 and res.stopped == "time budget"
    assert lrs[:3] == pytest.approx([1e-5, 1e-3 * 2 / 15, 1e-3 * 4 / 15], rel=1e-9)


def test_a_score_that_only_ties_its_best_does_not_count_as_better():
    """A flat eval score: the starting weights stay the best (best_step 0), and patience runs out."""
    teacher, student, data = _mut_distill_pair()
    before = copy.deepcopy(student.state_dict())
    res = distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=100, lr=1e-2,
                  eval_fn=lambda m: 1.0, eval_every=2, patience=2, progress=False)
    assert res.stopped == "early stopping" and res.best_step == 0 and res.steps == 4
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_distill_leaves_no_gradients_on_the_teacher():
    """The teacher runs under no_grad: after distill its parameters hold no .grad (no graph through it either)."""
    teacher, student, data = _mut_distill_pair()
    distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=2, progress=False)
    assert all(p.grad is None for p in teacher.parameters())


def test_each_step_uses_its_own_gradient_not_a_running_sum(monkeypatch):
    """Gradients are zeroed every step: a loss with a constant gradient hands AdamW the same gradient each time."""
    grads = _record_adamw(monkeypatch, lambda opt: opt.param_groups[0]["params"][0].grad.clone())
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 1, bias=False), nn.Linear(4, 1, bias=False)
    distill(student, teacher, [torch.ones(3, 4)], loss=lambda s, t, b: (s.sum(), {"sum": 0.0}), steps=3,
            grad_clip=None, progress=False)
    assert len(grads) == 3 and all(torch.equal(g, torch.full((1, 4), 3.0)) for g in grads)


def test_losses_are_logged_every_log_every_steps():
    """log_every=3 over 7 steps: loss records at steps 3 and 6 only."""
    teacher, student, data = _mut_distill_pair()
    res = distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=7, log_every=3,
                  progress=False)
    assert [h["step"] for h in res.history] == [3, 6] and all(set(h["loss"]) == {"output"} for h in res.history)


def test_distill_returns_the_student_in_eval_mode():
    """After a normal run (no eval_fn) the student comes back in eval mode, dropout off."""
    teacher, student, data = _mut_distill_pair(dropout=0.5)
    distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=2, progress=False)
    assert not any(m.training for m in student.modules())


def test_cpu_budget_clock_divides_cpu_time_by_the_thread_count(monkeypatch):
    """budget_clock="cpu": 0.5 s of CPU time per step on 4 threads is 0.125 s of budget (15 steps in 1.875 s)."""
    teacher, student, data = _mut_distill_pair()
    clock = {"now": 0.0}
    student.register_forward_hook(lambda m, i, o: clock.update(now=clock["now"] + 0.5))
    module = sys.modules["bondgate.distill"]  # (bondgate.distill is the function)
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=time.perf_counter,
                                                               process_time=lambda: clock["now"]))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    res = distill(student, teacher, data * 10, loss=DistillLoss(hidden=0, output=1.0), max_minutes=1 / 32,
                  budget_clock="cpu", progress=False)
    assert res.stopped == "time budget" and res.steps == 15 and res.budget_seconds == 1.875


@pytest.mark.parametrize("loss", [DistillLoss(hidden=0, logits=1.0), DistillLoss()])
def test_distillation_trainer_predicts_logits_on_labelled_data(tmp_path, loss):
    """Batches with labels take the stock prediction step: predict() returns the logits and label ids. With the
    default loss (hidden states) the output of the output_hidden_states=True call reached that step: predictions
    were (logits, (hidden states...)) and compute_metrics broke on them."""
    transformers = pytest.importorskip("transformers")
    import bondgate

    teacher, student, ds = _tiny_gpt2_student(transformers)
    ds = [{**d, "labels": d["input_ids"]} for d in ds]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                          per_device_eval_batch_size=4, disable_tqdm=True)
    trainer = bondgate.DistillationTrainer(model=student, teacher=teacher, args=args, distill_loss=loss)
    out = trainer.predict(ds)
    assert out.predictions.shape == (8, 12, 64) and out.label_ids.shape == (8, 12)
    assert math.isfinite(out.metrics["test_loss"]) and out.metrics["test_loss"] > 0


def test_a_student_with_every_parameter_frozen_is_refused():
    """distill on a student with no trainable parameter: a ValueError saying so, not a backward error."""
    teacher, student, data = _mut_distill_pair()
    student.requires_grad_(False)
    with pytest.raises(ValueError, match="the student has no trainable parameters"):
        distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=1, progress=False)


class _MutAux(nn.Linear):
    """A linear layer reporting a fixed auxiliary loss (as a gated layer reports its budget penalty)."""

    def __init__(self, value):
        super().__init__(8, 8)
        self.value = value

    def bondgate_aux_loss(self):
        return 0 * self.weight.sum() + self.value


def test_auxiliary_losses_of_every_module_are_summed_into_the_loss():
    """Two modules reporting aux losses 1.0 and 2.0: aux_losses is their sum, 3.0, and distill adds and logs it."""
    from bondgate.distill import aux_losses

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    student = nn.Sequential(_MutAux(1.0), _MutAux(2.0))
    assert float(aux_losses(student).detach()) == 3.0
    res = distill(student, teacher, [torch.randn(4, 8)], loss=DistillLoss(hidden=0, output=1.0), steps=1,
                  log_every=1, progress=False)
    assert res.history[0]["loss"]["aux"] == 3.0


def test_grad_clip_zero_means_no_clipping():
    """grad_clip=0 is documented as no clipping: the run equals grad_clip=None (not gradients clipped to 0)."""
    def run(clip):
        teacher, student, data = _mut_distill_pair()
        distill(student, teacher, data, loss=DistillLoss(hidden=0, output=1.0), steps=3, lr=1e-2, grad_clip=clip,
                progress=False)
        return torch.cat([p.detach().reshape(-1) for p in student.parameters()])

    _, start, _ = _mut_distill_pair()
    unclipped = run(None)
    assert torch.equal(run(0), unclipped)
    assert not torch.equal(unclipped, torch.cat([p.detach().reshape(-1) for p in start.parameters()]))


class _KeyOut:
    """A dict-like output whose attribute access reads its keys (KeyError, not AttributeError, for a missing one)."""

    def __init__(self, **fields):
        self.__dict__["_fields"] = fields

    def __getattr__(self, name):
        return self._fields[name]


def test_an_output_whose_attributes_raise_key_error_is_read():
    """An output class raising KeyError for a missing attribute: its hidden states are matched as a dict's are."""
    torch.manual_seed(0)
    hs, ht = [torch.randn(2, 3, 8) for _ in range(2)], [torch.randn(2, 3, 8) for _ in range(2)]
    _, want = DistillLoss(hidden=1.0)({"hidden_states": hs}, {"hidden_states": ht})
    _, got = DistillLoss(hidden=1.0)(_KeyOut(hidden_states=hs), _KeyOut(hidden_states=ht))
    assert got == want and got["hidden"] > 0


def test_distill_takes_a_dataloader_over_an_iterable_dataset_for_epochs():
    # DataLoader always has __len__, which raises TypeError over an IterableDataset: epochs=2 crashed on len(data)
    from torch.utils.data import DataLoader, IterableDataset

    teacher, student, _ = teacher_student()

    class Stream(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            return (torch.randn(32, generator=g) for _ in range(32))

    with pytest.warns(UserWarning, match="data of unknown length"):
        res = distill(student, teacher, DataLoader(Stream(), batch_size=8), epochs=2,
                      loss=DistillLoss(hidden=0, output=1.0), progress=False)
    assert res.steps == 8 and res.stopped == "epochs" and res.planned_steps is None


def test_a_teachers_nan_at_padded_positions_reaches_neither_loss_nor_gradient():
    # hidden: the loss was finite but 0 * 2(a - b) put NaN in the gradient; pooled: the product with the mask put
    # NaN in the loss itself. The padded slot must count for nothing: the same as a finite value there
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    torch.manual_seed(0)
    hs = [torch.randn(2, 4, 8, requires_grad=True) for _ in range(2)]
    ht = [torch.randn(2, 4, 8) for _ in range(2)]
    finite = [t.clone() for t in ht]
    ht[1][0, 3] = float("nan")
    finite[1][0, 3] = 123.0
    for kw in ({"hidden": 1.0}, {"hidden": 0.0, "pooled": 1.0}):
        got, want = (DistillLoss(**kw)({"hidden_states": hs}, {"hidden_states": t}, {"attention_mask": mask})[0]
                     for t in (ht, finite))
        assert math.isfinite(float(got.detach())) and float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
        g, g_want = (torch.autograd.grad(v, hs[1])[0] for v in (got, want))
        assert bool(torch.isfinite(g).all())
        torch.testing.assert_close(g, g_want)
        assert float(g[0, 3].abs().max()) == 0.0  # the padded slot gets no gradient


def test_logits_term_runs_in_float32_for_a_bfloat16_teacher():
    # log_softmax in bfloat16: the teacher's probabilities do not sum to 1; the KL of a student holding the teacher's
    # own logits in float32 was ~2.5x its float32 floor
    torch.manual_seed(0)
    zt = (torch.randn(2, 5, 512) * 3).to(torch.bfloat16)
    zs = zt.float()
    kl, _ = DistillLoss(hidden=0, logits=1.0, temperature=1.0)({"logits": zs}, {"logits": zt})
    assert abs(float(kl)) < 1e-6  # the same logits: 0 up to float32 rounding (was -9e-4 through bfloat16's softmax)


def test_a_shared_frozen_module_runs_in_eval_mode_in_the_teachers_forward_and_shared_batchnorm_is_refused():
    # student.train() flipped modules shared with the teacher back to training: the teacher's forward ran a shared
    # Dropout active, and a shared BatchNorm's running statistics (the teacher's) moved with the student's steps
    torch.manual_seed(0)
    drop = nn.Dropout(0.5)
    teacher = nn.Sequential(nn.Linear(8, 16), drop, nn.Linear(16, 8)).requires_grad_(False)
    student = nn.Sequential(copy.deepcopy(teacher[0]), drop, copy.deepcopy(teacher[2])).requires_grad_(True)
    seen = []
    teacher[2].register_forward_pre_hook(lambda m, a: seen.append(drop.training))
    distill(student, teacher, [torch.randn(16, 8) for _ in range(3)], steps=3,
            loss=DistillLoss(hidden=0, output=1.0), progress=False)
    assert seen == [False, False, False] and teacher.training and drop.training  # flags as they were
    bn = nn.BatchNorm1d(16)
    teacher = nn.Sequential(nn.Linear(8, 16), bn, nn.Linear(16, 8)).eval().requires_grad_(False)
    student = nn.Sequential(teacher[0], bn, copy.deepcopy(teacher[2]).requires_grad_(True))
    with pytest.raises(ValueError, match="shares 1 with the teacher, a normalization with running statistics in "
                                         "train mode"):
        distill(student, teacher, [torch.randn(16, 8)], steps=1, loss=DistillLoss(hidden=0, output=1.0),
                progress=False)
    assert int(bn.num_batches_tracked) == 0 and not student.training

    class FrozenBN(nn.BatchNorm1d):  # what distill's docstring advises for a BatchNorm that must stay frozen
        def train(self, mode=True):
            return super().train(False)

    bn = FrozenBN(16).eval()
    teacher = nn.Sequential(nn.Linear(8, 16), bn, nn.Linear(16, 8)).eval().requires_grad_(False)
    student = nn.Sequential(teacher[0], bn, copy.deepcopy(teacher[2]).requires_grad_(True))
    before = copy.deepcopy(teacher.state_dict())
    distill(student, teacher, [torch.randn(16, 8)], steps=2, loss=DistillLoss(hidden=0, output=1.0), progress=False)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_distillation_trainer_needs_a_teacher(tmp_path):
    # teacher=None failed at the first step with "'NoneType' object has no attribute 'parameters'"
    transformers = pytest.importorskip("transformers")
    import bondgate

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True)
    with pytest.raises(TypeError, match="needs teacher=<the dense model, an nn.Module>, got NoneType"):
        bondgate.DistillationTrainer(model=nn.Linear(2, 2), teacher=None, args=args)


def test_a_tuple_batch_that_binds_a_tensor_to_past_key_values_is_refused_by_name():
    # GPT-2's second positional argument is past_key_values: (input_ids, attention_mask) failed inside the model
    # with "'Tensor' object has no attribute 'get_seq_length'"
    transformers = pytest.importorskip("transformers")
    teacher, student, ds = _tiny_gpt2_student(transformers)
    ids = torch.stack([d["input_ids"] for d in ds[:4]])
    with pytest.raises(ValueError, match="argument '(past_key_values|cache)', a key/value cache, got a tensor .*give dict"):
        distill(student, teacher, [(ids, torch.ones_like(ids))], steps=1, loss=DistillLoss(hidden=0, logits=1.0),
                progress=False)
    # compress's calibration pass the same (the raw AttributeError escaped there)
    import bondgate

    with pytest.raises(ValueError, match="calibration batch 0 .*argument '(past_key_values|cache)', a key/value cache, "
                                         "got a tensor .*give dict"):
        bondgate.compress(copy.deepcopy(teacher), bondgate.CompressionConfig(param_ratio=0.5),
                          calibration=[(ids, torch.ones_like(ids))], progress=False)


def test_a_plain_modules_argument_named_cache_takes_a_tuple_batchs_tensor():
    # the key/value-cache refusal is for transformers models: a plain module's own `cache` argument is its business
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, cache):
            return self.fc(x) + cache

    teacher = Net()
    student = copy.deepcopy(teacher)
    res = distill(student, teacher, [(torch.randn(4, 8), torch.randn(4, 8))], steps=2,
                  loss=DistillLoss(hidden=0, output=1.0), progress=False)
    assert res.steps == 2


def test_data_whose_length_is_unknown_trains_for_steps():
    # len() raising NotImplementedError (or TypeError) means an unknown length; with steps it is not even asked
    teacher, student, data = teacher_student()

    class NoLength(list):
        def __len__(self):
            raise NotImplementedError

    res = distill(student, teacher, NoLength(data), steps=2, loss=DistillLoss(hidden=0, output=1.0), progress=False)
    assert res.steps == 2
    with pytest.warns(UserWarning, match="data of unknown length"):
        res = distill(student, teacher, NoLength(data), epochs=1, loss=DistillLoss(hidden=0, output=1.0),
                      progress=False)
    assert res.steps == len(data)
