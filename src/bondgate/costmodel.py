"""What a layer costs per call, by factorization: the FLOPs and the predicted and measured time of a dense layer, a
low-rank pair ``U @ V`` and an MPO, at the row count a model is deployed with. :func:`bondgate.compress` spends
a latency or FLOP budget with these (``CompressionConfig(max_latency_ratio=..., flops_ratio=...)``) and picks
each MPO layer's kernel policy by them (``policy="auto"``).

Time model, per kind: ``t = overhead + flops / throughput``, both fitted on this machine from two timed layers of
that kind at the layer's own shape and row count (one dense timing suffices). An MPO is timed through the planner
(its memory-mode plan, autotuned), so its throughput includes the thin GEMMs and permutes that make an MPO slower
than its FLOPs suggest. Predictions are approximate; :func:`measure` gives the real time of a built layer.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .calibration import eval_mode

__all__ = ["mpo_flops", "lowrank_flops", "full_widths", "KindTimes", "calibrate", "calibrate_dense", "measure",
           "paired_seconds"]


def _sweep(out_f: Sequence[int], in_f: Sequence[int], widths: Sequence[int], rows: int) -> int:
    from .planner import sweep_flops

    return rows * min(sweep_flops(out_f, in_f, widths, False), sweep_flops(out_f, in_f, widths, True))


def mpo_flops(out_f: Sequence[int], in_f: Sequence[int], widths: Sequence[int], rows: int) -> int:
    """FLOPs of an MPO layer's call of ``rows`` rows: the cheaper sweep, or rebuilding the weight and one GEMM
    (what the planner falls back to at large row counts). Closed form, cheap enough for every menu entry.

    An upper bound on the FLOP-minimal plan's cost (a plan chosen by timing may run more FLOPs where that is faster;
    ``CompressionConfig(flops_ratio=...)`` therefore has its layers choose by FLOPs): the planner's plans also
    contract cores with each other before the input (``planner.min_flops``, ~5 ms per call, too slow for a menu),
    which for 4 or more cores, or uneven factors, can be cheaper (measured on model layers at 1-16 rows: 1.0x-1.1x for
    3 cores, 1.3x-1.9x for 4; on random shapes, 1,000 per core count with factors from {2, 3, 4, 5, 8}, every bond
    uniform in [2, its full width], each at 1, 16 and 256 rows: median 1.0x, 1.25x, 1.7x and 2.6x for 3, 4, 5 and 6
    cores, 99th percentile 2.8x, 6.5x, 11x and 27x, worst 7.5x, 19x, 61x and 99x, each where a bond of 2 or 3 sits
    beside a wide one; a bond of width 1 splits the MPO into a Kronecker product whose cores-first contraction this
    form misses: 10-12x at 3 cores, e.g. 512x1024 at bonds (1, 64)). A FLOP budget is then met with that margin
    (such layers look costlier than they run, so a tight ``flops_ratio`` can take more of their weights than it
    needs), and a time budget's fitted throughput absorbs part of it."""
    r = [1, *widths, 1]
    rebuild, acc = 0, out_f[0] * in_f[0] * r[1]
    for k in range(1, len(out_f)):
        rebuild += 2 * acc * out_f[k] * in_f[k] * r[k + 1]
        acc = acc // r[k] * out_f[k] * in_f[k] * r[k + 1]
    return min(_sweep(out_f, in_f, widths, rows), rebuild + 2 * rows * math.prod(out_f) * math.prod(in_f))


def lowrank_flops(out_features: int, in_features: int, rank: int, rows: int) -> int:
    return 2 * rows * rank * (in_features + out_features)


def full_widths(out_f: Sequence[int], in_f: Sequence[int]) -> tuple[int, ...]:
    """The bond widths of an exact MPO with these factors (the rank bound across each cut)."""
    legs = [o * i for o, i in zip(out_f, in_f)]
    return tuple(min(math.prod(legs[: k + 1]), math.prod(legs[k + 1 :])) for k in range(len(legs) - 1))


def _reps(fn: Callable[[], object], sync: Callable[[], None], min_time: float) -> int:
    """Calls per timed sample: enough to last ``min_time`` at the fastest of three calls, after a warm-up call."""
    fn()
    sync()
    one = float("inf")
    for _ in range(3):  # the fastest of three: one stalled call made reps 1, so every sample was one exposed call
        t0 = time.perf_counter()
        fn()
        sync()
        one = min(one, time.perf_counter() - t0)
    return max(1, int(min_time / max(one, 1e-7)))


