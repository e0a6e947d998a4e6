"""``LowRankLinear``: a dense layer as two factors, ``W = U @ V`` — the simplest factorized layer, and the one
whose FLOPs equal its weights at any row count (``2 B rank (in + out)``). :func:`bondgate.compress` uses it where
a layer's latency budget favours two GEMMs over an MPO contraction; :func:`bondgate.svd_compress` is the baseline.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ._checks import positive_int
from .io import register_layer_type
from .layer import (
    TrackedParameter,
    WeightStandIn,
    _refuse_script,
    autocast_off,
    bad_input,
    check_spec_sizes,
    spec_dtype,
    track_parameters,
)

if TYPE_CHECKING:  # for to_mpo_linear's annotation
    from .layer import MPOLinear

__all__ = ["LowRankLinear"]


def _u_parameter(U: torch.Tensor, requires_grad: bool = True) -> TrackedParameter:
    """``U`` ``(out, rank)`` held as the transpose of a contiguous ``(rank, out)`` tensor (strides ``(1, out)``).

    ``linear(h, U)`` then multiplies by a contiguous ``(rank, out)`` matrix: with few rows and a wide output this is
    up to 2x faster than ``U``'s own row-major layout on CPU BLAS (a 32000 x 2048 rank-481 LM head, one row), and
    the LLaMA-shape decode of ``benchmarks/llama_decode.py`` (low-rank 25%, batch 1) went from 48.6 to 70.9 tok/s;
    it is also the layout the gated rank form reads, so gated and ungated pairs run the same kernel.
    ``copy_``, ``.to``, ``deepcopy`` and ``load_state_dict`` keep the layout."""
    return TrackedParameter(U.detach().t().contiguous().t(), requires_grad=requires_grad)


def rank_cores(U: torch.Tensor, V: torch.Tensor) -> list[torch.Tensor]:
    """A pair's factors ``U`` ``(out, rank)`` and ``V`` ``(rank, in)`` as the two cores of a rank-form MPO (legs
    ``(out, 1) x (1, in)``, the bond the rank): ``(1, out, 1, rank)`` and ``(rank, 1, in, 1)``."""
    return [U.reshape(1, U.shape[0], 1, U.shape[1]), V.reshape(V.shape[0], 1, V.shape[1], 1)]


def _keep_u_layout(module: "LowRankLinear", _incompatible) -> None:
    """After ``load_state_dict(assign=True)`` (which puts the loaded tensors in as they are): restore ``U``'s layout
    and make the new parameters tracked ones."""
    U = module.U
    if not U.t().is_contiguous():
        module.U = _u_parameter(U, U.requires_grad)
    track_parameters(module)


class LowRankLinear(nn.Module):
    """``y = (x @ V.T) @ U.T + b`` with ``U`` of shape ``(out_features, rank)`` and ``V`` of shape
    ``(rank, in_features)``; accepts inputs ``(*, in_features)`` like ``nn.Linear``.

    ``num_params = rank * (in_features + out_features)`` (bias excluded). ``error`` is the relative
    Frobenius error of ``U @ V`` against the layer it was built from (``nan`` if built fresh).

    The parameters are :class:`~bondgate.layer.TrackedParameter` s (every write is seen, ``.data`` included), so that a
    consumer of the dense ``U @ V`` (:class:`bondgate.Recurrent`'s fused path) can keep it between inference calls.
    ``U`` is held transposed (the transpose of a contiguous ``(rank, out)`` matrix, strides ``(1, out)``: faster
    with few rows and a wide output on CPU BLAS): code that flattens parameters with ``.view(-1)``, such as
    ``torch.nn.utils.parameters_to_vector``, needs ``.reshape(-1)`` here
    (``torch.cat([p.reshape(-1) for p in model.parameters()])``), and ``safetensors.torch.save_file`` of its state
    dict needs contiguous copies (``{k: v.contiguous() for k, v in sd.items()}``; :func:`bondgate.save` does that).
    """

    __prepare_scriptable__ = _refuse_script  # torch.jit.script: a clear refusal

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_features, out_features = positive_int(in_features, "in_features"), positive_int(out_features, "out_features")
        rank = positive_int(rank, "rank")
        if rank > min(in_features, out_features):
            raise ValueError(f"rank must lie in [1, {min(in_features, out_features)}], got {rank}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"a LowRankLinear's factors are floating point; got dtype={dtype!r}")
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        # Var(V) = 1/(3 in), Var(U) = 1/rank  =>  Var((U V)_ij) = 1/(3 in), nn.Linear's default.
        u_bound = math.sqrt(3 / rank)
        self.U = _u_parameter(torch.empty(out_features, rank, **kw).uniform_(-u_bound, u_bound))
        bound = 1.0 / math.sqrt(in_features)
        self.V = TrackedParameter(torch.empty(rank, in_features, **kw).uniform_(-bound, bound))
        if bias:
            self.bias = TrackedParameter(torch.empty(out_features, **kw).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.error: float = float("nan")
        self.register_load_state_dict_post_hook(_keep_u_layout)

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int) -> "LowRankLinear":
        """Best rank-``rank`` approximation (Eckart-Young) of an ``nn.Linear`` or HF ``Conv1D``.

        The SVD ``W = P diag(s) Q^T`` is cut to ``rank`` and ``sqrt(s)`` goes into both factors
        (``U = P sqrt(s)``, ``V = sqrt(s) Q^T``) so neither factor carries all the scale.
        """
        from .mpo import _check_matrix
        from .surgery import dense_weight  # surgery builds low-rank layers: import at call time

        W = _check_matrix(dense_weight(linear))  # (an inf weight gave inf factors and error 0.0)
        out_f, in_f = W.shape
        layer = cls(in_f, out_f, rank, bias=linear.bias is not None, device=W.device, dtype=W.dtype)
        # float64 SVD: the discarded tail of a float32 SVD is noisy, and fp16/bf16 have no SVD kernel.
        P, s, Qh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
        root = s[:rank].sqrt()
        with torch.no_grad():
            layer.U.copy_(P[:, :rank] * root)
            layer.V.copy_(root[:, None] * Qh[:rank])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        total = float(s.square().sum())
        if torch.finfo(W.dtype).bits < 32:  # the factors' rounding counts (bf16 at full rank: 2.3e-3, not 0)
            Wd = W.to(torch.float64)
            err = torch.linalg.norm(Wd - layer.U.detach().double() @ layer.V.detach().double())
            layer.error = float(err / torch.linalg.norm(Wd)) if total > 0 else 0.0
        else:
            layer.error = math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0
        return layer

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        """A layer holding ``U`` ``(out, rank)`` and ``V`` ``(rank, in)`` (copied), and ``bias`` ``(out,)``;
        ``1 <= rank <= min(out, in)``."""
        if not all(isinstance(t, torch.Tensor) for t in (U, V)) or U.dim() != 2 or V.dim() != 2 \
                or U.shape[1] != V.shape[0]:
            shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (U, V)]
            raise ValueError(f"factors must be tensors (out, rank) and (rank, in), got {shapes[0]} and {shapes[1]}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (U.shape[0],)):
            what = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape ({U.shape[0]},), got {what}")
        if U.shape[1] > min(U.shape[0], V.shape[1]) or not U.shape[1]:
            raise ValueError(f"factors {tuple(U.shape)} and {tuple(V.shape)} have inner size {U.shape[1]}: a "
                             f"LowRankLinear's rank lies in [1, min(out, in) = {min(U.shape[0], V.shape[1])}]" + (
                                 " (a wider pair stores more than its dense weight: use nn.Linear with weight U @ V)"
                                 if U.shape[1] else ""))
        layer = cls(V.shape[1], U.shape[0], U.shape[1], bias=bias is not None, device=U.device, dtype=U.dtype)
        with torch.no_grad():
            layer.U.copy_(U)
            layer.V.copy_(V)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_mpo_linear(cls, layer: "MPOLinear") -> "LowRankLinear":
        """The pair a rank-form :class:`~bondgate.MPOLinear` computes (:attr:`~bondgate.MPOLinear.is_rank_form`: the
        inverse of :meth:`to_mpo_linear`; ``compress(..., quantize="int8")`` stores its pairs so): ``U`` and ``V`` its
        cores as its forward uses them (of an int8 layer, the dequantized values), copied, with its bias, ``error``,
        dtype and device, each parameter training where its source does. Raises ``ValueError`` for any other MPO layer."""
        from .layer import MPOLinear

        if not isinstance(layer, MPOLinear) or not layer.is_rank_form:
            what = (f"legs {layer.out_factors} x {layer.in_factors}" if isinstance(layer, MPOLinear)
                    else type(layer).__name__)
            raise ValueError(f"from_mpo_linear needs a rank-form MPOLinear (legs (out_features, 1) x (1, in_features)), "
                             f"got {what}")
        U, V = (c.detach() for c in layer._core_tuple())
        rank = int(V.shape[0])
        pair = cls.from_factors(U.reshape(layer.out_features, rank), V.reshape(rank, layer.in_features),
                                None if layer.bias is None else layer.bias.detach())
        pair.error = layer.error
        for new, own in zip((pair.U, pair.V, pair.bias), (*layer.cores, layer.bias)):
            if new is not None:
                new.requires_grad_(own.requires_grad)
        return pair

    @property
    def rank(self) -> int:
        """The inner dimension of ``U @ V`` (``U.shape[1] == V.shape[0]``)."""
        return int(self.U.shape[1])

    @property
    def num_params(self) -> int:
        """Stored weights, ``rank * (in_features + out_features)`` (bias excluded)."""
        return self.U.numel() + self.V.numel()

    @property
    def weight(self) -> torch.Tensor:
        """The weight's shape ``(out_features, in_features)``, dtype and device, without values (a
        :class:`~bondgate.layer.WeightStandIn`: computing with it raises); :meth:`weight_matrix` builds the dense weight."""
        return WeightStandIn.of(type(self).__name__, (self.out_features, self.in_features), self.U.dtype, self.U.device,
                                self.U.requires_grad or self.V.requires_grad)

    def weight_matrix(self) -> torch.Tensor:
        """``U @ V``, shape ``(out_features, in_features)``, in the factors' dtype (also inside ``torch.autocast``)."""
        with autocast_off(self.U.device.type):
            return self.U @ self.V

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` (a copy) with weight ``U @ V`` and this layer's bias, same dtype and device."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight_matrix())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def to_linears(self) -> nn.Sequential:
        """The same map as two plain layers, ``Sequential(Linear(in, rank, bias=False), Linear(rank, out))``
        (copies): for tools that only know ``nn.Linear``, e.g. ``bondgate.quantize_int8`` of the factors."""
        kw = {"device": self.U.device, "dtype": self.U.dtype}
        first = nn.Linear(self.in_features, self.rank, bias=False, **kw)
        second = nn.Linear(self.rank, self.out_features, bias=self.bias is not None, **kw)
        with torch.no_grad():
            first.weight.copy_(self.V)
            second.weight.copy_(self.U)
            if self.bias is not None:
                second.bias.copy_(self.bias)
        return nn.Sequential(first, second)

    def to_mpo_linear(self, policy: str = "speed") -> MPOLinear:
        """The same map as a 2-core :class:`~bondgate.MPOLinear` whose bond is the rank: legs
        ``(out_features, 1) x (1, in_features)``, cores ``U`` as ``(1, out, 1, rank)`` and ``V`` as
        ``(rank, 1, in, 1)`` (copies). :func:`bondgate.gate` uses it to gate the rank per input row. ``policy``: the
        new layer's plan policy (``"speed"`` by default here, ``"memory"``, or a :class:`~bondgate.PlanPolicy`);
        its ``error`` is this layer's; each parameter trains where its source does (core 0 ``U``, core 1 ``V``, the
        bias the bias)."""
        from .layer import MPOLinear
        from .mpo import MPO

        U, V = self.U.detach(), self.V.detach()
        mpo = MPO(rank_cores(U, V), self.out_features, self.in_features)
        layer = MPOLinear.from_mpo(mpo, None if self.bias is None else self.bias.detach(), policy=policy)
        layer.error = self.error  # nan when the pair was not fitted to a layer
        for new, own in zip((*layer.cores, layer.bias), (self.U, self.V, self.bias)):
            if new is not None:
                new.requires_grad_(own.requires_grad)
        return layer

    def forward(self, input: torch.Tensor | None = None, *, x: torch.Tensor | None = None) -> torch.Tensor:
        """``(x @ V.T) @ U.T + b``: ``(*, in_features) -> (*, out_features)``, the input by position or by keyword
        (``input`` or ``x``, as :meth:`bondgate.MPOLinear.forward`), with ``nn.Linear``'s dtype rules (``x`` must have
        the factors' dtype; under ``torch.autocast`` the output has autocast's dtype)."""
        if x is None:
            x = input
        elif input is not None:
            raise TypeError(f"{type(self).__name__}.forward() got the input twice, as input and as x=: pass one")
        try:
            return nn.functional.linear(nn.functional.linear(x, self.V), self.U, self.bias)
        except (RuntimeError, TypeError):
            if not isinstance(x, torch.Tensor) or not x.dim() or x.shape[-1] != self.in_features:
                raise bad_input(self, x) from None
            if x.dtype != self.V.dtype:  # as MPOLinear says it (torch's own message names m1 and m2)
                raise TypeError(f"input dtype {x.dtype} does not match the layer's dtype {self.V.dtype}") from None
            raise

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        track_parameters(self)  # a layer pickled before its parameters were tracked ones holds plain parameters

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), .cuda() ...
        out = super()._apply(fn, recurse)
        track_parameters(self)  # torch may have made new, plain parameters
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, params={self.num_params:,}")

    def spec(self) -> dict:
        """JSON-serializable structure (everything but the tensors), for :func:`bondgate.save`."""
        return {"type": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None,
                "dtype": str(self.U.dtype).removeprefix("torch."),
                "error": None if math.isnan(self.error) else self.error}

    @classmethod
    def from_spec(cls, spec: dict) -> "LowRankLinear":
        """An uninitialized layer with the structure of :meth:`spec` (fill it with ``load_state_dict``)."""
        missing = {"in_features", "out_features", "rank", "bias"} - set(spec)
        if missing:
            raise ValueError(f"layer spec is missing {sorted(missing)}")
        dtype = spec_dtype(spec)
        check_spec_sizes(spec, ("in_features", "out_features", "rank"))
        layer = cls(int(spec["in_features"]), int(spec["out_features"]), int(spec["rank"]), bias=bool(spec["bias"]),
                    dtype=dtype)
        layer.error = float("nan") if spec.get("error") is None else float(spec["error"])
        return layer


register_layer_type(LowRankLinear)
