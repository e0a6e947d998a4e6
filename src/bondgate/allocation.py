"""Spread a global weight budget over many MPO layers.

Each layer offers a menu of truncations of its (whitened) canonical MPO — one per tolerance on a
geometric grid, each with its weight count and its exact squared error, plus "stay dense" (all its
weights, no error). :func:`allocate` picks one entry per layer minimizing ``sum_l alpha_l * err_l``
subject to ``sum_l params_l <= budget`` by the Lagrangian (equal-slope) rule of rate-distortion
theory: every layer takes the entry minimizing ``alpha_l * err + lam * params``, and ``lam`` is
bisected until the budget is met; the leftover is then spent greedily on the best error-per-weight
upgrades. Moving along a tolerance curve keeps each layer's bonds balanced; a per-channel greedy
over single bonds does not (it cuts the cheapest bond to width 1 because each of its channels frees
``n_k r_{k+1}`` weights, which destroys the layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["LayerSpectrum", "LayerMenu", "allocate", "uniform_cap", "mpo_params"]


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


@dataclass
class LayerMenu:
    """The truncations one layer can take: ``params[j]``, squared error ``errors[j]``, ``widths[j]``
    (``None`` = keep the layer dense), and the layer's error weight ``weight``. With ``leg_sizes`` and
    ``spectra`` (Schmidt values per bond) the allocator can also grow single bonds to use up the
    budget that the discrete menu leaves over."""

    params: list[int]
    errors: list[float]
    widths: list[tuple[int, ...] | None]
    weight: float = 1.0
    leg_sizes: Sequence[int] | None = None
    spectra: Sequence[torch.Tensor] | None = None


def tolerance_menu(mpo, dense_params: int, grid: Sequence[float] | None = None) -> LayerMenu:
    """A menu from truncating a canonical MPO at each relative tolerance of ``grid``.

    Errors are squared and absolute (in the MPO's own units), exact for canonical truncation.
    """
    grid = grid if grid is not None else [float(t) for t in torch.logspace(-3, math.log10(0.995), 40)]
    # Schmidt values across any cut of a canonical MPO hold its whole squared norm
    spectra = mpo.bond_spectra or []
    norm_sq = float((spectra[0].double() ** 2).sum()) if spectra else float((mpo.to_matrix().double() ** 2).sum())
    params, errors, widths = [dense_params], [0.0], [None]
    seen = set()
    rc = mpo.right_orthogonal_cores()
    for t in grid:
        cut = mpo.truncate(tol=t, right_orthogonal=rc)
        if cut.bond_dims in seen:
            continue
        seen.add(cut.bond_dims)
        params.append(cut.num_params)
        errors.append(max(cut.error - mpo.error, 0.0) ** 2 * norm_sq)  # cut.error adds this MPO's own
        widths.append(cut.bond_dims)
    legs = [o * i for o, i in zip(mpo.out_factors, mpo.in_factors)]
    return LayerMenu(params, errors, widths, leg_sizes=legs, spectra=spectra)


def _pick(menus: Sequence[LayerMenu], lam: float) -> list[int]:
    return [min(range(len(m.params)), key=lambda j: (m.weight * m.errors[j] + lam * m.params[j], m.params[j]))
            for m in menus]


def allocate(menus: Sequence[LayerMenu], budget: int) -> list[tuple[int, ...] | None]:
    """Bond widths per layer (``None`` = keep dense) with total params ``<= budget`` and minimal weighted
    error (see the module doc). Raises ``ValueError`` when even the smallest entries do not fit.
    """
    floor = sum(min(m.params) for m in menus)
    if budget < floor:
        raise ValueError(f"budget of {budget:,} weights is below the smallest possible MPOs ({floor:,} weights)")

    def total(choice):
        return sum(m.params[j] for m, j in zip(menus, choice))

    lo, hi = 0.0, 1.0
    while total(_pick(menus, hi)) > budget and hi < 1e300:  # find a lam that fits
        hi *= 10.0
    choice = _pick(menus, hi)
    for _ in range(200):  # bisect in log space between "too many params" and "fits"
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        c = _pick(menus, mid)
        if total(c) <= budget:
            hi, choice = mid, c
        else:
            lo = mid
        if hi / max(lo, 1e-300) < 1 + 1e-9:
            break
    left = budget - total(choice)
    # 1) menu upgrades with the best weighted-error decrease per extra weight that still fit
    while True:
        best = None
        for li, (m, j) in enumerate(zip(menus, choice)):
            for k in range(len(m.params)):
                extra, gain = m.params[k] - m.params[j], m.weight * (m.errors[j] - m.errors[k])
                if 0 < extra <= left and gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, li, k, extra)
        if best is None:
            break
        _, li, k, extra = best
        choice[li], left = k, left - extra
    widths = [None if m.widths[j] is None else list(m.widths[j]) for m, j in zip(menus, choice)]
    # 2) single-channel growth of any bond (next Schmidt value gained per weight added)
    while True:
        best = None
        for li, (m, w) in enumerate(zip(menus, widths)):
            if w is None or m.spectra is None or m.leg_sizes is None:
                continue
            r = [1, *w, 1]
            for k, s in enumerate(m.spectra):
                if w[k] >= s.numel():
                    continue
                extra = m.leg_sizes[k] * r[k] + m.leg_sizes[k + 1] * r[k + 2]
                gain = m.weight * float(s[w[k]]) ** 2
                if extra <= left and (best is None or gain / extra > best[0]):
                    best = (gain / extra, li, k, extra)
        if best is None:
            break
        _, li, k, extra = best
        widths[li][k] += 1
        left -= extra
    return [None if w is None else tuple(w) for w in widths]


def uniform_cap(layers: Sequence[LayerSpectrum], budget: int) -> int:
    """The largest single bond cap whose MPOs (every layer, no dense fallback) fit ``budget``."""

    def total(cap: int) -> int:
        return sum(mpo_params(layer.leg_sizes, [min(cap, f) for f in layer.full_widths]) for layer in layers)

    hi = max(max(layer.full_widths, default=1) for layer in layers)
    if total(1) > budget:
        raise ValueError(f"budget of {budget:,} weights is below bond 1 everywhere ({total(1):,} weights)")
    lo = 1
    while lo < hi:  # largest cap with total(cap) <= budget
        mid = (lo + hi + 1) // 2
        if total(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
