#!/usr/bin/env python
"""Train a small GPT-2-architecture language model on WikiText-2 from scratch, on CPU, within a wall-clock
budget; save it in Hugging Face format so compression / distillation scripts can load it.

    python examples/gpt2_wikitext.py train --minutes 18 --out runs/gpt2-wt2
    python examples/gpt2_wikitext.py eval --model runs/gpt2-wt2
    python examples/gpt2_wikitext.py bench --n-layer 6 --n-embd 384 --block-size 128 --batch-size 16

Text handling (shared by tokenizer training and encoding): every non-empty line of a split, with its trailing
whitespace removed, is one document followed by the end-of-text token; blank lines are dropped.

The metric, `evaluate_ppl`, is token-level perplexity over the validation split cut into non-overlapping blocks
of `block_size` tokens: each block predicts its last block_size - 1 tokens from the tokens before them inside
the block (no context carried across blocks). It therefore depends on the tokenizer and on block_size; compare
numbers only between models that share both.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# On a shared, oversubscribed CPU, spinning OpenMP workers wait on each other's descheduled peers: measured here
# under load ~8 on 2 cores, a 2-thread training step ran 2.3x faster with passive waiting. Must precede `import
# torch`; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import tqdm  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

from bondgate.cli import number_arg  # noqa: E402
from bondgate.data import load_text  # noqa: E402

EOS_TOKEN = "<|endoftext|>"
# None: bondgate's loader looks in $BONDGATE_DATA, then its cache; without $BONDGATE_DATA the shared data beside
# the checkout, where it is
_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_DATA_DIR = None if os.environ.get("BONDGATE_DATA") or not _SHARED.is_dir() else _SHARED


# --------------------------------------------------------------------------------------------- data


def iter_lines(text: str | Iterable[str]) -> Iterator[str]:
    """Yield the documents of a split: non-empty lines with trailing whitespace (incl. newline) removed.

    `text` is either the whole split as one string or an iterable of lines (e.g. an open file)."""
    lines = text.splitlines() if isinstance(text, str) else text
    for line in lines:
        line = line.rstrip()
        if line:
            yield line


def read_split(data_dir: str | Path | None, split: str) -> str:
    """Return the raw text of `wiki.{split}.tokens` (split: 'train' or 'valid') through bondgate's loader: the
    published file's checksum is checked (a truncated copy warns), and `data_dir` None looks where the loader does."""
    return load_text("wikitext-2", split, data_dir)


def train_tokenizer(train_text: str | Iterable[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style, no prefix space added) on the training text only.

    Token id 0 is the end-of-text token `EOS_TOKEN`. Training is deterministic for a given text and vocab size."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        # All 256 byte symbols, so any input (including text unseen in training) stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_lines(train_text), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=int(1e9),  # we tokenize whole lines and cut blocks ourselves
    )


def encode_blocks(
    text: str | Iterable[str], tokenizer: PreTrainedTokenizerFast, block_size: int, lines_per_batch: int = 2048
) -> torch.Tensor:
    """Tokenize a split as one stream (each line + eos) and cut it into contiguous, non-overlapping blocks.

    Returns a LongTensor of shape (n_blocks, block_size); the trailing < block_size tokens are dropped."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no eos_token: blocks are lines joined by it; "
                         f"use a causal-LM tokenizer or set tokenizer.eos_token")
    ids = array("l")  # compact int64 buffer instead of a list of Python ints
    batch: list[str] = []

    def flush() -> None:
        for seq in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            ids.append(eos)
        batch.clear()

    for line in iter_lines(text):
        batch.append(line)
        if len(batch) == lines_per_batch:
            flush()
    if batch:
        flush()
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one block of {block_size}")
    stream = torch.frombuffer(ids, dtype=torch.int64)[: n_blocks * block_size].clone()
    return stream.view(n_blocks, block_size)


# --------------------------------------------------------------------------------------------- model


def build_model(
    vocab_size: int,
    n_layer: int = 6,
    n_embd: int = 384,
    n_head: int = 6,
    block_size: int = 128,
    dropout: float = 0.1,
    eos_token_id: int = 0,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 (pre-LN, GELU MLP of width 4*n_embd, learned positions, input and output
    embeddings tied) with a context of `block_size` tokens; dropout applies to embeddings, attention and residuals."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=block_size,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def token_nll(model: GPT2LMHeadModel, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token negative log-likelihood (nats) of blocks `x` (batch, T): positions 1..T-1 are predicted.

    reduction 'mean' averages over the batch * (T - 1) predicted tokens, 'sum' adds them up."""
    logits = model(input_ids=x, use_cache=False).logits  # (batch, T, vocab)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1), reduction=reduction
    )


