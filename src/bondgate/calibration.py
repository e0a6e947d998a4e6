"""Activation-aware (calibrated) decomposition.

What matters is the error a layer makes on real inputs, ``||(W - W_mpo) X||``, not on the raw weight.
With input mean ``mu`` and centered covariance ``Sigma`` (over calibration rows), and the bias
re-fitted as ``b' = b + (W - W_mpo) mu``, the expected squared output error per row is
``tr(E Sigma E^T)`` with ``E = W - W_mpo``. This module

1. collects ``mu``, ``Sigma`` (and the uncentered second moment) for many layers in one pass
   (:func:`collect_input_stats`), skipping padding tokens when the batch carries an attention mask;
2. approximates ``Sigma`` by a Kronecker product over the MPO's input legs, ``Sigma ~ S_1^2 x ... x S_d^2``
   (:func:`kron_whiteners`): TT-SVD of ``W (S_1 x ... x S_d)`` then ``S_k^{-1}`` folded into core ``k``'s
   input leg keeps the MPO structure and bond dimensions exactly (a full whitening matrix would not);
3. refines the cores on the exact objective ``tr(E Sigma E^T)`` with L-BFGS (:func:`refine_cores`) —
   closed-form ALS is out of reach here because one core's normal equations have
   ``(r_{k-1} in_k r_k)^2`` entries (36,000^2 for a 384x1536 layer at half its weights);
4. measures how much each layer's output moves the model's output (:func:`layer_sensitivity`), so the
   budget allocator can weight layer errors by their effect on the model.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import statistics
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ._checks import number
from .layer import core_versions

__all__ = ["InputStats", "collect_input_stats", "collect_token_counts", "kron_whiteners", "damped", "refine_cores",
           "layer_sensitivity",
           "run_model", "model_output", "capture_inputs", "output_sensitivity"]


@dataclass(kw_only=True)
class InputStats:
    """Input statistics of one layer over the calibration rows (float64, CPU).

    ``mean``: ``(in,)``; ``cov``: centered covariance ``E[(x - mu)(x - mu)^T]``, ``(in, in)``; ``rows``: row count;
    ``dtype``: the inputs' own dtype (their rounding bounds the spread that is real).
    """

    mean: torch.Tensor
    cov: torch.Tensor
    rows: int
    dtype: torch.dtype = torch.float64

    @property
    def second(self) -> torch.Tensor:  # (not kept: a second in x in matrix per layer, 254 MB at LLaMA's 5632)
        """Uncentered second moment ``E[x x^T] = cov + mu mu^T``."""
        return self.cov + torch.outer(self.mean, self.mean)


def to_device(obj, device: torch.device | None):
    """``obj`` (a tensor, or dicts / tuples / lists / model outputs of them) with every tensor on ``device``
    (None: unchanged). Where autograd records (grad enabled, outside ``torch.inference_mode``), a tensor made under
    ``torch.inference_mode`` (cached features, say) is cloned into a normal one: autograd cannot save it for a
    backward pass. Containers are rebuilt only where something changed."""
    thaw = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    if device is None and not thaw:
        return obj
    return _moved(obj, device, thaw)


def _moved(obj, device: torch.device | None, thaw: bool):
    if isinstance(obj, torch.Tensor):
        if thaw and obj.is_inference():
            obj = obj.clone()
        return obj if device is None or obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, PackedSequence):  # its batch_sizes stay on the CPU
        if thaw and any(t is not None and t.is_inference() for t in obj):
            obj = obj._replace(**{k: t.clone() for k, t in obj._asdict().items()
                                  if t is not None and t.is_inference()})
        return obj if device is None or obj.data.device == device else obj.to(device)
    if isinstance(obj, Mapping):
        moved = {k: _moved(v, device, thaw) for k, v in obj.items()}
        if all(moved[k] is v for k, v in obj.items()):
            return obj
        try:  # dict, transformers' BatchEncoding and ModelOutput take their items as keyword arguments
            return type(obj)(**moved)
        except TypeError:
            return moved
    if isinstance(obj, (tuple, list)):
        moved = [_moved(v, device, thaw) for v in obj]
        if all(a is b for a, b in zip(moved, obj)):
            return obj
        return type(obj)(moved) if not hasattr(obj, "_fields") else type(obj)(*moved)  # namedtuple
    return obj


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer): where its inputs must be."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


MAX_UNSIZED_BATCHES = 10_000


def as_batches(data, who: str) -> list:
    """``data`` as a list of model inputs (read in full: later passes re-read it): one tensor or one dict of keyword
    arguments is one batch (iterating it would feed the model its rows or its key names). An iterable without a
    length (a generator) is read up to :data:`MAX_UNSIZED_BATCHES` batches; one that yields more is refused (an endless
    one filled memory without a word)."""
    if isinstance(data, (torch.Tensor, Mapping)):
        return [data]
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        hint = (" (text: tokenize it first)" if isinstance(data, (str, bytes)) else
                " (a Dataset: wrap it in a torch.utils.data.DataLoader)" if hasattr(data, "__getitem__") else "")
        raise TypeError(f"{who}: data must be an iterable of model inputs (batches), got {type(data).__name__}{hint}")
    if isinstance(data, Sized):
        return list(data)
    batches = list(itertools.islice(data, MAX_UNSIZED_BATCHES + 1))
    if len(batches) > MAX_UNSIZED_BATCHES:
        raise ValueError(f"{who}: the data yielded more than {MAX_UNSIZED_BATCHES:,} batches and has no length: is it "
                         f"endless? It is read in full and held (later passes re-read it): give a finite one, e.g. "
                         f"itertools.islice(data, n) or a list")
    return batches


def _arguments(batch) -> bool:
    """Whether ``batch`` is a tuple / list of positional arguments (a ``PackedSequence``, a named tuple, is one)."""
    return isinstance(batch, (tuple, list)) and not isinstance(batch, PackedSequence)


def run_model(model: nn.Module, batch) -> object:
    """Call ``model`` on one calibration item, moved to the model's device: a dict is passed as keyword
    arguments, a tuple/list positionally, anything else (a tensor, a ``PackedSequence``) as the single positional
    argument."""
    check_cache_binding(model, batch)
    batch = to_device(batch, model_device(model))
    try:
        if isinstance(batch, Mapping):
            return model(**batch)
        if _arguments(batch):
            return model(*batch)
        return model(batch)
    except (TypeError, AttributeError) as exc:
        if _arguments(batch) and len(batch) > 1 and "positional argument" in str(exc):
            # the usual cause: a dataset of (inputs, labels) pairs
            raise TypeError(f"{exc} (a calibration item is a {type(batch).__name__} of {len(batch)}, passed as "
                            f"{len(batch)} positional arguments: for a dataset of (inputs, labels) pairs give the "
                            f"inputs only, e.g. [x for x, _ in loader])") from exc
        if type(exc) in (TypeError, AttributeError) and _untensored(batch):
            # text, token lists, numpy arrays: a model that takes tensors failed somewhere inside
            raise type(exc)(f"{exc} (the calibration item holds no torch tensor: it is {_describe(batch)}; if the "
                            f"model takes tensors, tokenize with return_tensors='pt' or convert with "
                            f"torch.as_tensor)") from exc
        raise


def _untensored(batch) -> bool:
    """Whether ``batch`` is made of text, numbers and numpy arrays only (in dicts, lists and tuples)."""
    if isinstance(batch, Mapping):
        return all(_untensored(v) for v in batch.values())
    if isinstance(batch, (tuple, list)):
        return all(_untensored(v) for v in batch)
    return isinstance(batch, (str, bytes, int, float, np.ndarray, np.generic))


def _describe(batch) -> str:
    """A few words on what a batch without tensors holds, e.g. ``a dict of input_ids: list, attention_mask: list``."""
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} of " + ", ".join(f"{k}: {type(v).__name__}" for k, v in list(batch.items())[:4])
    if isinstance(batch, (tuple, list)) and batch:
        return f"a {type(batch).__name__} of {len(batch)} {type(batch[0]).__name__}"
    return f"a {type(batch).__name__}"


def model_output(out) -> torch.Tensor:
    """The tensor a model's output is judged by: ``logits`` or ``last_hidden_state`` of a transformers
    output, the first tensor of a tuple, or the tensor itself."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        val = getattr(out, key, None) if not isinstance(out, Mapping) else out.get(key)
        if isinstance(val, torch.Tensor):
            return val
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


