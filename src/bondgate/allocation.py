"""Spread a global weight budget over the bonds of many MPO layers.

Each layer arrives as the Schmidt spectra of its (whitened) canonical MPO: cutting bond ``k`` of layer
``l`` from width ``w`` to ``w - 1`` adds ``alpha_l * s_{l,k}[w-1]^2`` to the (weighted, squared) output
error and frees ``n_k w_{k-1} + n_{k+1} w_{k+1}`` weights (``n_k = out_k * in_k``; the two cores touching
the bond). Starting from every layer at full rank, :func:`allocate` repeatedly removes the channel with
the least error per freed weight until the total fits the budget (a greedy knapsack on marginal
costs; exact for convex per-bond error curves, which sorted singular values give per bond). A layer
whose MPO ends up no smaller than its dense weight is left dense and the greedy is re-run on the rest.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["LayerSpectrum", "allocate", "uniform_cap", "mpo_params"]


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


def _greedy(layers: Sequence[LayerSpectrum], budget: float) -> list[list[int]]:
    widths = [layer.full_widths for layer in layers]
    total = sum(mpo_params(layer.leg_sizes, w) for layer, w in zip(layers, widths))
    sq = [[(s.double() ** 2).tolist() for s in layer.spectra] for layer in layers]
    version: dict[tuple[int, int], int] = {}
    heap: list[tuple[float, int, int, int]] = []

    def push(li: int, k: int) -> None:
        w = widths[li]
        if w[k] <= 1:
            return
        n = layers[li].leg_sizes
        r = [1, *w, 1]
        freed = n[k] * r[k] + n[k + 1] * r[k + 2]
        cost = layers[li].weight * sq[li][k][w[k] - 1]
        v = version.get((li, k), 0) + 1
        version[(li, k)] = v
        heapq.heappush(heap, (cost / freed, li, k, v))

    for li, layer in enumerate(layers):
        for k in range(len(layer.spectra)):
            push(li, k)
    while total > budget and heap:
        _, li, k, v = heapq.heappop(heap)
        if version.get((li, k)) != v:
            continue  # stale: a neighbouring bond changed since this entry was pushed
        w = widths[li]
        before = mpo_params(layers[li].leg_sizes, w)
        w[k] -= 1
        total -= before - mpo_params(layers[li].leg_sizes, w)
        for kk in (k - 1, k, k + 1):
            if 0 <= kk < len(w):
                push(li, kk)
    return widths


def allocate(layers: Sequence[LayerSpectrum], budget: int) -> list[list[int] | None]:
    """Bond widths per layer (``None`` = keep the layer dense) with total weights ``<= budget``.

    Raises ``ValueError`` when even width 1 everywhere does not fit.
    """
    floor = sum(min(mpo_params(layer.leg_sizes, [1] * len(layer.spectra)), layer.dense_params) for layer in layers)
    if budget < floor:
        raise ValueError(f"budget of {budget:,} weights is below the smallest possible MPOs ({floor:,} weights)")
    dense: set[int] = set()
    while True:
        active = [i for i in range(len(layers)) if i not in dense]
        left = budget - sum(layers[i].dense_params for i in dense)
        widths = _greedy([layers[i] for i in active], left) if active else []
        result: list[list[int] | None] = [None] * len(layers)
        newly = set()
        for i, w in zip(active, widths):
            if mpo_params(layers[i].leg_sizes, w) >= layers[i].dense_params:
                newly.add(i)
            result[i] = w
        if not newly:
            for i in dense:
                result[i] = None
            return result
        dense |= newly


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


def predicted_error(layers: Sequence[LayerSpectrum], widths: Sequence[Sequence[int] | None]) -> float:
    """Sum over layers of ``alpha * discarded squared spectrum`` for the given widths."""
    err = 0.0
    for layer, w in zip(layers, widths):
        if w is None:
            continue
        for s, wk in zip(layer.spectra, w):
            err += layer.weight * float((s[wk:].double() ** 2).sum())
    return err if math.isfinite(err) else float("inf")
