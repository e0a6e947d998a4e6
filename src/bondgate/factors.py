"""How a layer dimension is split into MPO legs.

Policy (used whenever the caller gives no factors):

1. Take the most balanced exact factorization of ``n`` into ``d`` factors (smallest largest factor,
   then largest smallest factor). Accept it when its largest factor is at most ``2 * n**(1/d)``.
2. Otherwise ``n`` has a large prime factor (62 = 2*31, 777 = 3*7*37, 30522 = 2*3*5087) and any exact
   split leaves one huge leg, which makes that core as big as a dense slice of the matrix. We **pad**
   instead: the smallest ``n' > n`` whose balanced factorization has its largest factor at most
   ``1.5 * n'**(1/d)``. Padding is chosen over uneven factors because a padded leg costs at most a few
   percent of extra weights (in 3 cores: 62 -> 64, 777 -> 780, 30522 -> 30525), while an uneven leg (31 or 5087)
   multiplies a core's size by that prime. The padded input columns only ever see zeros (the input is
   zero-padded) and the padded output rows are sliced off, so nothing padded reaches an output.
3. Order: input factors descending, output factors ascending. For a left-to-right contraction the
   cost of core k is proportional to ``r_{k-1} r_k / (prod_{i<k} m_i * prod_{i>k} n_i)`` (the FLOP
   law of a left-to-right sweep: core k meets the row's input legs not yet contracted and the output
   legs made so far), so large input legs first and large output legs last keep the middle cores,
   where the bonds are widest, cheap; it also keeps ``m_k * n_k`` balanced, which keeps the maximal
   bond ranks balanced.
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache

from ._checks import number, positive_int

__all__ = ["balanced_factors", "choose_factors", "factorize_shape"]


MAX_LEGS = 256  # the factor search recurses once per leg (2,000 legs ran out of Python's stack)
MAX_DIM = 2**32  # the largest dimension factored (every size up to it takes well under a second)


def _validate(n: int, d: int, name: str = "dimension") -> tuple[int, int]:
    n, d = positive_int(n, name), positive_int(d, "num_cores")
    if n > MAX_DIM:  # the factor search takes time that grows with n: minutes past 2**60
        raise ValueError(f"{name} must be at most 2**32 = {MAX_DIM} (a weight dimension bondgate factors), got {n}")
    if d > MAX_LEGS:
        raise ValueError(f"num_cores must be at most {MAX_LEGS}, got {d} (an MPO layer takes at most 17)")
    return n, d


def balanced_factors(n: int, d: int) -> tuple[int, ...]:
    """The most balanced factorization of ``n`` into exactly ``d`` factors (ascending, 1s allowed)."""
    return _balanced(*_validate(n, d))


@lru_cache(maxsize=4096)
def _balanced(n: int, d: int) -> tuple[int, ...]:
    best: tuple[int, ...] | None = None

    def key(f: tuple[int, ...]) -> tuple[int, int]:
        return (max(f), -min(f))

    def rec(rest: int, k: int, lo: int, acc: tuple[int, ...]) -> None:
        nonlocal best
        if k == 1:
            if rest >= lo:
                cand = acc + (rest,)
                if best is None or key(cand) < key(best):
                    best = cand
            return
        # factors ascending: the next one is at most rest**(1/k)
        hi = int(round(rest ** (1.0 / k))) + 1
        for f in range(lo, hi + 1):
            if rest % f == 0 and f ** k <= rest:
                rec(rest // f, k - 1, f, acc + (f,))

    rec(n, d, 1, ())
    assert best is not None and math.prod(best) == n
    return best


def _smooth(m: int, cap: float) -> bool:
    """Whether every prime factor of ``m`` is at most ``cap``."""
    for p in range(2, int(cap) + 1):
        while m % p == 0:
            m //= p
    return m == 1


def choose_factors(n: int, d: int, max_pad: float | None = None) -> tuple[int, tuple[int, ...]]:
    """Pick ``(padded_n, factors)`` for one dimension, ascending factors (see the module policy).

    ``padded_n >= n`` and ``prod(factors) == padded_n``; ``padded_n == n`` unless ``n`` has a prime
    factor too large for a balanced split. The smallest suitable padded size is taken.

    ``max_pad``: the most padding allowed, a fraction of ``n`` (``padded_n <= n * (1 + max_pad)``); ``None``
    (default) allows up to ``2 * n``, which small sizes in many cores need (41 in 4 cores pads to 54, 32% more,
    where 41 itself would be legs ``(1, 1, 1, 41)``). When no size qualifies, ``n`` is returned unpadded with
    its balanced factors.
    """
    n, d = _validate(n, d)
    max_pad = number(max_pad, "max_pad", low=0, none_ok=True,
                     hint="the extra size allowed, a fraction of n")
    f = _balanced(n, d)
    if d == 1 or max(f) <= 2.0 * n ** (1.0 / d):
        return n, f
    # small n in many cores (41 in 4: 41 -> (1, 1, 1, 41)): by default the search pads up to 2n rather than keep a
    # leg that is all of n
    top = 2 * n if max_pad is None else int(n * (1 + max_pad) + 1e-9)
    for m in range(n + 1, top + 1):
        cap = 1.5 * m ** (1.0 / d)
        if _smooth(m, cap):  # necessary for a split with no factor above cap; much cheaper than the search
            g = _balanced(m, d)
            if max(g) <= cap:
                return m, g
    return n, f  # a tiny n in many cores (3 in 5: (1, 1, 1, 1, 3)): nothing padded is more balanced


def factorize_shape(
    out_features: int,
    in_features: int,
    num_cores: int,
    out_factors: tuple[int, ...] | list[int] | None = None,
    in_factors: tuple[int, ...] | list[int] | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return ``(out_factors, in_factors)`` for a ``(out_features, in_features)`` matrix.

    Given factors must multiply exactly to their dimension; missing ones follow the module policy
    with ``len(given factors)`` cores (or ``num_cores``). Auto factors may pad (product > dim).
    """
    d = num_cores
    given = {}
    for name, fac in (("out_factors", out_factors), ("in_factors", in_factors)):
        if fac is not None:
            fac = tuple(fac)
            if not fac or any(not isinstance(f, numbers.Integral) or isinstance(f, bool) or f < 1 for f in fac):
                raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {fac!r}")
            given[name] = tuple(int(f) for f in fac)
            if d != len(fac) and (out_factors is None or in_factors is None or name == "out_factors"):
                d = len(fac)
    if out_factors is not None and in_factors is not None and len(out_factors) != len(in_factors):
        raise ValueError(
            f"in_factors {tuple(in_factors)} and out_factors {tuple(out_factors)} must have the same length"
            " (one input and one output leg per core)"
        )
    out_features, d = _validate(out_features, d, "out_features")
    in_features, d = _validate(in_features, d, "in_features")
    out_factors, in_factors = given.get("out_factors"), given.get("in_factors")
    if out_factors is not None:
        out_f = tuple(out_factors)
        if math.prod(out_f) != out_features:
            raise ValueError(
                f"out_factors {out_f} multiply to {math.prod(out_f)}, but out_features is {out_features}"
            )
    else:
        out_f = choose_factors(out_features, d)[1]  # ascending
    if in_factors is not None:
        in_f = tuple(in_factors)
        if math.prod(in_f) != in_features:
            raise ValueError(f"in_factors {in_f} multiply to {math.prod(in_f)}, but in_features is {in_features}")
    else:
        in_f = tuple(reversed(choose_factors(in_features, d)[1]))  # descending
    return out_f, in_f
