"""Spread a global weight budget — and optionally a time or FLOP budget — over many layers.

Each layer offers a menu of what it can become, each entry with its weight count, its exact squared error (on the
whitened weight) and, for a second budget, its cost (predicted seconds or FLOPs per call, :mod:`bondgate.costmodel`):
truncations of its canonical MPO (one per tolerance on a geometric grid), truncations of its SVD (a low-rank pair,
:func:`lowrank_menu`), and "stay dense" (all its weights, no error). :func:`allocate` picks one entry per layer
minimizing ``sum_l alpha_l * err_l`` subject to ``sum_l params_l <= budget`` (and ``sum_l cost_l <= cost_budget``)
by the Lagrangian (equal-slope) rule of rate-distortion theory: every layer takes the entry minimizing
``alpha_l * err + lam * params + mu * cost``; ``lam`` is bisected until the weights fit, and ``mu`` (outside it)
until the cost fits; the leftover is then spent greedily on the best error-per-weight upgrades that keep both
budgets, first between menu entries, then one bond channel at a time. The price picks along each layer's tolerance
curve, which keeps bonds balanced where its spectra allow (a greedy that *cuts* single bonds sends the cheapest
one to width 1, because each of its channels frees ``n_k r_{k+1}`` weights, which destroys the layer); the
channel-by-channel growth after it can still leave a bond far narrower than its neighbour (widths (29, 1) on a
small MLP's layer, from a (10, 1) menu entry). It is not the exact optimum: against an exhaustive search over every
bond tuple of a 64-128-128-32 MLP (a review's measurement) its summed squared output error was 0-18% higher
depending on the ratio, ~2% against the best choice among its own menus.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["LayerSpectrum", "LayerMenu", "allocate", "uniform_widths", "mpo_params", "tolerance_menu", "lowrank_menu"]


@dataclass
class LayerSpectrum:
    """What the allocator needs to know about one layer.

    ``leg_sizes``: ``out_k * in_k`` per core; ``spectra``: per bond, descending singular values whose
    squares are that bond's error contributions; ``weight``: sensitivity ``alpha``; ``dense_params``:
    ``out_features * in_features`` (the cost of leaving the layer dense).
    """

    leg_sizes: Sequence[int]
    spectra: Sequence[torch.Tensor]
    weight: float
    dense_params: int

    @property
    def full_widths(self) -> list[int]:
        return [int(s.numel()) for s in self.spectra]


def mpo_params(leg_sizes: Sequence[int], widths: Sequence[int]) -> int:
    r = [1, *widths, 1]
    return sum(r[k] * leg_sizes[k] * r[k + 1] for k in range(len(leg_sizes)))


#: what a menu entry makes of the layer: ``None`` keeps it dense, a tuple of bond widths makes it an MPO, an int
#: rank makes it a low-rank pair
Choice = tuple[int, ...] | int | None


@dataclass
class LayerMenu:
    """The forms one layer can take: ``params[j]``, squared error ``errors[j]``, ``widths[j]`` (a
    :data:`Choice`: ``None`` = keep the layer dense, bond widths = MPO, an int = low-rank of that rank), and the
    layer's error weight ``weight``. ``costs[j]``: the entry's cost for a second budget (seconds or FLOPs per call;
    ``cost_of(widths)`` prices MPO widths off the menu). With ``leg_sizes`` and ``spectra`` (Schmidt values per
    bond) the allocator can also grow single bonds of an MPO to use up the budget that the menu leaves over."""

    params: list[int]
    errors: list[float]
    widths: list[Choice]
    weight: float = 1.0
    leg_sizes: Sequence[int] | None = None
    spectra: Sequence[torch.Tensor] | None = None
    costs: list[float] | None = None
    cost_of: Callable[[Sequence[int]], float] | None = None
    sv2: Sequence[float] | None = None  # squared singular values, for growing a low-rank entry one rank at a time
    rank_cost: Callable[[int], float] | None = None  # the cost of a rank off the menu
    rank_params: int = 0  # weights per rank (in + out)
    #: entries used only when the budget is below what the others reach (see :func:`tolerance_menu`)
    last_resort: list[bool] | None = None

    def extend(self, other: "LayerMenu") -> "LayerMenu":
        """This menu with ``other``'s entries appended (its dense entry, if any, dropped: this one has it); costs
        are set afterwards, for the whole menu."""
        keep = [j for j, w in enumerate(other.widths) if w is not None]
        if self.last_resort is not None or other.last_resort is not None:
            mine = self.last_resort or [False] * len(self.params)
            self.last_resort = mine + [bool(other.last_resort and other.last_resort[j]) for j in keep]
        self.params += [other.params[j] for j in keep]
        self.errors += [other.errors[j] for j in keep]
        self.widths += [other.widths[j] for j in keep]
        self.sv2, self.rank_params = other.sv2 or self.sv2, other.rank_params or self.rank_params
        return self


def tolerance_menu(mpo, dense_params: int, grid: Sequence[float] | None = None) -> LayerMenu:
    """A menu from truncating a canonical MPO at each relative tolerance of ``grid``, and, as a last resort, at
    every bond 1 (the smallest MPO of the layer, for a budget the grid cannot meet).

    Errors are squared and absolute (in the MPO's own units), exact for canonical truncation. The bond-1 entry is
    used only when needed: its error, like that of the grid's largest tolerance (0.995), is close to the whole
    layer's, so the errors cannot tell the two apart — but refined on the activations the wider one keeps much
    more (MiniLM at 25% of its weights, STS-B dev before healing: 80.36 without bond-1 entries, 76.89 when the
    allocator could pick them freely).
    """
    grid = grid if grid is not None else [float(t) for t in torch.logspace(-3, math.log10(0.995), 40)]
    spectra = mpo.bond_spectra or []
    params, errors, widths, last = [dense_params], [0.0], [None], [False]
    seen = set()
    rc = mpo.right_orthogonal_cores()
    # one cut at a time: near the small tolerances each is almost the whole layer (41 of them at once were the peak
    # of a LLaMA-width compress, +3.4 GB)
    cuts = ((*mpo.cut(**kw, right_orthogonal=rc), resort)
            for kw, resort in [*(({"tol": t}, False) for t in grid), ({"max_bond": 1}, True)])
    for cut, dropped_sq, resort in cuts:
        if cut.bond_dims in seen:
            continue
        seen.add(cut.bond_dims)
        params.append(cut.num_params)
        errors.append(dropped_sq)  # against this MPO (not cut.error, which is against the matrix it came from)
        widths.append(cut.bond_dims)
        last.append(resort)
    legs = [o * i for o, i in zip(mpo.out_factors, mpo.in_factors)]
    return LayerMenu(params, errors, widths, leg_sizes=legs, spectra=spectra, last_resort=last)


def _usual_entries(menu: LayerMenu) -> LayerMenu:
    """``menu`` without its last-resort entries."""
    if not menu.last_resort or not any(menu.last_resort):
        return menu
    keep = [j for j, r in enumerate(menu.last_resort) if not r]
    pick = (lambda values: None if values is None else [values[j] for j in keep])
    return dataclasses.replace(menu, params=pick(menu.params), errors=pick(menu.errors), widths=pick(menu.widths),
                               costs=pick(menu.costs), last_resort=None)


def lowrank_menu(singular_values: torch.Tensor, out_features: int, in_features: int,
                 max_entries: int = 40) -> LayerMenu:
    """Truncated SVDs of a (whitened) weight with these singular values: rank ``k`` stores ``k (in + out)``
    weights and its squared error is ``sum_{i >= k} s_i^2`` (Eckart-Young, exact). Ranks on a geometric grid,
    only those storing fewer weights than the dense layer; plus the dense entry."""
    s2 = singular_values.double().square()
    tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]).tolist() + [0.0]  # tail[k] = sum_{i >= k}
    top = min(len(s2), (out_features * in_features - 1) // (out_features + in_features))
    ranks = sorted({max(1, round(top ** (j / (max_entries - 1)))) for j in range(max_entries)} & set(range(1, top + 1)))
    return LayerMenu([out_features * in_features] + [k * (out_features + in_features) for k in ranks],
                     [0.0] + [tail[k] for k in ranks], [None, *ranks], sv2=s2.tolist(),
                     rank_params=out_features + in_features)


def _pick(menus: Sequence[LayerMenu], lam: float, mu: float = 0.0) -> list[int]:
    def score(m: LayerMenu, j: int) -> tuple:
        cost = m.costs[j] if mu and m.costs is not None else 0.0
        return m.weight * m.errors[j] + lam * m.params[j] + mu * cost, m.params[j]

    return [min(range(len(m.params)), key=lambda j: score(m, j)) for m in menus]


def _fit_params(menus: Sequence[LayerMenu], budget: int, mu: float) -> tuple[list[int], float]:
    """The choice (and its ``lam``) meeting the weight budget at cost price ``mu``, by bisection on ``lam``."""

    def total(choice):
        return sum(m.params[j] for m, j in zip(menus, choice))

    lo, hi = 0.0, 1.0
    while total(_pick(menus, hi, mu)) > budget and hi < 1e300:  # find a lam that fits
        hi *= 10.0
    choice = _pick(menus, hi, mu)
    for _ in range(200):  # bisect in log space between "too many params" and "fits"
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        c = _pick(menus, mid, mu)
        if total(c) <= budget:
            hi, choice = mid, c
        else:
            lo = mid
        if hi / max(lo, 1e-300) < 1 + 1e-9:
            break
    return choice, hi


def _cost(menus: Sequence[LayerMenu], choice: Sequence[int]) -> float:
    return sum(m.costs[j] for m, j in zip(menus, choice))


class BudgetTooSmall(ValueError):
    """The budget is below the smallest form of every layer; ``floor``: the weights of that smallest form."""

    def __init__(self, message: str, floor: int):
        super().__init__(message)
        self.floor = floor


class BudgetConflict(ValueError):
    """Each budget can be met alone, but the choice the heuristic found does not meet both (a choice meeting both
    may exist: 1 of 242 such refusals in a review's brute force over small menus); ``least``: the cost of the
    choice found within the weight budget."""

    def __init__(self, message: str, least: float):
        super().__init__(message)
        self.least = least


def allocate(menus: Sequence[LayerMenu], budget: int, cost_budget: float | None = None) -> list[Choice]:
    """One :data:`Choice` per layer (``None`` = keep dense, bond widths = MPO, an int = low-rank) with total params
    ``<= budget``, total cost ``<= cost_budget`` (when given; every menu needs ``costs``) and a low weighted
    error (see the module doc): a heuristic — a price picks from each menu's lower convex hull, then what is left
    is spent greedily — not an exact minimum, and in rare cases a larger budget ends a little worse. Raises
    ``ValueError`` when even the smallest entries do not fit, :class:`BudgetConflict` when each budget can be met
    but the choice found does not meet both (never a choice over either budget).
    """
    usual = [_usual_entries(m) for m in menus]
    if budget >= sum(min(m.params) for m in usual) and (cost_budget is None or any(m.costs is None for m in usual)
                                                        or sum(min(m.costs) for m in usual) <= cost_budget):
        menus = usual  # the last-resort entries only for budgets the others cannot meet
    floor = sum(min(m.params) for m in menus)
    if budget < floor:
        raise ValueError(f"budget of {budget:,} weights is below the smallest possible factored layers ({floor:,} "
                         f"weights)")
    mu = 0.0
    choice, _ = _fit_params(menus, budget, mu)
    if cost_budget is not None:
        if any(m.costs is None for m in menus):
            raise ValueError("a cost budget needs the cost of every menu entry")
        cheapest = sum(min(c for c, p in zip(m.costs, m.params)) for m in menus)
        if cheapest > cost_budget:
            raise ValueError(f"the cost budget {cost_budget:.4g} is below the cheapest forms of these layers "
                             f"({cheapest:.4g})")
        if _cost(menus, choice) > cost_budget:  # raise the price of cost until the choice fits both budgets
            lo, hi = 0.0, 1.0
            while _cost(menus, _fit_params(menus, budget, hi)[0]) > cost_budget and hi < 1e300:
                hi *= 10.0
            choice = _fit_params(menus, budget, hi)[0]
            for _ in range(100):
                mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
                c = _fit_params(menus, budget, mid)[0]
                if _cost(menus, c) <= cost_budget:
                    hi, choice = mid, c
                else:
                    lo = mid
                if hi / max(lo, 1e-300) < 1 + 1e-6:
                    break
    left = budget - sum(m.params[j] for m, j in zip(menus, choice))
    spare = math.inf if cost_budget is None else cost_budget - _cost(menus, choice)
    # 1) menu upgrades with the best weighted-error decrease per extra weight that still fit both budgets
    while True:
        best = None
        for li, (m, j) in enumerate(zip(menus, choice)):
            for k in range(len(m.params)):
                extra, gain = m.params[k] - m.params[j], m.weight * (m.errors[j] - m.errors[k])
                more = 0.0 if cost_budget is None else m.costs[k] - m.costs[j]
                if 0 < extra <= left and more <= spare and gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, li, k, extra, more)
        if best is None:
            break
        _, li, k, extra, more = best
        choice[li], left, spare = k, left - extra, spare - more
    picked = [m.widths[j] for m, j in zip(menus, choice)]
    widths = [list(w) if isinstance(w, tuple) else w for w in picked]
    # 2) single-channel growth of an MPO's bond (next Schmidt value gained per weight added), or of a low-rank
    # layer's rank (next singular value)
    while True:
        best = None
        for li, (m, w) in enumerate(zip(menus, widths)):
            if isinstance(w, int) and m.sv2 is not None and w < len(m.sv2) \
                    and (w + 1) * m.rank_params < m.params[0]:  # still smaller than dense
                more = 0.0 if cost_budget is None else (m.rank_cost(w + 1) - m.rank_cost(w) if m.rank_cost else None)
                gain = m.weight * m.sv2[w]
                if more is not None and m.rank_params <= left and more <= spare \
                        and (best is None or gain / m.rank_params > best[0]):
                    best = (gain / m.rank_params, li, None, m.rank_params, more)
                continue
            if not isinstance(w, list) or m.spectra is None or m.leg_sizes is None:
                continue
            r = [1, *w, 1]
            for k, s in enumerate(m.spectra):
                if w[k] >= s.numel():
                    continue
                extra = m.leg_sizes[k] * r[k] + m.leg_sizes[k + 1] * r[k + 2]
                gain = m.weight * float(s[w[k]]) ** 2
                more = 0.0
                if cost_budget is not None:
                    if m.cost_of is None:
                        continue
                    more = m.cost_of([*w[:k], w[k] + 1, *w[k + 1:]]) - m.cost_of(w)
                if gain > 0 and extra <= left and more <= spare and (best is None or gain / extra > best[0]):
                    best = (gain / extra, li, k, extra, more)
        if best is None:
            break
        _, li, k, extra, more = best
        if k is None:
            widths[li] += 1
        else:
            widths[li][k] += 1
        left, spare = left - extra, spare - more
    if left < 0 or spare < 0:  # the upgrades above can lower the cost; what is still over is a conflict
        if cost_budget is None:
            raise ValueError(f"no choice found within {budget:,} weights")
        raise BudgetConflict(f"no choice found meets both the cost budget {cost_budget:.4g} and the weight budget "
                             f"{budget:,}: the one found costs {cost_budget - spare:.4g} with {budget - left:,} weights",
                             cost_budget - spare)
    return [tuple(w) if isinstance(w, list) else w for w in widths]


def uniform_widths(layers: Sequence[LayerSpectrum], budget: int) -> list[list[int] | None]:
    """One bond cap for every layer, the largest that fits ``budget``: each layer's bond widths at that cap, or
    ``None`` (kept dense) for a layer whose MPO at the cap would hold at least its dense weights (a small layer
    would otherwise grow, and ``param_ratio=1`` would still factor every layer)."""

    def widths(layer: LayerSpectrum, cap: int) -> list[int]:
        return [min(cap, f) for f in layer.full_widths]

    def total(cap: int) -> int:
        return sum(min(mpo_params(layer.leg_sizes, widths(layer, cap)), layer.dense_params) for layer in layers)

    hi = max(max(layer.full_widths, default=1) for layer in layers)
    if total(1) > budget:
        raise BudgetTooSmall(f"budget of {budget:,} weights is below bond 1 everywhere ({total(1):,} weights)",
                             total(1))
    lo = 1
    while lo < hi:  # largest cap with total(cap) <= budget (total grows with the cap)
        mid = (lo + hi + 1) // 2
        if total(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return [w if mpo_params(layer.leg_sizes, w) < layer.dense_params else None
            for layer, w in ((layer, widths(layer, lo)) for layer in layers)]