def _sample(fn: Callable[[], object], sync: Callable[[], None], reps: int) -> float:
    """Seconds per call of ``reps`` calls of ``fn`` in a row."""
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def _median_seconds(fn: Callable[[], object], sync: Callable[[], None], min_time: float = 0.02,
                    rounds: int = 5) -> float:
    reps = _reps(fn, sync, min_time)
    return statistics.median(_sample(fn, sync, reps) for _ in range(rounds))


def measure(layer: nn.Module, rows: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
            min_time: float = 0.02) -> float:
    """Median seconds of one inference call of ``layer`` on ``rows`` random rows (eval, no grad; plans made first)."""
    p = next(layer.parameters(), None)
    if p is None and (dtype is None or device is None):
        raise ValueError(f"measure: {type(layer).__name__} has no parameters to take the dtype and device from; "
                         "pass dtype= and device=")
    dtype, device = dtype or p.dtype, device or p.device
    x = torch.randn(rows, layer.in_features, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with eval_mode(layer), torch.no_grad():
        return _median_seconds(lambda: layer(x), sync, min_time)


def paired_seconds(layer: nn.Module, rows: int, rounds: int = 5, min_time: float = 0.004) -> tuple[float, float]:
    """``(layer, dense)``: median seconds of one inference call of ``layer`` (an MPO or low-rank layer) and of
    an ``nn.Linear`` with its dense weight and bias (a module call, as ``layer``'s), on the same ``rows`` random rows,
    timed in ``rounds`` rounds of
    alternating order, so that a slow stretch of a shared machine hits both alike (a dense time measured apart,
    under a burst of load, was 9x too slow and made slower factors look faster)."""
    p = next(layer.parameters())
    x = torch.randn(rows, layer.in_features, dtype=p.dtype, device=p.device)
    sync = torch.cuda.synchronize if p.device.type == "cuda" else (lambda: None)
    with eval_mode(layer), torch.no_grad():
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=p.device,
                          dtype=p.dtype)
        dense.weight.copy_(layer.weight_matrix())
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
        fns = [lambda: layer(x), lambda: dense(x)]
        reps = [_reps(fn, sync, min_time) for fn in fns]  # plans made, kept operands built
        samples: list[list[float]] = [[], []]
        for k in range(rounds):
            for i in (0, 1) if k % 2 == 0 else (1, 0):
                samples[i].append(_sample(fns[i], sync, reps[i]))
    return statistics.median(samples[0]), statistics.median(samples[1])


@dataclass
class KindTimes:
    """Fitted time model of one layer shape at ``rows`` rows: seconds of the dense layer, and
    ``(overhead seconds, FLOPs per second)`` of its low-rank and MPO forms; ``speed_s``: seconds of an MPO layer that
    runs its kept dense weight (speed mode: the dense product behind the MPO layer's call)."""

    rows: int
    dense_s: float
    dense_flops: int
    lowrank: tuple[float, float]
    mpo: tuple[float, float]
    speed_s: float | None = None

    def lowrank_s(self, out_features: int, in_features: int, rank: int) -> float:
        a, thr = self.lowrank
        return a + lowrank_flops(out_features, in_features, rank, self.rows) / thr

    def mpo_s(self, out_f: Sequence[int], in_f: Sequence[int], widths: Sequence[int]) -> float:
        a, thr = self.mpo
        return a + mpo_flops(out_f, in_f, widths, self.rows) / thr


