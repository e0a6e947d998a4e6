"""A recurrent language model, compressed: 2-layer LSTM on Penn Treebank (the "Deep Learning from Scratch 2" model).

1. ``train``: word-level LSTM LM (tied input/output embeddings, dropout), trained for ``--minutes`` on PTB train with
   Adam on windows of 35 tokens, saved with ``bondgate.save``.
2. ``compress``: loads it, compresses the LSTM's weight matrices (``nn.LSTM`` -> :class:`bondgate.Recurrent`,
   whose ``ih_l*`` / ``hh_l*`` projections become MPO layers) to ``--ratio`` of their weights with calibration on PTB
   train, heals the student by distillation from the dense model (KL to the teacher's next-token distribution plus
   the task loss) for ``--minutes``, and reports PTB **valid** perplexity, weights, bytes on disk and eval speed
   against the dense model, in ``benchmarks/results/ptb_lstm<tag>.{json,md}`` (``--results DIR``: in DIR); beside it, truncated SVD and
   magnitude pruning of the same matrices at the same weights per matrix (before healing).

Perplexity is measured over the whole valid stream laid out in 10 columns, read in windows of 70 tokens, the hidden
state carried from one window to the next. The test split is never read. Examples::

    python examples/ptb_lstm.py train --minutes 20 --out runs/ptb-lstm
    python examples/ptb_lstm.py compress --dense runs/ptb-lstm --ratio 0.5 --minutes 15 --tag _50 --out runs/ptb-lstm-50
    python examples/ptb_lstm.py control --steps 2948 --tag _50   # the same healing on dense and on SVD

The functions are imported by the tests: ``sys.path.insert(0, "<repo>/examples"); import ptb_lstm``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import bondgate
from bondgate.cli import number_arg
from bondgate.data import load_text
from bondgate.io import read_metadata, save_target

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"  # where the default model folders are, wherever the script is run from


# ---------------------------------------------------------------------------------------------- data
class Vocab:
    """Word ids of a PTB-style corpus (the words of the train split, ``<eos>`` at each line end)."""

    def __init__(self, text: str) -> None:
        words = sorted({w for line in text.splitlines() for w in line.split()} | {"<eos>"})
        self.itos = words
        self.stoi = {w: i for i, w in enumerate(words)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> torch.Tensor:
        """All ids of ``text`` in order, ``<eos>`` after every non-empty line; unknown words -> ``<unk>``."""
        unk = self.stoi.get("<unk>")
        ids = []
        for line in text.splitlines():
            words = line.split()
            if not words:
                continue
            for w in words:
                i = self.stoi.get(w, unk)
                if i is None:
                    raise ValueError(f"word {w!r} is not in the vocabulary and there is no <unk>")
                ids.append(i)
            ids.append(self.stoi["<eos>"])
        return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, length: int, batch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """One epoch of training batches: ``{"ids": (batch, length), "targets": (batch, length)}`` (next tokens),
    from non-overlapping windows in a shuffled order."""
    n = (ids.numel() - 1) // length
    if n < batch:  # an epoch without a batch: a training loop over epochs would never end
        raise ValueError(f"{ids.numel():,} tokens hold {n} windows of {length} (+1) tokens, fewer than one batch of "
                         f"{batch}")
    starts = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) * length
    out = []
    for k in range(0, n - batch + 1, batch):
        s = starts[k: k + batch, None] + torch.arange(length)
        out.append({"ids": ids[s], "targets": ids[s + 1]})
    return out


# ---------------------------------------------------------------------------------------------- model
@dataclass
class LMOutput:
    logits: torch.Tensor  # (batch, length, vocab)
    loss: torch.Tensor | None = None  # mean next-token cross entropy (nats) when targets are given
    hidden: tuple | None = None  # the LSTM state after the last token


class LSTMLM(nn.Module):
    """Embedding -> dropout -> 2-layer LSTM -> dropout -> linear head tied to the embedding."""

    def __init__(self, vocab: int, dim: int = 256, layers: int = 2, dropout: float = 0.3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(dropout)
        self.rnn = nn.LSTM(dim, dim, layers, batch_first=True, dropout=dropout)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.embed.weight
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None, hidden: tuple | None = None) -> LMOutput:
        h, hidden = self.rnn(self.drop(self.embed(ids)), hidden)
        logits = self.head(self.drop(h))
        loss = None if targets is None else nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return LMOutput(logits, loss, hidden)


def build(vocab: int, dim: int = 256, layers: int = 2, dropout: float = 0.3, seed: int = 0) -> LSTMLM:
    torch.manual_seed(seed)
    return LSTMLM(vocab, dim, layers, dropout)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch: int = 10, bptt: int = 70) -> float:
    """exp(mean next-token cross entropy) over ``ids`` laid out in ``batch`` columns, state carried across windows."""
    was = model.training
    model.eval()
    if ids.numel() < 2 * batch:
        raise ValueError(f"perplexity needs at least {2 * batch} tokens ({batch} columns of 2), got {ids.numel()}")
    cols = ids[: (ids.numel() // batch) * batch].view(batch, -1)
    total, count, hidden = 0.0, 0, None
    for s in range(0, cols.shape[1] - 1, bptt):
        x, y = cols[:, s: s + bptt], cols[:, s + 1: s + 1 + bptt]
        x = x[:, : y.shape[1]]
        out = model(x, y, hidden)
        hidden = out.hidden
        total += float(out.loss) * y.numel()
        count += y.numel()
    model.train(was)
    return math.exp(total / count)


# ---------------------------------------------------------------------------------------------- steps
def train_dense(model: LSTMLM, train_ids: torch.Tensor, minutes: float, bptt: int = 35, batch: int = 32,
                lr: float = 2e-3, progress: bool = True, log=print) -> dict:
    """Adam with a cosine schedule over ``minutes`` of CPU time (process time / threads: fair on a shared machine)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    threads = max(torch.get_num_threads(), 1)
    start, budget = time.process_time(), minutes * 60
    model.train()
    steps, epoch = 0, 0
    while True:
        for b in windows(train_ids, bptt, batch, seed=epoch):
            used = (time.process_time() - start) / threads
            if used >= budget:
                return {"steps": steps, "epochs": epoch, "cpu_minutes": used / 60}
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * used / budget))
            loss = model(b["ids"], b["targets"]).loss
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            steps += 1
            if progress and steps % 200 == 0:
                log(f"step {steps} epoch {epoch} loss {loss.item():.3f} ({used / 60:.1f} min)")
        epoch += 1


