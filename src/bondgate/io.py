"""Save and load compressed models without pickle.

A bondgate checkpoint is a directory holding

* ``model.safetensors``: the model's full ``state_dict``. Tensors that are the same view of the same
  storage (tied weights, e.g. ``lm_head.weight`` / ``transformer.wte.weight``) are stored once;
  the other names are listed in ``bondgate.json`` under ``tensor_aliases``.
* ``bondgate.json``: format name and version, bondgate/torch versions, how to rebuild the model
  (``architecture``), the structure of every bondgate layer (``layers``: qualified module name ->
  ``layer.spec()``), the compression report (if any), the sha256 and size of the weights file and of
  every other file (``files``), and the sha256 of its own content (``meta_sha256``).
* for Hugging Face models, ``config.json`` (and the tokenizer files when a tokenizer is given).

:func:`save` writes the whole directory beside the target and swaps it in with one rename, so an existing
checkpoint survives any failure (a tokenizer that cannot save, a full disk, a crash). :func:`load` verifies
every checksum, then builds the layers and the skeleton on the ``meta`` device and compares their shapes and
dtypes with the weights file's header before anything is allocated, refuses non-finite weights, then rebuilds
the dense skeleton (from the transformers class named in the JSON, from the JSON description of an
``nn.Sequential``, or from a model the caller constructs), swaps in the bondgate layers and copies the tensors.
Nothing is ever unpickled, and every check runs before a caller-supplied model is modified.

For a transformers model, ``config.json`` also holds a ``quantization_config`` (``quant_method: "bondgate"``)
describing the layers, so that ``AutoModel.from_pretrained`` reads the directory too once bondgate is imported
(see :mod:`bondgate.hf`); without bondgate, transformers refuses it with an error that says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._warn import warn_user
from .layer import MPOLinear, freeze_like, outside_inference_mode, reparametrizing_hook, trains
from .quant import SCALE_SUFFIX, master_state, scale_problem

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYER_TYPES",
    "register_layer_type",
    "save",
    "load",
    "save_pretrained",
    "from_pretrained",
    "read_metadata",
]

FORMAT_NAME = "bondgate-checkpoint"
FORMAT_VERSION = 2  # 2: checksums of every file and of bondgate.json itself (version 1 is still read)
READ_VERSIONS = (1, 2)
WEIGHTS_NAME = "model.safetensors"
META_NAME = "bondgate.json"

#: bondgate layer classes that checkpoints may hold, keyed by ``spec()["type"]``.
LAYER_TYPES: dict[str, type[nn.Module]] = {}


def register_layer_type(cls: type[nn.Module], name: str | None = None) -> type[nn.Module]:
    """Register a layer class implementing ``spec() -> dict`` and ``from_spec(spec) -> layer``.

    ``name`` (default ``cls.__name__``) must equal the ``"type"`` its ``spec()`` reports. Returns
    ``cls``, so it can be used as a class decorator. An optional static ``after_load(model)`` is called
    once per loaded model holding the type, after its weights are in (state shared between layers).
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_layer_type expects an nn.Module subclass, got {cls!r}")
    if not callable(getattr(cls, "spec", None)) or not callable(getattr(cls, "from_spec", None)):
        raise TypeError(f"{cls.__name__} must implement spec() and the classmethod from_spec(spec)")
    name = cls.__name__ if name is None else name
    if not isinstance(name, str) or not name:
        raise ValueError(f"layer type name must be a non-empty string, got {name!r}")
    old = LAYER_TYPES.get(name)
    if old is not None and old is not cls:
        raise ValueError(f"layer type {name!r} is already registered to {old.__module__}.{old.__qualname__}")
    LAYER_TYPES[name] = cls
    return cls


register_layer_type(MPOLinear)


def _registry_fix(cls: type, kind: Any) -> str:
    """What makes ``cls``, whose ``spec()`` reports type ``kind``, savable."""
    other, names = LAYER_TYPES.get(kind), [n for n, c in LAYER_TYPES.items() if c is cls]
    if other is not None:  # (a subclass that inherits its parent's spec)
        return (f"{kind!r} names {other.__name__}: give {cls.__name__} a spec() that reports its own type name, "
                f"and register it under that name")
    if names:
        return (f"the class is registered as {names[0]!r}: make its spec() report {names[0]!r}, or register it as "
                f"bondgate.register_layer_type({cls.__name__}, {kind!r})")
    return f"call bondgate.register_layer_type({cls.__name__}" + (")" if kind == cls.__name__ else f", {kind!r})")


# ---------------------------------------------------------------------------------------- helpers
def _hf_base() -> type | None:
    """``transformers.PreTrainedModel`` if transformers is already imported (else no model can be one)."""
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    return PreTrainedModel


def _import_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("this checkpoint holds a Hugging Face transformers model; install transformers") from exc
    return transformers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _module_device(module: nn.Module) -> torch.device | None:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _short(names: Iterable[str], n: int = 8) -> str:
    names = sorted(names)
    return repr(names[:n])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > n else "]")


# ---------------------------------------------------------------------------------------- layers
def _collect_layers(model: nn.Module) -> tuple[dict[str, dict], dict[str, str]]:
    """``({name: spec}, {alias name: canonical name})`` of the registered layers, outermost only."""
    registered = tuple(LAYER_TYPES.values())
    layers: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}

    def visit(mod: nn.Module, path: str) -> None:
        if isinstance(mod, registered):
            if id(mod) in first:
                aliases[path] = first[id(mod)]
                return
            spec = mod.spec()
            if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
                got = (f"a dict whose 'type' is {spec.get('type')!r}" if isinstance(spec, dict)
                       else f"a {type(spec).__name__}")
                raise ValueError(f"module {path or '<root>'!r} is a {type(mod).__name__} whose spec() returned {got}; "
                                 "spec() must return a dict whose 'type' key is the name it is registered under")
            kind = spec["type"]
            if LAYER_TYPES.get(kind) is not type(mod):
                raise ValueError(f"module {path or '<root>'!r} is a {type(mod).__name__} whose spec() type is "
                                 f"{kind!r}, which is not registered to that class; {_registry_fix(type(mod), kind)}")
            first[id(mod)] = path
            layers[path] = spec
            return  # a registered layer rebuilds its own children
        for name, child in mod._modules.items():
            if child is not None:
                visit(child, _join(path, name))

    visit(model, "")
    return layers, aliases


def _build_layers(meta: dict, device: str | None = None, where: str = META_NAME) -> dict[str, nn.Module]:
    """One fresh layer per canonical name in ``meta["layers"]``, aliases mapped to the same instance
    (``device="meta"``: shapes only, nothing allocated; ``where``: the file the specs came from, for the errors)."""
    built: dict[str, nn.Module] = {}
    for name, spec in meta["layers"].items():
        try:
            with torch.device(device) if device else contextlib.nullcontext():
                layer = LAYER_TYPES[spec["type"]].from_spec(spec)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError, MemoryError) as exc:
            raise ValueError(f"invalid spec for layer {name!r} in {where}: {exc}") from exc
        if not isinstance(layer, nn.Module):
            raise ValueError(f"{spec['type']}.from_spec returned {type(layer).__name__}, not an nn.Module")
        built[name] = layer
    for alias, target in meta["layer_aliases"].items():
        built[alias] = built[target]
    return built


