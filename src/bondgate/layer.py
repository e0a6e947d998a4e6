"""``MPOLinear``: a drop-in ``nn.Linear`` whose weight is a matrix-product operator.

The weight is never rebuilt on the forward pass unless the planner measured that rebuilding is the
fastest admissible plan (see :mod:`bondgate.planner`). In speed mode the reconstructed weight (or
merged cores) may be cached for inference; the cache is keyed on the cores' version counters, so any
in-place update (optimizer step, ``load_state_dict``) invalidates it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator
import sys
import weakref
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.autograd.graph import increment_version
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import _disable_current_modes

from ._checks import positive_int
from .factors import factorize_shape
from .mpo import MPO, BondSpec
from .planner import (
    MAX_CORES,
    MEMORY,
    SPEED,
    ContractionPlan,
    PlanPolicy,
    get_plan,
    run_sweep,
    sweep_flops,
    sweep_matrix,
    sweep_steps,
)
from .quant import (
    check_quant,
    fake_quant_cores,
    forget_int8,
    load_quantized_cores,
    register_state_dict_hook,
    warn_on_regrid,
)

__all__ = ["MPOLinear", "TrackedParameter", "WeightStandIn", "carry_hooks"]

_VERSION = operator.attrgetter("_version")
# torch functions the short path in MPOLinear.forward calls, bound once: each torch.<name> lookup is a cache miss in a
# cold call (dynamo knows these by identity, so compiled code sees them as before). Not F.linear: it is looked up per
# call in both paths, as nn.Linear does, so that a library patching it (DeepSpeed's zero.Init, a mock) is seen
_IS_COMPILING, _GRAD_ON, _AUTOCAST_ON, _TENSOR = (torch.compiler.is_compiling, torch.is_grad_enabled,
                                                  torch.is_autocast_enabled, torch.Tensor)
_DATA = torch._C.TensorBase.data  # the C descriptor behind Tensor.data


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


# nn.Linear subclasses whose own forward computes the same map, ``x @ W.T + b`` (checked against their source)
_SAME_MAP_AS_LINEAR = {"transformers.models.falcon.modeling_falcon.FalconLinear"}


def overrides_forward(mod: nn.Module) -> bool:
    """Whether ``mod``'s class replaces the ``forward`` of the dense layer it derives from (a LoRA-style wrapper,
    a quantized linear ...): swapping it for an MPO layer would drop whatever that forward adds."""
    if f"{type(mod).__module__}.{type(mod).__qualname__}" in _SAME_MAP_AS_LINEAR:
        return False
    base = nn.Linear if isinstance(mod, nn.Linear) else nn.Embedding if isinstance(mod, nn.Embedding) else \
        sys.modules["transformers.pytorch_utils"].Conv1D
    return type(mod).forward is not base.forward


def check_spec_sizes(spec: dict, ints: tuple[str, ...], lists: tuple[str, ...] = ()) -> None:
    """A layer spec's sizes are positive ints (not bools, floats or strings, which ``int()`` would quietly turn into
    another layer: an edited ``"in_features": true`` loaded as a 1-wide layer)."""
    def ok(v):
        return type(v) is int and v >= 1

    bad = {k: spec[k] for k in ints if not ok(spec[k])}
    bad |= {k: spec[k] for k in lists if not (isinstance(spec[k], (list, tuple)) and all(ok(x) for x in spec[k]))}
    if bad:
        raise ValueError(f"layer spec sizes must be positive integers, got {bad}")


def spec_dtype(spec: dict) -> torch.dtype:
    """The floating-point dtype a layer spec names (``"dtype"``, default float32)."""
    name = spec.get("dtype", "float32")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in layer spec")
    if not dtype.is_floating_point:
        raise ValueError(f"the layer spec's dtype must be a floating-point one (float32, bfloat16, ...), got {name!r}")
    return dtype


def trains(module: nn.Module) -> tuple[bool, bool | None]:
    """``(weight, bias)``: whether ``module``'s weight trains (a module without one: any of its parameters; ``True``
    with none) and its bias (``None`` without one), what :func:`freeze_like` gives the layer that replaces it."""
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor):
        weight = w.requires_grad
    else:
        params = list(module.parameters())
        weight = any(p.requires_grad for p in params) if params else True
    b = getattr(module, "bias", None)
    return weight, (b.requires_grad if isinstance(b, torch.Tensor) else None)


def freeze_like(flags: tuple[bool, bool | None], new: nn.Module) -> None:
    """Freeze ``new``, which replaces a module, where that module was (:func:`trains`): its other parameters with the
    weight, its bias with the bias (a frozen layer stays frozen; a BitFit bias keeps training). Freezes only: a
    layer's own frozen parts (a fitted controller) stay frozen."""
    weight, bias = flags
    b = getattr(new, "bias", None)
    if not weight:
        for p in new.parameters():
            if p is not b:
                p.requires_grad_(False)
    if (bias is False or (bias is None and not weight)) and isinstance(b, torch.Tensor):
        b.requires_grad_(False)


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new``, which replaces ``old`` in a model, ``old``'s forward and backward hooks: the same dicts, so the
    handles ``register_*_hook`` returned still remove them. (A hook that reads ``old.weight`` meets a
    :class:`WeightStandIn`, which refuses arithmetic.)"""
    if old is new:
        return
    for name in _HOOK_DICTS:
        object.__setattr__(new, name, getattr(old, name))
    object.__setattr__(new, "_is_full_backward_hook", old._is_full_backward_hook)


def reparametrizing_hook(module: nn.Module) -> object | None:
    """The hook of a torch reparametrization in the old, hook style on ``module`` (``weight_norm``, ``spectral_norm``,
    ``prune`` before ``prune.remove``), if any: its weight is then rebuilt from other tensors (``weight_g`` /
    ``weight_v``, ``weight_orig`` x ``weight_mask``) before every call."""
    return next((h for h in module._forward_pre_hooks.values()
                 if isinstance(h, (WeightNorm, SpectralNorm, BasePruningMethod))), None)


def nested_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer`` on a nested tensor, as ``nn.Linear`` takes one: a jagged one's packed rows in one call, a strided
    one's sequences one by one."""
    if x.layout == torch.jagged:
        return torch.nested.nested_tensor_from_jagged(layer(x.values()), x.offsets())
    return torch.nested.as_nested_tensor([layer(t) for t in x.unbind()])


