"""Healing a compressed model: train the student against its dense teacher.

:class:`DistillLoss` combines what a user can match without labels — every hidden state (relative
MSE over real tokens), the logits (temperature-scaled KL), the mean-pooled embedding (cosine) — with
the task loss when the batch carries labels. :func:`distill` is a plain loop with AdamW, warmup +
cosine decay, gradient clipping, a wall-clock budget, periodic evaluation, early stopping that
restores the best weights, and a tqdm bar. For multi-process training use
:class:`DistillationTrainer`, a ``transformers.Trainer`` whose ``compute_loss`` is the same loss
(``torchrun`` / ``accelerate`` then handle the processes).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._checks import number
from ._warn import warn_user
from .calibration import (
    check_cache_binding,
    eval_mode,
    model_device,
    model_output,
    named_batch,
    run_model,
    to_device,
    unwrap_parallel,
)

__all__ = ["DistillLoss", "DistillResult", "distill", "DistillationTrainer"]  # noqa: F822 (built lazily by __getattr__)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None, per_token: bool, zeroed: bool = False) -> torch.Tensor:
    """Mean over tokens of ``x`` ``(B, T, ...)``, counting only ``mask == 1`` positions; a plain mean when ``x`` has
    no token axis (``per_token`` False: a pooled state, a classifier's logits). ``zeroed``: ``x`` is 0 at the padded
    positions already (:func:`_real` made it), so only the count needs the mask."""
    if mask is None or not per_token:
        return x.mean()
    _check_mask(mask, x)
    # the count in float32 at least: tokens x hidden passes float16's 65504 in one small batch (0 / inf = NaN)
    count = mask.bool().sum(dtype=torch.promote_types(x.dtype, torch.float32)) * math.prod(x.shape[2:])
    # where, not a product: a padded position's NaN (a teacher row masked to -inf everywhere) stays out
    return (x if zeroed else _real(x, mask)).sum(dtype=count.dtype) / count.clamp_min(1.0)


def _real(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``(B, T, ...)`` with its padded positions (``mask == 0``) set to 0 by ``where``, before any arithmetic: a
    NaN there (a teacher's state at a padded slot) then reaches neither the loss nor, through ``0 * NaN`` in the
    backward pass of a product or square, the gradient."""
    if mask is None or x.dim() < 2 or mask.shape != x.shape[:2]:  # (_masked_mean reports a mask that does not fit)
        return x
    m = mask.reshape(*mask.shape, *([1] * (x.dim() - 2))).bool()
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_mask(mask: torch.Tensor, x: torch.Tensor) -> None:
    if mask.shape != x.shape[:2]:  # averaging over every position instead would count the padding, silently
        raise ValueError(f"the attention mask has shape {tuple(mask.shape)}, but the states it masks have "
                         f"{tuple(x.shape)} (batch, positions, ...): pass the mask of the batch the models read, "
                         f"or leave it out of the batch to average over every position")


@dataclass
class DistillLoss:
    """Weights of the loss terms (0 disables a term).

    hidden: relative MSE ``||h_s - h_t||^2 / mean(h_t^2)`` averaged over the hidden states but the first, paired
        layer by layer (``hidden_states[0]`` is a transformers model's embedding output; a model returning one state
        is matched on it); needs a model that returns ``hidden_states`` (a field, attribute or dict key;
        :func:`distill` asks transformers models for them when the batches are dicts or tuples of model inputs). An
        encoder-decoder's encoder and decoder states are both matched, each over its own mask (``attention_mask``;
        ``decoder_attention_mask``, else ``labels != -100`` when the batch has labels).
    logits: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` per token (an encoder-decoder's: per decoder token).
    pooled: ``1 - cos`` between mask-mean-pooled last hidden states (sentence embeddings; an encoder-decoder's
        encoder states).
    output: relative MSE between the model outputs when they are plain tensors (e.g. an MLP); over every position
        (no mask: for a transformers model use ``hidden`` / ``logits`` / ``pooled``, which skip padding).
    task: the student's own ``loss`` (transformers models compute it when the batch has ``labels``).
    temperature: the ``T`` of the ``logits`` term (default 2.0; must be > 0).

    Padding: a batch's masks are read when it is a dict, or a tuple bound to the model's arguments by :func:`distill`
    (``(input_ids, attention_mask)`` for a model whose second positional argument is the mask, as BERT's; a tuple is
    passed positionally, so for GPT-2, whose second argument is ``past_key_values``, give dict batches).

    A loss of your own passed to :func:`distill` is called as ``loss(student_out, teacher_out, batch)`` and returns
    ``(total, {term: float})``: the scalar tensor to minimize and the values to log; give it a ``wants_hidden()``
    method returning True to have transformers models called with ``output_hidden_states=True``.
    """

    hidden: float = 1.0
    logits: float = 0.0
    pooled: float = 0.0
    output: float = 0.0
    task: float = 0.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        for name in ("hidden", "logits", "pooled", "output", "task", "temperature"):
            setattr(self, name, number(getattr(self, name), f"DistillLoss.{name}", low=0, low_open=name == "temperature"))

    def wants_hidden(self) -> bool:
        """Whether a term needs the models' hidden states (``hidden > 0`` or ``pooled > 0``): :func:`distill` then
        calls transformers models with ``output_hidden_states=True`` (for dict batches)."""
        return self.hidden > 0 or self.pooled > 0

    def __call__(self, student_out, teacher_out, batch=None) -> tuple[torch.Tensor, dict[str, float]]:
        seq2seq = _is_seq2seq(teacher_out)
        masks = _masks(batch, seq2seq)
        # an encoder-decoder's logits are the decoder's positions: the encoder's attention_mask does not fit them
        out_mask = masks.get("decoder_attention_mask") if seq2seq else masks.get("attention_mask")
        terms: dict[str, torch.Tensor] = {}
        if self.hidden > 0:
            # hs[0] is a transformers model's embedding output, left out (uncompressed, unless embeddings=True: then
            # the next state carries its error); a model with a single hidden state is matched on it
            # the padded positions zeroed before the square: a NaN there reaches neither the loss nor the gradient
            per = [_masked_mean(_real(a - b, mask) ** 2, mask, a.dim() >= 3, zeroed=True)
                   / _masked_mean(_real(b, mask) ** 2, mask, a.dim() >= 3, zeroed=True).clamp_min(1e-12)
                   for hs, ht, mask in _hidden_states(student_out, teacher_out, "hidden", masks)
                   for a, b in zip(hs[1:] if len(hs) > 1 else hs, ht[1:] if len(ht) > 1 else ht)]
            terms["hidden"] = torch.stack(per).mean()
        if self.logits > 0:
            zs, zt = _same_shape(model_output(student_out), model_output(teacher_out), "logits")
            T = self.temperature
            # in float32 at least: a bfloat16 teacher's softmax does not sum to 1 (a 2.5x KL floor for a student
            # with the teacher's own weights in float32)
            wide = torch.promote_types(torch.promote_types(zs.dtype, zt.dtype), torch.float32)
            ls, lt = torch.log_softmax(zs.to(wide) / T, -1), torch.log_softmax(zt.to(wide) / T, -1)
            # p log(p / q) is 0 where the teacher's p is 0 (a vocabulary entry masked to -inf): kl_div's
            # 0 * (-inf - x) is NaN there; the difference is zeroed before the product, so no NaN gradient either
            pt = lt.exp()
            kl = (pt * torch.where(pt > 0, lt - ls, torch.zeros((), dtype=ls.dtype, device=ls.device))).sum(-1)
            terms["logits"] = _masked_mean(kl, out_mask, zs.dim() >= 3) * T * T
        if self.pooled > 0:
            hs, ht, mask = _hidden_states(student_out, teacher_out, "pooled", masks)[0]  # an encoder's, if two
            hs, ht = hs[-1], ht[-1]
            if hs.dim() == 2:  # pooled already (one vector per row): matched as it is
                ps, pt, rows = hs, ht, torch.ones(hs.shape[0], dtype=torch.bool, device=hs.device)
            else:
                if mask is not None:
                    _check_mask(mask, hs)
                m = (mask if mask is not None else torch.ones(hs.shape[:2], device=hs.device)).unsqueeze(-1)
                m = m.to(hs.dtype)
                n = m.sum(1).clamp_min(1.0)
                ps, pt = (_real(hs, mask) * m).sum(1) / n, (_real(ht, mask) * m).sum(1) / n  # (a NaN there: zeroed)
                rows = m.sum((1, 2)) > 0  # a row with no real token has no embedding to match
            terms["pooled"] = (1 - torch.nn.functional.cosine_similarity(ps[rows], pt[rows], dim=-1)).sum() \
                / rows.sum().clamp_min(1)
        if self.output > 0:
            ys, yt = _same_shape(model_output(student_out), model_output(teacher_out), "output")
            terms["output"] = ((ys - yt) ** 2).mean() / (yt**2).mean().clamp_min(1e-12)
        if self.task > 0:
            loss = _field(student_out, "loss")
            if loss is None:
                raise ValueError("DistillLoss(task>0) needs a student output with .loss (pass labels)")
            terms["task"] = loss
        if not terms:
            raise ValueError("DistillLoss has every weight at 0")
        weights = {"hidden": self.hidden, "logits": self.logits, "pooled": self.pooled, "output": self.output,
                   "task": self.task}
        total = sum(weights[k] * v for k, v in terms.items())
        return total, {k: float(v.detach()) for k, v in terms.items()}


def _masks(batch, seq2seq: bool) -> dict[str, torch.Tensor]:
    """The batch's ``attention_mask`` and, of an encoder-decoder, its decoder mask: ``decoder_attention_mask``, else
    ``labels != -100`` (a seq2seq collator pads labels with -100 and gives no decoder mask; the decoder's padded
    positions would count)."""
    if not isinstance(batch, Mapping):
        return {}
    masks = {k: batch[k] for k in ("attention_mask", "decoder_attention_mask")
             if isinstance(batch.get(k), torch.Tensor)}
    labels = batch.get("labels")
    if seq2seq and "decoder_attention_mask" not in masks and isinstance(labels, torch.Tensor) and labels.dim() == 2:
        masks["decoder_attention_mask"] = labels != -100
    return masks


def _is_seq2seq(out) -> bool:
    """An encoder-decoder's output (transformers' ``Seq2Seq*Output``): its hidden states come in two streams."""
    return _field(out, "encoder_last_hidden_state") is not None


def _field(out, name: str):
    if isinstance(out, Mapping):  # a plain dict output (transformers' ModelOutput is one too: same keys)
        return out.get(name)
    try:
        return getattr(out, name, None)
    except KeyError:  # a dict-like output whose __getattr__ reads its keys
        return None


def _hidden_states(student_out, teacher_out, term: str, masks: Mapping) -> list[tuple]:
    """``[(student states, teacher states, attention mask)]``: one stream, or an encoder-decoder's encoder and
    decoder streams (``masks``: :func:`_masks`)."""
    if _is_seq2seq(teacher_out):
        keys = [("encoder_hidden_states", "attention_mask"), ("decoder_hidden_states", "decoder_attention_mask")]
    else:
        keys = [("hidden_states", "attention_mask")]
    streams = []
    for key, mask_key in keys:
        hs, ht = _field(student_out, key), _field(teacher_out, key)
        if hs is None or ht is None:
            have = list(teacher_out.keys()) if isinstance(teacher_out, Mapping) else type(teacher_out).__name__
            raise ValueError(f"DistillLoss({term}>0) needs outputs with {key} (the teacher's output has {have}): "
                             f"distill asks transformers models for them (output_hidden_states=True) when the loss "
                             f"wants them (a DistillLoss with hidden or pooled > 0, or a loss with a wants_hidden() "
                             f"method returning True) and the batches are dicts or tuples of model inputs (a plain "
                             f"tensor batch is passed positionally); otherwise use DistillLoss(hidden=0, logits=1) / "
                             f"output=1, or a loss of your own")
        if len(hs) != len(ht):
            raise ValueError(f"DistillLoss({term}>0): the student returns {len(hs)} {key.replace('_', ' ')}, the teacher "
                             f"{len(ht)}; they are matched layer by layer, so the models must have the same depth")
        for i, (a, b) in enumerate(zip(hs, ht)):
            _same_shape(a, b, f"{key.replace('_states', ' state').replace('_', ' ')} {i}")
        streams.append((hs, ht, masks.get(mask_key)))
    return streams


def _same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:  # broadcasting would compare unrelated entries without a word
        raise ValueError(f"DistillLoss: the student's {what} has shape {tuple(a.shape)}, the teacher's "
                         f"{tuple(b.shape)}")
    return a, b


def aux_losses(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary losses modules report for their last forward (e.g. a gating budget penalty)."""
    losses = [a for m in model.modules() if hasattr(m, "bondgate_aux_loss") for a in [m.bondgate_aux_loss()]
              if a is not None]
    return torch.stack(losses).sum() if losses else None


def _call(model: nn.Module, batch, want_hidden: bool):
    # A DDP / DataParallel wrapper hides the transformers model's ``config``; call the wrapper anyway
    # (it synchronizes gradients) but recognize the model inside it.
    inner = unwrap_parallel(model)
    check_cache_binding(inner, batch)
    named = named_batch(inner, batch)  # a tuple batch as {argument: value}, where it binds
    if want_hidden and isinstance(named, Mapping) and hasattr(inner, "config"):
        return model(**to_device(named, model_device(inner)), output_hidden_states=True)
    return run_model(model, batch)  # moves the batch to the model's device


def _without_added_states(out, model: nn.Module):
    """A transformers output without the hidden states the loss asked for (``output_hidden_states=True``) when the
    model would not return them itself: the Trainer's prediction step gathers every field of the output it is given,
    so evaluation returned ``(logits, (hidden states...))`` for the predictions and kept every layer's states."""
    config = getattr(unwrap_parallel(model), "config", None)
    drop = ("hidden_states", "encoder_hidden_states", "decoder_hidden_states")
    if getattr(config, "output_hidden_states", True) or not isinstance(out, Mapping) or not any(k in out for k in drop):
        return out
    return type(out)(**{k: v for k, v in out.items() if k not in drop})


def _wants_hidden(loss) -> bool:
    """Whether ``loss`` (a :class:`DistillLoss` or a callable with a ``wants_hidden()`` method) reads hidden states."""
    fn = getattr(loss, "wants_hidden", None)
    return bool(fn()) if callable(fn) else False


def _check_sandwich(student: nn.Module) -> None:
    from .gating import nested_layers

    if not nested_layers(student):
        raise ValueError("sandwich=True needs gated layers in 'nested' mode (bondgate.set_mode(model, 'nested'))")
    _no_checkpointing(student)


def _no_checkpointing(student: nn.Module) -> None:
    """The sandwich's full-width pass sets the gated layers' mode only while it runs: activation checkpointing
    recomputes it during backward, in nested mode — a shape error (use_reentrant=False) or wrong gradients (True)."""
    inner = getattr(student, "module", student)  # DataParallel / DDP
    # transformers 5 renamed the flag (the old name warns on every read); models outside transformers: neither
    name = "is_activation_checkpointing" if hasattr(type(inner), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    if getattr(inner, name, False):
        raise ValueError("sandwich=True does not work with gradient checkpointing: the checkpointed blocks of the "
                         "full-width pass are recomputed during backward with the gated layers back in nested mode "
                         "(wrong gradients, or a CheckpointError); turn one of them off")


def _step_loss(student: nn.Module, batch, t_out, loss: Callable, want_hidden: bool, sandwich: bool):
    """One step's loss: the student's, its modules' auxiliary losses, and (``sandwich``) the loss of the same
    batch with every gated layer at full width. Returns ``(total, parts, student output)``."""
    with torch.no_grad():  # a penalty left by a forward that raised (an out-of-memory retry): not this step's
        aux_losses(student)
    s_out = _call(student, batch, want_hidden)
    device = model_device(student)
    batch, t_out = to_device(batch, device), to_device(t_out, device)  # a teacher may sit on another device
    # DistillLoss reads the masks of a tuple batch too; a loss of your own gets the batch as given
    seen = named_batch(unwrap_parallel(student), batch) if isinstance(loss, DistillLoss) else batch
    total, parts = _loss_value(loss(s_out, t_out, seen))
    aux = aux_losses(student)  # of this forward, before the full-width pass
    if aux is not None:
        total = total + aux
        parts["aux"] = float(aux.detach())
    if sandwich:
        from .gating import full_width

        with full_width(student):
            full_total, _ = _loss_value(loss(_call(student, batch, want_hidden), t_out, seen))
        parts["full_width"] = float(full_total.detach())
        total = total + full_total
    return total, parts, s_out


def _loss_value(value) -> tuple[torch.Tensor, dict]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], torch.Tensor)
            and isinstance(value[1], Mapping)):
        raise TypeError(f"a distill loss returns (total, {{term: float}}): the scalar tensor to minimize and the values "
                        f"to log; got {type(value).__name__}")
    return value[0], value[1]