# ---------------------------------------------------------------------------------------- nn.Sequential
# Each entry: class, (argument, JSON type, default) list read from / passed to the constructor.
_SEQ_LAYERS: dict[str, tuple[type[nn.Module], tuple[tuple[str, str, Any], ...]]] = {
    "Linear": (nn.Linear, (("in_features", "int", None), ("out_features", "int", None), ("bias", "bool", True))),
    "ReLU": (nn.ReLU, (("inplace", "bool", False),)),
    "GELU": (nn.GELU, (("approximate", "str", "none"),)),
    "Tanh": (nn.Tanh, ()),
    "Sigmoid": (nn.Sigmoid, ()),
    "Identity": (nn.Identity, ()),
    "Dropout": (nn.Dropout, (("p", "float", 0.5), ("inplace", "bool", False))),
    "LayerNorm": (nn.LayerNorm, (("normalized_shape", "ints", None), ("eps", "float", 1e-5),
                                 ("elementwise_affine", "bool", True), ("bias", "bool", True))),
    "Flatten": (nn.Flatten, (("start_dim", "int", 1), ("end_dim", "int", -1))),
}


def _seq_args(mod: nn.Module, kind: str) -> dict[str, Any]:
    if kind == "Linear":
        return {"in_features": mod.in_features, "out_features": mod.out_features, "bias": mod.bias is not None}
    if kind == "LayerNorm":
        return {"normalized_shape": list(mod.normalized_shape), "eps": float(mod.eps),
                "elementwise_affine": bool(mod.elementwise_affine),
                "bias": mod.bias is not None if mod.elementwise_affine else True}
    if kind == "Dropout":
        return {"p": float(mod.p), "inplace": bool(mod.inplace)}
    return {arg: getattr(mod, arg) for arg, _, _ in _SEQ_LAYERS[kind][1]}


def _describe_sequential(model: nn.Module, layer_names: set[str], why: list[str] | None = None) -> dict | None:
    """JSON description of a plain ``nn.Sequential`` tree, or ``None`` if it holds anything else (what, into
    ``why``)."""
    seen: dict[int, str] = {}
    why = [] if why is None else why

    def describe(mod: nn.Module, path: str) -> dict | None:
        if id(mod) in seen:  # the same module at two places: rebuild it once and share it
            return {"type": "ref", "target": seen[id(mod)]}
        seen[id(mod)] = path
        if path in layer_names:
            return {"type": "bondgate"}
        kind = type(mod).__name__
        if reparametrizing_hook(mod) is not None:  # its state dict's keys are not a plain layer's
            why.append(f"{path} is reparametrized by a hook (weight_norm, spectral_norm or prune)")
            return None
        if type(mod) is nn.Sequential:
            items = []
            for name, child in mod._modules.items():
                d = describe(child, _join(path, name)) if child is not None else None
                if d is None:
                    return None
                items.append([name, d])
            return {"type": "Sequential", "layers": items}
        if kind in _SEQ_LAYERS and type(mod) is _SEQ_LAYERS[kind][0]:
            return {"type": kind, **_seq_args(mod, kind)}
        why.append(f"{path} is a {_qualname(type(mod))}")
        return None

    if type(model) is not nn.Sequential:
        return None
    desc = describe(model, "")
    return None if desc is None else {"kind": "sequential", **{k: v for k, v in desc.items() if k != "type"}}


def _json_arg(value: Any, typ: str, where: str) -> Any:
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "ints": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
    }[typ]
    if not ok:
        raise ValueError(f"{where} must be of type {typ}, got {value!r}")
    if typ == "float" and not 0 <= value < math.inf:  # (a dropout rate, an eps: NaN or < 0 gives NaN outputs)
        raise ValueError(f"{where} must be a finite number >= 0, got {value!r}")
    return float(value) if typ == "float" else value


def _build_sequential(desc: dict, layer_names: set[str]) -> nn.Module:
    """The ``nn.Sequential`` tree ``desc`` describes, an ``nn.Identity`` where a saved layer (``layer_names``) goes."""
    built: dict[str, nn.Module] = {}

    def build(d: Any, path: str) -> nn.Module:
        where = f"architecture entry {path or '<root>'!r}"
        if not isinstance(d, dict) or not isinstance(d.get("type"), str):
            raise ValueError(f"{where} must be an object with a 'type'")
        kind = d["type"]
        if kind == "ref":
            target = d.get("target")
            if target not in built:
                raise ValueError(f"{where} refers to {target!r}, which is not an earlier module")
            return built[target]
        if kind == "bondgate":
            if path not in layer_names:  # the placeholder would stay an Identity
                raise ValueError(f"{where} is a bondgate layer, but 'layers' holds none of that name")
            mod: nn.Module = nn.Identity()  # placeholder, replaced from `layers`
        elif kind == "Sequential":
            items = d.get("layers")
            if not isinstance(items, list):
                raise ValueError(f"{where}: a Sequential needs a 'layers' list")
            mod = nn.Sequential()
            built[path] = mod
            for item in items:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and item[0]
                        and "." not in item[0]):
                    raise ValueError(f"{where}: each entry of 'layers' must be [name, description], got {item!r}")
                child = build(item[1], _join(path, item[0]))
                try:
                    mod.add_module(item[0], child)
                except KeyError as exc:  # a name nn.Module has as an attribute ("forward", "__class__")
                    raise ValueError(f"{where}: a module cannot be named {item[0]!r}") from exc
            return mod
        elif kind in _SEQ_LAYERS:
            cls, params = _SEQ_LAYERS[kind]
            unknown = set(d) - {"type"} - {p for p, _, _ in params}
            if unknown:
                raise ValueError(f"{where}: unknown arguments {sorted(unknown)} for {kind}")
            kwargs = {}
            for arg, typ, default in params:
                if arg not in d and default is None:
                    raise ValueError(f"{where}: {kind} needs {arg!r}")
                kwargs[arg] = _json_arg(d.get(arg, default), typ, f"{where} {kind}.{arg}")
            try:
                mod = cls(**kwargs)
            except (ValueError, TypeError, RuntimeError) as exc:
                raise ValueError(f"{where}: cannot build {kind}({kwargs}): {exc}") from exc
        else:
            raise ValueError(f"{where}: unknown layer type {kind!r}; known: {sorted(_SEQ_LAYERS)}")
        built[path] = mod
        return mod

    try:
        return build({"type": "Sequential", "layers": desc.get("layers")}, "")
    except RecursionError:
        raise ValueError(f"the architecture in {META_NAME} nests Sequentials deeper than this Python's recursion "
                         f"limit ({sys.getrecursionlimit()}) allows") from None


# ---------------------------------------------------------------------------------------- save
def _describe(model: nn.Module, layer_names: set[str]) -> dict:
    hf = _hf_base()
    if hf is not None and isinstance(model, hf):
        import transformers

        name = type(model).__name__
        if getattr(transformers, name, None) is type(model):
            return {"kind": "transformers", "class": name, "transformers_version": transformers.__version__,
                    "attn_implementation": getattr(model.config, "_attn_implementation", None)}
        # custom (e.g. remote-code) classes cannot be rebuilt by name
        return {"kind": "module", "class": _qualname(type(model))}
    if "" in layer_names:
        return {"kind": "bondgate_layer"}
    why: list[str] = []
    seq = _describe_sequential(model, layer_names, why)
    if seq is not None:
        return seq
    return {"kind": "module", "class": _qualname(type(model))} | ({"why": why[0]} if why else {})


def _dedup_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors to store, {alias key: stored key})`` from ``model.state_dict()``."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(t).__name__}; bondgate checkpoints hold tensors only")
        if t.numel() > 0:  # empty tensors all report data_ptr 0
            ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if ident in seen:
                aliases[key] = seen[ident]
                continue
            seen[ident] = key
        stored[key] = t
    # safetensors refuses tensors that share memory or view a larger storage: give those their own copy.
    out: dict[str, torch.Tensor] = {}
    ptr_count: dict[int, int] = {}
    cpu = {k: t.detach().to("cpu") for k, t in stored.items()}
    for t in cpu.values():
        ptr_count[t.untyped_storage().data_ptr()] = ptr_count.get(t.untyped_storage().data_ptr(), 0) + 1
    for k, t in cpu.items():
        own = (t.is_contiguous() and t.storage_offset() == 0
               and t.untyped_storage().nbytes() == t.numel() * t.element_size()
               and ptr_count[t.untyped_storage().data_ptr()] == 1)
        out[k] = t if own else t.contiguous().clone()
    return out, aliases


