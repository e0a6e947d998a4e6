"""Per-input bond gating: a tiny controller picks, for every input row, how much of each bond to use.

The cores of an :class:`~bondgate.MPOLinear` are canonical, so every bond's channels are sorted by
Schmidt value and keeping a prefix of one bond is the best truncation of that bond alone (cutting every bond
at once, a re-canonicalizing sweep, :meth:`~bondgate.MPO.truncate`, does a few percent better). A gated layer
offers a few *levels* (fractions of every bond, e.g. 25/50/75/100%); level ``l`` is the MPO with
cores sliced to ``[:w_{k-1}(l), :, :, :w_k(l)]``.

Inference (``eval()``): the controller scores the levels for each row; rows are grouped by their level
and each group is contracted with the sliced cores through the planner (one cached plan per level and
row bucket; when that plan is the planner's sweep, its operands are views of one copy of the full-width
cores in the sweep's matrix layout, since a bond prefix is a prefix of those matrices' rows and columns).
Nothing is masked: a row at 50% width really runs the smaller contraction. Every level
present in a call is a separate contraction with a fixed cost of its own, so for batched inference
``set_budget(..., max_groups=k)`` lets each call use at most ``k`` levels, the ``k`` that serve its rows
best (:func:`bondgate.gating.route`; ``k=1`` gives every row of a call one width, i.e. per-input routing when a call
is one input's tokens). A call that takes one level (one row, or ``k=1``) takes it as a Python int, and a
one-row call on the CPU computes the controller's handful of numbers in numpy, whose per-operation
overhead is a third of torch's: at one row, dispatch rather than arithmetic is what a decision costs.

Training: ``mode="nested"`` samples a random level per row (nested dropout / Matryoshka), which makes
every prefix a good truncation — with ``distill(..., sandwich=True)`` the whole model also trains at full
width every step, without which the full width, which the error controllers approximate, falls below its
own truncations; ``mode="gate"`` trains a linear controller with a straight-through
Gumbel-max estimator: the forward pass uses the sampled (hard) level of each row — the same value as
inference — while the gradient flows through the softmax of the level scores, with every level's
output computed so the controller sees what each choice would have given. A budget penalty on the
expected FLOPs (reported by :meth:`GatedMPOLinear.bondgate_aux_loss`, which :func:`bondgate.distill`
adds to its loss) pulls the average toward the budget. (An error controller is fitted, not trained: in
``mode="gate"`` training routes rows by it and its price as inference does, and trains the cores.) After training, :func:`set_budget` calibrates
one global price ``lam`` on inputs so that the average FLOPs per row hit any budget exactly — the
budget can be changed at inference without retraining. A fixed price holds the budget on inputs like the
calibration data; ``set_budget(..., track=g)`` adds a :class:`bondgate.gating.PriceTracker` that corrects the price
online from the FLOPs the inference calls spend, so that their average stays at the budget on shifted inputs too.

Two controllers: ``"linear"`` (default) is the probe above, trained with the Gumbel estimator;
``"error"`` predicts every level's output error for the row, ``|(W - W_l) x|^2``, from a few squared
projections of ``x`` and is fitted in closed form by :func:`fit_controllers` on calibration inputs (no
training, seconds); the decision then minimizes predicted error + ``lam`` x FLOPs per row, i.e. spends
the budget where the truncation error is largest. With ``fit_controllers(..., objective="model")`` that
error is weighted per output channel by its effect on the model's output or loss and priced in absolute
FLOPs, so one shared price trades compute between layers as well as between rows.

FLOPs of a level are those of the cheapest plan contracting ONE row with the level's cores
(:func:`bondgate.planner.min_flops` at 1 row): the per-row compute that the bond widths control. At
large row counts the planner may run a narrow MPO as rebuild-the-weight + GEMM, whose cost no longer
depends on the width; ``benchmarks/gating.py`` measures where the saving shows up in wall-clock time.
The controller's own ``2 * (in_features + 1) * levels`` FLOPs per row are added to every row.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import operator
import statistics
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ._checks import number, positive_int
from ._warn import warn_user
from .calibration import _row_mask, as_batches, capture_inputs, in_calibration_pass, rows_vary
from .io import register_layer_type
from .layer import (
    _AUTOCAST_ON,
    _GRAD_ON,
    _IS_COMPILING,
    _TENSOR,
    _VERSION,
    CORE_NAMES,
    MPOLinear,
    bad_input,
    core_versions,
    is_fresh,
    kept,
    nested_forward,
    outside_inference_mode,
    own_param,
    replica_without_kept,
    stamp,
    storage_nbytes,
    track_parameters,
    without_kept,
)
from .lowrank import LowRankLinear
from .mpo import MPO
from .planner import PlanPolicy, get_plan, min_flops, sweep_views
from .surgery import _matches, _short_list, check_selector, module_names, swap_module

__all__ = ["GatingConfig", "GatedMPOLinear", "gate", "set_mode", "set_budget", "fit_controllers", "gating_report",
           "average_flops", "width_error_curve", "route", "PriceTracker"]

# the level counts, the price tracker and a replica's penalty terms are read-modify-writes from threads (one model
# served from several threads; nn.DataParallel's replicas reporting to their layer)
_LOCK = threading.Lock()
_LINEAR = torch.nn.functional.linear
#: prices beyond this change no decision (every row at the cheapest or the widest level): the calibration's search
#: range and the online tracker's bound (it would otherwise grow without limit while a budget is out of reach)
PRICE_BOUND = 1e3


@dataclass
class GatingConfig:
    """``budget``: target average FLOPs per row as a fraction of the full-width FLOPs (controller
    included) for training a linear controller (its budget penalty); what inference spends is set by
    :func:`set_budget`; ``levels``: kept fraction of every bond, strictly increasing in (0, 1];
    ``target_modules``: which MPO layers (regex on the full name, or a list of names/suffixes; None =
    all); ``temperature``: Gumbel-softmax temperature; ``penalty``: weight of the squared budget gap;
    ``controller``: ``"linear"`` (a linear probe trained with the Gumbel estimator in ``mode="gate"``)
    or ``"error"`` (predicts each level's output error from ``rank`` squared projections of the input,
    fitted in closed form by :func:`fit_controllers`, no training)."""

    budget: float = 0.5
    levels: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    target_modules: str | list[str] | None = None
    temperature: float = 1.0
    penalty: float = 5.0
    controller: str = "linear"
    rank: int = 8

    def __post_init__(self) -> None:
        self.budget = _check_budget(self.budget)
        levels = self.levels
        if getattr(levels, "ndim", None) == 1 and hasattr(levels, "tolist"):  # a 1-D tensor or array: its numbers
            levels = levels.tolist()
        raw = tuple(levels) if isinstance(levels, Iterable) and not isinstance(levels, (str, bytes)) else None
        if raw is None:
            raise TypeError(f"levels are fractions of each bond (a sequence of numbers), got {self.levels!r}")
        if not raw:
            raise ValueError("levels must not be empty")
        lv = tuple(number(v, "each of levels", low=0, high=1, low_open=True, hint="a fraction of each bond")
                   for v in raw)
        if any(b <= a for a, b in zip(lv, lv[1:])):
            raise ValueError(f"levels must be strictly increasing (sorted, no duplicates), got {lv}")
        self.levels = lv
        self.temperature = number(self.temperature, "temperature", low=0, low_open=True)
        self.penalty = number(self.penalty, "penalty", low=0)
        check_selector(self.target_modules, "target_modules")
        if self.controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {sorted(CONTROLLERS)}, got {self.controller!r}")
        self.rank = positive_int(self.rank, "rank")


def _fitted(layer: "GatedMPOLinear") -> bool:
    """Whether a layer's controller was fitted (an error controller's coefficients moved from the ones it starts
    with; its projections may have been re-initialized by transformers' init_weights) or trained (a linear probe's
    weight, 0 until then)."""
    ctrl = layer.controller
    if isinstance(ctrl, ErrorController):
        start = ErrorController.start_coef(layer.levels, layer.in_features).to(ctrl.coef.dtype)
        return bool(ctrl.coef[:, : ctrl.rank].any()) or not torch.equal(ctrl.coef[:, -1].detach().cpu(), start)
    return bool(ctrl.proj.weight.any())


def _check_budget(budget: float) -> float:
    """``budget`` as a float (numpy's numbers too), or a ValueError."""
    return number(budget, "budget", low=0, high=1, low_open=True,
                  hint="a fraction of the full-width FLOPs")


def _check_track(rate: float) -> float:
    return number(rate, "track", low=0, high=10,
                  hint="the gain of the online price correction; 0: a fixed price")


class GateController(nn.Module):
    """Scores the levels of one row from its direction ``x / |x|`` and its log-norm: ``(B, in) -> (B, L)``.

    Costs ``2 * (in + 1) * L + 3 * in`` FLOPs per row (the probe, and the norm): about 1% of a 384-wide MPO
    layer's FLOPs per row at 64-row calls.
    """

    def __init__(self, in_features: int, levels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features + 1, levels)
        nn.init.zeros_(self.proj.weight)
        with torch.no_grad():  # start by preferring wide levels: gating begins close to the full MPO
            self.proj.bias.copy_(torch.linspace(-1.0, 1.0, levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
        return self.proj(torch.cat([x / norm * math.sqrt(x.shape[-1]), norm.log()], dim=-1))

    def host_params(self) -> tuple[torch.Tensor, ...]:
        proj = self._modules["proj"]  # direct dict reads: nn.Module.__getattr__ is ~0.5 us each
        return own_param(proj, "weight"), own_param(proj, "bias")

    def host_operands(self, dtype: torch.dtype) -> list:
        w, b = self.host_params()
        return [t.detach().to(dtype).contiguous().numpy() for t in (w[:, :-1], w[:, -1], b)]

    @staticmethod
    def host_cost(ops: list, x):
        """Minus the scores of one row ``x`` (numpy, ``(in,)``) from :meth:`host_operands`: ``(L,)``."""
        w, w_norm, b = ops
        norm = max(float(np.sqrt(x @ x)), 1e-12)
        return -((w @ x) * (math.sqrt(x.shape[0]) / norm) + w_norm * math.log(norm) + b)


class ErrorController(nn.Module):
    """Predicts, for each row ``x``, the squared output error of every level relative to the layer's mean
    output energy, and scores the levels by minus that: ``(B, in) -> (B, L)``.

    ``err_l(x) = sum_j coef[l, j] * (u_j . x)^2 + coef[l, rank] * |x|^2``: the error of level ``l`` is the
    quadratic form ``|D_l x|^2`` with ``D_l = W - W_l``; the ``u_j`` (rows of ``proj``) are its dominant
    directions and the last term covers the rest. The decision ``argmax(score - lam * cost)`` then picks,
    per row, the level that minimizes ``error + lam * FLOPs``. Costs ``2 * in * (rank + 1) + 2 * (rank + 1) * L``
    FLOPs per row. Until :func:`fit_controllers` runs, it prefers wide levels (error ~ 1 - level). Its parameters
    do not require grad: training (``mode="gate"``) routes rows by it as inference does and trains the cores.
    """

    def __init__(self, in_features: int, levels: Sequence[float], rank: int = 8) -> None:
        super().__init__()
        self.rank = int(rank)
        self.proj = nn.Linear(in_features, self.rank, bias=False)
        nn.init.zeros_(self.proj.weight)
        coef = torch.zeros(len(levels), self.rank + 1)
        coef[:, -1] = self.start_coef(levels, in_features)
        self.coef = nn.Parameter(coef)
        self.requires_grad_(False)  # fitted in closed form: an optimizer must not move the predicted errors

    @staticmethod
    def start_coef(levels: Sequence[float], in_features: int) -> torch.Tensor:
        """The norm term's coefficients before fitting, ``(L,)``: error ~ (1 - level) of a unit-energy row."""
        return torch.tensor([1.0 - v for v in levels]) / in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[(u_j . x)^2, |x|^2]``, ``(B, rank + 1)``; float32 for float16/bfloat16 ``x`` (in float16, ``|x|^2``
        overflows once ``|x| > 256``: every level would look infinitely bad)."""
        w = self.proj.weight
        if x.dtype in (torch.float16, torch.bfloat16):
            x, w = x.float(), w.float()
        # F.linear and vector_norm, not self.proj(x) and x.norm: a one-row decision is a few us of op overheads
        proj = torch.nn.functional.linear(x, w)
        return torch.cat([proj, torch.linalg.vector_norm(x, dim=-1, keepdim=True)], -1).square()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return -(f @ self.coef.T.to(f.dtype))

    def host_params(self) -> tuple[torch.Tensor, ...]:
        return own_param(self._modules["proj"], "weight"), own_param(self, "coef")

    def host_operands(self, dtype: torch.dtype) -> list:
        """``proj.weight`` with a row of zeros below, ``(rank + 1, in)``, and ``coef.T``, ``(rank + 1, L)``."""
        w, c = self.host_params()
        u = torch.nn.functional.pad(w.detach(), (0, 0, 0, 1))  # the zero row below
        return [t.to(dtype).contiguous().numpy() for t in (u, c.detach().T)]

    @staticmethod
    def host_cost(ops: list, x):
        """The predicted errors of one row ``x`` (numpy, ``(in,)``) from :meth:`host_operands`: ``(L,)``. The features
        ``[(u_j . x)^2, |x|^2]`` in one array (the zero row's product replaced by ``|x|^2``), then one product with
        ``coef.T``: four numpy operations where the features and the norm term apart took seven (each ~1 us, ~3 us
        with the cold caches of a decode step)."""
        u, coef_t = ops
        f = u @ x
        f *= f
        f[-1] = x @ x
        return f @ coef_t

    def coef_t(self) -> torch.Tensor:
        """``coef.T`` detached and contiguous, ``(rank + 1, L)``; cached until ``coef`` changes."""
        coef = self.coef
        return kept(self.__dict__.setdefault("_kept", {}), "coef_t", (coef,), lambda: coef.detach().T.contiguous())

    def cost(self, in_features: int) -> float:
        return 2.0 * in_features * (self.rank + 1) + 2.0 * (self.rank + 1) * self.coef.shape[0]

    def _apply(self, fn, recurse: bool = True):  # .to() / .double() swap coef's data without a version bump
        self.__dict__.pop("_kept", None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # as MPOLinear's: a copy's coef starts a new version counter, which the copied
        return without_kept(super().__getstate__(), ("_kept",))  # stamp would match again after as many writes

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.pop("_kept", None)  # pickled before __getstate__ left it out

    def _replicate_for_data_parallel(self):
        return replica_without_kept(super()._replicate_for_data_parallel(), ("_kept",))


def _linear_cost(in_features: int, levels: int) -> float:
    return 2.0 * (in_features + 1) * levels + 3.0 * in_features


CONTROLLERS = {"error", "linear"}


def _widths(bonds: Sequence[int], frac: float) -> tuple[int, ...]:
    return tuple(max(1, min(r, math.ceil(frac * r - 1e-9))) for r in bonds)


#: ``route`` enumerates the ``C(L, k)`` level subsets up to this many (16 levels, k = 4: 1820); beyond it a local search
EXACT_SUBSETS = 2048


@functools.lru_cache(maxsize=64)
def _subsets(levels: int, k: int) -> torch.Tensor:
    """Every ``k``-subset of ``range(levels)``, ``(C(levels, k), k)``."""
    return torch.tensor(list(itertools.combinations(range(levels), k)), dtype=torch.long)


def _subset_search(objective: torch.Tensor, k: int) -> torch.Tensor:
    """A ``k``-subset of the levels with a small total of each row's best objective within it, ``(k,)`` sorted, where
    enumerating all ``C(L, k)`` costs too much: the ``k`` levels with the least totals, then the best single swap (a
    level out, another in; all ``k x L`` of them scored at once) while one lowers the total. Rows not finite at
    any level count 0, as in :func:`_total`; a level where a row is not finite costs it more than any finite total."""
    bad = ~torch.isfinite(objective)
    obj = objective.masked_fill(bad, 0.0)  # (B, L)
    if bool(bad.any()):
        # a row not finite anywhere (a NaN / inf input) is free, as in _total; a row not finite at some levels only
        # (overflow at its widest ones) must not find those free: they cost more than any finite total
        worst = float(obj.abs().max()) * 2 * obj.shape[0] + 1.0
        obj = torch.where(bad & ~bad.all(1, keepdim=True), torch.full_like(obj, worst), obj)
    L = obj.shape[1]
    chosen = obj.sum(0).topk(k, largest=False).indices  # (k,)
    best = obj[:, chosen].amin(1).sum()
    for _ in range(4 * k):
        two = obj[:, chosen].topk(2, dim=1, largest=False)  # each row's best and second best chosen level
        # without chosen level i, a row pays its best unless i is where it got it: then its second best
        base = torch.where(two.indices[:, :1].T == torch.arange(k, device=obj.device)[:, None],
                           two.values[:, 1], two.values[:, 0])  # (k, B)
        totals = torch.minimum(base[:, :, None], obj).sum(1)  # (k, L): chosen level i out, level j in
        totals[:, chosen] = math.inf
        flat = int(totals.argmin())
        i, j = divmod(flat, L)
        if not bool(totals[i, j] < best):
            break
        chosen[i], best = j, totals[i, j]
    return chosen.sort().values


def to_host(t: torch.Tensor) -> list:
    """``t.tolist()``: the one place the gated forward reads a device tensor on the host. Routing rows to
    kernels of different shapes needs the rows per level on the host, so an inference call of a gated layer
    waits for the device exactly once (on a GPU, a host sync), here."""
    return t.tolist()


def route(objective: torch.Tensor, max_groups: int | None = None) -> torch.Tensor:
    """Levels for the rows of one call: ``objective`` ``(B, L)`` is what each row would pay at each level
    (predicted error + price x FLOPs); returns ``(B,)`` indices.

    Unconstrained (``max_groups=None``) every row takes its own argmin. With ``max_groups=k`` the call
    uses at most ``k`` distinct levels: the ``k``-subset of levels with the least total objective (exact,
    by enumerating the ``C(L, k)`` subsets, up to :data:`EXACT_SUBSETS` of them; beyond, e.g. 16 levels and
    ``k = 8``, a swap search, :func:`_subset_search`) and each row's best level within it. Why: every
    level present in a batch is a separate contraction, and at tens to hundreds of rows the fixed cost of each
    (a few small GEMMs and permutes) eats the saving of routing rows finely.
    """
    if max_groups == 1:  # the one level with the least total objective: what the subset search below gives
        return _total(objective).argmin().expand(objective.shape[0])
    lv = objective.argmin(-1)
    L = objective.shape[-1]
    if max_groups is None or max_groups >= L or objective.shape[0] <= max_groups:
        return lv
    # the argmin already uses few enough levels: the best subset would give it anyway (checked on the CPU
    # only: on a GPU the check would cost a host sync, and the subset search gives the same result)
    if objective.is_cpu and int(torch.count_nonzero(torch.bincount(lv, minlength=L))) <= max_groups:
        return lv
    if math.comb(L, max_groups) > EXACT_SUBSETS:  # (16 levels, k = 8: 12,870 subsets took 15 ms a 32-row call)
        best = _subset_search(objective, max_groups)
    else:
        subsets = _subsets(L, max_groups).to(objective.device)  # (S, k)
        best = subsets[_total(objective[:, subsets].amin(-1)).argmin()]  # (B, S, k) -> (B, S) -> (S,) -> (k,)
    return best[objective[:, best].argmin(-1)]


def _rank_product(x2d: torch.Tensor, V: torch.Tensor, Ut: torch.Tensor, r: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """A rank-form layer's product at rank ``r``: ``x2d @ V[:r].T @ Ut[:r] (+ bias)``, ``(B, in) -> (B, out)``; the
    bias is added by the second GEMM (one op and one output allocation less than adding it after)."""
    h = torch.nn.functional.linear(x2d, V[:r])
    return torch.mm(h, Ut[:r]) if bias is None else torch.addmm(bias, h, Ut[:r])


def _plus(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y + bias`` (``y`` without a bias)."""
    return y if bias is None else y + bias


def _host_price(lam: torch.Tensor | float, rel: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``lam`` x each level's relative FLOPs ``rel`` (float64), in ``dtype``: what :meth:`GatedMPOLinear._price_vector`
    computes (the float64 product, then the dtype), in numpy for the one-row host decision."""
    return (float(lam) * rel).astype(dtype)


class _DecodeEntry(NamedTuple):
    """What :meth:`GatedMPOLinear._decode_step` reads (built by ``_arm_decode``): valid while ``cores`` and the
    controller's ``src`` tensors are these very ones with these version sums; ``price`` holds ``(buffer, version,
    price vector)`` of the price it was computed from (``None`` until then), replaced when the price moves."""
    dtype: torch.dtype
    cores: tuple
    versions: int
    factors: list  # per level, the views (V[:r], U[:, :r]) of the kept rank operands: nn.Linear's weight layout
    src: tuple
    src_versions: int
    ops: list
    host_cost: Callable
    rel: np.ndarray
    price: list


def _total(objective: torch.Tensor) -> torch.Tensor:
    """``objective.sum(0)`` without its non-finite entries: the row of a NaN/inf input (NaN or inf at every level;
    its output is NaN anyway) must not choose the level of the call's other rows. One op (~1.5 us) where masking
    whole rows took three (~7 us), on the path of every multi-row call with ``max_groups``."""
    return objective.nan_to_num(0.0, 0.0, 0.0).sum(0)


class PriceTracker:
    """Online correction of the price of a group of gated layers (all of a model's, or one layer), so
    that the FLOPs of the inference calls average to the budget on *any* input stream.

    A price calibrated by :func:`set_budget` meets the budget on inputs like its calibration data; on
    inputs whose rows are easier or harder the controllers choose narrower or wider levels and the
    average drifts (STS-B dev vs train sentences: 6-8%). The tracker is an integral controller: after each
    round (every layer of the group has reported one call, or one reports a second time) it multiplies
    the group's price ``budget_lambda`` by ``exp(rate * step)``, ``step = (used - budget * full) /
    (budget * typical_full)`` being the round's excess FLOPs relative to a typical round's budget
    (``typical_full``: running mean of the rounds' full-width FLOPs); a price <= 0 (possible with the
    linear controller) moves by ``rate * step * scale`` instead, ``scale`` the calibrated price's size.
    The sum of the steps is the excess accumulated over the whole stream, so the price settles only when
    that excess stays bounded, i.e. when the average over the stream is the budget. Multiplicative,
    because the price is in units of the controllers' errors: inputs with 3x larger errors need a ~3x
    price. Decisions then depend on the calls before: the price is state (saved with the model, with the
    tracker's running mean; a round in progress when saving is dropped), not a function of the input alone.
    """

    def __init__(self, layers: Sequence["GatedMPOLinear"], budget: float, rate: float, scale: float,
                 shared: bool, rounds: int = 0, typical_full: float = 0.0) -> None:
        self.layers, self.budget, self.rate, self.scale = list(layers), float(budget), float(rate), float(scale)
        self.shared = bool(shared)  # one price for all of a model's gated layers (else one per layer)
        self.used = self.full = 0.0
        self.seen: set[int] = set()
        self.rounds, self.typical_full = int(rounds), float(typical_full)
        self.lam: float | None = None  # the group's price, once read

    def report(self, layer: "GatedMPOLinear", used: float, rows: int) -> None:
        """One inference call of ``layer``: ``used`` FLOPs (levels and controller) for ``rows`` rows."""
        if id(layer) in self.seen:
            self.step()
        self.seen.add(id(layer))
        self.used += used
        self.full += layer.full_cost * rows
        if len(self.seen) == len(self.layers):
            self.step()

    def step(self) -> None:
        if self.full > 0:
            self.rounds += 1
            self.typical_full += (self.full - self.typical_full) / min(self.rounds, 100)
            step = self.rate * (self.used - self.budget * self.full) / (self.budget * self.typical_full)
            # the tracker keeps the price on the host (read from the buffer once): no device read per round
            lam = self.lam if self.lam is not None else float(self.layers[0].budget_lambda)
            lam = lam * math.exp(step) if lam > 0 else lam + step * self.scale
            self.lam = lam = min(max(lam, -PRICE_BOUND), PRICE_BOUND)
            for m in self.layers:
                m._set_price(lam)
        self.used = self.full = 0.0
        self.seen.clear()

    def spec(self) -> dict:
        return {"rate": self.rate, "scale": self.scale, "shared": self.shared, "rounds": self.rounds,
                "typical_full": self.typical_full}

    def __deepcopy__(self, memo: dict) -> "PriceTracker":
        # a round in progress is dropped, as when saving: it is recorded by the layers' ids, which a copy does not have
        new = PriceTracker.__new__(PriceTracker)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        new.used = new.full = 0.0
        new.seen = set()
        return new


@register_layer_type
class GatedMPOLinear(MPOLinear):
    """An :class:`~bondgate.MPOLinear` whose bond widths are chosen per input row by a controller.

    ``mode``: ``"gate"`` (controller), ``"nested"`` (random level per row when training; full width
    in eval), ``"full"`` (the static MPO), or a float ``f`` (static prefix truncation to ``f`` of every
    bond, the baseline gating must beat). Buffers: ``budget_lambda`` (price of a FLOP fraction in score
    units, set by :func:`set_budget`; written by hand, write it in place, ``fill_`` / ``copy_``: a write through
    ``.data`` is not seen by the decisions, which keep the price vector until the buffer's version moves),
    ``level_counts`` (rows routed to each level in eval since the
    last :func:`gating_report` reset; read it through :meth:`flush_counts` or :func:`gating_report`: a call adds
    its rows to the buffer lazily, to spare a tensor op per call).

    A gated low-rank pair (:meth:`bondgate.LowRankLinear.to_mpo_linear`: legs ``(out, 1) x (1, in)``, the bond
    is the rank) keeps a prefix of the rank per row; its inference runs two matmuls per level on contiguous
    prefixes, and a call whose rows take several levels runs the nested-prefix kernel.

    Build one with :func:`gate` (every MPO layer of a model), :meth:`from_mpo_linear` (an existing layer, sharing its
    parameters), :meth:`from_linear`, or the constructor (``MPOLinear``'s arguments, randomly initialized cores);
    ``gating`` (a :class:`GatingConfig`, default ``GatingConfig()``) sets the levels and the controller.
    """

    def __init__(self, *args, gating: GatingConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_config(gating)

    @classmethod
    def from_linear(cls, linear: nn.Module, *args, gating: GatingConfig | None = None,
                    **kwargs) -> "GatedMPOLinear":
        """:meth:`MPOLinear.from_linear` (TT-SVD of a trained ``nn.Linear`` or HF ``Conv1D``), gated as ``gating``
        says."""
        layer = super().from_linear(linear, *args, **kwargs)
        layer._init_config(gating)
        return layer

    @classmethod
    def from_mpo(cls, mpo: MPO, bias: torch.Tensor | None = None, policy: str | PlanPolicy = "memory", *,
                 gating: GatingConfig | None = None) -> "GatedMPOLinear":
        """:meth:`MPOLinear.from_mpo` (the cores copied), gated as ``gating`` says."""
        layer = cls._wrap(mpo, bias, policy)
        layer._init_config(gating)
        return layer

    def _init_config(self, config: GatingConfig | None, cost_rows: int = 1) -> None:
        if config is None:
            config = GatingConfig()
        elif not isinstance(config, GatingConfig):
            raise TypeError(f"gating must be a GatingConfig, got {type(config).__name__}")
        else:
            config.__post_init__()  # checked again: a field set after construction (config.controller = "Error")
        self._init_gating(config.levels, config.temperature, config.penalty, config.budget, config.controller,
                          config.rank, cost_rows)

    def _init_gating(self, levels: Sequence[float], temperature: float, penalty: float, budget: float,
                     controller: str = "linear", rank: int = 8, cost_rows: int = 1) -> None:
        self.levels = tuple(float(v) for v in levels)
        self.temperature, self.penalty, self.budget = float(temperature), float(penalty), float(budget)
        self.controller_kind, self.controller_rank = controller, min(int(rank), self.in_features)
        c0 = self._core_tuple()[0]
        ctrl = (ErrorController(self.in_features, self.levels, self.controller_rank) if controller == "error"
                else GateController(self.in_features, len(self.levels)))
        self.controller = track_parameters(ctrl.to(device=c0.device, dtype=c0.dtype))
        self.register_buffer("budget_lambda", torch.zeros((), dtype=torch.float64, device=c0.device))
        self.register_buffer("level_counts", torch.zeros(len(self.levels), dtype=torch.float64, device=c0.device))
        self.mode: str | float = "gate"
        self.max_groups: int | None = None  # distinct levels per forward call in inference (set_budget)
        self.cost_rows = positive_int(cost_rows, "cost_rows")  # FLOPs per row counted for calls of this many rows
        self.record = True
        self._pending = [0] * len(self.levels)  # rows per level not yet added to level_counts (no tensor op per call)
        self._refresh_costs()
        self._aux: tuple[torch.Tensor, int] | None = None  # the penalty's (mean expected cost, rows) since collected
        self._aux_stale = False  # a backward ran through a call since: the next training call starts afresh
        self._slices: dict = {}  # inference operands: sliced cores, sweep matrices and their views
        self._tracker: PriceTracker | None = None  # set_budget(track=...): online price correction

    def _refresh_costs(self) -> None:
        """Per-row FLOPs of every level: the cheapest plan for a call of ``cost_rows`` rows, per row. Rerun
        whenever the bonds change (:meth:`_reset_caches`): the levels are fractions of the current bonds."""
        full, rows = self.bond_dims, self.cost_rows
        self._costed = (full, self.out_factors, self.in_factors)
        # a low-rank pair U V as a 2-core MPO (out, 1) x (1, in): inference runs the nested-prefix kernel
        self._rank_form = self.is_rank_form
        self.level_widths = [_widths(full, f) for f in self.levels]
        self.full_cost = min_flops(self.out_factors, self.in_factors, full, rows) / rows
        self.level_cost = [min_flops(self.out_factors, self.in_factors, w, rows) / rows for w in self.level_widths]
        self.rel_cost = torch.tensor(self.level_cost, dtype=torch.float64) / self.full_cost  # (L,), CPU
        self._price: dict[tuple, tuple] = {}
        self._host: dict = {}  # the one-row numpy decision's operands and price per dtype (see _host_level)
        ctrl = self.controller
        self.controller_cost = (ctrl.cost(self.in_features) if isinstance(ctrl, ErrorController)
                                else _linear_cost(self.in_features, len(self.levels)))

    @classmethod
    def from_mpo_linear(cls, layer: MPOLinear, config: GatingConfig) -> "GatedMPOLinear":
        """``layer`` gated as ``config`` says: the gated layer holds ``layer``'s very core and bias parameters (not
        copies), its plan policy and its int8 quantization."""
        g = cls._wrap(layer.to_mpo(), None if layer.bias is None else layer.bias.detach(), layer.policy)
        # the layer's very parameters, not copies: a head tied to its table's cores stays tied, frozen cores stay
        # frozen, an optimizer built before gating still holds them
        g.cores, g.bias = layer.cores, layer.bias
        g.error = layer.error
        g._init_config(config)
        g.quantize_(layer.quant)  # int8 cores stay int8 when gated
        return g

    # ------------------------------------------------------------------ structure for checkpoints
    def spec(self) -> dict:
        """:meth:`MPOLinear.spec` plus the gating settings (levels, temperature, penalty, budget, mode, controller,
        max_groups, cost_rows, price tracker); JSON-serializable."""
        spec = super().spec()
        spec.update({"levels": list(self.levels), "temperature": self.temperature, "penalty": self.penalty,
                     "budget": self.budget, "mode": self.mode, "controller": self.controller_kind,
                     "controller_rank": self.controller_rank, "max_groups": self.max_groups,
                     "cost_rows": self.cost_rows,
                     "track": None if self._tracker is None else self._tracker.spec()})
        return spec

    def __setattr__(self, name: str, value) -> None:
        if name == "mode":  # an assignment of its own (layer.mode = 1) is checked as set_mode's (1 -> 1.0, full width):
            value = _check_mode(value)  # unchecked, an int or "Full" routed by the controller and broke save / load
        super().__setattr__(name, value)

    def _set_mode(self, mode: str | float) -> None:
        """Set a checked ``mode``; the controller trains only in ``"gate"`` (an error controller is fitted, never)."""
        self.mode = mode
        for p in self.controller.parameters():
            p.requires_grad_(mode == "gate" and not isinstance(self.controller, ErrorController))

    @classmethod
    def from_spec(cls, spec: dict) -> "GatedMPOLinear":
        """An uninitialized layer with the structure and gating settings of :meth:`spec` (fill it with
        ``load_state_dict``, which also restores the controller, price and level counts)."""
        if "levels" not in spec:
            raise ValueError("GatedMPOLinear spec is missing 'levels'")
        layer = super().from_spec(spec)
        # checkpoints written before the error controller existed hold the linear one
        kind, rank = spec.get("controller", "linear"), spec.get("controller_rank", 8)
        layer._init_config(GatingConfig(budget=spec.get("budget", 0.5), levels=tuple(spec["levels"]), controller=kind,
                                        rank=rank, temperature=spec.get("temperature", 1.0),
                                        penalty=spec.get("penalty", 5.0)), spec.get("cost_rows", 1))
        layer._set_mode(_check_mode(spec.get("mode", "gate")))  # a loaded fixed-mode layer's controller: frozen
        layer.max_groups = positive_int(spec.get("max_groups"), "max_groups", none_ok=True)
        track = spec.get("track")
        if track is not None:
            if (not isinstance(track, dict) or set(track) != {"rate", "scale", "shared", "rounds", "typical_full"}
                    or not all(isinstance(track[k], (int, float)) and math.isfinite(track[k]) and track[k] >= 0
                               for k in ("scale", "rounds", "typical_full"))):
                raise ValueError(f"invalid 'track' entry {track!r}")
            _check_track(track["rate"])
            # a shared tracker holds this layer alone until after_load joins it with the model's other layers
            layer._tracker = PriceTracker([layer], layer.budget, track["rate"], track["scale"], track["shared"],
                                          track["rounds"], track["typical_full"])
        return layer

    @staticmethod
    def after_load(model: nn.Module) -> None:
        """Join the shared price trackers of a loaded model's layers into one (per-layer ones stay apart)."""
        shared = [m for _, m in _gated_layers(model) if m._tracker is not None and m._tracker.shared]
        if shared:
            t = shared[0]._tracker
            tracker = PriceTracker(shared, t.budget, t.rate, t.scale, True, t.rounds, t.typical_full)
            for m in shared:
                m._tracker = tracker
        for _, m in _gated_layers(model):  # the loaded price, read once here rather than in an inference call
            if m._tracker is not None:
                m._tracker.lam = float(m.budget_lambda)

    # ------------------------------------------------------------------ kernels
    def _level_cores(self, widths: tuple[int, ...]) -> list[torch.Tensor]:
        """Cores sliced to ``widths`` (views; inference keeps the operands built from them, see width_output)."""
        w = [1, *widths, 1]
        return [c[: w[k], :, :, : w[k + 1]] for k, c in enumerate(self._core_tuple())]

    def _kept(self, key: tuple, build: Callable) -> list[torch.Tensor]:
        """``build(cores)``, kept in ``_slices[key]`` between inference calls while the cores are unchanged."""
        cores = self._core_tuple()
        return kept(self._slices, key, cores, lambda: build(cores))

    def width_output(self, x2d: torch.Tensor, widths: tuple[int, ...],
                     bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x2d @ W(widths).T + bias`` through the planner; differentiable when grad is enabled."""
        # an input that needs a gradient (frozen cores) runs the inference operands, constants to it
        grad = torch.is_grad_enabled() and any(c.requires_grad for c in self._core_params.values())
        if not grad and self._rank_form:  # two matmuls on contiguous prefixes of V and U.T; nothing to plan
            V, Ut = self._rank_operands()
            return _rank_product(x2d, V, Ut, widths[0], bias)
        return _plus(self._width_product(x2d, widths, grad), bias)

    def _width_product(self, x2d: torch.Tensor, widths: tuple[int, ...], grad: bool) -> torch.Tensor:
        """``x2d @ W(widths).T`` (no bias) of an MPO-form layer, or of a rank-form one whose call needs a gradient."""
        c0 = next(iter(self._core_params.values()))
        key = (widths, x2d.shape[0].bit_length(), grad)
        entry = self._level_plans.get(key)  # per layer: no planner key to build on the hot path
        if entry is None:
            plan = get_plan(self.out_factors, self.in_factors, widths, x2d.shape[0], c0.dtype, c0.device,
                            self._policy, grad)
            entry = self._level_plans[key] = (plan, widths == self.bond_dims)
        plan, is_full = entry
        if not grad and plan.executor == "sweep":
            return plan.run(x2d, self._sweep_views(plan, widths), self.out_features)
        if not grad:
            # the level's pre-contracted groups, kept between inference calls (rebuilding them every call cost a
            # decode step more than the contraction itself): in speed mode what its plan caches, in memory mode
            # within a bound (_bounded_kept)
            key = ("ops", widths, plan.operand_key)

            def build(cs):
                return plan.cache_operands(cs if is_full else self._level_cores(widths), self.out_features,
                                           self.in_features)

            return plan.run(x2d, self._kept(key, build) if plan.cached else self._bounded_kept(key, build),
                            self.out_features)
        cores = list(self._core_tuple()) if is_full else self._level_cores(widths)
        return plan.run(x2d, plan.group_operands(cores, self.out_features, self.in_features), self.out_features)

    def _bounded_kept(self, key: tuple, build: Callable) -> list[torch.Tensor]:
        """``build(cores)``, kept in ``_slices[key]`` in memory mode while the levels' kept operands take no more
        memory than the cores themselves (one more copy; storages counted once, parameters' views free); a write to
        the cores drops every stale level entry (held, they would pin the old cores' memory). Rebuilt every call, a
        level's operands cost a gated MiniLM 8-12% of its time at 32-256 rows; every level's kept whatever its size,
        they took 238 MB (a dense weight per level) against a 2048 x 5632 layer's 23 MB of cores."""
        cores = self._core_tuple()
        versions = core_versions(cores)
        hit = self._slices.get(key)
        if is_fresh(hit, cores, versions):
            return hit[1]
        # any level's: an entry of a level not run since the write would pin the old cores and use up the bound
        # (a copy of the items and pop: another thread may insert or drop entries meanwhile)
        for k in [k for k, e in list(self._slices.items()) if k[0] == "ops" and not is_fresh(e, cores, versions)]:
            self._slices.pop(k, None)
        ops = build(cores)
        masters = list(self._core_params.values())
        kept_ops = [t for k, (_, o, _) in list(self._slices.items()) if k[0] == "ops" for t in o]
        if not self._policy.cache_dense and storage_nbytes([*kept_ops, *ops], exclude=masters) <= sum(
                c.numel() * c.element_size() for c in masters):
            self._slices[key] = (stamp(cores), ops, tuple(cores))
        return ops

    def _kept_tensors(self) -> list[torch.Tensor]:
        return [*super()._kept_tensors(), *(t for key, (_, ops, _) in self._slices.items() if key[0] != "views"
                                            for t in ops)]

    def _sweep_views(self, plan, widths: tuple[int, ...]) -> list[torch.Tensor]:
        """Inference operands of a sweep plan at ``widths``: views of ONE copy of the full-width cores in
        the sweep's matrix layout (per direction), so the levels share it instead of holding slices."""
        rev = plan.reverse
        # the sweep layout does not depend on the bonds: the level's plan lays out the full-width cores too
        return self._kept(("views", widths, rev), lambda _: sweep_views(
            self._kept(("sweep", rev), plan.cache_operands), self.out_factors, self.in_factors, widths, rev))

    def _rank_operands(self) -> list[torch.Tensor]:
        """``[V, U.T]`` of a rank-form layer, ``(rank, in)`` and ``(rank, out)``, contiguous: every level's
        prefix ``[:r]`` and every block ``[a:b]`` of the rank is a contiguous row range of both."""
        def build(cores):
            r = cores[1].shape[0]
            return [cores[1].reshape(r, self.in_features).contiguous(),
                    cores[0].reshape(self.out_features, r).t().contiguous()]
        return self._kept(("rank",), build)

    def _rank_grouped(self, x2d: torch.Tensor, levels: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Nested-prefix kernel of a rank-form layer: rows sorted by level, highest first; rank block ``k``
        (the ranks that level ``k`` adds to level ``k - 1``) multiplies only the leading rows whose level is
        ``>= k``. Each weight block is read once (as by the widest row alone) and each row costs the FLOPs of
        its own level, where per-level groups would read the shared leading blocks once per group."""
        V, Ut = self._rank_operands()
        order = torch.argsort(levels, descending=True, stable=True)
        xs = x2d.index_select(0, order)
        rows, lo, y = x2d.shape[0], 0, None
        for lv, n in enumerate(counts):
            hi = self.level_widths[lv][0]
            if rows and hi > lo:
                h = torch.nn.functional.linear(xs[:rows], V[lo:hi])
                if y is None:
                    y = torch.mm(h, Ut[lo:hi])
                else:
                    y[:rows].addmm_(h, Ut[lo:hi])
                lo = hi
            rows -= n
        return torch.empty_like(y).index_copy_(0, order, y)

    def grouped_output(self, x2d: torch.Tensor, levels: torch.Tensor, counts: list[int] | None = None,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
        """Rows grouped by level, each group contracted with its sliced cores (the inference path), plus ``bias``.
        ``counts``: rows per level, if the caller has them already."""
        if counts is None:
            counts = to_host(torch.bincount(levels, minlength=len(self.levels)))
        present = [lv for lv, n in enumerate(counts) if n]
        if len(present) == 1:
            return self.width_output(x2d, self.level_widths[present[0]], bias)
        if self._rank_form and not torch.is_grad_enabled():
            return _plus(self._rank_grouped(x2d, levels, counts), bias)
        order = torch.argsort(levels, stable=True)
        xs = x2d.index_select(0, order)
        parts, start = [], 0
        for lv, n in enumerate(counts):
            if n:
                parts.append(self.width_output(xs[start:start + n], self.level_widths[lv]))
                start += n
        y_sorted = torch.cat(parts, 0)
        return _plus(torch.empty_like(y_sorted).index_copy_(0, order, y_sorted) if not y_sorted.requires_grad
                     else torch.zeros_like(y_sorted).index_copy(0, order, y_sorted), bias)

    def decide(self, x2d: torch.Tensor) -> torch.Tensor:
        """Inference decisions, ``(B,)`` level indices: per row the level minimizing predicted error +
        ``lam`` x relative cost (``argmax(score - lam * cost)``), with at most ``max_groups`` distinct
        levels in the call if that is set (see :func:`bondgate.gating.route`)."""
        return route(self._objective(x2d), self.max_groups)

    def _one_level(self, x2d: torch.Tensor) -> int:
        """The level of a call that takes one (one row, or ``max_groups=1``): what :meth:`decide` gives every
        row, without building the ``(B,)`` tensor (a one-row call is ~100 us, and each op here is ~1-2 us)."""
        if x2d.shape[0] == 1 and x2d.is_cpu and not x2d.requires_grad:
            level = self._host_level(x2d)
            if level is not None:
                return level
        objective = self._objective(x2d)
        return to_host((objective if x2d.shape[0] == 1 else _total(objective)).argmin())

    def _host_level(self, x2d: torch.Tensor) -> int | None:
        """The controller's decision for ONE row on the CPU, in numpy: the same objective as :meth:`_objective`
        (up to float rounding), but numpy's ~0.5 us per operation against torch's ~1.5 us halves the decision's
        time of a one-row call (~11 -> ~6 us). ``None`` where it does not apply (dtypes other than
        float32/64, parameters made in inference mode)."""
        if x2d.dtype not in (torch.float32, torch.float64):
            return None
        ctrl = self._modules["controller"]
        source = (*ctrl.host_params(), self._buffers["budget_lambda"])
        if core_versions(source) < 0:  # inference tensors have no version counter: a stale copy could not be seen
            return None
        # kept apart: the online tracker moves the price every round, the controller's operands stay
        ops = kept(self._host, ("ops", x2d.dtype), source[:-1], lambda: ctrl.host_operands(x2d.dtype))
        # in numpy: ~1 us against torch's ~10
        price = kept(self._host, ("price", x2d.dtype), source[-1:], lambda: _host_price(
            source[-1], self.rel_cost.numpy(), ops[0].dtype))
        # numpy's BLAS has its own thread pool, which must stay idle beside torch's: matrix-vector products of
        # this size run on one thread (OpenBLAS 0.3.31: same time with the pool limited to 1, up to 8 x 16384)
        return int((ctrl.host_cost(ops, x2d.numpy()[0]) + price).argmin())

    def _price_vector(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(L,)``: ``lam`` x each level's relative FLOPs in ``dtype``; kept until the price changes."""
        lam = self._buffers["budget_lambda"]  # re-priced (set_budget) in place or replaced: rebuilt
        return kept(self._price, (device, dtype), (lam,), lambda: (lam * self.rel_cost.to(device)).to(dtype))

    def _objective(self, x2d: torch.Tensor) -> torch.Tensor:
        """``(B, L)``: each row's predicted error at each level (minus the linear controller's score) plus
        ``lam`` x the level's relative FLOPs; no autograd graph (a decision has no gradient)."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self._objective(x2d)
        ctrl = self.controller
        if isinstance(ctrl, ErrorController):  # predicted error + price, in one addmm
            f = ctrl.features(x2d)  # float32 for a half-precision x2d
            coef = ctrl.coef_t()
            return torch.addmm(self._price_vector(x2d.device, f.dtype), f, coef if coef.dtype == f.dtype
                               else coef.to(f.dtype))
        return self._price_vector(x2d.device, x2d.dtype) - ctrl(x2d)

    def scores(self, x2d: torch.Tensor) -> torch.Tensor:
        """The controller's level scores in float64, ``(B, L)``: what :meth:`decide` compares with the price."""
        ctrl = self.controller
        if isinstance(ctrl, ErrorController):
            f = ctrl.features(x2d)
            return -(f @ ctrl.coef_t().to(f.dtype)).to(torch.float64)
        return ctrl(x2d).to(torch.float64)

    # ------------------------------------------------------------------ forward
    def forward(self, input: torch.Tensor | None = None, levels: torch.Tensor | None = None, *,
                x: torch.Tensor | None = None) -> torch.Tensor:
        """The input as :meth:`MPOLinear.forward`'s (``input`` or ``x``); ``levels`` (optional, ``(rows,)`` indices
        into ``self.levels``) overrides the controller."""
        if x is None:
            x = input
        elif input is not None:
            raise TypeError(f"{type(self).__name__}.forward() got the input twice, as input and as x=: pass one")
        if (origin := self.__dict__.get("_origin")) is not None:  # an nn.DataParallel replica runs: its call's
            origin.__dict__["_replicating"] = False  # replicas are all made (see _replicate_for_data_parallel)
        # the decode step's short path (see _decode_step); is_compiling first: a tracer must not read the kept state
        if not _IS_COMPILING() and levels is None and (e := self._host.get("decode")) is not None and not _GRAD_ON() \
                and type(x) is _TENSOR and (y := self._decode_step(x, e)) is not None:
            return y
        if not isinstance(x, torch.Tensor) or x.is_nested or not x.dim() or x.shape[-1] != self.in_features:
            if isinstance(x, torch.Tensor) and x.is_nested and levels is None:
                return nested_forward(self, x)
            raise bad_input(self, x)
        if torch.compiler.is_compiling():
            return self._compiled_forward(x, levels)
        if not x.is_cpu and x.is_meta:  # shape inference, as nn.Linear does on meta tensors
            return x.new_empty((*x.shape[:-1], self.out_features))
        if torch.is_autocast_enabled("cpu" if x.is_cpu else x.device.type):
            return self._under_autocast(x, levels)
        mode = self.mode
        if mode == "full" and levels is None:
            return super().forward(x)
        flat = x.dim() != 2
        x2d = x.reshape(-1, self.in_features) if flat else x
        if levels is not None:
            if not isinstance(levels, torch.Tensor) or levels.is_floating_point() or levels.is_complex() \
                    or levels.dtype == torch.bool:
                raise TypeError(f"levels must be an integer tensor of indices into {self.levels}, got "
                                f"{levels.dtype if isinstance(levels, torch.Tensor) else type(levels).__name__}")
            levels = levels.reshape(-1).to(device=x2d.device, dtype=torch.long)
            L = len(self.levels)
            if levels.shape[0] == x2d.shape[0] and levels.numel():  # range and rows per level: one host read
                lo, hi, *counts = to_host(torch.cat([torch.stack(torch.aminmax(levels)),
                                                     torch.bincount(levels.clamp(0, L - 1), minlength=L)]))
            if levels.shape[0] != x2d.shape[0] or (levels.numel() and not 0 <= lo <= hi < L):
                raise ValueError(f"levels must be {x2d.shape[0]} indices in [0, {L})")
        if not x2d.shape[0]:
            return self._no_rows(x)
        if x.dtype != next(iter(self._core_params.values())).dtype:  # a clear TypeError, before a decision is counted
            self._check_dtype(x)
        bias = own_param(self, "bias")  # inference products add it in their GEMM where they can
        if levels is not None:
            y = self.grouped_output(x2d, levels, counts, bias) if not self.training else _plus(
                self._soft_route(x2d, torch.nn.functional.one_hot(levels, len(self.levels)).to(x2d.dtype)), bias)
        elif isinstance(mode, float):
            y = self.width_output(x2d, _widths(self.bond_dims, mode), bias)
        elif self.training and mode == "nested":
            lv = torch.randint(len(self.levels), (x2d.shape[0],), device=x2d.device)
            y = _plus(self.grouped_output(x2d, lv), bias)
        elif self.training and mode == "gate":
            y = _plus(self._train_gate(x2d), bias)
        elif mode == "nested":  # eval of a nested-trained model without a controller: full width
            return super().forward(x)
        elif x2d.shape[0] == 1 or self.max_groups == 1:  # one level for the call: no grouping, one Python int
            i = self._one_level(x2d)
            if (self.record or self._tracker is not None) and not in_calibration_pass(self):  # traffic: counted
                self._count(i, None, x2d.shape[0])
            y = self.width_output(x2d, self.level_widths[i], bias)
            if x2d.shape[0] == 1 and self._rank_form:
                self._arm_decode(x2d)
        else:
            lv = self.decide(x2d)
            counts = to_host(torch.bincount(lv, minlength=len(self.levels)))
            if (self.record or self._tracker is not None) and not in_calibration_pass(self):  # traffic: counted
                self._count(None, counts, x2d.shape[0])
            y = self.grouped_output(x2d, lv, counts, bias)
        return y.reshape(*x.shape[:-1], self.out_features) if flat else y

    def _arm_decode(self, x2d: torch.Tensor) -> None:
        """After a one-row inference call of a rank-form layer on the general path: keep in ``_host["decode"]`` what
        :meth:`_decode_step` reads, where it applies (float32/64 on the CPU, full-precision cores, cores and
        controller whose writes are all seen, :func:`~bondgate.layer.stamp`)."""
        if (torch.is_grad_enabled() or self._quant is not None or not x2d.is_cpu or x2d.requires_grad
                or x2d.dtype not in (torch.float32, torch.float64)):
            return
        cores, ctrl = tuple(self._core_params.values()), self._modules["controller"]
        src = ctrl.host_params()
        versions, src_versions = stamp(cores), stamp(src)  # their version sums, or -1 where a write could go unseen
        if cores[0].dtype != x2d.dtype or versions < 0 or src_versions < 0:
            return
        V, Ut = self._rank_operands()
        # views made once: slicing two operands per call (and reshaping a 3-d row) cost a decode call ~5 us
        factors = [(V[:w[0]], Ut[:w[0]].t()) for w in self.level_widths]
        self._host["decode"] = _DecodeEntry(x2d.dtype, cores, versions, factors, src, src_versions,
                                            ctrl.host_operands(x2d.dtype), ctrl.host_cost, self.rel_cost.numpy(),
                                            [None])

    def _set_price(self, lam: float) -> None:
        """``budget_lambda = lam``, and the price vector :meth:`_decode_step` reads: the online tracker moves the price
        every round, and computing that vector here, in the tracker's loop over its layers (warm caches), spares the
        next decode call of each layer its recomputation (~10 us cold in a decode step of the LLaMA-shape benchmark)."""
        buf = self._buffer("budget_lambda")
        buf.fill_(lam)
        entry = self._host.get("decode")
        if entry is not None and not buf.is_inference():  # (an inference tensor has no version: the general path)
            # lam, not the buffer: the same float64 value without a read of the tensor
            entry.price[0] = (buf, buf._version, _host_price(lam, entry.rel, entry.ops[0].dtype))

    def _decode_step(self, x: torch.Tensor, entry: _DecodeEntry) -> torch.Tensor | None:
        """One row in inference (an LLM's decode step) of a gated rank-form layer in ``"gate"`` mode, or ``None`` where
        this path does not apply (the general path then runs, and diagnoses bad input). Same decision (numpy, as
        :meth:`_host_level`), same count and same product as the general path, after as few reads as possible: in a
        model each call starts with cold caches (the previous layer's weights streamed through them), where every
        Python call, dict read and op costs microseconds. The general path cost a decode step of a 2-layer LLaMA-shape
        model ~60 us per gated layer in its decision alone, against ~10 us with warm caches. ``entry``:
        :meth:`_arm_decode`'s, valid while the very cores and controller parameters it was built from are unmodified
        (identity and version counters, as :func:`~bondgate.layer.is_fresh`) and the price is the one it holds."""
        dtype, kept_cores, versions, factors, src, src_versions, ops, host_cost, rel, cell = entry  # (one unpack)
        n = self.in_features
        try:
            if (x.dtype is not dtype or x.is_nested or not x.is_cpu or x.requires_grad or x.numel() != n
                    or x.shape[-1] != n or self.mode != "gate" or self.training or _AUTOCAST_ON("cpu")):
                return None
            cores = self._modules["cores"]
            params = cores._parameters
            # plain_cores and is_fresh written out, as in MPOLinear's short path (each call costs microseconds cold)
            if not (all(map(operator.is_, params.values(), kept_cores)) and tuple(params) == CORE_NAMES[len(
                    kept_cores)] and not cores._modules and sum(map(_VERSION, kept_cores)) == versions):
                return None
            now = self._modules["controller"].host_params()
            if not (all(map(operator.is_, now, src)) and sum(map(_VERSION, src)) == src_versions):
                return None
            lam = self._buffers["budget_lambda"]
            lam_version = lam._version  # (an inference-tensor price has none: RuntimeError, the general path)
            price = cell[0]
            if price is None or price[0] is not lam or price[1] != lam_version:  # re-priced, not by the tracker
                price = cell[0] = (lam, lam_version, _host_price(lam, rel, ops[0].dtype))
        except (AttributeError, IndexError, KeyError, RuntimeError):  # a 0-d x (IndexError); a module's parts removed
            return None
        level = int((host_cost(ops, x.numpy().reshape(-1)) + price[2]).argmin())
        if (self.record or self._tracker is not None) and not in_calibration_pass(self):  # traffic: counted
            self._count(level, None, 1)
        V, U = factors[level]
        # F.linear takes x's leading dims as they are and runs the GEMMs of _rank_product (mm, addmm with the bias);
        # a 1-d row as one 2-d row: F.linear would run matrix-vector kernels (other rounding than the general path)
        if x.dim() == 1:
            return _LINEAR(_LINEAR(x.reshape(1, n), V), U, own_param(self, "bias")).reshape(-1)
        return _LINEAR(_LINEAR(x, V), U, own_param(self, "bias"))

    def _count(self, level: int | None, counts: list[int] | None, rows: int, shard: bool = False) -> None:
        """One inference call's traffic: its ``rows`` per level (all at ``level``, or ``counts`` rows per level) into
        the level counts, its FLOPs to the price tracker."""
        origin = self.__dict__.get("_origin")
        if origin is not None:  # an nn.DataParallel replica (one thread per device): counted on the layer itself
            return origin._count(level, counts, rows, shard=True)
        if level is not None:
            used = (self.level_cost[level] + self.controller_cost) * rows
        else:
            used = sum(c * f for c, f in zip(counts, self.level_cost)) + self.controller_cost * rows
        with _LOCK:
            if self.record:
                if level is not None:
                    self._pending[level] += rows
                else:
                    self._pending = [a + b for a, b in zip(self._pending, counts)]
            if self._tracker is not None:
                if shard:  # one report per call of the layer, as unsharded (see _replicate_for_data_parallel)
                    part = self.__dict__.setdefault("_shard_calls", [0.0, 0, 0])
                    part[0], part[1], part[2] = part[0] + used, part[1] + rows, part[2] + 1
                    if part[2] < self.__dict__.get("_shards", 1):
                        return
                    used, rows = part[0], part[1]
                    self.__dict__["_shard_calls"] = [0.0, 0, 0]
                self._tracker.report(self, used, rows)

    def _replicate_for_data_parallel(self):
        # nn.DataParallel replicates the model for every call and runs the replicas in threads, on row shards: they
        # count their traffic and report their budget penalty's terms to this layer (where the loss reads them). The
        # shards of one call report to the price tracker as one call: reported one by one, the tracker's rounds
        # mixed shards of different layers in an order the threads chose, and the price moved 0.0003 or 0.025 for
        # the same traffic
        replica = super()._replicate_for_data_parallel()
        replica.__dict__["_origin"] = self  # not a submodule: __dict__, not setattr
        self._aux, self._aux_stale = None, False
        with _LOCK:
            if not self.__dict__.get("_replicating"):  # the first replica of a new call (the rest come before it runs)
                part = self.__dict__.get("_shard_calls")
                if part is not None and part[2] and self._tracker is not None:  # an earlier call's, not all reported
                    self._tracker.report(self, part[0], part[1])
                self.__dict__.update(_shard_calls=[0.0, 0, 0], _shards=0, _replicating=True)
            self.__dict__["_shards"] += 1
        return replica

    def _compiled_forward(self, x: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
        """``forward`` under torch.compile / torch.export. A width fixed for every row (``"full"``, a static
        fraction, ``"nested"`` in eval) traces like an :class:`~bondgate.MPOLinear` at those bonds. Routing rows
        by the controller (``"gate"``, nested training, ``levels``) is data-dependent control flow: under
        torch.compile it runs eagerly (a graph break), and torch.export refuses it."""
        mode = self.mode
        if levels is None and (mode == "full" or isinstance(mode, float) or (mode == "nested" and not self.training)):
            widths = _widths(self.bond_dims, mode) if isinstance(mode, float) else self.bond_dims
            if widths == self.bond_dims:
                cores = tuple(self._core_params.values())
                return self._traced_forward(x, cores, self._traced_for(cores))
            traced = self._traced_widths.get(widths)
            if traced is None:
                traced = self._traced_widths[widths] = self._traced_sweep(widths)
            w = [1, *widths, 1]
            cores = [c[: w[k], :, :, : w[k + 1]] for k, c in enumerate(self._core_params.values())]
            return self._traced_forward(x, cores, traced)
        if torch.compiler.is_exporting():
            raise RuntimeError(f"a GatedMPOLinear in mode {mode!r} routes rows by its controller (data-dependent "
                               f"shapes) and cannot be exported; bondgate.set_mode(model, 'full') or a fixed "
                               f"fraction first")
        return self._eager_forward(x, levels)

    @torch.compiler.disable
    def _eager_forward(self, x: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
        return self.forward(x, levels)

    def _soft_route(self, x2d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``sum_l q[:, l] * y_l`` with every level's output computed (training form)."""
        outs = torch.stack([self.width_output(x2d, w) for w in self.level_widths], 1)  # (B, L, out)
        return (q.to(outs.dtype).unsqueeze(-1) * outs).sum(1)

    def _train_gate(self, x2d: torch.Tensor) -> torch.Tensor:
        if isinstance(self.controller, ErrorController):  # fitted, not trained: rows go where inference sends them
            return self.grouped_output(x2d, self.decide(x2d))
        scores = self.controller(x2d)
        gumbel = -torch.empty_like(scores).exponential_().log()
        soft = torch.softmax((scores + gumbel) / self.temperature, -1)
        hard = torch.nn.functional.one_hot(soft.argmax(-1), len(self.levels)).to(soft)
        q = hard + soft - soft.detach()  # value: the sampled level; gradient: the softmax
        probs = torch.softmax(scores / self.temperature, -1)
        cost = self.rel_cost.to(probs)
        expected = (probs * cost).sum(-1).mean() + self.controller_cost / self.full_cost
        # an nn.DataParallel replica reports to its layer: the penalty is of the whole batch's expected cost
        origin = self.__dict__.get("_origin")
        layer = self if origin is None else origin
        if scores.requires_grad:  # a backward through this call ends the step whose penalty it was
            scores.register_hook(functools.partial(_penalty_spent, weakref.ref(layer)))  # (weak: no cycle via _aux)
        layer._add_penalty(expected, x2d.shape[0])
        return self._soft_route(x2d, q)

    def _add_penalty(self, expected: torch.Tensor, rows: int) -> None:
        """Fold one training call's expected relative cost (mean over its ``rows`` rows) into the row-weighted mean
        that :meth:`bondgate_aux_loss` penalizes. Starts afresh after a backward through an earlier call (the penalty
        of a step nobody collected: held, it would keep every step's graph) and where autograd was on for one of the
        two and not the other (a forward under no_grad adds no gradient, and must not dilute one that does)."""
        with _LOCK:
            aux = self._aux
            if aux is None or self.__dict__.get("_aux_stale") or aux[0].requires_grad != expected.requires_grad:
                self._aux, self._aux_stale = (expected, rows), False
            else:
                mean, n = aux
                self._aux = (mean + (expected.to(mean.device) - mean) * (rows / (n + rows)), n + rows)

    def flush_counts(self) -> torch.Tensor:
        """``level_counts`` including the rows routed since the last flush."""
        with _LOCK:
            pending, self._pending = self._pending, [0] * len(self.levels)
        if any(pending):
            counts = self._buffer("level_counts")
            counts += torch.tensor(pending, dtype=counts.dtype, device=counts.device)
        return self.level_counts

    def _buffer(self, name: str) -> torch.Tensor:
        """Buffer ``name`` to write in place: one made in inference mode (e.g. by a ``deepcopy`` there) cannot
        be written outside it, so it is first replaced by a normal copy."""
        t = self._buffers[name]
        if t.is_inference() and not torch.is_inference_mode_enabled():
            t = self._buffers[name] = t.clone()
        return t

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.flush_counts()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        self._pending = [0] * len(self.levels)  # the loaded counts replace everything routed before
        super()._load_from_state_dict(*args, **kwargs)
        if self._tracker is not None:
            self._tracker.lam = None  # the tracker goes on from the loaded price, not its own copy

    def _apply(self, fn, recurse: bool = True):
        # .to(torch.bfloat16) casts every floating buffer; the price and the level counts stay float64 (a bf16
        # count stops growing at 256, a bf16 price moves the budget), only their device follows the layer
        kept64 = {n: self._buffers[n] for n in ("budget_lambda", "level_counts") if n in self._buffers}
        out = super()._apply(fn, recurse)
        for n, t in kept64.items():
            self._buffers[n] = t.to(device=self._buffers[n].device, dtype=torch.float64)
        return out

    def bondgate_aux_loss(self) -> torch.Tensor | None:
        """The budget penalty ``penalty * (E - budget)^2`` of the training calls (``mode="gate"``, a linear controller)
        since it was last collected, ``E`` the expected relative FLOPs per row averaged over every row those calls
        processed: a layer called several times in a forward (shared, or a :class:`~bondgate.Recurrent`'s projection
        at every time step) is penalized on all its calls, not the last; ``None`` if there were none. Consumed: returns
        it once. A penalty nobody collects is dropped by the first training call after a backward pass through the
        layer (a training loop that never collects holds one step's penalty, not every step's); a call under no_grad
        and one with autograd are not averaged together (the later starts afresh). A forward that raised (no
        backward) leaves its calls in until collected: :func:`bondgate.distill` drops such leftovers before each
        step; a loop of your own can call :func:`bondgate.aux_losses` to drop them."""
        with _LOCK:
            held, self._aux = self._aux, None
        aux = None if held is None else self.penalty * (held[0] - self.budget) ** 2
        if aux is not None and not aux.requires_grad and torch.is_grad_enabled() \
                and any(p.requires_grad for p in self.controller.parameters()):
            # asked for to train on, but made without grad: reentrant activation checkpointing runs the forward
            # under no_grad and the recomputation's penalty never reaches the loss (the controllers got ~0 gradient)
            raise RuntimeError("the gating budget penalty of the last forward has no gradient (the forward ran "
                               "without grad, e.g. under reentrant activation checkpointing): use "
                               "torch.utils.checkpoint with use_reentrant=False (transformers: "
                               "gradient_checkpointing_kwargs={'use_reentrant': False}, its default)")
        return aux

    _KEPT = (*MPOLinear._KEPT, "_level_plans", "_traced_widths", "_slices", "_price", "_host")

    def __getstate__(self) -> dict:
        # the budget penalty of a training forward not yet collected holds its autograd graph, which deepcopy refuses
        # ("Only Tensors created explicitly by the user ... support the deepcopy protocol"): a copy starts without it
        state = super().__getstate__()
        state["_aux"], state["_aux_stale"] = None, False
        for k in ("_shard_calls", "_shards", "_replicating"):  # an nn.DataParallel call's pending traffic: not a copy's
            state.pop(k, None)
        return state

    def _reset_caches(self) -> None:
        super()._reset_caches()
        self._level_plans: dict[tuple, tuple] = {}
        self._traced_widths: dict[tuple, tuple] = {}  # widths -> the traced forward's sweep (see _compiled_forward)
        if "_slices" in self.__dict__:
            self._slices, self._price, self._host = {}, {}, {}
            if self._costed != (self.bond_dims, self.out_factors, self.in_factors):  # set_cores with new shapes
                self._refresh_costs()

    def flops(self, batch: int = 1) -> int:
        """FLOPs of the plan an inference call of ``batch`` rows runs (bias add excluded; 0 rows cost 0): in a fixed
        fraction mode the truncated width's, in ``"full"`` and ``"nested"`` (eval: full width) the full width's, and in
        ``"gate"``, where each row's level varies, the full width's: an upper bound (:func:`gating_report` and
        :func:`bondgate.gating.average_flops` give what the routed rows spent). The controller's FLOPs are not in it."""
        mode = self.mode
        if not isinstance(mode, float):
            return super().flops(batch)
        batch = positive_int(batch, "batch (a number of input rows)", low=0)
        widths = _widths(self.bond_dims, mode)
        if not batch:
            return 0
        if self._rank_form:  # two matmuls on the rank's prefix (width_output), no plan
            return 2 * batch * widths[0] * (self.in_features + self.out_features)
        if widths == self.bond_dims:
            return super().flops(batch)
        c0 = next(iter(self._core_params.values()))
        plan = get_plan(self.out_factors, self.in_factors, widths, batch, c0.dtype, c0.device, self._policy, False)
        if plan.dense:  # as MPOLinear.flops: the weight it multiplies is the layer's size
            return 2 * batch * self.out_features * self.in_features + plan.merge_flops
        return plan.flops_at(batch)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", levels={self.levels}, mode={self.mode!r}"


# ---------------------------------------------------------------------------------------------- model API
@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Calls inside leave the gated layers' routing state as it was: each layer's price and level counts, and its
    price tracker's round and running mean (for measurements, such as :func:`bondgate.latency`, that must not
    count as traffic; unlike a calibration pass, the calls still pay the tracking)."""
    layers = [m for _, m in _gated_layers(model)]
    saved = []
    for m in layers:
        m.flush_counts()
        saved.append({n: b.detach().clone() for n, b in m._buffers.items() if n in ("budget_lambda", "level_counts")})
    trackers = {id(m._tracker): m._tracker for m in layers if m._tracker is not None}
    tracked = {k: (dict(vars(t)), set(t.seen)) for k, t in trackers.items()}
    try:
        yield
    finally:
        with torch.no_grad(), torch.inference_mode(False):
            for m, buffers in zip(layers, saved):
                m._pending = [0] * len(m.levels)
                for n, b in buffers.items():
                    m._buffers[n].copy_(b)
        for k, t in trackers.items():
            state, seen = tracked[k]
            vars(t).update(state)
            t.seen = seen


def _bonds(layer: nn.Module) -> tuple[int, ...]:
    return (layer.rank,) if isinstance(layer, LowRankLinear) else tuple(layer.bond_dims)


def _gated_layers(model: nn.Module) -> list[tuple[str, GatedMPOLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GatedMPOLinear)]


@outside_inference_mode  # controllers made inside inference_mode could never be fitted or trained
def gate(model: nn.Module, config: GatingConfig) -> nn.Module:
    """Replace the model's MPO layers (and low-rank pairs, as 2-core MPOs whose bond is the rank) by gated
    ones, in place; returns ``model``. Layers with no bond wider than 1 (a one-core MPO holds a dense weight, as
    ``compress(quantize="int8")`` keeps one) have a single width and stay as they are.

    The controllers start untrained (preferring wide levels); train them with :func:`set_mode`
    ``"nested"`` then ``"gate"`` and :func:`bondgate.distill` (``controller="linear"``) or fit them with
    :func:`fit_controllers` (``controller="error"``), then call :func:`set_budget`. Gating an already
    gated model replaces its controllers and levels and keeps the (e.g. nested-trained) cores; its prices,
    tracker and ``max_groups`` start afresh (call :func:`set_budget` again). For exactly the full width use
    ``set_mode(model, "full")``: a budget of 1.0 also pays for the controllers, so a few rows take narrower levels.
    A gated layer goes back to a plain one with ``MPOLinear.from_mpo(layer.to_mpo(), layer.bias)``, followed by
    ``.quantize_(layer.quant)`` where its cores are int8 (:func:`quantize_mpo`; ``from_mpo`` alone gives float cores).

    A gated MPO layer keeps the layer's own parameters; a gated low-rank pair holds copies of ``U`` and ``V``
    (it becomes a 2-core MPO): build an optimizer after ``gate``. ``bondgate.save`` / ``load`` and ``deepcopy`` keep
    every gating setting; a plain ``load_state_dict`` into a freshly gated model restores the controllers, prices
    and level counts but not the routing settings of :func:`set_budget` (``max_groups``, ``cost_rows``, ``track``)
    nor the mode (:func:`set_mode`; a freshly gated layer is in ``"gate"``): call ``set_budget`` / ``set_mode`` again.
    """
    if not isinstance(config, GatingConfig):
        raise TypeError(f"config must be a GatingConfig, got {type(config).__name__}")
    # checked again: a field set after construction (config.controller = "Error") was taken as it was (a linear
    # controller), and bondgate.load refused the checkpoint that bondgate.save wrote
    config.__post_init__()
    if len(config.levels) < 2:  # nothing to choose: a controller would cost FLOPs, set_budget could never move the
        # widths (refused here, not by GatingConfig: a checkpoint saved with one level still loads)
        raise ValueError(f"gate: levels={config.levels}: gating chooses between at least two levels; one fixed "
                         f"width is the static truncation, bondgate.set_mode(model, {config.levels[0]:g}) on a "
                         "model gated with two or more")
    names_of = module_names(model)  # a layer shared by two parents is gated once and stays shared
    mpo = [n for n, m in model.named_modules() if isinstance(m, (MPOLinear, LowRankLinear))]
    # a shared layer is selected by any of its names
    names = [n for n in mpo if config.target_modules is None
             or any(_matches(a, config.target_modules) for a in names_of[id(model.get_submodule(n))])]
    if not mpo:
        raise ValueError("gate: the model has no MPO or low-rank layers to gate (run bondgate.compress first)")
    if not names:
        raise ValueError(f"gate: target_modules={config.target_modules!r} matches none of the model's {len(mpo)} MPO "
                         f"or low-rank layers ({', '.join(mpo[:4])}{', ...' if len(mpo) > 4 else ''}); a string is a "
                         f"regex that must match the whole name, a list holds names or dotted suffixes")
    # a layer without a bond wider than 1 (a dense weight kept as a one-core MPO, e.g. by compress(quantize="int8"))
    # has one width only: a controller would cost FLOPs and a budget share for nothing
    if "" in names:
        raise ValueError("gate: pass a model containing MPO layers, not a bare MPOLinear")
    if isinstance(config.target_modules, (list, tuple)):
        _warn_targets(model, config.target_modules)
    one_width = [n for n in names if max(_bonds(model.get_submodule(n)), default=0) <= 1]
    names = [n for n in names if n not in one_width]
    if one_width and config.target_modules is not None and names:  # named by the user: say why it stays
        warn_user(f"gate: {', '.join(one_width[:3])}{', ...' if len(one_width) > 3 else ''} ha"
                  f"{'s' if len(one_width) == 1 else 've'} no bond wider than 1 (one width only): not gated")
    if not names:
        raise ValueError("gate: none of the targeted layers has a bond wider than 1 to gate (one-core MPOs hold a "
                         "dense weight; rank-1 pairs have one width)")
    same = []
    for n in names:
        layer = model.get_submodule(n)
        # a low-rank pair U V is the 2-core MPO (out, 1) x (1, in) whose bond is the rank: gated, its levels keep a
        # prefix of the rank (the SVD's leading directions) and run the nested-prefix kernel
        mpo_layer = layer.to_mpo_linear() if isinstance(layer, LowRankLinear) else layer
        g = GatedMPOLinear.from_mpo_linear(mpo_layer, config)
        swap_module(model, layer, names_of, g)
        if len(set(g.level_widths)) < len(g.level_widths):
            same.append(f"{n} (bonds {g.bond_dims})")
    if same:  # bonds too narrow for the levels' fractions: two levels, one width (a controller output for nothing)
        warn_user(f"gate: some levels give the same bond widths on {len(same)} layer(s) ({_short_list(same, 3)}): "
                  f"levels {config.levels} round up to whole channels, so those levels are one width there; fewer "
                  "or coarser levels avoid it")
    from .hf import attach

    return attach(model)  # a transformers model: config.quantization_config records the layers for save_pretrained


def _warn_targets(model: nn.Module, entries: Sequence[str]) -> None:
    """A ``target_modules`` list entry that selects no MPO or low-rank layer is likely a typo, or names a layer still
    dense: say so (as :func:`bondgate.compress` does for its selectors) rather than leave it ungated unseen."""
    modules = dict(model.named_modules(remove_duplicate=False))  # a shared layer's every name
    unmatched, other = [], []
    for e in entries:
        hits = [(n, m) for n, m in modules.items() if n and _matches(n, [e])]
        if not hits:
            unmatched.append(e)
        elif not any(isinstance(m, (MPOLinear, LowRankLinear)) for _, m in hits):
            other += [f"{n} ({type(m).__name__})" for n, m in hits]
    if unmatched:
        warn_user(f"gate: target_modules {unmatched} match no module of the model")
    if other:
        warn_user(f"gate: target_modules entries select no MPO or low-rank layer, only {_short_list(other, 4)}: gate "
                  "gates those layers alone (bondgate.compress a dense layer first)")


def _penalty_spent(layer: "weakref.ref[GatedMPOLinear]", grad: torch.Tensor) -> None:
    """Gradient hook of a training call's scores: a backward has run through the call, so the layer's next training
    call starts a new penalty (:meth:`GatedMPOLinear._add_penalty`)."""
    g = layer()
    if g is not None:
        g._aux_stale = True


def _check_mode(mode) -> str | float:
    if isinstance(mode, str):
        if mode not in ("gate", "nested", "full"):
            raise ValueError(f"mode must be 'gate', 'nested', 'full' or a fraction, got {mode!r}")
        return mode
    return number(mode, "mode", low=0, high=1, low_open=True, hint="the kept fraction of every bond; "
                  "or 'gate', 'nested', 'full'")


def set_mode(model: nn.Module, mode: str | float) -> nn.Module:
    """``"gate"``, ``"nested"``, ``"full"`` or a width fraction in (0, 1] (static truncation) for every gated layer."""
    mode = _check_mode(mode)
    layers = _gated_layers(model)
    if not layers:
        raise ValueError("the model has no gated layers (call bondgate.gate first)")
    for _, m in layers:
        m._set_mode(mode)
    from .hf import rebind

    rebind(model)  # the mode is in config.json's record: bound again after a pickle round trip unbound it
    return model


def nested_layers(model: nn.Module) -> list[GatedMPOLinear]:
    """The gated layers of ``model`` in ``"nested"`` mode."""
    return [m for _, m in _gated_layers(model) if m.mode == "nested"]


@contextlib.contextmanager
def full_width(model: nn.Module):
    """Run every gated layer of ``model`` at full width inside the ``with`` block (modes restored after)."""
    layers = [m for _, m in _gated_layers(model)]
    modes = [m.mode for m in layers]
    try:
        for m in layers:
            m.mode = "full"
        yield model
    finally:
        for m, mode in zip(layers, modes):
            m.mode = mode


def _collect_scores(model: nn.Module, data: Iterable) -> dict[str, list[torch.Tensor]]:
    """Per gated layer, its controller's scores of the rows of each forward call (calls kept apart:
    ``max_groups`` applies per call)."""
    scores: dict[str, list[torch.Tensor]] = {}

    def score(name, mod, x, batch):
        # a wrong width or dtype: the layer's own call refuses it, naming the batch (the controller's product here
        # would raise torch's message about mismatched matrices instead)
        if not x.dim() or x.shape[-1] != mod.in_features or not x.is_floating_point() or (
                x.dtype != next(iter(mod._core_params.values())).dtype and not torch.is_autocast_enabled(x.device.type)):
            return
        keep = _row_mask(batch, x)  # padding rows (attention_mask 0) left out, as compress' statistics leave them
        x2 = x.reshape(-1, mod.in_features)
        scores.setdefault(name, []).append(mod.scores(x2 if keep is None else x2[keep.to(x2.device)]).cpu())

    capture_inputs(model, dict(_gated_layers(model)), data, score)  # a calibration pass: not counted as traffic
    return scores


def _flops_at(layers, scores, lam: float | None = None) -> float:
    """Average FLOPs fraction of ``layers`` on the scored rows at price ``lam`` (None: each layer's own)."""
    used = full = 0.0
    for n, m in layers:
        price = (float(m.budget_lambda) if lam is None else lam) * m.rel_cost
        for s in scores[n]:
            lv = route(price - s, m.max_groups)
            used += float(m.rel_cost[lv].sum()) * m.full_cost + m.controller_cost * s.shape[0]
            full += m.full_cost * s.shape[0]
    return used / full


def _measured_flops(model: nn.Module, layers, data: list, max_groups: int | None) -> float:
    """The FLOPs fraction ``layers`` spend on ``data`` at their current prices (one scoring pass)."""
    return _flops_at(layers, _as_calls(_collect_scores(model, data), max_groups))


def _as_calls(scores: dict[str, list[torch.Tensor]], max_groups: int | None) -> dict[str, list[torch.Tensor]]:
    """The scores grouped as routing sees them: per call under ``max_groups``, else all rows as one (calls need not
    be kept apart)."""
    return scores if max_groups is not None else {n: [torch.cat(v)] for n, v in scores.items()}


def _search_shared_price(model: nn.Module, layers, data: list, max_groups: int | None, budget: float, lam: float,
                         spent: float, steps: int = 12) -> tuple[float, float]:
    """``(price, fraction)``: the shared price whose measured fraction on ``data`` is closest to ``budget`` among
    those a bracket-and-bisect search visits (the fraction falls as the price rises), starting from ``lam`` which
    spends ``spent``; one scoring pass per price tried."""
    def at(price: float) -> float:
        for _, m in layers:
            m._buffer("budget_lambda").fill_(price)
        return _measured_flops(model, layers, data, max_groups)

    tried = [(lam, spent)]
    close = (lambda f: abs(f - budget) <= 0.02 * budget)  # set_budget's own tolerance: stop there
    over = spent > budget  # the price must rise
    step = max(abs(lam), 0.1) * 0.25
    other = lam
    while (other < PRICE_BOUND) if over else (other > -PRICE_BOUND):  # bracket: a price past the budget
        other = min(max(other + (step if over else -step), -PRICE_BOUND), PRICE_BOUND)
        tried.append((other, at(other)))
        if (tried[-1][1] > budget) != over or close(tried[-1][1]):
            break
        step *= 2
    lo, hi = (lam, other) if over else (other, lam)  # at(lo) > budget >= at(hi), if bracketed
    bracketed = (tried[-1][1] > budget) != over
    for _ in range(steps if bracketed and not close(tried[-1][1]) else 0):
        mid = 0.5 * (lo + hi)
        tried.append((mid, at(mid)))
        if close(tried[-1][1]):
            break
        lo, hi = (mid, hi) if tried[-1][1] > budget else (lo, mid)
    return min(tried, key=lambda t: abs(t[1] - budget))


def _calibrate_lambda(layers, scores, budget: float) -> float:
    lo, hi = -PRICE_BOUND, PRICE_BOUND  # achieved FLOPs fall as lam rises
    if _flops_at(layers, scores, hi) > budget:
        return hi
    if _flops_at(layers, scores, lo) <= budget:
        return lo
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _flops_at(layers, scores, mid) > budget:
            lo = mid
        else:
            hi = mid
    # of the two sides of the step, take the one closer to the budget; lo and hi now straddle a tie between two
    # levels to rounding, where float32 scoring at inference may break the tie the other way (with max_groups a
    # whole call flips): move into the chosen plateau, half-way to its next step
    f_lo, f_hi = _flops_at(layers, scores, lo), _flops_at(layers, scores, hi)
    edge, f, step = (lo, f_lo, -1.0) if abs(f_lo - budget) < abs(f_hi - budget) else (hi, f_hi, 1.0)
    far = edge + step * max(abs(edge), 1e-6)
    if _flops_at(layers, scores, far) == f:
        return 0.5 * (edge + far)
    near = edge
    for _ in range(60):  # the plateau ends between near (on it) and far (past it)
        mid = 0.5 * (near + far)
        near, far = (mid, far) if _flops_at(layers, scores, mid) == f else (near, mid)
    return 0.5 * (edge + near)


def _check_scores(scores: dict[str, list[torch.Tensor]], layers) -> None:
    """Calibration needs rows, and finite scores: a NaN would silently pick some price."""
    seen = {n for n, v in scores.items() if any(s.shape[0] for s in v)}
    if not seen:
        raise ValueError("set_budget: data gave the gated layers no input rows (does it reach them?)")
    missed = [n for n, _ in layers if n not in seen]
    if missed:
        warn_user(f"set_budget: {len(missed)} gated layer(s) saw no rows and keep their price: {missed[:3]}")
    for n, v in scores.items():
        if not all(bool(torch.isfinite(s).all()) for s in v):
            raise ValueError(f"set_budget: layer {n!r} got non-finite controller scores (NaN or inf in its inputs)")


def _warn_call_size(scores: dict[str, list[torch.Tensor]], cost_rows: int) -> None:
    """Warn when the calibration calls are not about ``cost_rows`` rows: the FLOPs would be counted for
    calls of another size than the ones priced on."""
    median = statistics.median_low([s.shape[0] for v in scores.values() for s in v] or [cost_rows])
    if not cost_rows / 2 <= median <= 2 * cost_rows:
        warn_user(f"set_budget(cost_rows={cost_rows}) but the calibration calls have {median} rows per layer "
                  "(median): batch the data like the inference calls the FLOPs are counted for")


def set_budget(model: nn.Module, budget: float, data: Iterable, per_layer: bool = False, rounds: int = 3,
               max_groups: int | None = None, cost_rows: int = 1, track: float = 0.0) -> float:
    """Calibrate the price ``lam`` so that the average FLOPs per row on ``data`` (model inputs) equal
    ``budget`` x full width (controllers included). Returns the fraction spent on ``data`` at the final prices
    (all layers), measured in one more pass; a fraction more than 2% off the budget warns.

    A layer's inputs, hence its controller's scores, depend on the widths the layers before it used,
    i.e. on ``lam`` itself; so scoring and calibration alternate for ``rounds`` rounds (a fixed-point
    iteration started from the current prices); ``data`` is read into a list once (batches; one tensor or dict
    is one batch), so a one-shot iterator works. Rows at padding positions (``attention_mask`` 0 in a dict batch) are left out, as
    :func:`bondgate.compress` leaves them out of its statistics; at inference padded rows are routed and counted
    like any other. A call that raises leaves the model's prices and settings as they were; a budget the
    cheapest levels cannot reach warns (the return value is what was reached). The gated layers are left in
    ``"gate"`` mode, the one the price routes (a model left in ``"nested"`` by ``sandwich`` training, or set to
    ``"full"`` or a fixed fraction, is switched).

    ``per_layer=False``: one price shared by all layers, so compute moves to the layers whose rows
    gain most from it (scores must be comparable across layers, as the error controller's relative
    errors are). ``per_layer=True``: every layer gets its own price and meets the budget by itself, like
    static truncation does; only the split between rows of a layer is decided per input.

    ``max_groups``: at most this many distinct levels per forward call in inference (None: no limit; see
    :func:`bondgate.gating.route`), for batched inference where each extra group costs a separate contraction.
    Calibration routes ``data``'s own batches under the same limit, so batch it like the inference inputs.

    ``cost_rows``: the call size at which a row's FLOPs are counted (the cheapest plan for that many rows,
    per row). The default 1 is the per-row sweep, whose cost is quadratic in the bonds (halving every bond
    cuts it ~4x). A call of many rows is cheaper per row with plans that merge cores or rebuild the weight
    and run one GEMM, and those barely shrink with the bonds: at 256 rows a quarter-width level can still
    cost ~75% of full width. For batched inference pass the batch size, so that the budget counts the FLOPs
    the calls actually execute. A layer whose ``cost_rows`` changes restarts its level counts (the rows before were
    served at another call size's FLOPs, which the counts cannot be re-priced to). (Error controllers fitted with ``objective="model"`` weigh each layer by its
    share of the FLOPs as counted when they were fitted: for a shared price at a new ``cost_rows``, call
    ``set_budget`` with it once, then :func:`fit_controllers`, then ``set_budget`` again.)

    ``track``: gain of an online price correction (:class:`bondgate.gating.PriceTracker`; 0 = the calibrated price stays
    fixed). A fixed price meets the budget on inputs like ``data``; with ``track > 0`` every inference call
    moves the price against the FLOPs spent over or under the budget, so the average over the calls that
    follow is the budget even when their inputs differ from ``data``, at the price of decisions that
    depend on the calls before. Keep it small (~0.05): the tracker should correct a shift of the input
    distribution over tens of calls, not the difference between one call and the next — a fast one
    (0.5) makes every call spend about the budget, which removes the adaptivity between inputs (on
    length-sorted STS-B batches it cost 25-33 Spearman points at a 25% budget). Saved with the model.
    """
    budget = _check_budget(budget)
    max_groups = positive_int(max_groups, "max_groups", none_ok=True)
    cost_rows = positive_int(cost_rows, "cost_rows")
    track = _check_track(track)
    layers = _gated_layers(model)
    if not layers:
        raise ValueError("the model has no gated layers (call bondgate.gate first)")
    rounds = positive_int(rounds, "rounds")
    if not isinstance(per_layer, bool):
        raise TypeError(f"per_layer must be True or False, got {per_layer!r}")
    untrained = [n for n, m in layers if not _fitted(m)]
    if untrained:
        many = len(untrained) > 1
        warn_user(f"set_budget: the controller{'s' if many else ''} of {_short_list(untrained, 3)} ha"
                  f"{'ve' if many else 's'} not been fitted or trained: {'they score' if many else 'it scores'} "
                  f"the levels by the input's norm alone (an error controller) or alike for every row (a linear "
                  f"one); call fit_controllers first (controller='error'), or train with mode 'gate' (distill)")
    data = as_batches(data, "set_budget")
    with _restored_on_error([m for _, m in layers]):
        for _, m in layers:  # the price routes "gate" mode only: calibrated in any other, it priced a routing that
            if m.mode != "gate":  # never ran (0.30 returned, 0.24 or 0.48 spent after set_mode("gate"))
                m._set_mode("gate")
        return _set_budget(model, layers, budget, data, per_layer, rounds, max_groups, cost_rows, track)


@contextlib.contextmanager
def _restored_on_error(layers: Sequence["GatedMPOLinear"]) -> Iterator[None]:
    """A call that raises leaves the layers' routing settings as they were (price, budget, tracker, max_groups,
    cost_rows): a caller who catches the error goes on with the model it had."""
    saved = [(m, m._tracker, m.max_groups, m.cost_rows, m.budget, m.budget_lambda.clone(), m.mode) for m in layers]
    try:
        yield
    except BaseException:
        for m, tracker, groups, rows, budget, lam, mode in saved:
            m._tracker, m.max_groups, m.budget = tracker, groups, budget
            if m.mode != mode:
                m._set_mode(mode)
            if m.cost_rows != rows:
                m.cost_rows = rows
                m._refresh_costs()
            m._buffer("budget_lambda").copy_(lam)
        raise


def _set_budget(model, layers, budget, data, per_layer, rounds, max_groups, cost_rows, track) -> float:
    recosted = []
    for _, m in layers:
        m._tracker = None  # calibration runs at fixed prices
        m.max_groups = max_groups
        if m.cost_rows != cost_rows:
            m.cost_rows = cost_rows
            m._refresh_costs()
            recosted.append(m)
    for r in range(rounds):
        scores = _collect_scores(model, data)
        if r == 0:
            _check_scores(scores, layers)
            if cost_rows > 1:
                _warn_call_size(scores, cost_rows)
        scores = _as_calls(scores, max_groups)
        layers = [(n, m) for n, m in layers if n in scores]
        for group in [[nm] for nm in layers] if per_layer else [layers]:
            lam = _calibrate_lambda(group, scores, budget)
            for _, m in group:
                m._buffer("budget_lambda").fill_(lam)
                m.budget = float(budget)
    predicted = _flops_at(layers, scores)  # on the scores the last round priced
    # the last round priced scores taken at the previous round's prices: measure at the final ones
    achieved = _measured_flops(model, layers, data, max_groups)
    if not per_layer and abs(achieved - budget) > 0.02 * budget:
        # the score-then-price iteration need not settle (each layer's scores follow the widths before it, and
        # max_groups moves whole calls between levels): search the shared price on measured passes instead
        lam, achieved = _search_shared_price(model, layers, data, max_groups, budget,
                                             float(layers[0][1].budget_lambda), achieved)
        for _, m in layers:
            m._buffer("budget_lambda").fill_(lam)
        predicted = achieved  # what the search could reach: off the budget only where no price comes closer
    if track > 0:
        for group in [[m] for _, m in layers] if per_layer else [[m for _, m in layers]]:
            scale = max(abs(float(group[0].budget_lambda)), 1e-6)  # steps relative to the calibrated price
            tracker = PriceTracker(group, budget, track, scale, shared=not per_layer)
            tracker.lam = float(group[0].budget_lambda)
            for m in group:
                m._tracker = tracker
    at_bound = [n for n, m in layers if float(m.budget_lambda) >= PRICE_BOUND]
    spent = f"the gated layers spend {achieved:.3f} of full width on this data"
    coarse = ("no price meets it more closely (its levels are too coarse for these rows, or max_groups routes whole "
              "calls)")
    why = None
    if achieved > 1.02 * budget:
        if at_bound and (not per_layer or len(at_bound) == len(layers)):
            why = (f"a budget of {budget:g} is out of reach on this data: with every row at its cheapest level the "
                   f"gated layers spend {achieved:.3f} of full width (controllers included)")
        elif at_bound:
            why = (f"{spent}, over the budget of {budget:g}: {len(at_bound)} layer(s) cannot meet it even with "
                   f"every row at its cheapest level ({', '.join(at_bound[:3])}{', ...' if len(at_bound) > 3 else ''})")
        elif predicted > 1.02 * budget:
            why = f"{spent}, over the budget of {budget:g}: {coarse}"
        else:
            why = (f"{spent} at the final prices, over the budget of {budget:g}: the prices have not settled "
                   f"(each layer's inputs depend on the widths before it); pass more rounds than {rounds}")
    elif achieved < 0.98 * budget:
        why = f"{spent}, under the budget of {budget:g}: {coarse}"
    if why is not None:
        warn_user(f"set_budget: {why}")  # (raises under warnings-as-errors: the counts below must still be there)
    for m in recosted:  # their rows so far were served at the FLOPs per row of another call size: counted afresh
        m.flush_counts()
        m._buffer("level_counts").zero_()
    return achieved


def _writable_parameter(module: nn.Module, name: str) -> nn.Parameter:
    """Parameter ``name`` of ``module`` to write in place: one made in inference mode (e.g. by a ``deepcopy`` there)
    cannot be written outside it, so it is first replaced by a normal copy of the same type (a TrackedParameter stays
    one), as :meth:`GatedMPOLinear._buffer` replaces such buffers."""
    p = module._parameters[name]
    if p.is_inference() and not torch.is_inference_mode_enabled():
        p = module._parameters[name] = type(p)(p.detach().clone(), requires_grad=p.requires_grad)
    return p


def _an_inference_tensor(model: nn.Module) -> str | None:
    """The name of a parameter or buffer of ``model`` made under ``torch.inference_mode``, which autograd cannot save
    for a backward pass (a gated layer's price and level counts, read without autograd, left out); ``None`` if none."""
    own = {id(m._buffers[n]) for _, m in _gated_layers(model) for n in ("budget_lambda", "level_counts")
           if m._buffers.get(n) is not None}
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_inference() and id(t) not in own:
            return name
    return None


FIT_ROWS_PER_FEATURE = 10  # fewer rows per fitted coefficient warn: the fit (and its R^2) follows those rows


@torch.no_grad()
@outside_inference_mode  # the model objective's sensitivities need autograd
def fit_controllers(model: nn.Module, data: Iterable, rows_per_batch: int = 256, max_rows: int = 8192,
                    seed: int = 0, objective: str = "layer",
                    loss: Callable[[object, object], torch.Tensor] | None = None) -> list[dict]:
    """Fit every error controller in closed form on the layer inputs that ``data`` (model inputs) produces.

    On rows ``x`` sampled from the full-width model's layer inputs (``rows_per_batch`` per batch, at most
    ``max_rows``; padding rows of a dict batch with an ``attention_mask`` left out; one tensor or dict is one
    batch), with ``D_l = W - W_l`` the part of the weight that level ``l`` drops, the target of
    level ``l`` is

    - ``objective="layer"``: ``|D_l x|^2 / mean|W x|^2``, the layer's own relative output error;
    - ``objective="model"``: ``sum_j s_j (D_l x)_j^2`` with ``s_j`` the sensitivity of output channel
      ``j`` (:func:`bondgate.calibration.output_sensitivity`: random probes of the model output, or the
      diagonal Fisher of ``loss(output, batch)`` if given), i.e. the predicted change of the model output
      (or loss) — in the same units for every layer. It is divided by the layer's share of the FLOPs, so
      one price (:func:`set_budget`, ``per_layer=False``) buys the largest loss reduction per FLOP
      across the whole model.

    ``proj`` holds the top-``rank`` eigenvectors of ``sum_l D_l^T S D_l / mean target_l`` (the directions
    along which the errors vary most) and ``coef[l]`` a non-negative least-squares fit of the target on
    ``[(u_j . x)^2, |x|^2]``. Returns, per layer, the rows used and the R^2 of the per-row error
    prediction of each level (1.0 for the full level, whose error is zero; NaN where the target does not vary
    between rows: one row, or rows alike). Input rows that do not vary, and fewer than
    :data:`FIT_ROWS_PER_FEATURE` rows per fitted feature (``rank + 1``), warn. Call :func:`set_budget` after.
    A model whose tensors were made under ``torch.inference_mode`` (a ``deepcopy`` there) is fitted with
    ``objective="layer"``, its controllers' parameters first replaced by normal copies of the same type;
    ``objective="model"`` needs autograd through the model and refuses it.
    """
    from scipy.optimize import nnls

    from .calibration import output_sensitivity

    if objective not in ("layer", "model"):
        raise ValueError(f"objective must be 'layer' or 'model', got {objective!r}")
    if loss is not None and objective != "model":
        raise ValueError("loss is only used with objective='model'")
    rows_per_batch = positive_int(rows_per_batch, "rows_per_batch")
    max_rows = positive_int(max_rows, "max_rows")
    layers = [(n, m) for n, m in _gated_layers(model) if m.controller_kind == "error"]
    if not layers:
        raise ValueError("fit_controllers: the model has no gated layers with controller='error'")
    if objective == "model" and (frozen := _an_inference_tensor(model)) is not None:
        raise RuntimeError(f"fit_controllers: objective='model' differentiates the model's output, and the model holds "
                           f"tensors made under torch.inference_mode ({frozen}; e.g. by a copy.deepcopy there), which "
                           f"autograd cannot use: copy or build the model outside torch.inference_mode, or fit with "
                           f"objective='layer' (which runs on such a model)")
    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layers}
    count = dict.fromkeys(rows, 0)
    dtypes: dict[str, torch.dtype] = {}
    data = as_batches(data, "fit_controllers")

    def sample(n, mod, x, batch):
        if count[n] >= max_rows or not x.dim() or x.shape[-1] != mod.in_features:  # (a wrong width: the layer's
            return                                                                 # own call refuses it by name)
        dtypes[n] = x.dtype
        keep = _row_mask(batch, x)  # no padding rows
        x = x.reshape(-1, mod.in_features)
        if keep is not None:
            x = x[keep.to(x.device)]
        take = torch.randperm(x.shape[0], generator=gen)[: min(rows_per_batch, max_rows - count[n])]
        rows[n].append(x[take.to(x.device)].to("cpu", torch.float64))
        count[n] += take.numel()

    with full_width(model):  # the inputs (and sensitivities) of the full-width model
        capture_inputs(model, dict(layers), data, sample, lambda: all(c >= max_rows for c in count.values()))
        sens = output_sensitivity(model, dict(layers), data, loss=loss) if objective == "model" else {}
    fits, constant = [], {}  # constant: {layer: what its rows are}
    for n, m in layers:
        if not count[n]:  # (batches of 0 rows leave rows[n] non-empty but hold none)
            raise ValueError(f"fit_controllers: layer {n!r} saw no input rows (does data reach it?)")
        X = torch.cat(rows[n])
        if not bool(torch.isfinite(X).all()):
            raise ValueError(f"fit_controllers: layer {n!r} got non-finite inputs (NaN or inf)")
        # one vector repeated (up to the inputs' rounding, as compress judges it): every row has the same error at
        # every level, so nothing tells inputs apart (R^2 of -78 was reported for 64 copies of one row)
        if not rows_vary(float((X - X.mean(0)).pow(2).sum()), float(X.pow(2).sum()), dtypes[n]):
            constant[n] = f"{n} ({'a single row' if X.shape[0] == 1 else f'{X.shape[0]} rows, one vector'})"
        mpo = m.to_mpo().to(device="cpu", dtype=torch.float64)  # the fit runs on the CPU in float64, like X
        W = mpo.to_matrix()
        if objective == "model":
            s = sens[n].to("cpu", torch.float64)
            scale = sum(lm.full_cost for _, lm in layers) / len(layers) / m.full_cost
        else:
            s, scale = None, 1.0 / (float((X @ W.T).pow(2).sum(1).mean()) or 1.0)
        targets, G = [], torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
        for w in m.level_widths:
            if w == m.bond_dims:
                targets.append(torch.zeros(X.shape[0], dtype=torch.float64))
                continue
            D = W - mpo.slice_bonds(w).to_matrix()
            E = (X @ D.T).pow(2)
            t = (E.sum(1) if s is None else E @ s) * scale
            targets.append(t)
            SD = D if s is None else D * s.sqrt()[:, None]
            G += SD.T @ SD / max(float(t.mean()) / scale, 1e-300)
        fits.append((n, m, X, targets, G))
    # one global unit for the scores (the price's search range is fixed); relative per layer already for "layer"
    unit = 1.0
    if objective == "model":
        unit = sum(float(t[0].mean()) for *_, t, _ in fits) / len(fits) or 1.0
    report, few = [], []
    for n, m, X, targets, G in fits:
        ctrl = m.controller
        need = FIT_ROWS_PER_FEATURE * (ctrl.rank + 1)
        if X.shape[0] < need:
            few.append(f"{n} ({X.shape[0]} rows)")
        elif n not in constant:  # repeated rows (a batch passed 8 times) count once: they add no information
            # enough distinct rows among the first 2 * need settle it without sorting them all (0.1-0.75 s per layer
            # at 8192 rows, 768-4096 wide)
            if torch.unique(X[: 2 * need], dim=0).shape[0] < need:
                distinct = torch.unique(X, dim=0).shape[0]
                if distinct < need:
                    few.append(f"{n} ({X.shape[0]} rows, {distinct} distinct)")
        U = torch.linalg.eigh(G).eigenvectors[:, -ctrl.rank:].T  # (rank, in)
        feats = torch.cat([(X @ U.T).pow(2), X.pow(2).sum(1, keepdim=True)], 1)
        fscale = feats.pow(2).mean(0).sqrt().clamp_min(1e-30)
        coef, r2 = [], []
        for w, t in zip(m.level_widths, targets):
            t = t / unit
            if not bool(t.any()):  # no error at any row: the full level's R^2 is 1.0; another's target does not vary
                coef.append(torch.zeros(feats.shape[1], dtype=torch.float64))
                r2.append(1.0 if w == m.bond_dims else math.nan)  # (all-zero inputs gave 1.0, against the warning)
                continue
            c, _ = nnls((feats / fscale).numpy(), t.numpy())
            c = torch.from_numpy(c) / fscale
            pred = feats @ c
            spread = float((t - t.mean()).pow(2).sum())
            # R^2 is undefined for a target that does not vary (one row, or rows alike): 1.0 or -78 was reported
            r2.append(float(1 - (pred - t).pow(2).sum() / spread) if spread > 1e-24 * float(t.pow(2).sum())
                      else math.nan)
            coef.append(c)
        proj_weight, ctrl_coef = _writable_parameter(ctrl.proj, "weight"), _writable_parameter(ctrl, "coef")
        proj_weight.copy_(U.to(proj_weight))
        ctrl_coef.copy_(torch.stack(coef).to(ctrl_coef))
        report.append({"name": n, "rows": int(X.shape[0]), "r2": r2})
    if constant:  # real inputs can do that (a layer fed a class embedding, one class in the data): warned, not refused
        warn_user(f"fit_controllers: the input rows of {len(constant)} layer(s) do not vary "
                  f"({_short_list(list(constant.values()), 3)}"
                  f"): their controllers cannot tell inputs apart (R^2 NaN) and will pick by the input's norm "
                  f"alone; pass data with several different rows for them")
    if few:  # one row gave R^2 = 1.0 everywhere, and a held-out output error of 0.51 at the budget (256 rows: 0.41)
        warn_user(f"fit_controllers: {len(few)} layer(s) saw few input rows for a fit of rank + 1 features "
                  f"({_short_list(few, 3)}; fewer than {FIT_ROWS_PER_FEATURE} per feature): the controllers may "
                  f"rank other inputs poorly and their R^2 figures are optimistic; pass more data")
    return report


def average_flops(model: nn.Module, reset: bool = False) -> float:
    """Average FLOPs per row over the rows seen in eval since the last reset, as a fraction of full width."""
    rows = [r for r in gating_report(model, reset=reset) if r["rows"]]
    full = sum(r["full_flops_per_row"] * r["rows"] for r in rows)
    used = sum(r["avg_flops_fraction"] * r["full_flops_per_row"] * r["rows"] for r in rows)
    return used / full if full else float("nan")


def gating_report(model: nn.Module, reset: bool = False) -> list[dict]:
    """Per gated layer: level histogram (fraction of rows since the last reset), average FLOPs per row
    vs full width, the controller's cost as a fraction of the layer's full-width FLOPs, ``lambda`` (its
    current value) and ``track`` (the gain of its online price correction, 0 if the price is fixed). Only calls
    in eval mode are counted: a model still in training mode reports ``rows`` 0 and a NaN fraction."""
    rows = []
    for n, m in _gated_layers(model):
        counts = m.flush_counts().clone()
        tot = float(counts.sum())
        hist = (counts / tot).tolist() if tot else [0.0] * len(m.levels)
        avg = (float((counts.cpu() * m.rel_cost).sum()) * m.full_cost / tot
               + m.controller_cost) / m.full_cost if tot else float("nan")
        rows.append({"name": n, "levels": list(m.levels), "histogram": hist, "rows": int(tot),
                     "avg_flops_fraction": avg, "full_flops_per_row": m.full_cost, "cost_rows": m.cost_rows,
                     "controller_fraction": m.controller_cost / m.full_cost, "lambda": float(m.budget_lambda),
                     "track": m._tracker.rate if m._tracker is not None else 0.0,
                     "bond_dims": list(m.bond_dims), "level_widths": [list(w) for w in m.level_widths]})
        if reset:
            m._buffer("level_counts").zero_()
    return rows


def width_error_curve(layer: MPOLinear, fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0)) -> list[float]:
    """Relative weight error of keeping each fraction (in (0, 1]) of every bond (should fall monotonically)."""
    if getattr(fractions, "ndim", None) == 1 and hasattr(fractions, "tolist"):  # a 1-D tensor or array: its numbers
        fractions = fractions.tolist()
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Iterable):
        raise TypeError(f"fractions are fractions of each bond (a sequence of numbers), got {fractions!r}")
    fractions = [number(f, "each of fractions", low=0, high=1, low_open=True, hint="a fraction of each bond")
                 for f in fractions]
    W = layer.weight_matrix().detach()
    out = []
    for f in fractions:
        mpo = layer.to_mpo().slice_bonds(_widths(layer.bond_dims, f))
        out.append(float(torch.linalg.norm(mpo.to_matrix() - W) / torch.linalg.norm(W).clamp_min(1e-30)))
    return out
