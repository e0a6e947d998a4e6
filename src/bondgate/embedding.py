"""``MPOEmbedding``: an ``nn.Embedding`` whose table is a matrix-product operator, looked up row by row.

The table ``E`` (shape ``(num_embeddings, embedding_dim)``) is stored with :class:`bondgate.MPOLinear`'s
convention: out legs = the vocabulary (padded by :mod:`bondgate.factors` when it has a large prime factor),
in legs = the embedding dimension. So an ``MPOLinear`` holding the same cores computes ``h @ E.T``, a tied
LM head (:meth:`MPOEmbedding.as_linear`).

A lookup splits each distinct id (``torch.unique``: repeated tokens cost once) into mixed-radix digits
``(o_1..o_d)`` and multiplies the chain ``G_1[:, o_1] @ G_2[:, o_2] @ ... @ G_d[:, o_d]`` for all tokens at
once: at core ``k`` the tokens are grouped by ``o_k`` and each group is one matmul with the slice
``G_k[:, o_k]`` (no per-token copy of a slice, never the table). Cost per distinct token:
``sum_k prod(in_<k) r_{k-1} in_k r_k`` multiply-adds and ``prod(in_<=k) r_k`` numbers of intermediate
(4096 for a 30522 x 384 table at bonds 64, ten times a row). Without autograd the tokens go in chunks
that keep the intermediates under ~2**20 numbers; with it they are all kept for the backward pass.

Not supported, because the table has no per-row storage: ``max_norm`` (renormalizes rows in place),
``sparse`` (per-row gradients) and ``scale_grad_by_freq``. ``padding_idx`` is supported for a zero row
(nn.Embedding's default): the lookup returns exact zeros there and those positions send no gradient, as
in ``nn.Embedding``. The MPO's own row for ``padding_idx`` is only approximately zero and it moves when
training updates the shared cores; the forward masks it, but the tied head (:meth:`as_linear`) and
:meth:`weight_matrix` see it.

Frequency weighting (``counts`` in :meth:`MPOEmbedding.from_embedding`): minimizing
``sum_v counts[v] * ||E[v] - E_mpo[v]||^2`` means decomposing ``diag(w) E`` with ``w = sqrt(counts)`` and
undoing ``diag(w)`` afterwards. The undo stays inside the MPO at the same bonds only when ``w`` is a
Kronecker product ``w_1(o_1) * ... * w_d(o_d)`` over the vocabulary digits (each factor then divides one
core's out leg). A general diagonal is itself an MPO whose bond ``k`` has the rank of ``w`` reshaped to
``(prod(out_<=k), prod(out_>k))`` (Zipf counts: full rank), and multiplying it in multiplies the bonds. So
we weight by the best Kronecker-separable fit of ``log sqrt(counts + 1)`` (least squares: main effects over
the digits), which is undone exactly; the result is TT-SVD-quasi-optimal in that separable weighted norm,
and the non-separable rest of the frequencies is ignored. It helps when frequency follows the id order,
as in BPE/WordPiece vocabularies, roughly sorted by frequency (the leading digit captures that trend).

Two forms make the weighting exact. ``form="lowrank"`` factors the table as ``A (vocab, r) @ B (r, dim)``: a
2-core MPO with out legs ``(vocab, 1)`` and in legs ``(1, dim)``, so the row id is one digit and any diagonal
weight divides core 1's out leg. And ``keep_rows=K`` keeps the exact rows of the ``K`` most frequent ids
(``kept_ids``, ``kept_rows``) beside the MPO, which is then fitted to the table with those rows zeroed. Measured
on all-MiniLM-L6-v2's 30522 x 384 table, error weighted by STS-B dev token counts (calibration counts from
STS-B/WikiText-2 train): 3-core MPO 0.74 at 40% of the table; low-rank rank 160 (~5 MB int8) 0.65 plain, 0.42
frequency-weighted; the 4096 most frequent rows kept (85% of dev tokens) + weighted rank 128 (~5 MB int8) 0.24.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from ._checks import number
from ._warn import warn_user
from .factors import factorize_shape
from .io import register_layer_type
from .layer import (
    MPOLinear,
    TrackedParameter,
    WeightStandIn,
    _refuse_script,
    check_sizes,
    check_spec_sizes,
    core_dict,
    fake_quantized_cores,
    no_torchscript,
    record_sizes,
    replica_without_kept,
    spec_dtype,
    without_kept,
)
from .mpo import MPO, BondSpec
from .planner import PlanPolicy
from .quant import check_quant, forget_int8, load_quantized_cores, register_state_dict_hook, warn_on_regrid

__all__ = ["MPOEmbedding", "lookup", "table_factors"]


def lookup(cores: Sequence[torch.Tensor], ids: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """Rows ``ids`` (1-D int64, ``0 <= id < padded vocabulary``) of the MPO's table: ``(len(ids), embedding_dim)``.

    Differentiable w.r.t. the cores (shape ``(r_{k-1}, out_k, in_k, r_k)``); never builds the table. At core
    ``k`` the running products ``acc`` (T, prod(in_<k), r_{k-1}) are sorted by the digit ``o_k`` and each
    group is one matmul with ``G_k[:, o_k]``; ``perm`` tracks which token each row of ``acc`` belongs to.
    """
    digits, rem = [], ids
    for c in reversed(cores):
        digits.append(rem % c.shape[1])
        rem = rem // c.shape[1]
    T = ids.numel()
    digits.reverse()
    # the first core has r_0 = 1: its rows for the tokens are a gather (a low-rank table's only big core)
    first = cores[0]
    acc, perm = first[0].index_select(0, digits[0]).reshape(T, first.shape[2], first.shape[3]), torch.arange(T, device=ids.device)
    for core, digit in zip(cores[1:], digits[1:]):
        (_, n, r), (_, o, i, s) = acc.shape, core.shape
        d = digit[perm]
        order = torch.argsort(d)
        perm, sizes = perm[order], torch.bincount(d, minlength=o).tolist()
        parts = acc.index_select(0, order).split(sizes)
        # unbind: one backward node stacks the slices' gradients (o slicings would each add a full-size zero)
        outs = [p.reshape(-1, r) @ g.reshape(r, i * s) for p, g, k in zip(parts, core.unbind(1), sizes) if k or not T]
        acc = torch.cat(outs).reshape(T, n * i, s)
    rows = acc.reshape(T, acc.shape[1])[:, :embedding_dim]
    return rows.new_empty(rows.shape).index_copy(0, perm, rows)  # back to the order of ids


def traced_lookup(cores: Sequence[torch.Tensor], ids: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """:func:`lookup` for ``torch.export`` (and ONNX through it): no data-dependent shapes — every token gathers its
    own slice of each core (``T * r_{k-1} * in_k * r_k`` numbers per core; a core with one output digit, as a
    low-rank table's second, is one shared matmul) instead of the tokens being sorted into groups by digit."""
    digits, rem = [], ids
    for c in reversed(cores):
        digits.append(rem % c.shape[1])
        rem = rem // c.shape[1]
    digits.reverse()
    T = ids.shape[0]
    acc = cores[0][0].index_select(0, digits[0])  # (T, in_0, r_1)
    for core, digit in zip(cores[1:], digits[1:]):
        (r, o, i, s), n = core.shape, acc.shape[1]  # sizes spelled out: no -1, which zero tokens make ambiguous
        if o == 1:
            acc = (acc.reshape(T * n, r) @ core.reshape(r, i * s)).reshape(T, n * i, s)
        else:  # (T, r, i * s): token t's slice G_k[:, o_k(t)]
            acc = torch.bmm(acc, core.index_select(1, digit).transpose(0, 1).reshape(T, r, i * s)).reshape(T, n * i, s)
    return acc.reshape(T, acc.shape[1] * acc.shape[2])[:, :embedding_dim]


def kept_ids_problem(ids: torch.Tensor, num_embeddings: int) -> str | None:
    """Why ``ids`` cannot be a table's ``kept_ids`` (increasing integer ids in ``[0, num_embeddings)``), or None."""
    ok = ids.dim() == 1 and not (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)
    if ok and ids.numel() and ids.device.type != "meta":
        ok = bool((ids[1:] > ids[:-1]).all()) and int(ids[0]) >= 0 and int(ids[-1]) < num_embeddings
    return None if ok else f"must be increasing integer ids in [0, {num_embeddings})"


def _check_table_size(num_embeddings: int, embedding_dim: int) -> None:
    """Name the table's sizes as an embedding user knows them (the MPO underneath calls them out / in_features)."""
    number(num_embeddings, "num_embeddings", low=1, integer=True)
    number(embedding_dim, "embedding_dim", low=1, integer=True)


class MPOEmbedding(nn.Module):
    """``nn.Embedding(num_embeddings, embedding_dim)`` with the table stored as MPO cores.

    ``forward(ids)``: integer ids of any shape -> ``(*ids.shape, embedding_dim)`` in the cores' dtype.
    ``cores[k]`` is an ``nn.Parameter`` of shape ``(r_{k-1}, out_k, in_k, r_k)``; ``prod(out_k) >=
    num_embeddings``, ``prod(in_k) >= embedding_dim``. A fresh layer draws entries of variance 1 (like
    ``nn.Embedding``'s ``N(0, 1)``). :meth:`quantize_` ``("int8")`` looks rows up in fake-quantized cores and
    saves the cores as int8 (see :mod:`bondgate.quant`).

    Kept rows (optional, :meth:`keep_rows_`): ``kept_ids`` (buffer, sorted int64 ``(K,)``) and ``kept_rows``
    (parameter ``(K, embedding_dim)``) hold exact rows that lookups of those ids return instead of the MPO's (int8
    per row when quantized). A layer with kept rows has no tied head (:meth:`as_linear`).

    Constructor (random cores; :meth:`from_embedding` decomposes a trained table): ``max_bond``: cap on every bond
    (int, default 8) or per bond (sequence of ``num_cores - 1`` ints/None). ``num_cores``: number of cores (default
    3). The factors are chosen by :func:`bondgate.factorize_shape` (the vocabulary may be padded). ``padding_idx``:
    an id in ``[-num_embeddings, num_embeddings)`` (negative ones count from the end) whose lookup returns zeros
    and sends no gradient, as in ``nn.Embedding``; ``None``: none. ``device``, ``dtype``: of the cores (default
    ``torch.get_default_dtype()``).
    """

    __prepare_scriptable__ = _refuse_script  # torch.jit.script: a clear refusal

    _quant: str | None = None

    def __init__(self, num_embeddings: int, embedding_dim: int, max_bond: BondSpec = 8, num_cores: int = 3,
                 padding_idx: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_table_size(num_embeddings, embedding_dim)
        mpo = MPO.random(num_embeddings, embedding_dim, max_bond, num_cores, dtype=dtype or torch.get_default_dtype())
        mpo.cores[0] = mpo.cores[0] * math.sqrt(3 * embedding_dim)  # MPO.random has Var 1/(3 in); nn.Embedding 1
        self._setup(mpo.to(device), padding_idx)

    def _setup(self, mpo: MPO, padding_idx: int | None) -> None:
        n = mpo.out_features
        if padding_idx is not None:
            # a Python int: a numpy integer (torch accepts one) would not serialize in spec()
            padding_idx = number(padding_idx, "padding_idx", low=-n, high=n, high_open=True, integer=True,
                                 hint=f"a row of the {n} of num_embeddings") % n
        self.num_embeddings, self.embedding_dim, self.padding_idx = n, mpo.in_features, padding_idx
        contiguous = torch.contiguous_format
        self.cores = nn.ParameterList([TrackedParameter(c.detach().clone(memory_format=contiguous)) for c in mpo.cores])
        self.error: float = mpo.error  # relative Frobenius error of the table vs. the one it was built from
        self._quant_cache: dict = {}
        self._rows_cache: dict = {}
        self.register_buffer("kept_ids", None)
        self.register_parameter("kept_rows", None)
        self._heads: weakref.WeakSet[MPOLinear] = weakref.WeakSet()  # made by as_linear: tied while they share cores

    def keep_rows_(self, ids: torch.Tensor, rows: torch.Tensor) -> "MPOEmbedding":
        """Look up ``ids`` (distinct, ``(K,)``) as the exact ``rows`` ``(K, embedding_dim)`` from now on instead of in
        the MPO (replacing any kept before; ``K = 0`` removes them); returns the layer. Refused while a tied head
        (:meth:`as_linear`) shares the cores: it would miss the kept rows."""
        ids = torch.as_tensor(ids).reshape(-1)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"kept ids must be integers, got {ids.dtype}")
        c0 = self.cores[0]
        if ids.numel() == 0:
            self.kept_ids, self.kept_rows = None, None
            return self
        if any(head.cores is self.cores for head in self._heads):
            raise ValueError("this table has a tied head (as_linear), which would miss the kept rows: untie it first "
                             "(head.set_cores(list(head.cores)) gives it cores of its own) or drop it")
        if rows.shape != (ids.numel(), self.embedding_dim):
            raise ValueError(f"kept rows must have shape ({ids.numel()}, {self.embedding_dim}), got {tuple(rows.shape)}")
        order = torch.argsort(ids)
        ids, rows = ids[order].long(), rows.detach()[order.to(rows.device)]
        if bool((ids[1:] == ids[:-1]).any()) or int(ids[0]) < 0 or int(ids[-1]) >= self.num_embeddings:
            raise ValueError(f"kept ids must be distinct and lie in [0, {self.num_embeddings})")
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("kept rows hold NaN or infinite values")
        self.kept_ids = ids.to(c0.device)
        self.kept_rows = TrackedParameter(rows.to(device=c0.device, dtype=c0.dtype).clone(),
                                          requires_grad=c0.requires_grad)
        self._rows_cache = {}
        return self

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mpo(cls, mpo: MPO, padding_idx: int | None = None) -> "MPOEmbedding":
        """Wrap an :class:`MPO` of the table (out = vocabulary, in = embedding dim); cores are copied."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(mpo, padding_idx)
        return layer

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, max_bond: BondSpec = None, tol: float | None = None,
                       num_cores: int = 3, counts: torch.Tensor | None = None, form: str = "mpo",
                       keep_rows: int = 0) -> "MPOEmbedding":
        """Decompose a trained ``nn.Embedding`` by TT-SVD (see :meth:`bondgate.MPO.from_matrix`).

        ``counts``: optional token frequencies, shape ``(num_embeddings,)``, to weight the squared error of
        each row by its frequency (through the separable fit described in the module docstring; exact for
        ``form="lowrank"``; the ``padding_idx`` row, looked up as zeros, counts as never seen); ``tol`` then bounds
        the weighted error. ``form``: ``"mpo"`` (``num_cores`` cores) or ``"lowrank"`` (two factors, ``max_bond`` =
        the rank). ``keep_rows``: keep the exact rows of the ``K`` most frequent ids (needs ``counts``). ``error`` is
        always the plain relative Frobenius error of the table.
        """
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"from_embedding expects an nn.Embedding, got {type(emb).__name__}")
        for attr, bad in (("max_norm", emb.max_norm is not None), ("sparse", emb.sparse),
                          ("scale_grad_by_freq", emb.scale_grad_by_freq)):
            if bad:
                raise ValueError(f"MPOEmbedding does not support {attr}={getattr(emb, attr)!r}: the MPO has no "
                                 "per-row storage to renormalize or update sparsely")
        E = emb.weight.detach()
        _check_table_size(*E.shape)
        if emb.padding_idx is not None and E[emb.padding_idx].any():
            raise ValueError(f"the row of padding_idx={emb.padding_idx} is nonzero; MPOEmbedding supports only a "
                             "zero padding row (its lookup returns zeros there)")
        out_f, in_f = table_factors(*E.shape, num_cores, form)
        keep_rows = number(keep_rows, "keep_rows", low=0, high=E.shape[0], integer=True)
        if keep_rows and counts is None:
            raise ValueError("keep_rows needs counts (it keeps the most frequent ids' rows)")
        if counts is not None:
            counts = torch.as_tensor(counts, dtype=torch.float64).cpu()
            got = (f"shape {tuple(counts.shape)}" if counts.shape != (E.shape[0],)
                   else "NaN or infinite values" if not torch.isfinite(counts).all()
                   else f"negative values (min {float(counts.min()):g})" if (counts < 0).any() else None)
            if got is not None:
                raise ValueError(f"counts must be num_embeddings={E.shape[0]} finite non-negative frequencies "
                                 f"(one per row), got {got}")
            if emb.padding_idx is not None:  # its row is looked up as zeros: neither fitted nor kept (as compress)
                counts = counts.clone()
                counts[emb.padding_idx] = 0
        kept = most_frequent(counts, keep_rows) if keep_rows else None
        kept = kept if kept is not None and kept.numel() else None
        legs = None if counts is None else row_weight_legs(counts, out_f)
        mpo = MPO.from_matrix(table_target(E.double(), out_f, in_f, legs, kept), out_factors=out_f, in_factors=in_f,
                              max_bond=max_bond, tol=tol)
        layer = cls.from_mpo(table_mpo(mpo, legs, *E.shape).to(device=E.device, dtype=E.dtype), emb.padding_idx)
        if kept is not None:
            layer.keep_rows_(kept, E[kept.to(E.device)])
        layer.error = table_error(layer, E)
        return layer

    def as_linear(self, bias: bool = False, policy: str | PlanPolicy = "memory") -> MPOLinear:
        """A tied head ``h -> h @ E.T`` (``(*, embedding_dim) -> (*, num_embeddings)``) sharing this layer's
        ``cores`` ParameterList (the same Parameter objects). ``bias``: a zero-initialized bias of its own.
        Calling ``set_cores`` on either layer unties them. Not for a layer with kept rows."""
        if self.kept_ids is not None:
            raise ValueError("a table with kept rows has no tied MPO head (the head would miss the kept rows)")
        c0 = self.cores[0]
        head = MPOLinear.from_mpo(self.to_mpo(), c0.new_zeros(self.num_embeddings) if bias else None, policy=policy)
        head.cores = self.cores
        head.error = self.error
        self._heads.add(head)
        return head.quantize_(self._quant)  # tied cores are quantized alike

    @staticmethod
    def after_load(model: nn.Module) -> None:
        """After :func:`bondgate.load`: the checkpoint ties the head's cores to the embedding's one Parameter
        at a time; make the tied ``MPOLinear`` share the embedding's very ``ParameterList`` again."""
        embs = {tuple(map(id, m.cores)): m for m in model.modules() if isinstance(m, MPOEmbedding)}
        for m in model.modules():
            emb = embs.get(tuple(map(id, m.cores))) if isinstance(m, MPOLinear) else None
            if emb is not None:
                m.cores = emb.cores
                emb._heads.add(m)

    def spec(self) -> dict:
        """JSON-serializable structure of this layer (everything but the tensors)."""
        return {"type": type(self).__name__, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "out_factors": list(self.out_factors),
                "in_factors": list(self.in_factors), "bond_dims": list(self.bond_dims),
                "padding_idx": self.padding_idx, "dtype": str(self.cores[0].dtype).removeprefix("torch."),
                **({"kept_rows": int(self.kept_ids.numel())} if self.kept_ids is not None else {}),
                "error": None if math.isnan(self.error) else self.error,
                **({"quant": self._quant} if self._quant is not None else {})}

    @classmethod
    def from_spec(cls, spec: dict) -> "MPOEmbedding":
        """An uninitialized layer with the structure of :meth:`spec` (fill it with ``load_state_dict``)."""
        missing = {"num_embeddings", "embedding_dim", "out_factors", "in_factors", "bond_dims"} - set(spec)
        if missing:
            raise ValueError(f"layer spec is missing {sorted(missing)}")
        dtype = spec_dtype(spec)
        check_spec_sizes(spec, ("num_embeddings", "embedding_dim"), ("out_factors", "in_factors", "bond_dims"))
        out_f, in_f, r = spec["out_factors"], spec["in_factors"], [1, *spec["bond_dims"], 1]
        if len(in_f) != len(out_f) or len(r) != len(out_f) + 1:
            raise ValueError(f"inconsistent layer spec: factors {out_f} x {in_f} with bonds {spec['bond_dims']}")
        cores = [torch.zeros(r[k], out_f[k], in_f[k], r[k + 1], dtype=dtype) for k in range(len(out_f))]
        mpo = MPO(cores, int(spec["num_embeddings"]), int(spec["embedding_dim"]),
                  error=float("nan") if spec.get("error") is None else float(spec["error"]))
        layer = cls.from_mpo(mpo, spec.get("padding_idx"))
        k = spec.get("kept_rows", 0)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= layer.num_embeddings:
            raise ValueError(f"kept_rows must be an int in [0, {layer.num_embeddings}], got {k!r}")
        if k:  # placeholders: load_state_dict fills (and checks) them
            layer.kept_ids = torch.arange(k)
            layer.kept_rows = TrackedParameter(torch.zeros(k, layer.embedding_dim, dtype=dtype))
        return layer.quantize_(spec["quant"]) if spec.get("quant") is not None else layer

    def to_mpo(self) -> MPO:
        """The table as a detached :class:`MPO` (of a quantized layer: its full-precision master cores)."""
        return MPO([c.detach() for c in self.cores], self.num_embeddings, self.embedding_dim,
                   error=self.error, error_exact=False)

    def weight_matrix(self) -> torch.Tensor:
        """The dense table ``(num_embeddings, embedding_dim)`` as the MPO holds it (for tests and export; the
        ``padding_idx`` row is not masked; of a quantized layer, from the fake-quantized cores). Differentiable
        w.r.t. the cores."""
        W = MPO(self._lookup_cores(), self.num_embeddings, self.embedding_dim).to_matrix()
        if self.kept_ids is not None:
            W = W.index_copy(0, self.kept_ids, self._kept_rows().to(W.dtype))
        return W

    def to_embedding(self) -> nn.Embedding:
        """An ``nn.Embedding`` with the reconstructed table; its lookups equal this layer's."""
        c0 = self.cores[0]
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device=c0.device, dtype=c0.dtype)
        with torch.no_grad():
            emb.weight.copy_(self.weight_matrix())
            if self.padding_idx is not None:
                emb.weight[self.padding_idx] = 0
        return emb

    # ------------------------------------------------------------------ facts
    @property
    def out_factors(self) -> tuple[int, ...]:
        """Vocabulary leg sizes ``(out_1, ..., out_d)`` (an id's mixed-radix digits); product ``>= num_embeddings``."""
        return tuple(int(c.shape[1]) for c in self.cores)

    @property
    def in_factors(self) -> tuple[int, ...]:
        """Embedding-dimension leg sizes ``(in_1, ..., in_d)``; product ``>= embedding_dim``."""
        return tuple(int(c.shape[2]) for c in self.cores)

    @property
    def bond_dims(self) -> tuple[int, ...]:
        """Inner bond dimensions ``(r_1, ..., r_{d-1})`` of the cores."""
        return tuple(int(c.shape[3]) for c in self.cores[:-1])

    @property
    def num_params(self) -> int:
        """Stored weights: the cores' entries plus the kept rows'."""
        return sum(c.numel() for c in self.cores) + (self.kept_rows.numel() if self.kept_rows is not None else 0)

    # ------------------------------------------------------------------ quantization
    @property
    def quant(self) -> str | None:
        """``None`` (full precision) or ``"int8"`` (see :meth:`quantize_`)."""
        return self._quant

    @quant.setter
    def quant(self, mode: str | None) -> None:
        self.quantize_(mode)

    def quantize_(self, mode: str | None = "int8") -> "MPOEmbedding":
        """Quantize the cores in place (``"int8"``, see :mod:`bondgate.quant`; ``None``: back to full precision);
        returns the layer. As :meth:`bondgate.MPOLinear.quantize_`: full-precision master cores, lookups in the
        fake-quantized ones (straight-through gradient when training), int8 cores + fp32 scales in the state dict.
        A tied head (:meth:`as_linear`) must be quantized alike (:func:`bondgate.quantize_mpo` does both)."""
        mode = check_quant(mode)
        if mode is not None:
            register_state_dict_hook(self)
        self._quant = mode
        self._quant_cache, self._rows_cache = {}, {}
        return self

    def refresh(self) -> None:
        """Drop the fake-quantized cores and rows kept between calls, and the int8 tensors handed out to state dicts:
        only needed after a write that bypasses torch (a numpy view, DLPack), which no version counter sees."""
        self._quant_cache, self._rows_cache = {}, {}
        forget_int8([*self._modules["cores"]._parameters.values(), self._parameters.get("kept_rows")])

    def _lookup_cores(self) -> list[torch.Tensor]:
        """The cores lookups use: the parameters, or their fake-quantized values (kept between calls without
        autograd, version-checked) when the layer is quantized."""
        cores = tuple(core_dict(self, self._modules["cores"]).values())
        return list(cores if self._quant is None else fake_quantized_cores(self._quant_cache, cores))

    def _kept_rows(self) -> torch.Tensor:
        rows = self.kept_rows
        return rows if self._quant is None else fake_quantized_cores(self._rows_cache, (rows,))[0]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        record_sizes(destination, prefix, (self.num_embeddings, self.embedding_dim))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        check_sizes(state_dict, local_metadata, prefix, (self.num_embeddings, self.embedding_dim),
                    ("num_embeddings", "embedding_dim"), error_msgs)
        load_quantized_cores(self, state_dict, prefix, error_msgs)  # int8 cores + scales -> dequantized cores
        ids = state_dict.get(prefix + "kept_ids")
        if self.kept_ids is not None and isinstance(ids, torch.Tensor) and ids.shape == self.kept_ids.shape:
            problem = kept_ids_problem(ids, self.num_embeddings)
            if problem is not None:
                error_msgs.append(f"{prefix + 'kept_ids'!r} {problem}")
                del state_dict[prefix + "kept_ids"]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._quant_cache, self._rows_cache = {}, {}

    def _apply(self, fn, recurse: bool = True):
        self._quant_cache, self._rows_cache = {}, {}  # hold the old tensors
        before = self.cores[0].dtype
        out = super()._apply(fn, recurse)
        if self._quant is not None:
            warn_on_regrid("MPO table", before, self.cores[0].dtype)
        return out

    _KEPT = ("_quant_cache", "_rows_cache")  # the fake-quantized cores and kept rows kept between calls

    def _replicate_for_data_parallel(self):
        return replica_without_kept(super()._replicate_for_data_parallel(), self._KEPT)

    def __getstate__(self) -> dict:
        # copies and pickles leave the kept fake-quantized cores out (see MPOLinear.__getstate__); a copy of the table
        # and its tied heads (a model's) knows the copied heads
        state = without_kept(super().__getstate__(), self._KEPT)
        return {**state, "_heads": [head for head in self._heads if head.cores is self.cores]}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._heads = weakref.WeakSet(state.get("_heads", ()))

    @property
    def weight(self) -> torch.Tensor:
        """The table's shape ``(num_embeddings, embedding_dim)``, dtype and device, without values (a
        :class:`bondgate.layer.WeightStandIn`: computing with it raises). Code written for ``nn.Embedding`` reads
        them (FSMT's causal mask takes the table's dtype); :meth:`weight_matrix` builds the dense table,
        :meth:`to_embedding` an ``nn.Embedding``. Resize the table (``resize_token_embeddings``) before compressing."""
        c0 = self._modules["cores"][0]
        return WeightStandIn.of(type(self).__name__, (self.num_embeddings, self.embedding_dim), c0.dtype, c0.device,
                                any(p.requires_grad for p in self.parameters()))

    # ------------------------------------------------------------------ forward
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Rows of the table: integer ``ids = input`` (by position or keyword, as ``nn.Embedding``'s; ``torch.long``
        or ``torch.int``) of any shape ``-> (*ids.shape, embedding_dim)`` in the cores' dtype; ids outside
        ``[0, num_embeddings)`` raise ``IndexError``, float ids ``TypeError``. ``padding_idx`` positions are exact
        zeros."""
        ids = input
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"MPOEmbedding expects a tensor of integer ids, got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"MPOEmbedding expects integer ids (torch.long or torch.int), got dtype {ids.dtype}")
        if torch.jit.is_tracing():  # a trace would bake in this call's distinct ids
            raise no_torchscript(self)
        if torch.compiler.is_exporting():
            return self._exported_forward(ids)
        if torch.compiler.is_compiling():
            return self._eager_forward(ids)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"index out of range: ids must lie in [0, {self.num_embeddings}), "
                             f"got min {int(ids.min())}, max {int(ids.max())}")
        uniq, inverse = torch.unique(ids.long(), return_inverse=True)  # repeated tokens are computed once
        hit = None
        if self.kept_ids is not None:
            pos = torch.searchsorted(self.kept_ids, uniq).clamp_(max=self.kept_ids.numel() - 1)
            hit = self.kept_ids[pos] == uniq
            kept, uniq_all, uniq = self._kept_rows()[pos[hit]], uniq, uniq[~hit]
        cores = self._lookup_cores()
        grad = torch.is_grad_enabled() and any(c.requires_grad for c in self.cores)
        if not grad and uniq.numel() * sum(c.numel() // c.shape[1] for c in cores[1:]) <= sum(c.numel() for c in cores[1:]):
            # a few tokens (decoding): gathering each token's core slices copies less than the cores hold, and
            # beats one small matmul per output digit
            rows = traced_lookup(cores, uniq, self.embedding_dim)
        else:
            rows = self._grouped_lookup(cores, uniq, grad)
        if hit is not None:  # the kept rows and the MPO's, in the order of uniq
            merged = rows.new_empty(hit.shape[0], rows.shape[1])
            merged[hit], merged[~hit] = kept.to(rows.dtype), rows
            rows, uniq = merged, uniq_all
        if self.padding_idx is not None:
            rows = rows.masked_fill((uniq == self.padding_idx)[:, None], 0)
        return rows[inverse]

    def _grouped_lookup(self, cores: list[torch.Tensor], uniq: torch.Tensor, grad: bool) -> torch.Tensor:
        """:func:`lookup` of the ids ``uniq``, in chunks when no autograd graph is kept."""
        # Intermediates hold prod(in_<=k) * r_k numbers per token; without autograd (which keeps them anyway),
        # chunk the tokens so that they stay under ~2**20 numbers.
        chunk = uniq.numel()
        if not grad:
            width = per_token = 1
            for c in cores:
                width *= c.shape[2]
                per_token = max(per_token, width * c.shape[3])
            chunk = 2**20 // per_token
        return torch.cat([lookup(cores, u, self.embedding_dim) for u in uniq.split(max(chunk, 1))])

    @torch.compiler.disable
    def _eager_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Under torch.compile: the lookup above, run eagerly (one graph break). It deduplicates the tokens and
        groups them by digit, shapes that depend on the ids' values; traced instead, every token would gather its
        own core slices (:func:`traced_lookup`), far more memory for a training batch."""
        return self.forward(ids)

    def _exported_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``forward`` under torch.export (and ONNX export): :func:`traced_lookup` over every token (no dedup), kept
        rows chosen with ``torch.where``, the id range checked by an assertion in the graph."""
        flat = ids.reshape(-1).long()
        torch._assert_async(((flat >= 0) & (flat < self.num_embeddings)).all(),
                            f"index out of range: ids must lie in [0, {self.num_embeddings})")
        rows = traced_lookup(self._lookup_cores(), flat, self.embedding_dim)
        if self.kept_ids is not None:
            pos = torch.searchsorted(self.kept_ids, flat).clamp(max=self.kept_ids.numel() - 1)
            hit = self.kept_ids[pos] == flat
            rows = torch.where(hit[:, None], self._kept_rows()[pos].to(rows.dtype), rows)
        if self.padding_idx is not None:
            rows = rows.masked_fill((flat == self.padding_idx)[:, None], 0)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"out_factors={self.out_factors}, in_factors={self.in_factors}, bond_dims={self.bond_dims}, "
                f"params={self.num_params:,}" + (f", quant={self._quant}" if self._quant is not None else "")
                + (f", kept_rows={self.kept_ids.numel()}" if self.kept_ids is not None else ""))


def table_factors(num_embeddings: int, embedding_dim: int, num_cores: int = 3,
                  form: str = "mpo") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(out_factors, in_factors)`` of a table's MPO: :func:`bondgate.factors.factorize_shape` for ``"mpo"``,
    ``((num_embeddings, 1), (1, embedding_dim))`` for ``"lowrank"`` (two factors ``A @ B``)."""
    if form == "lowrank":
        return (num_embeddings, 1), (1, embedding_dim)
    if form != "mpo":
        raise ValueError(f"form must be 'mpo' or 'lowrank', got {form!r}")
    return factorize_shape(num_embeddings, embedding_dim, num_cores)