def _report_dict(model: nn.Module, report: Any) -> dict | None:
    report = getattr(model, "bondgate_report", None) if report is None else report
    if report is None:
        return None
    if hasattr(report, "to_dict"):
        report = report.to_dict()
    if not isinstance(report, dict):
        raise TypeError(f"report must be a dict or have .to_dict(), got {type(report).__name__}")
    try:
        json.dumps(report)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the report is not JSON-serializable: {exc}") from exc
    return report


def save(model: nn.Module, directory: str | os.PathLike, *, report: Any = None, tokenizer: Any = None) -> Path:
    """Write ``model`` (compressed or not) to ``directory`` as a bondgate checkpoint; return its path.

    ``report`` (a dict or an object with ``.to_dict()``) defaults to ``model.bondgate_report``.
    ``tokenizer`` (keyword-only; anything with ``save_pretrained``, e.g. a transformers tokenizer or processor; a
    ``TypeError`` otherwise) is saved into the same directory with its own ``save_pretrained``. Saving into an
    existing directory replaces its checkpoint — a model's weights files (``model.safetensors``,
    ``pytorch_model.bin``, their shards and indexes), ``config.json``, ``generation_config.json`` and
    ``bondgate.json`` — and keeps everything else (a README, tokenizer files, an adapter, a Trainer's
    ``checkpoint-*`` directories); the new checkpoint appears in one step, the old one
    stays intact if the save fails. A model wrapped in ``nn.DataParallel``, ``DistributedDataParallel`` or
    ``torch.compile`` is saved as the model inside (what ``load`` rebuilds).
    """
    from . import __version__

    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    model = unwrapped(model)
    # a copy made by deploy_int8 / deploy_float, or a part of one: the copy and its converted layers are marked
    deployed = next((m.__dict__["_bondgate_deployed"] for m in model.modules() if "_bondgate_deployed" in m.__dict__),
                    None)
    if deployed is not None:
        why = {"deploy_int8": "torch's dynamic int8 layers are for inference in this process",
               "deploy_float": "its layers hold dense weights in place of the cores"}[deployed]
        raise TypeError(f"cannot save a {deployed} copy: {why}; save the model it was made from and call {deployed} "
                        f"after loading it")
    packed = next((n for n, m in model.named_modules() if "_packed_params" in m._modules), None)
    if packed is not None:  # bondgate.quantize_int8 / torch.ao quantization: packed params, not tensors
        raise TypeError(f"cannot save a model with torch's quantized layers ({packed or 'the model'}: "
                        f"bondgate.quantize_int8, torch.ao's quantize_dynamic or convert), which are for inference in "
                        f"this process; save the float model and quantize after loading, or use compress(..., "
                        f"quantize='int8') for int8 weights on disk")
    directory = Path(directory)
    _no_meta_tensors(model, "save")
    layers, layer_aliases = _collect_layers(model)
    arch = _describe(model, set(layers))
    # before the state dict is made (an int8 layer's would fail to quantize a NaN core without naming it)
    params = dict(model.named_parameters())
    bad = _nonfinite(params, params)
    if bad is not None:  # load() refuses such a checkpoint, so it must not be written
        raise ValueError(f"cannot save: parameter {bad!r} holds NaN or inf values (diverged training?)")
    bad = _kept_ids_problem(model)
    if bad is not None:  # load() refuses them too
        raise ValueError(f"cannot save: {bad} (were they edited in place?)")
    tensors, tensor_aliases = _dedup_state(model)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "bondgate_version": __version__,
        "torch_version": torch.__version__,
        "architecture": arch,
        "layers": layers,
        "layer_aliases": layer_aliases,
        "tensor_aliases": tensor_aliases,
        "report": _report_dict(model, report),
    }
    try:
        # read back as load reads it: a structure nested too deeply, or keys 1 and "1" of a report, save but do not load
        json.loads(json.dumps(meta), object_pairs_hook=_no_duplicates)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint metadata is not JSON-serializable (check the layers' spec()): {exc}") from exc
    except RecursionError:
        raise ValueError("cannot save: the model's nn.Sequential nesting is too deep to be described in JSON and "
                         f"read back under this Python's recursion limit ({sys.getrecursionlimit()})") from None
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"tokenizer must have save_pretrained(), got {type(tokenizer).__name__}")

    from safetensors.torch import save_file

    directory = save_target(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written into a fresh directory beside the target and swapped in at the end: until then the
    # old checkpoint (if any) is untouched, whatever fails.
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".saving", dir=directory.parent))
    try:
        weights = tmp / WEIGHTS_NAME
        save_file(tensors, str(weights), metadata={"format": "pt"})
        os.chmod(weights, 0o666 & ~_umask())  # safetensors writes 0600; the other files follow the umask
        hf = _hf_base()
        if hf is not None and isinstance(model, hf):
            from . import hf as bondgate_hf

            bondgate_hf.attach(model)  # config.json records the layers (quantization_config) for from_pretrained
            # the parameters' dtype now, as transformers' save_pretrained writes it: a config left at None would load
            # in the first tensor's dtype (a gated layer's float64 price, say), one from before a cast in the old one
            model.config.dtype = model.dtype
            model.config.save_pretrained(tmp)
            bondgate_hf.mark_config(tmp / "config.json", architecture=type(model).__name__)
            if callable(getattr(model, "can_generate", None)) and model.can_generate() \
                    and getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)  # as transformers' save_pretrained does
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta["weights"] = {"file": WEIGHTS_NAME, "bytes": weights.stat().st_size, "sha256": _sha256(weights)}
        meta["files"] = {rel: {"bytes": (tmp / rel).stat().st_size, "sha256": _sha256(tmp / rel)}
                         for rel in _files(tmp) if rel != WEIGHTS_NAME}
        meta["meta_sha256"] = _meta_sha256(meta)
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _swap_in(tmp, directory)
    except BaseException:
        _rmtree(tmp)
        raise
    return directory


def save_files(model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None) -> Path:
    """:func:`save`, its files then moved into ``directory`` one by one (``os.replace``; ``bondgate.json``, which
    holds the others' checksums, last) instead of the directory being swapped in whole: for a directory that other
    processes write into meanwhile (a Trainer checkpoint, where every rank adds its RNG state). Other files stay;
    a reader in between sees old and new files, which the checksums refuse."""
    directory = Path(directory).resolve()  # (not replaced whole: the working directory will do)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".saving", dir=directory.parent))
    try:
        written = save(model, tmp / "checkpoint", tokenizer=tokenizer)
        for path in sorted(written.iterdir(), key=lambda p: p.name == META_NAME):
            os.replace(path, directory / path.name)
    finally:
        _rmtree(tmp)
    return directory


def _files(root: Path) -> list[str]:
    """Relative paths of the files under ``root`` (posix separators), sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _meta_sha256(meta: dict) -> str:
    """sha256 of ``meta``'s content without its own checksum (key order and whitespace do not matter)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


