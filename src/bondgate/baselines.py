"""Baselines a user would pick instead of an MPO, compared at equal stored size.

Each compressor takes a model and a target selection, works on a deep copy (the input is never
modified) and returns the new model plus a per-layer report:

* :func:`svd_compress` -- truncated SVD, each targeted layer becomes a :class:`LowRankLinear`;
* :func:`magnitude_prune` -- keep the largest ``|w|`` entries, zero the rest (real zeros);
* :func:`quantize_int8` -- ``torch.ao`` dynamic int8 quantization (weights int8, activations fp32).

"Equal stored size" means the same number of stored weight values in the targeted layers (biases
excluded, as in :attr:`bondgate.MPOLinear.num_params`); :func:`bondgate.baselines.mpo_budget` reads those numbers
off an MPO model so a baseline can be matched to it layer by layer. :func:`size_on_disk` and :func:`latency`
measure what a user would ship and wait for.

Targets: ``None`` selects every ``nn.Linear`` and HF ``transformers.pytorch_utils.Conv1D`` (GPT-2's
linear layer, weight stored ``(in, out)``), except layers whose weight is tied to another module (an
LM head tied to the embedding: pruning it in place would prune the embedding, replacing it would
untie and grow the model) and, for the replacing baselines (SVD, int8), layers inside torch's
``nn.MultiheadAttention`` / ``nn.Transformer*`` modules (their fused fast paths read the children's
``.weight`` tensors directly; even plain ``quantize_dynamic`` breaks ``nn.TransformerEncoderLayer``).
A callable ``(name, module) -> bool`` or a string (a regex that must match the whole name, as
:class:`bondgate.CompressionConfig`'s ``target_modules`` takes it) filters those candidates; a list of module names
selects exactly those and raises if one cannot be compressed. Skipped layers are listed in ``info["skipped"]``. A
layer registered under several names is compressed once (a string or callable is tried on each of its names), listed
under the first name given or matched; the new layer takes all of them.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import re
import statistics
import struct
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ._checks import number, positive_int
from .calibration import eval_mode
from .gating import preserved_state
from .layer import MPOLinear, carry_hooks, freeze_like, trains
from .lowrank import LowRankLinear
from .surgery import dense_weight, is_conv1d, module_names

__all__ = [
    "LowRankLinear",
    "svd_compress",
    "magnitude_prune",
    "quantize_int8",
    "mpo_budget",
    "stored_bytes",
    "size_on_disk",
    "sparse_state_dict",
    "load_sparse_state_dict",
    "latency",
    "paired_latency",
]

Target = None | str | Callable[[str, nn.Module], bool] | Iterable[str]

# safetensors metadata, per sparse form: JSON {state_dict key: dense shape}
_META_KEYS = {"csr": "bondgate.csr", "mask": "bondgate.mask"}
# safetensors metadata: JSON {state_dict key: the key its tied tensor is stored under}
_ALIASES_KEY = "bondgate.aliases"


# ---------------------------------------------------------------------------------------- layer helpers
def _is_dense_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def _view_key(t: torch.Tensor) -> tuple:
    return (*_storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``root``; returns the (possibly new) root."""
    if name == "":
        return new
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, new)
    return root


# torch's own attention/transformer modules read their children's ``.weight`` tensors directly (fused
# fast paths), so a child swapped for a module without a plain weight tensor breaks them.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                        nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)


def _weight_reader(model: nn.Module, names: list[str]) -> str | None:
    for name in names:
        parts = name.split(".") if name else []
        for i in range(len(parts)):
            anc = model.get_submodule(".".join(parts[:i]))
            if isinstance(anc, _READS_CHILD_WEIGHTS):
                return type(anc).__name__
    return None


