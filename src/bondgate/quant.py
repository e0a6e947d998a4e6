"""Symmetric per-channel int8 quantization of MPO cores: smaller checkpoints, and quantization-aware training.

A core ``G`` of shape ``(r_left, out, in, r_right)`` gets one fp32 scale per ``(r_left, out)`` slice (the rows of
the right-to-left sweep's matrix layout): ``s = max|G[a, o]| / 127``, ``q = round(G / s)`` in ``[-127, 127]``.
Among the channel choices, measured as the relative error of the reconstructed matrix (TT-SVD and random MPOs of
384 x 1536 at bonds 32 with 3-4 cores; real stories260K layers at bonds 16), it is the best one whose scales cost
nothing on disk: 0.9-1.3 % against 1.3-1.9 % per ``r_right`` slice and 1.5-2.5 % per tensor (the scales: 0.5 % of
the values). TT-SVD leaves the cores left-canonical with the Schmidt values in the next core's ``r_left`` index,
which a per-``(r_left, out)`` scale follows. Per ``(r_left, out, in)`` is ~30 % more accurate, but its scales would
add a fifth to the int8 bytes; rebalancing the bond gauge before quantizing gained nothing.

Exactness. Each scale is rounded *up* to 17 significant bits (power-of-two scales for float16/bfloat16 cores), so
that ``q * s`` is exactly representable in the cores' dtype: dequantizing gives the values the fake-quantized
forward computes bit for bit, and fake quantization is idempotent (``fake_quant(dequantize(*quantize(G)))`` equals
``dequantize(*quantize(G))``). That is what makes a quantized layer saved as int8 and loaded back into a layer of
the same dtype (master cores = the dequantized values) bit-identical to the saved one; loaded into a layer on the
other grid (16-bit against float32/64), the cores are re-rounded onto its grid, with a warning. All-zero channels
get scale 0 (and zeros back); a channel below float32's range of scales (max below ~1.8e-43) gets the smallest one,
and zeros.

Layers: ``MPOLinear.quantize_("int8")`` / ``MPOEmbedding.quantize_("int8")`` (or :func:`quantize_mpo` for a whole
model) keep fp32 *master* cores and run the forward on ``fake_quant(master)`` — recomputed per call when training,
with a straight-through (identity) gradient to the masters, so :func:`bondgate.distill` heals the quantization
error; kept between calls (version-checked) in inference. Their ``state_dict()`` holds the cores as int8 tensors
plus ``cores.<k>_scale`` fp32 scales of shape ``(r_left, out)``; ``load_state_dict`` turns such entries back into
master cores (any MPO layer reads them, quantized or not). Only the MPO cores are quantized: biases, gating
controllers and every non-MPO layer stay in their dtype (for dense ``nn.Linear`` layers see
:func:`bondgate.quantize_int8`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["QUANT_MODES", "SCALE_SUFFIX", "quantize", "dequantize", "fake_quant", "quantize_mpo", "check_quant"]

#: the quantization modes an MPO layer accepts (besides ``None``: full precision)
QUANT_MODES = ("int8",)
#: suffix of a core's scale in a quantized layer's state dict: ``cores.0`` (int8) and ``cores.0_scale`` (fp32)
SCALE_SUFFIX = "_scale"
QMAX = 127


def _lead(t: torch.Tensor) -> int:
    """How many leading dims index the channels: 2 for a core (one scale per ``(r_left, out)``), 1 for a plain
    table of rows (an :class:`~bondgate.MPOEmbedding`'s kept rows: one scale per row)."""
    return 2 if t.dim() == 4 else 1


def check_quant(mode) -> str | None:
    """``mode`` if it is a valid quantization mode (``None`` or ``"int8"``), else a ``ValueError``."""
    if mode is None or (isinstance(mode, str) and mode in QUANT_MODES):
        return mode
    raise ValueError(f"quantization must be None or one of {list(QUANT_MODES)}, got {mode!r}")


def _check_core(core) -> None:
    if not isinstance(core, torch.Tensor) or core.dim() not in (2, 4) or not core.is_floating_point():
        what = f"{core.dtype} tensor of shape {tuple(core.shape)}" if isinstance(core, torch.Tensor) else type(core).__name__
        raise ValueError(f"expected a floating-point MPO core of shape (r_left, out, in, r_right) or a table of rows, "
                         f"got {what}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _scales(core: torch.Tensor) -> torch.Tensor:
    """fp32 scales ``(r_left, out, 1, 1)`` of a (detached) core (``(rows, 1)`` of a table): ``max|G[a, o]| / 127``
    rounded up to the bits that keep ``q * s`` exact in the core's dtype (17 for float32/64, power-of-two scales for
    16-bit floats)."""
    amax = core.abs().amax(dim=tuple(range(_lead(core), core.dim())), keepdim=True)
    s = (amax.to(_compute_dtype(core.dtype)) / QMAX).float()
    drop = 7 if torch.finfo(core.dtype).eps <= 2.0**-23 else 23  # low significand bits of the fp32 scale to clear
    mask = (1 << drop) - 1
    # a channel too small for a float32 scale (max below ~1.8e-43) keeps the smallest one, not 0: its values round
    # to 0 within s / 2, and a scale of 0 stays the mark of an all-zero channel
    s = torch.where(amax > 0, s.clamp(min=torch.finfo(torch.float32).smallest_normal * 2.0**-23), s)
    # s >= 0: as an int32 its bits grow with its value, so rounding the integer up rounds the float up
    # (a carry out of the significand moves to the next power of two, as it should)
    return ((s.view(torch.int32) + mask) & ~mask).view(torch.float32)


def _levels(core: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``round(core / s)`` on the int8 grid, in the compute dtype. In a 16-bit float the power-of-two scale can
    round a value near the dtype's largest up past it (65504 -> 64 x 1024 = 65536 = inf in float16): such channels
    are clamped to the largest level whose value is finite."""
    ct = _compute_dtype(core.dtype)
    s = s.to(ct)
    q = torch.round(core.to(ct) / torch.where(s > 0, s, 1))
    if torch.finfo(core.dtype).bits == 16:
        top = torch.floor(torch.finfo(core.dtype).max / torch.where(s > 0, s, 1)).clamp_(max=QMAX)
        return torch.minimum(torch.maximum(q, -top), top)
    return q.clamp_(-QMAX, QMAX)


def _qdq(core: torch.Tensor) -> torch.Tensor:
    """``dequantize(*quantize(core))`` without the int8 tensor (no autograd: pass a detached core)."""
    s = _scales(core)
    return _levels(core, s).mul_(s.to(_compute_dtype(core.dtype))).add_(0.0).to(core.dtype)  # + 0.0: -0.0 -> 0.0


_REGRID_WHY = ("(16-bit cores use power-of-two scales): the weights move by up to a few percent. Quantize in the dtype "
               "you deploy")


def warn_on_regrid(what: str, before: torch.dtype, after: torch.dtype) -> None:
    """Warn when int8 cores cast from ``before`` to ``after`` land on another grid: 16-bit floats use power-of-two
    scales, float32/64 17-bit ones, so the cast re-rounds them (a bfloat16 LLaMA layer's weight moved 4.9% up to
    float32, a GPT-2 layer's 1.4% down to float16)."""
    if before != after and (torch.finfo(before).bits == 16) != (torch.finfo(after).bits == 16):
        from ._warn import warn_user

        warn_user(f"casting an int8 {what} from {before} to {after} re-rounds its cores onto the int8 grid of "
                  f"{after} {_REGRID_WHY}")


def quantize(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``q`` int8 of the core's shape, ``scale`` fp32 ``(r_left, out)``; ``core ~ q * scale[:, :, None,
    None]`` with ``|core - q * scale| <= scale / 2`` elementwise (except a 16-bit core's values within a level of the
    dtype's largest, clamped to stay finite). Raises ``ValueError`` on NaN or infinite values, or scales beyond float32."""
    _check_core(core)
    core = core.detach()
    if core.device.type != "meta" and not bool(torch.isfinite(core).all()):
        raise ValueError("cannot quantize a core holding NaN or infinite values")
    q, s = _quantize(core)
    if core.device.type != "meta" and not bool(torch.isfinite(s).all()):
        raise ValueError(f"cannot quantize a core whose values reach {float(core.abs().max()):.3g}: its scales "
                         "overflow float32 (max|value| / 127 must stay below ~3.4e38)")
    return q, s


def _quantize(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = _scales(core)
    return _levels(core, s).to(torch.int8), s.reshape(s.shape[:_lead(core)])


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The core ``q * scale[:, :, None, None]`` (a table: ``q * scale[:, None]``) in ``dtype`` (exact: see the module
    docstring)."""
    ct = _compute_dtype(dtype)
    return (q.to(ct) * scale.to(ct).reshape(*scale.shape, *[1] * (q.dim() - scale.dim()))).to(dtype)


def fake_quant(core: torch.Tensor) -> torch.Tensor:
    """``dequantize(*quantize(core))`` with a straight-through gradient: the backward pass hands the incoming
    gradient to ``core`` unchanged (quantization-aware training of the fp32 master cores). Plain tensor ops,
    traceable by torch.compile and torch.export; no finiteness check (NaN cores give NaN, as unquantized)."""
    dq = _qdq(core.detach())
    if core.requires_grad and torch.is_grad_enabled():
        return dq + (core - core.detach())  # value: dq exactly (x - x = 0); gradient: the identity
    return dq


def fake_quant_cores(cores: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(map(fake_quant, cores))


# ---------------------------------------------------------------------------------------- state dicts
# The int8 tensors handed out per master core, weakly: two layers sharing a core (a tied MPO head) hand out the
# same tensor within one state_dict() call, which checkpoints then store once; nothing outlives the caller's dict.
_HANDED_OUT = WeakIdKeyDictionary()


def _version(t: torch.Tensor) -> int:
    if isinstance(t, nn.Parameter) and type(t) is nn.Parameter:  # writes through .data bypass its counter
        return -1
    try:
        return t._version
    except RuntimeError:  # inference tensor
        return -1


def int8_state(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize(core)`` for a state dict, the same tensors for the same unmodified core while they are alive."""
    version = _version(core)
    hit = _HANDED_OUT.get(core)
    if hit is not None and version >= 0 and hit[0] == version:
        q, s = hit[1](), hit[2]()
        if q is not None and s is not None and (q._version, s._version) == hit[3]:  # nobody wrote into them
            return q, s
    q, s = quantize(core)
    if version >= 0 and not q.is_inference():  # (made under torch.inference_mode: no version counter to check)
        _HANDED_OUT[core] = (version, weakref.ref(q), weakref.ref(s), (q._version, s._version))
    return q, s


def forget_int8(tensors: Iterable[torch.Tensor]) -> None:
    """Hand out freshly quantized tensors for these at the next state dict: after a write that no version counter
    saw (through a numpy view or DLPack; a layer's ``refresh()``). ``None`` entries are skipped."""
    for t in tensors:
        if t is not None:
            _HANDED_OUT.pop(t, None)


def _quantized_params(module: nn.Module) -> dict[str, tuple[torch.Tensor | None, int]]:
    """The tensors of an MPO layer that are stored as int8, by state-dict key: ``{key: (tensor, ndim)}`` — its cores
    (4-D) and, in an :class:`~bondgate.MPOEmbedding`, its kept rows (2-D)."""
    out = {f"cores.{n}": (c, 4) for n, c in module._modules["cores"]._parameters.items()}
    if module._parameters.get("kept_rows") is not None:
        out["kept_rows"] = (module._parameters["kept_rows"], 2)
    return out


_MASTER_STATE = [0]  # depth of master_state() contexts


@contextlib.contextmanager
def master_state() -> Iterator[None]:
    """Inside, quantized layers' state dicts hold their full-precision master cores instead of int8 cores + scales:
    for training checkpoints, which a resumed run must continue from exactly (int8 cores restore the masters only to
    the int8 grid: updates below half a level are lost at every resume). ``load_state_dict`` takes either form;
    :class:`bondgate.DistillationTrainer` writes its checkpoints this way (its final ``save_model`` stays int8)."""
    _MASTER_STATE[0] += 1
    try:
        yield
    finally:
        _MASTER_STATE[0] -= 1


def state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook of a quantized MPO layer: its cores as int8 plus ``<key>_scale`` fp32 scales (the
    masters themselves inside :func:`master_state`)."""
    if getattr(module, "_quant", None) is None or _MASTER_STATE[0]:
        return
    for name, (core, _) in _quantized_params(module).items():
        key = prefix + name
        if key in state_dict and core is not None:
            try:
                state_dict[key], state_dict[key + SCALE_SUFFIX] = int8_state(core)
            except ValueError as exc:  # NaN / inf (a diverged step): say which entry
                raise ValueError(f"state_dict entry {key!r}: {exc}") from None


def register_state_dict_hook(module: nn.Module) -> None:
    """Register :func:`state_dict_hook` on ``module`` once (it does nothing while the layer is not quantized)."""
    if not any(h is state_dict_hook for h in module._state_dict_hooks.values()):
        module.register_state_dict_post_hook(state_dict_hook)


def load_quantized_cores(module: nn.Module, state_dict: dict, prefix: str, error_msgs: list[str]) -> None:
    """Before an MPO layer loads ``state_dict``: replace int8 cores and their ``_scale`` entries by dequantized
    cores of the layer's dtype (in place; ``load_state_dict`` works on its own copy of the dict). Warns, as a cast
    does (:func:`warn_on_regrid`), when the scales are on the other grid than the layer's dtype and the cores move."""
    regrid = None
    for name, (master, ndim) in _quantized_params(module).items():
        key = prefix + name
        skey = key + SCALE_SUFFIX
        q = state_dict.get(key)
        if skey not in state_dict:
            if isinstance(q, torch.Tensor) and q.dtype == torch.int8:
                error_msgs.append(f"{key!r} is an int8 core without its scales {skey!r}")
                del state_dict[key]
            continue
        scale = state_dict.pop(skey)
        if not isinstance(q, torch.Tensor):
            error_msgs.append(f"{skey!r} holds scales for a missing core {key!r}")
            continue
        dtype = master.dtype if master is not None else torch.float32
        problem = None
        if q.dtype != torch.int8 or q.dim() != ndim:
            problem = f"{key!r} must be a {ndim}-D int8 tensor next to its scales, got {q.dtype} {tuple(q.shape)}"
        elif not isinstance(scale, torch.Tensor) or not scale.is_floating_point() \
                or tuple(scale.shape) != tuple(q.shape[:_lead(q)]):
            what = f"{scale.dtype} {tuple(scale.shape)}" if isinstance(scale, torch.Tensor) else type(scale).__name__
            problem = f"{skey!r} must be floating-point scales of shape {tuple(q.shape[:_lead(q)])}, got {what}"
        else:
            problem = scale_problem(skey, q, scale, dtype)
        if problem is not None:
            error_msgs.append(problem)
            del state_dict[key]
            continue
        state_dict[key] = dequantize(q, scale, dtype)
        if scale.device.type != "meta" and q.numel():
            # 16-bit grids have power-of-two scales (the low 23 bits of a float32 clear); float32/64's keep 17 bits
            pow2 = bool(((scale.float().view(torch.int32) & ((1 << 23) - 1)) == 0).all())
            if pow2 != (torch.finfo(dtype).bits == 16) and not torch.equal(_qdq(state_dict[key]), state_dict[key]):
                regrid = ("a 16-bit float" if pow2 else "float32/float64", dtype)
    if regrid is not None:
        from ._warn import warn_user

        warn_user(f"loading int8 cores quantized in {regrid[0]} into a {regrid[1]} {type(module).__name__} re-rounds "
                  f"them onto the int8 grid of {regrid[1]} {_REGRID_WHY}")


def scale_problem(skey: str, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> str | None:
    """What is wrong with the values of int8 core ``q`` and its scales (stored as ``skey``) for a layer of ``dtype``:
    a negative, NaN or infinite scale, or one so large that a core value is not finite in ``dtype``; else None."""
    if scale.device.type == "meta":
        return None
    if not bool((torch.isfinite(scale) & (scale >= 0)).all()):
        return f"{skey!r} holds negative, NaN or infinite scales"
    if not bool(torch.isfinite(dequantize(q, scale, dtype)).all()):
        return f"{skey!r} holds scales so large that the core's values overflow {str(dtype).removeprefix('torch.')}"
    return None


# ---------------------------------------------------------------------------------------- models
def quantize_mpo(model: nn.Module, mode: str | None = "int8") -> nn.Module:
    """Quantize every MPO layer of ``model`` in place (``MPOLinear`` and its gated subclass, ``MPOEmbedding``;
    ``mode=None`` goes back to full precision); returns ``model``. Biases, controllers and non-MPO layers are
    not quantized (dense ``nn.Linear`` layers: :func:`bondgate.quantize_int8`). The master cores stay in full
    precision until saved: a checkpoint holds them as int8.

    With ``mode="int8"``, each low-rank pair (:class:`~bondgate.LowRankLinear`, e.g. from ``compress``'s default) is
    replaced, at every name it has, by the same pair as a two-core ``MPOLinear`` (:meth:`~bondgate.LowRankLinear.
    to_mpo_linear`; its hooks and training mode carried), quantized with one scale per row of each factor, as
    ``compress(..., quantize="int8")`` stores its pairs: new modules with new parameters, so build an optimizer after
    this call. Unlike ``compress``'s, their bias is not re-fitted to the rounding. ``mode=None`` leaves such layers
    MPO layers (the same map, in full precision). A model that is itself a pair is returned as the new layer."""
    from .embedding import MPOEmbedding
    from .layer import MPOLinear

    check_quant(mode)
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_mpo expects an nn.Module, got {type(model).__name__}")
    if mode is not None:
        model = _pairs_as_mpo(model)
    layers = [m for m in model.modules() if isinstance(m, (MPOLinear, MPOEmbedding))]
    for m in layers:
        m.quantize_(mode)
    from ._warn import warn_user

    if mode is not None and not layers:
        warn_user("quantize_mpo: the model has no MPO layer (run bondgate.compress first): nothing was quantized; "
                  "for dense layers see bondgate.quantize_int8 and bondgate.deploy_int8")
    from .hf import rebind, warn_int8_saving

    rebind(model)  # config.json's record holds each layer's quant (bound again if a pickle round trip unbound it)
    if mode is not None:
        warn_int8_saving(model)
    return model


def _pairs_as_mpo(model: nn.Module) -> nn.Module:
    """``model`` with each :class:`~bondgate.LowRankLinear` not inside another bondgate layer (a
    :class:`~bondgate.Recurrent`'s projections are replaced too) replaced, at every name
    it has, by :meth:`~bondgate.LowRankLinear.to_mpo_linear` (speed policy; hooks and training mode carried); the
    (possibly new) root."""
    from .deploy import _inside, _owners
    from .layer import MPOLinear, carry_hooks
    from .lowrank import LowRankLinear
    from .surgery import module_names, swap_module

    if isinstance(model, LowRankLinear):  # the model is a pair: it has no name to be swapped under
        new = model.to_mpo_linear().train(model.training)
        carry_hooks(model, new)
        return new
    from .recurrent import Recurrent

    # a Recurrent's pairs are its projections, which an MPO layer may be (as compress(quantize="int8") makes them)
    owners = _owners(model, (MPOLinear, LowRankLinear))
    names, swapped = None, False
    for name, m in list(model.named_modules()):
        if isinstance(m, LowRankLinear) and not _inside(name, owners):
            names = names or module_names(model)
            swap_module(model, m, names, m.to_mpo_linear())
            swapped = True
    if swapped:
        for m in model.modules():
            if isinstance(m, Recurrent):  # its kept dense weights were made from the pairs
                m.refresh()
    return model