class WeightStandIn(torch.Tensor):
    """What ``MPOLinear.weight`` and ``LowRankLinear.weight`` return: a factored layer has no dense weight, but
    code written for ``nn.Linear`` reads its weight's dtype, shape or device (transformers' T5 feed-forward casts
    its input to ``wo.weight.dtype``). Those it reports; anything computed with it raises (a meta tensor would
    not: torch multiplies a CPU input by one and returns uninitialized memory). ``weight_matrix()`` builds the
    dense weight."""

    _READS = frozenset({torch.Tensor.dtype.__get__, torch.Tensor.shape.__get__, torch.Tensor.ndim.__get__,
                        torch.Tensor.layout.__get__, torch.Tensor.requires_grad.__get__, torch.Tensor.is_meta.__get__,
                        torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.is_floating_point,
                        torch.Tensor.__len__, torch.Tensor.element_size, torch.Tensor.is_complex})

    @staticmethod
    def of(owner: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
           requires_grad: bool = False) -> WeightStandIn:
        """``requires_grad``: whether the layer's factors train (code that lists trainable layers reads it)."""
        tracing = _IS_COMPILING()
        if tracing and not torch.compiler.is_dynamo_compiling():
            # non-strict export runs the forward under fake-tensor modes, where empty() gives a FakeTensor (which
            # cannot become a stand-in) and a graph node: the stand-in holds no values, so it is made outside them
            with _disable_current_modes():
                t = torch.empty(shape, dtype=dtype, device="meta")
        else:
            # (not under a tracer: dynamo wraps a grad-requiring tensor with reads the stand-in refuses)
            t = torch.empty(shape, dtype=dtype, device="meta", requires_grad=requires_grad and not tracing)
        t = t.as_subclass(WeightStandIn)
        t._owner, t._device = owner, device
        t._is_hf_initialized = True  # transformers' weight-init functions skip it (the layer holds its own values)
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func == torch.Tensor.device.__get__:  # (a method-wrapper: a new object per access)
            return args[0]._device
        if func == torch.Tensor.is_cuda.__get__:  # a meta tensor's own answer would be False
            return args[0]._device.type == "cuda"
        if func in cls._READS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        owner = next((a._owner for a in (*args, *(kwargs or {}).values()) if isinstance(a, WeightStandIn)),
                     "this layer")
        name = getattr(func, "__name__", func)
        if name == "__get__":  # an attribute read (.T, .data, .grad): name the attribute, not its getter
            name = f".{getattr(getattr(func, '__self__', None), '__name__', '?')} was read"
        else:
            name = f"{name} was called on it"
        raise RuntimeError(f"{owner} has no dense weight: its .weight only reports the weight's shape, dtype and "
                           f"device ({name}); weight_matrix() builds the dense weight (a differentiable rebuild "
                           f"from the factors)")

    def __repr__(self, **kwargs) -> str:
        return f"WeightStandIn(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class TrackedParameter(nn.Parameter):
    """An ``nn.Parameter`` whose writes through ``.data`` are seen by the operands a layer keeps between calls.

    The kept operands (the cores in the sweep's layout, speed mode's dense weight, gating's sliced cores) are
    rebuilt when a version counter moves, and every in-place write bumps one — except a write through a plain
    parameter's ``.data``, which is an alias with a counter of its own (``p.data.mul_(2)`` would leave a stale
    dense weight behind). Here ``.data`` is ``p.detach()``, which shares the counter, and ``p.data = t`` bumps it.
    Writes that bypass torch altogether (a numpy view of the storage, DLPack) cannot be seen: call
    :meth:`MPOLinear.refresh` after those. The one difference from a plain parameter: an in-place write through
    ``.data`` between a forward and its backward is caught by autograd ("modified by an inplace operation"), as
    any in-place write to a saved tensor is; clip or edit weights after ``backward()`` or before the forward.
    """

    @property
    def data(self) -> torch.Tensor:
        if torch.compiler.is_compiling():  # tracers read .data to lift parameters: give them the plain alias
            return _DATA.__get__(self)
        return self.detach()

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        # bumped before the swap: after it the parameter may be an inference tensor (``value`` made under
        # torch.inference_mode), which cannot bump; stamp() then never reuses what is built from it
        if not self.is_inference():
            increment_version(self)
        _DATA.__set__(self, value)

    def __reduce_ex__(self, proto):
        # nn.Parameter pickles (torch.save of a whole model, multiprocessing) as a plain parameter, whose stamp
        # (-1) would make every kept operand a per-call rebuild after loading (a gated decode step: 8x slower)
        return _rebuild_tracked, (self.detach(), self.requires_grad)


def _rebuild_tracked(data: torch.Tensor, requires_grad: bool) -> TrackedParameter:
    return TrackedParameter(data, requires_grad)


