"""Hugging Face transformers integration: ``AutoModel.from_pretrained`` reads compressed models.

A compressed transformers model (after :func:`bondgate.compress`, :func:`bondgate.gate` or :func:`bondgate.load`)
carries ``model.config.quantization_config``: a :class:`BondgateConfig` (``quant_method: "bondgate"``) bound to
the model by a weak reference, whose ``to_dict()`` describes the model's bondgate layers *as they are when it is
called* (``{module name: layer.spec()}``, the second names of layers registered twice, and the ties between
their tensors). So whatever writes ``config.json`` — :func:`bondgate.save_pretrained`, transformers' own
``model.save_pretrained`` (which sentence-transformers' ``save`` and the Trainer call) — records the current
structure. Copying the model binds the copy's config to the copy; a config copied alone keeps a snapshot.

Reading: ``from_pretrained`` looks ``quant_method`` up in transformers' registry of quantizers, where bondgate
registers ``"bondgate"``. Its quantizer, before the weights are loaded, replaces each named module of the freshly
built (meta-device) dense model by an empty layer of its spec — in the dtype ``from_pretrained`` loads the model
in, as transformers casts dense layers — and checks the weight files' headers (a ``pytorch_model.bin``'s tensors
read onto the meta device) against those layers: a missing, unexpected, misshapen or integer-typed key of a bondgate
layer is a ``ValueError``, never a randomly initialized layer.
transformers then loads the tensors by key as for any model; afterwards each layer is rebuilt by its class
(``from_spec`` + ``load_state_dict``, as :func:`bondgate.load` does, so non-persistent state, parameter tracking
and kept operands are right), the ties are restored, the layer types' ``after_load`` hooks run, and the model
comes back in eval mode as an ordinary transformers model, not a "quantized" one: it can be trained (Trainer),
cast (``.half()``), compiled and saved again, like a freshly compressed one. A head class reading a checkpoint without
its head, whose token table was compressed under a config that tied them (a compressed ``GPT2Model`` read by
``AutoModelForCausalLM``), gets the table's tied MPO head, as the dense model's head is tied to its table.

**Registration in a fresh process**: ``import bondgate`` must come before ``from_pretrained``, in any order with
``import transformers``. Importing bondgate does not import transformers: it registers at once if transformers'
quantizer registry is already imported, and otherwise when it gets imported (an import hook on
``transformers.quantizers.auto``). :func:`register` does it explicitly.

**Without bondgate**, transformers 5.x merely *warns* about an unknown ``quant_method`` and would build the dense
architecture with random layers where the compressed ones were. A directory written by
:func:`bondgate.save_pretrained` therefore also names, as ``transformers_weights`` in ``config.json``, a weights
file that says what is missing (:data:`NEEDS_BONDGATE`): without bondgate, ``from_pretrained`` raises a
``ValueError`` quoting it; bondgate's quantizer clears it before the weight files are looked up. transformers'
own ``save_pretrained`` drops that field from ``config.json``, so a directory it writes reloads right with bondgate
imported but, without it, gets only transformers' warnings (the unknown quantization type and the load report).
A tied MPO head (:meth:`MPOEmbedding.as_linear`) is saved by :func:`bondgate.save_pretrained` only: transformers'
``save_pretrained`` refuses tensors shared outside the model's declared tied weights. **int8 cores** are not read
by ``from_pretrained`` at all (it would load the int8 values into float parameters): :func:`_prepare` refuses them,
and such a model is saved with :func:`bondgate.save_pretrained` and loaded with :func:`bondgate.from_pretrained`.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.abc
import json
import pickle
import re
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import io as _io
from ._warn import warn_user
from .layer import freeze_like, trains

__all__ = ["QUANT_METHOD", "CONFIG_VERSION", "NEEDS_BONDGATE", "Unsupported", "register", "attach", "mark_config"]

QUANT_METHOD = "bondgate"
CONFIG_VERSION = 1  # of the ``quantization_config`` entry; bondgate refuses newer ones
#: ``transformers_weights`` of a ``config.json`` written by bondgate: not a safetensors name, so transformers
#: without bondgate raises a ValueError quoting it (bondgate's quantizer removes it before the files are resolved).
NEEDS_BONDGATE = ("bondgate-compressed model: `import bondgate` (pip install bondgate) before from_pretrained; "
                  "without it transformers would build the dense layers with random weights")
_AUTO = "transformers.quantizers.auto"
_CLASSES: dict[str, type] = {}


# ---------------------------------------------------------------------------------------- registration
class Unsupported(ImportError):
    """transformers is missing, or too old for the integration (bondgate.save/load still work without it)."""


def register() -> None:
    """Register ``quant_method="bondgate"`` with transformers (idempotent). ``import bondgate`` arranges it.

    Raises :class:`Unsupported` without transformers, or with one older than its quantizer plug-in hooks (5.x).
    """
    try:
        from transformers.quantizers import auto
        from transformers.quantizers.base import HfQuantizer
    except ImportError as exc:
        raise Unsupported("bondgate.hf.register needs transformers; install it") from exc
    if not (hasattr(auto, "register_quantizer") and hasattr(HfQuantizer, "update_attn_implementation")):
        import transformers

        raise Unsupported(f"transformers {transformers.__version__} lacks the quantizer hooks bondgate's "
                          f"from_pretrained integration needs (transformers 5); use bondgate.from_pretrained")
    classes = _define()
    for mapping, name, decorator in ((auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "BondgateConfig",
                                      auto.register_quantization_config),
                                     (auto.AUTO_QUANTIZER_MAPPING, "BondgateHfQuantizer", auto.register_quantizer)):
        cls, have = classes[name], mapping.get(QUANT_METHOD)
        if have is cls:
            continue
        if have is None:
            decorator(QUANT_METHOD)(cls)
        elif getattr(have, "__module__", None) == __name__:
            mapping[QUANT_METHOD] = cls  # an earlier import of this module (reloaded)
        else:
            raise ValueError(f"quant_method {QUANT_METHOD!r} is already registered to {have.__module__}.{have.__name__}")


def _register_quietly() -> None:
    try:
        register()
    except Unsupported:
        pass  # attach() warns when it matters: when a transformers model gets bondgate layers
    except Exception as exc:  # noqa: BLE001 - an import hook must never break the import it watches
        warn_user(f"bondgate could not register its transformers integration ({exc}); compressed models will "
                  f"not load through from_pretrained")


class _ImportHook(importlib.abc.MetaPathFinder):
    """Registers bondgate once transformers' quantizer registry (:data:`_AUTO`) has been imported."""

    busy = False

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO or self.busy:
            return None
        self.busy = True
        try:
            spec = next((s for f in sys.meta_path if f is not self and hasattr(f, "find_spec")
                         for s in [f.find_spec(fullname, path, target)] if s is not None), None)
        finally:
            self.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _uninstall()
        _register_quietly()