FIT_MAX_SPEEDUP = 10.0  # the fitted throughput is at most this many times the larger point's flops / seconds


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """``(overhead, throughput)`` of ``t = a + flops / thr`` through two (flops, seconds) points (clamped sane:
    ``a >= 0``, ``thr <= FIT_MAX_SPEEDUP * flops / seconds`` of the larger point)."""
    (f0, t0), (f1, t1) = sorted(points)
    if f1 > f0 and t1 > t0:
        # a time difference lost in the noise gave any throughput (6.7e12 FLOP/s on one CPU thread); capped, the
        # line passes at most t1 / FIT_MAX_SPEEDUP above the larger point
        thr = min((f1 - f0) / (t1 - t0), FIT_MAX_SPEEDUP * f1 / t1)
        return max(t0 - f0 / thr, 0.0), thr
    # noise made the line fall: the time hardly depends on the FLOPs here (a small layer's call is mostly overhead).
    # The flattest line allowed through the faster point; a line through the origin predicted a pair timed at 20 us
    # at 4 us, and a latency budget was met on paper by a layer 3.7x slower than dense.
    t = max(min(t0, t1), 1e-9)
    thr = FIT_MAX_SPEEDUP * f1 / t
    return t - f1 / thr, thr


def calibrate_dense(out_features: int, in_features: int, rows: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> float:
    """Median seconds of a dense layer's call (an ``nn.Linear`` with a bias, called as a module, as the factored forms
    are timed) of ``rows`` rows (cached per shape, dtype, device and torch's thread count)."""
    return _calibrate_dense(int(out_features), int(in_features), int(rows), dtype, torch.device(device),
                            torch.get_num_threads())


@functools.lru_cache(maxsize=256)
def _calibrate_dense(out_features: int, in_features: int, rows: int, dtype: torch.dtype, device: torch.device,
                     threads: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=gen).to(device=device, dtype=dtype)
    dense = nn.Linear(in_features, out_features, device=device, dtype=dtype).eval()
    with torch.no_grad():
        return _median_seconds(lambda: dense(x), sync)


@functools.lru_cache(maxsize=256)
def _calibrate(out_features: int, in_features: int, out_f: tuple[int, ...], in_f: tuple[int, ...],
               full_widths: tuple[int, ...], rows: int, dtype: torch.dtype, device: torch.device,
               threads: int) -> KindTimes:
    from .layer import MPOLinear
    from .lowrank import LowRankLinear
    from .mpo import MPO

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=gen).to(device=device, dtype=dtype)
    dense_s = calibrate_dense(out_features, in_features, rows, dtype, device)
    with torch.no_grad():
        lr_points, mpo_points = [], []
        top = min(out_features, in_features)
        for rank in sorted({max(1, top // 16), min(top, max(2, top // 4))}):  # a 1-wide layer has rank 1 only
            lr = LowRankLinear(in_features, out_features, rank, device=device, dtype=dtype).eval()
            lr_points.append((lowrank_flops(out_features, in_features, rank, rows), _median_seconds(lambda: lr(x), sync)))
        for frac in (0.125, 0.5):
            widths = tuple(max(1, math.ceil(frac * w)) for w in full_widths)
            mpo = MPO.random(math.prod(out_f), math.prod(in_f), list(widths), in_factors=in_f, out_factors=out_f,
                             dtype=dtype, generator=gen)
            bias = torch.zeros(out_features, dtype=dtype)
            layer = MPOLinear.from_mpo(MPO(mpo.cores, out_features, in_features), bias).to(device).eval()
            mpo_points.append((mpo_flops(out_f, in_f, widths, rows), _median_seconds(lambda: layer(x), sync)))
        layer = MPOLinear.from_mpo(MPO(mpo.cores, out_features, in_features), bias, policy="speed").to(device).eval()
        speed_s = _median_seconds(lambda: layer(x), sync)
    if len(lr_points) == 1:
        lr_points.append((2 * lr_points[0][0], 2 * lr_points[0][1]))
    return KindTimes(rows, dense_s, 2 * rows * out_features * in_features, _fit(lr_points), _fit(mpo_points),
                     speed_s)


def calibrate(out_features: int, in_features: int, out_f: Sequence[int], in_f: Sequence[int],
              full_widths: Sequence[int], rows: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> KindTimes:
    """The fitted :class:`KindTimes` of a layer shape (cached per shape, row count, dtype, device and torch's thread
    count)."""
    return _calibrate(int(out_features), int(in_features), tuple(out_f), tuple(in_f), tuple(full_widths),
                      int(rows), dtype, torch.device(device), torch.get_num_threads())


def clear_timings() -> None:
    """Forget the cached timings (:func:`calibrate`, :func:`calibrate_dense`): the next call measures again."""
    _calibrate.cache_clear()
    _calibrate_dense.cache_clear()