#: files of an earlier checkpoint in the target directory that a new save does not carry over: the names a model's
#: save writes for its weights and configs (a dense model's shards would ship beside the compressed one, and
#: transformers would read an index or config.json that no longer matches); any other file is the user's and stays
_STALE = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
          "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack",
          "config.json", "generation_config.json", META_NAME,
          # transformers' variants (save_pretrained(variant="fp16"): model.fp16.safetensors, its shards and index)
          "model.*.safetensors", "model.safetensors.index.*.json", "pytorch_model.*.bin", "pytorch_model.bin.index.*.json",
          # what bondgate versions before the swapped-in directory wrote inside the target
          "model.safetensors.tmp", f"{META_NAME}.tmp")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (no data copied: a Trainer's output directory holds gigabytes of checkpoints), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _swap_in(new: Path, target: Path) -> None:
    """Put the finished checkpoint ``new`` at ``target``. Entries of an existing ``target`` that the new checkpoint
    does not write (a README, tokenizer files of an earlier save, a Trainer's ``checkpoint-*`` directories) are
    carried over, as hard links where the file system allows, except an earlier checkpoint's weights and configs
    (:data:`_STALE`); then the two directories trade places in one atomic exchange where the OS offers it, else by
    two renames (the old one is restored if the second fails)."""
    umask = _umask()
    if not target.exists():
        os.chmod(new, 0o777 & ~umask)
        os.rename(new, target)
        return
    for old in target.iterdir():
        if (new / old.name).exists():
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.copytree(old, new / old.name, symlinks=True, copy_function=_link_or_copy)
        elif any(old.match(pattern) for pattern in _STALE):
            continue
        elif old.is_symlink():
            shutil.copy2(old, new / old.name, follow_symlinks=False)
        else:
            _link_or_copy(str(old), str(new / old.name))
    os.chmod(new, target.stat().st_mode & 0o7777)  # after the carry-over: a read-only target's mode takes no links
    if _exchange(new, target):
        _rmtree(new)  # `new` now holds the old checkpoint
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(backup)
    os.rename(target, backup)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(backup, target)
        raise
    _rmtree(backup)


def _rmtree(path: Path) -> None:
    """Remove ``path``, read-only directories in it included (a 0555 checkpoint swapped out: ``shutil.rmtree``
    alone leaves a full hidden copy beside it); what still cannot go is left, as ``rmtree(ignore_errors=True)``."""
    for root, dirs, _ in os.walk(path):
        for d in (root, *(os.path.join(root, d) for d in dirs if not os.path.islink(os.path.join(root, d)))):
            try:
                os.chmod(d, os.stat(d).st_mode | 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------- load
_KINDS = {"transformers", "sequential", "module", "bondgate_layer"}


def _check_str_map(value: Any, field: str, where: str = META_NAME) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{where}: {field!r} must map strings to strings")
    return value


def _check_layers(layers: Any, layer_aliases: Any, where: str) -> None:
    """``layers`` maps module names to specs of registered types, ``layer_aliases`` second names to saved layers,
    and no layer lies inside another (``where``: the file named in the errors)."""
    if not isinstance(layers, dict):
        raise ValueError(f"{where}: 'layers' must be an object")
    for name, spec in layers.items():
        if not isinstance(spec, dict) or "type" not in spec:
            raise ValueError(f"{where}: the spec of layer {name!r} must be an object with a 'type'")
        if not isinstance(spec["type"], str) or spec["type"] not in LAYER_TYPES:
            raise ValueError(f"unknown layer type {spec['type']!r} for module {name!r} in {where}; "
                             f"registered types: {sorted(LAYER_TYPES)} (see bondgate.register_layer_type)")
    for alias, target in _check_str_map(layer_aliases, "layer_aliases", where).items():
        if target not in layers or alias in layers:
            raise ValueError(f"{where}: layer alias {alias!r} -> {target!r} does not point to a saved layer")
    names = {*layers, *layer_aliases}
    for name in names:
        parts = name.split(".")
        outer = [p for p in ("", *(".".join(parts[:i]) for i in range(1, len(parts)))) if p in names and p != name]
        if outer:
            raise ValueError(f"{where}: layer {name!r} lies inside layer {outer[0]!r}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object, refusing a key given twice (json keeps the last one, a reader of the file may see the first)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r} given twice in one object")
    return out


def _what_it_holds(directory: Path) -> str:
    """Why a directory without ``bondgate.json`` may still be a model, and what reads it (``""``: no config.json)."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(qc, dict) and qc.get("quant_method") == "bondgate":
        return (" (its config.json records bondgate layers: a compressed model written by transformers' own "
                "save_pretrained, a plain Trainer's checkpoint say; AutoModel.from_pretrained reads it after "
                "import bondgate)")
    return " (it has a config.json: a dense Hugging Face model? `bondgate compress --model DIR` compresses it)"


def read_metadata(directory: str | os.PathLike) -> dict:
    """Read and validate ``bondgate.json`` of a checkpoint directory (no tensors are read)."""
    directory = Path(directory)
    if not directory.is_dir():
        if directory.exists():
            raise FileNotFoundError(f"{directory} is a file, not a checkpoint directory")
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    path = directory / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{META_NAME} not found in checkpoint directory: {path}{_what_it_holds(directory)}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except ValueError as exc:  # (not UTF-8, not JSON, a key twice, an integer of thousands of digits)
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise ValueError(f"{path} nests deeper than this Python's recursion limit ({sys.getrecursionlimit()}) "
                         f"allows") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object")
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"unknown checkpoint format {meta.get('format')!r} in {path} (expected {FORMAT_NAME!r})")
    version = meta.get("format_version")
    if version not in READ_VERSIONS or isinstance(version, bool):
        raise ValueError(f"unsupported checkpoint format version {version!r} in {path}; "
                         f"this bondgate reads versions {list(READ_VERSIONS)}")
    if version >= 2:
        want = meta.get("meta_sha256")
        if not isinstance(want, str) or want != _meta_sha256(meta):
            raise ValueError(f"corrupt checkpoint: the content of {path} does not match its checksum (meta_sha256); "
                             f"was it edited by hand or damaged?")
    files = meta.setdefault("files", {})
    if not (isinstance(files, dict) and all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("sha256"), str)
            and isinstance(v.get("bytes"), int) and not isinstance(v["bytes"], bool) for k, v in files.items())):
        raise ValueError(f"{path}: 'files' must map file names to their 'bytes' and 'sha256'")
    for rel in files:
        if rel.startswith("/") or ".." in Path(rel).parts or "\\" in rel:
            raise ValueError(f"{path}: file name {rel!r} leaves the checkpoint directory")
    missing = {"architecture", "layers", "weights"} - set(meta)
    if missing:
        raise ValueError(f"{path} is missing the fields {sorted(missing)}")
    meta.setdefault("layer_aliases", {})
    meta.setdefault("tensor_aliases", {})
    meta.setdefault("report", None)

    arch = meta["architecture"]
    if not isinstance(arch, dict) or arch.get("kind") not in _KINDS:
        kind = arch.get("kind") if isinstance(arch, dict) else arch
        raise ValueError(f"{path}: unknown architecture kind {kind!r}; expected one of {sorted(_KINDS)}")
    if arch["kind"] in ("transformers", "module") and not isinstance(arch.get("class"), str):
        raise ValueError(f"{path}: architecture of kind {arch['kind']!r} needs a 'class' string")

    layers = meta["layers"]
    _check_layers(layers, meta["layer_aliases"], str(path))
    _check_str_map(meta["tensor_aliases"], "tensor_aliases")
    if arch["kind"] == "bondgate_layer" and "" not in layers:
        raise ValueError(f"{path}: a checkpoint of kind 'bondgate_layer' needs the layer '' in 'layers'")

    w = meta["weights"]
    if not (isinstance(w, dict) and isinstance(w.get("sha256"), str) and len(w["sha256"]) == 64
            and isinstance(w.get("bytes"), int) and not isinstance(w["bytes"], bool)):
        raise ValueError(f"{path}: 'weights' must hold 'sha256' (64 hex digits) and 'bytes' (an int)")
    return meta


def _verify_file(directory: Path, rel: str, record: dict, transformers: bool) -> None:
    path = directory / rel
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path} (listed in {META_NAME})")
    size, want = path.stat().st_size, record["bytes"]
    if size != want:
        raise ValueError(f"{path} is not the file bondgate saved: {size} bytes, {META_NAME} records {want}"
                         + _remedy(directory, rel, transformers))
    if _sha256(path) != record["sha256"].lower():
        raise ValueError(f"{path} is not the file bondgate saved: its sha256 differs from the one {META_NAME} records"
                         + _remedy(directory, rel, transformers))


def _remedy(directory: Path, rel: str, transformers: bool) -> str:
    """A file that differs from the record is damaged, or (a transformers model's directory) was saved into again
    after bondgate saved it (by transformers' save_pretrained, a tokenizer's or generation config's, an edit): say
    what to do in either case."""
    damaged = ". The file is damaged (a truncated copy, a bad disk) or was changed after bondgate saved it"
    if not transformers:
        return damaged + ": save the model again, or copy the checkpoint again from where it came"
    delete = f"delete {directory / META_NAME}"
    # the weights file is checked first: another file differing means it is still bondgate's; beside the index of
    # transformers' sharded save it is stale, and from_pretrained reads it before the shards
    index = "model.safetensors.index.json"
    if rel != WEIGHTS_NAME and (directory / index).is_file():
        delete += (f" and the stale {directory / WEIGHTS_NAME} (bondgate's weights: transformers' save_pretrained "
                   f"wrote shards since, listed in {index}, and from_pretrained would read {WEIGHTS_NAME} first)")
    return (f"{damaged}: if the directory was saved into again after bondgate.save_pretrained (transformers' or a "
            f"tokenizer's save_pretrained, an edited config.json), save the model again with "
            f"bondgate.save_pretrained, or {delete} to load the directory as transformers wrote it (from_pretrained "
            f"after `import bondgate`)")


def _verify_files(directory: Path, meta: dict) -> None:
    """Size and sha256 of the weights file and of every other file the checkpoint lists (config.json, the
    tokenizer's), before any of them is read."""
    if not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"weights file not found: {directory / WEIGHTS_NAME}")
    transformers = meta["architecture"]["kind"] == "transformers"
    for rel, record in [(WEIGHTS_NAME, meta["weights"]), *meta["files"].items()]:
        _verify_file(directory, rel, record, transformers)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _weights_header(directory: Path, meta: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """``{key: (shape, dtype)}`` of every tensor the checkpoint holds (aliases included), read from the
    safetensors header alone: no tensor data is read or allocated."""
    path = directory / WEIGHTS_NAME
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= path.stat().st_size - 8:
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n))
        entries = {k: (tuple(int(d) for d in v["shape"]), _ST_DTYPES.get(v["dtype"]))
                   for k, v in header.items() if k != "__metadata__"}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt checkpoint: cannot read the header of {path}: {exc}") from exc
    for alias, target in meta["tensor_aliases"].items():
        if target not in entries or alias in entries:
            raise ValueError(f"{META_NAME}: tensor alias {alias!r} -> {target!r} does not point to a stored tensor")
        entries[alias] = entries[target]
    return entries


def _check_against_header(state: dict[str, torch.Tensor], header: dict, adapt_dtypes: bool) -> None:
    """Keys, shapes and (unless ``adapt_dtypes``) dtypes of a model's state (meta tensors will do) against the
    weights file's header: what :func:`load` checks before it allocates the skeleton."""
    missing, unexpected = set(state) - set(header), set(header) - set(state)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing keys {_short(missing)}, "
                         f"unexpected keys {_short(unexpected)}")
    for key, t in state.items():
        shape, dtype = header[key]
        if shape != tuple(t.shape):
            raise ValueError(f"shape mismatch for {key!r}: checkpoint has {shape}, model expects {tuple(t.shape)}")
        if dtype is not None and dtype != t.dtype and not (adapt_dtypes and dtype.is_floating_point
                                                            and t.dtype.is_floating_point):
            raise ValueError(f"dtype mismatch for {key!r}: checkpoint has {dtype}, model has {t.dtype}")


def verify_checkpoint(directory: str | os.PathLike) -> dict:
    """``bondgate.json`` of the checkpoint in ``directory`` once every file it lists has its recorded size and
    sha256 (a ``ValueError`` naming the first that does not)."""
    meta = read_metadata(directory)
    _verify_files(Path(directory), meta)
    return meta


def read_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict a checkpoint holds (tied tensors under each of their names), its files' checksums verified:
    for ``model.load_state_dict`` into the model it was saved from (a Trainer resuming), where :func:`load` would
    build new layers."""
    return _read_tensors(Path(directory), verify_checkpoint(directory))


def _read_tensors(directory: Path, meta: dict) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint (aliases included, sharing their target's tensor), on the CPU; the
    files must have been verified (:func:`_verify_files`)."""
    path = directory / WEIGHTS_NAME
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"corrupt or truncated checkpoint: cannot read {path}: {exc}") from exc
    stored = set(tensors)
    for alias, target in meta["tensor_aliases"].items():
        if target not in stored or alias in stored:
            raise ValueError(f"{META_NAME}: tensor alias {alias!r} -> {target!r} does not point to a stored tensor")
        tensors[alias] = tensors[target]
    return tensors


def _transformers_skeleton(directory: Path, arch: dict) -> nn.Module:
    transformers = _import_transformers()
    name = arch["class"]
    # Only public names of the transformers namespace that are model classes: nothing else is imported.
    cls = None
    if name.isidentifier() and not name.startswith("_"):
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # noqa: BLE001 - the lazy module may fail to import an optional backend
            cls = None
    if cls is None:
        raise ValueError(f"unknown transformers class {name!r} in {META_NAME}")
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)) or cls.config_class is None:
        raise ValueError(f"{name!r} in {META_NAME} is not a transformers model class (PreTrainedModel subclass)")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"config.json not found in checkpoint directory: {config_path}")
    try:
        config = cls.config_class.from_pretrained(str(directory))
    except (ValueError, OSError, TypeError) as exc:
        raise ValueError(f"cannot read {config_path} as a {cls.config_class.__name__}: {exc}") from exc
    attn = arch.get("attn_implementation")
    model = None
    with torch.random.fork_rng(devices=[]):  # building initializes weights; keep the caller's RNG stream
        if isinstance(attn, str):
            try:
                model = cls._from_config(config, attn_implementation=attn)
            except (ValueError, ImportError) as exc:
                warn_user(f"attention implementation {attn!r} unavailable ({exc}); using the default")
        if model is None:
            model = cls._from_config(config)
    if (directory / "generation_config.json").is_file() and model.can_generate():
        try:  # generate()'s settings (max_new_tokens, eos, penalties ...), as from_pretrained reads them
            model.generation_config = transformers.GenerationConfig.from_pretrained(str(directory))
        except (ValueError, OSError, TypeError) as exc:
            raise ValueError(f"cannot read {directory / 'generation_config.json'}: {exc}") from exc
    return model


