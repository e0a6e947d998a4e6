"""Matrix-product operators: TT-SVD, reconstruction, canonical form and truncation.

An MPO of a matrix ``W`` of shape ``(out_features, in_features)`` (the ``nn.Linear.weight`` layout) is a
chain of cores ``G_k`` of shape ``(r_{k-1}, out_k, in_k, r_k)`` with ``r_0 = r_d = 1`` and

    W[(o_1..o_d), (i_1..i_d)] = G_1[:, o_1, i_1, :] @ G_2[:, o_2, i_2, :] @ ... @ G_d[:, o_d, i_d, :]

where ``(o_1..o_d)`` and ``(i_1..i_d)`` are row-major multi-indices. When a dimension is padded (see
:mod:`bondgate.factors`), the matrix is the operator's leading ``(out_features, in_features)`` block
(:meth:`MPO.to_matrix`); the rest of the operator is zero for an exact TT-SVD of the zero-padded matrix, but not
in general once bonds are cut (or for random and trained cores). A layer never uses it: its input is zero-padded
and its padded output rows are dropped.

Why not ``tensorly.decomposition.tensor_train_matrix``: it takes fixed ranks only, cannot truncate to
a tolerance and does not report the discarded weight, which the error report and the budget allocator
need. Our TT-SVD is the same algorithm (Oseledets 2011) with those additions; the tests cross-check
the reconstruction against ``tensorly.tt_matrix_to_matrix``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ._checks import number, positive_int
from .factors import factorize_shape

__all__ = ["MPO"]

BondSpec = int | Sequence[int | None] | None
# a truncation keeps its sweep's bond spectra while what its later bonds drop is at most this fraction of its norm
# (float64 rounding: zero Schmidt values of a rank-deficient MPO); beyond, they are not the result's (None)
SPECTRA_RTOL = 1e-12


def _check_matrix(W: torch.Tensor) -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        try:
            W = torch.as_tensor(W)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise TypeError(f"expected a 2-D tensor or array, got {type(W).__name__}") from exc
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix of shape (out_features, in_features), got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"expected a floating-point matrix, got dtype {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"cannot decompose an empty matrix of shape {tuple(W.shape)}")
    if W.is_meta:
        raise ValueError("the matrix (a layer's weight) is on the meta device: a shape without values, nothing to "
                         "factor; load or materialize the weights first")
    if not torch.isfinite(W).all():
        raise ValueError("the matrix contains NaN or Inf values; refusing to decompose it")
    return W


def _bond_caps(max_bond: BondSpec, nbonds: int) -> list[int | None]:
    if max_bond is None:
        return [None] * nbonds
    if isinstance(max_bond, bool):
        raise TypeError("max_bond must be an int, a sequence of ints/None, or None")
    if isinstance(max_bond, numbers.Integral):
        caps: list[int | None] = [int(max_bond)] * nbonds
    elif isinstance(max_bond, Sequence) and not isinstance(max_bond, str):
        caps = [None if c is None else int(c) if isinstance(c, numbers.Integral) and not isinstance(c, bool) else c
                for c in max_bond]
    else:
        raise TypeError(f"max_bond must be an int, a sequence of ints/None, or None; got {max_bond!r}")
    if len(caps) != nbonds:
        raise ValueError(f"max_bond has {len(caps)} entries but the MPO has {nbonds} bonds")
    for c in caps:
        if c is not None and (isinstance(c, bool) or not isinstance(c, int)):
            raise TypeError(f"max_bond entries must be ints or None, got {c!r}")
        if c is not None and c < 1:
            raise ValueError(f"max_bond must be >= 1, got {c}")
    return caps


def _check_tol(tol: float | None) -> None:
    if tol is None:
        return
    number(tol, "tol", low=0, high=1, high_open=True, hint="a relative Frobenius error")


def _keep_rank(S: torch.Tensor, cap: int | None, allowed_sq: float | None) -> int:
    """Smallest rank whose discarded squared mass fits ``allowed_sq``, then capped by ``cap``."""
    r = S.numel()
    if allowed_sq is not None:
        tail = torch.flip(torch.cumsum(torch.flip(S.double() ** 2, [0]), 0), [0])  # tail[j] = sum S[j:]^2
        ok = (tail <= allowed_sq).nonzero()
        r = int(ok[0]) if ok.numel() else r
    if cap is not None:
        r = min(r, cap)
    return max(r, 1)


@dataclass
class MPO:
    """A matrix-product operator of an ``(out_features, in_features)`` matrix.

    Attributes:
        cores: list of ``d`` tensors, core ``k`` of shape ``(r_{k-1}, out_k, in_k, r_k)``.
        out_features, in_features: the true (unpadded) matrix shape.
        error: relative Frobenius error ``||W - W_mpo||_F / ||W||_F`` against the matrix it was built
            from (exact when ``error_exact``; otherwise an upper bound).
        bond_spectra: per bond, the Schmidt (singular) values of the MPO across that cut, descending,
            when the MPO is in canonical form (:meth:`from_matrix`, :meth:`canonicalize`, and a :meth:`truncate`
            that cut nothing after its first bond but rounding: within ``SPECTRA_RTOL`` of the norm); ``None``
            otherwise.
        source_norm: ``||W||_F`` of that matrix while the MPO is an orthogonal projection of it (TT-SVD by
            :meth:`from_matrix` in 32 or 64 bits, and truncations since), else ``None``; :meth:`truncate` then
            reports the error against ``W`` from the norms alone.
    """

    cores: list[torch.Tensor]
    out_features: int
    in_features: int
    error: float = 0.0
    error_exact: bool = True
    bond_spectra: list[torch.Tensor] | None = field(default=None, repr=False)
    source_norm: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.cores:
            raise ValueError("an MPO needs at least one core")
        prev, c0 = 1, self.cores[0]
        for k, c in enumerate(self.cores):
            if not isinstance(c, torch.Tensor):
                raise TypeError(f"cores must be tensors, got a {type(c).__name__} for core {k}")
            if not c.is_floating_point():
                raise TypeError(f"cores must be floating point, got dtype {c.dtype} for core {k}")
            if c.dtype != c0.dtype or c.device != c0.device:
                raise TypeError(f"cores must share one dtype and device: core 0 is {c0.dtype} on {c0.device}, core {k} "
                                f"{c.dtype} on {c.device}")
            if c.ndim != 4:
                raise ValueError(f"core {k} must have 4 dims (r_prev, out_k, in_k, r_next), got {tuple(c.shape)}")
            if c.shape[0] != prev:
                raise ValueError(f"core {k} has left bond {c.shape[0]}, expected {prev}")
            prev = c.shape[3]
        if prev != 1:
            raise ValueError(f"the last core must have right bond 1, got {prev}")
        self.out_features, self.in_features = (positive_int(self.out_features, "out_features"),
                                               positive_int(self.in_features, "in_features"))
        if self.padded_out < self.out_features or self.padded_in < self.in_features:
            raise ValueError(
                f"factors {self.out_factors} x {self.in_factors} cannot hold a "
                f"({self.out_features}, {self.in_features}) matrix"
            )

    # ------------------------------------------------------------------ shape facts
    @property
    def num_cores(self) -> int:
        """Number of cores ``d`` (``len(cores)``)."""
        return len(self.cores)

    @property
    def out_factors(self) -> tuple[int, ...]:
        """Output leg sizes ``(out_1, ..., out_d)``; their product is :attr:`padded_out`."""
        return tuple(int(c.shape[1]) for c in self.cores)

    @property
    def in_factors(self) -> tuple[int, ...]:
        """Input leg sizes ``(in_1, ..., in_d)``; their product is :attr:`padded_in`."""
        return tuple(int(c.shape[2]) for c in self.cores)

    @property
    def padded_out(self) -> int:
        """``prod(out_factors)``: rows of the operator, ``>= out_features`` (larger when the rows are padded)."""
        return math.prod(self.out_factors)

    @property
    def padded_in(self) -> int:
        """``prod(in_factors)``: columns of the operator, ``>= in_features`` (larger when the columns are padded)."""
        return math.prod(self.in_factors)

    @property
    def bond_dims(self) -> tuple[int, ...]:
        """Inner bond dimensions ``(r_1, ..., r_{d-1})``."""
        return tuple(int(c.shape[3]) for c in self.cores[:-1])

    @property
    def num_params(self) -> int:
        """Entries held by the cores, ``sum_k r_{k-1} out_k in_k r_k`` (a count of numbers, not bytes)."""
        return sum(c.numel() for c in self.cores)

    @property
    def dtype(self) -> torch.dtype:
        """The cores' dtype (read from the first core)."""
        return self.cores[0].dtype

    def max_bond_dims(self) -> tuple[int, ...]:
        """The largest useful rank at each cut: ``min(prod of legs on the left, on the right)``."""
        sizes = [o * i for o, i in zip(self.out_factors, self.in_factors)]
        return tuple(min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_matrix(
        cls,
        W: torch.Tensor,
        num_cores: int = 4,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        max_bond: BondSpec = None,
        tol: float | None = None,
    ) -> "MPO":
        """Decompose ``W`` (shape ``(out_features, in_features)``) by TT-SVD.

        Args:
            num_cores: number of cores ``d`` (ignored when factors are given; their length wins).
            in_factors / out_factors: leg sizes per core; must multiply exactly to the dimension.
                Chosen by :func:`bondgate.factors.factorize_shape` when omitted (may pad).
            max_bond: cap on every bond (int) or per bond (sequence of ``d-1`` ints/None).
            tol: relative Frobenius tolerance on the whole matrix: the result satisfies
                ``||W - W_mpo|| <= tol * ||W||``. The unused part of each bond's share of the budget
                is passed on to the next bond. With ``max_bond`` as well, the caps are hard and win:
                the error may then exceed ``tol`` (``error`` reports it).

        The SVDs run in float64; cores are returned in ``W``'s dtype, in left-canonical form with
        every bond's channels ordered by decreasing Schmidt value (see :meth:`canonicalize`). In a 16-bit
        dtype ``error`` includes the cores' rounding (so it may exceed ``tol``).
        """
        W = _check_matrix(W)
        _check_tol(tol)
        num_cores = positive_int(num_cores, "num_cores")
        N, M = W.shape
        out_f, in_f = factorize_shape(N, M, num_cores, out_factors, in_factors)
        d = len(out_f)
        caps = _bond_caps(max_bond, d - 1)
        Np, Mp = math.prod(out_f), math.prod(in_f)

        A = W.detach().to(torch.float64)
        if (Np, Mp) != (N, M):
            A = torch.nn.functional.pad(A, (0, Mp - M, 0, Np - N))
        # (o_1..o_d, i_1..i_d) -> (o_1, i_1, o_2, i_2, ...)
        T = A.reshape(*out_f, *in_f).permute(*[j for k in range(d) for j in (k, d + k)])
        norm_sq = float((A * A).sum())
        budget_sq = None if tol is None else (float(tol) ** 2) * norm_sq

        cores: list[torch.Tensor] = []
        discarded_sq = 0.0
        C = T.reshape(1, -1)
        r_prev = 1
        for k in range(d - 1):
            C = C.reshape(r_prev * out_f[k] * in_f[k], -1)
            U, S, Vh = torch.linalg.svd(C, full_matrices=False)
            allowed = None if budget_sq is None else max(budget_sq - discarded_sq, 0.0) / (d - 1 - k)
            r = _keep_rank(S, caps[k], allowed)
            discarded_sq += float((S[r:] ** 2).sum())
            cores.append(U[:, :r].reshape(r_prev, out_f[k], in_f[k], r))
            C = S[:r, None] * Vh[:r]
            r_prev = r
        cores.append(C.reshape(r_prev, out_f[-1], in_f[-1], 1))

        mpo = cls(cores, out_features=N, in_features=M).canonicalize()
        w_norm = math.sqrt(norm_sq)
        if (Np, Mp) == (N, M):
            # TT-SVD errors of successive steps are mutually orthogonal, so this sum is exact.
            mpo.error = math.sqrt(discarded_sq) / w_norm if w_norm > 0 else 0.0
        else:
            # Padded: part of the discarded mass may sit in the padded block, which is sliced off.
            diff = mpo.to_matrix() - A[:N, :M]
            mpo.error = float(torch.linalg.norm(diff)) / w_norm if w_norm > 0 else 0.0
        mpo.error_exact = True
        mpo.cores = [c.to(W.dtype) for c in mpo.cores]
        if not all(bool(torch.isfinite(c).all()) for c in mpo.cores):  # (computed in float64: a core may not fit)
            raise ValueError(f"the factors of this weight overflow {W.dtype} (its largest entry is "
                             f"{float(W.abs().max()):.3g}); factor a rescaled weight, or in float64")
        if torch.finfo(W.dtype).bits < 32 and w_norm > 0:  # the rounding of 16-bit cores is part of the error
            diff = MPO([c.to(torch.float64) for c in mpo.cores], N, M).to_matrix() - A[:N, :M]
            mpo.error = float(torch.linalg.norm(diff)) / w_norm
        elif w_norm > 0:  # (16-bit cores are no longer a projection of W)
            mpo.source_norm = w_norm
        return mpo

    @classmethod
    def random(
        cls,
        out_features: int,
        in_features: int,
        bond: BondSpec = 8,
        num_cores: int = 4,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> "MPO":
        """A random MPO whose matrix entries have the variance of ``nn.Linear``'s default init.

        ``nn.Linear`` draws ``W ~ U(-1/sqrt(in), 1/sqrt(in))``, i.e. ``Var(W_ij) = 1 / (3 in)``. With
        i.i.d. zero-mean Gaussian cores, ``Var(W_ij) = prod_k s_k^2 * prod_k r_k`` and the entries are
        uncorrelated, so choosing ``s_k^2 = (1/(3 in))^(1/d) / sqrt(r_{k-1} r_k)`` reproduces the
        dense layer's output variance for any input (unlike plain ``torch.randn`` cores, whose
        output variance grows like ``prod_k r_k``).

        ``bond``: cap on every bond (int) or per bond (sequence of ``d-1`` ints/None, None = uncapped); every bond
        is also capped at its cut's full rank (:meth:`max_bond_dims`). ``num_cores``, ``in_factors`` /
        ``out_factors``: as in :meth:`from_matrix`. ``generator``: the ``torch.Generator`` the Gaussian cores are
        drawn from (``None``: torch's global RNG); it must be on the CPU, where the cores are made. ``error`` of
        the result is ``nan`` (there is no matrix to compare with).
        """
        out_f, in_f = factorize_shape(out_features, in_features, num_cores, out_factors, in_factors)
        d = len(out_f)
        caps = _bond_caps(bond, d - 1)
        sizes = [o * i for o, i in zip(out_f, in_f)]
        ranks = [1]
        for k in range(d - 1):
            full = min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :]))
            ranks.append(full if caps[k] is None else min(caps[k], full))
        ranks.append(1)
        # Variance is set for the true fan-in: padded input columns only ever multiply zeros.
        per_core = (1.0 / (3.0 * in_features)) ** (1.0 / d)
        cores = []
        for k in range(d):
            std = math.sqrt(per_core / math.sqrt(ranks[k] * ranks[k + 1]))
            shape = (ranks[k], out_f[k], in_f[k], ranks[k + 1])
            cores.append(torch.randn(shape, dtype=dtype, generator=generator) * std)
        return cls(cores, out_features, in_features, error=float("nan"), error_exact=False)

    # ------------------------------------------------------------------ dense view
    def to_tensor(self) -> torch.Tensor:
        """The full (padded) operator as a tensor of shape ``(out_1..out_d, in_1..in_d)``."""
        d = self.num_cores
        acc = self.cores[0].reshape(self.out_factors[0] * self.in_factors[0], -1)  # (o1 i1, r1)
        for k in range(1, d):
            c = self.cores[k]
            acc = (acc @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[3])  # (... o_k i_k, r_k)
        T = acc.reshape([s for k in range(d) for s in (self.out_factors[k], self.in_factors[k])])
        return T.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2))

    def to_matrix(self) -> torch.Tensor:
        """The represented matrix, shape ``(out_features, in_features)`` (padding removed)."""
        W = self.to_tensor().reshape(self.padded_out, self.padded_in)
        return W[: self.out_features, : self.in_features]

    # ------------------------------------------------------------------ gauge and truncation
    def canonicalize(self) -> "MPO":
        """Left-canonical form with Schmidt-ordered bonds; returns a new MPO (same matrix).

        A right-to-left QR sweep makes every core right-orthogonal, then a left-to-right SVD sweep makes
        cores ``1..d-1`` left-orthogonal. At the SVD of cut ``k`` everything left of it is
        left-orthonormal and everything right of it right-orthonormal, so its singular values are the
        exact Schmidt values of the operator across that cut and its channels come out sorted by them;
        later steps never rotate an earlier bond. Hence slicing bond ``k`` to its first ``w`` channels
        (keeping the others) is the Eckart-Young optimal rank-``w`` cut, with error
        ``sqrt(sum(bond_spectra[k][w:]**2))``. Every Schmidt value is kept, numerically zero ones too (a
        rank-deficient bond keeps its width): :meth:`truncate` with a ``tol`` above rounding drops them.
        """
        return self._sweep(caps=[None] * (self.num_cores - 1), tol=None)[0]

    def truncate(self, max_bond: BondSpec = None, tol: float | None = None,
                 right_orthogonal: list[torch.Tensor] | None = None) -> "MPO":
        """A smaller MPO: bond caps and/or a relative tolerance on this MPO's own matrix.

        Truncation happens in a canonical sweep, so the discarded Schmidt mass is exactly the error
        against this MPO's operator. On a padded MPO that mass counts the operator's padded block, which may hold
        values (random or trained cores, a TT-SVD whose bonds were cut): ``tol`` is met on the matrix itself, padding
        removed, checked by a dense rebuild where the norms cannot bound it (the result's ``bond_spectra`` is then
        ``None``; without ``source_norm`` the ``rel`` below is measured there too). ``error`` of the
        result is against the original matrix ``W``: exact when this MPO reproduces ``W`` exactly; for a TT-SVD
        projection of ``W`` (``source_norm`` known) with two or three cores the result is one too, and the two errors
        add in squares (exact without padding; with padding an upper bound); otherwise the triangle-inequality bound ``error + rel`` (``rel``: the cut's error against this MPO,
        relative to ``W`` where ``source_norm`` is known), which may exceed 1. ``right_orthogonal``: the output of
        :meth:`right_orthogonal_cores`, when truncating the same MPO many times. ``bond_spectra`` of the result is
        ``None`` where a bond after the first lost more than rounding (the sweep read the earlier bonds' values before
        that cut): call :meth:`canonicalize` on the result for its Schmidt values and Schmidt-ordered channels.
        """
        return self.cut(max_bond, tol, right_orthogonal)[0]

    def cut(self, max_bond: BondSpec = None, tol: float | None = None,
            right_orthogonal: list[torch.Tensor] | None = None) -> tuple["MPO", float]:
        """``(truncate(...), d)`` with ``d`` the squared Frobenius norm of what the cut drops from this MPO's
        matrix (exactly the discarded Schmidt mass, in this MPO's own units)."""
        _check_tol(tol)
        caps = _bond_caps(max_bond, self.num_cores - 1)
        out, rel, norm_sq = self._sweep(caps=caps, tol=tol, right_orthogonal=right_orthogonal)
        padded = (self.padded_out, self.padded_in) != (self.out_features, self.in_features)
        if padded and not self.source_norm:
            out, rel, norm_sq, _ = self._cut_sliced(caps, tol, right_orthogonal, out, rel)
        elif padded and tol is not None and not rel * math.sqrt(norm_sq) <= tol * (1.0 - self.error) * self.source_norm:
            # a cut TT-SVD's padded block is not zero: the sweep's tol is on the padded operator, whose norm exceeds
            # the matrix's; (1 - error) ||W|| <= ||matrix|| bounds it without a dense rebuild, else measured there.
            # The padded rel and norm_sq stay: the error accounting below is the padded operator's
            out, _, _, rel = self._cut_sliced(caps, tol, right_orthogonal, out, rel)
        # a projection of W projected again is one projection (the errors orthogonal) for two or three cores, whose
        # projections act on disjoint legs; from four cores on the middle ones overlap: added in squares, the two
        # errors read up to 0.2% under the truth
        nested = self.num_cores <= 3 or self.error == 0
        if self.source_norm and self.error == self.error and nested:
            cut_sq = rel * rel * norm_sq / self.source_norm**2  # what this cut drops, relative to ||W||^2
            if (self.padded_out, self.padded_in) == (self.out_features, self.in_features):
                # the two errors are orthogonal: summed in squares (not 1 - ||W'||^2/||W||^2, which cancels)
                out.error, out.error_exact = math.sqrt(self.error**2 + cut_sq), self.error_exact
            else:  # the padded operator's error bounds the sliced one's; the triangle inequality too: the smaller
                padded = math.sqrt(max(0.0, 1.0 - norm_sq / self.source_norm**2 + cut_sq))
                out.error = min(padded, self.error + math.sqrt(cut_sq))
                out.error_exact = self.error_exact and cut_sq == 0.0
            out.source_norm = self.source_norm
        else:
            # rel is against this MPO's norm; in units of ||W|| where that is known
            step = rel * math.sqrt(norm_sq) / self.source_norm if self.source_norm and self.error == self.error else rel
            out.error = self.error + step if self.error > 0 else step
            out.error_exact = self.error == 0 and self.error_exact
            out.source_norm = self.source_norm
        return out, rel * rel * norm_sq

    def _cut_sliced(self, caps: list[int | None], tol: float | None, right_orthogonal, out: "MPO",
                    rel: float) -> tuple["MPO", float, float]:
        """``cut``'s sweep result measured on the matrices the MPOs represent (padding removed), for an MPO whose
        padded block may hold values (random cores, trained ones: a TT-SVD's is a projection, ``source_norm``): the
        sweep's Schmidt masses count that block, which can take up the ``tol`` budget (a cut 0.52 off its matrix at
        ``tol=0.4``, reported 0.37). Where the matrix error exceeds ``tol``, the sweep runs again at smaller
        tolerances until it does not. Returns ``(out, rel, norm_sq)`` of the matrices, then the last sweep's ``rel``
        (against this MPO's padded operator)."""
        W = self.to_matrix().to(torch.float64)
        norm_sq = float((W * W).sum())
        if norm_sq == 0.0:
            return out, rel, norm_sq, rel

        def off(m: "MPO") -> float:
            return math.sqrt(float(((W - m.to_matrix().to(torch.float64)) ** 2).sum()) / norm_sq)

        true = off(out)
        step = tol
        while tol is not None and true > tol and step > 1e-9 and rel > 0:
            step *= max(0.1, min(0.9, tol / true))
            out, rel, _ = self._sweep(caps=caps, tol=step, right_orthogonal=right_orthogonal)
            true = off(out)
        out.bond_spectra = None  # (the padded operator's Schmidt values, not the matrix's)
        return out, true, norm_sq, rel

    def right_orthogonal_cores(self) -> list[torch.Tensor]:
        """float64 cores of the same operator with cores ``2..d`` right-orthogonal (the norm in core 1)."""
        cores = [c.detach().to(torch.float64) for c in self.cores]
        for k in range(len(cores) - 1, 0, -1):
            c = cores[k]
            Q, R = torch.linalg.qr(c.reshape(c.shape[0], -1).T)  # c = R^T Q^T
            cores[k] = Q.T.reshape(-1, *c.shape[1:])
            cores[k - 1] = torch.tensordot(cores[k - 1], R.T, dims=([3], [0]))
        return cores

    def _sweep(self, caps: list[int | None], tol: float | None,
               right_orthogonal: list[torch.Tensor] | None = None) -> tuple["MPO", float, float]:
        """Left-to-right SVD sweep (truncating by ``caps``/``tol``) over right-orthogonal cores, which
        may be passed in to truncate one MPO many ways without redoing the QR sweep. Returns ``(mpo, rel,
        norm_sq)``: the cut's relative error against this MPO, and this MPO's squared norm."""
        cores = list(right_orthogonal) if right_orthogonal is not None else self.right_orthogonal_cores()
        d = len(cores)
        norm_sq = float((cores[0] ** 2).sum())
        budget_sq = None if tol is None else (float(tol) ** 2) * norm_sq
        discarded_sq = later_sq = 0.0
        spectra = []
        for k in range(d - 1):
            c = cores[k]
            U, S, Vh = torch.linalg.svd(c.reshape(-1, c.shape[3]), full_matrices=False)
            allowed = None if budget_sq is None else max(budget_sq - discarded_sq, 0.0) / (d - 1 - k)
            r = S.numel() if caps[k] is None and allowed is None else _keep_rank(S, caps[k], allowed)
            dropped = float((S[r:] ** 2).sum())
            discarded_sq += dropped
            later_sq += dropped if k > 0 else 0.0
            spectra.append(S[:r].clone())
            cores[k] = U[:, :r].reshape(*c.shape[:3], r)
            cores[k + 1] = torch.tensordot(S[:r, None] * Vh[:r], cores[k + 1], dims=([1], [0]))
        # Bond k's values were read before the later bonds were cut, which moves the Schmidt values there (by at most
        # sqrt(later_sq), Weyl) and leaves its channels no longer Schmidt-ordered: kept only where that is rounding
        # (dropped zeros of a rank-deficient MPO); canonicalize() gives the result's
        if later_sq > SPECTRA_RTOL**2 * norm_sq:
            spectra = None
        out = MPO(
            [c.to(self.dtype) for c in cores],
            self.out_features,
            self.in_features,
            error=self.error,
            error_exact=self.error_exact,
            bond_spectra=spectra,
            source_norm=self.source_norm,  # the same matrix when nothing is cut (truncate sets its own)
        )
        rel = math.sqrt(discarded_sq / norm_sq) if norm_sq > 0 else 0.0
        return out, rel, norm_sq

    def slice_bonds(self, widths: Sequence[int]) -> "MPO":
        """Keep the first ``widths[k]`` channels of every bond ``k`` (a view, no copy)."""
        if len(widths) != self.num_cores - 1:
            raise ValueError(f"need {self.num_cores - 1} widths, got {len(widths)}")
        w = [1, *widths, 1]
        for k, (wk, rk) in enumerate(zip(widths, self.bond_dims)):
            if not 1 <= wk <= rk:
                raise ValueError(f"width {wk} for bond {k} is outside [1, {rk}]")
        cores = [c[: w[k], :, :, : w[k + 1]] for k, c in enumerate(self.cores)]
        return MPO(cores, self.out_features, self.in_features, error=float("nan"), error_exact=False)

    # ------------------------------------------------------------------ cost
    def flops(self, batch: int = 1) -> int:
        """FLOPs (2 per multiply-add) of the FLOP-minimal contraction with ``batch`` input rows.

        This is the cost model's optimum for the math object; :meth:`bondgate.MPOLinear.flops` gives the
        FLOPs of the plan a layer actually runs.
        """
        from .planner import min_flops  # local import: planner is the only module that knows paths

        if positive_int(batch, "batch (a number of input rows)", low=0) == 0:
            return 0
        return min_flops(self.out_factors, self.in_factors, self.bond_dims, batch)

    def to(self, *args, **kwargs) -> "MPO":
        """The same MPO with every core ``.to(*args, **kwargs)`` (a dtype, a device)."""
        cores = [c.to(*args, **kwargs) for c in self.cores]
        projection = all(c.dtype in (torch.float32, torch.float64) for c in cores)  # 16 bits: rounded
        return MPO(cores, self.out_features, self.in_features, self.error, self.error_exact, self.bond_spectra,
                   self.source_norm if projection else None)