@dataclass
class DistillResult:
    """What :func:`distill` did: ``steps`` taken, ``stopped`` (why it ended), ``best_step`` / ``best_metric`` (with an
    ``eval_fn``: the weights returned are that step's), ``planned_steps`` (the schedule's length; estimated under a
    time budget) and ``history``: loss records ``{"step", "loss": {term: value}, "seconds"}`` every ``log_every``
    steps (each value a moving average, ``0.9 * previous + 0.1 * this step``) and evaluation records
    ``{"step", "metric", "seconds"}``."""

    steps: int = 0
    seconds: float = 0.0  # wall time of the whole call
    eval_seconds: float = 0.0  # of which spent in eval_fn
    budget_seconds: float = 0.0  # training time on the budget clock (wall, or CPU time / threads)
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)
    stopped: str = ""
    planned_steps: int | None = None  # the length the learning-rate schedule was last planned for


def _check_student_dtypes(params: list[torch.Tensor]) -> None:
    """AdamW on 16-bit parameters: float16 breaks at once (its eps, 1e-8, and the squared gradients round to 0:
    the first step writes inf, which no loss check sees in time); bfloat16 loses the updates below ~1/256 of a
    weight (at lr 1e-4, 38k of 147k core entries moved in 40 steps of a tiny LLaMA, 147k in float32)."""
    dtypes = {p.dtype for p in params}
    if torch.float16 in dtypes:
        raise TypeError("distill: the student has float16 parameters, which AdamW cannot train (eps and the squared "
                        "gradients underflow: the first step writes inf). Train a float32 student, under "
                        "torch.autocast for 16-bit speed, and cast it afterwards")
    if torch.bfloat16 in dtypes:
        warn_user("distill: the student has bfloat16 parameters: AdamW updates below ~1/256 of a weight are lost "
                  "(most of them at lr 1e-4). Train a float32 student, under torch.autocast(dtype=torch.bfloat16) "
                  "for speed, and cast it afterwards")