def most_frequent(counts: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` ids with the largest ``counts`` (ties: the lower id), sorted: int64 ``(k,)``; fewer, with a warning,
    when fewer than ``k`` ids were seen (an exact row of an id never seen buys nothing the counts know of)."""
    counts = torch.as_tensor(counts, dtype=torch.float64).cpu()
    seen = int((counts > 0).sum())
    if seen < k:
        warn_user(f"only {seen} distinct ids occur in the counts: keeping {seen} exact rows, not {k}")
    order = torch.sort(-counts, stable=True).indices[:min(k, seen)]
    return order.sort().values


def row_weight_legs(counts: torch.Tensor, out_factors: Sequence[int]) -> list[torch.Tensor]:
    """Per-digit factors of the row weights (logs, ``legs[k]`` of length ``out_factors[k]``): the least-squares
    additive fit of ``log sqrt(counts + 1)`` over the vocabulary digits (exact when one digit is the id)."""
    out_f = tuple(out_factors)
    N = math.prod(out_f)
    counts = torch.as_tensor(counts, dtype=torch.float64).cpu()
    if counts.dim() != 1 or counts.numel() > N or not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"counts must be at most {N} finite non-negative frequencies, got shape {tuple(counts.shape)}")
    d, logw = len(out_f), 0.5 * torch.log1p(counts)
    # padded rows are zero in the table, so their weight is free: give them the mean
    grid = torch.cat([logw, logw.new_full((N - counts.numel(),), float(logw.mean()))]).reshape(out_f)
    # main effects over the digits (exact on a complete grid)
    return [(grid.mean(dim=[j for j in range(d) if j != k]) if d > 1 else grid) - grid.mean() for k in range(d)]


def table_target(E: torch.Tensor, out_factors: Sequence[int], in_factors: Sequence[int],
                 legs: Sequence[torch.Tensor] | None = None, kept: torch.Tensor | None = None) -> torch.Tensor:
    """What a table's MPO is fitted to: ``E`` with the ``kept`` rows zeroed, rows weighted by ``diag(w)`` (``w`` the
    product of the legs' factors, when given), zero-padded to ``(prod(out_factors), prod(in_factors))``."""
    if kept is not None:
        E = E.index_fill(0, kept.to(E.device), 0.0)  # the MPO fits the other rows
    (N, M), Np, Mp = E.shape, math.prod(out_factors), math.prod(in_factors)
    E = torch.nn.functional.pad(E, (0, Mp - M, 0, Np - N))
    if legs is None:
        return E
    d = len(legs)
    logw = sum(a.reshape([-1 if j == k else 1 for j in range(d)]) for k, a in enumerate(legs)).reshape(-1, 1)
    return E * logw.exp().to(E)


def table_mpo(mpo: MPO, legs: Sequence[torch.Tensor] | None, num_embeddings: int, embedding_dim: int) -> MPO:
    """The MPO fitted to :func:`table_target` as one of the table: padded rows cropped and, with ``legs``, each
    core's out leg divided by its factor of ``w`` (then re-canonicalized: same bonds or smaller). Its ``error``
    is ``nan`` until set from the table."""
    if legs is None:
        return MPO(mpo.cores, num_embeddings, embedding_dim)
    cores = [c / a.exp().to(c)[None, :, None, None] for c, a in zip(mpo.cores, legs)]
    out = MPO(cores, num_embeddings, embedding_dim).canonicalize()
    out.error, out.error_exact = float("nan"), False
    return out


def table_error(layer: MPOEmbedding, E: torch.Tensor) -> float:
    """Relative Frobenius error of the layer's table (kept rows included) against ``E``."""
    with torch.no_grad():
        W = layer.weight_matrix().double()
        E = E.detach().double().to(W.device)
        return float(torch.linalg.norm(W - E) / torch.linalg.norm(E).clamp_min(1e-300))


register_layer_type(MPOEmbedding)