def _skeleton(directory: Path, meta: dict, device: str | None = None) -> nn.Module:
    """The dense model the checkpoint's layers go into, rebuilt from its description (on ``device``)."""
    arch = meta["architecture"]
    with torch.device(device) if device else contextlib.nullcontext():
        if arch["kind"] == "transformers":
            return _transformers_skeleton(directory, arch)
        with torch.random.fork_rng(devices=[]):  # building initializes weights; keep the caller's RNG stream
            return _build_sequential(arch, {*meta["layers"], *meta["layer_aliases"]})


def _features(mod: nn.Module) -> dict[str, Any]:
    """The sizes a module's replacement must keep (``in_features``, ``out_features``, ``num_embeddings``,
    ``embedding_dim``; a recurrent module's ``input_size``, ``hidden_size``, ``num_layers`` and structure, see
    :func:`bondgate.recurrent.structure`), as far as the module tells them."""
    sizes = {k: getattr(mod, k) for k in ("in_features", "out_features", "num_embeddings", "embedding_dim",
                                          "input_size", "hidden_size", "num_layers")
             if isinstance(getattr(mod, k, None), int)}
    from .recurrent import structure

    sizes.update(structure(mod))  # a recurrent module: also its cell, bias, batch_first, bidirectional, proj_size
    w = getattr(mod, "weight", None)
    if not sizes and type(mod).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:
        sizes = {"in_features": int(w.shape[0]), "out_features": int(w.shape[1])}  # transformers' Conv1D: (in, out)
    return sizes


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside torch's wrappers — ``nn.DataParallel`` / ``DistributedDataParallel`` (``.module``) and
    ``torch.compile`` (``._orig_mod``) — which is what a checkpoint holds, as transformers' ``save_pretrained``
    saves the model a Trainer wrapped: saved with the wrapper, its names (``module.``, ``_orig_mod.``) would fit
    neither ``load`` nor the dense model. Only the outermost wrappers: a wrapped submodule keeps its names."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif (dynamo := sys.modules.get("torch._dynamo.eval_frame")) is not None \
                and isinstance(model, dynamo.OptimizedModule):  # (imported by torch.compile, so by any such model)
            model = model._orig_mod
        else:
            return model


