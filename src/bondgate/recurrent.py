"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) with every weight matrix a module of its own.

torch's recurrent modules keep their weights as flat parameters fed to one fused kernel, so there is no
``nn.Linear`` for :func:`bondgate.compress` to replace. :class:`Recurrent` computes the same function with
each matrix an ordinary layer, named after the torch parameter it holds::

    ih_l{k}[_reverse]   the input projection of layer k   (gates * hidden, input)   weight_ih_l{k} + bias_ih_l{k}
    hh_l{k}[_reverse]   the recurrent projection           (gates * hidden, hidden)  weight_hh_l{k} + bias_hh_l{k}
    hr_l{k}[_reverse]   an LSTM's output projection        (proj_size, hidden)       weight_hr_l{k}, no bias

(gates: 4 for an LSTM, in torch's order i, f, g, o; 3 for a GRU, r, z, n; 1 for an RNN). Any of them can then
be an :class:`~bondgate.MPOLinear`, a :class:`~bondgate.LowRankLinear` or a gated layer. The input projection
runs once for the whole sequence (``length * batch`` rows, where a factored layer pays off); the recurrent one
runs per time step on ``batch`` rows. :func:`bondgate.compress` converts the recurrent modules it targets and
puts back torch's fused module where every matrix stays dense.

Inputs and outputs are torch's: ``(L, N, H_in)`` (``(N, L, H_in)`` with ``batch_first``), unbatched ``(L, H_in)``,
or a ``PackedSequence``; ``hx`` (an ``(h_0, c_0)`` pair for an LSTM) is ``(D * num_layers, N, H_out)``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ._checks import number
from ._warn import warn_user
from .io import LAYER_TYPES, _set_submodule, register_layer_type
from .layer import _refuse_script

__all__ = ["Recurrent", "RECURRENT_TYPES", "structure", "unroll", "reroll"]

#: torch modules :class:`Recurrent` replaces, by mode.
RECURRENT_TYPES: dict[str, type[nn.RNNBase]] = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@functools.lru_cache(maxsize=64)
def _projection_names(num_layers: int, bidirectional: bool, proj_size: int) -> tuple[str, ...]:
    return tuple(f"{kind}_l{k}{sfx}" for k in range(num_layers) for sfx in (("", "_reverse") if bidirectional else ("",))
            for kind in (("ih", "hh", "hr") if proj_size else ("ih", "hh")))


def _param_names(projection: str) -> tuple[str, str]:
    """torch's weight and bias names of a projection: ``ih_l0_reverse`` -> ``weight_ih_l0_reverse``, ``bias_...``."""
    return f"weight_{projection}", f"bias_{projection}"


def _linear_spec(layer: nn.Linear) -> dict:
    return {"type": "Linear", "in_features": layer.in_features, "out_features": layer.out_features,
            "bias": layer.bias is not None, "dtype": str(layer.weight.dtype).removeprefix("torch.")}


def _size(layer: nn.Module, attr: str) -> int | None:
    value = getattr(layer, attr, None)
    return value if isinstance(value, int) else None


class Recurrent(nn.Module):
    """A multi-layer LSTM / GRU / Elman RNN whose weight matrices are separate modules (see the module doc).

    Built by :meth:`from_torch` (sharing the torch module's parameters) or like ``nn.LSTM``; ``forward`` has
    torch's signature and results (to float rounding).

    Constructor, with torch's meanings and defaults: ``mode``: ``"LSTM"``, ``"GRU"`` or ``"RNN"`` (uppercase, as
    torch's class names; the Elman RNN's activation is ``nonlinearity``). ``input_size``: features of the
    input. ``hidden_size``: features of the hidden state. ``num_layers``: stacked layers (default 1). ``bias``:
    the ``ih`` / ``hh`` projections have biases (default True). ``batch_first``: inputs and outputs are ``(N, L,
    H)`` instead of ``(L, N, H)`` (``hx`` is not affected). ``dropout``: dropout probability in ``[0, 1]`` on the
    outputs of every layer but the last, in training. ``bidirectional``: run each layer in both directions
    (outputs concatenated: ``2 * output_size`` features). ``proj_size``: an LSTM's output projection size (0 = none;
    ``< hidden_size``). ``nonlinearity``: ``"tanh"`` or ``"relu"``, for ``mode="RNN"`` only. ``dtype``: of the
    projections' parameters (default ``torch.get_default_dtype()``). Every weight and bias is drawn from
    ``U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``, as torch does. The projections are plain ``nn.Linear``.
    """

    __prepare_scriptable__ = _refuse_script  # torch.jit.script: a clear refusal

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, nonlinearity: str = "tanh", dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if mode not in _GATES:
            raise ValueError(f"mode must be one of {sorted(_GATES)}, got {mode!r}")
        input_size, hidden_size = number(input_size, "input_size", low=1, integer=True), number(
            hidden_size, "hidden_size", low=1, integer=True)
        num_layers = number(num_layers, "num_layers", low=1, integer=True)
        proj_size = number(proj_size, "proj_size", low=0, integer=True)
        if proj_size and (mode != "LSTM" or proj_size >= hidden_size):
            raise ValueError(f"proj_size needs mode='LSTM' and proj_size < hidden_size, got {proj_size} "
                             f"(mode {mode!r}, hidden_size {hidden_size})")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        if nonlinearity != "tanh" and mode != "RNN":  # nn.LSTM / nn.GRU have no such option (torch: a TypeError)
            raise ValueError(f"nonlinearity={nonlinearity!r} is an option of mode='RNN' only, not of {mode!r}")
        for flag, value in (("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional)):
            if isinstance(value, str) or value not in (0, 1, None):  # bool("no") is True: a string built biases
                raise TypeError(f"{flag} must be True or False, got {value!r}")
        dropout = number(dropout, "dropout", low=0, high=1)
        if dropout > 0 and num_layers == 1:
            warn_user(f"Recurrent: dropout={dropout} with num_layers=1 does nothing (as in torch, dropout is applied "
                      f"between layers, not after the last)")
        self.fused = True
        self.mode, self.input_size, self.hidden_size, self.num_layers = mode, input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.bidirectional, self.proj_size, self.nonlinearity = bool(bidirectional), proj_size, nonlinearity
        gates = _GATES[mode] * hidden_size
        out = proj_size or hidden_size
        for k in range(num_layers):
            in_k = input_size if k == 0 else out * self.num_directions
            for sfx in self._suffixes:
                setattr(self, f"ih_l{k}{sfx}", nn.Linear(in_k, gates, bias=bias, dtype=dtype))
                setattr(self, f"hh_l{k}{sfx}", nn.Linear(out, gates, bias=bias, dtype=dtype))
                if proj_size:
                    setattr(self, f"hr_l{k}{sfx}", nn.Linear(hidden_size, proj_size, bias=False, dtype=dtype))
        # torch's initialization, not nn.Linear's: every weight and bias U(-1/sqrt(hidden), 1/sqrt(hidden))
        bound = 1.0 / math.sqrt(hidden_size)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-bound, bound)

    def _shell(self) -> nn.RNNBase:
        """torch's module of the same structure, on the meta device (its parameters are passed per call); rebuilt
        when an attribute it reads changes (``batch_first``, ``dropout`` ...)."""
        config = self._config()
        kept = self.__dict__.get("_shell_module")
        if kept is None or kept[0] != config:  # kept out of _modules: no parameters, no state_dict entries
            kept = self.__dict__["_shell_module"] = (config, self._torch_module())
        return kept[1]

    def _runner(self, weights: dict[str, torch.Tensor]) -> nn.RNNBase | None:
        """At inference, torch's module holding ``weights`` (rebuilt when one of them or the structure changes), so
        that a call costs what the dense module's does (``functional_call`` adds ~60 us per call); ``None`` when
        gradients are on."""
        if torch.is_grad_enabled():
            return None
        key = (self._config(), tuple((id(w), w.data_ptr(), w.dtype) for w in weights.values()))
        kept = self.__dict__.get("_runner_module")
        if kept is None or kept[0] != key:  # detach: shares the storage
            kept = self.__dict__["_runner_module"] = (key, self._torch_module({k: w.detach() for k, w in
                                                                                 weights.items()}))
        return kept[1]

    def _config(self) -> tuple:
        return (self.mode, self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first,
                float(self.dropout), self.bidirectional, self.proj_size, self.nonlinearity)

    _CACHES = ("_shell_module", "_dense_cache", "_runner_module")

    def __getstate__(self) -> dict:
        # copies and pickles leave out the per-process caches (the dense weights would outweigh the model)
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in self._CACHES}

    def _replicate_for_data_parallel(self):
        # nn.DataParallel's replicas (one per device and call, run in threads) build their own: a shared shell would
        # have its parameters swapped by two threads' functional_call at once
        replica = super()._replicate_for_data_parallel()
        for name in self._CACHES:
            replica.__dict__.pop(name, None)
        return replica

    def refresh(self) -> None:
        """Drop the dense weights kept between inference calls (and the projections' own kept operands): only needed
        after a write that bypasses torch (a numpy view, DLPack), which no version counter sees."""
        for name in self._CACHES:
            self.__dict__.pop(name, None)
        for m in self.children():
            if callable(getattr(m, "refresh", None)):
                m.refresh()

    def flatten_parameters(self) -> None:
        """Nothing to do (``nn.LSTM``'s cuDNN weight layout); here so that code calling it keeps working."""

    def _torch_module(self, tensors: dict[str, torch.Tensor] | None = None) -> nn.RNNBase:
        """torch's module of this structure, built on the meta device, holding ``tensors`` (torch's parameter
        names: ``weight_ih_l0`` ...) as its parameters; RNNBase.__setattr__ keeps its flat weight list in step."""
        kwargs: dict[str, Any] = dict(num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first,
                                      dropout=self.dropout, bidirectional=self.bidirectional)
        if self.mode == "LSTM":
            kwargs["proj_size"] = self.proj_size
        if self.mode == "RNN":
            kwargs["nonlinearity"] = self.nonlinearity
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's construction warnings (dropout with one layer) were given
            rnn = RECURRENT_TYPES[self.mode](self.input_size, self.hidden_size, **kwargs)
        for name, t in (tensors or {}).items():
            setattr(rnn, name, t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False))
        return rnn

    def _dense_weights(self) -> dict[str, torch.Tensor] | None:
        """torch's flat parameters (``weight_ih_l0`` ...) from the projections, or ``None`` when a projection cannot
        give its dense weight (a gated layer, whose width depends on the input, or another module) or has hooks
        (calibration and user hooks must see each call)."""
        from .layer import MPOLinear, kept
        from .lowrank import LowRankLinear

        names = self.projection_names()
        layers = [self._modules[n] for n in names]
        if any(type(m) not in (nn.Linear, MPOLinear, LowRankLinear) or m._forward_hooks or m._forward_pre_hooks
               for m in layers) or nn.modules.module._global_forward_hooks \
                or nn.modules.module._global_forward_pre_hooks:
            return None
        grad = torch.is_grad_enabled()
        cache = self.__dict__.setdefault("_dense_cache", {})
        weights: dict[str, torch.Tensor] = {}
        for name, layer in zip(names, layers):
            weight, bias = _param_names(name)
            if type(layer) is nn.Linear:
                w = layer.weight
            elif not grad:
                # the dense weight is kept between inference calls while the factors are unmodified (every write to
                # a TrackedParameter is seen, .data included; a plain parameter assigned by the user is rebuilt per
                # call); the key holds an MPO's quantization, which changes the weight
                factors, quant = ((tuple(layer._core_params.values()), layer._quant) if type(layer) is MPOLinear
                                  else ((layer.U, layer.V), None))
                w = kept(cache, (name, quant), factors, layer.weight_matrix)
            else:  # training: rebuilt per call, so that gradients reach the factors
                w = layer.weight_matrix()
            weights[weight] = w
            if layer.bias is not None:
                weights[bias] = layer.bias
        return weights

    @property
    def num_directions(self) -> int:
        """2 when ``bidirectional``, else 1 (torch's ``D``)."""
        return 2 if self.bidirectional else 1

    @property
    def _suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    @property
    def output_size(self) -> int:
        """Features of one direction's output (``proj_size`` or ``hidden_size``)."""
        return self.proj_size or self.hidden_size

    def projection_names(self) -> tuple[str, ...]:
        """The names of the weight-matrix modules, in torch's parameter order."""
        return _projection_names(self.num_layers, self.bidirectional, self.proj_size)

    def extra_repr(self) -> str:
        s = f"{self.mode}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False),
                              ("proj_size", 0)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s + (f", nonlinearity={self.nonlinearity!r}" if self.mode == "RNN" and self.nonlinearity != "tanh"
                    else "")

    # ------------------------------------------------------------------ conversion
    @classmethod
    def _rebuilt(cls, *args: Any) -> Recurrent:
        """``cls(*args)`` for a structure that exists already (torch's module, a checkpoint): its user was told of an
        ineffective dropout when it was made."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Recurrent: dropout=")
            return cls(*args)

    @classmethod
    def from_torch(cls, rnn: nn.RNNBase) -> Recurrent:
        """The same network as ``rnn`` (an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``), holding ``rnn``'s very
        parameters (no copy: ``requires_grad`` and optimizer state carry over; ``rnn`` itself is left as is)."""
        mode = next((m for m, t in RECURRENT_TYPES.items() if isinstance(rnn, t)), None)
        if mode is None:
            raise TypeError(f"expected an nn.LSTM, nn.GRU or nn.RNN, got {type(rnn).__name__}")
        why = unsupported(rnn)
        if why is not None:
            raise TypeError(f"Recurrent.from_torch cannot convert this {type(rnn).__name__}: {why}")
        nonlinearity = getattr(rnn, "nonlinearity", "tanh")
        with torch.device("meta"):  # the Linear shells get rnn's parameters below: allocate nothing
            new = cls._rebuilt(mode, rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.bias, rnn.batch_first,
                      float(rnn.dropout), rnn.bidirectional, getattr(rnn, "proj_size", 0), nonlinearity)
        for name in new.projection_names():
            weight, bias = _param_names(name)
            layer = getattr(new, name)
            layer.weight = getattr(rnn, weight)
            if layer.bias is not None:
                layer.bias = getattr(rnn, bias)
        new.train(rnn.training)
        return new

    def to_torch(self) -> nn.RNNBase:
        """The fused torch module, holding this module's parameters; every projection must be a plain
        ``nn.Linear`` (``TypeError`` otherwise: a factored layer has no dense weight to give)."""
        factored = [n for n in self.projection_names() if type(getattr(self, n)) is not nn.Linear]
        if factored:
            raise TypeError(f"to_torch needs plain nn.Linear projections; {', '.join(factored)} are not")
        tensors = {}
        for name in self.projection_names():
            weight, bias = _param_names(name)
            tensors[weight] = self._modules[name].weight
            if self._modules[name].bias is not None:
                tensors[bias] = self._modules[name].bias
        rnn = self._torch_module(tensors)
        rnn.train(self.training)
        return rnn

    # ------------------------------------------------------------------ checkpoints
    def spec(self) -> dict:
        """JSON-serializable structure, with each projection's own spec, for :func:`bondgate.save`."""
        projections = {}
        for name in self.projection_names():
            layer = getattr(self, name)
            if type(layer) is nn.Linear:
                projections[name] = _linear_spec(layer)
            elif LAYER_TYPES.get(getattr(layer, "spec", lambda: {})().get("type")) is type(layer):
                projections[name] = layer.spec()
            else:
                raise ValueError(f"cannot save projection {name} of a Recurrent: a {type(layer).__name__} is neither "
                                 f"an nn.Linear nor a registered bondgate layer (see bondgate.register_layer_type)")
        return {"type": "Recurrent", "mode": self.mode, "input_size": self.input_size,
                "hidden_size": self.hidden_size, "num_layers": self.num_layers, "bias": self.bias,
                "batch_first": self.batch_first, "dropout": self.dropout, "bidirectional": self.bidirectional,
                "proj_size": self.proj_size, "nonlinearity": self.nonlinearity, "projections": projections}

    @classmethod
    def from_spec(cls, spec: dict) -> Recurrent:
        """An uninitialized module with the structure of :meth:`spec` (fill it with ``load_state_dict``)."""
        keys = ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                "bidirectional", "proj_size", "nonlinearity", "projections")
        missing = [k for k in keys if k not in spec]
        if missing:
            raise ValueError(f"Recurrent spec is missing {missing}")
        wrong = [k for k, ok in (("mode", isinstance(spec["mode"], str)),
                                 ("nonlinearity", isinstance(spec["nonlinearity"], str)),
                                 *((k, isinstance(spec[k], bool)) for k in ("bias", "batch_first", "bidirectional")),
                                 ("dropout", _number(spec["dropout"])),
                                 *((k, _int(spec[k])) for k in ("input_size", "hidden_size", "num_layers",
                                                                 "proj_size"))) if not ok]
        if wrong:
            raise ValueError(f"Recurrent spec has values of the wrong type for {wrong}")
        projections = spec["projections"]
        per_layer = _projection_names(1, spec["bidirectional"], spec["proj_size"])
        count = spec["num_layers"] * len(per_layer)  # checked first: a huge num_layers is not listed, nor built
        if not isinstance(projections, dict) or len(projections) != count:
            raise ValueError(f"Recurrent spec must describe {count} projections ({', '.join(per_layer)} per layer)")
        names = _projection_names(spec["num_layers"], spec["bidirectional"], spec["proj_size"])
        if set(projections) != set(names):
            raise ValueError(f"Recurrent spec must describe the projections {list(names)}")
        new = cls._rebuilt(*(spec[k] for k in keys[:-1]))
        for name, sub in projections.items():
            shell = getattr(new, name)
            if not isinstance(sub, dict) or sub.get("type") not in ("Linear", *LAYER_TYPES) \
                    or sub.get("type") == "Recurrent":
                raise ValueError(f"projection {name}: unknown layer type {sub.get('type') if isinstance(sub, dict) else sub!r}")
            if sub["type"] == "Linear":
                if not (_int(sub.get("in_features")) and _int(sub.get("out_features"))
                        and isinstance(sub.get("bias"), bool)):
                    raise ValueError(f"projection {name}: a Linear needs int in_features / out_features and a bool "
                                     f"bias, got {sub}")
                dtype = getattr(torch, str(sub.get("dtype", "float32")), None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"projection {name}: unknown dtype {sub.get('dtype')!r}")
                layer = nn.Linear(int(sub["in_features"]), int(sub["out_features"]), bias=bool(sub["bias"]),
                                  dtype=dtype)
            else:
                layer = LAYER_TYPES[sub["type"]].from_spec(sub)
            have = (_size(layer, "in_features"), _size(layer, "out_features"))
            if have != (shell.in_features, shell.out_features) or \
                    (getattr(layer, "bias", None) is not None) != (shell.bias is not None):
                raise ValueError(f"projection {name}: a {shell.out_features}x{shell.in_features} layer "
                                 f"{'with' if shell.bias is not None else 'without'} bias expected, the spec gives "
                                 f"{have[1]}x{have[0]}")
            setattr(new, name, layer)
        return new

    @staticmethod
    def after_load(model: nn.Module) -> None:
        """Model-level state of the layer types inside (a gated projection's shared price tracker)."""
        inner = {type(m) for r in model.modules() if isinstance(r, Recurrent) for m in r.children()}
        for cls in inner:
            if cls is not Recurrent and callable(getattr(cls, "after_load", None)):
                cls.after_load(model)

    # ------------------------------------------------------------------ forward
    def _check(self, x: torch.Tensor, hx: Any, batch: int | None) -> None:
        """The input's features and dtype, and ``hx``'s shapes as given (``batch`` None: unbatched)."""
        if x.size(-1) != self.input_size:
            raise ValueError(f"input has {x.size(-1)} features, this {self.mode} expects input_size={self.input_size}")
        dtype = next(self.parameters()).dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):  # (as torch's own check words it)
            raise ValueError(f"input dtype {x.dtype} does not match the {self.mode}'s parameters' {dtype}: convert "
                             f"the input (or the module, e.g. .to({x.dtype}))")
        if hx is None:
            return
        lead = (self.num_layers * self.num_directions, *(() if batch is None else (batch,)))
        want_h, want_c = (*lead, self.output_size), (*lead, self.hidden_size)
        for (what, t), want in zip(self._hx_parts(hx, dtype, x.device), (want_h, want_c)):
            if tuple(t.shape) != want:
                raise ValueError(f"{what} must have shape {want}, got {tuple(t.shape)}")

    def _hx_parts(self, hx: Any, dtype: torch.dtype, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """``hx`` as ``[(name, tensor)]`` after checking its kind and dtype (torch's fused kernel says "index 1 is
        out of bounds" for an LSTM given one tensor and "get_mkldnn_dtype: unsupported data type" for a float64
        ``h_0`` of a float32 module)."""
        if self.mode == "LSTM":
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise ValueError(f"an LSTM's hx must be a pair (h_0, c_0), got {type(hx).__name__}")
            parts = [("h_0", hx[0]), ("c_0", hx[1])]
        else:
            parts = [("hx", hx)]
        for what, t in parts:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{what} must be a tensor, got {type(t).__name__}")
            if t.dtype != dtype and not torch.is_autocast_enabled(device.type):
                raise ValueError(f"{what} dtype {t.dtype} does not match the {self.mode}'s parameters' {dtype}: "
                                 f"convert it (or the module)")
        return parts

    def _cell(self, gi: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, hh: nn.Module,
              hr: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One time step from the precomputed input projection ``gi`` (N, gates*H)."""
        gh = hh(h)
        if self.mode == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if hr is None:  # as torch's LSTM under autocast: its fused kernel returns h and c in the autocast dtype
                c = c.to(gh.dtype)  # (a float32 state, the zeros of an unset hx, made them float32); with proj_size
                # torch's own kernel keeps c in the state's dtype, as this step does
            h = torch.sigmoid(o) * torch.tanh(c)
            return (h if hr is None else hr(h)), c
        if self.mode == "GRU":
            ir, iz, i_n = gi.chunk(3, dim=-1)
            hr_, hz, h_n = gh.chunk(3, dim=-1)
            r, z = torch.sigmoid(ir + hr_), torch.sigmoid(iz + hz)
            n = torch.tanh(i_n + r * h_n)
            return n + z * (h - n), None
        pre = gi + gh
        return (torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)), None

    def _direction(self, x: torch.Tensor, lengths: torch.Tensor | None, h: torch.Tensor, c: torch.Tensor | None,
                   k: int, sfx: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One layer, one direction over ``x`` (L, N, F), time-major and already reversed for ``_reverse``."""
        L, N = x.shape[0], x.shape[1]
        ih = getattr(self, f"ih_l{k}{sfx}")
        hh = getattr(self, f"hh_l{k}{sfx}")
        hr = getattr(self, f"hr_l{k}{sfx}") if self.proj_size else None
        outs = []
        if lengths is None:
            gi = ih(x.reshape(L * N, x.shape[-1])).reshape(L, N, _GATES[self.mode] * self.hidden_size)
            for t in range(L):
                h, c = self._cell(gi[t], h, c, hh, hr)
                outs.append(h)
            return torch.stack(outs), h, c
        # a packed batch: the projections see real tokens only (calibration statistics, gated FLOPs count rows);
        # sequences that have ended keep their state and output zeros
        real = torch.arange(L, device=x.device).unsqueeze(1) < lengths  # (L, N)
        gi_real = ih(x[real])
        gi = gi_real.new_zeros(L, N, gi_real.shape[-1])
        gi[real] = gi_real
        for t in range(L):
            live = real[t].nonzero().squeeze(1)
            if live.numel() == N:
                h, c = self._cell(gi[t], h, c, hh, hr)
                outs.append(h)
                continue
            h_live, c_live = self._cell(gi[t, live], h[live], None if c is None else c[live], hh, hr)
            h = h.index_copy(0, live, h_live)
            c = None if c is None else c.index_copy(0, live, c_live)
            outs.append(h.new_zeros(h.shape).index_copy(0, live, h_live))
        return torch.stack(outs), h, c

    def forward(self, input: torch.Tensor | PackedSequence, hx: Any = None
                ) -> tuple[torch.Tensor | PackedSequence, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """torch's ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` forward: ``(output, h_n)``, ``(output, (h_n, c_n))``.

        With ``fused`` (default) and projections that are ``nn.Linear``, ``MPOLinear`` or ``LowRankLinear`` without
        hooks, it runs torch's fused kernel on their dense weights (rebuilt per call when training, so gradients
        reach the cores; kept between inference calls until a parameter changes): the weights are reused at every
        time step, so one rebuild per sequence is cheaper than a factored product per step. Otherwise (gated
        projections, hooks, ``fused = False``) it steps through time in Python, each projection called as a module.
        """
        weights = self._dense_weights() if self.fused else None
        if weights is not None:
            if hx is not None:  # torch's fused kernel checks shapes clearly, not an hx of the wrong kind or dtype
                x0 = input.data if isinstance(input, PackedSequence) else input
                self._hx_parts(hx, next(iter(weights.values())).dtype, x0.device)
            args = (input,) if hx is None else (input, hx)
            runner = self._runner(weights)
            if runner is not None:  # inference on kept weights: torch's module holding them, called directly
                runner.train(self.training)
                return runner(*args)
            shell = self._shell()
            shell.train(self.training)
            return torch.func.functional_call(shell, weights, args)
        packed = isinstance(input, PackedSequence)
        lengths = None
        if packed:
            sorted_indices, unsorted_indices = input.sorted_indices, input.unsorted_indices
            x, lengths = pad_packed_sequence(input, batch_first=False)
            lengths = lengths.to(x.device)
            batched = True
        else:
            if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
                raise ValueError(f"input must be a 2-D (unbatched) or 3-D tensor or a PackedSequence, got "
                                 f"{tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__}")
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
        self._check(x, hx, x.shape[1] if batched else None)  # hx as given
        if hx is not None and not batched:
            hx = tuple(t.unsqueeze(1) for t in hx) if self.mode == "LSTM" else hx.unsqueeze(1)
        L, N = x.shape[0], x.shape[1]
        D = self.num_directions
        if L == 0:
            raise ValueError(f"input has sequence length 0; a {self.mode} needs at least one time step")
        if hx is None:
            h0 = x.new_zeros(self.num_layers * D, N, self.output_size)
            hx = (h0, x.new_zeros(self.num_layers * D, N, self.hidden_size)) if self.mode == "LSTM" else h0
        h0, c0 = (hx[0], hx[1]) if self.mode == "LSTM" else (hx, None)
        if lengths is not None:
            # time index of step t of each sequence read backwards (padding stays in place): an involution
            t = torch.arange(L, device=x.device).unsqueeze(1)
            rev = torch.where(t < lengths, lengths - 1 - t, t)
        h_n, c_n = [], []
        for k in range(self.num_layers):
            outs = []
            for d, sfx in enumerate(self._suffixes):
                i = k * D + d
                c = None if c0 is None else c0[i]
                if d == 0:
                    seq = x
                elif lengths is None:
                    seq = x.flip(0)
                else:
                    seq = x.gather(0, rev.unsqueeze(2).expand_as(x))
                out, h, c = self._direction(seq, lengths, h0[i], c, k, sfx)
                if d == 1:
                    out = out.flip(0) if lengths is None else out.gather(0, rev.unsqueeze(2).expand_as(out))
                outs.append(out)
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            x = outs[0] if D == 1 else torch.cat(outs, dim=2)
            if self.dropout and self.training and k < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        h_n = torch.stack(h_n)
        hidden: Any = (h_n, torch.stack(c_n)) if self.mode == "LSTM" else h_n
        if packed:
            order = sorted_indices if sorted_indices is not None else torch.arange(N, device=x.device)
            data = pack_padded_sequence(x.index_select(1, order), lengths.index_select(0, order).cpu(),
                                        enforce_sorted=True)
            return PackedSequence(data.data, data.batch_sizes, sorted_indices, unsorted_indices), hidden
        if not batched:
            x = x.squeeze(1)
            hidden = tuple(t.squeeze(1) for t in hidden) if self.mode == "LSTM" else hidden.squeeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        return x, hidden


register_layer_type(Recurrent)


def structure(mod: nn.Module) -> dict[str, Any]:
    """What replacing a recurrent module (torch's or a :class:`Recurrent`) must keep besides its sizes: the cell
    (``LSTM``, ``GRU``, ``RNN_TANH``, ``RNN_RELU``), ``bias``, ``batch_first``, ``bidirectional``, ``proj_size``;
    empty for any other module."""
    if isinstance(mod, Recurrent):
        mode = mod.mode if mod.mode != "RNN" else f"RNN_{mod.nonlinearity.upper()}"
    elif isinstance(mod, nn.RNNBase):
        mode = mod.mode
    else:
        return {}
    return {"cell": mode, "bias": bool(mod.bias), "batch_first": bool(mod.batch_first),
            "bidirectional": bool(mod.bidirectional), "proj_size": int(getattr(mod, "proj_size", 0))}


def _put(model: nn.Module, names: list[str], module: nn.Module) -> None:
    for name in names:
        _set_submodule(model, name, module)


def unsupported(rnn: nn.RNNBase) -> str | None:
    """Why ``rnn`` cannot become a :class:`Recurrent` without changing what it computes, or ``None``."""
    base = next(t for t in RECURRENT_TYPES.values() if isinstance(rnn, t))
    if type(rnn).forward is not base.forward:
        return f"its class {type(rnn).__qualname__} overrides forward(); a Recurrent would drop what that forward adds"
    if parametrize.is_parametrized(rnn):
        return "its weights are parametrized (weight norm, spectral norm ...)"
    if rnn._forward_hooks or rnn._forward_pre_hooks:
        return "it has forward hooks (torch.nn.utils.weight_norm, a user hook ...), which a Recurrent would not run"
    if not all(isinstance(rnn._parameters.get(n), nn.Parameter) for n in rnn._flat_weights_names):
        return "its weights are not all plain parameters"
    return None


def unroll(model: nn.Module, select: Callable[[str, list[str]], bool]) -> tuple[dict[str, nn.RNNBase], dict[str, str]]:
    """Replace, in place, the ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` modules of ``model`` that ``select(name, shell)``
    accepts (given its name and the full names its projections will have) by :class:`Recurrent` modules holding the same parameters. Returns ``(converted, skipped)``:
    the original modules by name (for :func:`reroll`), and the modules left alone with the reason."""
    from .surgery import module_names  # surgery imports this module

    converted: dict[str, nn.RNNBase] = {}
    skipped: dict[str, str] = {}
    names = module_names(model)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, tuple(RECURRENT_TYPES.values())):
            continue
        if not name:
            why = "a bare recurrent module cannot be replaced in place: compress bondgate.Recurrent.from_torch(it)"
            skipped[name] = why
            warn_user(f"compress: {why}")
            continue
        projections = _projection_names(mod.num_layers, mod.bidirectional, getattr(mod, "proj_size", 0))
        if not select(name, [f"{name}.{p}" for p in projections]):
            continue
        why = unsupported(mod)
        if why is not None:
            skipped[name] = why
            warn_user(f"compress: skipping {name}: {why}")
            continue
        try:
            _put(model, names[id(mod)], Recurrent.from_torch(mod))
        except BaseException:
            _put(model, names[id(mod)], mod)
            reroll(model, converted, force=True)
            raise
        converted[name] = mod
    return converted, skipped


def reroll(model: nn.Module, converted: dict[str, nn.RNNBase], force: bool = False) -> list[str]:
    """Put back the original module of every :class:`Recurrent` that :func:`unroll` made and whose projections all
    stayed plain ``nn.Linear`` (torch's fused kernel is faster), or of every one with ``force``; returns their
    names."""
    from .surgery import module_names

    back = []
    names = module_names(model)
    for name, original in converted.items():
        new = model.get_submodule(name)
        if isinstance(new, Recurrent) and (force or all(type(getattr(new, n)) is nn.Linear
                                                        for n in new.projection_names())):
            _put(model, names[id(new)], original)
            back.append(name)
    return back