def _size_bytes(model: nn.Module, path: Path) -> int:
    bondgate.save(model, path)
    return sum(f.stat().st_size for f in path.iterdir())


def _eval_speed(models: dict[str, nn.Module], ids: torch.Tensor, rows: int, length: int,
                rounds: int = 5) -> dict[str, float]:
    """Tokens/s of one forward over ``rows`` sequences of ``length`` tokens, interleaved rounds (median)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import time_interleaved

    x = ids[: rows * length]
    x = x.view(rows, length, *x.shape[1:])  # token ids, or (tokens, features) inputs
    fns = {}
    for name, m in models.items():
        m.eval()
        fns[name] = (lambda m=m: m(x))
    with torch.inference_mode():
        secs = time_interleaved(fns, rounds=rounds)
    return {k: rows * length / v for k, v in secs.items()}


def heal(student: nn.Module, teacher: nn.Module, data: list, lr: float = 1e-3, minutes: float | None = None,
         steps: int | None = None, progress: bool = True) -> int:
    """Distill ``student`` from ``teacher`` (KL to its next-token distribution + the task loss, cosine schedule) for
    ``minutes`` of CPU time or ``steps`` steps; returns the steps taken."""
    res = bondgate.distill(student, teacher, data, loss=bondgate.DistillLoss(hidden=0, logits=1.0, task=1.0,
                                                                           temperature=1.0),
                           max_minutes=minutes, steps=steps, budget_clock="cpu", lr=lr, progress=progress,
                           log_every=200, patience=None, eval_fn=None)
    return res.steps


def baselines(dense: LSTMLM, student: nn.Module, valid_ids: torch.Tensor) -> dict[str, float]:
    """Valid perplexity of truncated SVD and magnitude pruning of the dense LSTM's matrices, each storing as many
    weights per matrix as the student's (no healing)."""
    unrolled = copy.deepcopy(dense)
    unrolled.rnn = bondgate.Recurrent.from_torch(unrolled.rnn)  # the matrices as modules, for the baselines
    budget = bondgate.baselines.mpo_budget(student)
    svd, _ = bondgate.svd_compress(unrolled, params=budget)
    pruned, _ = bondgate.magnitude_prune(unrolled, params=budget)
    return {"svd": perplexity(svd, valid_ids), "magnitude prune": perplexity(pruned, valid_ids)}