def _no_meta_tensors(model: nn.Module, what: str) -> None:
    """``ValueError`` naming a tensor of ``model`` on the meta device (no data: a save cannot read it, a load's copy
    into it does nothing)."""
    # named_parameters and persistent buffers, not state_dict(): an int8 layer's state_dict() quantizes its cores
    tensors = [*model.named_parameters(remove_duplicate=False),
               *((n, b) for n, b in model.named_buffers(remove_duplicate=False)
                 if n.rpartition(".")[2] not in model.get_submodule(n.rpartition(".")[0])._non_persistent_buffers_set)]
    key = next((k for k, t in tensors if t.device.type == "meta"), None)
    if key is not None:
        raise ValueError(f"cannot {what} a model with tensors on the meta device ({key!r} has no data): "
                         f"materialize it first, e.g. model.to_empty(device='cpu')")


def _check_replaced(model: nn.Module, shells: dict[str, nn.Module], rebuilt_sequential: bool = False) -> None:
    """Every module the checkpoint replaces exists, states every size of the layer that replaces it (a layer of
    another kind — a block, a convolution, an ``nn.Identity`` — states none) and has those sizes.
    ``rebuilt_sequential``: ``model`` is :func:`_build_sequential`'s, an ``nn.Identity`` placeholder at each layer."""
    for name, shell in shells.items():
        if name == "":
            continue
        parent, _, child = name.rpartition(".")
        try:
            owner = model.get_submodule(parent)
        except AttributeError:
            owner = None
        old = None if owner is None else owner._modules.get(child)
        if old is None:
            raise ValueError(f"the checkpoint replaces module {name!r}, but the model has no such module")
        if rebuilt_sequential and type(old) is nn.Identity:
            continue
        have, want = _features(old), _features(shell)
        if not want.keys() <= have.keys():
            raise ValueError(f"module {name!r} of the model is a {type(old).__name__}, which the checkpoint's "
                             f"{type(shell).__name__} cannot replace (it does not have "
                             f"{', '.join(sorted(want.keys() - have.keys()))}): a model of another architecture?")
        wrong = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        if wrong:
            raise ValueError(f"module {name!r} of the model ({type(old).__name__}) does not fit the checkpoint's layer: "
                             + ", ".join(f"{k} {a} in the model, {b} in the checkpoint" for k, (a, b) in wrong.items()))


def save_target(directory: Path) -> Path:
    """The directory :func:`save` writes for ``directory`` (a link or ``..`` resolved); ``ValueError`` for the working
    directory or one of its parents (a checkpoint directory is replaced as a whole)."""
    if directory.is_symlink() or directory.name in ("", ".", "..") or ".." in directory.parts:
        directory = directory.resolve()  # a link: write beside what it points to (the link stays); "..": its parent
    cwd, real = Path.cwd().resolve(), directory.resolve()  # (a link among the parents reaches the cwd too)
    if real == cwd or real in cwd.parents:
        raise ValueError(f"cannot save into {directory}: it is the working directory or one of its parents (a "
                         "checkpoint directory is replaced as a whole); give a subdirectory")
    return directory


def _nonfinite(state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> str | None:
    """The first parameter of ``state`` whose values in ``tensors`` are not all finite, else None."""
    for key, t in state.items():
        src = tensors.get(key)
        if isinstance(t, nn.Parameter) and src is not None and src.is_floating_point() \
                and src.device.type != "meta" and not bool(torch.isfinite(src).all()):
            return key
    return None


def _check_finite(state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], new: dict[str, nn.Module]) -> None:
    """Parameters must be finite: a NaN weight would only show up as NaN outputs much later. Of an int8 core of
    the layers ``new``, its scales and the values they give in the layer's dtype (checked here, before the model is
    touched)."""
    key = _nonfinite(state, tensors)
    if key is not None:
        raise ValueError(f"corrupt checkpoint: parameter {key!r} holds NaN or inf values")
    dtypes = {f"{name}.{k}".lstrip("."): p.dtype for name, layer in new.items() for k, p in layer.named_parameters()}
    for skey, scale in tensors.items():
        dtype = dtypes.get(skey.removesuffix(SCALE_SUFFIX)) if skey.endswith(SCALE_SUFFIX) else None
        q = tensors.get(skey.removesuffix(SCALE_SUFFIX))
        if dtype is not None and isinstance(q, torch.Tensor) and q.dtype == torch.int8:
            problem = scale_problem(skey, q, scale, dtype)
            if problem is not None:
                raise ValueError(f"corrupt checkpoint: {problem}")


def _kept_ids_problem(model: nn.Module, tensors: dict[str, torch.Tensor] | None = None, prefix: str = "") -> str | None:
    """The first ``MPOEmbedding`` in ``model`` whose ``kept_ids`` (in ``tensors``, by state-dict key, if given) are not
    increasing ids of its table, as a message, else None (``load_state_dict`` would refuse them after copying the
    rest of a model's tensors)."""
    from .embedding import MPOEmbedding, kept_ids_problem

    for name, mod in model.named_modules(prefix=prefix):
        if isinstance(mod, MPOEmbedding) and mod.kept_ids is not None:
            key = _join(name, "kept_ids")
            problem = kept_ids_problem(mod.kept_ids if tensors is None else tensors[key], mod.num_embeddings)
            if problem is not None:
                return f"{key!r} of the MPOEmbedding {name or '<root>'!r} {problem}"
    return None


