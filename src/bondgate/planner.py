"""Contraction planning for MPO layers: build candidate plans once, pick the fastest, cache the choice.

A forward pass contracts the input ``x`` (``B`` rows, reshaped to ``(B, in_1..in_d)``) with the cores.
Every way of doing so is a *plan*:

* ``groups``: a partition of the cores into contiguous runs that are pre-contracted (merged) first.
  Singletons mean no merging; one group holding every core is the reconstructed dense weight.
* ``path``: the pairwise contraction order over ``[x, group_0, group_1, ...]`` found by opt_einsum's
  optimizers (plus the sweeps), compiled once for the executor; merged groups are pre-contracted by
  ``opt_einsum.contract_expression`` objects built once per plan.
* ``executor``: ``"aten"`` runs the whole path in one ``torch.ops.aten.einsum(..., path=...)`` call
  (one C++ dispatch, no Python between steps); ``"tensordot"`` runs the path as a precompiled list of
  ``torch.tensordot`` calls (every pairwise step of an MPO contraction is a pure tensordot: each index
  appears in exactly two places), which skips opt_einsum's per-call parsing and dispatch (~30% of the
  time of a one-row call). ``"sweep"`` runs the left-to-right (or right-to-left) sweep as one
  ``torch.mm`` per core with the cores pre-arranged as matrices ``[(r_out, out_k), (r_in, in_k)]``
  (:func:`sweep_matrix`): no core is permuted on the call, only the small running state, and since
  each bond is the outer index of its rows or columns, a prefix of the bonds (a narrower MPO, as
  bond gating uses) is a strided view of the same matrices (:func:`sweep_views`). Which executor is
  fastest depends on the shapes, so all are timed.
* ``cached``: pre-contracted groups are kept between calls (speed mode, inference only). With the
  all-cores group this is the classic "cache the dense weight" fallback. A cached sweep keeps the
  cores' matrix layout (as many elements as the cores) and is allowed in memory mode too, as is a one-core
  layer's kept weight (a view of its core). A two-core sweep that is a low-rank pair (``chain``: the input
  into the bond, the bond onto the output) runs as two ``linear`` calls.

Candidates are: FLOP-optimal paths from several opt_einsum optimizers (``optimal``/``dp`` under the
flops, size, write and combo objectives, ``greedy``, ``branch-2``; only ``dp`` by size and ``greedy`` above 9
operands, only ``greedy`` above :data:`DP_MAX_OPERANDS`), the left-to-right and
right-to-left sweeps, merged neighbouring cores, and rebuild-then-GEMM. FLOP-optimal is not
time-optimal on a CPU (thin GEMMs and permutes dominate), so by default (``select="time"``) the
candidates that survive a FLOP and memory screen are timed on the real shapes and the fastest wins
(autotuning; in speed mode the cached dense weight stays unless a factored plan is at least 5% faster);
``select="flops"`` picks by the FLOP model alone (deterministic, no timing).

Choices are cached per key ``(row bucket, factors, bond dims, dtype, device, policy, grad)`` where the
row bucket is ``B.bit_length()`` (powers of two), so nothing is planned on the hot path after the first
call for a key, and layers of the same shape share one plan.

Memory: in memory mode (``cache_dense=False``) a plan is admissible only if none of its intermediates
exceeds ``max(dense weight, 4 * (input + output activations))`` elements at any row count of its bucket (checked
at the bucket's smallest and largest: an intermediate is either fixed or proportional to the rows, and so is the
limit); rebuild-then-GEMM always is,
so there is always a candidate. What a memory-mode layer may keep between inference calls is its cores in
the sweeps' matrix layout — one copy per sweep direction its row buckets' plans use (at most two) — never a
dense weight other than a one-core layer's own core.
"""

from __future__ import annotations

import math
import string
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import opt_einsum as oe
import torch

__all__ = [
    "PlanPolicy",
    "MEMORY",
    "SPEED",
    "ContractionPlan",
    "get_plan",
    "min_flops",
    "clear_plan_cache",
    "plan_cache_info",
    "row_bucket",
    "sweep_matrix",
    "sweep_views",
]


@dataclass(frozen=True)
class PlanPolicy:
    """How plans are chosen.

    Args:
        cache_dense: allow keeping pre-contracted cores between calls (the dense weight, or merged
            neighbouring cores) in inference. ``False`` = memory mode, ``True`` = speed mode. Either
            mode may keep the cores' sweep layout (same size as the cores) when a sweep plan wins, and a one-core
            layer's weight (a view of its core).
        select: ``"time"`` (autotune: time the screened candidates on the actual shapes) or ``"flops"``
            (pick the fewest FLOPs; no timing).
        flop_slack: candidates with more than ``flop_slack`` x the minimal FLOPs are not timed
            (the cached dense weight in speed mode is always timed).
        tune_seconds: rough wall-clock budget for timing one key.
    """

    cache_dense: bool = False
    select: str = "time"
    flop_slack: float = 4.0
    tune_seconds: float = 0.15

    def __post_init__(self) -> None:
        if not isinstance(self.cache_dense, bool):
            raise ValueError(f"cache_dense must be a bool, got {self.cache_dense!r}")
        if isinstance(self.tune_seconds, bool) or not isinstance(self.tune_seconds, (int, float)) \
                or not 0 <= self.tune_seconds < math.inf:
            raise ValueError(f"tune_seconds must be a finite number >= 0, got {self.tune_seconds!r}")
        if self.select not in ("time", "flops"):
            raise ValueError(f"select must be 'time' or 'flops', got {self.select!r}")
        if isinstance(self.flop_slack, bool) or not isinstance(self.flop_slack, (int, float)) \
                or not 1.0 <= self.flop_slack < math.inf:
            raise ValueError(f"flop_slack must be >= 1, got {self.flop_slack!r}")