_marked: dict[int, int] = {}  # id(module) -> calibration passes running over it now (see calibration_pass)
_marked_lock = threading.Lock()


@contextlib.contextmanager
def calibration_pass(model: nn.Module) -> Iterator[None]:
    """Marks the block as a calibration pass of ``model``, which is not inference traffic: ``model``'s gated layers
    leave it out of their routing counts and online price tracking (:func:`in_calibration_pass`). Only ``model``'s
    modules are marked: another model's inference meanwhile (in other threads) is counted as usual; a layer shared
    with ``model`` is in its pass."""
    modules = list(model.modules())  # held until the pass ends: no marked id can be reused by a new module
    keys = [id(m) for m in modules]
    with _marked_lock:
        for k in keys:
            _marked[k] = _marked.get(k, 0) + 1
    try:
        yield
    finally:
        with _marked_lock:
            for k in keys:
                left = _marked[k] - 1
                if left:
                    _marked[k] = left
                else:
                    del _marked[k]


def in_calibration_pass(module: nn.Module) -> bool:
    """Whether a :func:`calibration_pass` of a model holding ``module`` runs now (an ``nn.DataParallel`` replica, made
    per call, is asked about as the layer it replicates, its ``__dict__["_origin"]``)."""
    if not _marked:  # no pass anywhere (a gated layer asks on every counted inference call): one read
        return False
    origin = module.__dict__.get("_origin")
    return id(module if origin is None else origin) in _marked


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, then every submodule's own train/eval flag back (``model.train(was)``
    would put a frozen BatchNorm or a disabled Dropout back into training)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def named_batch(model: nn.Module, batch):
    """A tuple/list batch as ``{argument name: value}`` by ``model.forward``'s signature, so that an attention mask
    passed positionally (``(input_ids, attention_mask)`` to a transformers model) is found as a dict batch's is;
    any other batch, or one that does not bind, as it is."""
    if _arguments(batch):
        try:  # (a torch.compile'd model's forward takes *args: its original module's names the positions)
            sig = inspect.signature(getattr(model, "_orig_mod", model).forward)
            named = sig.bind(*batch).arguments
        except (TypeError, ValueError):
            return batch
        # only names the call can take back as keywords (not *args, not positional-only parameters)
        if all(sig.parameters[n].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
               for n in named):
            return named
    return batch


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper, else ``model``."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def check_cache_binding(model: nn.Module, batch) -> None:
    """A ValueError for a tuple batch whose tensor binds to a transformers model's key/value cache argument
    (``(input_ids, attention_mask)`` to GPT-2, whose second argument is the cache): the model failed deep inside
    (``'Tensor' object has no attribute 'get_seq_length'``)."""
    inner = unwrap_parallel(model)  # (the wrappers hide the transformers model's config)
    if not _arguments(batch) or not hasattr(inner, "config"):
        return
    named = named_batch(inner, batch)
    cache = next((k for k in ("past_key_values", "cache")  # (transformers 5 renamed it to cache)
                  if named is not batch and isinstance(named.get(k), torch.Tensor)), None)
    if cache is not None:
        raise ValueError(f"a tuple batch is passed positionally, and {type(inner).__name__}'s argument {cache!r}, a "
                         f"key/value cache, got a tensor (an attention mask?): give dict batches, "
                         f"{{'input_ids': ..., 'attention_mask': ...}}")