def _uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_ImportHook" or
                        getattr(type(f), "__module__", None) != __name__]


def _install() -> None:
    """Register now if transformers' quantizer registry is loaded, else when it is (``import bondgate``)."""
    _uninstall()
    if _AUTO in sys.modules:
        _register_quietly()
    elif sys.modules.get("transformers", ...) is not None:  # None: imports of transformers are blocked
        sys.meta_path.insert(0, _ImportHook())


# ---------------------------------------------------------------------------------------- classes
def _define() -> dict[str, type]:
    """The config and quantizer classes (they subclass transformers' classes, so they are built on first use)."""
    if _CLASSES:
        return _CLASSES
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class BondgateConfig(QuantizationConfigMixin):
        """``quantization_config`` of a model with bondgate layers: their specs, computed from the bound model
        whenever it is serialized (a snapshot once the model is gone or in a loaded config). ``tie_word_embeddings``:
        the model's config tied its LM head to the token table before bondgate cleared that (the table compressed);
        a head class reading a checkpoint without the head gives it the table's tied MPO head, as the dense one ties."""

        def __init__(self, layers: dict | None = None, layer_aliases: dict | None = None,
                     tensor_aliases: dict | None = None, format_version: int = CONFIG_VERSION,
                     bondgate_version: str | None = None, quant_method: str = QUANT_METHOD,
                     tie_word_embeddings: bool = False, **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.bondgate_version = bondgate_version
            # a value of another type is kept as it is, for _check_config to name (a list read as no layers)
            self.layers, self.layer_aliases, self.tensor_aliases = (
                {} if v is None else dict(v) if isinstance(v, dict) else v
                for v in (layers, layer_aliases, tensor_aliases))
            self.tie_word_embeddings = tie_word_embeddings
            self._model: weakref.ref | None = None

        def bind(self, model: nn.Module) -> "BondgateConfig":
            self._model = weakref.ref(model)
            self.refresh()
            return self

        @property
        def model(self) -> nn.Module | None:
            return None if self._model is None else self._model()

        def refresh(self) -> None:
            """Recompute the specs from the bound model (a no-op when there is none)."""
            from . import __version__

            model = self.model
            if model is not None:
                self.layers, self.layer_aliases = _io._collect_layers(model)
                self.tensor_aliases = _layer_ties(model, self.layers, self.layer_aliases)
                self.format_version, self.bondgate_version = CONFIG_VERSION, __version__

        def to_dict(self) -> dict[str, Any]:
            self.refresh()
            return {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                    "bondgate_version": self.bondgate_version, "layers": copy.deepcopy(self.layers),
                    "layer_aliases": dict(self.layer_aliases), "tensor_aliases": dict(self.tensor_aliases),
                    **({"tie_word_embeddings": self.tie_word_embeddings} if self.tie_word_embeddings else {})}

        def __iter__(self):
            yield from self.to_dict().items()

        def __deepcopy__(self, memo: dict) -> "BondgateConfig":
            # Copying the model: the copy of its config is bound to the copy of the model. A config copied alone
            # (e.g. to build another model from it) keeps the layers as they are now, bound to nothing, as
            # transformers' quantization configs stick to copies of their model's config.
            model = self.model
            new = type(self).from_dict(self.to_dict())
            if model is not None and id(model) in memo:
                new._model = weakref.ref(memo[id(model)])
            return new

        def __reduce__(self):
            return _config_from_dict, (self.to_dict(),)

    class BondgateHfQuantizer(HfQuantizer):
        """Rebuilds a bondgate model inside ``from_pretrained`` (see the module docstring)."""

        requires_calibration = False

        def __init__(self, quantization_config, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            _check_config(quantization_config)
            self._plan: dict[str, Any] = {}
            self._dtype: torch.dtype | None = None

        def update_dtype(self, dtype):
            self._dtype = dtype  # from_pretrained(dtype=...), or "auto"'s choice: the layers follow it as dense ones do
            return dtype

        def update_attn_implementation(self, config):
            # the first hook that sees the model's config, before the weight files are looked up
            if getattr(config, "transformers_weights", None) == NEEDS_BONDGATE:
                del config.transformers_weights  # the weights are found by their usual names
            return config

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
            _no_disk_offload(kwargs.get("device_map"))
            if not self.pre_quantized:  # from_pretrained(quantization_config=...) of a checkpoint without one
                warn_user(f"{type(model).__name__}.from_pretrained: a bondgate quantization_config was passed for a "
                          f"checkpoint whose config.json records no bondgate layers; it only reads checkpoints of "
                          f"compressed models and does not compress while loading: compress the loaded model with "
                          f"bondgate.compress(model, bondgate.CompressionConfig(...))")
            self._plan = _prepare(model, self.quantization_config, checkpoint_files, self._dtype)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs: Any):
            _finish(model, self._plan)
            self._plan = {}
            return model

        def postprocess_model(self, model, **kwargs: Any):
            # An ordinary model afterwards, as after bondgate.compress: not "quantized" (transformers would refuse
            # .half() and Trainer), no hf_quantizer (save_pretrained would ask it for the state dict)
            self._process_model_after_weight_loading(model, **kwargs)
            for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
                model.__dict__.pop(attr, None)
            attach(model)
            return model

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

        @property
        def is_qat_trainable(self) -> bool:
            return True

        @property
        def is_compileable(self) -> bool:
            return True

    for cls in (BondgateConfig, BondgateHfQuantizer):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        _CLASSES[cls.__name__] = cls
    return _CLASSES


def __getattr__(name: str):
    if name in ("BondgateConfig", "BondgateHfQuantizer"):
        return _define()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _config_from_dict(d: dict):
    return _define()["BondgateConfig"].from_dict(d)


def _is_ours(qc: Any) -> bool:
    quant = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return quant == QUANT_METHOD


def _check_config(qc: Any) -> None:
    where = "quantization_config of config.json"
    version = getattr(qc, "format_version", None)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{where}: 'format_version' must be an integer, got {version!r} "
                         f"({type(version).__name__})")
    if not 1 <= version <= CONFIG_VERSION:
        raise ValueError(f"{where}: unsupported bondgate format_version {version!r}; this bondgate reads up to "
                         f"{CONFIG_VERSION} (upgrade bondgate)")
    _io._check_layers(qc.layers, qc.layer_aliases, where)
    _io._check_str_map(qc.tensor_aliases, "tensor_aliases", where)
    if not isinstance(getattr(qc, "tie_word_embeddings", False), bool):
        raise ValueError(f"{where}: 'tie_word_embeddings' must be true or false, got {qc.tie_word_embeddings!r}")


