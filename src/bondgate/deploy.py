"""Inference-only copies of a loaded model: :func:`deploy_int8` (CPU int8 matrix products) and :func:`deploy_float`
(the MPO layers that multiply by their dense product become ``nn.Linear``).

An int8 checkpoint (``compress(..., quantize="int8")``) stores int8 cores, but an :class:`MPOLinear` computes in
floating point (from the dequantized cores, or in speed mode from their product), so on disk it is smaller than
torch's dynamic int8 model while at run time it is no faster than fp32. :func:`deploy_int8` turns a loaded model
into one that runs torch's dynamic int8 kernels (fbgemm / x86 / qnnpack: int8 weights, activations quantized on
the fly per call, fp32 out): ship the small bondgate checkpoint, convert after loading.

Each bondgate layer becomes the plain layers that compute the same map, then ``quantize_dynamic`` with int8
weights per output channel:

* ``MPOLinear``: one layer holding its dense weight ``W`` (of a quantized layer, the product of the int8 cores,
  which is not itself on an int8 grid: it is quantized again, per output channel; a one-core int8 layer — a layer
  the budget kept dense — keeps its own int8 weight and scales, exactly);
* ``LowRankLinear``, and a rank-form ``MPOLinear`` (a pair held as two cores, as ``compress(..., quantize="int8")``
  stores pairs): its two factors ``x -> V x -> U (V x)``, or one layer holding ``U V`` where that is faster (an int8
  pair's factors keep their own int8 values and scales, exactly);
* plain ``nn.Linear`` / HF ``Conv1D`` layers (``dense=True``), as :func:`bondgate.quantize_int8` does but per
  output channel.

With ``rows`` every candidate is timed on ``rows`` random rows against the layer as it is, and a layer whose
int8 form is not faster stays as it is (at widths of 64 the per-call activation quantization costs more than it
saves). Those choices are timings: where the two forms are within a few percent, two runs can choose differently
(8 runs on a small GPT-2 gave 3 different sets, output changes 0.028-0.032): ``rows=None`` converts every layer,
the same every time. Gated layers (their bond widths change per input), embeddings, tied dense layers and the
projections of a :class:`bondgate.Recurrent` (its recurrence runs torch's fused kernel on their dense weights; int8
layers there would make it step through time in Python, ~1.6x slower) are left alone; a
tied MPO head (``compress(embeddings=True)``) is converted like any MPO layer: the table keeps its cores for the
lookup, the head gets its own int8 weight (``vocab x dim`` bytes), since the copy is for inference only. The
result is for inference: eval mode, the int8 layers without gradients, not savable with :func:`bondgate.save` (keep the bondgate
checkpoint and convert again after loading). Numerics: the activations' per-call quantization and the second
rounding of an int8 MPO's weight change the outputs slightly; measure the quality after converting
(``benchmarks/frontier.py`` does). That quantization is torch's, one range per call over all its rows: a row's
outputs move with the other rows of the batch (a row 1000x larger moved a small row's outputs by about their own
size in a review's test), a NaN input row comes out finite and wrong, an inf in one row makes every row of the
batch inf / NaN with the x86 / fbgemm engines (others fail the call: "min should be less than or equal to max"), and
weights below ~1e-5 in magnitude round to zero (torch's smallest scale). Batch rows of like scale, and check inputs
for non-finite values before the call.

:func:`deploy_float` is the floating-point counterpart for layers whose factors do not pay (and for int8 low-rank
pairs, held as two-core MPO layers, which it turns into ``LowRankLinear``: the same two GEMMs, which the MPO layer
also runs, without its per-call checks): an MPO layer whose plan
at ``rows`` rows per call is its dense product (speed mode's ``dense-cached``; at MiniLM's widths every MPO layer
of a 50% model compressed with ``kinds=("mpo",)``) computes one ``F.linear`` per call anyway, but each call first
checks that the kept weight is still its cores' product (a few microseconds warm, ~15-20 with cold caches, as calls
inside a model start: such a MiniLM ran 1-5% slower than dense at one sentence; the default's low-rank pairs run
faster than dense instead). The copy holds those layers as ``nn.Linear`` (the cores
dropped: the memory of the dense layer, not both), the other layers as they are.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ._checks import number
from .baselines import (
    _conv1d_to_linear,
    _select,
    _set_module,
    _weight_reader,
    check_finite,
    latency,
    quantize_dynamic,
)
from .gating import GatedMPOLinear
from .layer import _HOOK_DICTS, MPOLinear, carry_hooks
from .lowrank import LowRankLinear
from .quant import dequantize, quantize
from .recurrent import Recurrent
from .surgery import is_conv1d, module_names

__all__ = ["Int8Choice", "deploy_float", "deploy_int8"]


@dataclass
class Int8Choice:
    """What :func:`deploy_int8` did with one layer: ``form`` it had (``"mpo"``, ``"lowrank"``, ``"dense"``,
    ``"gated"``), ``chosen`` form (``"int8"``, ``"int8 factors"``, ``"int8 product"``, ``"kept"``, for a gated
    layer ``"kept (gated)"``, for a factored layer inside torch's fused ``nn.Transformer*`` /
    ``nn.MultiheadAttention`` modules ``"kept (inside ...)"``) and, when timed, the microseconds per call at ``rows`` rows as it was and of each int8
    candidate."""

    form: str
    chosen: str
    us: float | None = None
    int8_us: dict[str, float] | None = None


def _int8(layer: nn.Module, source: nn.Module | None = None) -> nn.Module:
    """An ``nn.Linear`` or a ``Sequential`` of them (a fresh copy: converted in place) as dynamic int8, per channel."""
    if isinstance(layer, nn.Sequential):
        q = quantize_dynamic(layer, [str(i) for i in range(len(layer))], per_channel=True)
    else:
        q = quantize_dynamic(layer, [""], per_channel=True)
    return _exact_int8(source, q) if isinstance(source, MPOLinear) else q


def _seconds(layer: nn.Module, rows: int, in_features: int) -> float:
    # the fastest of 20 calls: another process on the cores only ever adds time, so the minimum compares the
    # two kernels where a median would compare the moments the scheduler gave them
    with _hooks_off(layer):  # the user's hooks would see the random timing rows (and add their own time)
        return latency(layer, torch.randn(rows, in_features), reps=20, warmup=3)["min"]


@contextlib.contextmanager
def _hooks_off(layer: nn.Module) -> Iterator[None]:
    """``layer`` and its submodules with no forward / backward hooks for the block, every hook back after it."""
    saved = [(m, name, getattr(m, name)) for m in layer.modules() for name in _HOOK_DICTS if getattr(m, name, None)]
    for m, name, hooks in saved:
        setattr(m, name, type(hooks)())
    try:
        yield
    finally:
        for m, name, hooks in saved:
            setattr(m, name, hooks)


def _exact_int8(m: MPOLinear, q: nn.Module) -> nn.Module:
    """``q`` (torch's int8 form of ``m``) holding ``m``'s own int8 weights where ``m`` stores its matrices as int8 cores
    (torch would round the dequantized values again): one core (a layer the budget kept dense, per output channel),
    or the two factors of a rank-form layer (an int8 low-rank pair, one scale per row of each) as ``q``'s two layers."""
    if m.quant != "int8":
        return q
    cores = [c.detach() for c in m.cores]
    dyn = torch.ao.nn.quantized.dynamic.Linear
    if len(cores) == 1 and isinstance(q, dyn) and cores[0].shape == (1, m.out_features, m.in_features, 1):
        q.set_weight_bias(_stored_int8(cores[0], lambda t: t[0, :, :, 0]),
                          None if m.bias is None else m.bias.detach().clone())
    elif m.is_rank_form and isinstance(q, nn.Sequential) and len(q) == 2 and all(isinstance(p, dyn) for p in q):
        q[0].set_weight_bias(_stored_int8(cores[1], lambda t: t[:, 0, :, 0]), None)  # V: (rank, in), a scale per rank
        q[1].set_weight_bias(_stored_int8(cores[0], lambda t: t[0, :, 0, :]),  # U: (out, rank), a scale per output
                             None if m.bias is None else m.bias.detach().clone())
    return q  # (a padded one-core layer: not the stored matrix itself; torch's own rounding)


def _stored_int8(core: torch.Tensor, matrix) -> torch.Tensor:
    """The int8 values and scales ``core`` is stored as (:func:`bondgate.quant.quantize`), as torch's per-channel
    ``qint8`` tensor of the matrix ``matrix(core)`` (rows = the core's scale channels)."""
    levels, scales = quantize(core)
    s = scales.reshape(-1)
    return torch.quantize_per_channel(matrix(dequantize(levels, scales)), s.double(),
                                      torch.zeros(s.numel(), dtype=torch.int64), 0, torch.qint8)


def _form(m: nn.Module) -> str:
    """``"lowrank"`` (a pair, or one held as two cores: int8 ones, by compress), ``"mpo"`` or ``"dense"``."""
    if isinstance(m, LowRankLinear) or (isinstance(m, MPOLinear) and m.is_rank_form):
        return "lowrank"
    return "mpo" if isinstance(m, MPOLinear) else "dense"


def _candidates(m: nn.Module) -> tuple[str, dict[str, nn.Module]]:
    """``(form, {int8 candidate: fresh plain layers to quantize})``, the first candidate the untimed choice."""
    form = _form(m)
    if form == "lowrank":
        pair = LowRankLinear.from_mpo_linear(m) if isinstance(m, MPOLinear) else m
        return form, {"int8 factors": pair.to_linears(), "int8 product": m.to_linear()}
    if form == "mpo":
        return form, {"int8": m.to_linear()}
    return form, {"int8": _conv1d_to_linear(m) if is_conv1d(m) else copy.deepcopy(m)}


def _check(model: nn.Module, rows: int | None) -> int | None:
    """``rows`` as a Python int (or None) once the model is one deploy_int8 can convert."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"deploy_int8 expects an nn.Module, got {type(model).__name__}")
    rows = number(rows, "rows", low=1, integer=True, none_ok=True)
    bad = {(p.device.type, p.dtype) for p in model.parameters()} - {("cpu", torch.float32)}
    if bad:
        raise ValueError(f"deploy_int8 needs an fp32 model on the CPU (torch's dynamic int8 kernels), got "
                         f"parameters as {sorted(f'{d}/{t}' for d, t in bad)}")
    if torch.backends.quantized.engine == "none":
        raise RuntimeError("this torch build has no quantized engine (fbgemm / x86 / qnnpack)")
    return rows


def _owners(model: nn.Module, kinds: tuple[type, ...] = (MPOLinear, LowRankLinear, Recurrent)) -> tuple[str, ...]:
    """The name prefixes of the bondgate layers (of ``kinds``) in ``model`` whose submodules are theirs to run (a gated
    layer's controller reads its weight, a Recurrent's projections feed torch's fused kernel): ``""`` for the model
    itself."""
    return tuple(n and n + "." for n, m in model.named_modules() if isinstance(m, kinds))


def _mark(copy_: nn.Module, layers: list[nn.Module], how: str) -> None:
    """Mark a deployed copy and the layers it converted, which :func:`bondgate.save` refuses (they are for inference
    in this process; a part of the copy saved on its own would hold them too)."""
    for m in (copy_, *layers):
        m._bondgate_deployed = how


def _inside(name: str, owners: tuple[str, ...]) -> bool:
    """Whether module ``name`` lies inside one of the modules whose prefixes are ``owners`` (``""``: the model)."""
    return any(name.startswith(o) and name != o for o in owners)


def deploy_int8(model: nn.Module, rows: int | None = 32, dense: bool = True) -> nn.Module:
    """A copy of ``model`` whose linear layers run torch's dynamic int8 kernels on the CPU (see the module docs).

    Args:
        model: an fp32 CPU model (a compressed one, or any); not modified.
        rows: rows per layer call (tokens of a batch) to time each layer at, keeping the fastest of its form as
            it is and its int8 candidates; ``None``: convert without timing (MPO -> int8 dense weight,
            low-rank, a pair or a rank-form MPO layer -> int8 factors, dense -> int8).
        dense: also convert the plain ``nn.Linear`` / ``Conv1D`` layers (tied ones are left as they are). Layers
            inside torch's fused ``nn.Transformer*`` / ``nn.MultiheadAttention`` modules, which read their children's
            ``.weight`` tensors themselves, are left as they are, factored or plain.

    Returns the copy in eval mode; ``copy.bondgate_int8`` maps each candidate layer's name to its
    :class:`bondgate.deploy.Int8Choice`. A converted layer keeps the hooks registered on the layer it replaces (the
    timing calls run without them).
    """
    rows = _check(model, rows)
    if not isinstance(dense, bool):  # (dense="no" is truthy: it converted the dense layers)
        raise TypeError(f"deploy_int8: dense must be True or False, got {dense!r}")
    new = copy.deepcopy(model).eval()
    aliases = module_names(new)
    owners = _owners(new)  # not the plain layers inside a bondgate layer
    converted: list[nn.Module] = []
    layers = {n: m for n, m in new.named_modules() if isinstance(m, (MPOLinear, LowRankLinear))
              and not isinstance(m, GatedMPOLinear) and not _inside(n, owners)}
    # torch's fused attention / transformer modules read their children's .weight tensors themselves: an int8
    # module there has none (a Sequential of two) or a method of that name, and the model failed on its first call
    fused = {n: reader for n, m in layers.items() if (reader := _weight_reader(new, aliases[id(m)]))}
    if dense:
        layers.update({n: m for n, m in _select(new, None, replace=True)[0].items() if not _inside(n, owners)})
    # gated layers stay (their widths change per input): listed, so that the report names every bondgate layer
    report: dict[str, Int8Choice] = {n: Int8Choice("gated", "kept (gated)") for n, m in new.named_modules()
                                     if isinstance(m, GatedMPOLinear) and not _inside(n, owners)}
    for n, reader in fused.items():
        report[n] = Int8Choice(_form(layers.pop(n)), f"kept (inside {reader}, which reads its weights)")
    check_finite(layers, "deploy_int8")
    for name, m in layers.items():
        form, plain = _candidates(m)
        if rows is None:
            chosen, lin = next(iter(plain.items()))
            report[name], q = Int8Choice(form, chosen), _int8(lin, m)
        else:
            in_features = m.weight.shape[0] if is_conv1d(m) else m.in_features
            int8 = {k: _int8(p, m) for k, p in plain.items()}
            us = _seconds(m, rows, in_features) * 1e6
            int8_us = {k: _seconds(q, rows, in_features) * 1e6 for k, q in int8.items()}
            best = min(int8_us, key=int8_us.get)
            chosen = best if int8_us[best] < us else "kept"
            report[name], q = Int8Choice(form, chosen, us, int8_us), int8.get(chosen)
        if q is not None:
            carry_hooks(m, q)  # (torch's quantize_dynamic carries a plain layer's; a factored layer's int8 form is new)
            converted += q.modules()
            for alias in aliases[id(m)]:
                new = _set_module(new, alias, q)
    new.bondgate_int8 = report
    _mark(new, converted, "deploy_int8")
    return new


def deploy_float(model: nn.Module, rows: int = 32) -> nn.Module:
    """A copy of ``model`` for inference whose MPO layers that multiply by their dense product at ``rows`` rows per
    call (their plan's ``dense``: ``dense-cached`` in speed mode) are ``nn.Linear`` holding that product (of an int8
    layer, the dequantized weight its forward uses), in the cores' dtype and device, and whose rank-form layers
    (low-rank pairs held as two cores: ``compress(..., quantize="int8")``'s) that do not are
    :class:`~bondgate.LowRankLinear` (two ``F.linear`` calls, the dequantized factors); see the module docs.

    Args:
        model: a model with :class:`bondgate.MPOLinear` layers (any dtype or device); not modified.
        rows: rows per layer call (tokens of a batch) the plans are looked up at: a layer whose plan there is a
            contraction of its factors stays as it is.

    Gated layers (their widths change per input), low-rank pairs and the layers inside a bondgate layer stay. A
    converted layer keeps the hooks registered on the layer it replaces. The copy is in eval mode and for inference:
    its linear layers have no cores to train or to save with :func:`bondgate.save` (keep the bondgate checkpoint and
    convert after loading). ``copy.bondgate_float`` maps each MPO layer's name to its plan's name at ``rows`` and
    whether it was converted (to ``nn.Linear``, or a rank-form layer to ``LowRankLinear``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"deploy_float expects an nn.Module, got {type(model).__name__}")
    rows = number(rows, "rows", low=1, integer=True)
    new = copy.deepcopy(model).eval()
    aliases = module_names(new)
    owners = _owners(new)
    report: dict[str, tuple[str, bool]] = {}
    converted: list[nn.Module] = []
    for name, m in list(new.named_modules()):
        if not isinstance(m, MPOLinear) or _inside(name, owners):
            continue
        if isinstance(m, GatedMPOLinear):
            report[name] = ("gated", False)
            continue
        plan = m.plan(rows)
        report[name] = (plan.name, plan.dense or m.is_rank_form)
        if plan.dense:
            lin = m.to_linear().eval()
            lin.weight.requires_grad_(any(c.requires_grad for c in m.cores))
        elif m.is_rank_form:  # a low-rank pair held as two cores (compress's int8 pairs): the pair's two F.linear calls
            lin = LowRankLinear.from_mpo_linear(m).eval()
        else:
            continue
        if lin.bias is not None:
            lin.bias.requires_grad_(m.bias.requires_grad)
        carry_hooks(m, lin)
        converted.append(lin)
        for alias in aliases[id(m)]:
            new = _set_module(new, alias, lin)
    new.bondgate_float = report
    _mark(new, converted, "deploy_float")
    return new