def _padding_mask(batch) -> torch.Tensor | None:
    """The batch's (a dict, or a :func:`named_batch`) 2-D ``attention_mask`` when it is a padding mask: 0/1 entries
    with a 1 among them (an additive mask, 0 and -inf, is not one, nor its all-zero form without padding)."""
    m = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(m, torch.Tensor) and m.dim() == 2 and bool(((m == 0) | (m == 1)).all()) and bool((m == 1).any()):
        return m
    return None


def _row_mask(batch, x: torch.Tensor) -> torch.Tensor | None:
    """Boolean row selector dropping padding tokens, when the batch has a :func:`_padding_mask` matching ``x``."""
    m = _padding_mask(batch)
    if m is None:
        return None
    # (batch, tokens, features), or the same rows flattened to (batch * tokens, features) in that order
    if (x.dim() == 3 and m.shape == x.shape[:2]) or (x.dim() == 2 and m.numel() == x.shape[0]):
        return m.reshape(-1).bool().to(x.device)
    return None


def _layer_input(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor ``module`` is called on: its first positional argument, or its input by keyword (``linear(input=x)``,
    valid torch: ``input`` for nn.Linear / nn.Embedding / torch's recurrent layers and bondgate's, ``x`` for
    transformers' Conv1D, which bondgate's layers take too)."""
    x = args[0] if args else kwargs.get("input", kwargs.get("x"))
    if not isinstance(x, torch.Tensor):  # (the hook runs before the layer, which would refuse it less clearly)
        raise TypeError(f"{type(module).__name__} was called on {type(x).__name__}, not a tensor: check the "
                        f"calibration data (each batch is a tensor, a tuple of positional inputs or a dict)")
    return x


@torch.no_grad()
def capture_inputs(model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable,
                   on_input: Callable[[str, nn.Module, torch.Tensor, object], None],
                   done: Callable[[], bool] | None = None, progress: bool = False) -> None:
    """Run ``data`` through ``model`` in eval mode (its mode is restored after), calling
    ``on_input(name, module, x, batch)`` with each listed module's input ``x`` as it is computed (the tensor the
    module was called on: two modules called on one tensor get the same object) and the batch (a tuple batch as
    :func:`named_batch`; ``None`` for calls outside an encoder-decoder model's encoder, whose rows the encoder's
    attention mask does not describe); stops early once ``done()`` is true after a batch."""
    current: dict = {}

    def hook_for(name: str) -> Callable:
        def hook(mod, args, kwargs):
            try:
                on_input(name, mod, _layer_input(mod, args, kwargs),
                         None if current.get("outside") else current.get("batch"))
            except Exception as exc:  # bondgate's own message (a table's ids out of range ...): passed on as it is
                current["own"] = exc
                raise

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, m in modules.items()]
    encoder = _encoder_of(model)
    if encoder is not None:  # the mask describes the encoder's tokens only (a decoder of the same length would match)
        current["outside"] = True
        handles += [encoder.register_forward_pre_hook(lambda *_: current.__setitem__("outside", False)),
                    encoder.register_forward_hook(lambda *_: current.__setitem__("outside", True))]
    try:
        with eval_mode(model), calibration_pass(model):
            it = data
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(data, desc="calibration", leave=False)
            for k, batch in enumerate(it):
                current["batch"] = named_batch(model, batch)
                try:
                    run_model(model, batch)
                except (RuntimeError, ValueError, TypeError) as exc:  # torch's message names neither data nor cause
                    said = None if exc is current.get("own") else _on_batch(exc, model, batch, k)
                    if said is None:
                        raise
                    raise said from exc
                if done is not None and done():
                    break
    finally:
        for h in handles:
            h.remove()


def _encoder_of(model: nn.Module) -> nn.Module | None:
    """An encoder-decoder transformers model's encoder (``get_encoder()``), else ``None``."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    encoder = model.get_encoder() if callable(getattr(model, "get_encoder", None)) else None
    return encoder if isinstance(encoder, nn.Module) and encoder is not model else None


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    return [t for v in values for t in _tensors(v)]


