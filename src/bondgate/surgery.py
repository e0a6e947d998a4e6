"""Model surgery: find a model's dense layers, factor them into MPOs under a budget, swap them in.

``compress(model, config, calibration)`` modifies ``model`` in place and returns it, with a
:class:`CompressionReport` attached as ``model.bondgate_report``. Per targeted layer it

1. takes the weight ``W`` (``nn.Linear.weight``, or ``Conv1D.weight.T`` for transformers' GPT-2 layers),
2. with calibration data, whitens it by a Kronecker-factored input covariance
   (:mod:`bondgate.calibration`), so that the TT-SVD truncates what matters for real activations,
3. decomposes it exactly into a canonical MPO whose bond spectra tell what each channel costs,
4. lets the allocator (:mod:`bondgate.allocation`) spread the global budget over all bonds of all layers,
   weighting each layer by how much its output moves the model's output,
5. truncates, undoes the whitening inside the input-leg cores, refines the cores on the exact
   activation-weighted error and re-fits the bias for the mean shift,
6. swaps in an :class:`~bondgate.MPOLinear`.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn
from torch.nn.utils.prune import BasePruningMethod

from ._checks import number
from ._warn import warn_user
from .allocation import (
    BudgetConflict,
    BudgetTooSmall,
    Choice,
    LayerMenu,
    LayerSpectrum,
    allocate,
    lowrank_menu,
    mpo_params,
    tolerance_menu,
    uniform_widths,
)
from .calibration import (
    InputStats,
    _tensors,
    apply_leg_maps,
    as_batches,
    collect_input_stats,
    collect_token_counts,
    damped,
    fold_into_cores,
    kron_whiteners,
    layer_sensitivity,
    refine_cores,
    rows_vary,
)
from .costmodel import (
    KindTimes,
    calibrate,
    calibrate_dense,
    full_widths,
    lowrank_flops,
    measure,
    mpo_flops,
    paired_seconds,
)
from .embedding import MPOEmbedding, most_frequent, row_weight_legs, table_factors, table_mpo, table_target
from .factors import choose_factors, factorize_shape
from .layer import (
    MPOLinear,
    carry_hooks,
    freeze_like,
    outside_inference_mode,
    overrides_forward,
    reparametrizing_hook,
    trains,
)
from .lowrank import LowRankLinear, rank_cores
from .mpo import MPO
from .planner import MAX_CORES, PlanPolicy
from .quant import check_quant, fake_quant
from .recurrent import Recurrent, reroll, unroll

__all__ = ["CompressionConfig", "CompressionReport", "LayerReport", "compress", "find_targets"]

log = logging.getLogger("bondgate")


@dataclass
class CompressionConfig:
    """What to compress and how much (PEFT-style: plain data, JSON-serializable).

    Budget, exactly one of:
        param_ratio: keep this fraction of the targeted layers' weights (0 < r <= 1).
        max_bond: cap every bond of every layer.
        tol: per-layer relative error tolerance (on the whitened weight with calibration data).
    Selection:
        target_modules: ``None`` = every ``nn.Linear`` / ``Conv1D``; a string = regex that must match the
            full module name; a list = names, each matching a module name exactly or as its dotted suffix.
        exclude: same forms, removed from the selection.
        embeddings: also compress the selected ``nn.Embedding`` tables into :class:`~bondgate.MPOEmbedding` (row
            lookup, never the full table); an LM head tied to such a table becomes its tied MPO head
            (:meth:`~bondgate.MPOEmbedding.as_linear`). Embeddings are not calibrated (their input is a token id)
            and cost nothing in a time/FLOP budget.
        embedding_ratio: with ``param_ratio``: the fraction of the embedding tables' weights they keep (default: the
            same ``param_ratio``). The tables get their own share of the budget instead of competing with the linear
            layers: a table's relative error is not comparable with a linear layer's calibrated output error (it
            feeds every layer), and one shared budget would strip it to almost nothing.
        embedding_form: ``"mpo"`` (``num_cores`` cores) or ``"lowrank"`` (two factors ``A @ B``). With calibration
            data a table is fitted to the ids' frequencies there (rows weighted by ``sqrt(count + 1)``): exactly for
            ``"lowrank"``, through a separable fit for ``"mpo"`` (see :mod:`bondgate.embedding`).
        embedding_rows: keep the exact rows of this many most frequent ids per table (counted on the calibration
            data, which it needs) beside the factors; they count against the table's budget. Not for a table tied
            to an LM head.
    Method:
        num_cores: cores per MPO, at most: a layer whose sizes cannot give that many legs above 1 on either side
            gets as many cores as its larger side has such legs (128x128 at 12 cores: 7 cores of legs 2, not
            legs of 1 that leave the middle bonds one cut between all inputs and all outputs; embedding tables
            keep ``num_cores``). allocation: ``"global"`` (greedy over all bonds of all layers) or
        ``"uniform"`` (one bond cap for every layer, plain TT-SVD, dense where the MPO at that cap would not be
        smaller; the classic baseline; with
        ``kinds=("lowrank",)``: every layer a low-rank pair at ``param_ratio`` of its weights).
        calibrate: use calibration data (whitening, refinement, bias correction, sensitivity) when given.
        refine_steps: L-BFGS iterations on the activation-weighted error per layer (0 = off).
        layer_weighting: how the global allocation weighs one layer's squared output error against
            another's: ``"sensitivity"`` (measured effect on the model output; needs calibration data),
            ``"relative"`` (error relative to the layer's whitened weight, ``||W S||^2`` with ``S`` the whitening
            the factorization uses — Kronecker-factored per input leg for an MPO, the full input covariance for a
            low-rank pair — an approximation of the layer's output energy ``tr(W C W^T)``, not that energy itself),
            ``"absolute"``.
        damping: relative ridge on each input-leg covariance, and on the covariance the refinement fits.
        policy: the new MPO layers' kernels: ``"memory"`` (never keep a dense weight), ``"speed"`` (keep it where
            that is faster), or ``"auto"`` (default): speed for the layers whose factored plans (autotuned) are slower
            than the dense layer at 1 or ``deploy_rows`` rows, memory for the others (a compressed table's tied MPO
            head is judged the same way) — so at those row counts the compressed layers' kernels are not slower than
            the dense ones'. What that leaves: each MPO layer call adds ~2-3 µs of Python to its kernel (on a CPU,
            1.1-1.15x ``nn.Linear``'s time for a 384-wide layer at one row, 1.4x for a 64-wide one; within noise from
            32 rows up at 384 wide); a memory-mode layer can be slower at row counts it was not judged at; a table's
            lookup costs more than ``nn.Embedding``'s (see ``embeddings``). The report says which policy each layer
            got, and the kernel µs the decision saw. Low-rank pairs have one kernel (two ``F.linear`` calls), no policy
            and no timing (timing every pair made compress several times slower on models of small layers): on small
            layers the second call's overhead can make a pair slower than ``nn.Linear`` (a 64 x 64 layer at rank 28:
            ~1.7x at 1 and 128 rows; 384 x 384 at rank 96: ~1.1x at 1 row, ~0.6x at 128, on a 2-core CPU); a time
            budget (``max_latency_ratio``) prices and measures them.
        max_calibration_rows: stop the statistics pass once every layer has seen this many rows. The calibration
            iterable itself is read in full (and held, since later passes re-read it): pass a finite, sized one.
        quantize: ``None`` (default) or ``"int8"``: every new MPO layer is quantized (per-channel int8 cores,
            :meth:`bondgate.MPOLinear.quantize_`; saved as int8: ~3.5-3.9x fewer bytes, scales included). Its
            reported errors and its bias re-fit include the quantization. Linear layers the budget keeps dense
            become one-core int8 MPO layers (per-output-channel int8 weights), so bytes follow the weight budget,
            and low-rank pairs two-core ones (legs ``(out, 1) x (1, in)``, the bond the rank: one scale per row of
            each factor; :func:`bondgate.deploy_float` / :func:`bondgate.deploy_int8` run them as pairs). Biases
            stay in full precision (for dense layers see :func:`bondgate.quantize_int8`);
            :func:`bondgate.quantize_mpo` quantizes the MPO layers and pairs of a model compressed before.
    Latency (with ``param_ratio`` and global allocation; see :mod:`bondgate.costmodel`):
        kinds: the forms a layer may take besides staying dense: ``"mpo"`` and/or ``"lowrank"`` (two factors,
            ``U @ V``). Default: both with a ``param_ratio`` budget under the global allocation (each layer takes the
            form with the smaller predicted error at its share of the budget: on all-MiniLM-L6-v2 at 0.5 every
            compressed layer became a low-rank pair, with a lower error and fewer FLOPs than the MPO, which at those
            widths would run its dense product), with or without ``quantize="int8"``, and with a time or FLOP
            budget; ``("mpo",)`` otherwise (``max_bond`` / ``tol`` cut MPO bonds; the uniform allocation gives every
            layer one form). ``kinds=("mpo",)`` keeps every compressed layer an MPO.
        max_latency_ratio: the targeted layers' predicted time per call at ``deploy_rows`` rows must be at most this
            fraction of the dense layers' (time measured on this machine: not deterministic).
        flops_ratio: the same with FLOPs (deterministic): the new layers then choose their contraction plans by
            FLOPs instead of timing them, so that they run the FLOPs the budget counted. Give at most one of the two.
            A recurrent layer's matrices count at their dense cost whatever their form (torch's fused kernel runs
            their dense weights).
        deploy_rows: the rows per layer call (tokens of a batch) the time, FLOPs (also the report's) and ``"auto"``
            policy are judged at.
    """

    param_ratio: float | None = None
    max_bond: int | None = None
    tol: float | None = None
    target_modules: str | list[str] | None = None
    exclude: str | list[str] | None = None
    num_cores: int = 3
    allocation: str = "global"
    calibrate: bool = True
    refine_steps: int = 30
    layer_weighting: str = "relative"
    damping: float = 1e-2
    policy: str = "auto"
    max_calibration_rows: int | None = 200_000
    embeddings: bool = False
    embedding_ratio: float | None = None
    embedding_form: str = "mpo"
    embedding_rows: int = 0
    kinds: tuple[str, ...] | None = None
    max_latency_ratio: float | None = None
    flops_ratio: float | None = None
    deploy_rows: int = 128
    quantize: str | None = None

    def __post_init__(self) -> None:
        check_quant(self.quantize)
        # Python numbers from here on (numpy's are taken, from a sweep over np.linspace): the config is saved as JSON
        self.param_ratio = number(self.param_ratio, "param_ratio", low=0, high=1, low_open=True, none_ok=True)
        self.max_bond = number(self.max_bond, "max_bond", low=1, integer=True, none_ok=True)
        self.tol = number(self.tol, "tol", low=0, high=1, high_open=True, none_ok=True)
        self.num_cores = number(self.num_cores, "num_cores", low=1, high=MAX_CORES, integer=True,
                                hint="torch.einsum has 52 index letters")
        self.refine_steps = number(self.refine_steps, "refine_steps", low=0, integer=True)
        self.damping = number(self.damping, "damping", low=0)
        self.max_calibration_rows = number(self.max_calibration_rows, "max_calibration_rows", low=1, integer=True,
                                           none_ok=True)
        self.embedding_ratio = number(self.embedding_ratio, "embedding_ratio", low=0, high=1, low_open=True,
                                      none_ok=True)
        self.embedding_rows = number(self.embedding_rows, "embedding_rows", low=0, integer=True)
        self.max_latency_ratio = number(self.max_latency_ratio, "max_latency_ratio", low=0, low_open=True,
                                        none_ok=True)
        self.flops_ratio = number(self.flops_ratio, "flops_ratio", low=0, low_open=True, none_ok=True)
        self.deploy_rows = number(self.deploy_rows, "deploy_rows", low=1, integer=True)
        check_selector(self.target_modules, "target_modules")
        check_selector(self.exclude, "exclude")
        given = [k for k in ("param_ratio", "max_bond", "tol") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one budget: param_ratio, max_bond or tol (got {given or 'none'})")
        if self.embedding_ratio is not None and self.param_ratio is None:
            raise ValueError("embedding_ratio needs a param_ratio budget")
        if self.allocation not in ("global", "uniform"):
            raise ValueError(f"allocation must be 'global' or 'uniform', got {self.allocation!r}")
        if self.layer_weighting not in ("sensitivity", "relative", "absolute"):
            raise ValueError(f"layer_weighting must be 'sensitivity', 'relative' or 'absolute', got {self.layer_weighting!r}")
        for flag in ("embeddings", "calibrate"):  # (calibrate="no" was truthy: it calibrated)
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.embedding_form not in ("mpo", "lowrank"):
            raise ValueError(f"embedding_form must be 'mpo' or 'lowrank', got {self.embedding_form!r}")
        unused = [f for f, on in (("embedding_ratio", self.embedding_ratio is not None),
                                  ("embedding_form", self.embedding_form != "mpo"),
                                  ("embedding_rows", bool(self.embedding_rows))) if on]
        if unused and not self.embeddings:  # else silently ignored
            raise ValueError(f"{', '.join(unused)} needs embeddings=True")
        if self.policy not in ("auto", "memory", "speed"):
            raise ValueError(f"policy must be 'auto', 'memory' or 'speed', got {self.policy!r}")
        if self.kinds is not None:
            kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
            if not kinds or not all(isinstance(k, str) for k in kinds) or not set(kinds) <= {"mpo", "lowrank"} \
                    or len(set(kinds)) != len(kinds):
                raise ValueError(f"kinds must be a non-empty selection of 'mpo' and 'lowrank', got {self.kinds!r}")
            self.kinds = kinds
        if self.max_latency_ratio is not None and self.flops_ratio is not None:
            raise ValueError("give at most one of max_latency_ratio and flops_ratio")
        if self.cost_budget is not None and (self.param_ratio is None or self.allocation != "global"):
            raise ValueError("max_latency_ratio / flops_ratio need param_ratio with allocation='global'")
        if self.kinds is not None and self.kinds != ("mpo",) and self.param_ratio is None:
            raise ValueError(f"kinds={self.kinds!r}: forms other than 'mpo' need a param_ratio budget")
        # options of the param_ratio budget's allocation: with max_bond / tol every layer is cut by itself
        if self.allocation != "global" and self.param_ratio is None:
            raise ValueError(f"allocation={self.allocation!r} spreads a param_ratio budget; with max_bond / tol every "
                             "layer is cut by its own cap")
        if self.allocation == "uniform" and len(self.forms) > 1:  # it gives every layer one form: lowrank would go unused
            raise ValueError(f"allocation='uniform' gives every layer one form: kinds=('mpo',) or ('lowrank',), got "
                             f"{self.forms}; the global allocation chooses between forms")
        if self.layer_weighting != "relative" and (self.param_ratio is None or self.allocation != "global"):
            raise ValueError(f"layer_weighting={self.layer_weighting!r} weighs layers in the global allocation of a "
                             "param_ratio budget; it does nothing with max_bond / tol or allocation='uniform'")
        if self.num_cores == 1 and ("mpo" in self.forms or (self.embeddings and self.embedding_form == "mpo")):
            raise ValueError("num_cores=1 is the dense weight itself: an MPO needs at least 2 cores")

    @property
    def cost_budget(self) -> tuple[str, float] | None:
        """``("time" | "flops", ratio)`` when a latency or FLOP budget is set."""
        if self.max_latency_ratio is not None:
            return "time", float(self.max_latency_ratio)
        if self.flops_ratio is not None:
            return "flops", float(self.flops_ratio)
        return None

    @property
    def forms(self) -> tuple[str, ...]:
        """The forms the allocation may give a layer (see ``kinds``)."""
        if self.kinds is not None:
            return self.kinds
        if self.cost_budget is not None:  # (it needs param_ratio and the global allocation)
            return ("mpo", "lowrank")
        both = self.param_ratio is not None and self.allocation == "global"
        return ("mpo", "lowrank") if both else ("mpo",)

    def to_dict(self) -> dict:
        """The fields as a JSON-serializable dict; ``CompressionConfig(**d)`` rebuilds the config."""
        return asdict(self)


@dataclass
class LayerReport:
    """One row of the compression report (errors are relative; FLOPs at ``rows`` input rows)."""

    name: str
    kind: str
    out_features: int
    in_features: int
    status: str = "compressed"
    out_factors: tuple[int, ...] = ()
    in_factors: tuple[int, ...] = ()
    bond_dims: tuple[int, ...] = ()
    params_before: int = 0
    params_after: int = 0
    weight_error: float | None = None
    output_error: float | None = None
    flops_dense: int = 0  # a call of flop_rows rows (the config's deploy_rows)
    flops_mpo: int = 0  # the same call through the plan the layer runs (speed mode's dense weight: flops_dense;
    #                      a plan chosen by timing: may differ between runs and machines)
    aliases: list[str] = field(default_factory=list)  # other names of the same (shared) layer
    form: str = "mpo"  # "mpo" | "lowrank" | "dense"
    rank: int | None = None  # low-rank layers
    policy: str | None = None  # the MPO layer's kernel policy ("memory" | "speed")
    time_pred_us: float | None = None  # predicted time per call at the report's rows (with a time budget)
    # measured at the plan's rows (the smallest count of deploy_rows' power-of-two bucket): with a time or FLOP budget,
    # the layer's call; under policy "auto" otherwise, the kernel the decision saw (the memory plan's autotuned time,
    # or in speed mode the faster of it and F.linear's), without the layer's ~2-3 µs of Python per call
    time_us: float | None = None
    time_dense_us: float | None = None  # the dense layer (an nn.Linear call), timed the same way
    quant: str | None = None  # the MPO cores' quantization ("int8"), None for full precision


@dataclass
class CompressionReport:
    """Per-layer results of :func:`compress` plus totals; ``print(report)`` shows a table."""

    layers: list[LayerReport] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    flop_rows: int = 128
    history: list[dict] = field(default_factory=list)  # configs of earlier compress() calls on the same model

    @property
    def compressed(self) -> list[LayerReport]:
        """The rows of the layers that were replaced (``status == "compressed"``; not those kept dense or skipped)."""
        return [r for r in self.layers if r.status == "compressed"]

    @property
    def params_before(self) -> int:
        """Weights (a count, biases excluded) of the targeted layers before compression; skipped layers not counted."""
        return sum(r.params_before for r in self.layers if not r.status.startswith("skipped"))

    @property
    def params_after(self) -> int:
        """Weights the same layers store after it (cores, factors, kept rows, or the dense weight a layer kept)."""
        return sum(r.params_after for r in self.layers if not r.status.startswith("skipped"))

    @property
    def ratio(self) -> float:
        """Targeted weights kept (1.0 when no layer was targeted: nothing changed)."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def measured_times(self) -> tuple[float, float]:
        """Summed measured µs per call of the timed layers and of their dense originals (layers kept dense count at
        their dense time when a time or FLOP budget timed them; without one they have no time, and the sums cover the
        compressed layers only)."""
        meas = [r for r in self.layers if r.time_us is not None and r.time_dense_us is not None]
        return sum(r.time_us for r in meas), sum(r.time_dense_us for r in meas)

    @classmethod
    def from_dict(cls, d: dict) -> CompressionReport:
        """The report :meth:`to_dict` wrote (fields this version does not know are ignored)."""
        known = {f.name for f in fields(LayerReport)}
        tuples = ("out_factors", "in_factors", "bond_dims")
        layers = [LayerReport(**{k: tuple(v) if k in tuples else v for k, v in r.items() if k in known})
                  for r in d.get("layers", [])]
        return cls(layers=layers, config=dict(d.get("config", {})), flop_rows=int(d.get("flop_rows", 128)),
                   history=list(d.get("history", [])))

    def to_dict(self) -> dict:
        """A JSON-serializable dict: ``config``, ``history``, ``flop_rows``, ``params_before``, ``params_after``,
        ``ratio`` and ``layers`` (one dict per :class:`bondgate.surgery.LayerReport`); :meth:`from_dict` reads it
        back."""
        return {"config": self.config, "history": self.history, "flop_rows": self.flop_rows,
                "params_before": self.params_before,
                "params_after": self.params_after, "ratio": self.ratio,
                "layers": [asdict(r) for r in self.layers]}

    def table(self) -> str:
        """Markdown table, one row per targeted layer, with a totals row."""
        timed = any(r.time_us is not None for r in self.layers)
        head = ("| layer | shape (out x in) | form | factors (out / in) | bonds / rank | weights | kept | "
                f"weight err | output err | FLOPs vs dense ({self.flop_rows} rows) |"
                + (" kernel | µs pred / meas / dense |" if timed else ""))
        rows = [head, "|---" * (head.count("|") - 1) + "|"]
        us = (lambda v: "-" if v is None else f"{v:.0f}")
        flops = (lambda r: "-" if not r.flops_dense else f"{r.flops_mpo / r.flops_dense:.2f}x")  # a table: a lookup
        fmt = (lambda v: "-" if v is None else f"{v:.4f}")
        for r in self.layers:
            if r.status != "compressed":
                kept = f"{r.params_after / r.params_before:.1%}" if r.params_before else "-"
                # a layer kept dense in int8 has the errors of its rounding (blank for one kept exact)
                errs = (f"{fmt(r.weight_error)} | {fmt(r.output_error)}" if r.weight_error is not None
                        or r.output_error is not None else "|")
                # a layer kept dense under a time or FLOP budget: its FLOPs and time, which the totals count
                times = f" {us(r.time_pred_us)} / {us(r.time_us)} / {us(r.time_dense_us)} |" if r.time_us is not None \
                    else " |"
                rows.append(f"| {r.name} | {r.out_features}x{r.in_features} | {r.status} | | | {r.params_before:,} | "
                            f"{kept} | {errs} | {flops(r) if r.flops_dense else ''} |" + (f" |{times}" if timed else ""))
                continue
            factors = (f"{'x'.join(map(str, r.out_factors))} / {'x'.join(map(str, r.in_factors))}"
                       if r.form == "mpo" else "")
            bonds = ",".join(map(str, r.bond_dims)) if r.form == "mpo" else f"rank {r.rank}"
            rows.append(
                f"| {r.name} | {r.out_features}x{r.in_features} | {r.form}{' ' + r.quant if r.quant else ''} | "
                f"{factors} | {bonds} | "
                f"{r.params_before:,} -> {r.params_after:,} | {r.params_after / r.params_before:.1%} | "
                f"{fmt(r.weight_error)} | {fmt(r.output_error)} | {flops(r)} |"
                + (f" {r.policy or '-'} | {us(r.time_pred_us)} / {us(r.time_us)} / {us(r.time_dense_us)} |"
                   if timed else ""))
        kept = f"{self.ratio:.1%}" if self.params_before else "-"
        total = f"| **total** | | | | | {self.params_before:,} -> {self.params_after:,} | {kept} | | | |"
        if timed:
            t, td = self.measured_times()
            total += f" | {us(t)} / {us(td)} = {t / max(td, 1e-9):.2f}x of dense (timed layers) |"
        rows.append(total)
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def check_selector(value, name: str) -> None:
    """A module selector is None, a regex (matched against whole names) or a list of names / dotted suffixes."""
    if not (value is None or isinstance(value, str)
            or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))):
        raise TypeError(f"{name} must be None, a regex string or a list of module names, got {value!r}")
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{name} is not a valid regular expression: {value!r} ({exc})") from None