MEMORY = PlanPolicy(cache_dense=False)
SPEED = PlanPolicy(cache_dense=True)


def row_bucket(rows: int) -> int:
    """Plans are shared by row counts with the same bit length: 1, 2-3, 4-7, 8-15, ..."""
    return int(rows).bit_length()


# ---------------------------------------------------------------------------------------------- letters
MAX_CORES = 17  # torch.einsum takes the 52 ASCII letters: one batch index + d in, d out and d - 1 bond indices


@dataclass(frozen=True)
class _Letters:
    """Subscripts of one MPO contraction: batch, in legs, out legs, inner bonds (3d letters of the 52)."""

    d: int

    def __post_init__(self) -> None:
        if self.d > MAX_CORES:
            raise ValueError(f"an MPO layer has at most {MAX_CORES} cores (torch.einsum has 52 index letters), "
                             f"got {self.d}")

    @property
    def ins(self) -> str:
        return string.ascii_letters[1 : 1 + self.d]

    @property
    def outs(self) -> str:
        return string.ascii_letters[1 + self.d : 1 + 2 * self.d]

    @property
    def bonds(self) -> str:  # bond k sits between core k and core k+1
        return string.ascii_letters[1 + 2 * self.d : 3 * self.d]

    def group(self, lo: int, hi: int) -> str:
        """Subscripts of cores lo..hi (inclusive) contracted together: left bond, outs, ins, right bond."""
        left = self.bonds[lo - 1] if lo > 0 else ""
        right = self.bonds[hi] if hi < self.d - 1 else ""
        return left + self.outs[lo : hi + 1] + self.ins[lo : hi + 1] + right

    @property
    def x(self) -> str:
        return "a" + self.ins

    @property
    def y(self) -> str:
        return "a" + self.outs


def squeeze_core(core: torch.Tensor, k: int, d: int) -> torch.Tensor:
    """Drop the unit boundary bonds: first core ``(o, i, r)``, last ``(r, o, i)``, middle unchanged."""
    if k == d - 1:
        core = core.squeeze(3)
    if k == 0:
        core = core.squeeze(0)
    return core