# ---------------------------------------------------------------------------------------- binding
def attach(model: nn.Module) -> nn.Module:
    """Keep ``model.config.quantization_config`` a :class:`BondgateConfig` bound to ``model`` while it holds
    bondgate layers (removed when it holds none). For transformers models only; others are returned unchanged."""
    hf = _io._hf_base()
    if hf is None or not isinstance(model, hf):
        return model
    config = model.config
    if getattr(config, "transformers_weights", None) == NEEDS_BONDGATE:  # read by bondgate.load: not for reuse
        del config.transformers_weights
    current = getattr(config, "quantization_config", None)
    if current is not None and not _is_ours(current):
        warn_user(f"{type(model).__name__} carries a {getattr(current, 'quant_method', current)!r} "
                  f"quantization_config, so its bondgate layers are not recorded in config.json: only "
                  f"bondgate.load will read them back")
        return model
    layers, _ = _io._collect_layers(model)
    if not layers:
        # a record bound to another model (one config object shared by a teacher and its student) is that model's
        if current is not None and getattr(current, "model", None) in (model, None):
            del config.quantization_config
        return model
    bound = _is_ours(current) and getattr(current, "model", None) is model
    if not bound:  # first record of this model's layers: from here on its config is its own (not changed under others)
        config = _own_config(model)
    cleared = _drop_weight_ties(model, layers)
    try:
        register()
    except Unsupported as exc:
        warn_user(f"{exc}: config.json will not describe the bondgate layers")
        return model
    if not bound:  # a record read with the config (loaded, unpickled) says whether it tied the head it cleared
        was = current.get("tie_word_embeddings") if isinstance(current, dict) else \
            getattr(current, "tie_word_embeddings", False)
        config.quantization_config = _define()["BondgateConfig"](tie_word_embeddings=_is_ours(current) and was is True
                                                                 ).bind(model)
    if cleared:
        config.quantization_config.tie_word_embeddings = True
    return model