# ---------------------------------------------------------------------------------------------- targets
def is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` of shape ``(in, out)``."""
    # A model can only hold a Conv1D if transformers.pytorch_utils is already imported, so looking it
    # up in sys.modules avoids importing transformers (seconds) for plain PyTorch models.
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(m, conv1d)


def dense_weight(m: nn.Module) -> torch.Tensor:
    """The detached weight of an ``nn.Linear`` or ``Conv1D`` in ``(out_features, in_features)`` layout."""
    if isinstance(m, nn.Linear):
        return m.weight.detach()
    if is_conv1d(m):
        return m.weight.detach().T
    if isinstance(m, nn.Embedding):  # the table (num_embeddings, embedding_dim): MPOEmbedding's convention
        return m.weight.detach()
    raise TypeError(f"expected nn.Linear, nn.Embedding or transformers Conv1D, got {type(m).__name__}")


def _shape(m: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a (possibly skipped) layer, ``(0, 0)`` when it has none."""
    try:
        return tuple(dense_weight(m).shape)
    except TypeError:
        return int(getattr(m, "out_features", 0)), int(getattr(m, "in_features", 0))


def _matches(name: str, spec: str | Sequence[str] | None) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name each module is registered under (a module shared by two parents has two), by ``id``."""
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    return names


def _is_peft_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer (``peft.tuners.lora.Linear`` ...), recognised without importing peft."""
    return any(c.__name__ == "BaseTunerLayer" and c.__module__.startswith("peft.") for c in type(module).__mro__)


def find_targets(model: nn.Module, config: CompressionConfig) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``(targets, skipped)``: modules to compress by name, and skipped ones with the reason.

    A module registered under several names is listed once, under its first (see :func:`module_names`), and
    ``target_modules`` / ``exclude`` select it by any of them.
    Layers whose class has a forward of its own, layers with a parametrized weight (``weight_norm``,
    ``spectral_norm``) or bias, layers pruned by ``torch.nn.utils.prune`` (before ``prune.remove``), and ``nn.MultiheadAttention``'s ``out_proj`` (whose weight the attention reads directly)
    are skipped with a warning. A replaced layer's forward and backward hooks go to its replacement."""
    adapters = [n for n, m in model.named_modules() if _is_peft_layer(m)]
    if adapters:
        raise ValueError(f"compress: the model has PEFT adapter layers ({', '.join(adapters[:3])}"
                         f"{', ...' if len(adapters) > 3 else ''}), whose adapter matrices would be factored and whose "
                         f"base layers PEFT could no longer merge into: merge them first (model = "
                         f"model.merge_and_unload()) and compress the result, or compress the base model and add the "
                         f"adapters after (PEFT wraps the layers left dense, not MPO layers)")
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    targets, skipped = {}, {}
    inside_mpo = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, MPOLinear) and n)
    read_directly = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    recurrent = {n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, Recurrent)}
    aliases = module_names(model)

    def chosen(mod: nn.Module, spec) -> bool:  # by any name the layer has (or its Recurrent's), not the first alone
        return any(_matches(n, spec) or (n.rpartition(".")[0] in recurrent and _matches(n.rpartition(".")[0], spec))
                   for n in aliases[id(mod)])

    for name, mod in model.named_modules():
        emb = config.embeddings and isinstance(mod, nn.Embedding)  # subclasses too: skipped below if they add a forward
        if not name or not (isinstance(mod, nn.Linear) or is_conv1d(mod) or emb) or isinstance(mod, MPOLinear):
            continue
        if name.startswith(inside_mpo):  # e.g. a gating controller: part of an MPO layer, not a target
            continue
        if config.target_modules is not None and not chosen(mod, config.target_modules):
            continue
        if chosen(mod, config.exclude):
            continue
        why, hook = None, reparametrizing_hook(mod)
        bad = [a for a in ("max_norm", "sparse", "scale_grad_by_freq") if getattr(mod, a)] if emb else []
        if bad:
            why = f"an MPO table cannot do {', '.join(bad)}"
        elif id(mod) in read_directly:
            why = "nn.MultiheadAttention reads out_proj.weight directly, so an MPO layer cannot replace it"
        elif isinstance(hook, BasePruningMethod):
            why = ("it is pruned by torch.nn.utils.prune, whose hook an MPO layer cannot run (it has no weight_mask): "
                   "make the pruning permanent first (prune.remove(module, 'weight')) to compress the layer")
        elif nn.utils.parametrize.is_parametrized(mod, "weight") or hook is not None:  # (hook: the old style)
            why = ("its weight is parametrized (weight_norm, spectral_norm ...): an MPO layer would drop the "
                   "constraint; remove it first (nn.utils.parametrize.remove_parametrizations) to compress the layer")
        elif nn.utils.parametrize.is_parametrized(mod):
            kinds = ", ".join(sorted(mod.parametrizations.keys()))
            why = (f"its {kinds} is parametrized: the new layer would drop the parametrization; remove it first "
                   f"(nn.utils.parametrize.remove_parametrizations), compress, then register it on the new layer's "
                   f"{kinds} (a parametrized bias works there)")
        elif overrides_forward(mod):
            why = (f"its class {type(mod).__qualname__} overrides forward(); an MPO layer would drop what that forward "
                   f"adds (exclude it to silence this; for a wrapper around a plain layer, target that layer)")
        if why is not None:
            skipped[name] = why
            warn_user(f"compress: skipping {name}: {why}")
            continue
        w = mod.weight
        if isinstance(w, nn.parameter.UninitializedParameter):  # (its dim() raises torch's error, naming no layer)
            raise ValueError(f"compress: {name} is a lazy layer not initialized yet (nn.LazyLinear learns its sizes at "
                             f"its first call): run the model on one input first, or exclude it")
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
            skipped[name] = f"weight is not a floating-point matrix ({type(w).__name__})"
            continue
        if not w.numel():  # (factoring it failed on a size of 0, naming no layer)
            skipped[name] = f"its weight is empty ({w.shape[0]}x{w.shape[1]}): nothing to compress"
            continue
        tied = [o for o in owners.get(id(w), []) if o != f"{name}.weight"]
        heads = [o.rpartition(".")[0] for o in tied]
        # LM heads tied to the table become its tied MPO head: plain nn.Linear ones, as _tied_heads swaps (a
        # subclass stayed dense on the old Parameter, untied), and not one the caller excluded
        if emb and all(type(model.get_submodule(h)) is nn.Linear for h in heads):
            if any(_matches(h, config.exclude) for h in heads):
                skipped[name] = (f"its tied head {', '.join(heads)} is excluded, and compressing the table "
                                 f"compresses the head it shares its weight with")
                warn_user(f"compress: skipping {name}: {skipped[name]} (exclude the table too to silence this)")
                continue
            tied = []
        if tied:
            skipped[name] = f"weight is tied to {', '.join(tied)}; compressing it would untie them"
            if emb or not any(isinstance(model.get_submodule(h), nn.Embedding) for h in heads):
                # an LM head tied to its embedding is the usual case (the report lists it); two tied layers, or a
                # table shared by several embeddings (T5's encoder / decoder embed_tokens), are not
                warn_user(f"compress: skipping {name}: {skipped[name]} (the budget applies to the other layers)")
            continue
        if w.is_meta:
            raise ValueError(f"compress: {name}.weight is on the meta device (no values to factor); materialize the "
                             f"model first (e.g. load its weights, or model.to_empty(device='cpu') and load_state_dict)")
        bias = getattr(mod, "bias", None)
        for what, t in (("weight", w), ("bias", bias)):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                # a broken model: its outputs are NaN whatever compress does, and a NaN bias would report errors of 0
                raise ValueError(f"compress: {name}.{what} contains NaN or inf ({int((~torch.isfinite(t)).sum())} "
                                 f"entries): fix or reload the model first (exclude= leaves a layer out)")
        W = dense_weight(mod)
        smallest, what = math.inf, []
        if "mpo" in config.forms:
            out_f, in_f = layer_factors(W.shape[0], W.shape[1], config.num_cores)
            smallest = mpo_params([o * i for o, i in zip(out_f, in_f)], [1] * (len(out_f) - 1))
            what.append(f"{len(out_f)}-core MPO")
        if "lowrank" in config.forms:  # a rank-1 pair; the number of cores does not matter
            smallest = min(smallest, W.shape[0] + W.shape[1])
            what.append("low-rank pair")
        if smallest >= W.numel():
            skipped[name] = f"no {' or '.join(what)} of a {W.shape[0]}x{W.shape[1]} matrix is smaller than it"
            continue
        targets[name] = mod
    _warn_selectors(model, config)
    _warn_fused(model, config)
    if not targets and isinstance(model, nn.RNNBase):
        pass  # a bare recurrent module: unroll's warning says why (not "none matched")
    elif not targets:
        done = [n for n, m in model.named_modules() if isinstance(m, (MPOLinear, LowRankLinear, MPOEmbedding))
                and (config.target_modules is None or _matches(n, config.target_modules))
                and not _matches(n, config.exclude)]
        why = skipped or (f"the {len(done)} selected layers are compressed already" if done else "none matched")
        log.warning("compress: no layer to compress (skipped: %s)", why)
    elif config.embeddings and not any(isinstance(m, nn.Embedding) for m in targets.values()):
        tables = [n for n in skipped if isinstance(model.get_submodule(n), nn.Embedding)]
        warn_user("compress: embeddings=True, but no nn.Embedding table is compressed: " + (
            f"every selected one was skipped ({', '.join(tables[:3])}{', ...' if len(tables) > 3 else ''}; the report "
            f"says why)" if tables else "none is selected (target_modules / exclude)"))
    for name, why in skipped.items():
        log.info("compress: skipping %s: %s", name, why)
    return targets, skipped


def layer_factors(out_features: int, in_features: int, num_cores: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """:func:`~bondgate.factorize_shape` with at most as many cores as the larger side has legs above 1 at
    ``num_cores`` (at least 2): more cores would only add legs of 1 on both sides."""
    legs = max(sum(f > 1 for f in choose_factors(n, num_cores)[1]) for n in (out_features, in_features))
    return factorize_shape(out_features, in_features, max(2, min(num_cores, legs)))


def _warn_fused(model: nn.Module, config: CompressionConfig) -> None:
    """Weights held as 3-D parameters outside any layer (transformers 5's fused MoE experts, ``(experts, out, in)``)
    are not linear layers, so nothing selects them: say so rather than leave them dense unseen."""
    # (not convolutions or nn.Bilinear; a size-1 axis is a broadcast vector: ViT's cls token, RWKV's time mixing)
    others = (nn.modules.conv._ConvNd, nn.Bilinear)
    fused = [f"{n + '.' if n else ''}{p} {tuple(t.shape)}" for n, m in model.named_modules()
             if not isinstance(m, others) and "parametrizations" not in n.split(".")
             and (config.target_modules is None or _matches(n, config.target_modules))
             and not _matches(n, config.exclude)
             for p, t in m._parameters.items()
             if t is not None and not isinstance(t, nn.parameter.UninitializedParameter) and t.dim() == 3
             and min(t.shape) > 1 and t.is_floating_point()]
    if fused:
        warn_user(f"compress: {len(fused)} weight(s) are 3-D parameters, not linear layers ({_short_list(fused, 3)}: "
                  f"fused experts of a mixture-of-experts model?): compress does not factor them, they stay dense and "
                  f"outside the report's totals")


def _warn_selectors(model: nn.Module, config: CompressionConfig) -> None:
    """A selector entry that matches no module is likely a typo; a list entry naming a container selects nothing
    (a list names layers, not subtrees)."""
    modules = dict(model.named_modules(remove_duplicate=False))  # a shared layer's every name
    for option in ("target_modules", "exclude"):
        sel = getattr(config, option)
        if sel is None:
            continue
        entries = [sel] if isinstance(sel, str) else list(sel)
        if not entries and option == "target_modules":
            warn_user("compress: target_modules=[] selects no layer: nothing is compressed (None selects every "
                      "linear layer)")
        unmatched = [e for e in entries if not any(_matches(n, e if isinstance(sel, str) else [e]) for n in modules if n)]
        if unmatched:
            warn_user(f"compress: {option} {unmatched if not isinstance(sel, str) else repr(sel)} match"
                      f"{'es' if isinstance(sel, str) else ''} no module of the model")
        layer_types = (nn.Linear, nn.Embedding, nn.RNNBase, Recurrent, MPOLinear, LowRankLinear, MPOEmbedding)
        if isinstance(sel, str):  # a regex that names only containers selects nothing inside them
            hits = [(n, m) for n, m in modules.items() if n and _matches(n, sel)]
            if hits and not any(isinstance(m, layer_types) or is_conv1d(m) for _, m in hits):
                shown = ", ".join(f"{n} ({type(m).__name__})" for n, m in hits[:4])
                inside = re.escape(hits[0][0]) + r"\..*"
                warn_user(f"compress: {option} {sel!r} matches only modules that are not layers: {shown}; a regex "
                          f"must match a layer's full name ('{inside}' selects the layers inside {hits[0][0]})")
            continue
        containers = sorted({f"{e} ({type(m).__name__})" for e in entries for n, m in modules.items()
                             if n and _matches(n, [e]) and not isinstance(m, layer_types) and not is_conv1d(m)})
        if containers:
            warn_user(f"compress: {option} entries name modules that are not layers: {', '.join(containers[:4])}; "
                      "a list selects layers by name or dotted suffix, not what is inside a module: list the "
                      r"layers, or give a regex such as 'encoder\.layer\.0\..*'")


# ---------------------------------------------------------------------------------------------- compress
@dataclass
class _Work:
    name: str
    module: nn.Module
    bias: torch.Tensor | None
    out_f: tuple[int, ...]
    in_f: tuple[int, ...]
    stats: InputStats | None = None
    S_inv: list[torch.Tensor] | None = None
    exact: MPO | None = None  # canonical MPO of the (whitened, padded) weight
    svd: tuple | None = None  # SVD of the covariance-whitened weight, for low-rank forms (_whitened_svd)
    weight: float = 1.0
    counts: torch.Tensor | None = None  # a table's id frequencies over the calibration data
    legs: list[torch.Tensor] | None = None  # a table's row weights (see bondgate.embedding.row_weight_legs)
    kept: torch.Tensor | None = None  # a table's kept ids (exact rows)
    held: torch.Tensor | None = None  # W during the layer's turn (see _turns)
    held_cov: torch.Tensor | None = None  # cov during the layer's turn
    fused: bool = False  # a Recurrent's matrix: torch's fused kernel runs its dense weight at inference, any form

    @property
    def is_embedding(self) -> bool:
        return isinstance(self.module, nn.Embedding)

    @property
    def W(self) -> torch.Tensor:
        """``(out, in)`` float64 on the CPU, read from the layer when asked (held only during its turn): kept for
        every layer at once, these copies were twice an fp32 model (0.35 GB a layer at LLaMA widths)."""
        return self.held if self.held is not None else dense_weight(self.module).to(torch.float64).cpu()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(dense_weight(self.module).shape)

    @property
    def numel(self) -> int:
        return dense_weight(self.module).numel()

    @property
    def cov(self) -> torch.Tensor | None:
        """The input covariance the weight is fitted on: centered with a bias (its re-fit absorbs the mean), the
        second moment without one (computed when read: held during the layer's turn)."""
        if self.stats is None:
            return None
        if self.held_cov is not None:
            return self.held_cov
        return self.stats.cov if self.bias is not None else self.stats.second

    def table_target(self) -> torch.Tensor:
        return table_target(self.W, self.out_f, self.in_f, self.legs, self.kept)

    def weight_error(self, W_hat: torch.Tensor) -> float:
        """``||W - W_hat|| / ||W||``: the relative error of the weight the layer gets."""
        W = self.W
        return float(torch.linalg.norm(W - W_hat) / torch.linalg.norm(W).clamp_min(1e-300))

    def refit_bias(self, W_hat: torch.Tensor) -> torch.Tensor | None:
        """The bias with the output's mean shift ``(W - W_hat) mu`` over the calibration rows absorbed."""
        if self.bias is None or self.stats is None:
            return self.bias
        return self.bias + (self.W - W_hat) @ self.stats.mean

    def whitened_padded(self, S: list[torch.Tensor] | None) -> torch.Tensor:
        Np, Mp = math.prod(self.out_f), math.prod(self.in_f)
        Wp = torch.nn.functional.pad(self.W, (0, Mp - self.shape[1], 0, Np - self.shape[0]))
        return Wp if S is None else apply_leg_maps(Wp, S, self.in_f)


@outside_inference_mode  # inside inference mode the refinement's autograd and trainable new layers are impossible
def compress(model: nn.Module, config: CompressionConfig, calibration: Iterable | None = None,
             progress: bool = True) -> nn.Module:
    """Replace the targeted dense layers of ``model`` by MPO layers (or low-rank pairs, see
    :class:`CompressionConfig`'s ``kinds``), in place; returns ``model``.

    ``calibration``: optional iterable of model inputs (tensors, tuples, or dicts of keyword arguments
    such as tokenized batches; a tuple is passed as positional arguments, so give inputs without labels; a
    single tensor is one batch); a few hundred rows per layer are enough. The report is attached as
    ``model.bondgate_report``.

    Targeted ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` modules (selected by their own name or their projections'
    names, see :mod:`bondgate.recurrent`) become :class:`~bondgate.Recurrent` modules whose weight matrices
    (``lstm.ih_l0``, ``lstm.hh_l0`` ...) are compressed like any linear layer; one whose matrices all stay dense
    is given back as torch's module (its rows then read ``lstm.weight_ih_l0`` ...).

    On a model already compressed, the targets are the layers still dense: a second ``compress`` with
    ``param_ratio=0.5`` halves those again (0.484 of the weights -> 0.288 on a small MLP); the factored layers
    are left as they are (to go smaller, compress the dense model again at the smaller ratio).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} (load it first, e.g. with "
                        f"transformers' from_pretrained; the CLI's `bondgate compress` takes a path)")
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
    config.__post_init__()  # checked again: a field set after construction (config.param_ratio = 3.0) was not
    if isinstance(model, (nn.Linear, nn.Embedding)) or is_conv1d(model):  # (a bare LSTM: a warning names the way)
        # in place means in a parent: a bare layer cannot replace itself (it came back unchanged, ratio 1.0)
        raise ValueError(f"compress replaces layers inside a model; this is a bare {type(model).__name__}: wrap it "
                         f"(nn.Sequential(layer)) or build the layer directly (MPOLinear.from_linear, "
                         f"MPOEmbedding.from_embedding)")

    def selected(name: str, projections: list[str]) -> bool:
        if _matches(name, config.exclude):
            return False
        return config.target_modules is None or any(_matches(n, config.target_modules) for n in (name, *projections))

    converted, rnn_skipped = unroll(model, selected)
    try:
        _compress(model, config, calibration, progress, rnn_skipped)
    except BaseException:
        reroll(model, converted, force=True)
        raise
    back = reroll(model, converted)
    for row in model.bondgate_report.layers:
        parent, _, child = row.name.rpartition(".")
        if parent in back:
            row.name, row.kind = f"{parent}.weight_{child}", type(converted[parent]).__name__
    return model