def _virtual_state(model: nn.Module, new: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The ``state_dict(keep_vars=True)`` that ``model`` would have after swapping in ``new``."""
    if "" in new:
        return dict(new[""].state_dict(keep_vars=True))
    state = {}
    for key, t in model.state_dict(keep_vars=True).items():
        parts = key.split(".")
        if not any(".".join(parts[:i]) in new for i in range(1, len(parts))):
            state[key] = t
    for name, layer in new.items():
        state.update(layer.state_dict(prefix=name + ".", keep_vars=True))
    return state


def _saved_form(model: nn.Module, new: dict[str, nn.Module], header: dict):
    """Which state-dict form the weights file holds: :func:`bondgate.quant.master_state` when its keys are those of
    the int8 layers' full-precision masters (a checkpoint saved inside it, as training checkpoints are) rather than
    of their int8 cores and scales, else a null context."""
    if set(_virtual_state(model, new)) != set(header):
        with master_state():
            if set(_virtual_state(model, new)) == set(header):
                return master_state
    return contextlib.nullcontext


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _tensor_ident(t: torch.Tensor) -> tuple | None:
    if t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _validate(state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], meta: dict,
              adapt_dtypes: bool) -> None:
    missing, unexpected = set(state) - set(tensors), set(tensors) - set(state)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing keys {_short(missing)}, "
                         f"unexpected keys {_short(unexpected)}")
    for key, t in state.items():
        src = tensors[key]
        if tuple(src.shape) != tuple(t.shape):
            raise ValueError(f"shape mismatch for {key!r}: checkpoint has {tuple(src.shape)}, "
                             f"model expects {tuple(t.shape)}")
        if src.dtype != t.dtype:
            if adapt_dtypes and src.is_floating_point() and t.is_floating_point():
                t.data = t.data.to(src.dtype)  # our own skeleton: follow the saved precision
            else:
                raise ValueError(f"dtype mismatch for {key!r}: checkpoint has {src.dtype}, model has {t.dtype}")
    # A tie in the model that the checkpoint does not share would make the copies overwrite each other.
    aliases = meta["tensor_aliases"]
    groups: dict[tuple, list[str]] = {}
    for key, t in state.items():
        ident = _tensor_ident(t)
        if ident is not None:
            groups.setdefault(ident, []).append(key)
    for keys in groups.values():
        roots = {aliases.get(k, k) for k in keys}
        if len(roots) > 1:
            raise ValueError(f"the model ties {_short(keys)} but the checkpoint stores them as separate tensors")


def _tie(model: nn.Module, key: str, target_key: str) -> None:
    """Make ``key`` refer to the same parameter/buffer object as ``target_key`` (checkpoint ties)."""
    def owner(k: str) -> tuple[nn.Module, str]:
        mod, _, name = k.rpartition(".")
        return model.get_submodule(mod), name

    m, name = owner(key)
    tm, tname = owner(target_key)
    if name in m._parameters and tname in tm._parameters:
        if m._parameters[name] is not tm._parameters[tname]:
            m._parameters[name] = tm._parameters[tname]
    elif name in m._buffers and tname in tm._buffers:
        if m._buffers[name] is not tm._buffers[tname]:
            m._buffers[name] = tm._buffers[tname]


@outside_inference_mode  # loaded inside inference mode (a server), the model still gets normal tensors, whose
# version counters let the layers reuse their kept operands between calls instead of rebuilding them on each
def load(directory: str | os.PathLike, model: nn.Module | None = None, *,
         map_location: str | torch.device = "cpu", dtype: torch.dtype | str | None = None) -> nn.Module:
    """Load a checkpoint written by :func:`save`; returns the model in eval mode.

    Without ``model`` the skeleton is rebuilt from the checkpoint (transformers models, plain
    ``nn.Sequential`` trees and bare bondgate layers), cast to ``dtype`` if given (see :func:`from_pretrained`)
    and moved to ``map_location``. With ``model``
    (required for any other module: pass a freshly constructed *dense* instance), its modules named
    in the checkpoint are replaced by bondgate layers (placed on the device of the module they
    replace) and all tensors are loaded into it in place; ``map_location`` is then unused. A ``model``
    in ``nn.DataParallel`` or ``torch.compile`` is loaded inside the wrapper and returned wrapped (DDP is refused: wrap
    the loaded model). Every
    check (JSON, file integrity, keys, shapes, dtypes) runs before ``model`` is modified, so a
    failed load leaves it untouched.

    Raises:
        FileNotFoundError: the directory, ``bondgate.json``, ``model.safetensors`` or ``config.json``
            is missing.
        ValueError: unknown format/version/layer type/class, corrupt or truncated weights, or a
            checkpoint that does not fit the model (key, shape or dtype).
    """
    directory = Path(directory)
    dtype = _floating_dtype(dtype)
    built = model is None
    if built and map_location is not None:  # before the files are read and the model built (torch's errors came at
        map_location = _target_device(map_location)  # the end); None: where it is built, the CPU, as model.to(None)
    meta = verify_checkpoint(directory)
    header = _weights_header(directory, meta)
    arch = meta["architecture"]
    if not built and dtype is not None:
        raise ValueError("dtype applies to a model load rebuilds: the checkpoint loads into the dtypes of the model "
                         "you pass (cast it before or after)")
    if not built and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):  # it registered the parameters it was built with
        raise TypeError("load into the model itself, then wrap it in DistributedDataParallel: DDP would not "
                        "synchronize the gradients of the layers load puts in")
    given = model
    if not built:  # the checkpoint's names are those of the model inside DataParallel / torch.compile (save's too)
        model = unwrapped(model)
    if built and arch["kind"] == "module":
        raise ValueError(f"this checkpoint holds a {arch['class']}, which bondgate cannot rebuild by itself"
                         + (f" ({arch['why']})" if isinstance(arch.get("why"), str) else "") + "; "
                         "pass model=<a freshly constructed dense instance> to load()")
    if not built and "" in meta["layers"]:
        raise ValueError("this checkpoint holds a single bondgate layer; call load() without model=")
    if not built:
        _no_meta_tensors(model, "load into")

    # Shapes first, on the meta device: a checkpoint that does not fit allocates nothing (a 14 KB JSON
    # naming a 2 GB core, or a config.json describing a huge model, fails here).
    shells = _build_layers(meta, device="meta")
    skeleton = model if not built else shells[""] if arch["kind"] == "bondgate_layer" else _skeleton(
        directory, meta, device="meta")
    _check_replaced(skeleton, shells, rebuilt_sequential=built and arch["kind"] == "sequential")
    # int8 layers' tensors as int8 cores + scales, or their full-precision masters (saved inside master_state)
    saved_form = _saved_form(skeleton, shells, header)
    with saved_form():
        _check_against_header(_virtual_state(skeleton, shells), header, adapt_dtypes=built)

    tensors = _read_tensors(directory, meta)
    new = _build_layers(meta)
    if built:
        model = new[""] if arch["kind"] == "bondgate_layer" else _skeleton(directory, meta)
    if not built:
        from .recurrent import Recurrent

        for name in new:
            old = model.get_submodule(name)
            was, now = _floating_dtypes(old), _floating_dtypes(new[name])
            # (a kept dense tensor is checked by _validate; a layer of several floating dtypes, e.g. float32 scales
            # beside bfloat16 weights, is left to the tensors' own checks)
            if len(was) == len(now) == 1 and was != now:
                (was,), (now,) = was, now
                raise ValueError(f"dtype mismatch for {name!r}: checkpoint has {now}, model has {was} "
                                 f"({type(old).__name__}): load into a model of the checkpoint's dtypes and cast it "
                                 f"after, or load without model= and pass dtype=")
            device = _module_device(old)
            if device is not None:
                new[name].to(device)
            if isinstance(new[name], Recurrent) and isinstance(old, (nn.RNNBase, Recurrent)):
                new[name].dropout = float(old.dropout)  # a training setting, not structure: the given model's wins
    with saved_form():
        _validate(_virtual_state(model, new), tensors, meta, adapt_dtypes=built)
        _check_finite(_virtual_state(model, new), tensors, new)
        for name, layer in new.items():
            bad = _kept_ids_problem(layer, tensors, name)
            if bad is not None:
                raise ValueError(f"corrupt checkpoint: {bad}")

    # ---- everything is checked: modify the model. With keys, shapes, dtypes and values verified the copy
    # cannot fail for a data reason; should it fail anyway, at least the module swaps are undone. A model
    # built under torch.inference_mode holds inference tensors, which only take writes inside it.
    frozen = any(t.is_inference() for t in model.state_dict().values())
    with torch.inference_mode(frozen):
        if "" not in new:
            old = {name: model.get_submodule(name) for name in new}
            try:
                for name, layer in new.items():
                    freeze_like(trains(old[name]), layer)
                    _set_submodule(model, name, layer)
                model.load_state_dict(tensors, strict=True)
            except BaseException:
                for name, mod in old.items():
                    _set_submodule(model, name, mod)
                raise
        else:
            model.load_state_dict(tensors, strict=True)
    for alias, target in meta["tensor_aliases"].items():
        _tie(model, alias, target)
    for cls in {type(m) for m in new.values()}:  # model-level state of a layer type (gating's price trackers)
        if callable(getattr(cls, "after_load", None)):
            cls.after_load(model)
    if built:
        if dtype is not None:
            _cast_floating(model, dtype)
        model.to(map_location)
    _attach_report(model, meta.get("report"))
    hf = _hf_base()
    if hf is not None and isinstance(model, hf):
        from .hf import attach

        attach(model)  # model.save_pretrained (transformers') writes a directory from_pretrained reads back
    return model.eval() if built else given.eval()


def _floating_dtypes(module: nn.Module) -> set[torch.dtype]:
    """The dtypes of ``module``'s floating parameters (lazy ones, not materialized yet, left out)."""
    return {p.dtype for p in module.parameters()
            if not isinstance(p, nn.parameter.UninitializedParameter) and p.is_floating_point()}


def _attach_report(model: nn.Module, report: Any) -> None:
    """The saved compression report back on ``model.bondgate_report``, so that load -> train -> save keeps it.
    A report that is not :func:`compress`'s (``save(..., report=any dict)``) is left in the file only."""
    from .surgery import CompressionReport

    if isinstance(report, dict) and isinstance(report.get("layers"), list) \
            and all(isinstance(r, dict) for r in report["layers"]):
        try:
            model.bondgate_report = CompressionReport.from_dict(report)
        except (TypeError, ValueError):
            pass


# ---------------------------------------------------------------------------------------- HF aliases
def save_pretrained(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None, *,
                    report: Any = None) -> Path:
    """:func:`save` for a (compressed) Hugging Face ``PreTrainedModel``.

    The directory is a bondgate checkpoint (config.json + model.safetensors + bondgate.json): read it back with
    :func:`from_pretrained`, or with ``AutoModel.from_pretrained`` (and so sentence-transformers) in a process that
    imported bondgate (:mod:`bondgate.hf`) — except a model with int8 cores, which only :func:`from_pretrained`
    reads (transformers would load the int8 values into float parameters).

    ``tokenizer`` (the third positional argument, or by keyword; anything with ``save_pretrained``): saved into the
    same directory, as :func:`save` does, so that ``AutoTokenizer.from_pretrained(directory)`` reads it.
    ``report``: as in :func:`save` (default ``model.bondgate_report``).
    """
    hf = _hf_base()
    model = unwrapped(model)
    if hf is None or not isinstance(model, hf):
        raise TypeError(f"save_pretrained expects a transformers PreTrainedModel, got {type(model).__name__}; "
                        f"use bondgate.save for other models")
    return save(model, directory, report=report, tokenizer=tokenizer)


def from_pretrained(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = None) -> nn.Module:
    """Load a checkpoint written by :func:`save_pretrained` (the transformers model, in eval mode).

    ``map_location``: the device (``"cpu"``, ``"cuda:0"``, a ``torch.device``) the rebuilt model is moved to after
    loading (default ``"cpu"``). ``dtype``: a floating dtype (``torch.bfloat16`` or ``"bfloat16"``) to cast the
    floating tensors to, before the move, as ``AutoModel.from_pretrained(dtype=...)`` does: tensors the model's class
    keeps in float32 at that dtype (``_keep_in_fp32_modules``, e.g. T5's ``wo``) go to float32 whatever the saved
    dtype, and buffers that are not saved (the rotary ``inv_freq``) stay as built; ``None`` or ``"auto"`` (default)
    keeps the saved dtypes. An int8-core model cast to 16 bits re-rounds its cores (and warns; see
    README's limits). Tokenizer files, if saved, load with ``AutoTokenizer.from_pretrained(directory)``.
    """
    path = Path(directory)
    if path.is_dir() and not (path / META_NAME).is_file() and (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no {META_NAME}: it was not written by bondgate.save_pretrained (a dense "
                                f"model loads with transformers; a compressed one saved by transformers' own "
                                f"save_pretrained loads with AutoModel.from_pretrained after import bondgate, unless "
                                f"it has int8 cores, which only bondgate.save_pretrained can save)")
    meta = read_metadata(directory)
    if meta["architecture"]["kind"] != "transformers":
        raise TypeError(f"{directory} holds a {meta['architecture']['kind']!r} checkpoint, not a transformers "
                        f"model; use bondgate.load")
    return load(directory, map_location=map_location, dtype=dtype)


def _target_device(map_location: Any) -> torch.device:
    """``map_location`` as a device a rebuilt model can be moved to: one torch knows and this machine has (``meta``
    too: the model's structure without its data)."""
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as exc:
        # (torch.device(0) is the accelerator's first device, refused by torch when the machine has none)
        what = "is not available on this machine" if isinstance(map_location, int) else \
            "must be a device such as 'cpu', 'cuda:0' or a torch.device, got"
        raise ValueError(f"map_location {what} {map_location!r} ({str(exc).splitlines()[0]})") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # CPU-only torch asserts "not compiled with CUDA enabled"
        raise ValueError(f"map_location {str(device)!r} is not available on this machine: {exc}") from None
    return device


def _floating_dtype(dtype: Any) -> torch.dtype | None:
    """``dtype`` as a floating ``torch.dtype`` (its name accepted), or None for ``None`` / ``"auto"``."""
    if dtype is None or dtype == "auto":
        return None
    found = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(found, torch.dtype) or not found.is_floating_point or found.itemsize < 2:
        raise ValueError(f"dtype must be a floating torch dtype of 16 bits or more (torch.bfloat16, 'float16', ...) "
                         f"or 'auto', got {dtype!r}")
    return found


def _cast_floating(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating parameters and saved buffers to ``dtype`` in place, as transformers loads at a dtype:
    the tensors its class keeps in float32 at that dtype (T5's ``wo``, RWKV's ``time_decay``; a tensor tied under
    several names if any of them is kept) to float32, buffers that are not saved (the rotary ``inv_freq``) left as
    built. A bondgate layer is cast whole (its ``_apply`` resets its kept operands), to float32 where transformers
    would keep the dense layer's weight."""
    from .hf import _fp32_keys

    fp32 = _fp32_keys(model, dtype)
    registered = tuple(LAYER_TYPES.values())
    layers: list[tuple[str, nn.Module]] = []
    modules: list[tuple[str, nn.Module]] = []

    def visit(mod: nn.Module, path: str) -> None:
        if isinstance(mod, registered):
            layers.append((path, mod))
            return
        for name, child in mod._modules.items():
            if child is not None:
                visit(child, _join(path, name))
        modules.append((path, mod))

    visit(model, "")
    kept: set[int] = set()  # ids of the tensors (and their gradients) that go to float32
    for path, mod in layers:
        if fp32(_join(path, "weight")):
            kept.update(id(t) for p in mod.parameters() for t in (p, p.grad) if t is not None)
            kept.update(id(b) for b in mod.buffers())
    for path, mod in modules:
        kept.update(id(t) for n, p in mod._parameters.items() if p is not None and fp32(_join(path, n))
                    for t in (p, p.grad) if t is not None)
        kept.update(id(b) for n, b in mod._buffers.items() if b is not None and fp32(_join(path, n)))

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32 if id(t) in kept else dtype) if t.is_floating_point() else t

    for _, mod in layers:
        mod._apply(cast)
    for _, mod in modules:
        unsaved = {n: mod._buffers[n] for n in mod._non_persistent_buffers_set if mod._buffers.get(n) is not None}
        mod._apply(cast, recurse=False)
        mod._buffers.update(unsaved)  # as the model built them, as transformers leaves them
    hf = _hf_base()
    if hf is not None and isinstance(model, hf):  # recorded as transformers records it (saved into config.json)
        config = model.config
        for c in [config, *(getattr(config, k, None) for k in getattr(config, "sub_configs", None) or ())]:
            if c is not None:
                c.dtype = dtype