def rebind(model: nn.Module) -> None:
    """Bind ``model``'s ``quantization_config`` record to it again where a pickle round trip left it bound to nothing
    and it describes ``model`` (its layer names are modules of ``model``: not the base model inside the head model
    the record describes). A record bound to a model (e.g. the head model around this base) stays with it."""
    model = _io.unwrapped(model)
    hf = _io._hf_base()
    if hf is None or not isinstance(model, hf):
        return
    current = getattr(model.config, "quantization_config", None)
    if not _is_ours(current) or getattr(current, "model", ...) is not None:
        return
    if all(_has_module(model, name) for name in current.layers):
        attach(model)
    else:  # the base model of a head model whose record a pickle round trip unbound: the head model must be bound
        warn_user(f"{type(model).__name__}'s config records the bondgate layers of the model around it, and that "
                  f"record is not bound to it (after pickling): call bondgate.set_mode (or quantize_mpo) on the whole "
                  f"model as well, or its config.json keeps the layers as they were")


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def warn_int8_saving(model: nn.Module) -> None:
    """Warn, for a transformers model that now holds int8 MPO cores, that transformers' own ``save_pretrained``
    (which a plain ``Trainer`` calls for its checkpoints) writes a directory neither loader reads back; the warning
    comes when the cores are quantized, not when the checkpoint is found unreadable."""
    hf = _io._hf_base()
    if hf is None or not isinstance(model, hf):
        return
    layers, _ = _io._collect_layers(model)
    if any(spec.get("quant") for spec in layers.values()):
        warn_user(f"{type(model).__name__} now has int8 MPO cores: save it with bondgate.save_pretrained(model, dir) "
                  f"(or train with bondgate.DistillationTrainer, whose checkpoints are bondgate's); transformers' own "
                  f"model.save_pretrained, which a plain Trainer calls for its checkpoints, writes a directory that "
                  f"neither AutoModel nor bondgate.from_pretrained can read back")


def _own_config(model: nn.Module):
    """A copy of ``model``'s config that every module of ``model``, and every module containing it (a head model around
    its base: the same model), holds from now on; the config to record ``model``'s bondgate layers on. The object
    ``model`` was built from is left as it was: it may be another model's (a teacher and a student built from one
    ``BertConfig``: the teacher's ``config.json`` would describe the student's layers) or the user's own, to build
    more models from (a second model built from it would carry this one's record and untied head)."""
    old = model.config
    new = copy.deepcopy(old)  # (a bondgate record in it comes out unbound; attach binds a new one)
    from transformers import PretrainedConfig

    swap = {id(old): new}  # sub-configs (an encoder-decoder's encoder / decoder) go with their parent's copy
    for name, value in vars(old).items():
        if isinstance(value, PretrainedConfig):
            swap[id(value)] = getattr(new, name)
    for module in [*model.modules(), *_containers(model, old)]:
        for name, value in list(vars(module).items()):
            if id(value) in swap:
                setattr(module, name, swap[id(value)])
    return new


def _containers(model: nn.Module, config) -> list[nn.Module]:
    """The modules holding ``config`` that contain ``model`` and are not inside it (a head model around its base),
    found by a one-time scan of the objects referring to ``config``, when a model's layers are first recorded."""
    inside = {id(vars(m)) for m in model.modules()}
    found = []
    for ref in gc.get_referrers(config):
        if not (isinstance(ref, dict) and id(ref) not in inside and "_modules" in ref and "_parameters" in ref):
            continue
        found += [o for o in gc.get_referrers(ref) if isinstance(o, nn.Module) and vars(o) is ref
                  and any(m is model for m in o.modules())]
    return found


def _drop_weight_ties(model: nn.Module, layers: dict) -> bool:
    """transformers' ties of ``weight`` keys under bondgate layers (a tied LM head: ``lm_head.weight`` -> the token
    table's ``weight``) name tensors those layers do not have: ``model.tie_weights()`` would fail on them (it is
    also called by ``resize_token_embeddings``, accelerate, the Trainer). A table's MPO head shares the table's cores
    itself, so these ties are dropped, and ``tie_word_embeddings`` cleared where a compressed table carried it
    (``tie_weights()`` re-derives the ties from the config). Returns whether it cleared it."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        for key, src in list(tied.items()):
            if _under(key, layers) is not None or _under(src, layers) is not None:
                del tied[key]
    get_input = getattr(model, "get_input_embeddings", None)
    try:
        table = get_input() if callable(get_input) else None
    except (NotImplementedError, AttributeError):
        table = None
    from .embedding import MPOEmbedding

    cleared = False
    if isinstance(table, MPOEmbedding):
        config = model.config
        for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: config)())}.values():
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
                cleared = True
    return cleared


def mark_config(path: str | Path, architecture: str | None = None) -> None:
    """Add :data:`NEEDS_BONDGATE` to a ``config.json`` holding a bondgate ``quantization_config``; with
    ``architecture``, record it as the model's class (``architectures``), as transformers' ``save_pretrained``
    does: a model built from a config has none, and an ``AutoModel`` reading a checkpoint then cannot tell a
    head model's checkpoint from its own."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        return
    changed = architecture is not None and data.get("architectures") != [architecture]
    if changed:
        data["architectures"] = [architecture]
    if _is_ours(data.get("quantization_config")):
        data["transformers_weights"] = NEEDS_BONDGATE
        changed = True
    if changed:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _under(key: str, names) -> str | None:
    """The name in ``names`` that ``key`` (a state-dict key) lies under, if any."""
    parts = key.split(".")
    return next((n for n in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if n in names), None)