@torch.inference_mode(False)  # a training loop: it trains whatever grad mode the caller is in
@torch.enable_grad()
def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable,
    *,
    loss: DistillLoss | Callable | None = None,
    steps: int | None = None,
    epochs: int | None = None,
    max_minutes: float | None = None,
    budget_clock: str = "wall",
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup: float = 0.05,
    grad_clip: float | None = 1.0,
    eval_fn: Callable[[nn.Module], float] | None = None,
    eval_every: int = 200,
    higher_is_better: bool = True,
    patience: int | None = 5,
    log_every: int = 50,
    progress: bool = True,
    seed: int = 0,
    sandwich: bool = False,
) -> DistillResult:
    """Train ``student`` to imitate ``teacher`` on ``data`` (an iterable of batches, re-iterated per epoch; one tensor
    or dict is one batch). The teacher runs in eval mode under ``no_grad``; its parameters and train/eval flags are
    left as they were (a student that would train one of its parameters, or share a module with running statistics
    such as a BatchNorm, is refused; frozen modules both share run in eval mode in the teacher's calls). The student
    trains in train mode — its dropout is on, as in any fine-tuning, so the logged losses include that noise; like transformers'
    Trainer, ``student.train()`` also wakes submodules you had put in eval mode (a BatchNorm that must stay frozen needs a
    ``train()`` override that keeps it in eval mode) — and is returned in eval mode, also when a ``FloatingPointError`` stops it. ``seed`` seeds this call only (the caller's random state is restored). ``loss``: a
    :class:`DistillLoss` or a callable ``(student_out, teacher_out, batch) -> (total, {term: float})``; ``None``
    means ``DistillLoss()``, i.e. ``hidden=1.0`` and every other term 0, which needs outputs with ``hidden_states``
    (a transformers model): for a model returning a plain tensor pass ``DistillLoss(hidden=0, output=1)``.

    Optimizer: AdamW with peak learning rate ``lr`` (default 1e-4) and decoupled ``weight_decay`` (default 0.0),
    which applies to the trainable parameters with 2 or more dimensions only (biases and other 1-D parameters get
    none). ``grad_clip``: the largest L2 norm of all trainable parameters' gradients together (default 1.0; 0 or
    ``None``: no clipping). ``log_every``: steps between the loss records of ``DistillResult.history`` and the
    progress bar's loss display (default 50).

    Stops at ``steps``, after ``epochs``, after ``max_minutes`` of training wall time (time spent in
    ``eval_fn`` is not counted; ``DistillResult.eval_seconds`` reports it), or when ``eval_fn``
    (called before the first step, every ``eval_every`` steps and at the end — a student that never beats its starting
    score comes back as it was, ``best_step`` 0; higher is better unless ``higher_is_better``
    is False) has not improved for ``patience`` evaluations. ``budget_clock="cpu"`` measures the time
    budget as process CPU time divided by torch's thread count, i.e. the wall time the same work takes
    on an otherwise idle machine — a fair budget when other jobs share the CPU. With ``eval_fn`` the best weights are
    restored at the end. The learning-rate schedule (linear warmup over the first ``warmup`` fraction, cosine
    decay) runs over ``steps``, or ``epochs * len(data)``, or — with only a time budget — over the budget clock
    itself (a step count planned from the first steps would be wrong: they are slower). The progress bar's
    total, and ``DistillResult.planned_steps``, estimate the steps the remaining time allows at the step rate
    measured since the last estimate (first at step 20, then every 50 steps). A NaN ``eval_fn`` score never counts as the best; a non-finite loss or gradient norm stops
    with a ``FloatingPointError`` before the weights are touched. A float16 student is refused (AdamW's update
    itself overflows in float16), a bfloat16 one warned about (most small updates are lost).

    ``sandwich=True`` (for gated layers in ``"nested"`` mode, :func:`bondgate.set_mode`; not with gradient
    checkpointing, which would recompute the full-width pass in nested mode): every step
    also runs the student with all gated layers at full width and adds that loss — the sandwich rule of
    slimmable networks. Nested training alone draws each layer's width per row independently, so the
    whole model at full width is almost never trained and drifts below its own truncations; the error
    controllers approximate the full width, so it should stay the best configuration. Doubles the cost
    of a step.
    """
    if progress:  # tqdm.auto picks the notebook widget, which warns when ipywidgets is missing
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    if steps is None and epochs is None and max_minutes is None:
        raise ValueError("give at least one of steps, epochs, max_minutes")
    # Python numbers from here on (numpy's are taken), as the history and the optimizer record them
    steps = number(steps, "steps", low=1, integer=True, none_ok=True)
    epochs = number(epochs, "epochs", low=1, integer=True, none_ok=True)
    max_minutes = number(max_minutes, "max_minutes", low=0, low_open=True, none_ok=True)
    if isinstance(data, (torch.Tensor, Mapping)):  # one batch, as compress reads calibration data (not its rows)
        data = [data]
    if isinstance(data, Iterator) and steps is None and max_minutes is None and (epochs or 0) != 1:
        warn_user("distill: data is a one-shot iterator, so it can be read for one epoch only; pass a list or "
                  "a DataLoader to train for more")
    batches = _length(data) if steps is None else None  # (only the schedule of an epochs run needs it)
    if steps is None and max_minutes is None and batches is None:
        warn_user("distill: with epochs on data of unknown length the schedule has no end to plan for: the "
                  "learning rate stays at lr (no warmup or decay); give steps, or data with a length")
    eval_every = number(eval_every, "eval_every", low=1, integer=True)
    log_every = number(log_every, "log_every", low=1, integer=True)
    patience = number(patience, "patience", low=1, integer=True, none_ok=True)
    warmup = number(warmup, "warmup", low=0, high=1, high_open=True, hint="a fraction of the steps")
    lr = number(lr, "lr", low=0, low_open=True)
    weight_decay = number(weight_decay, "weight_decay", low=0)
    grad_clip = number(grad_clip, "grad_clip", low=0, none_ok=True, finite=False,
                       hint="0 or None: no clipping")
    if budget_clock not in ("wall", "cpu"):
        raise ValueError(f"budget_clock must be 'wall' or 'cpu', got {budget_clock!r}")
    threads = max(torch.get_num_threads(), 1)
    clock = time.perf_counter if budget_clock == "wall" else (lambda: time.process_time() / threads)
    loss = loss or DistillLoss()
    if not callable(loss):
        raise TypeError(f"loss must be a DistillLoss or a callable (student_out, teacher_out, batch) -> (total, "
                        f"{{term: float}}), got {loss!r}")
    if sandwich:
        _check_sandwich(student)
    want_hidden = _wants_hidden(loss)
    # frozen modules the two share were put back in train mode by student.train(): the teacher's calls set eval
    common = _check_not_shared(student, teacher)
    teacher_mode = (lambda: eval_mode(teacher)) if common else contextlib.nullcontext
    device = model_device(student)
    from .gating import preserved_state
    from .quant import master_state

    # seeded for this call only (the caller's random state is given back afterwards); the teacher runs under no_grad
    # in eval mode, its parameters and train/eval flags left as they were
    with torch.random.fork_rng(devices=[device.index or 0] if device is not None and device.type == "cuda" else []), \
            eval_mode(teacher):
        torch.manual_seed(seed)
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student has no trainable parameters")
        _check_student_dtypes(params)
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr)
        planned = steps
        if planned is None and epochs is not None and batches is not None:
            planned = epochs * batches

        def lr_at(step: int, total: int | None) -> float:
            if timed:  # only a time budget: the schedule runs on the budget clock (a step count is only estimated)
                f = min(1.0, spent() / (60 * max_minutes))
                if f < warmup:
                    return lr * max(f / warmup, 0.01)
                return lr * 0.5 * (1 + math.cos(math.pi * (f - warmup) / max(1e-12, 1 - warmup)))
            if total is None:
                return lr
            w = max(1, int(warmup * total))
            if step < w:
                return lr * (step + 1) / w
            return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / max(1, total - w))))

        res = DistillResult()
        best_state = None

        def evaluate(step: int) -> bool:
            """Returns True when patience is exhausted."""
            nonlocal best_state
            if eval_fn is None:
                return False
            te, ce = time.perf_counter(), clock()
            student.eval()
            with torch.no_grad(), preserved_state(student):  # evaluation is not gating traffic (counts, price)
                metric = float(eval_fn(student))
            student.train()
            res.eval_seconds += time.perf_counter() - te
            eval_budget[0] += clock() - ce
            res.history.append({"step": step, "metric": metric, "seconds": time.perf_counter() - t0})
            better = math.isfinite(metric) and (res.best_metric is None or (
                metric > res.best_metric if higher_is_better else metric < res.best_metric))  # NaN is never the best
            if better:
                res.best_metric, res.best_step = metric, step
                with master_state():  # an int8 layer's full-precision masters, not their int8 grid values
                    best_state = copy.deepcopy(student.state_dict())
            # history also holds the loss logs: count evaluations only
            evals_since = sum(1 for h in res.history if "metric" in h and h["step"] > (res.best_step or 0))
            return patience is not None and evals_since >= patience

        t0, c0 = time.perf_counter(), clock()
        eval_budget = [0.0]  # evaluation time on the budget clock (not charged to the budget)

        def spent() -> float:
            return clock() - c0 - eval_budget[0]

        student.train()
        try:
            _check_shared_stats(common)
        except ValueError:
            student.eval()  # as on return
            raise
        bar = tqdm(total=planned, desc="distill", disable=not progress, leave=False)
        step, epoch, running = 0, 0, {}
        timed = planned is None and max_minutes is not None
        mark = (0, 0.0)  # (step, budget seconds) at the last re-plan
        if eval_fn is not None:
            evaluate(0)
        done = False
        while not done:
            seen = 0
            for batch in data:
                seen += 1
                if timed and step >= 20 and (step == 20 or step % 50 == 0):
                    now = spent()
                    rate = (step - mark[0]) / max(now - mark[1], 1e-9)
                    planned, mark = max(step + 1, int(step + rate * (60 * max_minutes - now))), (step, now)
                    bar.total = planned
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, planned)
                with torch.no_grad(), teacher_mode():
                    t_out = _call(teacher, batch, want_hidden)
                total, parts, _ = _step_loss(student, batch, t_out, loss, want_hidden, sandwich)
                if not bool(torch.isfinite(total.detach())):  # before the step: the weights stay those of the last good one
                    bar.close()
                    student.eval()  # as on return
                    raise FloatingPointError(f"distill: the loss is {float(total.detach())} at step {step + 1} "
                                             f"({', '.join(f'{k}={v:.4g}' for k, v in parts.items())}); the student "
                                             f"keeps the weights of step {step}. Lower lr, check the data for NaN/inf, "
                                             f"or train in a wider dtype")
                opt.zero_grad(set_to_none=True)
                total.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
                if not bool(torch.isfinite(norm)):  # a finite loss can still have NaN gradients (sqrt at 0, ...)
                    bar.close()
                    student.eval()  # as on return
                    raise FloatingPointError(f"distill: the gradient norm is {float(norm)} at step {step + 1} (loss "
                                             f"{float(total.detach()):.4g}); the student keeps the weights of step "
                                             f"{step}. Look for an operation with an infinite derivative in the model, "
                                             f"or train in a wider dtype")
                opt.step()
                step += 1
                for k, v in parts.items():
                    running[k] = 0.9 * running.get(k, v) + 0.1 * v
                bar.update(1)
                if step % log_every == 0:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in running.items()})
                    res.history.append({"step": step, "loss": dict(running), "seconds": time.perf_counter() - t0})
                if eval_fn is not None and step % eval_every == 0 and evaluate(step):
                    res.stopped = "early stopping"
                    done = True
                elif steps is not None and step >= steps:
                    res.stopped, done = "steps", True
                elif max_minutes is not None and spent() >= 60 * max_minutes:
                    res.stopped, done = "time budget", True
                if done:
                    break
            epoch += 1
            if not seen and not done:
                bar.close()
                if epoch == 1:
                    raise ValueError("distill: data yielded no batches")
                # a one-shot iterator (a generator) is exhausted after one pass: stop instead of looping forever
                warn_user(f"distill: data yielded no batches in epoch {epoch} (a one-shot iterator?); stopping "
                          f"after {step} steps")
                res.stopped, done = "data exhausted", True
            elif epochs is not None and epoch >= epochs and not done:
                res.stopped, done = "epochs", True
        bar.close()
        if eval_fn is not None and (not res.history or res.history[-1].get("step") != step or "metric" not in res.history[-1]):
            evaluate(step)
        if best_state is not None:
            student.load_state_dict(best_state)
        opt.zero_grad(set_to_none=True)  # no gradients left holding memory
        student.eval()
        res.steps, res.seconds, res.planned_steps = step, time.perf_counter() - t0, planned
        res.budget_seconds = spent()
        return res