def sweep_matrix(core: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Core ``(r_left, out, in, r_right)`` as the matrix one sweep step multiplies with:
    ``[(r_right, out), (r_left, in)]`` left to right, ``[(r_left, out), (r_right, in)]`` right to left."""
    a, o, i, b = core.shape
    if reverse:
        return core.permute(0, 1, 3, 2).reshape(a * o, b * i)
    return core.permute(3, 1, 0, 2).reshape(b * o, a * i)


def sweep_views(mats: Sequence[torch.Tensor], out_factors: Sequence[int], in_factors: Sequence[int],
                widths: Sequence[int], reverse: bool = False) -> list[torch.Tensor]:
    """The sweep matrices of the MPO whose bonds keep the first ``widths`` channels, as views of the
    full-width ones ``mats`` (processing order, from :func:`sweep_matrix`): every bond is the outer
    index of its rows or columns, so a prefix of the bond is a prefix of the rows or columns."""
    d = len(mats)
    order = range(d - 1, -1, -1) if reverse else range(d)
    w = [1, *(tuple(widths)[::-1] if reverse else widths), 1]
    return [A[: w[s + 1] * out_factors[k], : w[s] * in_factors[k]] for s, (A, k) in enumerate(zip(mats, order))]


def sweep_steps(out_factors: Sequence[int], in_factors: Sequence[int], ranks: Sequence[int],
                reverse: bool = False) -> list[tuple[int, int, int]]:
    """Per sweep step (processing order): (rows of the state matrix, out factor, bond after the step)."""
    d = len(in_factors)
    order = range(d - 1, -1, -1) if reverse else range(d)
    bonds = [1, *(tuple(ranks)[::-1] if reverse else ranks), 1]
    return [(bonds[s] * in_factors[k], out_factors[k], bonds[s + 1]) for s, k in enumerate(order)]


def run_sweep(x2d: torch.Tensor, mats: Sequence[torch.Tensor], steps: Sequence[tuple[int, int, int]],
              out_factors: Sequence[int], in_factors: Sequence[int], reverse: bool = False) -> torch.Tensor:
    """``x2d`` ``(B, prod(in_factors))`` through the sweep: one ``torch.mm`` per core with the cores as matrices
    (:func:`sweep_matrix`, processing order) and :func:`sweep_steps`; returns ``(B, prod(out_factors))``.
    Plain tensor ops on static factors: traceable by torch.compile and torch.export with a dynamic ``B``."""
    # The state before step s is (r, in_k, ..., B, out_done): the step's mm contracts its leading
    # (r, in_k) with the core matrix, and one permute moves the new out factor to the end.
    B, d = x2d.shape[0], len(mats)
    if reverse:
        state = x2d.reshape(B, *in_factors).permute(*range(d, 0, -1), 0)
    else:
        state = x2d.t()
    # explicit sizes, no -1: a traced B stays one symbol (inferred sizes make torch.export guard on B)
    r_prev, rest, done = 1, math.prod(in_factors), 1
    for A, (k_rows, m, r_next) in zip(mats, steps):
        rest //= k_rows // r_prev  # the input legs still to contract
        P = torch.mm(A, state.reshape(k_rows, rest * B * done))  # (r_next * m, rest * B * done)
        state = P.view(r_next, m, rest, B, done).permute(0, 2, 3, 4, 1)  # B a dim of its own: no symbolic split
        done *= m
        r_prev = r_next
    if reverse:  # out factors were appended last to first
        return state.reshape(B, *tuple(out_factors)[::-1]).permute(0, *range(d, 0, -1)).reshape(B, done)
    return state.reshape(B, done)


def sweep_flops(out_factors: Sequence[int], in_factors: Sequence[int], ranks: Sequence[int], reverse: bool) -> int:
    """FLOPs per input row of a sweep. Every step is linear in the rows, so the cheaper direction at one row is
    the cheaper one at any row count."""
    d = len(in_factors)
    order = range(d - 1, -1, -1) if reverse else range(d)
    left, done, total = list(in_factors), 1, 0
    for (k_rows, m, r_next), k in zip(sweep_steps(out_factors, in_factors, ranks, reverse), order):
        left[k] = 1  # step k's mm: (r_next * m, k_rows) @ (k_rows, rest of the input legs * done outputs)
        total += 2 * r_next * m * k_rows * math.prod(left) * done
        done *= m
    return total


# ---------------------------------------------------------------------------------------------- plans
@dataclass
class ContractionPlan:
    """One executable way to compute ``y = x @ W_mpo.T``; built by :func:`get_plan`.

    Attributes: ``name``; ``groups`` (merged core runs); ``path`` (over ``[x, *groups]``);
    ``equation``; ``executor``; ``cached`` (groups kept between calls); ``flops`` and
    ``peak_elements`` (largest intermediate, in elements) at ``planned_rows`` rows;
    ``time_us`` (measured median, autotune only); ``candidates`` (what was timed, for inspection).
    """

    name: str
    groups: tuple[tuple[int, int], ...]
    path: tuple[tuple[int, ...], ...]
    equation: str
    executor: str
    cached: bool
    flops: int
    peak_elements: int
    planned_rows: int
    out_factors: tuple[int, ...]
    in_factors: tuple[int, ...]
    ranks: tuple[int, ...]
    time_us: float | None = None
    reverse: bool = False  # sweep executor: right to left
    candidates: list[dict] = field(default_factory=list, repr=False)
    group_flops: int = 0  # merging the core runs into groups (included in ``flops`` unless ``cached``)
    group_shapes: tuple[tuple[int, ...], ...] = ()
    _group_exprs: list = field(default_factory=list, repr=False)
    _flat_path: list[int] = field(default_factory=list, repr=False)

    @property
    def id(self) -> str:
        """Identifies this plan among the candidates of its key (stable across processes)."""
        return f"{self.name}|{self.executor}"

    @property
    def merge_flops(self) -> int:
        """FLOPs of merging the cores into the plan's groups per call (0 where the merged operands are kept)."""
        return 0 if self.cached else self.group_flops

    def flops_at(self, rows: int) -> int:
        """FLOPs of this plan for a call of ``rows`` rows (``flops`` is at ``planned_rows``, the smallest row
        count of its bucket: up to 2x fewer)."""
        rows = max(int(rows), 1)
        if rows == self.planned_rows:
            return self.flops
        merge = self.merge_flops
        if self.dense:
            return 2 * rows * math.prod(self.out_factors) * self._padded_in + merge
        info = oe.contract_path(self.equation, (rows, *self.in_factors), *self.group_shapes, optimize=list(self.path),
                                shapes=True)[1]
        return int(info.opt_cost) + merge

    def __post_init__(self) -> None:
        self._padded_in = math.prod(self.in_factors)
        # True when the plan multiplies by the reconstructed dense weight (a plain attribute: hot path).
        self.dense = len(self.groups) == 1 and self.groups[0] == (0, len(self.out_factors) - 1)
        if self.executor == "tensordot":
            self._steps, self._perm = _tensordot_program(self.equation, self.path)
        # True when the sweep is two plain products, x @ A0.T @ A1.T: two cores whose first step contracts the
        # whole input into the bond and whose second maps the bond onto the whole output (a low-rank pair as an
        # MPO, ``MPOLinear.is_rank_form``), run as two ``linear`` calls without the sweep's reshapes
        self.chain = False
        if self.executor == "sweep":
            self._sweep = sweep_steps(self.out_factors, self.in_factors, self.ranks, self.reverse)
            first, second = (1, 0) if self.reverse else (0, 1)
            self.chain = (len(self.in_factors) == 2 and self.out_factors[first] == 1
                          and self.in_factors[second] == 1)

    @property
    def short(self) -> bool:
        """Whether MPOLinear's short path runs it after the first inference call (kept operands, one or two
        products)."""
        return self.cached and (self.dense or self.chain)

    @property
    def operand_key(self) -> tuple:
        """Plans with equal keys take the same operands (what a layer's operand cache is keyed by)."""
        return (self.groups, self.executor == "sweep", self.reverse)  # aten and tensordot share operands


    # ----------------------------------------------------------------- execution
    def group_operands(self, cores: Sequence[torch.Tensor], out_features: int | None = None,
                       in_features: int | None = None) -> list[torch.Tensor]:
        """Pre-contract the groups (one tensor per group). For a dense plan the single operand is the
        weight ``(out_features, in_features)`` with any padding removed."""
        d = len(cores)
        if self.executor == "sweep":
            return [sweep_matrix(c, self.reverse) for c in (cores[::-1] if self.reverse else cores)]
        sq = [squeeze_core(c, k, d) for k, c in enumerate(cores)]
        ops = []
        for (lo, hi), expr in zip(self.groups, self._group_exprs):
            ops.append(sq[lo] if expr is None else expr(*sq[lo : hi + 1], backend="torch"))
        if self.dense:  # (o_1..o_d, i_1..i_d) -> (N', M') -> (N, M)
            W = ops[0].reshape(math.prod(self.out_factors), self._padded_in)
            n = W.shape[0] if out_features is None else out_features
            m = W.shape[1] if in_features is None else in_features
            ops[0] = W if (n, m) == tuple(W.shape) else W[:n, :m]
        return ops

    def cache_operands(self, cores: Sequence[torch.Tensor], out_features: int | None = None,
                       in_features: int | None = None) -> list[torch.Tensor]:
        """:meth:`group_operands` to keep between calls: detached and contiguous (a pre-contracted group is
        often a permuted view, which would be re-strided on every call). Made outside inference mode: kept operands
        meet inputs that need a gradient (a frozen layer), which inference tensors cannot."""
        with torch.inference_mode(False), torch.no_grad():
            ops = [o.contiguous() for o in self.group_operands(cores, out_features, in_features)]
            if self.chain:  # the second factor column-major, as LowRankLinear keeps U: its GEMM runs faster on CPU
                ops[1] = ops[1].t().contiguous().t()
            return ops

    def run(self, x2d: torch.Tensor, ops: Sequence[torch.Tensor], out_features: int,
            bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x2d``: ``(B, in_features)``; ``ops`` from :meth:`group_operands`; returns ``(B, out_features)``."""
        if self.dense:
            return torch.nn.functional.linear(x2d, ops[0], bias)
        pad = self._padded_in - x2d.shape[1]
        if self.chain and not pad and ops[1].shape[0] == out_features:  # the bits of MPOLinear's short path
            return torch.nn.functional.linear(torch.nn.functional.linear(x2d, ops[0]), ops[1], bias)
        if pad:
            x2d = torch.nn.functional.pad(x2d, (0, pad))
        if self.executor == "sweep":
            y = self._run_sweep(x2d, ops)
        elif self.executor == "aten":
            xs = x2d.reshape(x2d.shape[0], *self.in_factors)
            y = torch.ops.aten.einsum(self.equation, [xs, *ops], path=self._flat_path).reshape(x2d.shape[0], -1)
        else:
            stack = [x2d.reshape(x2d.shape[0], *self.in_factors), *ops]
            for i, j, dims in self._steps:  # i < j: pop j first so that i keeps its position
                b = stack.pop(j)
                stack.append(torch.tensordot(stack.pop(i), b, dims=dims))
            y = stack[0].permute(self._perm).reshape(x2d.shape[0], -1)
        if y.shape[1] != out_features:
            y = y[:, :out_features]
        if bias is not None:
            y = y + bias
        return y

    def _run_sweep(self, x2d: torch.Tensor, ops: Sequence[torch.Tensor]) -> torch.Tensor:
        return run_sweep(x2d, ops, self._sweep, self.out_factors, self.in_factors, self.reverse)

    def describe(self) -> dict:
        """A plain-dict summary (what :meth:`bondgate.MPOLinear.plan` shows)."""
        return {
            "name": self.name,
            "executor": self.executor,
            "groups": self.groups,
            "path": self.path,
            "equation": self.equation,
            "cached": self.cached,
            "flops": self.flops,
            "peak_elements": self.peak_elements,
            "planned_rows": self.planned_rows,
            "time_us": self.time_us,
        }

    def __str__(self) -> str:
        t = f", {self.time_us:.1f} us" if self.time_us is not None else ""
        return (
            f"ContractionPlan({self.name} via {self.executor}, rows={self.planned_rows}, "
            f"flops={self.flops:,}, peak={self.peak_elements:,} elems{t})"
        )


def _tensordot_program(equation: str, path) -> tuple[list, list[int]]:
    """Compile an opt_einsum path into ``[(i, j, dims)]`` tensordot steps plus the final permutation.

    Each step pops operands ``i < j``, contracts the indices they share (in an MPO network every index
    sits on exactly two operands, or on one operand and the output, so shared means contracted) and
    appends the result, whose indices are ``i``'s free ones then ``j``'s, as ``torch.tensordot`` orders them.
    """
    inputs, out = equation.split("->")
    subs = inputs.split(",")
    steps = []
    for pair in path:
        i, j = sorted(pair)
        a, b = subs[i], subs[j]
        shared = [c for c in a if c in b]
        if any(c in out or any(c in s for k, s in enumerate(subs) if k not in (i, j)) for c in shared):
            raise ValueError(f"index shared by more than two operands in {equation!r}: not a tensordot")
        steps.append((i, j, ([a.index(c) for c in shared], [b.index(c) for c in shared])))
        subs.pop(j)
        subs.pop(i)
        subs.append("".join(c for c in a if c not in shared) + "".join(c for c in b if c not in shared))
    (final,) = subs
    return steps, [final.index(c) for c in out]


def _group_sets(d: int) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
    """Core partitions to consider: none merged, each neighbouring pair, all pairs, all cores."""
    out: list[tuple[str, tuple[tuple[int, int], ...]]] = [("cores", tuple((k, k) for k in range(d)))]
    if 3 <= d <= 8:  # (with more cores, merging one pair changes little and multiplies the planning time)
        for k in range(d - 1):
            g = [(j, j) for j in range(k)] + [(k, k + 1)] + [(j, j) for j in range(k + 2, d)]
            out.append((f"merge{k}{k + 1}", tuple(g)))
    if d >= 4:
        g = [(k, min(k + 1, d - 1)) for k in range(0, d, 2)]
        out.append(("pairs", tuple(g)))
    if d >= 2:
        out.append(("dense", ((0, d - 1),)))
    return out


def _chain(n_ops: int, order: Sequence[int]) -> list[tuple[int, int]]:
    """opt_einsum path that accumulates operands in ``order`` (results go to the end of the list)."""
    ids: list = list(range(n_ops))
    acc = order[0]
    path = []
    for o in order[1:]:
        i, j = sorted((ids.index(acc), ids.index(o)))
        path.append((i, j))
        ids.pop(j)
        ids.pop(i)
        acc = ("t", len(path))
        ids.append(acc)
    return path


def _core_shapes(out_f, in_f, ranks) -> list[tuple[int, ...]]:
    d = len(out_f)
    r = [1, *ranks, 1]
    shapes = []
    for k in range(d):
        s = (r[k], out_f[k], in_f[k], r[k + 1])
        if k == d - 1:
            s = s[:3]
        if k == 0:
            s = s[1:]
        shapes.append(s)
    return shapes


def _group_shape(shapes, lo, hi, d, out_f, in_f, ranks) -> tuple[int, ...]:
    if lo == hi:
        return shapes[lo]
    r = [1, *ranks, 1]
    s = ([r[lo]] if lo > 0 else []) + list(out_f[lo : hi + 1]) + list(in_f[lo : hi + 1])
    return tuple(s + ([r[hi + 1]] if hi < d - 1 else []))


DP_MAX_OPERANDS = 12  # contractions of more operands (x and 12+ core groups) take their path from greedy alone


def _build_candidates(out_f, in_f, ranks, rows, policy: PlanPolicy, grad: bool) -> list[ContractionPlan]:
    d = len(out_f)
    L = _Letters(d)
    shapes = _core_shapes(out_f, in_f, ranks)
    N, M = math.prod(out_f), math.prod(in_f)
    x_shape = (rows, *in_f)
    act_limit = max(N * M, 4 * rows * (N + M))
    cache_ok = policy.cache_dense and not grad
    cands: list[ContractionPlan] = []
    for gname, groups in _group_sets(d) if d > 1 else [("dense", ((0, 0),))]:
        gexprs, gshapes, gsubs = [], [], []
        g_flops, g_peak = 0, 0
        for lo, hi in groups:
            sub = L.group(lo, hi)
            gsubs.append(sub)
            gshapes.append(_group_shape(shapes, lo, hi, d, out_f, in_f, ranks))
            if lo == hi:
                gexprs.append(None)
                continue
            eq = ",".join(L.group(k, k) for k in range(lo, hi + 1)) + "->" + sub
            chain = _chain(hi - lo + 1, range(hi - lo + 1))
            gexprs.append(oe.contract_expression(eq, *shapes[lo : hi + 1], optimize=chain))
            _, info = oe.contract_path(eq, *shapes[lo : hi + 1], optimize=chain, shapes=True)
            g_flops += int(info.opt_cost)
            g_peak = max(g_peak, int(info.largest_intermediate))
        cached_variants = [False, True] if cache_ok and any(lo != hi for lo, hi in groups) else [False]
        if d == 1 and not grad:
            # a one-core layer's weight is a view of its core (of an int8 one, its fake-quantized weight, which the
            # layer keeps anyway): in inference, in either mode, it is kept, which arms MPOLinear's short path (the
            # layers compress keeps dense, int8 ones among them). A checkpoint's pinned "rebuild+gemm" for such a
            # layer names no candidate now, so it is planned again, to this one
            cached_variants = [True]
        if gname == "dense":
            flops = 2 * rows * N * M
            for cached in cached_variants:
                peak = max(N * M, g_peak if not cached else 0)
                cands.append(
                    ContractionPlan(
                        name="dense-cached" if cached else "rebuild+gemm",
                        groups=groups, path=(), equation="", executor="linear", cached=cached,
                        flops=flops + (0 if cached else g_flops), peak_elements=peak, planned_rows=rows,
                        out_factors=tuple(out_f), in_factors=tuple(in_f), ranks=tuple(ranks),
                        group_flops=g_flops, group_shapes=tuple(gshapes), _group_exprs=gexprs,
                    )
                )
            continue
        eq = ",".join([L.x, *gsubs]) + "->" + L.y
        n_ops = 1 + len(groups)
        paths: dict[tuple, tuple[str, object]] = {}  # path -> (name, opt_einsum PathInfo)
        optimizers = {
            "optimal": "optimal" if n_ops <= 6 else "dp",
            "dp-size": oe.DynamicProgramming(minimize="size"),
            "dp-write": oe.DynamicProgramming(minimize="write"),
            "dp-combo": oe.DynamicProgramming(minimize="combo"),
            "greedy": "greedy",
            "branch-2": "branch-2",
        }
        if n_ops > 9:  # many cores: the exhaustive searches take ~1 s per group set; keep the fast ones
            optimizers = {k: optimizers[k] for k in ("dp-size", "greedy")}
        if n_ops > DP_MAX_OPERANDS:  # dp-size's time grows ~2.5x per operand: 0.1 s at 13, 11 s at 18 (17 cores)
            optimizers = {"greedy": "greedy"}
        for oname, opt in optimizers.items():
            p, info = oe.contract_path(eq, x_shape, *gshapes, optimize=opt, shapes=True)
            paths.setdefault(tuple(map(tuple, p)), (oname, info))
        l2r, r2l = tuple(_chain(n_ops, range(n_ops))), tuple(_chain(n_ops, [0, *range(n_ops - 1, 0, -1)]))
        for p, pname in ((l2r, "l2r"), (r2l, "r2l")):
            if p not in paths:
                paths[p] = (pname, oe.contract_path(eq, x_shape, *gshapes, optimize=list(p), shapes=True)[1])
        for p, reverse in ((l2r, False), (r2l, True)) if gname == "cores" else ():
            info = paths[p][1]
            for cached in [False, True] if not grad else [False]:  # the same contractions, one mm per core
                cands.append(
                    ContractionPlan(
                        name=f"{gname}/sweep-{'r2l' if reverse else 'l2r'}" + ("/cached" if cached else ""),
                        groups=groups, path=p, equation=eq, executor="sweep", cached=cached,
                        flops=int(info.opt_cost), peak_elements=int(info.largest_intermediate),
                        planned_rows=rows, out_factors=tuple(out_f), in_factors=tuple(in_f),
                        ranks=tuple(ranks), reverse=reverse, group_flops=g_flops, group_shapes=tuple(gshapes),
                        _group_exprs=gexprs,
                    )
                )
        for p, (pname, info) in paths.items():
            peak_main = int(info.largest_intermediate)
            for cached in cached_variants:
                peak = max(peak_main, 0 if cached else g_peak)
                for executor in ("aten", "tensordot"):
                    cands.append(
                        ContractionPlan(
                            name=f"{gname}/{pname}" + ("/cached" if cached else ""),
                            groups=groups, path=p, equation=eq, executor=executor, cached=cached,
                            flops=int(info.opt_cost) + (0 if cached else g_flops), peak_elements=peak,
                            planned_rows=rows, out_factors=tuple(out_f), in_factors=tuple(in_f),
                            ranks=tuple(ranks), group_flops=g_flops, group_shapes=tuple(gshapes),
                            _group_exprs=gexprs, _flat_path=[i for pair in p for i in pair],
                        )
                    )
    if not policy.cache_dense:
        # the plan serves its whole bucket: the intermediates that grow with the rows are checked at its top row count
        top = (1 << row_bucket(rows)) - 1
        top_limit = max(N * M, 4 * top * (N + M))

        def fits(c: ContractionPlan) -> bool:
            if c.peak_elements > act_limit:
                return False
            if c.dense or top == rows:
                return True
            info = oe.contract_path(c.equation, (top, *in_f), *c.group_shapes, optimize=list(c.path), shapes=True)[1]
            return info.largest_intermediate <= top_limit

        admissible = [c for c in cands if fits(c)]
        cands = admissible or [c for c in cands if c.name == "rebuild+gemm"]
    return cands


def _time_call(fn, budget_s: float, max_reps: int = 50) -> float:
    """Median microseconds of ``fn`` over as many calls as fit ``budget_s`` (at least one, after a
    warm-up call whose time decides the repetition count)."""
    t0 = time.perf_counter()
    fn()  # warm-up (allocator, BLAS thread pools); its time sizes the repetitions
    first = time.perf_counter() - t0
    reps = int(min(max_reps, max(1, budget_s / max(first, 1e-7))))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e6


TUNE_MAX_ROWS = 4096  # larger row counts are timed on this many rows: the ranking is set by then
# speed mode keeps the dense weight unless a factored plan times at least this much faster: wins of a few percent
# at large row counts were noise on a shared CPU (MiniLM at 256 sentences ran 1.08x dense with such picks)
DENSE_MARGIN = 0.05
FINALISTS, FINAL_ROUNDS = 5, 3


def _autotune(cands: list[ContractionPlan], out_f, in_f, ranks, rows, dtype, device, policy) -> ContractionPlan:
    """Time the screened candidates, dense anchors then cheapest FLOPs first, within ``policy.tune_seconds`` (soft):
    a candidate whose first call is 4x slower than the best so far is not repeated, and once three
    times the budget is spent the remaining candidates are left untimed."""
    min_fl = min(c.flops for c in cands)
    # the dense anchors are timed first, whatever their FLOPs: then the time cap can never leave the
    # planner with only factored plans that are slower than a plain GEMM (large row counts)
    # (in memory mode only when their FLOPs pass the screen like the others': unscreened, a wide layer's first
    # one-row call built its whole dense weight to time it, 1 GiB at 16384 x 16384)
    anchors = ("dense-cached", "rebuild+gemm")
    # then by FLOPs in 10% bands (a cached merge saves <1% of the FLOPs and is often slower), aten first
    screened = sorted((c for c in cands if c.flops <= policy.flop_slack * min_fl
                       or (c.name in anchors and policy.cache_dense)),
                      key=lambda c: (c.name not in anchors, int(math.log(max(c.flops, 1)) / math.log(1.1)),
                                     c.executor != "aten", c.cached, c.flops))
    # random operands from numpy: a first call can happen inside torch.func.vmap (jacfwd, hessian), which refuses
    # torch's random functions; torch ops on these plain tensors run unbatched there
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(dtype=dtype, device=device)

    r = [1, *ranks, 1]
    cores = [rand(r[k], out_f[k], in_f[k], r[k + 1]) for k in range(len(out_f))]
    M, N = math.prod(in_f), math.prod(out_f)
    x = rand(min(rows, TUNE_MAX_ROWS), M)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    per = policy.tune_seconds / max(len(screened), 1)
    start = time.perf_counter()
    ops_cache: dict[tuple, list[torch.Tensor]] = {}

    def runner(c: ContractionPlan):
        def fn():
            ops = ops_cache[c.operand_key] if c.cached else c.group_operands(cores)
            c.run(x, ops, N)
            sync()

        return fn

    with torch.no_grad():
        best_us = float("inf")
        # the cap never stops before the four cheapest factored candidates are timed: at large row
        # counts the anchors alone can use it up, and then a plan that beats dense would go unseen
        must = sum(c.name in anchors for c in screened) + 4
        for i, c in enumerate(screened):
            if time.perf_counter() - start > 3 * policy.tune_seconds and best_us < float("inf") and i >= must:
                break
            if c.cached and c.operand_key not in ops_cache:
                ops_cache[c.operand_key] = c.cache_operands(cores)
            fn = runner(c)
            t0 = time.perf_counter()
            fn()
            first_us = (time.perf_counter() - t0) * 1e6
            c.time_us = first_us if first_us > 4 * best_us else _time_call(fn, per)
            best_us = min(best_us, c.time_us)
        timed = [c for c in screened if c.time_us is not None]
        # Final rounds on the front-runners, interleaved so that a slow stretch of a shared CPU hits
        # them all alike; the first pass above ranks them only roughly (each got a few ms, cold).
        front = finalists(timed)
        for c in front:
            c.time_us = float("inf")
        for _ in range(FINAL_ROUNDS):
            for c in front:
                c.time_us = min(c.time_us, _time_call(runner(c), per * 2))
    best = fastest(timed)
    best.candidates = [
        {"name": c.name, "executor": c.executor, "flops": c.flops, "peak_elements": c.peak_elements,
         "time_us": c.time_us}
        for c in sorted(timed, key=lambda c: c.time_us)
    ]
    return best


def _dense_cached(timed: Sequence[ContractionPlan]) -> ContractionPlan | None:
    return next((c for c in timed if c.name == "dense-cached"), None)  # speed mode's one kept dense weight


def finalists(timed: Sequence[ContractionPlan]) -> list[ContractionPlan]:
    """The plans the final rounds time again: the :data:`FINALISTS` fastest of the first pass, and the cached dense
    weight wherever it ranked. :func:`fastest` compares the winner with that plan, so both need times of the same
    kind: the dense GEMM timed first and cold (the first of the pass) once ranked 8th at 1.5x its own re-timed cost,
    and the best of three interleaved rounds of a factored plan then "beat" it (MiniLM at 256 sentences: 6 of 12
    layers factored, the model 1.09x dense)."""
    front = sorted(timed, key=lambda c: c.time_us)[:FINALISTS]
    dense = _dense_cached(timed)
    return front if dense is None or dense in front else [*front, dense]


def fastest(timed: Sequence[ContractionPlan]) -> ContractionPlan:
    """The timed plan to use: the fastest, except that the cached dense weight (speed mode) is kept unless the
    fastest factored plan beats it by :data:`DENSE_MARGIN` — a win inside the timing noise is no win, and the dense
    plan is ``nn.Linear``'s own GEMM."""
    best = min(timed, key=lambda c: c.time_us)
    dense = _dense_cached(timed)
    if dense is not None and best.time_us > (1 - DENSE_MARGIN) * dense.time_us:
        return dense
    return best


_PLAN_CACHE: dict[tuple, ContractionPlan] = {}
# Held while a missing plan is chosen: two threads making a key's first call at once would each time the
# candidates and could pick different ones (other rounding), the last one kept; one plan per key instead.
_PLANNING = threading.RLock()


def get_plan(
    out_factors: Sequence[int],
    in_factors: Sequence[int],
    ranks: Sequence[int],
    rows: int,
    dtype: torch.dtype,
    device: torch.device,
    policy: PlanPolicy = MEMORY,
    grad: bool = False,
    prefer: str | None = None,
) -> ContractionPlan:
    """The cached plan for this shape and row bucket, planning (and autotuning) it on first use.

    ``prefer``: a plan id (``plan.id``, e.g. ``"cores/optimal|aten"``) to use if it is a candidate for
    this key — how a loaded checkpoint reproduces the plans, hence the exact floating-point results,
    of the process that saved it.
    """
    device = torch.device(device)
    key = (row_bucket(rows), tuple(out_factors), tuple(in_factors), tuple(ranks), dtype, device, policy, grad)
    # Every plan of a bucket is built for its smallest row count (1, 2, 4, 8, ...), not for the rows of the call
    # that planned it first: a contraction path depends on the rows, so a checkpoint's pinned plan id would
    # otherwise name a different path (different rounding) in a process whose first call had other rows.
    rows = 1 << (row_bucket(max(int(rows), 1)) - 1)
    if prefer is not None:
        pkey = (*key, prefer)
        plan = _PLAN_CACHE.get(pkey)
        if plan is None:
            cands = _build_candidates(tuple(out_factors), tuple(in_factors), tuple(ranks), rows, policy, grad)
            plan = next((c for c in cands if c.id == prefer), None)
            if plan is not None:
                plan = _PLAN_CACHE.setdefault(pkey, plan)
        if plan is not None:
            return plan
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        with _PLANNING:
            plan = _PLAN_CACHE.get(key)  # (chosen by another thread meanwhile)
            if plan is None:
                cands = _build_candidates(tuple(out_factors), tuple(in_factors), tuple(ranks), rows, policy, grad)
                if policy.select == "flops" or len(cands) == 1:
                    # at equal cost a plan MPOLinear's short path runs (a pair's two products, a one-core layer's
                    # weight) first
                    plan = min(cands, key=lambda c: (c.flops, c.peak_elements, not c.short, c.executor != "aten"))
                else:
                    plan = _autotune(cands, out_factors, in_factors, ranks, rows, dtype, device, policy)
                _PLAN_CACHE[key] = plan
    return plan


def clear_plan_cache() -> None:
    """Forget every cached plan (e.g. after changing thread counts), the layers' own tables included: each layer
    plans again at its next call (its pinned plans, from a checkpoint, stay pinned); and the cost model's timings,
    which ``compress``'s time budgets and ``policy="auto"`` read."""
    from .costmodel import clear_timings
    from .layer import forget_layer_plans  # layer.py builds on this module

    _PLAN_CACHE.clear()
    forget_layer_plans()
    clear_timings()


def plan_cache_info() -> dict:
    return {"plans": len(_PLAN_CACHE)}


def min_flops(out_factors, in_factors, ranks, rows: int) -> int:
    """FLOPs of the FLOP-minimal plan without caching (the MPO's intrinsic cost at ``rows``)."""
    cands = _build_candidates(tuple(out_factors), tuple(in_factors), tuple(ranks), max(int(rows), 1),
                              PlanPolicy(cache_dense=True, select="flops"), grad=True)
    return min(c.flops for c in cands)