def _select(model: nn.Module, target: Target, replace: bool) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``({name: layer} to compress, {name: reason} skipped)``; see the module docstring."""
    owners: dict[tuple, set[int]] = defaultdict(set)
    for m in model.modules():
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None and t.numel() > 0:
                owners[_storage_key(t)].add(id(m))
    aliases = module_names(model)

    # every name of every layer (a shared layer has several), in the order of named_modules()
    named = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if _is_dense_layer(m)]
    if isinstance(target, str):  # a regex over the names, as CompressionConfig.target_modules takes one
        try:
            pattern = re.compile(target)
        except re.error as exc:
            raise ValueError(f"target {target!r} is not a valid regular expression: {exc}") from None
        if not any(pattern.fullmatch(n) for n, _ in named):
            dense = [n for n, _ in named]
            raise KeyError(f"target {target!r} (a regex that must match a whole name) matches none of the names of "
                           f"the {len({id(m) for _, m in named})} nn.Linear / Conv1D layers of "
                           f"{type(model).__name__} ({', '.join(dense[:4])}{', ...' if len(dense) > 4 else ''})")
        target = lambda n, _: pattern.fullmatch(n) is not None  # noqa: E731
    explicit = target is not None and not callable(target)
    if explicit:
        if not isinstance(target, Iterable):
            raise TypeError(f"target takes None, a regex string, a callable (name, module) -> bool or a list of "
                            f"module names, got {type(target).__name__}")
        names = list(target)
        candidates = []
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"target's module names must be strings, got {name!r} ({type(name).__name__})")
            try:
                m = model.get_submodule(name)
            except AttributeError as exc:
                raise KeyError(f"no submodule named {name!r} in {type(model).__name__}") from exc
            if not _is_dense_layer(m):
                raise TypeError(f"{name!r} is a {type(m).__name__}, not an nn.Linear or transformers Conv1D")
            candidates.append((name, m))
    else:
        candidates = [(n, m) for n, m in named if target is None or target(n, m)]

    selected: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    seen: set[int] = set()
    for name, m in candidates:
        if id(m) in seen:  # a shared layer, once: under the first of its names given or matched
            continue
        seen.add(id(m))
        if m.weight.is_meta:  # every meta tensor's storage is at 0: it would pass for a weight tied to all others
            raise ValueError(f"{name}.weight is on the meta device (no values); materialize the model first, e.g. "
                             f"model.to_empty(device='cpu') and load its weights")
        reason = None
        if len(owners[_storage_key(m.weight)]) > 1:
            reason = "weight is tied to another module"
        elif replace and (reader := _weight_reader(model, aliases[id(m)])):
            reason = f"its ancestor {reader} reads the layer's .weight directly, so it cannot be replaced"
        if reason is None:
            selected[name] = m
        elif explicit:
            raise ValueError(f"cannot compress {name!r}: {reason}")
        else:
            skipped[name] = reason
    return selected, skipped


def _budgets(
    model: nn.Module, param_ratio: float | None, params: Mapping[str, int] | None, target: Target, replace: bool
) -> tuple[dict[str, nn.Module], dict[str, int], dict[str, str]]:
    if (param_ratio is None) == (params is None):
        raise ValueError("give exactly one of param_ratio or params")
    if params is not None:
        if target is not None:
            raise ValueError("params already names the layers; do not pass target as well")
        selected, skipped = _select(model, list(params), replace)
        for name, n in params.items():
            if isinstance(n, bool) or not isinstance(n, (int, float, np.integer, np.floating)) or not math.isfinite(n) \
                    or int(n) != n or n < 0:  # (NaN / inf / a string reached int() and raised its own error)
                raise ValueError(f"params[{name!r}] must be a non-negative integer, got {n!r}")
        budgets = _per_layer(model, selected, {name: int(n) for name, n in params.items()}, "params")
        return selected, budgets, skipped
    param_ratio = number(param_ratio, "param_ratio", low=0, high=1)
    selected, skipped = _select(model, target, replace)
    budgets = {n: math.floor(param_ratio * m.weight.numel() + 0.5) for n, m in selected.items()}
    return selected, budgets, skipped


def _per_layer(model: nn.Module, selected: dict[str, nn.Module], given: Mapping[str, int], what: str) -> dict[str, int]:
    """``given`` (``{module name: value}``) under the names ``selected`` lists the layers by; the names of one shared
    layer must give it one value."""
    listed = {id(m): n for n, m in selected.items()}
    out: dict[str, int] = {}
    for name, v in given.items():
        first = listed[id(model.get_submodule(name))]
        if out.setdefault(first, v) != v:
            raise ValueError(f"{what} gives {first!r} and {name!r}, two names of one layer, different values "
                             f"({out[first]} and {v})")
    return out


def _totals(layers: dict[str, dict], skipped: dict[str, str]) -> dict[str, Any]:
    return {
        "layers": layers,
        "skipped": skipped,
        "dense_params": sum(d["dense_params"] for d in layers.values()),
        "params": sum(d["params"] for d in layers.values()),
    }


def mpo_budget(model: nn.Module) -> dict[str, int]:
    """``{name: num_params}`` of every compressed linear layer in ``model`` — :class:`MPOLinear` and
    :class:`~bondgate.LowRankLinear` (the weights they store, bias excluded).

    Pass it as ``params=`` to :func:`svd_compress` / :func:`magnitude_prune` on the dense model the MPO
    model was made from, so each baseline layer stores as many weights as its counterpart. Compressed tables
    (:class:`~bondgate.MPOEmbedding`) have no baseline here and are not listed. Raises ``ValueError`` when the model
    has no compressed linear layer (an empty budget would leave the baseline dense without a word).
    """
    budget = {name: m.num_params for name, m in model.named_modules() if isinstance(m, (MPOLinear, LowRankLinear))}
    if not budget:
        raise ValueError("mpo_budget: the model has no MPOLinear or LowRankLinear layers (compress it first)")
    return budget


def svd_compress(
    model: nn.Module,
    param_ratio: float | None = None,
    params: Mapping[str, int] | None = None,
    target: Target = None,
    *,
    rank: int | Mapping[str, int] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Replace targeted layers of a copy of ``model`` by truncated-SVD :class:`LowRankLinear` layers.

    Give one of: ``param_ratio`` (each layer keeps about that fraction of its ``out*in`` weights),
    ``params`` (``{layer name: weights to store}``, e.g. :func:`bondgate.baselines.mpo_budget`), or ``rank`` (an int
    for every targeted layer, clipped to ``min(out, in)``, or ``{name: rank}``).

    ``target`` (with ``param_ratio`` or an int ``rank``; ``params`` and a ``rank`` dict name the layers themselves):
    ``None``: every ``nn.Linear`` and HF ``Conv1D`` except layers whose weight is tied to another module and layers
    inside torch's ``nn.MultiheadAttention`` / ``nn.Transformer*`` modules (listed in ``info["skipped"]``); a
    string: a regex that must match a whole module name, filtering those (``KeyError`` when it matches no layer); a
    callable ``(name, module) -> bool``, filtering them too; or a list of module names: exactly those layers
    (one that does not exist, is not a linear layer or cannot be replaced raises).

    With a budget ``n`` the rank is ``max(1, n // (in + out))``, so a layer never stores more than its
    budget unless even rank 1 does. If the budget covers the dense ``out*in`` weights, or the rank
    reaches ``min(out, in)``, or the factors would store at least as much as the dense weight, the
    layer stays dense (lossless and no larger). An explicit ``rank`` is always honoured. A new layer keeps the
    replaced one's frozen parameters, train/eval mode and forward/backward hooks, as :func:`bondgate.compress` does.

    Returns ``(new_model, info)``; ``info["layers"][name]`` holds ``kind`` (``"low_rank"`` or
    ``"dense"``), ``shape`` ``(out, in)``, ``rank``, ``budget``, ``params``, ``dense_params`` and
    ``error`` (relative Frobenius weight error); ``info["params"]`` / ``["dense_params"]`` sum them.
    """
    given = sum(a is not None for a in (param_ratio, params, rank))
    if given != 1:
        raise ValueError("give exactly one of param_ratio, params or rank")
    new = copy.deepcopy(model)
    if rank is not None:
        if isinstance(rank, Mapping):
            if target is not None:
                raise ValueError("rank already names the layers; do not pass target as well")
            selected, skipped = _select(new, list(rank), replace=True)
            ranks = _per_layer(new, selected, {n: positive_int(r, f"rank[{n!r}]") for n, r in rank.items()}, "rank")
        else:
            rank = positive_int(rank, "rank")  # (int() took 2.7 as 2 and True as 1)
            selected, skipped = _select(new, target, replace=True)
            ranks = {n: rank for n in selected}
        budgets: dict[str, int | None] = dict.fromkeys(selected)
    else:
        selected, budgets, skipped = _budgets(new, param_ratio, params, target, replace=True)
        ranks = {}

    aliases = module_names(new)
    layers: dict[str, dict] = {}
    for name, m in selected.items():
        out_f, in_f = dense_weight(m).shape
        dense, full = out_f * in_f, min(out_f, in_f)
        budget = budgets[name]
        if budget is None:
            k = min(ranks[name], full)
        else:
            k = max(1, budget // (in_f + out_f))
            if budget >= dense or k >= full or k * (in_f + out_f) >= dense:
                k = None
        entry = {"shape": (out_f, in_f), "budget": budget, "dense_params": dense}
        if k is None:
            entry.update(kind="dense", rank=None, params=dense, error=0.0)
        else:
            low = LowRankLinear.from_linear(m, k)
            freeze_like(trains(m), low)  # as compress replaces a layer (surgery.swap_module)
            low.train(m.training)
            carry_hooks(m, low)
            for alias in aliases[id(m)]:
                new = _set_module(new, alias, low)
            entry.update(kind="low_rank", rank=k, params=low.num_params, error=low.error)
        layers[name] = entry
    return new, _totals(layers, skipped)


# ---------------------------------------------------------------------------------------- pruning
def magnitude_prune(
    model: nn.Module,
    param_ratio: float | None = None,
    params: Mapping[str, int] | None = None,
    target: Target = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Zero all but the ``budget`` largest-``|w|`` weights of each targeted layer in a copy of ``model``.

    Budgets: ``param_ratio`` (``floor(ratio * numel + 0.5)`` per layer: halves round up, unlike Python's ``round``) or
    ``params`` (``{name: n}``, e.g. :func:`bondgate.baselines.mpo_budget`). Ties in ``|w|`` keep the entry with the
    lower flat index of the stored weight, so the result is deterministic and the non-zero count is exactly the
    budget (unless the weight already had fewer non-zeros). The zeros are written into the weight itself: no
    ``torch.nn.utils.prune`` masks or hooks remain, and the layers stay dense modules (no speed-up;
    see :func:`size_on_disk` with ``sparse=`` for the storage cost of the non-zeros).

    ``target`` (with ``param_ratio``; the keys of ``params`` name the layers themselves): ``None``: every
    ``nn.Linear`` and HF ``Conv1D`` except layers whose weight is tied to another module (listed in
    ``info["skipped"]``); a string: a regex that must match a whole module name, filtering those (``KeyError`` when
    it matches no layer); a callable ``(name, module) -> bool``, filtering them too; or a list of module names:
    exactly those layers (one that does not exist, is not a linear layer or is tied raises).

    Returns ``(new_model, info)``; ``info["layers"][name]`` holds ``budget``, ``params`` (non-zeros
    kept), ``dense_params``, ``density`` (1.0 for an empty layer) and ``error`` (relative Frobenius weight error).
    """
    new = copy.deepcopy(model)
    selected, budgets, skipped = _budgets(new, param_ratio, params, target, replace=False)
    layers: dict[str, dict] = {}
    for name, m in selected.items():
        w = m.weight
        numel = w.numel()
        budget = min(budgets[name], numel)
        flat = w.detach().reshape(-1)
        if not bool(torch.isfinite(flat).all()):  # a NaN sorts as the largest and makes the error NaN
            raise ValueError(f"magnitude_prune: {name + '.' if name else ''}weight holds NaN or inf values")
        # Stable descending sort keeps equal |w| in index order, i.e. lower index wins ties.
        order = torch.sort(flat.abs(), descending=True, stable=True).indices
        drop = torch.ones(numel, dtype=torch.bool, device=w.device)
        drop[order[:budget]] = False
        total = float(flat.double().square().sum())
        removed = float(flat[drop].double().square().sum())
        with torch.no_grad():
            w.masked_fill_(drop.view_as(w), 0)
        nnz = int(torch.count_nonzero(w))
        layers[name] = {
            "shape": tuple(dense_weight(m).shape),
            "budget": budgets[name],
            "dense_params": numel,
            "params": nnz,
            "density": nnz / numel if numel else 1.0,  # an empty layer stays dense, as svd_compress keeps it
            "error": math.sqrt(removed / total) if total > 0 else 0.0,
        }
    return new, _totals(layers, skipped)


# ---------------------------------------------------------------------------------------- int8
def _conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    W = conv.weight.detach()  # (in, out)
    lin = nn.Linear(W.shape[0], W.shape[1], bias=conv.bias is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W.T)
        if conv.bias is not None:
            lin.bias.copy_(conv.bias.detach())
    return lin


def check_finite(layers: Mapping[str, nn.Module], who: str) -> None:
    """Refuse layers holding NaN or inf: torch's dynamic int8 layers take them and fail at their first call (its
    ``ChooseQuantizationParams`` error, naming no layer)."""
    for name, m in layers.items():
        for pname, p in m.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise ValueError(f"{who}: {name}.{pname} contains NaN or inf ({int((~torch.isfinite(p)).sum())} "
                                 f"entries): fix or reload the model first")


def quantize_int8(model: nn.Module, target: Target = None) -> nn.Module:
    """Dynamic int8 quantization of a copy of ``model`` with ``torch.ao.quantization.quantize_dynamic``.

    Weights are stored int8 (per-tensor affine scale/zero point), activations are quantized on the
    fly per batch, outputs are fp32. HF ``Conv1D`` is not an ``nn.Linear`` (``quantize_dynamic``
    matches exact module types and would leave GPT-2's layers in fp32), so targeted ``Conv1D`` layers
    are first converted to the equivalent ``nn.Linear`` (weight transposed) and then quantized.
    ``target`` takes what :func:`bondgate.svd_compress`'s does (None, a regex, a callable, a list of names);
    ``target=None`` differs from the bare ``quantize_dynamic(m, {nn.Linear})`` in leaving tied layers (an LM head;
    ``quantize_dynamic`` would copy a tied head into an untied int8 one) and layers inside ``nn.Transformer*``
    modules (which ``quantize_dynamic`` breaks) in fp32.

    Caveats: CPU only (fbgemm/x86/qnnpack engines), fp32 models only, inference only (the result is
    in eval mode and has no gradients), :class:`LowRankLinear` / :class:`MPOLinear` are left as they
    are. ``torch.ao.quantization`` warns that it is deprecated in favour of ``torchao``; the warning
    is silenced here since this is the baseline users run today.
    """
    new = copy.deepcopy(model)
    selected, _ = _select(new, target, replace=True)
    if not selected:
        return new.eval()
    wrong = {n: p.dtype for n, m in selected.items() for p in m.parameters() if p.dtype != torch.float32}
    if wrong:  # torch's dynamic int8 layers compute in float32: a bf16 bias would fail on every call
        name, dtype = next(iter(wrong.items()))
        raise ValueError(f"quantize_int8 needs float32 layers; {name} is {dtype} (convert with model.float() first)")
    check_finite(selected, "quantize_int8")
    aliases = module_names(new)
    others: dict[str, list[str]] = {}  # {a layer's first name: its other names}
    for m in selected.values():
        lin = _conv1d_to_linear(m) if is_conv1d(m) else m
        for alias in aliases[id(m)]:
            new = _set_module(new, alias, lin)
        first, *rest = aliases[id(m)]
        others[first] = rest
    # quantize_dynamic swaps a layer under each name it walks to, and named_children() skips a module already seen:
    # a shared layer's other names kept the fp32 layer (or, under another parent, got an int8 copy of their own)
    new = quantize_dynamic(new, list(others))
    for first, rest in others.items():
        q = new.get_submodule(first)
        for alias in rest:
            new = _set_module(new, alias, q)
    return new


def quantize_dynamic(model: nn.Module, names: Iterable[str], per_channel: bool = False) -> nn.Module:
    """``torch.ao.quantization.quantize_dynamic`` of the ``nn.Linear`` layers ``names`` of ``model``, in place
    (a bare layer, ``names == {""}``, is returned as a new module); weights int8 per tensor, or per output
    channel with ``per_channel``. Silences torch's deprecation warnings (see :func:`quantize_int8`)."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig
    from torch.ao.quantization import quantize_dynamic as _quantize_dynamic

    names = set(names)
    wrapped = "" in names  # quantize_dynamic converts children only, so a bare layer needs a parent
    if wrapped:
        model, names = nn.Sequential(model), {"0"}
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_(tensor|channel)", category=UserWarning)
        model = _quantize_dynamic(model, {n: qconfig for n in names}, dtype=torch.qint8, inplace=True)
    return model[0] if wrapped else model


# ---------------------------------------------------------------------------------------- sizes
def _is_quantized(model: nn.Module) -> bool:
    return any(not isinstance(t, torch.Tensor) or t.is_quantized for t in model.state_dict().values())


def _sparse_forms(key: str, t: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """The candidate sparse encodings of 2-D ``t``, by form: ``"mask"`` (the non-zeros in row-major order and a
    bit per entry) and ``"csr"`` (the non-zeros, their columns as int16 where the width allows else int32, and
    int32 row pointers). NaN entries are kept; -0.0 is a zero (it comes back +0.0): a weight pruned by multiplying
    with a mask (``torch.nn.utils.prune``) holds many, which stored as values made its file ~4x larger."""
    nz = t != 0
    rows, cols = nz.nonzero(as_tuple=True)  # row-major order, as CSR needs
    values = t[rows, cols].contiguous()
    counts = torch.bincount(rows, minlength=t.shape[0])
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    col_type = torch.int16 if t.shape[1] <= 2**15 else torch.int32
    return {"mask": {f"{key}.sparse_values": values, f"{key}.sparse_mask": torch.from_numpy(np.packbits(nz.numpy()))},
            "csr": {f"{key}.csr_values": values, f"{key}.csr_col_indices": cols.to(col_type),
                    f"{key}.csr_crow_indices": crow.to(torch.int32)}}


def sparse_state_dict(
    model: nn.Module, sparse: bool | Iterable[str] = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` ready for ``safetensors.torch.save``: contiguous CPU clones of the
    state dict, tied tensors (same storage view) stored once under their first key, their other keys recorded in
    the metadata (``"bondgate.aliases"``: ``{key: first key}``).

    ``sparse``: ``True`` considers every ``nn.Linear`` / ``Conv1D`` weight (tied ones excepted), an iterable of
    module names those layers (e.g. ``info["layers"]`` of :func:`magnitude_prune`). Each such weight ``key`` is
    stored in the smallest of three forms: dense (where no sparse form is smaller: a layer that was not pruned);
    a bitmask — ``key.sparse_values`` (the non-zeros in row-major order, the weight's dtype) and
    ``key.sparse_mask`` (uint8, one bit per entry): ``4 x nnz + numel / 8`` bytes in fp32; or CSR —
    ``key.csr_values``, ``key.csr_col_indices`` (int16 up to 32,768 columns, else int32) and
    ``key.csr_crow_indices`` (rows + 1, int32), the smaller below ~6% non-zeros. The sparse forms' shapes go into
    the metadata.
    """
    if isinstance(sparse, str):  # list("10") would select layers "1" and "0"
        raise TypeError(f"sparse takes True, False or a list of module names, got the string {sparse!r} (for one "
                        f"layer: [{sparse!r}])")
    if sparse is True:
        layers, _ = _select(model, None, replace=False)
    elif sparse is False:
        layers = {}
    else:
        layers, _ = _select(model, list(sparse), replace=False)
    sparse_views = {_view_key(m.weight) for m in layers.values()}

    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, dict[str, list[int]]] = {form: {} for form in _META_KEYS}
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key, t in model.state_dict().items():
        vk = _view_key(t)
        if vk in seen and t.numel() > 0:  # empty tensors may all report data_ptr 0
            aliases[key] = seen[vk]
            continue
        seen[vk] = key
        t = t.detach().to("cpu")
        if vk in sparse_views:
            if t.ndim != 2 or t.numel() >= 2**31:
                raise ValueError(f"cannot store {key} (shape {tuple(t.shape)}) in a sparse form")
            forms = _sparse_forms(key, t)
            # each tensor also costs its header entry (~ its name + 64 bytes of JSON): on tiny layers, more than
            # the zeros saved
            nbytes = {f: sum(v.nbytes + len(k) + 64 for k, v in parts.items()) for f, parts in forms.items()}
            form = min(nbytes, key=nbytes.get)
            if nbytes[form] < t.nbytes + len(key) + 64:
                tensors.update(forms[form])
                shapes[form][key] = list(t.shape)
                continue
        tensors[key] = t.clone(memory_format=torch.contiguous_format)
    metadata = {"format": "pt", **{_META_KEYS[f]: json.dumps(sh) for f, sh in shapes.items() if sh}}
    if aliases:
        metadata[_ALIASES_KEY] = json.dumps(aliases)
    return tensors, metadata


def _sparse_error(key: str, what: str) -> ValueError:
    return ValueError(f"sparse weight {key!r} is damaged: {what}")


def _check_values(key: str, values: torch.Tensor) -> None:
    if not values.is_floating_point():  # the weights stored sparse are; int values gave an int weight back
        raise _sparse_error(key, f"its values are {values.dtype}, not floating point")


def _dense_from_csr(key: str, shape: list[int], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    crow = tensors.pop(f"{key}.csr_crow_indices").long()
    col = tensors.pop(f"{key}.csr_col_indices").long()
    values = tensors.pop(f"{key}.csr_values")
    _check_values(key, values)
    nnz = values.numel()
    if crow.shape != (shape[0] + 1,) or int(crow[0]) != 0 or int(crow[-1]) != nnz or col.shape != (nnz,) \
            or values.shape != (nnz,) or bool((crow.diff() < 0).any()):
        raise _sparse_error(key, f"row pointers and entries do not describe {nnz} values in {shape[0]} rows")
    if col.numel() and not (0 <= int(col.min()) and int(col.max()) < shape[1]):
        raise _sparse_error(key, f"a column index outside [0, {shape[1]})")
    rows = torch.repeat_interleave(torch.arange(shape[0]), crow.diff())
    bad = ((rows.diff() == 0) & (col.diff() <= 0)).nonzero()  # one value per entry, in the order written
    if bad.numel():
        # a shifted row pointer moves an entry into the next row, where its column breaks the order: the file
        # cannot tell which of the two is wrong
        r = int(rows[int(bad[0, 0])])
        raise _sparse_error(key, f"its columns do not increase within a row (row {r}: entries {int(crow[r])} to "
                                 f"{int(crow[r + 1]) - 1} by its row pointers): a row pointer or a column index is "
                                 "wrong")
    dense = values.new_zeros(shape)
    dense[rows, col] = values
    return dense


def _dense_from_mask(key: str, shape: list[int], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    packed, values = tensors.pop(f"{key}.sparse_mask"), tensors.pop(f"{key}.sparse_values")
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.shape != ((n + 7) // 8,):
        raise _sparse_error(key, f"its mask is not {(n + 7) // 8} bytes")
    if values.dim() != 1:
        raise _sparse_error(key, f"its values are not a list (shape {tuple(values.shape)})")
    _check_values(key, values)
    mask = torch.from_numpy(np.unpackbits(packed.numpy(), count=n)).bool()
    if int(mask.sum()) != values.numel():
        raise _sparse_error(key, f"its mask has {int(mask.sum())} entries set for {values.numel()} values")
    dense = values.new_zeros(n)
    dense[mask] = values
    return dense.reshape(shape)


def load_sparse_state_dict(data: bytes | str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a file (or its bytes) written from :func:`sparse_state_dict`; sparse weights come back dense, tied keys
    as the tensor of the key they are tied to (the same object). A damaged file raises ``ValueError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not isinstance(data, bytes):
        with open(data, "rb") as f:
            data = f.read()
    try:
        tensors = load(data)
    except SafetensorError as exc:
        raise ValueError(f"not a readable safetensors file: {exc}") from None
    (n,) = struct.unpack("<Q", data[:8])  # u64 header length, JSON header (with "__metadata__"), data
    meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    stored = set(tensors)
    for form, build in (("csr", _dense_from_csr), ("mask", _dense_from_mask)):
        shapes = json.loads(meta.get(_META_KEYS[form], "{}"))
        if not isinstance(shapes, dict):
            raise ValueError(f"the file's {_META_KEYS[form]!r} metadata is not a mapping of weights to shapes")
        for key, shape in shapes.items():
            if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d >= 0 for d in shape)):
                raise _sparse_error(key, f"its shape {shape!r} is not two sizes")
            if key in stored:
                raise _sparse_error(key, "the file holds it both dense and in a sparse form")
            try:
                tensors[key] = build(key, shape, tensors)
            except KeyError as exc:
                raise _sparse_error(key, f"the file has no {exc}") from None
    aliases = json.loads(meta.get(_ALIASES_KEY, "{}"))
    if not (isinstance(aliases, dict) and all(isinstance(v, str) for v in aliases.values())):
        raise ValueError(f"the file's {_ALIASES_KEY!r} metadata is not a mapping of keys to keys")
    for alias, target in aliases.items():
        if alias in tensors or target not in tensors or target in aliases:
            raise ValueError(f"the file's tied key {alias!r} -> {target!r} does not point to a stored tensor")
        tensors[alias] = tensors[target]
    return tensors


def _shared_once(model: nn.Module) -> dict:
    """``model.state_dict()`` with the entries of a module's second (third ...) name the very objects of its first:
    ``torch.save`` then stores them once. A dynamic int8 layer's packed parameters are unpacked into new tensors for
    each name it has, so a shared int8 layer was stored (and measured) twice; the keys stay, so the file still loads
    with ``load_state_dict(strict=True)``."""
    sd = model.state_dict()
    for names in module_names(model).values():
        first, *rest = names
        for alias in rest:
            src, dst = (f"{first}." if first else ""), f"{alias}."
            for key in [k for k in sd if k.startswith(dst) and src + k[len(dst):] in sd]:
                sd[key] = sd[src + key[len(dst):]]
    return sd


def _serialize(model: nn.Module, sparse: bool | Iterable[str]) -> bytes:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if _is_quantized(model):
        # Dynamic int8 layers keep packed params (not plain tensors), which safetensors cannot hold;
        # their native format is torch.save. This is only used to measure the baseline's size:
        # bondgate's own checkpoints are safetensors + JSON and never pickle.
        if sparse is not False:
            raise ValueError("sparse storage is not supported for quantized models")
        buf = io.BytesIO()
        torch.save(_shared_once(model), buf)
        return buf.getvalue()
    from safetensors.torch import save

    tensors, metadata = sparse_state_dict(model, sparse)
    return save(tensors, metadata)


def stored_bytes(model: nn.Module, sparse: bool | Iterable[str] = False) -> int:
    """Bytes of the model's state dict as shipped: a safetensors file (tied weights once), pruned
    weights in their smallest sparse form when ``sparse`` selects them (see :func:`sparse_state_dict`); dynamic
    int8 models as their ``torch.save`` state dict."""
    return len(_serialize(model, sparse))


def size_on_disk(model: nn.Module, path: str | os.PathLike | None = None, sparse: bool | Iterable[str] = False) -> int:
    """Bytes (an int, not MB) of the model's state dict as shipped: the size of the safetensors file of
    :func:`bondgate.baselines.sparse_state_dict` (tied weights stored once); a dynamic int8 model
    (:func:`bondgate.quantize_int8`) is measured as its ``torch.save`` state dict instead (its pickle and zip
    included). With ``path`` the file is
    also written there and its size on disk returned (the same number); without, nothing is written
    (:func:`bondgate.baselines.stored_bytes` gives the same count).

    ``sparse``: ``True`` stores every ``nn.Linear`` / ``Conv1D`` weight (tied ones excepted) in the smallest of
    dense, a bitmask and CSR (:func:`sparse_state_dict`), a list of module names those layers' weights (not for
    int8 models). Compare a pruned model both ways: ``sparse=False`` (the zeros stored densely, what
    ``save_file(model.state_dict())`` gives) and ``sparse=True`` (at half the weights kept in fp32: the bitmask,
    4.25 bytes per non-zero).
    """
    data = _serialize(model, sparse)
    if path is None:
        return len(data)
    with open(path, "wb") as f:
        f.write(data)
    return os.path.getsize(path)


# ---------------------------------------------------------------------------------------- latency
def _quantile(sorted_x: list[float], q: float) -> float:
    pos = q * (len(sorted_x) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_x) - 1)
    return sorted_x[lo] + (sorted_x[hi] - sorted_x[lo]) * (pos - lo)


def latency(
    model: nn.Module,
    example_inputs: Any,
    reps: int = 50,
    warmup: int = 5,
    threads: int | None = None,
) -> dict[str, float]:
    """Wall time of ``model(example_inputs)`` in seconds per call, under ``torch.inference_mode()``.

    ``example_inputs``: a tensor, a tuple/list of positional arguments, or a dict of keyword
    arguments. The model runs in eval mode (its train/eval flags are restored afterwards, and so is the routing state
    of gated layers: their price and level counts are as before the timing calls); with
    ``threads`` the intra-op thread count is set for the measurement and restored. CUDA is
    synchronized around each call. ``reps``: timed calls (default 50); ``warmup``: untimed calls made first
    (default 5, so that one-time work such as a layer's first-call planning is not timed). Returns ``median``,
    ``p10``, ``p90``, ``mean``, ``min`` (seconds), ``reps`` and ``threads`` (the count in effect). To compare
    models, :func:`bondgate.baselines.paired_latency`.
    """
    return paired_latency({"model": model}, example_inputs, reps=reps, rounds=1, warmup=warmup,
                          threads=threads)["model"]


def paired_latency(
    models: Mapping[str, nn.Module],
    example_inputs: Any,
    reps: int = 50,
    rounds: int = 5,
    warmup: int = 5,
    threads: int | None = None,
) -> dict[str, dict[str, float]]:
    """:func:`latency` of each model on the same inputs, its ``reps`` calls spread over ``rounds`` interleaved
    rounds (in alternating order), so that a slow stretch of a shared machine hits every model alike — two
    measurements taken one after the other can differ by more than the models do. Returns, per name, the dict
    :func:`latency` returns, over all of that model's calls (each model first gets ``warmup`` untimed calls)."""
    reps, rounds = number(reps, "reps", low=1, integer=True), number(rounds, "rounds", low=1, integer=True)
    warmup = number(warmup, "warmup", low=0, integer=True)
    threads = number(threads, "threads", low=1, integer=True, none_ok=True)
    if not isinstance(models, Mapping) or not models or not all(isinstance(m, nn.Module) for m in models.values()):
        raise ValueError("models must be a non-empty mapping of names to nn.Modules")
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]

    def timed(model: nn.Module, calls: int, untimed: int) -> list[float]:
        cuda = any(t.is_cuda for t in tensors) or any(p.is_cuda for p in model.parameters())
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        times = []
        with eval_mode(model), preserved_state(model), torch.inference_mode():
            for i in range(untimed + calls):
                sync()
                t0 = time.perf_counter()
                model(*args, **kwargs)
                sync()
                if i >= untimed:
                    times.append(time.perf_counter() - t0)
        return times

    rounds = min(rounds, reps)
    per_round = [reps // rounds + (r < reps % rounds) for r in range(rounds)]
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    old_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(int(threads))
        for n in names:
            timed(models[n], 0, warmup)
        for r, calls in enumerate(per_round):
            for n in names if r % 2 == 0 else names[::-1]:
                times[n] += timed(models[n], calls, 0)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
    out = {}
    for n, t in times.items():
        t.sort()
        out[n] = {"median": statistics.median(t), "p10": _quantile(t, 0.1), "p90": _quantile(t, 0.9),
                  "mean": statistics.fmean(t), "min": t[0], "reps": reps, "threads": used}
    return out