def compress_and_heal(dense: LSTMLM, vocab: Vocab, train_ids: torch.Tensor, valid_ids: torch.Tensor, ratio: float,
                      minutes: float, calib_batches: int = 16, bptt: int = 35, batch: int = 32, lr: float = 1e-3,
                      progress: bool = True, target: str = "rnn", steps: int | None = None,
                      kinds: list[str] | None = ("mpo",)) -> tuple[nn.Module, dict]:
    """Compress ``dense``'s LSTM to ``ratio`` of its weights, heal it by distillation; returns (student, figures).
    ``kinds``: the forms a matrix may take (MPO only by default, as the published figures were made; ``None``: the
    library's default)."""
    dense.eval()
    data = windows(train_ids, bptt, batch, seed=123)
    calib = [{"ids": b["ids"]} for b in data[:calib_batches]]
    student = copy.deepcopy(dense)
    t0 = time.perf_counter()
    bondgate.compress(student, bondgate.CompressionConfig(param_ratio=ratio, target_modules=[target],
                                                          kinds=tuple(kinds) if kinds else None),
                      calibration=calib, progress=progress)
    figures = {"compress_seconds": time.perf_counter() - t0,
               "report": student.bondgate_report.to_dict(),
               "ppl_compressed": perplexity(student, valid_ids),
               "baselines": baselines(dense, student, valid_ids)}
    if steps:
        figures["heal_steps"] = heal(student, dense, data, lr, steps=steps, progress=progress)
    elif minutes > 0:
        figures["heal_steps"] = heal(student, dense, data, lr, minutes=minutes, progress=progress)
    figures["ppl_healed"] = perplexity(student, valid_ids)
    return student, figures


# ---------------------------------------------------------------------------------------------- CLI
DATA_LAYOUT = ("a data root: a folder holding ptb/ptb.train.txt and ptb/ptb.valid.txt (or the ptb folder itself, "
               "holding ptb.train.txt and ptb.valid.txt)")


def _data_file_error(data: str | None) -> str | None:
    """Why ``data`` cannot be the data root (it is a file), else None. The loader takes a file as-is for any split,
    so one file would be read as train and as valid, and "valid" perplexity measured on the training text."""
    if data is not None and Path(data).expanduser().is_file():
        return f"{str(data)!r} is a file, not a folder; pass {DATA_LAYOUT} (one file would be read as both splits)"
    return None


def _corpus(data: str | None) -> tuple[Vocab, torch.Tensor, torch.Tensor]:
    """The vocabulary (of train) and the train and valid ids of PTB under the data root ``data`` (None:
    ``$BONDGATE_DATA`` or the cache). ``ValueError`` for a file: see :func:`_data_file_error`."""
    problem = _data_file_error(data)
    if problem:
        raise ValueError(problem)
    train_text = load_text("ptb", "train", data)
    vocab = Vocab(train_text)
    return vocab, vocab.encode(train_text), vocab.encode(load_text("ptb", "valid", data))


def _result_files(name: str, tag: str, folder: Path = ROOT / "benchmarks" / "results") -> tuple[Path, Path]:
    """The .json and .md files a report ``name`` + ``tag`` goes to in ``folder``: the suffix appended, so a
    tag with a dot keeps it (``Path.with_suffix`` made ``ptb_lstm_0.5`` ``ptb_lstm_0.json``, another run's file)."""
    out = Path(folder) / f"{name}{tag}"
    return out.parent / (out.name + ".json"), out.parent / (out.name + ".md")


def _check_tag(parser: argparse.ArgumentParser, tag: str) -> None:
    """A usage error (exit 2) for a ``--tag`` that is no part of a file name, before the run rather than at its end."""
    bad = next((c for c in ("/", os.sep, os.altsep, "\0") if c and c in tag), None)
    if bad is not None:
        parser.error(f"argument --tag: {tag!r} holds {bad!r}; the tag ends the results' file names "
                     "(benchmarks/results/ptb_lstm<tag>.json), it cannot name a folder")