def _compress(model: nn.Module, config: CompressionConfig, calibration: Iterable | None, progress: bool,
              extra_skipped: dict[str, str]) -> None:
    if progress:
        from tqdm.auto import tqdm

    targets, skipped = find_targets(model, config)
    skipped.update(extra_skipped)
    report = CompressionReport(config=config.to_dict(), flop_rows=config.deploy_rows)
    names = module_names(model)
    data = as_batches(calibration, "compress") if (calibration is not None and config.calibrate) else None
    if data is not None and not data:
        raise ValueError("calibration data is empty")

    linear = {n: m for n, m in targets.items() if not isinstance(m, nn.Embedding)}  # embeddings' input: token ids
    stats = (collect_input_stats(model, linear, data, config.max_calibration_rows, progress, unseen="skip")
             if data and linear else {})
    unseen = [n for n in linear if data and n not in stats]
    if unseen and len(unseen) == len(linear) and all(t.numel() == 0 for b in data for t in _tensors(b)):
        raise ValueError(f"the calibration batches hold no rows (first batch: "
                         f"{_short_list([str(tuple(t.shape)) for t in _tensors(data[0])])}): give real inputs, a few "
                         f"hundred rows in all")
    if unseen and len(unseen) == len(linear):
        raise ValueError(f"no targeted layer ran on the calibration data ({_short_list(unseen)}): is it the model's "
                         f"input (the batches are passed to model(...))?")
    for n in unseen:
        # a layer whose forward never ran: the model reads its weight directly (Mamba's dt_proj: weight @ x;
        # MobileBERT's head: weight.t()), the data never reached it (an expert no token was routed to), or it is
        # unused; factored, a weight read directly would fail at its next use (no dense weight)
        skipped[n] = ("its forward never ran on the calibration data (the model reads its weight directly, the data "
                      "never reached it, or it is unused): left dense")
        del linear[n], targets[n]
    if unseen:
        warn_user(f"compress: skipping {len(unseen)} layer(s) whose forward never ran on the calibration data "
                  f"({_short_list(unseen, 3)}): the model reads their weight directly, the data never reached them, "
                  f"or they are unused; left dense")
    _check_stats(stats, {n: getattr(m, "bias", None) is not None for n, m in linear.items()})
    tables = {n: m for n, m in targets.items() if isinstance(m, nn.Embedding)}
    token_counts = collect_token_counts(model, tables, data, progress) if data and tables else {}
    for n, m in list(tables.items()) if config.embedding_rows else ():
        if m.num_embeddings <= config.embedding_rows:  # every row kept exactly: factors would only add weights
            skipped[n] = f"embedding_rows={config.embedding_rows} would keep all its {m.num_embeddings} rows"
            del tables[n], targets[n]
    if config.embedding_rows and tables:
        if not token_counts:
            raise ValueError("embedding_rows needs calibration data with calibrate=True (it keeps the most frequent "
                             "ids' rows)")
        tied = [n for n, m in tables.items() if _tied_heads(model, m)]
        if tied:
            raise ValueError(f"embedding_rows cannot keep rows of {', '.join(tied)}: tied to an LM head, whose MPO "
                             "head would miss them (exclude the table or set embedding_rows=0)")
    sens = {}
    if not data and linear and config.layer_weighting == "sensitivity":
        raise ValueError("layer_weighting='sensitivity' needs calibration data with calibrate=True (the sensitivities "
                         "are measured on it)")
    if data and linear and config.layer_weighting == "sensitivity" and config.param_ratio is not None \
            and config.allocation == "global":
        sens = layer_sensitivity(model, linear, data[: max(1, min(len(data), 8))])

    works: list[_Work] = []
    recurrent = {n for n, m in model.named_modules() if isinstance(m, Recurrent)}
    for name, mod in targets.items():
        W = dense_weight(mod)
        if isinstance(mod, nn.Embedding):
            out_f, in_f = table_factors(W.shape[0], W.shape[1], config.num_cores, config.embedding_form)
        else:
            out_f, in_f = layer_factors(W.shape[0], W.shape[1], config.num_cores)
        b = getattr(mod, "bias", None)
        works.append(_Work(name, mod, None if b is None else b.detach().to(torch.float64).cpu(), out_f, in_f,
                           stats.get(name), weight=sens.get(name, 1.0), fused=name.rpartition(".")[0] in recurrent))
        counts = token_counts.get(name)
        pad = getattr(mod, "padding_idx", None)
        if counts is not None and pad is not None and not bool(W[pad].any()):
            counts = counts.clone()  # the padding row is masked to zero in every lookup: neither fitted nor kept
            counts[pad] = 0
        if counts is not None:
            works[-1].counts, works[-1].legs = counts, row_weight_legs(counts, out_f)
            if config.embedding_rows:
                kept = most_frequent(counts, min(config.embedding_rows, W.shape[0]))
                works[-1].kept = kept if kept.numel() else None

    widths: dict[str, Choice] = {}
    bar = (lambda it, desc: tqdm(it, desc=desc, leave=False)) if progress else (lambda it, desc: it)
    cost = config.cost_budget
    times: dict[str, KindTimes] = {}
    if config.param_ratio is not None:
        if config.allocation == "global" and cost is not None and all(w.is_embedding for w in works):
            raise ValueError("a time or FLOP budget needs linear layers among the targets")
        menu_of: dict[str, LayerMenu] = {}
        for w in _turns(works, bar, "decompose"):
            w.exact = _exact(w, config)
            if "lowrank" in config.forms and not w.is_embedding:
                w.svd = _whitened_svd(w, config.damping)
            if config.allocation == "global":
                menu_of[w.name] = _menu(w, config, cost, times)
                # factored again at the layer's turn below: every layer's full-rank MPO held at once was ~0.4 GB a
                # layer at LLaMA widths (the time: ~2% of compress)
                w.exact = None
        # tables and linear layers are allocated separately (see CompressionConfig.embedding_ratio), under either
        # allocation; a table's kept rows count against its group's budget
        e_ratio = config.param_ratio if config.embedding_ratio is None else config.embedding_ratio
        groups = [(g, r) for g, r in (([w for w in works if not w.is_embedding], config.param_ratio),
                                      ([w for w in works if w.is_embedding], e_ratio)) if g]

        def kept_weights(group: list[_Work]) -> int:  # the exact rows kept from the tables (embedding_rows)
            return sum(w.kept.numel() * w.shape[1] for w in group if w.kept is not None)

        def group_budget(group: list[_Work], ratio: float) -> int:
            kept = kept_weights(group)
            budget = int(ratio * sum(w.numel for w in group)) - kept
            if kept and budget <= 0:
                raise ValueError(f"embedding_rows={config.embedding_rows} kept rows take the tables' whole budget: "
                                 "raise embedding_ratio or keep fewer rows")
            return budget
        def below_floor(group: list[_Work], ratio: float, floor: int, smallest: str) -> None:
            """Refuse a ratio whose budget is below ``floor`` weights (``smallest``: what takes them), naming it and
            a ratio that reaches the floor."""
            total, kept = sum(w.numel for w in group), kept_weights(group)
            name = "embedding_ratio" if group[0].is_embedding and config.embedding_ratio is not None else "param_ratio"
            rows = f", {kept:,} of them the kept rows'" if kept else ""
            raise ValueError(f"{name}={ratio:g} ({group_budget(group, ratio) + kept:,} of {total:,} weights{rows}) is "
                             f"below {smallest} ({floor:,} weights{' besides the kept rows' if kept else ''}): give "
                             f"at least {_round_up((floor + kept) / total):g}")

        if config.allocation == "global":
            for group, ratio in groups:
                gm = [menu_of[w.name] for w in group]
                cost_budget = None
                what = ("max_latency_ratio", "time") if cost and cost[0] == "time" else ("flops_ratio", "FLOPs")
                if cost is not None and not group[0].is_embedding:
                    dense_cost = sum(m.costs[0] for m in gm)  # entry 0 of every menu: stay dense
                    cost_budget = cost[1] * dense_cost
                    if cost_budget <= 0:
                        raise ValueError("a time or FLOP budget needs linear layers among the targets")
                    least = sum(min(m.costs) for m in gm) / dense_cost
                    if least > cost[1]:
                        fused = [w.name for w in group if w.fused]
                        raise ValueError(f"{what[0]}={cost[1]:g} is out of reach: the cheapest forms of these layers "
                                         f"(kinds={list(config.forms)}) take {least:.4g} of the dense layers' "
                                         f"{what[1]} at deploy_rows={config.deploy_rows}" + (
                                             " (no form is cheaper than dense there)" if least >= 1 else "") +
                                         f"; give at least {_round_up(least):g}" + (
                                             ", or more kinds" if set(config.forms) != {"mpo", "lowrank"} else "") + (
                                             f" (the matrices of recurrent layers — {_short_list(fused, 3)} — run "
                                             f"dense in torch's fused kernel whatever their form: no budget of "
                                             f"{what[1]} is bought there)" if fused else ""))
                budget = group_budget(group, ratio)
                floor = sum(min(m.params) for m in gm)
                if budget < floor:  # (allocate says it in weights; here it is said as the ratio that reaches it)
                    below_floor(group, ratio, floor, "the smallest factored forms of these layers")
                try:
                    picks = allocate(gm, budget, cost_budget)
                except BudgetConflict as exc:  # each budget alone is within reach, not both as found (never broken)
                    raise ValueError(f"{what[0]}={cost[1]:g} and param_ratio={ratio:g}: no choice found meets both; "
                                     f"within the weights, the forms found take {exc.least / dense_cost:.4g} of the dense "
                                     f"layers' {what[1]} at deploy_rows={config.deploy_rows}; give a larger "
                                     f"param_ratio or {what[0]}") from exc
                for w, wid in zip(group, picks):
                    widths[w.name] = list(wid) if isinstance(wid, tuple) else wid
        else:
            for group, ratio in groups:
                capped = [w for w in group if w.exact is not None]
                pairs = [w for w in group if w.exact is None]  # kinds=("lowrank",): each the same share of its weights
                for w in pairs:
                    m, n = w.shape
                    # at least rank 1 (a tiny budget must not leave the layer dense); dense where it saves nothing
                    rank = max(1, int(ratio * m * n // (m + n)))
                    widths[w.name] = rank if rank * (m + n) < m * n else None
                kept = sum(w.numel if widths[w.name] is None else widths[w.name] * sum(w.shape) for w in pairs)
                if pairs and kept > group_budget(pairs, ratio):
                    total = sum(w.numel for w in pairs)
                    raise ValueError(f"param_ratio={ratio:g} is out of reach for low-rank pairs: rank 1 (or dense where "
                                     f"a pair saves nothing) keeps {kept:,} of these layers' {total:,} weights; give "
                                     f"at least {math.ceil(kept / total * 1e4) / 1e4:g}")
                spectra = [LayerSpectrum([o * i for o, i in zip(w.out_f, w.in_f)], w.exact.bond_spectra or [],
                                         w.weight, w.numel) for w in capped]
                if spectra:
                    try:
                        picked = uniform_widths(spectra, group_budget(capped, ratio))
                    except BudgetTooSmall as exc:  # as the global path words it: the ratio and one that works
                        below_floor(capped, ratio, exc.floor, "bond 1 on every layer")
                    for w, wid in zip(capped, picked):
                        widths[w.name] = wid

    head_times: dict[int, tuple] = {}  # a tied MPO head's (µs, dense µs) as policy "auto" timed it
    for w in _turns(works, bar, "compress"):
        wid = widths.get(w.name, [])
        if config.param_ratio is not None and wid is None:
            flops = 2 * report.flop_rows * w.numel
            row = LayerReport(w.name, type(w.module).__name__, w.shape[0], w.shape[1],
                              status="kept dense (budget)", params_before=w.numel,
                              params_after=w.numel, form="dense", flops_dense=flops, flops_mpo=flops)
            report.layers.append(row)
            if cost is not None and not w.is_embedding:  # its time counts in the budget's totals
                ref = w.module.weight
                row.time_us = row.time_dense_us = calibrate_dense(*w.shape, config.deploy_rows, ref.dtype,
                                                                  ref.device) * 1e6
                if w.name in times:
                    row.time_pred_us = 1e6 * times[w.name].dense_s
            if config.quantize is not None and not w.is_embedding:  # bytes follow the weight budget
                row.status, row.quant = f"kept dense (budget), {config.quantize}", config.quantize
                layer, W_hat, bias = _dense_quantized(w, config.quantize)
                row.output_error = _layer_report(w, None, W_hat, bias, report.flop_rows).output_error
                row.weight_error = layer.error = w.weight_error(W_hat)
                if row.time_us is not None:  # the int8 layer it became, not the dense one
                    row.time_us = measure(layer, config.deploy_rows) * 1e6
                swap_module(model, w.module, names, layer)
            continue
        ref = w.module.weight
        if w.is_embedding:
            layer, row = _build_embedding(model, w, wid, config, report.flop_rows, names, head_times)
            report.layers.append(row)
            continue
        pair = isinstance(wid, int)  # a low-rank pair of rank wid (else MPO bonds, or None: max_bond / tol)
        if pair and config.quantize is None:
            layer, W_hat, bias = _build_lowrank(w, wid)
            row = _lowrank_report(w, layer.rank, layer.error, W_hat, bias, report.flop_rows)
        else:
            # an int8 pair is a rank-form MPO: two cores (out, 1) x (1, in), the bond its rank
            cores = rank_cores(*_pair_factors(w, wid)) if pair else _mpo_cores(w, wid, config)
            # on the grid of the layer's dtype: the errors and the bias re-fit are those of the cores it gets
            mpo = MPO([c.to(ref.dtype).to(torch.float64) for c in cores], w.shape[0], w.shape[1])
            if config.quantize is not None:  # on the grid of the layer's dtype: the errors and bias re-fit include it
                mpo = MPO([fake_quant(c.to(ref.dtype)).to(torch.float64) for c in mpo.cores], *w.shape)
            W_hat = mpo.to_matrix()
            bias = w.refit_bias(W_hat)
            mpo.error = w.weight_error(W_hat)
            mpo.error_exact = True
            layer = MPOLinear.from_mpo(mpo.to(dtype=ref.dtype, device=ref.device),
                                       None if bias is None else bias.to(dtype=ref.dtype, device=ref.device),
                                       policy=_plan_policy(config))
            layer.quantize_(config.quantize)
            row = _lowrank_report(w, wid, mpo.error, W_hat, bias, report.flop_rows) if pair else \
                _layer_report(w, mpo, W_hat, bias, report.flop_rows)
            row.quant = config.quantize
            if config.policy == "auto":
                policy, mpo_us, row.time_dense_us = _auto_policy(layer, config.deploy_rows)
                layer.policy = _plan_policy(config, policy)
                row.time_us = _run_us(policy, mpo_us, row.time_dense_us)
            row.policy = "speed" if layer.policy.cache_dense else "memory"
        layer = layer.to(dtype=ref.dtype, device=ref.device)
        freeze_like(trains(w.module), layer)
        if isinstance(layer, MPOLinear):  # the plan it runs (speed mode's dense weight, a cached merge), not the MPO's least
            row.flops_mpo = layer.flops(report.flop_rows)
        if cost is not None:  # a time or FLOP budget: measure what the budget bought
            row.time_us = measure(layer, config.deploy_rows) * 1e6
            row.time_dense_us = calibrate_dense(*w.shape, config.deploy_rows, ref.dtype, ref.device) * 1e6
            if w.name in times:  # as the budget priced it (_price's functions on the layer's menu)
                menu = menu_of[w.name]
                row.time_pred_us = 1e6 * (menu.rank_cost(wid) if pair else menu.cost_of(wid))
        if w.fused:  # what runs at inference: the dense weight, in torch's fused kernel
            row.flops_mpo = row.flops_dense
            row.time_us = row.time_dense_us
        swap_module(model, w.module, names, layer)
        row.aliases = names[id(w.module)][1:]
        report.layers.append(row)
    if cost is not None and cost[0] == "time":
        t, td = report.measured_times()
        if td > 0 and t > 1.1 * cost[1] * td:  # the budget holds for predicted times: say when measured ones differ
            warn_user(f"compress: max_latency_ratio={cost[1]:g}, but the compressed layers measured "
                      f"{t / td:.2f}x the dense layers' time at deploy_rows={config.deploy_rows} (predicted "
                      f"times, which the budget holds, are in the report's µs column); a loaded machine or a "
                      f"cost model fitted on another one moves them")
    grown = [r for r in report.layers if r.params_after > r.params_before]
    if grown and config.param_ratio is None:  # max_bond / tol set no size budget: say when they buy nothing
        budget = f"max_bond={config.max_bond}" if config.max_bond is not None else f"tol={config.tol}"
        warn_user(f"compress: at {budget}, {len(grown)} layer(s) hold more weights than dense ("
                  + ", ".join(f"{r.name}: {r.params_before:,} -> {r.params_after:,}" for r in grown[:3])
                  + (", ..." if len(grown) > 3 else "") + "); give a smaller budget or param_ratio")
    heads = []
    for name, why in skipped.items():
        mod = model.get_submodule(name)
        tied_head = isinstance(mod, MPOLinear) and why.startswith("weight is tied")
        if tied_head:
            why = "tied to a compressed embedding: its MPO head shares the table's cores"
        w = getattr(mod, "weight", None)
        n = w.numel() if isinstance(w, torch.Tensor) and not tied_head else 0  # (the table's weights, counted there)
        out_f, in_f = _shape(mod)
        row = LayerReport(name, type(mod).__name__, out_f, in_f, status=f"skipped: {why}", params_before=n,
                          params_after=n, form="mpo" if isinstance(mod, MPOLinear) else "dense")
        if tied_head:  # it runs (a vocabulary-wide product, often the costliest call of a small LM): its cost shown
            row.flops_dense, row.flops_mpo = 2 * report.flop_rows * out_f * in_f, mod.flops(report.flop_rows)
            row.policy = "speed" if mod.policy.cache_dense else "memory"
            row.time_us, row.time_dense_us = head_times.get(id(mod), (None, None))
            heads.append(row)
        report.layers.append(row)
    if heads and cost is not None:  # the budgets price the layers they allocate; a tied head follows its table
        warn_user(f"compress: the {'FLOPs' if cost[0] == 'flops' else 'time'} budget leaves out the head(s) tied to "
                  f"the compressed table ({', '.join(f'{r.name}: {r.flops_mpo / r.flops_dense:.2f}x its dense FLOPs' for r in heads)} "
                  f"at deploy_rows={config.deploy_rows}): their MPO shares the table's cores, sized by the weight "
                  f"budget; see the report's rows")
    previous = getattr(model, "bondgate_report", None)
    if isinstance(previous, CompressionReport):  # compressing again: the layers compressed before stay reported
        now = {r.name for r in report.layers}
        kept = [r for r in previous.layers if r.name not in now]
        if previous.flop_rows != report.flop_rows:  # one row count in the table: theirs was another deploy_rows
            for r in kept:
                _at_rows(r, model, previous.flop_rows, report.flop_rows)
        report.layers = kept + report.layers
        report.history = [*previous.history, previous.config]
    model.bondgate_report = report
    from .hf import attach, warn_int8_saving

    attach(model)  # a transformers model: config.quantization_config records the layers for save_pretrained
    if config.quantize is not None:
        warn_int8_saving(model)


def swap_module(model: nn.Module, old: nn.Module, names: dict[int, list[str]], layer: nn.Module) -> None:
    """Put ``layer`` in the place of ``old`` under every name it has (a shared layer stays one layer), in ``old``'s
    mode and with its hooks."""
    layer.train(old.training)
    carry_hooks(old, layer)
    for name in names[id(old)]:
        model.set_submodule(name, layer)


def _dense_quantized(w: _Work, mode: str) -> tuple[MPOLinear, torch.Tensor, torch.Tensor | None]:
    """A layer kept dense, quantized: a one-core MPO layer (per-output-channel scales), bias re-fit to the mean
    shift of the output as for a compressed layer; with its weight and bias (float64) for the report's errors."""
    ref = w.module.weight
    core = fake_quant(w.W.reshape(1, *w.shape, 1).to(ref.dtype)).to(torch.float64)
    bias = w.refit_bias(core[0, :, :, 0])
    mpo = MPO([core], *w.shape)
    layer = MPOLinear.from_mpo(mpo.to(dtype=ref.dtype, device=ref.device),
                               None if bias is None else bias.to(dtype=ref.dtype, device=ref.device), policy="memory")
    layer.quantize_(mode)
    freeze_like(trains(w.module), layer)
    return layer, core[0, :, :, 0], bias


def _whitened_svd(w: _Work, damping: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(P, s, Qh, C_isqrt)``: the SVD of the weight whitened by its damped input covariance,
    ``W (C + d I)^(1/2) = P s Qh`` with ``d = damping * mean(diag C)`` (plain ``W`` without calibration;
    ``C_isqrt`` then None). Its rank-``k`` truncation, un-whitened, is the rank-``k`` layer with the least output
    error in that damped metric (Eckart-Young), and ``sum_{i >= k} s_i^2`` is that error: the low-rank menu's
    entries are exact in the damped metric. The ridge keeps the weight's directions the calibration inputs do not
    excite; it counts them too, so the error on the calibration inputs themselves is lower (by ~1-6% with a
    full-rank covariance at the default damping, far more with a rank-deficient one)."""
    if w.cov is None:
        P, s, Qh = torch.linalg.svd(w.W, full_matrices=False)
        return P, s, Qh, None
    C = w.cov
    evals, evecs = torch.linalg.eigh(damped(C, damping))
    # a floor relative to the largest: without damping, a rank-deficient covariance (fewer calibration rows than
    # inputs) has eigenvalues of rounding noise, whose inverse square roots would amplify that noise into V
    evals = evals.clamp_min(float(evals.max()) * 1e-12)
    sqrt, isqrt = (evecs * evals.sqrt()) @ evecs.T, (evecs * evals.rsqrt()) @ evecs.T
    P, s, Qh = torch.linalg.svd(w.W @ sqrt, full_matrices=False)
    return P, s, Qh, isqrt


def _mpo_cores(w: _Work, widths: list[int] | None, config: CompressionConfig) -> list[torch.Tensor]:
    """The float64 cores of a layer's MPO: its canonical MPO cut to ``widths`` (a ``param_ratio`` budget's) or TT-SVD at
    ``max_bond`` / ``tol``, whitened by its inputs where calibrated (and refined, with ``refine_steps``)."""
    if config.param_ratio is not None:
        mpo_w = (w.exact if w.exact is not None else _exact(w, config)).truncate(max_bond=list(widths))
    else:
        S = None
        if w.cov is not None:
            S, w.S_inv = kron_whiteners(w.cov, w.in_f, config.damping)
        mpo_w = MPO.from_matrix(w.whitened_padded(S), in_factors=w.in_f, out_factors=w.out_f,
                                max_bond=config.max_bond, tol=config.tol)
    cores = mpo_w.cores if w.S_inv is None else fold_into_cores(mpo_w.cores, w.S_inv)
    if w.cov is not None and config.refine_steps > 0:
        # on the ridge _whitened_svd uses: with fewer rows than inputs, the raw covariance is overfitted
        cores, _, _ = refine_cores(cores, w.W, damped(w.cov, config.damping), w.shape[0], w.shape[1],
                                   config.refine_steps)
    return cores


def _pair_factors(w: _Work, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` float64, ``(out, rank)`` and ``(rank, in)``: the rank-``rank`` cut of :func:`_whitened_svd` with
    ``sqrt(s)`` in both factors (neither carries all the scale: per-row int8 scales of both stay fine)."""
    P, s, Qh, isqrt = w.svd
    root = s[:rank].sqrt()
    U, V = P[:, :rank] * root, root[:, None] * Qh[:rank]
    return U, (V if isqrt is None else V @ isqrt)


def _build_lowrank(w: _Work, rank: int) -> tuple[LowRankLinear, torch.Tensor, torch.Tensor | None]:
    """The rank-``rank`` layer of :func:`_pair_factors`, its matrix and bias (the mean shift of the output absorbed,
    as for an MPO)."""
    U, V = _pair_factors(w, rank)
    ref = w.module.weight
    U, V = U.to(ref), V.to(ref)
    W_hat = U.to(torch.float64) @ V.to(torch.float64)  # the factors the layer gets (a 16-bit grid): their errors
    bias = w.refit_bias(W_hat)
    layer = LowRankLinear.from_factors(U, V, None if bias is None else bias.to(ref))
    layer.error = w.weight_error(W_hat)
    return layer, W_hat, bias


def _exact(w: _Work, config: CompressionConfig) -> MPO | None:
    """The canonical MPO of the layer's weight (whitened by its inputs where calibrated, zero-padded; a table's
    row-weighted target), ``None`` where only low-rank forms are allowed; sets ``w.S_inv``."""
    S = None
    if w.cov is not None:
        S, w.S_inv = kron_whiteners(w.cov, w.in_f, config.damping)
    if w.is_embedding:
        return MPO.from_matrix(w.table_target(), in_factors=w.in_f, out_factors=w.out_f)
    if "mpo" in config.forms:
        return MPO.from_matrix(w.whitened_padded(S), in_factors=w.in_f, out_factors=w.out_f)
    return None


def _menu(w: _Work, config: CompressionConfig, cost, times: dict[str, KindTimes]) -> LayerMenu:
    """The global allocation's menu of one layer (its MPO truncations and low-rank pairs, weighted, priced)."""
    menu = tolerance_menu(w.exact, w.numel) if w.exact is not None else None
    if w.svd is not None:
        low = lowrank_menu(w.svd[1], *w.shape)
        menu = low if menu is None else menu.extend(low)
    # the squared norm of the whitened weight: the relative weighting's unit
    norm_sq = (float(w.svd[1].square().sum()) if w.svd is not None
               else float((w.exact.bond_spectra[0] ** 2).sum()) if w.exact.bond_spectra else 1.0)
    menu.weight = {"relative": 1.0 / max(norm_sq, 1e-300), "absolute": 1.0,
                   "sensitivity": w.weight}[config.layer_weighting]
    if cost is not None and w.is_embedding:
        menu.costs = [0.0] * len(menu.params)  # a lookup: outside the time/FLOP budget
        menu.cost_of = lambda widths: 0.0
    elif cost is not None:
        if cost[0] == "time":
            times[w.name] = _kind_times(w, config)
        _price(menu, w, config, times.get(w.name))
    return menu


def _kind_times(w: _Work, config: CompressionConfig) -> KindTimes:
    ref = w.module.weight
    full = w.exact.bond_dims if w.exact is not None else full_widths(w.out_f, w.in_f)
    return calibrate(w.shape[0], w.shape[1], w.out_f, w.in_f, full, config.deploy_rows, ref.dtype, ref.device)


def _price(menu: LayerMenu, w: _Work, config: CompressionConfig, times: KindTimes | None) -> None:
    """Each entry's cost per call at ``deploy_rows``: seconds (``times``) or FLOPs. An MPO slower than the dense
    layer costs, under the speed / auto policies (its plans may keep the dense weight), the measured time of an MPO
    layer running its dense weight (``times.speed_s``: the dense product plus the layer's call) or the dense FLOPs; every
    form of a recurrent layer's matrix costs the dense one's (:attr:`_Work.fused`)."""
    out_features, in_features = w.shape
    rows, fallback = config.deploy_rows, config.policy != "memory"
    if times is not None:
        dense = times.dense_s
        # never below dense: a dense product plus a call cannot beat the dense product (a lower speed_s is timing
        # noise, which made an MPO larger than the dense layer the "faster" choice under max_latency_ratio)
        speed = dense if times.speed_s is None else max(times.speed_s, dense)

        def mpo(widths):
            t = times.mpo_s(w.out_f, w.in_f, widths)
            return min(t, speed) if fallback else t

        def low(rank):
            return times.lowrank_s(out_features, in_features, rank)
    else:
        dense = 2.0 * rows * out_features * in_features

        def mpo(widths):
            f = float(mpo_flops(w.out_f, w.in_f, widths, rows))
            return min(f, dense) if fallback else f

        def low(rank):
            return float(lowrank_flops(out_features, in_features, rank, rows))

    if w.fused:  # no form buys time or FLOPs there (README: a compressed recurrent layer saves weights, not time)
        mpo = low = lambda _: dense  # noqa: E731
    menu.costs = [dense if c is None else low(c) if isinstance(c, int) else mpo(c) for c in menu.widths]
    menu.cost_of, menu.rank_cost = mpo, low


def _at_rows(row: LayerReport, model: nn.Module, was: int, rows: int) -> None:
    """A report row from an earlier :func:`compress` at ``was`` rows, restated at ``rows``: its FLOPs recounted (an MPO
    layer's by its plan at ``rows``; the others are linear in the rows), its times dropped (measured at ``was``)."""
    try:
        mod = model.get_submodule(row.name) if row.name else model
    except AttributeError:  # a name that is no module any more (an LSTM's matrix, handed back to torch's layer)
        mod = None
    scale = (lambda f: f // was * rows)  # noqa: E731 - 2 * was * ... divides exactly
    row.flops_mpo = mod.flops(rows) if isinstance(mod, MPOLinear) and row.flops_mpo else scale(row.flops_mpo)
    row.flops_dense = scale(row.flops_dense)
    row.time_us = row.time_dense_us = row.time_pred_us = None


def _plan_policy(config: CompressionConfig, mode: str | None = None) -> str | PlanPolicy:
    """A new layer's plan policy: ``mode`` (``"memory"`` / ``"speed"``; default: the config's, memory under
    ``"auto"`` until the layer is judged). Under a FLOP budget its plans are chosen by FLOPs, not timed, so that the
    layers run the FLOPs the budget counted (a timed plan may run more FLOPs where they are faster on this machine)."""
    mode = mode or ("memory" if config.policy == "auto" else config.policy)
    return PlanPolicy(cache_dense=mode == "speed", select="flops") if config.flops_ratio is not None else mode


def _auto_policy(layer: MPOLinear, rows: int) -> tuple[str, float | None, float | None]:
    """``("speed" | "memory", MPO µs, dense µs at rows)``: speed if the layer in memory mode is slower (or, when its
    plans are not timed, costlier in FLOPs) than its dense layer at 1 or ``rows`` rows, the two timed together
    (:func:`bondgate.costmodel.paired_seconds`)."""
    policy, times = "memory", (None, None)
    for r in (rows, 1):
        plan = layer.plan(r)
        if plan.time_us is not None:
            # at the rows the plan was timed at (its bucket's smallest count), not r
            mpo_s, dense_s = paired_seconds(layer, min(plan.planned_rows, 4096))
            if r == rows:
                times = (1e6 * mpo_s, 1e6 * dense_s)
            slower = mpo_s > dense_s
        else:
            slower = layer.flops(r) > 2 * r * layer.out_features * layer.in_features
        if slower:
            policy = "speed"
    return (policy, *times)


def _run_us(policy: str, mpo_us: float | None, dense_us: float | None) -> float | None:
    """The µs of the kernel a layer judged by :func:`_auto_policy` runs: in speed mode the faster of the two."""
    return min(mpo_us, dense_us) if policy == "speed" and mpo_us is not None else mpo_us


def _build_embedding(model: nn.Module, w: _Work, wid, config: CompressionConfig, rows: int,
                     names: dict[int, list[str]], head_times: dict) -> tuple[MPOEmbedding, LayerReport]:
    """The :class:`MPOEmbedding` of a table at the allocated widths (or the config's bond cap / tolerance), swapped
    in at every name, and every ``nn.Linear`` head tied to the table swapped for its tied MPO head (under policy
    ``"auto"`` its µs and the dense layer's into ``head_times[id(head)]``, for the report)."""
    if config.param_ratio is not None:
        mpo = (w.exact if w.exact is not None else _exact(w, config)).truncate(max_bond=list(wid))
    else:
        mpo = MPO.from_matrix(w.table_target(), in_factors=w.in_f, out_factors=w.out_f, max_bond=config.max_bond,
                              tol=config.tol)
    # the MPO was fitted to the padded (a vocabulary like 30522), row-weighted table
    mpo = table_mpo(mpo, w.legs, *w.shape)
    ref = w.module.weight
    pad = w.module.padding_idx
    if pad is not None and bool(ref[pad].any()):
        # a trained padding row that is not zero (BERT's [PAD]): looked up like any row, as nn.Embedding does; only
        # its frozen gradient is not kept (an MPO has no per-row storage to freeze)
        warn_user(f"compress: {w.name}'s padding row ({pad}) is not zero: the MPO table looks it up like any row, "
                  f"but cannot freeze it as nn.Embedding's padding_idx does (gradients at padding positions now reach "
                  f"the shared cores); the layer has padding_idx None")
        pad = None
    layer = MPOEmbedding.from_mpo(mpo.to(dtype=ref.dtype, device=ref.device), pad)
    if w.kept is not None:
        layer.keep_rows_(w.kept, ref.detach()[w.kept.to(ref.device)])
    layer.quantize_(config.quantize)
    with torch.no_grad():  # the errors of the table the lookups use: its dtype's grid, int8 cores and rows included
        W_hat = layer.weight_matrix().to(device="cpu", dtype=torch.float64)
        if layer.padding_idx is not None:  # looked up as zeros (the row it replaces is zero)
            W_hat[layer.padding_idx] = 0
    mpo.error = layer.error = w.weight_error(W_hat)
    freeze_like(trains(w.module), layer)
    heads = _tied_heads(model, w.module)
    swap_module(model, w.module, names, layer)
    for _, head in heads:
        tied = layer.as_linear(bias=head.bias is not None, policy=_plan_policy(config))
        if head.bias is not None:
            with torch.no_grad():
                tied.bias.copy_(head.bias)
        tied.quantize_(config.quantize)
        if config.policy == "auto":  # a vocabulary-wide head is the costliest layer of a small LM: judged like the rest
            policy, mpo_us, dense_us = _auto_policy(tied, config.deploy_rows)
            tied.policy = _plan_policy(config, policy)
            head_times[id(tied)] = (_run_us(policy, mpo_us, dense_us), dense_us)
        swap_module(model, head, names, tied)
    row = _layer_report(w, mpo, W_hat, None, rows)
    row.kind, row.quant = "Embedding", config.quantize
    if config.embedding_form == "lowrank":  # two cores (vocab, 1) x (1, dim): a factor pair, its bond the rank
        row.form, row.rank = "lowrank", mpo.bond_dims[0]
    row.params_after = layer.num_params
    if w.counts is not None:  # the error on the calibration data's ids: rows weighted by their counts
        W = w.W
        num = float((w.counts * (W - W_hat).square().sum(1)).sum())
        row.output_error = math.sqrt(num / max(float((w.counts * W.square().sum(1)).sum()), 1e-300))
    row.flops_mpo = row.flops_dense = 0  # a lookup
    row.aliases = names[id(w.module)][1:] + [n for n, _ in heads]  # other names, and tied heads sharing the cores
    return layer, row


def _tied_heads(model: nn.Module, table: nn.Embedding) -> list[tuple[str, nn.Linear]]:
    """The plain ``nn.Linear`` heads of ``model`` whose weight is ``table``'s (tied LM heads)."""
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and m.weight is table.weight]


def _lowrank_report(w: _Work, rank: int, error: float, W_hat: torch.Tensor, bias: torch.Tensor | None,
                    rows: int) -> LayerReport:
    row = _layer_report(w, None, W_hat, bias, rows)
    row.form, row.rank, row.params_after, row.weight_error = "lowrank", rank, rank * sum(w.shape), error
    row.flops_mpo = lowrank_flops(*w.shape, rank, rows)
    return row


def _turns(works: list[_Work], bar: Callable, desc: str) -> Iterator[_Work]:
    """Each layer in turn, its float64 weight and covariance held for the turn (read several times in it; a bias-free
    layer's second moment is computed when read) and let go after."""
    for w in bar(works, desc):
        w.held, w.held_cov = w.W, w.cov
        try:
            yield w
        finally:
            w.held = w.held_cov = None


def _check_stats(stats: dict[str, InputStats], biased: dict[str, bool]) -> None:
    """Whitening by activations that do not vary would throw the whole weight away (the TT-SVD of ``W S`` with
    ``S ~ 0``) while reporting a zero output error: refuse such calibration data. Warn where the rows cannot span the
    inputs (``biased[name]``: the layer has a bias, so its fit reads the centred covariance, of rank rows - 1)."""
    dead = []
    for name, st in stats.items():
        # with or without a bias: inputs that are one vector repeated leave one direction to fit, and the report's
        # output error (on those rows) near 0 whatever the weights become elsewhere. Relative, so tiny scales pass
        # (the statistics are summed around a data row)
        if not rows_vary(float(st.cov.trace()), float(st.cov.trace() + st.mean @ st.mean), st.dtype):
            dead.append(name)
    if dead:
        raise ValueError(f"the calibration data gives {len(dead)} layer(s) inputs that are all zero or do not vary "
                         f"between rows ({_short_list(dead)}): whitening by them would discard the weights. Pass real "
                         f"model inputs (several rows), exclude layers that only ever see one input "
                         f"(CompressionConfig(exclude=[...])), or CompressionConfig(calibrate=False). Where the data "
                         f"varies, the cause is upstream: a layer before these with an all-zero weight, or an "
                         f"activation that is 0 on every row")
    few = [f"{n} ({st.rows} rows, {st.cov.shape[0]} inputs{', and a bias' if biased.get(n) else ''})"
           for n, st in stats.items() if st.rows - biased.get(n, False) < st.cov.shape[0]]
    if few:  # the fit and the reported errors only see the span of those rows (3 rows: error 0.000, 0.7 held out)
        warn_user(f"compress: {len(few)} layer(s) saw too few calibration rows to span their inputs (fewer rows "
                  f"than inputs; with a bias, whose fit centres the rows, no more rows than inputs) "
                  f"({_short_list(few, 3)}): the factorization fits, and the report's output errors measure, only the "
                  "directions those rows span, so both understate the error on other inputs, which can come out worse "
                  "than with calibrate=False; pass more calibration rows")


def _round_up(x: float) -> float:
    """``x`` rounded up to three significant digits (a ratio to suggest that is surely within reach)."""
    digits = 2 - math.floor(math.log10(x))
    return math.ceil(x * 10**digits) / 10**digits


def _short_list(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _layer_report(w: _Work, mpo: MPO | None, W_hat: torch.Tensor, bias: torch.Tensor | None,
                  rows: int) -> LayerReport:
    out_err = None
    if w.stats is not None:  # E||(W - W_hat) x + (b - b')||^2 / E||W x + b||^2 over the calibration rows
        W = w.W
        E = W - W_hat
        num = float(((E @ w.cov) * E).sum())  # with a bias, its re-fit removes the mean term exactly
        b0 = w.bias if w.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        second = w.cov if w.bias is None else w.stats.second  # (a bias-free layer's cov is its second moment)
        den = float(((W @ second) * W).sum() + 2 * b0 @ (W @ w.stats.mean) + b0 @ b0)
        out_err = math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0
    report = LayerReport(name=w.name, kind=type(w.module).__name__, out_features=w.shape[0],
                         in_features=w.shape[1], params_before=w.numel, output_error=out_err,
                         flops_dense=2 * rows * w.numel)
    if mpo is not None:
        report.out_factors, report.in_factors, report.bond_dims = mpo.out_factors, mpo.in_factors, mpo.bond_dims
        report.params_after, report.weight_error = mpo.num_params, mpo.error  # (FLOPs: the layer's plan, set after)
    return report