def _bump_after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any optimizer step: move the version counters of the TrackedParameters it updates. Fused optimizers
    (``torch.optim.AdamW(fused=True)``, transformers.Trainer's default ``adamw_torch_fused``) write parameters without
    moving them, which left the operands layers keep between inference calls on the old weights (an eval after a
    step measured a model 0.35 away from its parameters); one bump per step costs a loop over the parameters."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(p, TrackedParameter) and not p.is_inference():
                increment_version(p)


register_optimizer_step_post_hook(_bump_after_step)


# torch.load's default weights_only unpickler loads only allow-listed globals: a pickled TrackedParameter
# (``torch.save(layer.state_dict(keep_vars=True))``, ``torch.save(layer.cores[0])``) loads as nn.Parameter's does
torch.serialization.add_safe_globals([_rebuild_tracked, TrackedParameter])


def track_parameters(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Parameter`` of ``module`` (recursively) a :class:`TrackedParameter` sharing its data
    and version counter (what torch builds anew, e.g. ``load_state_dict(assign=True)``, is a plain one)."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if type(p) is nn.Parameter:
                m._parameters[name] = TrackedParameter(p.detach(), p.requires_grad)
    return module


def core_versions(cores: Sequence[torch.Tensor]) -> int:
    """Sum of the cores' version counters (every in-place write bumps one; they only grow), or -1 when
    the cores have none (inference tensors, made under ``torch.inference_mode``)."""
    try:
        return sum(map(_VERSION, cores))
    except RuntimeError:
        return -1


def outside_inference_mode(fn: Callable) -> Callable:
    """Decorator: ``fn``, called inside ``torch.inference_mode``, runs outside it under ``torch.no_grad`` (the
    grad mode inference mode implies), so that the tensors it makes are normal ones — with version counters
    for the layers' kept operands, trainable as parameters, and differentiable where ``fn`` enables grad."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def is_fresh(hit, cores: Sequence[torch.Tensor], versions: int) -> bool:
    """Whether a cache entry ``(versions, operands, cores)`` was built from these very tensors, unmodified
    since. An entry built from tensors whose writes cannot all be seen (:func:`stamp`) is never fresh."""
    return (hit is not None and versions >= 0 and hit[0] == versions and len(cores) == len(hit[2])
            and all(map(operator.is_, cores, hit[2])))


def stamp(tensors: Sequence[torch.Tensor]) -> int:
    """The versions to store with operands built from ``tensors`` now: their :func:`core_versions`, or -1 (never
    reused) when a write could go unseen — inference tensors have no counter, and a plain ``nn.Parameter``'s
    ``.data`` writes bypass it (a :class:`TrackedParameter`'s do not; plain tensors such as buffers count)."""
    if any((isinstance(t, nn.Parameter) and not isinstance(t, TrackedParameter)) or t.is_inference() for t in tensors):
        return -1
    return core_versions(tensors)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` disabled for ``device_type`` (nothing to disable where autocast does not exist: meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def kept(cache: dict, key, tensors: Sequence[torch.Tensor], build: Callable[[], object]):
    """``build()``, kept in ``cache[key]`` as an entry ``(versions, value, tensors)`` while ``tensors`` are these
    very tensors, unmodified since (:func:`is_fresh`); rebuilt on every call when their writes cannot all be seen."""
    hit = cache.get(key)
    if not is_fresh(hit, tensors, core_versions(tensors)):
        with torch.inference_mode(False), torch.no_grad():  # normal tensors: an input needing a gradient may meet them
            value = build()
        hit = cache[key] = (stamp(tensors), value, tuple(tensors))
    return hit[1]


def storage_nbytes(tensors: Iterable[torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage counted once), leaving out the
    storages of ``exclude`` (a kept operand that is a parameter's own memory costs nothing)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(n for ptr, n in sizes.items() if ptr not in skip)


_LIVE_LAYERS: weakref.WeakSet = weakref.WeakSet()  # every MPOLinear, for clear_plan_cache


def forget_layer_plans() -> None:
    """Drop every live layer's plans and kept operands (:func:`bondgate.clear_plan_cache`)."""
    for layer in list(_LIVE_LAYERS):
        layer._reset_caches()


def without_kept(state: dict, names: Sequence[str]) -> dict:
    """A module's ``__getstate__`` with the caches ``names`` emptied (for copies and pickles: what is kept between
    calls belongs to this process's parameter objects and their version counters)."""
    return {k: ({} if k in names else v) for k, v in state.items()}


def replica_without_kept(replica: nn.Module, names: Sequence[str]) -> nn.Module:
    """An ``nn.DataParallel`` replica (``_replicate_for_data_parallel``, which copies the module's ``__dict__``
    shallowly) with caches ``names`` of its own: replicas are made for every call, each holds copies of the
    parameters on its device and runs in a thread of its own, so the operands and plan slots the module keeps
    are not theirs to read or write."""
    for name in names:
        if name in replica.__dict__:
            replica.__dict__[name] = {}
    return replica


def own_param(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module``'s parameter ``name`` read from its dict (``nn.Module.__getattr__`` costs ~0.4 us per read); else
    the attribute: in an ``nn.DataParallel`` replica, whose parameters are plain attributes (its dict keeps only the
    ``None`` ones), or a parametrized one (``torch.nn.utils.parametrize``)."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


class _Names(dict):
    def __missing__(self, n: int) -> tuple[str, ...]:
        names = self[n] = tuple(map(str, range(n)))
        return names


CORE_NAMES = _Names()  # n -> ("0", ..., "n-1"), the names of n cores in a ParameterList


def plain_cores(cores: nn.ParameterList) -> bool:
    """Whether the list's own dict holds the cores as they are: named ``"0"`` to ``"n-1"`` in order, nothing
    attached by torch's prune / parametrize (one tuple comparison)."""
    params = cores._parameters
    return bool(params) and not cores._modules and tuple(params) == CORE_NAMES[len(params)]


def core_dict(owner: nn.Module, cores: nn.ParameterList) -> dict[str, torch.Tensor]:
    """The cores of ``owner`` (an MPO layer or table) by name, ``"0"`` to ``"n-1"`` in order: the ParameterList's
    own dict when it holds exactly those (one tuple comparison per call). Cores pruned or parametrized through
    torch (``torch.nn.utils.prune`` / ``parametrize``) are refused: the list is never called as a module, so the
    hooks that apply a mask or a parametrization never run and the layer would compute with stale values."""
    params = cores._parameters
    if plain_cores(cores):
        return params
    names = CORE_NAMES[len(cores)]
    n = len(names)
    if ("parametrizations" in cores._modules or any(k.endswith("_orig") for k in params)
            or any(k.endswith("_mask") for k in cores._buffers)):
        raise RuntimeError(
            f"{type(owner).__name__}'s cores are pruned or parametrized (torch.nn.utils.prune / parametrize), which "
            f"it does not support: it computes with the core parameters directly, so a mask or a parametrization "
            f"would be ignored. Prune or parametrize the dense model before bondgate.compress (or undo it with "
            f"prune.remove / parametrize.remove_parametrizations; an MPO's cores pruned entry by entry save no time)")
    if not params:  # an nn.DataParallel replica: the cores are plain attributes
        return {k: cores.__dict__[k] for k in names}
    if set(params) != set(names):
        raise RuntimeError(f"{type(owner).__name__}'s cores list holds parameters named {sorted(params)}, "
                           f"expected '0' to '{n - 1}'")
    for k in names:  # the right names out of order (prune.remove re-registers the parameter last): put in order
        params[k] = params.pop(k)
    return params


SIZES_KEY = "bondgate_sizes"  # in a state dict's metadata


def record_sizes(destination, prefix: str, sizes: Sequence[int]) -> None:
    """Note a layer's true sizes in the metadata ``state_dict()`` keeps beside the tensors: the cores hold only the
    padded factors, so a layer of another size with the same padding (62 and 64 inputs) would load them in silence.
    (Metadata travels with ``torch.save`` of the dict, not through safetensors, where :func:`bondgate.load` checks
    the saved specs instead.)"""
    meta = getattr(destination, "_metadata", None)
    if meta is not None:
        meta.setdefault(prefix[:-1], {})[SIZES_KEY] = [int(n) for n in sizes]


def check_sizes(state_dict: dict, local_metadata: dict, prefix: str, sizes: Sequence[int], names: Sequence[str],
                error_msgs: list[str]) -> None:
    """Refuse a state dict recorded (:func:`record_sizes`) from a layer of other ``sizes``: the rows and columns of
    the layer's matrix (``out_features, in_features``; a table's ``num_embeddings, embedding_dim``, so that a table
    and its tied head compare alike). Only where the dict holds tensors of this layer (keys deleted from a loaded
    dict keep its metadata: a head dropped to train a new one of another size is missing, not mismatched)."""
    got = local_metadata.get(SIZES_KEY) if isinstance(local_metadata, dict) else None
    if got is None or list(got) == [int(n) for n in sizes] or not any(k.startswith(prefix) for k in state_dict):
        return
    error_msgs.append(f"size mismatch for {prefix[:-1] or 'the layer'}: the checkpoint's layer is {got[0]} x {got[1]} "
                      f"({names[0]} x {names[1]}), this one {sizes[0]} x {sizes[1]}")


def no_torchscript(layer: nn.Module) -> Exception:
    """The error for TorchScript (``torch.jit.script`` / ``trace``), which bondgate's layers do not support."""
    return RuntimeError(f"{type(layer).__name__} does not support TorchScript (torch.jit.script / torch.jit.trace): "
                        f"use torch.compile, torch.export, or torch.onnx.export(..., dynamo=True), which trace it")


def _refuse_script(self: nn.Module) -> nn.Module:
    raise no_torchscript(self)


def bad_input(layer: nn.Module, x) -> Exception:
    """The error for an input that is not a ``(*, in_features)`` tensor (a list, a numpy array, a 0-d tensor)."""
    name, want = type(layer).__name__, f"a torch.Tensor of shape (*, {layer.in_features})"
    if isinstance(x, torch.Tensor) and x.is_nested:  # (a gated layer given levels per row: rows of what?)
        return TypeError(f"{name} takes a nested tensor only as a whole (no explicit levels)")
    if isinstance(x, torch.Tensor):
        return ValueError(f"{name} expected input with last dimension {layer.in_features}, got shape {tuple(x.shape)}")
    if isinstance(x, torch.fx.Proxy):  # (a Proxy has every attribute: checked before __array__)
        return TypeError(f"torch.fx.symbolic_trace cannot trace {name} (its forward chooses a contraction by the "
                         f"input's shape, a gated layer also by its values); use torch.export.export or "
                         f"torch.compile, which trace it")
    hint = " (convert it with torch.from_numpy or torch.as_tensor)" if hasattr(x, "__array__") or isinstance(
        x, (list, tuple)) else ""
    return TypeError(f"{name} expects {want}, got {type(x).__name__}{hint}")


def _retrack(module: nn.Module, incompatible_keys) -> None:
    track_parameters(module)


def _policy(policy: str | dict | PlanPolicy) -> PlanPolicy:
    """A :class:`PlanPolicy` from a policy, its name, or its fields as a dict (how :meth:`MPOLinear.spec` saves a
    non-default one)."""
    if isinstance(policy, PlanPolicy):
        return policy
    if policy == "memory":
        return MEMORY
    if policy == "speed":
        return SPEED
    if isinstance(policy, dict):
        try:
            return PlanPolicy(**policy)
        except TypeError as exc:
            raise ValueError(f"invalid plan policy {policy!r}: {exc}") from None
    raise ValueError(f"policy must be 'memory', 'speed' or a PlanPolicy, got {policy!r}")


def _policy_spec(policy: PlanPolicy) -> str | dict:
    for name, known in (("memory", MEMORY), ("speed", SPEED)):
        if policy == known:
            return name
    return dataclasses.asdict(policy)


def _check_num_cores(d: int) -> None:
    if d > MAX_CORES:
        raise ValueError(f"an MPO layer has at most {MAX_CORES} cores (torch.einsum has 52 index letters), got {d}")


class MPOLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` (shape ``(out_features, in_features)``) stored as MPO cores.

    Accepts inputs of shape ``(*, in_features)`` like ``nn.Linear``. ``cores[k]`` is an
    ``nn.Parameter`` of shape ``(r_{k-1}, out_k, in_k, r_k)``. Inputs must have the cores' dtype, except
    inside ``torch.autocast``, where the contraction runs in the cores' dtype and the output has autocast's.

    A freshly constructed layer is initialized so that ``Var(W_ij)`` equals ``nn.Linear``'s default
    (``1 / (3 in_features)``), see :meth:`bondgate.MPO.random`; the bias follows ``nn.Linear``.

    Args:
        max_bond: bond cap of the random cores: one int for every bond (default 8) or a sequence of
            ``num_cores - 1`` ints/None (None = uncapped); each bond is at most its cut's full rank.
        num_cores: number of cores (default 4, at most 17); ignored when factors are given (their length wins).
        in_factors / out_factors: leg sizes per core, multiplying exactly to ``in_features`` / ``out_features``;
            chosen by :func:`bondgate.factorize_shape` when omitted (which may pad a dimension).
        bias, device, dtype: as ``nn.Linear`` (``dtype`` floating point; default ``torch.get_default_dtype()``).
        policy: ``"memory"`` (never keep a dense weight or merged cores; default) or ``"speed"``
            (inference may keep the reconstructed weight or merged cores when that measured faster), or
            a :class:`bondgate.planner.PlanPolicy`. Either may keep, for inference, a copy of the cores
            in the matrix layout of the planner's sweep (as many elements as the cores; one per sweep
            direction the row buckets' plans use) when that plan is the fastest.

    Quantization: :meth:`quantize_` ``("int8")`` runs the forward on fake-quantized cores (per-channel int8,
    :mod:`bondgate.quant`) with fp32 master cores, and saves the cores as int8 (``quant`` tells the mode).
    """

    __prepare_scriptable__ = _refuse_script  # torch.jit.script: a clear refusal

    _quant: str | None = None  # the class default: layers built before quantization existed are not quantized
    _pin_dims: tuple[int, ...] | None = None  # the bond widths the pinned plans are for (None: any, older pickles)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        max_bond: BondSpec = 8,
        num_cores: int = 4,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        policy: str | PlanPolicy = "memory",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"an MPOLinear's cores are floating point; got dtype={dtype!r}")
        _check_num_cores(len(factorize_shape(out_features, in_features, num_cores, out_factors, in_factors)[0]))
        mpo = MPO.random(out_features, in_features, max_bond, num_cores, in_factors, out_factors, dtype=dtype)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.cores = nn.ParameterList([TrackedParameter(c.to(device).contiguous()) for c in mpo.cores])
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            self.bias = TrackedParameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self._policy = _policy(policy)
        self.error: float = float("nan")  # relative weight error vs. the layer it was built from
        self._reset_caches()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mpo(cls, mpo: MPO, bias: torch.Tensor | None = None, policy: str | PlanPolicy = "memory") -> "MPOLinear":
        """Wrap an :class:`MPO` (contiguous copies of its cores become parameters — a checkpoint's copy then has
        the same memory layout, hence the same floating-point results; ``bias`` shape ``(out_features,)``)."""
        return cls._wrap(mpo, bias, policy)

    @classmethod
    def _wrap(cls, mpo: MPO, bias: torch.Tensor | None, policy: str | PlanPolicy) -> "MPOLinear":
        """:meth:`from_mpo`'s layer, whatever a subclass's ``from_mpo`` adds (a gated layer's default gating)."""
        _check_num_cores(mpo.num_cores)
        if bias is not None and not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a tensor of shape ({mpo.out_features},) or None, "
                            f"got a {type(bias).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = mpo.in_features, mpo.out_features
        layer.cores = nn.ParameterList([TrackedParameter(c.detach().clone(memory_format=torch.contiguous_format)) for c in mpo.cores])
        if bias is not None:
            if bias.shape != (mpo.out_features,):
                raise ValueError(f"bias must have shape ({mpo.out_features},), got {tuple(bias.shape)}")
            layer.bias = TrackedParameter(bias.detach().clone().to(mpo.dtype))
        else:
            layer.register_parameter("bias", None)
        layer._policy = _policy(policy)
        layer.error = mpo.error
        layer._reset_caches()
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        max_bond: BondSpec = None,
        tol: float | None = None,
        num_cores: int = 4,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        policy: str | PlanPolicy = "memory",
    ) -> "MPOLinear":
        """Decompose a trained ``nn.Linear`` or HF ``Conv1D`` by TT-SVD (see :meth:`bondgate.MPO.from_matrix`).

        ``max_bond``: cap on every bond (int) or per bond (sequence of ``d-1`` ints/None). ``tol``: relative
        Frobenius tolerance, ``||W - W_mpo||_F <= tol * ||W||_F``, in ``[0, 1)``; with ``max_bond`` as well the caps
        win and the error may exceed ``tol``. ``num_cores``: number of cores ``d`` (default 4; ignored when factors
        are given). ``in_factors`` / ``out_factors``: leg sizes per core, multiplying exactly to ``in_features`` /
        ``out_features``; chosen by :func:`bondgate.factorize_shape` when omitted (may pad). ``policy``: as in the
        constructor (``"memory"``, ``"speed"`` or a :class:`~bondgate.PlanPolicy`).

        With neither ``max_bond`` nor ``tol`` the decomposition is exact (full-rank bonds) and may hold MORE
        weights than the dense layer: a 768 x 768 layer in 4 cores gets bonds ``(32, 768, 32)``, 1,181,696 weights
        vs 589,824. Pass ``max_bond`` or ``tol`` to compress. (The plain constructor instead draws random cores
        with ``max_bond=8``.)

        The cores get the weight's dtype and device; the bias is copied. ``error`` (float) is the relative Frobenius
        error ``||W - W_mpo||_F / ||W||_F`` of the weight as :meth:`bondgate.MPO.from_matrix` reports it: computed
        in float64 and exact, not a bound (in float32 the cores' own rounding is left out; in float16/bfloat16 it is
        included). A layer built by the constructor has ``error = nan``.
        """
        from .surgery import dense_weight, is_conv1d  # surgery builds MPO layers: import at call time

        if not (isinstance(linear, nn.Linear) or is_conv1d(linear)):
            raise TypeError(f"from_linear expects an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        if overrides_forward(linear):
            raise ValueError(f"from_linear: {type(linear).__qualname__} overrides forward(); an MPO layer would drop "
                             f"what that forward adds")
        W = dense_weight(linear)  # (out, in); a Conv1D stores its transpose
        _check_num_cores(len(factorize_shape(*W.shape, num_cores, out_factors, in_factors)[0]))  # before the TT-SVD
        mpo = MPO.from_matrix(W, num_cores=num_cores, in_factors=in_factors, out_factors=out_factors,
                              max_bond=max_bond, tol=tol)
        layer = cls._wrap(mpo.to(device=W.device), linear.bias, policy)
        return layer

    def spec(self) -> dict:
        """JSON-serializable structure of this layer (everything but the tensors)."""
        return {
            "type": type(self).__name__,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "in_factors": list(self.in_factors),
            "out_factors": list(self.out_factors),
            "bond_dims": list(self.bond_dims),
            "bias": self.bias is not None,
            "policy": _policy_spec(self._policy),
            "dtype": str(self._masters()[0].dtype).removeprefix("torch."),
            "error": None if math.isnan(self.error) else self.error,
            # plans used so far, "<device type>:<dtype>:<row bucket>:<grad>" -> plan id: a loaded copy on the
            # same kind of device runs the same contractions, so its outputs are bit-identical to this layer's
            "plans": {**self._pins(), **{self._pin_key(k >> 1, k & 1): p.id for k, (p, _) in self._plans.items()
                                         if isinstance(k, int)}},  # (not plans kept for other widths)
            **({"quant": self._quant} if self._quant is not None else {}),
        }

    @classmethod
    def from_spec(cls, spec: dict) -> "MPOLinear":
        """An uninitialized layer with the structure of :meth:`spec` (fill it with ``load_state_dict``)."""
        need = {"in_features", "out_features", "in_factors", "out_factors", "bond_dims", "bias"}
        missing = need - set(spec)
        if missing:
            raise ValueError(f"layer spec is missing {sorted(missing)}")
        dtype = spec_dtype(spec)
        check_spec_sizes(spec, ("in_features", "out_features"), ("in_factors", "out_factors", "bond_dims"))
        out_f, in_f = tuple(spec["out_factors"]), tuple(spec["in_factors"])
        r = [1, *spec["bond_dims"], 1]
        if len(r) != len(out_f) + 1 or len(in_f) != len(out_f):
            raise ValueError(f"inconsistent layer spec: factors {out_f} x {in_f} with bonds {spec['bond_dims']}")
        cores = [torch.zeros(r[k], out_f[k], in_f[k], r[k + 1], dtype=dtype) for k in range(len(out_f))]
        mpo = MPO(cores, int(spec["out_features"]), int(spec["in_features"]))
        bias = torch.zeros(int(spec["out_features"]), dtype=dtype) if spec["bias"] else None
        layer = cls._wrap(mpo, bias, spec.get("policy", "memory"))
        layer.error = float("nan") if spec.get("error") is None else float(spec["error"])
        plans = spec.get("plans") or {}
        if not isinstance(plans, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in plans.items()):
            raise ValueError("layer spec 'plans' must map '<device type>:<dtype>:<bucket>:<grad>' to plan ids")
        # checkpoints before plans were keyed by device and dtype were written on the CPU
        layer._pinned = {k if k.count(":") == 3 else f"cpu:{dtype}:{k}".replace("torch.", ""): v
                         for k, v in plans.items()}
        if spec.get("quant") is not None:
            layer.quantize_(spec["quant"])
        return layer

    def _pin_key(self, bucket: int, grad: bool | int) -> str:
        """Key of a pinned plan (``bucket``: :func:`~bondgate.planner.row_bucket`): a plan tuned for one device
        type and dtype is no choice for another."""
        c0 = self._masters()[0]
        return f"{c0.device.type}:{str(c0.dtype).removeprefix('torch.')}:{bucket}:{int(grad)}"

    def _pins(self) -> dict[str, str]:
        """The pinned plans while the cores have the widths they were pinned at (not while a functional_call runs the
        layer with cores of other widths, nor after a core was given other widths through ``.data``)."""
        return self._pinned if self._pin_dims in (None, self.bond_dims) else {}

    def to_mpo(self) -> MPO:
        """The weight as a detached :class:`MPO` (of a quantized layer: its full-precision master cores)."""
        return MPO([c.detach() for c in self.cores], self.out_features, self.in_features,
                   error=self.error, error_exact=False)

    @property
    def weight(self) -> torch.Tensor:
        """The weight's shape ``(out_features, in_features)``, dtype and device, without values (a
        :class:`bondgate.layer.WeightStandIn`: computing with it raises); :meth:`weight_matrix` builds the dense
        weight."""
        c0 = self._masters()[0]
        return WeightStandIn.of(type(self).__name__, (self.out_features, self.in_features), c0.dtype, c0.device,
                                any(c.requires_grad for c in self._masters()))

    def weight_matrix(self) -> torch.Tensor:
        """The dense weight ``(out_features, in_features)`` in the cores' dtype (also inside ``torch.autocast``, as
        ``nn.Linear.weight``), differentiable w.r.t. the cores (of a quantized layer: the weight its forward uses,
        from the fake-quantized cores)."""
        cores = list(self._core_tuple())
        with autocast_off(cores[0].device.type):
            return MPO(cores, self.out_features, self.in_features).to_matrix()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the reconstructed weight (same dtype/device; of a quantized layer, the fake-quantized
        weight, in full precision)."""
        c0 = self.cores[0]
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=c0.device, dtype=c0.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight_matrix())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # ------------------------------------------------------------------ facts
    @property
    def is_rank_form(self) -> bool:
        """Whether the layer is a low-rank pair as two cores, legs ``(out_features, 1) x (1, in_features)``, the bond
        its rank (:meth:`bondgate.LowRankLinear.to_mpo_linear`; ``compress(..., quantize="int8")`` stores its pairs
        so, as int8 cores with one scale per row of each factor)."""
        return self.in_factors == (1, self.in_features) and self.out_factors == (self.out_features, 1)

    @property
    def out_factors(self) -> tuple[int, ...]:
        """Output leg sizes ``(out_1, ..., out_d)``; their product is ``>= out_features`` (padded rows are dropped)."""
        return tuple(int(c.shape[1]) for c in self._masters())

    @property
    def in_factors(self) -> tuple[int, ...]:
        """Input leg sizes ``(in_1, ..., in_d)``; their product is ``>= in_features`` (the input is zero-padded)."""
        return tuple(int(c.shape[2]) for c in self._masters())

    @property
    def bond_dims(self) -> tuple[int, ...]:
        """Inner bond dimensions ``(r_1, ..., r_{d-1})`` of the cores."""
        return tuple(int(c.shape[3]) for c in self._masters()[:-1])

    @property
    def num_params(self) -> int:
        """Weights held by the cores (the bias, ``out_features`` more, is not counted)."""
        return sum(c.numel() for c in self._masters())

    @property
    def policy(self) -> PlanPolicy:
        """The :class:`~bondgate.PlanPolicy` the plans are chosen under; settable with ``"memory"``, ``"speed"`` or a
        ``PlanPolicy`` (setting it drops the plans and kept operands)."""
        return self._policy

    @policy.setter
    def policy(self, value: str | PlanPolicy) -> None:
        self._policy = _policy(value)
        self._pinned = {}
        self._reset_caches()

    def plan(self, batch: int = 1, grad: bool = False) -> ContractionPlan:
        """The plan this layer runs for ``batch`` input rows (plans it if needed).

        ``print(layer.plan(64))`` shows the path, FLOPs and peak intermediate size;
        ``.describe()`` gives a dict and ``.candidates`` what the autotuner timed.
        """
        batch = positive_int(batch, "batch", low=0)
        c0 = self._masters()[0]
        prefer = self._pins().get(self._pin_key(max(batch, 1).bit_length(), grad))
        return get_plan(self.out_factors, self.in_factors, self.bond_dims, batch, c0.dtype, c0.device,
                        self._policy, grad, prefer=prefer)

    @property
    def cache_nbytes(self) -> int:
        """Bytes kept between inference calls besides the parameters: pre-contracted cores or the dense
        weight (speed mode), the cores in the sweep's matrix layout (either mode); a quantized layer whose plan
        contracts the cores directly also keeps their fake-quantized values (one copy of the cores). A gated layer
        adds its levels' pre-contracted operands: in speed mode up to a dense weight per level whose plan is dense,
        in memory mode up to the cores' size in all. Each storage counted once, none that is a parameter's."""
        return storage_nbytes(self._kept_tensors(), exclude=self.parameters())

    def _kept_tensors(self) -> list[torch.Tensor]:
        caches = (*self._ops_cache.values(), *self._quant_cache.values())
        return [t for _, ops, _ in caches if ops for t in ops]

    def flops(self, batch: int = 1) -> int:
        """FLOPs of the plan actually used, for a call of ``batch`` rows (bias add excluded; 0 rows cost 0)."""
        batch = positive_int(batch, "batch (a number of input rows)", low=0)
        if not batch:
            return 0
        plan = self.plan(batch)
        if plan.dense:  # the weight it multiplies is cut to the layer's size (the plan counts the padded one)
            return 2 * batch * self.out_features * self.in_features + plan.merge_flops
        return plan.flops_at(batch)

    # ------------------------------------------------------------------ caches
    def _reset_caches(self) -> None:
        if "_pinned" not in self.__dict__:
            self._pinned: dict[str, str] = {}
            self._pin_dims = self.bond_dims if "cores" in self._modules else None
            # load_state_dict(assign=True) puts plain parameters in, after this module's own hook has run
            self.register_load_state_dict_post_hook(_retrack)
        # (row bucket, grad) packed in an int -> (plan, kept operands); (that int, widths) for other widths than pinned
        self._plans: dict[int | tuple, tuple[ContractionPlan, list | None]] = {}
        _LIVE_LAYERS.add(self)
        self._ops_cache: dict[tuple, list] = {}  # plan.operand_key -> [version sum, operands, cores]
        self._quant_cache: dict = {}  # the fake-quantized cores kept for inference (see _fake_quantized)
        self._hot: dict[int, tuple] = {}  # row bucket -> (slot, device type) of dense-cached or pair inference plans
        self._traced_dims = self.bond_dims if "cores" in self._modules else None
        self._traced = self._traced_sweep(self._traced_dims) if "cores" in self._modules else None

    @property
    def _core_params(self) -> dict[str, torch.Tensor]:
        # The ParameterList's own dict, looked up on every call (never a cached reference or tuple): parameter
        # swaps such as torch.func.functional_call, or torch.export replacing the dict while it traces, are always
        # seen; it is also ~10x faster than iterating the list.
        cores = self._modules["cores"]
        params = cores._parameters
        # plain_cores inlined (the hot path: one function call less per read)
        if params and not cores._modules and tuple(params) == CORE_NAMES[len(params)]:
            return params
        return core_dict(self, cores)

    def _masters(self) -> tuple[torch.Tensor, ...]:
        """The core parameters (of a quantized layer: the full-precision masters); for shapes, dtype and device
        (read through the list, so that a layer whose cores torch pruned still prints; its calls refuse)."""
        cores = self._modules["cores"]
        if plain_cores(cores):
            return tuple(cores._parameters.values())
        return tuple(cores)  # by index: a replica's attributes, torch's pruned values, names out of order

    def _core_tuple(self) -> tuple[torch.Tensor, ...]:
        """The cores the forward computes with: the parameters, or their fake-quantized values when the layer is
        quantized (what gating's sliced cores and kept operands are built from)."""
        cores = tuple(self._core_params.values())
        return cores if self._quant is None else self._fake_quantized(cores)

    def _fake_quantized(self, cores: tuple[torch.Tensor, ...], keep: bool = True) -> tuple[torch.Tensor, ...]:
        """``fake_quant`` of ``cores``: recomputed (straight-through gradient) when autograd needs it or a tracer runs,
        else kept between calls (``keep``) while the master cores are these very tensors, unmodified."""
        if not keep:  # for operands the caller keeps (inference only)
            with torch.no_grad():
                return fake_quant_cores(cores)
        return fake_quantized_cores(self._quant_cache, cores)

    @property
    def quant(self) -> str | None:
        """``None`` (full precision) or ``"int8"`` (see :meth:`quantize_`)."""
        return self._quant

    @quant.setter
    def quant(self, mode: str | None) -> None:
        self.quantize_(mode)

    def quantize_(self, mode: str | None = "int8") -> "MPOLinear":
        """Quantize the cores in place (``"int8"``: symmetric, one scale per ``(r_left, out)`` slice of each core, see
        :mod:`bondgate.quant`) or, with ``None``, go back to full precision; returns the layer.

        The parameters stay full-precision *master* cores; the forward (eager, torch.compile and export) uses
        ``fake_quant(master)``: recomputed per training call with a straight-through gradient to the masters
        (quantization-aware training, e.g. :func:`bondgate.distill`), kept between inference calls.
        ``state_dict()`` holds the cores as int8 plus ``cores.<k>_scale`` fp32 scales ``(r_left, out)``; loading
        such a dict sets the masters to the dequantized values, which quantize to themselves, so a layer saved and
        reloaded into a layer of the same dtype computes bit-identical outputs (a 16-bit layer loading float32 int8
        cores, or the reverse, re-rounds them onto its own grid, with a warning). The bias stays in full precision.
        A tied head shares its cores with an :class:`~bondgate.MPOEmbedding`: quantize both
        (:func:`bondgate.quantize_mpo`).
        """
        mode = check_quant(mode)
        if mode is not None:
            register_state_dict_hook(self)
        self._quant = mode
        self._reset_caches()
        return self

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        # (nn.DataParallel's replicate() sets a replica's cores before their parameters: it kept nothing)
        if name == "cores" and "_plans" in self.__dict__ and not self.__dict__.get("_is_replica"):
            self._reset_caches()

    # what _reset_caches empties: operands, plans and fake-quantized cores kept between calls
    _KEPT: tuple[str, ...] = ("_plans", "_ops_cache", "_quant_cache", "_hot")

    def _replicate_for_data_parallel(self):
        return replica_without_kept(super()._replicate_for_data_parallel(), self._KEPT)

    def __getstate__(self) -> dict:
        # copies and pickles leave the kept operands out: a copy's parameters start new version counters, so the
        # stamps copied along would match again after as many writes (stale outputs); in a pickle they would
        # also outweigh the cores (speed mode keeps the dense weight)
        return without_kept(super().__getstate__(), self._KEPT)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        track_parameters(self)  # one pickled before TrackedParameter pickled as itself holds plain parameters
        self._reset_caches()  # a layer pickled before __getstate__ left the kept operands out holds them

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), .cuda() ...
        before = self._masters()[0].dtype
        out = super()._apply(fn, recurse)
        track_parameters(self)  # torch may have made new, plain parameters
        self._reset_caches()
        if self._quant is not None:
            warn_on_regrid("MPO layer", before, self._masters()[0].dtype)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        record_sizes(destination, prefix, (self.out_features, self.in_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        check_sizes(state_dict, local_metadata, prefix, (self.out_features, self.in_features),
                    ("out_features", "in_features"), error_msgs)
        load_quantized_cores(self, state_dict, prefix, error_msgs)  # int8 cores + scales -> dequantized cores
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._reset_caches()

    def refresh(self) -> None:
        """Drop every operand kept between calls. Only needed after a write that bypasses torch (through a
        numpy view or DLPack): torch's in-place writes, ``.data`` included, are seen (the cores are
        :class:`bondgate.layer.TrackedParameter` s)."""
        self._reset_caches()
        forget_int8(self._core_params.values())

    def set_cores(self, cores: Sequence[torch.Tensor]) -> None:
        """Replace the cores (e.g. after truncation); shapes may change, the dtype may not (the bias and kept
        operands are in the layer's: cast the cores, or the layer first). The new cores are new parameter objects:
        rebuild an optimizer that holds the old ones. Each keeps the ``requires_grad`` of the old core at its
        position (with another number of cores: ``True`` if every old core had it), so a frozen layer stays frozen."""
        old = [c.requires_grad for c in self._core_params.values()]
        now = next(iter(self._core_params.values())).dtype
        dtypes = {c.dtype for c in cores if isinstance(c, torch.Tensor)}
        if dtypes - {now}:
            raise TypeError(f"set_cores: cores of dtype {', '.join(sorted(map(str, dtypes)))} for a layer of dtype "
                            f"{now}: cast them (or the layer, with .to(dtype), first)")
        mpo = MPO([c.detach() for c in cores], self.out_features, self.in_features)
        grads = old if len(old) == mpo.num_cores else [all(old)] * mpo.num_cores
        self.cores = nn.ParameterList([TrackedParameter(c.clone(memory_format=torch.contiguous_format), requires_grad=g)
                                       for c, g in zip(mpo.cores, grads)])
        self._pinned, self._pin_dims = {}, self.bond_dims
        self._reset_caches()

    # ------------------------------------------------------------------ traced forward (torch.compile / export)
    def _traced_sweep(self, ranks: Sequence[int]) -> tuple[bool, list]:
        """The contraction a traced forward runs at bonds ``ranks``: the sweep in its cheaper direction (its cost is
        linear in the rows, so one choice serves every row count), as ``(reverse, steps)``."""
        out_f, in_f = self.out_factors, self.in_factors
        reverse = sweep_flops(out_f, in_f, ranks, True) < sweep_flops(out_f, in_f, ranks, False)
        return reverse, sweep_steps(out_f, in_f, ranks, reverse)

    def _traced_for(self, cores: Sequence[torch.Tensor]) -> tuple[bool, list]:
        """The traced sweep for these cores: the one kept at the layer's bonds, or one made for other bonds (cores of
        other widths passed by ``torch.func.functional_call``, or reshaped through ``.data`` since the last eager
        call, which is what resets the kept one)."""
        ranks = tuple(int(c.shape[3]) for c in cores[:-1])
        return self._traced if ranks == self._traced_dims else self._traced_sweep(ranks)

    def _traced_forward(self, x: torch.Tensor, cores: Sequence[torch.Tensor], traced: tuple[bool, list]) -> torch.Tensor:
        """``forward`` while torch.compile or torch.export traces it: no planning, autotuning or kept operands
        (they are Python-side state a graph cannot hold), only tensor ops on static factors with a dynamic number
        of rows — the sweep, with the cores laid out as matrices inside the graph (the compiler fuses that).
        Inside ``torch.autocast`` it computes in the cores' dtype and returns autocast's, as the eager forward."""
        device = x.device.type
        if torch.is_autocast_enabled(device) and x.is_floating_point() and x.dtype != torch.float64:
            # autocast would run the sweep's products in bf16 and a float32 bias would then make the output float32
            with torch.autocast(device, enabled=False):
                y = self._traced_forward(x.to(cores[0].dtype), cores, traced)
            return y.to(torch.get_autocast_dtype(device))
        reverse, steps = traced
        if self._quant is not None:
            cores = self._traced_quant(cores)
        x2d = x.reshape(-1, self.in_features)
        pad = math.prod(self.in_factors) - self.in_features
        if pad:
            x2d = torch.nn.functional.pad(x2d, (0, pad))
        mats = [sweep_matrix(c, reverse) for c in (cores[::-1] if reverse else cores)]
        y = run_sweep(x2d, mats, steps, self.out_factors, self.in_factors, reverse)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        bias = own_param(self, "bias")
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _traced_quant(self, cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The fake-quantized cores of a traced forward. ``cores`` are the parameters or prefix slices of them (a gated
        layer at a fixed width): the scales belong to the full cores, so those are quantized and then sliced, as the
        eager forward slices the fake-quantized cores."""
        full = fake_quant_cores(tuple(self._core_params.values()))
        return [f if f.shape == c.shape else f[: c.shape[0], :, :, : c.shape[3]] for f, c in zip(full, cores)]

    # ------------------------------------------------------------------ forward
    def forward(self, input: torch.Tensor | None = None, *, x: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + b``: ``(*, in_features) -> (*, out_features)`` (a nested tensor too), the input by position or
        by the keyword of the layer it replaces (``input``, as ``nn.Linear``'s; ``x``, as transformers' ``Conv1D``'s).
        ``x`` must have the cores' dtype (``TypeError`` otherwise); inside ``torch.autocast`` the contraction runs in
        the cores' dtype and the output has autocast's dtype (a float64 input is not cast: it needs float64 cores)."""
        if x is None:
            x = input
        elif input is not None:
            raise TypeError(f"{type(self).__name__}.forward() got the input twice, as input and as x=: pass one")
        # Hot path: every line here runs per call (a B=1 GEMV takes ~10 us), so no reshapes of 2-D
        # inputs, no planning after the first call per row bucket, and dtype errors are diagnosed
        # only when the kernel raises. First the shortest path: inference with speed mode's kept dense weight (a
        # dense-cached plan, the usual deployment; a one-core layer's weight in either mode) or a pair's two kept
        # factors (plan.chain), after the fewest reads. In a model each call starts with cold caches, where every
        # read and call costs microseconds: the general path below cost ~15 us per call more than
        # nn.Linear (MiniLM at one sentence 4-7% slower than dense). Anything else (another bucket, cores written or
        # swapped, a wrong input, on which the product raises) takes the general path. is_compiling comes first: a
        # tracer must not read the kept state (it would break the graph there and guard on it). A nested input goes
        # through nested_forward (a strided one's sequences one by one, a jagged one's packed rows in one call).
        if not _IS_COMPILING() and (hot := self._hot) and not _GRAD_ON() and type(x) is _TENSOR and not x.is_nested:
            try:
                entry = hot.get((x.numel() // self.in_features).bit_length() << 1)
                if entry is not None:
                    slot, device = entry
                    kept, cores = slot[2], self._modules["cores"]
                    params = cores._parameters
                    # is_fresh's test on the list's own dict and plain_cores' test of the list, written out (no
                    # Python-level calls; each costs microseconds cold): the very tensors kept, exactly under the
                    # names "0".."n-1" (so as many; torch's prune renames a core "k_orig", parametrize moves it out of
                    # the dict), no module in the list (one appended, or a parametrization of another tensor of it,
                    # which core_dict refuses), unmodified since (inference-tensor cores raise here)
                    if (all(map(operator.is_, params.values(), kept)) and tuple(params) == CORE_NAMES[len(kept)]
                            and not cores._modules and slot[0] == sum(map(_VERSION, kept))
                            and not _AUTOCAST_ON(device)):
                        ops = slot[1]
                        if len(ops) == 1:
                            return torch.nn.functional.linear(x, ops[0], own_param(self, "bias"))
                        return torch.nn.functional.linear(torch.nn.functional.linear(x, ops[0]), ops[1],
                                                          own_param(self, "bias"))
            except (AttributeError, RuntimeError):  # jit.trace's tensor sizes; inference-tensor cores; bad input
                pass  # diagnosed by the general path
        if not isinstance(x, torch.Tensor) or x.is_nested or not x.dim() or x.shape[-1] != self.in_features:
            if isinstance(x, torch.Tensor) and x.is_nested:
                return nested_forward(self, x)
            raise bad_input(self, x)
        if torch.compiler.is_compiling():
            cores = tuple(self._core_params.values())
            return self._traced_forward(x, cores, self._traced_for(cores))
        if not x.is_cpu and x.is_meta:  # shape inference, as nn.Linear does on meta tensors
            return x.new_empty((*x.shape[:-1], self.out_features))
        if torch.is_autocast_enabled("cpu" if x.is_cpu else x.device.type):
            return self._under_autocast(x)
        cores = tuple(self._core_params.values())
        flat = x.dim() != 2
        x2d = x.reshape(-1, self.in_features) if flat else x
        if not x2d.shape[0]:
            return self._no_rows(x)
        # any core: a user may freeze some cores and train the others. An input that needs a gradient does not need
        # a grad plan: the inference plans' kept operands are constants to it (a frozen compressed backbone)
        grad = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
        try:
            key = x2d.shape[0].bit_length() << 1 | grad  # (planner.row_bucket(rows), grad) packed in an int
        except AttributeError:  # torch.jit.trace: sizes are tensors
            if torch.jit.is_tracing():
                raise no_torchscript(self) from None
            raise
        entry = self._plans.get(key)
        if entry is None:
            widths = tuple(c.shape[3] for c in cores[:-1]) if self._pinned else None
            if widths is not None and self._pin_dims not in (None, widths):
                # cores of other widths than the pinned plans' (a functional_call, a .data reshape): kept under their
                # widths, or a plan that runs at any widths would stay in use instead of the pinned one after the call
                key = (key, widths)
                entry = self._plans.get(key)
            if entry is None:
                entry = self._plans[key] = self._new_entry(x, x2d.shape[0], grad)
        plan, slot = entry
        bias = own_param(self, "bias")
        try:
            if slot is not None:  # operands kept between inference calls (pre-contracted, or the sweep's layout)
                # Valid while the same tensors are unmodified: version counters only grow, so their sum
                # detects any in-place write; identity detects swapped-in tensors.
                if not is_fresh(slot, cores, core_versions(cores)):
                    src = cores if self._quant is None else self._fake_quantized(cores, keep=False)
                    slot[1] = plan.cache_operands(src, self.out_features, self.in_features)
                    slot[0], slot[2] = stamp(cores), cores  # keyed on the master cores
                ops = slot[1]
            else:
                ops = plan.group_operands(cores if self._quant is None else self._fake_quantized(cores),
                                          self.out_features, self.in_features)
            if plan.dense:  # the product nn.Linear computes (the short path above gives the same bits)
                y = torch.nn.functional.linear(x, ops[0], bias)
                if slot is not None and key not in self._hot:  # (a key of other widths is never looked up)
                    self._hot[key] = (slot, x.device.type)
                return y
            y = plan.run(x2d, ops, self.out_features, bias)
            if (plan.chain and slot is not None and key not in self._hot
                    and (ops[1].shape[0], ops[0].shape[1]) == (self.out_features, self.in_features)):
                self._hot[key] = (slot, x.device.type)  # a pair as two cores: its two products, as plan.run's
        except RuntimeError:
            self._check_dtype(x)
            if self._replan_reshaped(plan):
                return self.forward(x)
            raise
        return y.reshape(*x.shape[:-1], self.out_features) if flat else y

    def _replan_reshaped(self, plan: ContractionPlan) -> bool:
        """After a failed call: whether the cores' shapes differ from ``plan``'s (a core given a new shape through
        ``.data``, or cores of other widths given by ``torch.func.functional_call``), in which case the plans are
        dropped, once the new shapes are checked to form an MPO of this layer's size (a clear error otherwise). The
        pinned plans stay, for the widths they were pinned at (:meth:`_pins`)."""
        mpo = MPO([c.detach() for c in self._masters()], self.out_features, self.in_features)  # raises if inconsistent
        if (plan.out_factors, plan.in_factors, plan.ranks) == (mpo.out_factors, mpo.in_factors, mpo.bond_dims):
            return False
        self._reset_caches()
        return True

    def _no_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The output of an input with no rows, ``(*x.shape[:-1], out_features)``, as ``nn.Linear`` gives it
        (the kernels' reshapes cannot infer a size from zero elements). When a gradient is wanted, through
        the rebuilt weight, so that the cores and the input get (zero) gradients as a dense layer's would."""
        self._check_dtype(x)
        bias = own_param(self, "bias")
        if torch.is_grad_enabled() and (x.requires_grad or any(c.requires_grad for c in self._masters())):
            return torch.nn.functional.linear(x, self.weight_matrix(), bias)
        y = x.new_zeros(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def _new_entry(self, x: torch.Tensor, rows: int, grad: bool) -> tuple[ContractionPlan, list | None]:
        self._check_dtype(x)
        plan = self.plan(rows, grad)
        slot = self._ops_cache.setdefault(plan.operand_key, [-1, None, ()]) if plan.cached else None
        return plan, slot

    def _check_dtype(self, x: torch.Tensor) -> None:
        dtype = self._masters()[0].dtype
        if x.dtype != dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the layer's dtype {dtype}")

    def _under_autocast(self, x: torch.Tensor, *args) -> torch.Tensor:
        """``forward`` inside ``torch.autocast``: the plans mix operations autocast casts (``mm``) with ones it
        does not (``tensordot``, opt_einsum's merges), which would meet in two dtypes, so the kernel runs with
        autocast off, in the cores' dtype; the output takes autocast's dtype, as ``nn.Linear``'s does."""
        device = x.device.type
        if not x.is_floating_point():  # autocast casts floating inputs only: an integer one is refused as outside
            self._check_dtype(x)
        with torch.autocast(device, enabled=False):
            if x.dtype == torch.float64:  # autocast leaves float64 alone (nn.Linear's float64 layers stay float64)
                return self.forward(x, *args)
            y = self.forward(x.to(self._masters()[0].dtype), *args)
        return y.to(torch.get_autocast_dtype(device))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"in_factors={self.in_factors}, out_factors={self.out_factors}, bond_dims={self.bond_dims}, "
            f"params={self.num_params:,}, policy={'speed' if self._policy.cache_dense else 'memory'}"
            + (f", quant={self._quant}" if self._quant is not None else "")
        )


def fake_quantized_cores(cache: dict, cores: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``fake_quant`` of ``cores`` (an MPO layer's or table's): recomputed with a straight-through gradient when
    autograd needs it or a tracer runs, else kept in ``cache`` between calls while ``cores`` are unmodified."""
    hit = cache.get("cores")  # per call in inference: the kept ones, without building a closure
    if hit is not None and not torch.is_grad_enabled() and is_fresh(hit, cores, core_versions(cores)):
        return hit[1]
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(c.requires_grad for c in cores)):
        return fake_quant_cores(cores)
    return kept(cache, "cores", cores, lambda: _kept_fake_quant(cores))


@outside_inference_mode  # tensors with version counters: operands kept from them (gating's) can be reused
def _kept_fake_quant(cores: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return fake_quant_cores(cores)