def _check_save_dir(parser: argparse.ArgumentParser, path: str, flag: str = "--out") -> None:
    """A usage error (exit 2) unless ``bondgate.save`` can make or replace the checkpoint directory ``path``: found
    out before the run rather than when its model is saved at the end."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        parser.error(f"argument {flag}: {path!r} exists and is not a directory (a checkpoint is a directory)")
    try:
        p = save_target(p)
    except ValueError as exc:  # the working directory or one of its parents
        parser.error(f"argument {flag}: {exc}")
    parent = p.parent  # save writes beside the target, then swaps it in: its nearest existing folder must take files
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        parser.error(f"argument {flag}: cannot make the directory {path!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        parser.error(f"argument {flag}: cannot make the directory {path!r}: {str(parent)!r} is not writable")


def _dense_dim(parser: argparse.ArgumentParser, path: str) -> int:
    """The hidden size the ``train`` subcommand recorded in the dense checkpoint ``path``'s report; a usage error
    (exit 2) for any other checkpoint (a compressed one, say)."""
    what = "--dense must be the output folder of python examples/ptb_lstm.py train (the dense model)"
    try:
        meta = read_metadata(path)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"argument --dense: {exc}; {what}")
    report = meta.get("report")
    dim = report.get("dim") if isinstance(report, dict) else None
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        parser.error(f"argument --dense: the checkpoint {path!r} records no hidden size ('dim' in its report), so it "
                     f"is not a dense model made by the train subcommand; {what}")
    return dim


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the dense LSTM LM and save it")
    t.add_argument("--minutes", type=number_arg(float, 0, low_open=True, what="minutes"), default=20.0,
                   help="CPU-time budget (process time / threads)")
    t.add_argument("--dim", type=number_arg(int, 1, what="dim"), default=256)
    t.add_argument("--out", default=str(RUNS / "ptb-lstm"))
    c = sub.add_parser("compress", help="compress the saved dense model's LSTM, heal it, report valid perplexity")
    c.add_argument("--dense", default=str(RUNS / "ptb-lstm"))
    c.add_argument("--ratio", type=number_arg(float, 0, 1, low_open=True, what="ratio"), default=0.5,
                   help="fraction of the LSTM's weights kept")
    c.add_argument("--minutes", type=number_arg(float, 0, what="minutes"), default=15.0,
                   help="healing budget (CPU time); 0 = no healing")
    c.add_argument("--steps", type=number_arg(int, 1, what="steps"), default=None,
                   help="heal for this many steps instead of --minutes")
    c.add_argument("--kinds", nargs="+", default=["mpo"], choices=["mpo", "lowrank"],
                   help="the forms a matrix may take (CompressionConfig.kinds; default: MPO only)")
    c.add_argument("--tag", default="")
    c.add_argument("--out", default=None, help="save the healed model here")
    k = sub.add_parser("control", help="the same healing recipe for as many steps on the dense model and on "
                       "truncated SVD at the compressed model's weights per matrix")
    k.add_argument("--dense", default=str(RUNS / "ptb-lstm"))
    k.add_argument("--compressed", default=str(RUNS / "ptb-lstm-50"), help="the compressed model (its weights per matrix)")
    k.add_argument("--steps", type=number_arg(int, 1, what="steps"), required=True,
                   help="healing steps (the compress run's heal_steps)")
    k.add_argument("--tag", default="")
    v = sub.add_parser("speed", help="eval tokens/s of the dense and the compressed model (interleaved rounds)")
    v.add_argument("--dense", default=str(RUNS / "ptb-lstm"))
    v.add_argument("--compressed", default=str(RUNS / "ptb-lstm-50"))
    v.add_argument("--rounds", type=number_arg(int, 1, what="rounds"), default=15)
    v.add_argument("--tag", default="")
    for q in (c, k, v):
        q.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", metavar="DIR",
                       help="directory the result files are written to (created if missing; default: "
                       "benchmarks/results, the published results)")
    for q in (t, c, k, v):
        q.add_argument("--data", default=None, help="data root, a folder holding ptb/ptb.train.txt and "
                       "ptb/ptb.valid.txt (default: $BONDGATE_DATA or the cache)")
        q.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=None)
        q.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    # the command as given, for the reports (every flag that shaped the figures, --compressed and --out included)
    args.command = "python examples/ptb_lstm.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import banner, check_checkpoint, check_out_dir, machine_info

    parser = {"train": t, "compress": c, "control": k, "speed": v}[args.cmd]
    # the flags' checks, all before the corpus is read and any work starts
    problem = _data_file_error(args.data)
    if problem:
        parser.error(f"argument --data: {problem}")
    if args.cmd in ("train", "compress") and args.out:
        _check_save_dir(parser, args.out)
    if args.cmd != "train":
        _check_tag(parser, args.tag)
        check_out_dir(parser, args.results, "--results")
        check_checkpoint(parser, args.dense, "--dense", "make one with python examples/ptb_lstm.py train")
    if args.cmd in ("control", "speed"):
        check_checkpoint(parser, args.compressed, "--compressed", "make one with python examples/ptb_lstm.py "
                         "compress --out DIR")
    dim = None if args.cmd == "train" else _dense_dim(parser, args.dense)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        vocab, train_ids, valid_ids = _corpus(args.data)
    except (FileNotFoundError, ValueError) as exc:  # the loader's message says where it looked, or what is wrong
        p.exit(1, f"{p.prog}: error: {exc}\n")
    if args.cmd == "train":
        machine = machine_info()
        print(banner(machine), flush=True)
        model = build(len(vocab), args.dim)
        info = train_dense(model, train_ids, args.minutes, progress=not args.no_progress)
        ppl = perplexity(model, valid_ids)
        print(f"dense: valid perplexity {ppl:.2f} after {info['steps']} steps ({info['cpu_minutes']:.1f} CPU min)")
        bondgate.save(model.eval(), args.out, report={"valid_ppl": ppl, "dim": args.dim, **info, "machine": machine})
        return 0
    dense = bondgate.load(args.dense, model=build(len(vocab), dim))
    info = machine_info()
    if args.cmd == "control":
        return control(args, dense, vocab, train_ids, valid_ids, info, banner(info))
    if args.cmd == "speed":
        return speed_report(args, dense, vocab, valid_ids, info, banner(info))
    ppl_dense = perplexity(dense, valid_ids)
    student, fig = compress_and_heal(dense, vocab, train_ids, valid_ids, args.ratio, args.minutes,
                                     progress=not args.no_progress, steps=args.steps, kinds=args.kinds)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        bytes_dense = _size_bytes(dense, Path(tmp) / "dense")
        bytes_student = _size_bytes(student, Path(tmp) / "student")
    speed = {rows: _eval_speed({"dense": dense, "compressed": student}, valid_ids, rows, 35) for rows in (1, 32)}
    rep = student.bondgate_report
    result = {"machine": info, "ratio": args.ratio, "heal_minutes": None if args.steps else args.minutes,
              "kinds": args.kinds, "ppl_dense": ppl_dense, **fig,
              "lstm_weights_before": rep.params_before, "lstm_weights_after": rep.params_after,
              "model_weights_dense": sum(p.numel() for p in dense.parameters()),
              "model_weights_compressed": sum(p.numel() for p in student.parameters()),
              "bytes_dense": bytes_dense, "bytes_compressed": bytes_student,
              "tokens_per_s": {str(k): v for k, v in speed.items()}}
    out_json, out_md = _result_files("ptb_lstm", args.tag, args.results)
    out_json.write_text(json.dumps(result, indent=1, default=str))
    healed = f"{args.steps} steps" if args.steps else f"{args.minutes:g} CPU min"
    lines = [f"# PTB LSTM LM, LSTM weights at {args.ratio:.0%}, healed {healed}", "",
             f"`{args.command}`", "", banner(info), "",
             "| model | LSTM weights | all weights | bytes on disk | valid ppl |", "|---|---|---|---|---|",
             f"| dense | {rep.params_before:,} | {result['model_weights_dense']:,} | {bytes_dense:,} | {ppl_dense:.2f} |",
             f"| compressed, before healing | {rep.params_after:,} | {result['model_weights_compressed']:,} | "
             f"{bytes_student:,} | {fig['ppl_compressed']:.2f} |",
             f"| truncated SVD, same weights per matrix, no healing | {rep.params_after:,} | | | "
             f"{fig['baselines']['svd']:.2f} |",
             f"| magnitude pruning, same non-zeros per matrix, no healing | {rep.params_after:,} | | | "
             f"{fig['baselines']['magnitude prune']:.2f} |",
             f"| compressed, healed | {rep.params_after:,} | {result['model_weights_compressed']:,} | {bytes_student:,} | "
             f"{fig['ppl_healed']:.2f} |", "",
             "Eval forward, tokens/s (35-token sequences, median of 5 interleaved rounds; a quick check, noisy at "
             "this length: the speed figures are `python examples/ptb_lstm.py speed`'s, ptb_lstm_speed<tag>.md):", "",
             "| sequences | dense | compressed | ratio |", "|---|---|---|---|"]
    for rows, s in speed.items():
        lines.append(f"| {rows} | {s['dense']:.0f} | {s['compressed']:.0f} | {s['compressed'] / s['dense']:.2f}x |")
    lines += ["", str(rep)]
    out_md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.out:
        bondgate.save(student, args.out)
    return 0


def speed_report(args, dense: LSTMLM, vocab: Vocab, valid_ids: torch.Tensor, info: dict, machine: str) -> int:
    """Eval forward tokens/s of the dense and the compressed model, and of their LSTMs alone."""
    compressed = bondgate.load(args.compressed, model=build(len(vocab), dense.embed.embedding_dim))
    lines = [f"# PTB LSTM LM: eval speed, dense vs compressed ({args.rounds} interleaved rounds, median)", "",
             f"`{args.command}`",
             "", machine, "", "Tokens/s; *stepped* is the compressed LSTM stepping through time in Python (its path "
             "when a projection is gated or hooked) instead of torch's fused kernel on its dense weights.", "",
             "| sequences x 35 tokens | part | dense | compressed | ratio | compressed, stepped | ratio |",
             "|---|---|---|---|---|---|---|"]
    result = {}
    stepped = copy.deepcopy(compressed.rnn)
    stepped.fused = False
    for rows in (1, 32):
        whole = _eval_speed({"dense": dense, "compressed": compressed}, valid_ids, rows, 35, args.rounds)
        x = dense.embed(valid_ids[: rows * 35].view(rows, 35)).detach()
        lstm = _eval_speed({"dense": _First(dense.rnn), "compressed": _First(compressed.rnn),
                            "stepped": _First(stepped)}, x.flatten(0, 1), rows, 35, args.rounds)
        for part, r in (("whole model", whole), ("LSTM only", lstm)):
            result[f"{rows} {part}"] = r
            step = f"{r['stepped']:.0f} | {r['stepped'] / r['dense']:.3f}x" if "stepped" in r else "| "
            lines.append(f"| {rows} | {part} | {r['dense']:.0f} | {r['compressed']:.0f} | "
                         f"{r['compressed'] / r['dense']:.3f}x | {step} |")
    out_json, out_md = _result_files("ptb_lstm_speed", args.tag, args.results)
    out_json.write_text(json.dumps({"machine": info, "tokens_per_s": result}, indent=1))
    out_md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


class _First(nn.Module):
    """A recurrent module's output sequence only."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def control(args, dense: LSTMLM, vocab: Vocab, train_ids: torch.Tensor, valid_ids: torch.Tensor, info: dict,
            machine: str) -> int:
    """What healing alone buys: the compress run's recipe and steps applied to the dense model itself and to
    truncated SVD at the compressed model's weights per matrix."""
    data = windows(train_ids, 35, 32, seed=123)  # compress_and_heal's batches
    compressed = bondgate.load(args.compressed, model=build(len(vocab), dense.embed.embedding_dim))
    unrolled = copy.deepcopy(dense)
    unrolled.rnn = bondgate.Recurrent.from_torch(unrolled.rnn)
    svd, _ = bondgate.svd_compress(unrolled, params=bondgate.baselines.mpo_budget(compressed))
    rows = {"dense": perplexity(dense, valid_ids), "compressed (loaded)": perplexity(compressed, valid_ids)}
    for name, student in (("dense, healed the same way", copy.deepcopy(dense)), ("truncated SVD, healed", svd)):
        before = perplexity(student, valid_ids)
        steps = heal(student, dense, data, steps=args.steps, progress=not args.no_progress)
        rows[name] = perplexity(student, valid_ids)
        rows[name + " (before)"] = before
        print(f"{name}: {before:.2f} -> {rows[name]:.2f} after {steps} steps", flush=True)
    out_json, out_md = _result_files("ptb_lstm_control", args.tag, args.results)
    out_json.write_text(json.dumps({"machine": info, "steps": args.steps, "valid_ppl": rows},
                                                   indent=1))
    lines = [f"# PTB LSTM LM: the healing recipe alone ({args.steps} steps)", "",
             f"`{args.command}`",
             "", machine, "", "| model | valid ppl |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in rows.items()]
    out_md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