def _layer_ties(model: nn.Module, layers: dict, layer_aliases: dict) -> dict[str, str]:
    """``{key: tied key}`` for tensors of bondgate layers that are one tensor under several keys (a tied MPO head),
    keys under a layer's second name left out (the layer itself is shared)."""
    first: dict[tuple, str] = {}
    ties: dict[str, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if _under(key, layer_aliases) is not None or not isinstance(t, torch.Tensor):
            continue  # torch's int8 layers (deploy_int8) put their packed weights' dtype in the state dict
        ident = ("id", id(t)) if t.is_meta or t.numel() == 0 else _io._tensor_ident(t)
        if ident in first:
            if _under(key, layers) is not None and _under(first[ident], layers) is not None:
                ties[key] = first[ident]
        else:
            first[ident] = key
    return ties


# ---------------------------------------------------------------------------------------- loading
def _resolve(model: nn.Module, name: str) -> str | None:
    """``name`` (a module name of the saved model) in ``model``, allowing for transformers' base-model prefix."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    for cand in (name, name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None,
                 f"{prefix}.{name}" if prefix else None):
        if cand:
            parent, _, child = cand.rpartition(".")
            with contextlib.suppress(AttributeError):
                if model.get_submodule(parent)._modules.get(child) is not None:
                    return cand
    return None


def _verify_checkpoint(files) -> None:
    """Files written by :func:`bondgate.save_pretrained` come with ``bondgate.json``, which holds their checksums:
    they are checked as :func:`bondgate.load` checks them (a damaged core would load as NaN weights, in silence).
    A directory transformers' own ``save_pretrained`` wrote has no ``bondgate.json`` (nor do hub downloads, which
    fetch only the files transformers asks for)."""
    if not files:
        return
    directory = Path(files[0]).parent
    if (directory / _io.META_NAME).is_file():
        _io.verify_checkpoint(directory)


def _header(files) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]] | None:
    """``{key: (shape, dtype)}`` over the checkpoint files: safetensors headers, or a ``.bin``'s tensors read onto
    the meta device (``weights_only``, as transformers reads it; no tensor data is read). ``None`` where a file
    cannot be read that way: then only the check after loading applies."""
    if not files:
        return None
    from safetensors import safe_open

    out = {}
    for f in files:
        if str(f).endswith(".safetensors"):
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), _io._ST_DTYPES.get(sl.get_dtype()))
            continue
        try:
            state = torch.load(str(f), map_location="meta", weights_only=True)
        except (RuntimeError, OSError, ValueError, pickle.UnpicklingError):
            return None
        if not isinstance(state, dict):
            return None
        out.update({k: (tuple(t.shape), t.dtype) for k, t in state.items() if isinstance(t, torch.Tensor)})
    return out


def _as_loaded(model: nn.Module, header: dict | None) -> dict | None:
    """``header`` under the names transformers loads its keys by: its conversion mapping renames the keys of
    checkpoints it saved in an older layout (transformers' own ``save_pretrained`` of a ViT writes
    ``vit.encoder.layer.0.intermediate.dense.*`` for the module ``vit.layers.0.mlp.fc1``)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion mappings loads keys as they are
        return header
    mapping = get_model_conversion_mapping(model) if header else []
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    if not (renamings or converters):
        return header
    return {rename_source_key(k, renamings, converters)[0]: meta for k, meta in header.items()}


def _in_dtype(spec: dict, dtype: torch.dtype | None) -> dict:
    """``spec`` with its floating ``dtype`` replaced by ``dtype`` (a floating one), as transformers casts dense layers."""
    have = getattr(torch, spec.get("dtype") or "", None) if isinstance(spec.get("dtype"), str) else None
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and isinstance(have, torch.dtype) \
            and have.is_floating_point and have != dtype:
        return {**spec, "dtype": str(dtype).removeprefix("torch.")}
    return spec


def _fp32_keys(model: nn.Module, dtype: torch.dtype | None) -> Callable[[str], bool]:
    """Whether transformers keeps the tensor ``key`` (``"encoder.block.0...wo.weight"``) in float32 when loading at
    ``dtype``: the class's ``_keep_in_fp32_modules`` at float16, ``_keep_in_fp32_modules_strict`` at float16 and
    bfloat16 (T5's ``wo``, whose activations overflow float16; RWKV's ``time_decay``), matched as transformers matches
    them, by regex search in the key."""
    globs = [*(getattr(model, "_keep_in_fp32_modules", None) or () if dtype == torch.float16 else ()),
             *(getattr(model, "_keep_in_fp32_modules_strict", None) or ()
               if dtype in (torch.float16, torch.bfloat16) else ())]
    if not globs:
        return lambda key: False
    pattern = re.compile("|".join(f"(?:{g.replace('*', '.*')})" for g in globs))
    return lambda key: pattern.search(key) is not None


def _kept_in_fp32(model: nn.Module, dtype: torch.dtype | None) -> Callable[[str], bool]:
    """Whether transformers keeps the dense module ``name`` in float32 when loading at ``dtype`` (its weight's key,
    :func:`_fp32_keys`)."""
    keys = _fp32_keys(model, dtype)
    return lambda name: keys(f"{name}.weight")