@torch.no_grad()
def evaluate_ppl(model: GPT2LMHeadModel, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Token-level perplexity exp(mean NLL) over all predicted tokens of `blocks` (n_blocks, block_size).

    Runs in eval mode (no dropout) and restores the previous mode; NLL is summed in float64 so the value does
    not depend on batch_size beyond float32 rounding of the forward pass."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for i in range(0, blocks.size(0), batch_size):
            x = blocks[i : i + batch_size].to(device)
            total += token_nll(model, x, reduction="sum").double().item()
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)


# --------------------------------------------------------------------------------------------- training


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear weights and embeddings) only, none on biases / LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, total_steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Learning rate for 0-based `step`: linear warmup over `warmup` steps, then cosine decay to min_ratio * lr
    at `total_steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: GPT2LMHeadModel,
    train_blocks: torch.Tensor,
    valid_blocks: torch.Tensor | None,
    minutes: float,
    lr: float = 2e-3,
    batch_size: int = 16,
    warmup: int = 50,
    seed: int = 0,
    log_every: int = 25,
    ckpt_dir: str | Path | None = None,
    calib_steps: int = 20,
    eval_batch_size: int = 32,
    max_steps: int | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Train `model` on shuffled batches of `train_blocks` (n_blocks, T) for about `minutes` of wall time.

    The step budget is planned from wall time: after `calib_steps` steps the measured steps/s fixes the total
    step count (and with it the cosine schedule). It is re-planned at every log point from the rate since the
    previous plan, so a change in CPU contention stretches or shortens the schedule instead of overrunning the
    budget or stopping early; a hard deadline stops the loop once `minutes` have passed.
    `max_steps` caps the step count (tests). `amp_dtype` (e.g. torch.bfloat16) runs forward/backward under
    autocast; weights, optimizer state and the validation pass stay float32. If `ckpt_dir` is set the model is
    saved there at the end of training.
    Returns a dict of figures (steps, tokens_seen, train_seconds, tokens_per_s, losses, val_ppl, ...)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    budget_s = minutes * 60.0
    opt = make_optimizer(model, lr)
    n_blocks, block_size = train_blocks.shape
    tokens_per_step = batch_size * block_size
    device = next(model.parameters()).device

    def plan(step_done: int, elapsed: float, rate: float) -> int:
        """Total step count if the remaining wall time runs at `rate` steps/s."""
        planned = step_done + max(1, int(rate * (budget_s - elapsed)))
        return planned if max_steps is None else min(planned, max_steps)

    total_steps = max_steps if max_steps is not None and max_steps <= calib_steps else 10**9
    perm = torch.randperm(n_blocks, generator=gen)
    cursor, epoch = 0, 0
    losses: list[tuple[int, float]] = []
    window: list[float] = []
    model.train()
    t0 = time.perf_counter()
    bar = tqdm.tqdm(total=None, unit="step", dynamic_ncols=True, mininterval=2.0)
    step, last_plan = 0, (0, 0.0)  # (step, elapsed) at the previous plan
    while step < total_steps:
        if cursor + batch_size > n_blocks:  # new epoch: reshuffle, drop the ragged tail
            perm, cursor, epoch = torch.randperm(n_blocks, generator=gen), 0, epoch + 1
        x = train_blocks[perm[cursor : cursor + batch_size]].to(device)
        cursor += batch_size

        cur_lr = lr_at(step, total_steps, lr, warmup)
        for group in opt.param_groups:
            group["lr"] = cur_lr
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = token_nll(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        window.append(loss.item())
        bar.update(1)

        elapsed = time.perf_counter() - t0
        if step == calib_steps or (step > calib_steps and step % log_every == 0):
            recent_rate = (step - last_plan[0]) / (elapsed - last_plan[1])
            total_steps = plan(step, elapsed, recent_rate)
            last_plan = (step, elapsed)
            bar.total = total_steps
            bar.refresh()
        if step % log_every == 0 or step == total_steps:
            mean_loss = sum(window) / len(window)
            losses.append((step, mean_loss))
            window.clear()
            bar.write(
                f"step {step:>6}/{total_steps}  loss {mean_loss:.4f}  lr {cur_lr:.2e}  "
                f"{step * tokens_per_step / elapsed:,.0f} tok/s (avg)  {elapsed / 60:.1f} min  epoch {epoch}"
            )
        if elapsed > budget_s:  # hard deadline, whatever the plan said
            break
    bar.close()
    if window:
        losses.append((step, sum(window) / len(window)))
    train_s = time.perf_counter() - t0

    if ckpt_dir is not None:
        model.save_pretrained(ckpt_dir)
    result: dict[str, Any] = {
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "epochs": step * batch_size / n_blocks,
        "train_seconds": train_s,
        "tokens_per_s": step * tokens_per_step / train_s,
        "final_train_loss": losses[-1][1] if losses else float("nan"),
        "losses": losses,
    }
    if valid_blocks is not None:
        t1 = time.perf_counter()
        result["val_ppl"] = evaluate_ppl(model, valid_blocks, eval_batch_size)
        result["eval_seconds"] = time.perf_counter() - t1
        scored = valid_blocks.shape[0] * (valid_blocks.shape[1] - 1)  # each block's first token is context only
        print(f"validation perplexity {result['val_ppl']:.3f} ({scored:,} predicted tokens)")
    return result


# --------------------------------------------------------------------------------------------- CLI


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, torch threads and library versions (printed at start, stored in metrics.json)."""
    import tokenizers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "bondgate": importlib.metadata.version("bondgate"),
    }


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    info = machine_info()
    print("machine:", json.dumps(info))
    return info


def _amp(args: argparse.Namespace) -> torch.dtype | None:
    return torch.bfloat16 if args.amp == "bf16" else None


def cmd_train(args: argparse.Namespace) -> None:
    info = _setup(args)
    t_start = time.perf_counter()
    train_text, valid_text = read_split(args.data_dir, "train"), read_split(args.data_dir, "valid")
    tokenizer = train_tokenizer(train_text, args.vocab_size)
    train_blocks = encode_blocks(train_text, tokenizer, args.block_size)
    valid_blocks = encode_blocks(valid_text, tokenizer, args.block_size)
    prep_s = time.perf_counter() - t_start
    print(f"tokenizer + encoding {prep_s:.1f} s: train {tuple(train_blocks.shape)}, valid {tuple(valid_blocks.shape)}")

    torch.manual_seed(args.seed)
    model = build_model(
        len(tokenizer), args.n_layer, args.n_embd, args.n_head, args.block_size, args.dropout, tokenizer.eos_token_id
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters (tied embeddings counted once)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    result = train(
        model, train_blocks, valid_blocks, args.minutes, args.lr, args.batch_size, args.warmup, args.seed,
        args.log_every, ckpt_dir=out, eval_batch_size=args.eval_batch_size, amp_dtype=_amp(args),
    )
    metrics = {
        "val_ppl": result["val_ppl"],
        "val_tokens": valid_blocks.numel(),
        "val_predicted_tokens": valid_blocks.size(0) * (valid_blocks.size(1) - 1),
        "train_tokens_seen": result["tokens_seen"],
        "train_tokens_available": train_blocks.numel(),
        "epochs": result["epochs"],
        "steps": result["steps"],
        "final_train_loss": result["final_train_loss"],
        "tokens_per_s": result["tokens_per_s"],
        "train_seconds": result["train_seconds"],
        "prep_seconds": prep_s,
        "eval_seconds": result["eval_seconds"],
        "wall_seconds": time.perf_counter() - t_start,
        "n_params": n_params,
        "machine": info,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "loss_curve": result["losses"],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    print(f"saved model, tokenizer and metrics.json to {out}; wall {metrics['wall_seconds'] / 60:.1f} min")


def load_model(path: str | Path) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """Load a model directory written by `train` (model + tokenizer)."""
    model = GPT2LMHeadModel.from_pretrained(path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return model, tokenizer


def cmd_eval(args: argparse.Namespace) -> None:
    _setup(args)
    model, tokenizer = load_model(args.model)
    blocks = encode_blocks(read_split(args.data_dir, "valid"), tokenizer, model.config.n_positions)
    t0 = time.perf_counter()
    ppl = evaluate_ppl(model, blocks, args.eval_batch_size)
    print(f"validation perplexity {ppl:.3f} ({blocks.shape[0] * (blocks.shape[1] - 1):,} predicted tokens, "
          f"{time.perf_counter() - t0:.1f} s)")


def cmd_bench(args: argparse.Namespace) -> None:
    """Measure training throughput (tokens/s) of one shape on random tokens; no data or tokenizer needed."""
    _setup(args)
    torch.manual_seed(args.seed)
    model = build_model(args.vocab_size, args.n_layer, args.n_embd, args.n_head, args.block_size, args.dropout)
    blocks = torch.randint(0, args.vocab_size, (max(64, 4 * args.batch_size), args.block_size))
    res = train(
        model, blocks, None, args.seconds / 60, args.lr, args.batch_size, warmup=10, log_every=10**9,
        amp_dtype=_amp(args),
    )
    n = sum(p.numel() for p in model.parameters())
    print(
        f"bench L{args.n_layer} d{args.n_embd} T{args.block_size} B{args.batch_size} amp={args.amp}: {n / 1e6:.2f} M params, "
        f"{res['tokens_per_s']:,.0f} tok/s, {res['steps'] / res['train_seconds']:.2f} step/s"
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab-size", type=number_arg(int, 1, what="vocab-size"), default=8192)
    p.add_argument("--n-layer", type=number_arg(int, 1, what="n-layer"), default=6)
    p.add_argument("--n-embd", type=number_arg(int, 1, what="n-embd"), default=384)
    p.add_argument("--n-head", type=number_arg(int, 1, what="n-head"), default=6)
    p.add_argument("--block-size", type=number_arg(int, 2, what="block-size"), default=128)
    p.add_argument("--dropout", type=number_arg(float, 0, 1, what="dropout"), default=0.0,
                   help="dropout probability of the model (default 0, as in the published run, which saw ~1.6 epochs)")
    p.add_argument("--lr", type=number_arg(float, 0, low_open=True, what="lr"), default=2e-3)
    p.add_argument("--batch-size", type=number_arg(int, 1, what="batch-size"), default=16, help="blocks per step")
    p.add_argument("--seed", type=number_arg(int, 0, what="seed"), default=0)
    p.add_argument(
        "--amp", choices=["bf16", "none"], default="bf16",
        help="autocast dtype for training matmuls (bf16 is ~1.6x faster on AVX512-BF16 CPUs); eval is float32",
    )


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=2, help="torch.set_num_threads")
    common.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="the data root, or the folder with wiki.*.tokens (default: $BONDGATE_DATA, else the "
                        "shared data beside the checkout, else bondgate's cache)")
    common.add_argument("--eval-batch-size", type=number_arg(int, 1, what="eval-batch-size"), default=32)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = train_parser = sub.add_parser("train", parents=[common], help="train tokenizer + model, save to --out")
    _add_model_args(p)
    p.add_argument("--minutes", type=number_arg(float, 0, low_open=True, what="minutes"), default=18.0,
                   help="wall-clock budget of the training loop")
    p.add_argument("--warmup", type=number_arg(int, 0, what="warmup"), default=50, help="linear warmup steps")
    p.add_argument("--log-every", type=number_arg(int, 1, what="log-every"), default=25,
                   help="steps between loss logs and schedule re-plans")
    p.add_argument("--out", type=Path, required=True, help="a new or empty directory for the model, tokenizer and "
                   "metrics.json")
    p.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", parents=[common], help="re-evaluate validation perplexity of a saved model")
    ev.add_argument("--model", type=Path, required=True)
    ev.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", parents=[common], help="training throughput of one shape")
    _add_model_args(p)
    p.add_argument("--seconds", type=number_arg(float, 0, low_open=True, what="seconds"), default=45.0)
    p.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import check_dense_model, check_new_out

    if args.cmd == "eval":  # a missing folder would reach the hub as a repo id; a bondgate checkpoint is not the
        # dense model load_model reads
        check_dense_model(ev, args.model, "--model", "make one with python examples/gpt2_wikitext.py train --out DIR")
    if args.cmd == "train":  # before minutes of training: never mix new weights into an old folder
        check_new_out(train_parser, args.out)
    try:
        args.func(args)
    except FileNotFoundError as exc:  # a data file (the loader's message says where it looked)
        parser.exit(1, f"{parser.prog}: error: {exc}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