def _on_batch(exc: Exception, model: nn.Module, batch, k: int) -> Exception | None:
    """A ``RuntimeError`` / ``ValueError`` / ``TypeError`` like ``exc`` (raised by the model on calibration batch ``k``:
    a wrong width, a wrong dtype, a dict batch's key the forward does not take) that names the batch's shapes and
    dtypes, and the likely cause when the error is about dtypes and a floating tensor's dtype is not the model's;
    ``None`` for a subclass (its constructor may take other arguments: re-raised as it is)."""
    if type(exc) not in (RuntimeError, ValueError, TypeError):
        return None
    tensors = _tensors(batch)

    def shown(t: torch.Tensor) -> str:
        return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"

    if isinstance(batch, Mapping) and batch and all(isinstance(v, torch.Tensor) for v in batch.values()):
        desc = ", ".join(f"{k}: {shown(v)}" for k, v in list(batch.items())[:4])  # a dict batch: its keys too
    else:
        desc = ", ".join(shown(t) for t in tensors[:4]) or type(batch).__name__
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    hint = ""
    about_dtypes = any(w in str(exc).lower() for w in ("dtype", "scalar type", "should be the same"))
    if about_dtypes and param is not None and any(t.is_floating_point() and t.dtype != param.dtype for t in tensors):
        hint = f"; the model's weights are {str(param.dtype).removeprefix('torch.')}: cast the calibration data to it"
    return type(exc)(f"the model failed on calibration batch {k} ({desc}){hint}: {exc}")


class _Counted:
    """``data`` with the index of the batch being read put in ``state["index"]`` (its length, if it has one, kept
    for progress bars)."""

    def __init__(self, data: Iterable, state: dict):
        self.data, self.state = data, state

    def __iter__(self) -> Iterator:
        for k, batch in enumerate(self.data):
            self.state["index"] = k
            yield batch

    def __len__(self) -> int:
        return len(self.data)