def _prepare(model: nn.Module, qc: Any, checkpoint_files, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Swap empty bondgate layers (meta device) into ``model`` and check the checkpoint's keys for them."""
    where = f"{type(model).__name__}.from_pretrained"
    quantized = [name for name, spec in qc.layers.items() if spec.get("quant")]
    if quantized:  # transformers would load int8 cores and their scales into fp32 parameters by key
        raise ValueError(f"{where}: this checkpoint has int8-quantized MPO cores ({', '.join(quantized[:3])}...), "
                         f"which transformers cannot read; a directory written by bondgate.save_pretrained loads with "
                         f"bondgate.from_pretrained(dir) (int8 models must be saved that way: one written by "
                         f"transformers' own save_pretrained has no bondgate.json and cannot be read back)")
    _verify_checkpoint(checkpoint_files)
    # a class without a module the checkpoint's model had (AutoModel reading a model with a head, a classifier reading
    # a causal LM whose lm_head was compressed): those layers are left out, as transformers leaves out a dense
    # module's weights (its load report lists their keys as unexpected)
    prefix = getattr(model, "base_model_prefix", "") or ""
    saved = getattr(getattr(model, "config", None), "architectures", None) or []
    other_class = type(model).__name__ not in saved  # loaded with another class than the checkpoint's model
    is_base = bool(prefix) and getattr(model, "base_model", None) is model
    headless = is_base and any(n.startswith(prefix + ".") for n in qc.layers)  # saved from a model around this base
    # a base model reading a checkpoint of another class whose compressed layers are none of the base's (a causal LM
    # with only its head compressed): those may be left out too, with the warning below
    other_outside = is_base and other_class and bool(saved)
    base = getattr(model, prefix, None) if prefix else None  # a head model's base (None in the base model itself)

    def absent(n: str) -> bool:
        """A module another class than the saved one does not build: one outside the base model (another head), or
        one whose parent is missing too (e.g. a pooler the class leaves out). A layer the saved class itself lacks,
        or a missing layer inside a block the model has, is an error below (a config naming a layer the architecture
        does not have)."""
        if _resolve(model, n) is not None or not (other_class or headless):
            return False
        parent = n.rpartition(".")[0]
        outside = (headless or other_outside or isinstance(base, nn.Module)) and not n.startswith(prefix + ".")
        return outside or (bool(parent) and _resolve(model, parent) is None)

    dropped = {n for n in [*qc.layers, *qc.layer_aliases] if absent(n)}
    if dropped and not (headless and all(not n.startswith(prefix + ".") for n in dropped)):
        warn_user(f"{where}: this model has no module {', '.join(sorted(dropped)[:4])}"
                  f"{', ...' if len(dropped) > 4 else ''}, which the checkpoint compressed: left out (loaded with "
                  f"another class than the one saved; its own new modules are initialized as usual)")
    layer_aliases = {a: t for a, t in qc.layer_aliases.items() if a not in dropped}
    tensor_aliases = {k: t for k, t in qc.tensor_aliases.items()
                      if _under(k, dropped) is None and _under(t, dropped) is None}
    fp32 = _kept_in_fp32(model, dtype)
    specs = {name: _in_dtype(spec, torch.float32 if fp32(name) else dtype) for name, spec in qc.layers.items()
             if name not in dropped}
    names = {}
    for name in [*specs, *layer_aliases]:
        found = _resolve(model, name)
        if found is None or layer_aliases.get(name) in dropped:
            raise ValueError(f"{where}: the checkpoint's quantization_config replaces module {name!r}, which this "
                             f"model does not have (load it with the class and config it was saved with: a "
                             f"config override such as from_pretrained(..., num_hidden_layers=1), or an edited "
                             f"config.json, builds fewer modules)")
        names[name] = found
    header = _as_loaded(model, _header(checkpoint_files))
    orphans = _unlisted_cores(model, header, set(names.values()))
    if orphans:  # else their dense weights come back freshly initialized, listed in transformers' MISSING table only
        raise ValueError(f"{where}: the checkpoint holds MPO cores for {len(orphans)} module(s) "
                         f"({', '.join(orphans[:3])}{', ...' if len(orphans) > 3 else ''}) that config.json's "
                         f"quantization_config does not list as bondgate layers (an edited or truncated config); a "
                         f"directory written by bondgate.save_pretrained loads with bondgate.from_pretrained(dir)")
    dense, keyless = _saved_dense(model, {n: names[n] for n in specs}, header)
    if dense:
        warn_user(f"{where}: config.json records {len(dense)} bondgate layer(s) ({', '.join(sorted(dense)[:3])}"
                  f"{', ...' if len(dense) > 3 else ''}) that the checkpoint holds as this model's own dense "
                  f"weights: loaded dense (a dense model saved with a compressed model's config, e.g. one built by "
                  f"from_config(compressed.config), which shares the config object)"
                  + (f"; {len(keyless)} more it holds no weights for are left to transformers" if keyless else ""))
        dense |= keyless
        dense |= {a for a, t in layer_aliases.items() if t in dense}
        specs = {n: s for n, s in specs.items() if n not in dense}
        layer_aliases = {a: t for a, t in layer_aliases.items() if a not in dense}
        tensor_aliases = {k: t for k, t in tensor_aliases.items()
                          if _under(k, dense) is None and _under(t, dense) is None}
        names = {n: f for n, f in names.items() if n not in dense}
    tied_head = _table_head(model, qc, {names[n]: s for n, s in specs.items()}, names.values(), header, where)
    # one empty layer per name, even for a layer's second name: transformers fills the keys it finds missing with
    # empty tensors, which in a shared layer would overwrite the loaded ones (_finish shares the rebuilt layer)
    every = {**specs, **{alias: specs[target] for alias, target in layer_aliases.items()}}
    shells = _io._build_layers({"layers": every, "layer_aliases": {}}, device="meta",
                               where="quantization_config of config.json")
    shells = {names[n]: layer for n, layer in shells.items()}
    try:
        _io._check_replaced(model, shells)
    except ValueError as exc:  # transformers keeps ignore_mismatched_sizes to itself: the quantizer cannot see it
        raise ValueError(f"{where}: {exc} (a compressed layer cannot be re-initialized at another size, "
                         f"ignore_mismatched_sizes=True included: load the checkpoint with its own sizes and replace "
                         f"the module after, e.g. model.classifier = nn.Linear(...))") from None
    frozen = {}  # what the model's own modules freeze (transformers' loading makes the shells' parameters anew)
    for name, layer in shells.items():
        layer.train(model.training)
        frozen[name] = trains(model.get_submodule(name))
        _io._set_submodule(model, name, layer)
        # Some models' _init_weights reach into a child's weight (GPT-2: attn.c_proj.weight); give the empty layer
        # a stand-in that transformers' guarded init functions skip (it goes with the layer after loading).
        sizes = _io._features(layer)
        shape = (sizes.get("out_features", sizes.get("num_embeddings")), sizes.get("in_features",
                                                                                    sizes.get("embedding_dim")))
        if None not in shape and not hasattr(layer, "weight"):
            stand_in = torch.empty(shape, device="meta")
            stand_in._is_hf_initialized = True
            object.__setattr__(layer, "weight", stand_in)

    # tie groups among the layers' keys: one tensor under several keys (a layer's second name, a tied head)
    own = {k: t for k, t in model.state_dict(keep_vars=True).items() if _under(k, shells) is not None}
    root = {k: k for k in own}
    for alias in layer_aliases:
        a, c = names[alias], names[layer_aliases[alias]]
        for k in own:
            if _under(k, shells) == a:
                root[k] = c + k[len(a):]
    for key, target in tensor_aliases.items():
        k, t = (_map_key(model, x, own) for x in (key, target))
        if k is None or t is None:
            raise ValueError(f"{where}: tensor alias {key!r} -> {target!r} does not name keys of the bondgate layers")
        root[k] = root[t]
    groups: dict[str, list[str]] = {}
    for k in own:
        groups.setdefault(root[k], []).append(k)

    source = {r: members[0] for r, members in groups.items()}  # the key each group is loaded from
    if header is not None:
        present: dict[str, tuple] = {}
        unexpected = []
        for k, meta in header.items():
            mk = _map_key(model, k, own)
            if mk is not None:
                present[mk] = meta
            elif any(_under(c, shells) is not None for c in _candidates(model, k)):
                unexpected.append(k)
        missing = [r for r, members in groups.items() if not any(m in present for m in members)]
        if missing or unexpected:
            raise ValueError(f"{where}: the checkpoint does not match its bondgate layers: missing keys "
                             f"{_io._short(missing)}, unexpected keys {_io._short(unexpected)}")
        for k, (shape, saved) in present.items():
            t = own[k]  # floating tensors are cast to the layer's dtype, as transformers does for dense ones
            if shape != tuple(t.shape) or (saved is not None and saved != t.dtype
                                           and not (saved.is_floating_point and t.dtype.is_floating_point)):
                raise ValueError(f"{where}: {k!r} is {saved} {list(shape)} in the checkpoint, but its bondgate layer "
                                 f"expects {t.dtype} {list(t.shape)}")
        source = {r: next(m for m in members if m in present) for r, members in groups.items()}
    # transformers' own ties (a tied LM head: lm_head.weight -> the token table's weight) name weights the bondgate
    # layers do not have; their cores are tied by the groups above instead. Set aside until _finish.
    tied = getattr(model, "all_tied_weights_keys", None)
    untied = {t: tied.pop(t) for t, src in list(tied.items()) if _under(t, shells) is not None
              or _under(src, shells) is not None} if isinstance(tied, dict) else {}
    # the other keys of a group are filled from its source: not "missing" in transformers' load report
    skipped = {k for r, members in groups.items() for k in members if k != source[r]}
    if tied_head:  # made the table's MPO head by _finish
        skipped.add(f"{tied_head[0]}.weight")
    ignore = model.__dict__.get("_keys_to_ignore_on_load_missing")  # restored by _finish
    model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | {
        f"^{re.escape(k)}$" for k in skipped}
    return {"names": names, "layers": specs, "layer_aliases": layer_aliases, "groups": groups,
            "source": source, "ignore": ignore, "untied": untied, "frozen": frozen, "tied_head": tied_head}


def _table_head(model: nn.Module, qc: Any, specs: dict[str, dict], replaced, header: dict | None,
                where: str) -> tuple[str, str] | None:
    """``(head, table)`` names in ``model`` where its LM head is to be the compressed token table's tied MPO head: the
    checkpoint's model tied them before its table was compressed (``qc.tie_word_embeddings``; its config.json says
    False since), and holds no head (a compressed base model read by a head class, which the dense one would tie).
    ``specs``: the layers to be built, by their names in ``model``; ``replaced``: every module bondgate replaces."""
    if not getattr(qc, "tie_word_embeddings", False) or header is None:
        return None
    try:
        head, table = model.get_output_embeddings(), model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return None
    from .embedding import MPOEmbedding

    found = {id(m): n for n, m in model.named_modules()}
    head_name, table_name = found.get(id(head)), found.get(id(table))
    spec = specs.get(table_name)
    if (type(head) is not nn.Linear or head_name in set(replaced) or spec is None
            or not issubclass(_io.LAYER_TYPES[spec["type"]], MPOEmbedding)
            or any(f"{head_name}.weight" in _candidates(model, k) for k in header)):
        return None
    if spec.get("kept_rows"):
        warn_user(f"{where}: {head_name} is initialized as a new untied layer: the checkpoint's model tied its LM head "
                  f"to the token table {table_name}, but that table keeps exact rows, which a tied MPO head cannot "
                  f"hold (compress the model with its head, or without embedding_rows)")
        return None
    return head_name, table_name


def _unlisted_cores(model: nn.Module, header: dict | None, listed: set[str]) -> list[str]:
    """The modules of ``model`` (names in it) the checkpoint holds MPO cores for (``<module>.cores.0``) that are
    none of the ``listed`` layers and are a plain module of the model, one without cores of its own."""
    out = set()
    for key in header or ():
        if not key.endswith(".cores.0"):
            continue
        found = _resolve(model, key[: -len(".cores.0")])
        if found is not None and found not in listed and not hasattr(model.get_submodule(found), "cores"):
            out.add(found)
    return sorted(out)


def _saved_dense(model: nn.Module, names: dict[str, str], header: dict | None) -> tuple[set[str], set[str]]:
    """The recorded layers (``{saved name: name in model}``) whose checkpoint keys are exactly those of the model's
    own dense module there, with its shapes, and nothing else; and, when there are any, the recorded layers without
    a key in the checkpoint."""
    if not header:
        return set(), set()
    saved = {c: shape for k, (shape, _) in header.items() for c in _candidates(model, k)}
    out, keyless = set(), set()
    for name, found in names.items():
        module = model.get_submodule(found)
        if isinstance(module, tuple(_io.LAYER_TYPES.values())):  # the class builds this layer itself
            continue
        own = {f"{found}.{k}": tuple(t.shape) for k, t in module.state_dict().items()}
        held = {k for k in saved if k.startswith(found + ".")}
        if own and held == set(own) and all(saved[k] == shape for k, shape in own.items()):
            out.add(name)
        elif not held:
            keyless.add(name)
    # in a dense checkpoint, a layer without keys is transformers' to fill: a head tied to the table (not saved), or
    # a head this class adds to the saved base model (initialized)
    return out, (keyless if out else set())


def _candidates(model: nn.Module, key: str) -> list[str]:
    prefix = getattr(model, "base_model_prefix", "") or ""
    cands = [key]
    if prefix:
        cands += [key[len(prefix) + 1:]] if key.startswith(prefix + ".") else [f"{prefix}.{key}"]
    return cands


def _map_key(model: nn.Module, key: str, keys) -> str | None:
    return next((c for c in _candidates(model, key) if c in keys), None)


def _no_disk_offload(device_map) -> None:
    if isinstance(device_map, dict) and ("disk" in device_map.values()):
        raise ValueError("offloading to disk (a device_map with 'disk', e.g. from a small max_memory) is not supported "
                         "for bondgate layers: give the model room in memory (max_memory) or load it with "
                         "device_map='cpu' (a compressed model needs less of it than the dense one)")


def _finish(model: nn.Module, plan: dict[str, Any]) -> None:
    """Replace the loaded empty layers by layers built by their classes, holding the loaded tensors."""
    if not plan:
        return
    if plan["ignore"] is None:
        del model._keys_to_ignore_on_load_missing
    else:
        model._keys_to_ignore_on_load_missing = plan["ignore"]
    names, groups, source = plan["names"], plan["groups"], plan["source"]
    state = model.state_dict(keep_vars=True)
    value = {}
    _no_disk_offload(getattr(model, "hf_device_map", None))  # "auto" is resolved to a map only after the layers
    for r, members in groups.items():
        t = state[source[r]]
        if t.is_meta or not getattr(t, "_is_hf_initialized", False):
            raise ValueError(f"{type(model).__name__}.from_pretrained: {source[r]!r} of a bondgate layer was not "
                             f"loaded from the checkpoint")
        for k in members:
            value[k] = t.detach()
    fresh: dict[str, nn.Module] = {}
    for name, spec in plan["layers"].items():
        mname = names[name]
        prefix = mname + "."
        sd = {k[len(prefix):]: v for k, v in value.items() if _under(k, names.values()) == mname}
        # built on the CPU and moved, as bondgate.load does: a layer's own non-tensor state stays where it expects
        with torch.device("cpu"):
            layer = _io.LAYER_TYPES[spec["type"]].from_spec(spec)
        layer.load_state_dict(sd, strict=True)
        if sd:
            layer.to(next(iter(sd.values())).device)
        fresh[mname] = layer.train(model.get_submodule(mname).training)
        if mname in plan["frozen"]:
            freeze_like(plan["frozen"][mname], layer)
    for alias, target in plan["layer_aliases"].items():
        fresh[names[alias]] = fresh[names[target]]
    for name, layer in fresh.items():
        _io._set_submodule(model, name, layer)
    if plan["tied_head"]:  # as compress makes a head tied to the table it compresses
        head_name, table_name = plan["tied_head"]
        head = model.get_submodule(head_name)
        tied = model.get_submodule(table_name).as_linear(bias=head.bias is not None)
        if head.bias is not None:
            with torch.no_grad():
                tied.bias.copy_(head.bias)
        _io._set_submodule(model, head_name, tied.train(head.training))
    for r, members in groups.items():
        for k in members:
            if k != r:
                _io._tie(model, k, r)
    for cls in {type(m) for m in fresh.values()}:
        if callable(getattr(cls, "after_load", None)):
            cls.after_load(model)


_install()