def _length(data) -> int | None:
    """``len(data)``, or None for data of unknown length (a ``DataLoader`` over an ``IterableDataset`` has a
    ``__len__`` that raises ``TypeError``)."""
    try:
        return len(data)
    except (TypeError, NotImplementedError):
        return None


def _check_not_shared(student: nn.Module, teacher: nn.Module) -> list[tuple[str, nn.Module]]:
    """Refuse a student that would train the teacher's parameters. Returns the modules the two share (frozen ones
    may be shared: the teacher's calls must then put them in eval mode themselves; see :func:`_check_shared_stats`)."""
    teacher_params = {id(p) for p in teacher.parameters()}
    shared = [n for n, p in student.named_parameters() if p.requires_grad and id(p) in teacher_params]
    if shared:
        raise ValueError(f"the student trains parameters of the teacher ({', '.join(shared[:3])}"
                         f"{', ...' if len(shared) > 3 else ''}): distilling would change the teacher; give the "
                         "student its own copy (copy.deepcopy(teacher) before compressing)")
    teacher_modules = {id(m) for m in teacher.modules()}
    return [(n, m) for n, m in student.named_modules() if id(m) in teacher_modules]


def _check_shared_stats(common: list[tuple[str, nn.Module]]) -> None:
    """Refuse shared modules that the student's training forward would change: a normalization with running
    statistics in train mode (one whose ``train()`` keeps it in eval mode, as distill's docs advise, is fine)."""
    stats = [n or type(m).__name__ for n, m in common
             if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training]
    if stats:
        raise ValueError(f"the student shares {', '.join(stats[:3])}{', ...' if len(stats) > 3 else ''} with the "
                         f"teacher, a normalization with running statistics in train mode: the student's training "
                         f"forward would update the teacher's; give the student its own copy, or keep it in eval mode")