def _fingerprint(x: torch.Tensor) -> bytes:
    """Per-feature sums of ``x``, plain and with fixed random row weights (as bytes, to compare): a write the version
    counter does not see (``.data``, numpy, a kernel of its own) changes them, a permutation of rows or entries too."""
    rows = x.reshape(-1, x.shape[-1])
    w = torch.rand(rows.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weighted = w.to(rows.device, rows.dtype) @ rows
    return torch.cat([rows.sum(0, dtype=torch.float64), weighted.double()]).cpu().numpy().tobytes()


def collect_input_stats(model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable,
                        max_rows: int | None = None, progress: bool = False,
                        unseen: str = "raise") -> dict[str, InputStats]:
    """One pass of ``data`` through ``model``, accumulating each listed module's input statistics.

    ``data`` yields model inputs (see :func:`run_model`); one tensor or dict is one batch. Rows are the flattened leading dims of a
    module's input; padding rows are dropped when the batch has an ``attention_mask`` (a dict batch, or a tuple
    batch whose positions bind to the forward's ``attention_mask``; 0/1 entries) and the input is ``(batch, tokens,
    features)`` or those rows flattened batch-major, ``(batch * tokens, features)``; in an encoder-decoder model only
    inside the encoder (a decoder's rows all count, and so do the padded encoder rows its cross-attention reads). A module whose forward never ran
    raises (``unseen="raise"``) or is left out of the result (``unseen="skip"``). When ``data`` is a sequence,
    modules called on the very same tensor on every call (a transformer's query / key / value projections, a gated
    MLP's gate and up projections) are given one shared :class:`InputStats` (one ``in x in`` covariance, not three);
    should a later batch feed them different tensors, the pass runs again without sharing.
    """
    if unseen not in ("raise", "skip"):
        raise ValueError(f"collect_input_stats: unseen must be 'raise' or 'skip', got {unseen!r}")
    max_rows = number(max_rows, "collect_input_stats: max_rows", low=1, integer=True, none_ok=True)
    if isinstance(data, (torch.Tensor, Mapping)):  # one batch (iterated, a dict gave its key names as batches)
        data = [data]
    if isinstance(data, Sequence):
        stats = _collect_input_stats(model, modules, data, max_rows, progress, unseen, share=True)
        if stats is not None:
            return stats
    return _collect_input_stats(model, modules, data, max_rows, progress, unseen, share=False)


def _collect_input_stats(model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable, max_rows: int | None,
                         progress: bool, unseen: str, share: bool) -> dict[str, InputStats] | None:
    """:func:`collect_input_stats`' pass; with ``share``, ``None`` when a later batch broke the sharing."""
    # sums around each module's first input row: E[x x^T] - mu mu^T of raw sums loses the covariance to
    # cancellation when the mean is large against the spread (an offset of 1e7 over a spread of 1 read as constant)
    shifts: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    sums: dict[str, torch.Tensor] = {}
    seconds: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {n: 0 for n in modules}

    state: dict = {"index": -1}  # the batch being run (counted as it is read: the same object may come twice)
    first_bad: dict[str, int] = {}  # module -> index of the first batch that gave it a NaN/inf input
    # sharing: a module whose first call in the first batch takes the tensor another module's first call took
    # follows that module; in every batch its k-th call must then take the tensor of the other's k-th call, unchanged
    # (the same version and fingerprint), and it must make as many calls. A mismatch sets state["broken"], not an
    # exception (the model's forward may catch exceptions): the pass then stops after the batch and runs again
    # without sharing
    leader: dict[str, str] = {}
    taken: dict[str, list] = {}  # this batch: module -> (weak reference, version, fingerprint, outside) per input
    followed: dict[str, int] = {}  # this batch: follower -> calls

    def follows(name: str, x: torch.Tensor, batch) -> bool:
        """Whether this call of ``name`` takes a tensor another module's call took (no statistics to add)."""
        if state["index"] > 0 and name not in leader and name not in leader.values():
            return False
        version = core_versions((x,))  # -1: an inference tensor keeps no version counter, never taken as shared
        # (batch None: a call outside an encoder-decoder model's encoder, whose rows are masked otherwise)
        call = (version, None if version < 0 else _fingerprint(x), batch is None)
        if name in leader:
            k = followed[name] = followed.get(name, 0) + 1
            calls = taken.get(leader[name], ())
            if version < 0 or k > len(calls) or calls[k - 1][0]() is not x or calls[k - 1][1:] != call:
                state["broken"] = True
            return True
        if state["index"] == 0 and name not in taken and version >= 0:
            first = next((n for n, c in taken.items() if c[0][0]() is x and c[0][1:] == call), None)
            if first is not None:
                leader[name], followed[name] = first, 1
                return True
        taken.setdefault(name, []).append((weakref.ref(x), *call))
        return False

    def accumulate(name, mod, x, batch):
        if share and (state.get("broken") or follows(name, x, batch)):
            return
        dtypes[name] = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        keep = _row_mask(batch, x)
        if keep is not None:
            x2 = x2[keep]
        x2 = x2.to(torch.float64).cpu()
        if name not in first_bad and not bool(torch.isfinite(x2).all()):
            first_bad[name] = state["index"]
        if name not in sums:
            if not x2.shape[0]:
                return
            shifts[name] = x2[0].clone()
            sums[name] = torch.zeros(x2.shape[1], dtype=torch.float64)
            seconds[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64)
        elif x2.shape[1] != sums[name].shape[0]:
            raise ValueError(f"module {name!r} got inputs of width {x2.shape[1]} from calibration batch "
                             f"{state['index']} (counting from 0), {sums[name].shape[0]} before: check that batch")
        x2 = x2 - shifts[name]
        sums[name] += x2.sum(0)
        seconds[name] += x2.T @ x2
        counts[name] += x2.shape[0]

    def done() -> bool:  # after each batch; with unseen="skip", a module not called yet does not hold the pass open
        if any(followed.get(f, 0) != len(taken.get(lead, ())) for f, lead in leader.items()):
            state["broken"] = True
        taken.clear()
        followed.clear()
        if state.get("broken"):
            return True
        seen = [counts[leader.get(n, n)] for n in counts]
        seen = [c for c in seen if c or unseen != "skip"]
        return max_rows is not None and bool(seen) and min(seen) >= max_rows

    capture_inputs(model, modules, _Counted(data, state), accumulate, done, progress)
    if state.get("broken"):
        return None
    out = {}
    for name in modules:
        if name in leader:
            continue
        if counts[name] == 0:
            if unseen == "skip":
                continue
            raise ValueError(f"module {name!r} saw no calibration rows: is it used by the model's forward?")
        if not bool(torch.isfinite(seconds[name]).all()):
            bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
            cause = (f"the model has NaN/inf parameters ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}), "
                     f"which the forward spreads" if bad else "check the data")
            where = f" from batch {first_bad[name]} (counting from 0) on" if name in first_bad else ""
            raise ValueError(f"module {name!r} got non-finite calibration inputs (NaN or inf){where}: {cause}")
        n = counts[name]
        centered = sums[name] / n  # the mean around the shift
        out[name] = InputStats(mean=shifts[name] + centered, cov=seconds[name] / n - torch.outer(centered, centered),
                               rows=n, dtype=dtypes[name])
    return {n: out[leader.get(n, n)] for n in modules if leader.get(n, n) in out}


def collect_token_counts(model: nn.Module, tables: Mapping[str, nn.Module], data: Iterable,
                         progress: bool = False) -> dict[str, torch.Tensor]:
    """How often each row of each listed embedding table is looked up over ``data`` (float64 ``(num_embeddings,)``
    per table, CPU): the calibration statistic of a table, whose input is a one-hot id (its "covariance" is the
    diagonal of these counts). Ids at padding positions are not counted when the batch has an ``attention_mask``."""
    counts = {n: torch.zeros(m.weight.shape[0], dtype=torch.float64) for n, m in tables.items()}

    def count(name, mod, ids, batch):
        mask = _padding_mask(batch)
        if mask is not None and mask.shape == ids.shape:
            ids = ids[mask.bool()]
        ids = ids.reshape(-1).long().cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= counts[name].numel()):
            raise ValueError(f"table {name!r} got ids outside [0, {counts[name].numel()}) from the calibration data")
        counts[name] += torch.bincount(ids, minlength=counts[name].numel()).double()

    capture_inputs(model, tables, data, count, None, progress)
    for name, c in counts.items():
        if not c.sum() > 0:
            raise ValueError(f"table {name!r} saw no calibration ids: is it used by the model's forward?")
    return counts


def kron_whiteners(cov: torch.Tensor, in_factors: Sequence[int], damping: float = 1e-2
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-input-leg square roots ``S_k`` (and inverses) with ``S_1^2 x ... x S_d^2 ~ cov``.

    ``cov``: ``(in, in)``, zero-padded to ``prod(in_factors)``. Each leg's factor is the partial trace of
    ``cov`` over the other legs (the mode-k second moment), damped by ``damping`` x its mean diagonal
    so dead channels stay invertible, and scaled so the Kronecker product has ``cov``'s trace.
    """
    M = math.prod(in_factors)
    C = cov.to(torch.float64)
    if C.shape[0] < M:
        C = torch.nn.functional.pad(C, (0, M - C.shape[0], 0, M - C.shape[0]))
    d = len(in_factors)
    T = C.reshape(*in_factors, *in_factors)
    letters = "abcdefghijklmnopqrstuvwxy"[:d]  # "z" is the open leg; d <= MAX_CORES (17)
    total = float(torch.diagonal(C).sum())
    factors = []
    for k in range(d):
        row = letters
        col = "".join(letters[j] if j != k else "z" for j in range(d))
        Ck = torch.einsum(f"{row}{col}->{letters[k]}z", T)
        Ck = Ck / max(float(torch.diagonal(Ck).mean()), 1e-300)
        Ck = Ck + damping * torch.eye(in_factors[k], dtype=C.dtype)
        factors.append(Ck)
    # scale so that tr(kron) == tr(cov): tr(kron) = prod_k tr(C_k)
    scale = (total / math.prod(float(torch.diagonal(c).sum()) for c in factors)) if total > 0 else 1.0
    S, S_inv = [], []
    for Ck in factors:
        Ck = Ck * scale ** (1.0 / d)
        evals, evecs = torch.linalg.eigh(Ck)
        evals = evals.clamp_min(evals.max() * 1e-12)
        S.append((evecs * evals.sqrt()) @ evecs.T)
        S_inv.append((evecs * evals.rsqrt()) @ evecs.T)
    return S, S_inv


def apply_leg_maps(W: torch.Tensor, maps: Sequence[torch.Tensor], in_factors: Sequence[int]) -> torch.Tensor:
    """``W @ (A_1 x ... x A_d)`` for a ``(out, prod(in_factors))`` matrix, leg by leg."""
    N = W.shape[0]
    T = W.reshape(N, *in_factors)
    for k, A in enumerate(maps):
        T = torch.movedim(torch.tensordot(T, A.to(T.dtype), dims=([k + 1], [0])), -1, k + 1)
    return T.reshape(N, -1)


def fold_into_cores(cores: Sequence[torch.Tensor], maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Apply ``A_k`` to core ``k``'s input leg: ``G_k[a, o, i, b] <- sum_j G_k[a, o, j, b] A_k[j, i]``."""
    return [torch.einsum("aojb,ji->aoib", c, A.to(c.dtype)) for c, A in zip(cores, maps)]


def weighted_error(W: torch.Tensor, W_hat: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``tr(E cov E^T)`` with ``E = W - W_hat``: expected squared output error per row."""
    E = W - W_hat
    return ((E @ cov) * E).sum()


def rows_vary(spread: float, second_moment: float, dtype: torch.dtype) -> bool:
    """Whether rows whose squared deviations from their mean sum to ``spread`` (their squares, on the same scale, to
    ``second_moment``) are more than one vector with rounding noise: a relative spread within a few roundings of
    ``dtype`` is one vector (float32: 1e-7 of the mean is not a spread, while float64 rows of 1e7 +- 1 are)."""
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float64).eps
    return spread > (4 * eps) ** 2 * second_moment


def damped(cov: torch.Tensor, damping: float) -> torch.Tensor:
    """``cov + damping x mean(diag cov) x I``: a ridge relative to the inputs' scale."""
    return cov + damping * float(cov.diagonal().mean()) * torch.eye(cov.shape[0], dtype=cov.dtype)


def refine_cores(cores: Sequence[torch.Tensor], W: torch.Tensor, cov: torch.Tensor, out_features: int,
                 in_features: int, steps: int = 50) -> tuple[list[torch.Tensor], float, float]:
    """L-BFGS on ``tr((W - W_mpo) cov (W - W_mpo)^T)`` over the cores (float64).

    Returns ``(cores, error_before, error_after)``; never returns worse cores than it was given.
    """
    from .mpo import MPO

    W = W.to(torch.float64)
    cov = cov.to(torch.float64)
    # the same product with every core of one norm: whitening folded into the cores leaves them scaled by
    # powers of the inputs' scale (norms 1e-3 and 4e3 for inputs of 1e6), where L-BFGS stalls
    norms = [float(c.detach().norm()) for c in cores]
    g = statistics.geometric_mean(norms) if min(norms) > 0 else None
    params = [(c.detach().to(torch.float64) * (g / n if g else 1.0)).contiguous().requires_grad_(True)
              for c, n in zip(cores, norms)]
    # Normalize the objective so L-BFGS's tolerances mean the same thing for every layer.
    scale = float(((W @ cov) * W).sum()).__abs__() or 1.0

    def loss_fn() -> torch.Tensor:
        W_hat = MPO(params, out_features, in_features).to_matrix()
        return weighted_error(W, W_hat, cov) / scale

    with torch.no_grad():
        before = float(loss_fn())
    if steps > 0:
        opt = torch.optim.LBFGS(params, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-10, tolerance_change=1e-12)

        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        after = float(loss_fn())
    if not after <= before:  # NaN or worse: keep the input
        return [c.detach().to(torch.float64) for c in cores], before * scale, before * scale
    return [p.detach() for p in params], before * scale, after * scale


def output_sensitivity(model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable,
                       loss: Callable[[object, object], torch.Tensor] | None = None, probes: int = 4,
                       max_batches: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per module and output channel ``j``, the mean over rows of ``(d s / d y_j)^2``: how much an error in
    that channel of the module's output ``y`` moves a scalar ``s`` of the model. ``(out,)`` float64 each.

    ``loss=None``: ``s = <r, f>`` for random unit probes ``r`` of the model output ``f`` (``probes`` per
    batch), so the weights are the diagonal of the Gauss-Newton matrix ``J^T J / dim(f)`` and
    ``sum_j w_j e_j^2`` estimates how far an output error ``e`` moves ``f``. ``loss(output, batch)``: ``s``
    is that loss (one pass per batch), and the weights are the diagonal empirical Fisher of the layer
    output. Parameters get no gradients (only the layer outputs are differentiated).
    """
    sums, rows, _ = _sensitivity_sums(model, modules, data, loss, probes, max_batches, seed)
    return {n: sums[n] / rows[n] for n in modules if rows[n]}


def _sensitivity_sums(model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable,
                      loss: Callable[[object, object], torch.Tensor] | None, probes: int, max_batches: int | None,
                      seed: int) -> tuple[dict[str, torch.Tensor], dict[str, int], int]:
    """:func:`output_sensitivity`'s sums of ``(d s / d y_j)^2`` over rows, per module, the rows summed and
    the passes (batches x probes) run."""
    probes = number(probes, "probes", low=1, integer=True)
    max_batches = number(max_batches, "max_batches", low=1, integer=True, none_ok=True)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {n: 0 for n in modules}
    passes = 0
    outs: dict[str, list[torch.Tensor]] = {}

    def hook_for(name):
        def hook(mod, inputs, output):  # every call of the module in the forward (a shared layer: several)
            outs.setdefault(name, []).append(output)

        return hook

    gen = torch.Generator().manual_seed(seed)
    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    frozen = [p for m in modules.values() for p in m.parameters() if not p.requires_grad]
    for p in frozen:  # the outputs must be part of a graph
        p.requires_grad_(True)
    try:
        with eval_mode(model), calibration_pass(model):
            for bi, batch in enumerate(data):
                if max_batches is not None and bi >= max_batches:
                    break
                for _ in range(1 if loss is not None else probes):
                    passes += 1
                    outs.clear()
                    with torch.enable_grad():
                        out = run_model(model, batch)
                        if loss is not None:
                            s = loss(out, batch)
                        else:
                            f = model_output(out)
                            r = torch.randn(f.shape, generator=gen).to(f)
                            s = (f * r / r.norm()).sum()
                        # each output once (a module may hand back one cached tensor twice)
                        ys = {id(y): (n, y) for n, calls in outs.items() for y in calls if y.requires_grad}
                        names = [n for n, _ in ys.values()]
                        grads = torch.autograd.grad(s, [y for _, y in ys.values()], allow_unused=True)
                    outs.clear()  # (nothing of this pass is kept through the next forward)
                    del ys, out, s
                    for n, g in zip(names, grads):
                        if g is None:
                            continue
                        g = g.detach().reshape(-1, g.shape[-1]).double()
                        sums[n] = sums.get(n, 0) + (g * g).sum(0).cpu()
                        rows[n] += g.shape[0]
                    del grads
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
    return sums, rows, passes


def layer_sensitivity(model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable, probes: int = 4,
                      max_batches: int | None = None, seed: int = 0) -> dict[str, float]:
    """How strongly each module's output moves the model's output, per unit of output error.

    For random unit probes ``r`` of the model output ``f``, ``E_r ||d<r, f>/dy_l||^2 = ||J_l||_F^2 / dim(f)``
    (``J_l`` the Jacobian of ``f`` w.r.t. layer ``l``'s output ``y_l``, all of its rows in one model call). We
    return its mean per output channel of ``y_l``, per model call: with ``E||dy_l||^2`` the squared error of
    one row, ``sensitivity * E||dy_l||^2`` estimates ``E||df||^2`` up to one global factor, whether the layer
    runs on every token of a sample or once per sample (a pooler, a head).
    """
    sums, _, passes = _sensitivity_sums(model, modules, data, None, probes, max_batches, seed)
    return {n: (float(sums[n].mean()) / passes if n in sums else 0.0) for n in modules}