def _load_bondgate_state(model: nn.Module, directory: str | os.PathLike | None) -> bool:
    """Load the weights of a bondgate checkpoint in ``directory`` into ``model`` in place (its parameters stay the
    optimizer's), checksums verified, tied tensors included, every key required; False when ``directory`` is not a
    bondgate checkpoint."""
    from .io import META_NAME, read_state

    if directory is None or not (Path(directory) / META_NAME).is_file():
        return False
    model.load_state_dict(read_state(directory), strict=True)
    return True


def _make_trainer_class():
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        """``transformers.Trainer`` that trains the (compressed) model against ``teacher``.

        ``DistillationTrainer(model=student, teacher=teacher, distill_loss=DistillLoss(...), args=...,
        train_dataset=..., data_collator=...)``; ``sandwich=True`` as in :func:`distill`; everything else is the stock Trainer (DDP under
        ``torchrun``, accelerate, checkpoints, resume). The teacher runs in eval mode under ``no_grad`` at each step,
        its train/eval flags and ``requires_grad`` left as they are; it is moved to the student's device if needed.
        """

        # compute_loss returns a per-batch mean and ignores num_items_in_batch, so the stock Trainer must divide
        # it by the gradient-accumulation steps even when the batch carries labels.
        loss_is_scaled_for_ga = False

        def __init__(self, *args, teacher: nn.Module, distill_loss: DistillLoss | None = None,
                     sandwich: bool = False, **kwargs):
            if not isinstance(teacher, nn.Module):  # (None failed at the first step: 'NoneType' has no 'parameters')
                raise TypeError(f"DistillationTrainer needs teacher=<the dense model, an nn.Module>, got "
                                f"{type(teacher).__name__}")
            super().__init__(*args, **kwargs)
            self._shared = _check_not_shared(self.model, teacher)
            self.teacher = teacher  # run in eval mode under no_grad per call: its own flags are left as they are
            self.distill_loss = distill_loss or DistillLoss()
            if sandwich:
                _check_sandwich(self.model)
            self.sandwich = sandwich

        def train(self, *args, **kwargs):
            """The stock ``train``, after the check :func:`distill` makes: a student with no trainable parameter is
            refused by name (torch's "element 0 of tensors does not require grad" otherwise, at the first step)."""
            if not any(p.requires_grad for p in self.model.parameters()):
                raise ValueError("the student has no trainable parameters")
            return super().train(*args, **kwargs)

        def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                         num_items_in_batch=None) -> torch.Tensor | tuple[torch.Tensor, object]:
            """The distillation loss of ``model`` (the student) against the teacher on ``inputs``, plus the modules'
            auxiliary losses (and the full-width pass with ``sandwich``): a scalar per-batch mean, or ``(loss, student
            outputs)`` with ``return_outputs``. ``num_items_in_batch`` is ignored."""
            want = _wants_hidden(self.distill_loss)
            dev = next(model.parameters()).device
            if next(self.teacher.parameters()).device != dev:
                self.teacher.to(dev)
            with torch.no_grad(), eval_mode(self.teacher):
                t_out = _call(self.teacher, inputs, want)
            if model.training:
                _check_shared_stats(self._shared)  # (the Trainer sets the modes itself, after __init__)
            if self.sandwich and model.training:
                _no_checkpointing(self.model)  # transformers turns checkpointing on in train(), after __init__
            total, _, s_out = _step_loss(model, inputs, t_out, self.distill_loss, want,
                                         self.sandwich and model.training)
            return (total, _without_added_states(s_out, model) if want else s_out) if return_outputs else total

        def _save_checkpoint(self, model: nn.Module, trial, *args, **kwargs) -> None:
            """The stock checkpoint, written with int8 layers' full-precision master cores (to resume from)."""
            # checkpoints to resume from hold int8 layers' full-precision masters (an int8 checkpoint rounds them)
            from .quant import master_state

            with master_state():
                return super()._save_checkpoint(model, trial, *args, **kwargs)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            """A bondgate checkpoint (the files of :func:`bondgate.save`, the tokenizer, ``training_args.bin``) when the
            model holds bondgate layers and no ``state_dict`` is given; the stock ``_save`` otherwise."""
            # a bondgate checkpoint (bondgate.json beside the weights): transformers' save_pretrained refuses a table
            # compressed with its tied head (shared tensors) and writes int8 cores that nothing reads back;
            # bondgate.from_pretrained / bondgate.load read this one. A state_dict handed in (FSDP, DeepSpeed: the
            # model's own parameters are sharded) goes the stock way.
            from .io import LAYER_TYPES, save_files

            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            registered = tuple(LAYER_TYPES.values())
            if state_dict is not None or not any(isinstance(m, registered) for m in model.modules()):
                return super()._save(output_dir, state_dict=state_dict)
            if not self.args.should_save:
                return None
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            tokenizer = self.processing_class if self.processing_class is not None else getattr(
                self.data_collator, "tokenizer", None)
            # file by file: under torchrun the other ranks write their RNG states into the checkpoint meanwhile
            save_files(model, output_dir, tokenizer=tokenizer if callable(getattr(tokenizer, "save_pretrained", None))
                       else None)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))  # as the stock _save
            return None

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
            """Resume from a bondgate checkpoint in place (checksums verified); any other the stock way."""
            if not _load_bondgate_state(model if model is not None else self.model, resume_from_checkpoint):
                super()._load_from_checkpoint(resume_from_checkpoint, model=model)

        def _load_best_model(self) -> None:
            """Load the best checkpoint in place when it is a bondgate one (not under DeepSpeed / FSDP); else the
            stock way."""
            if self.is_deepspeed_enabled or self.is_fsdp_enabled or not _load_bondgate_state(
                    self.model, self.state.best_model_checkpoint):
                super()._load_best_model()

        def evaluation_loop(self, *args, **kwargs):
            """The stock evaluation loop, leaving the gated layers' routing state (level counts, price) as it was."""
            # evaluation is not gating traffic, as in distill's eval_fn: the level counts saved with checkpoints and a
            # tracked price would otherwise depend on how often the run evaluated
            from .gating import preserved_state

            with preserved_state(self.model):
                return super().evaluation_loop(*args, **kwargs)

        def prediction_step(self, model: nn.Module, inputs: dict, prediction_loss_only: bool,
                            ignore_keys: list[str] | None = None
                            ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
            """The stock step for batches with labels; otherwise ``(distillation loss, None, None)``, so that
            evaluation reports an ``eval_loss``."""
            # the stock step computes a loss only for batches with labels; distillation data usually has none, and
            # then evaluation reported no eval_loss (load_best_model_at_end failed on the missing metric): the
            # distillation loss is the eval loss here
            if any(k in inputs for k in self.label_names):
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

    return DistillationTrainer


def __getattr__(name: str):
    if name == "DistillationTrainer":  # built on first use so that transformers stays optional
        cls = _make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
