"""Compress the GPT-2-architecture LM trained by ``gpt2_wikitext.py`` and heal it by distillation.

    python examples/gpt2_wikitext.py train --minutes 18 --out runs/gpt2-wt2     # the dense model first
    python examples/gpt2_compress.py --model runs/gpt2-wt2 compare              # ours vs baselines, no healing
    python examples/gpt2_compress.py --model runs/gpt2-wt2 heal --ratio 0.5 --minutes 15

Targets: the Conv1D layers of the transformer blocks (attention c_attn/c_proj, MLP c_fc/c_proj); the
LM head is tied to the embedding and stays dense. Quality = WikiText-2 validation perplexity exactly as
``gpt2_wikitext.evaluate_ppl`` computes it. Calibration and distillation use train blocks only.
Results go to benchmarks/results/gpt2_*.{json,md} (``compare --tag T`` writes gpt2_compareT.*: a trial run
leaves the published table alone).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if (ROOT.parent / "shared" / "data").exists():  # a checkout beside the shared data: use it
    os.environ.setdefault("BONDGATE_DATA", str(ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
import gpt2_wikitext as lm  # noqa: E402
from common import add_out_arg, banner, check_dense_model, check_out_dir, machine_info, write_json  # noqa: E402

import bondgate as bg  # noqa: E402
from bondgate.cli import number_arg  # noqa: E402
from bondgate.data import load_text  # noqa: E402

TARGET = r"transformer\.h\..*"


def block_target(name: str, module) -> bool:
    return name.startswith("transformer.h.")


def block_weights(model) -> int:
    """Stored weight values of the transformer blocks' linear layers (biases excluded)."""
    total = 0
    for n, m in model.named_modules():
        if not n.startswith("transformer.h.") or ".controller" in n:
            continue
        if isinstance(m, (bg.MPOLinear, bg.LowRankLinear)):
            total += m.num_params
        elif isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
            total += m.weight.numel()
    return total


def data(tok, block: int):
    train = lm.encode_blocks(load_text("wikitext-2", "train"), tok, block)
    valid = lm.encode_blocks(load_text("wikitext-2", "valid"), tok, block)
    return train, valid


def as_batches(blocks: torch.Tensor, batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(blocks.shape[0], generator=g)
    return [blocks[perm[i:i + batch]] for i in range(0, blocks.shape[0] - batch + 1, batch)]


def compress_method(name: str, dense, calib, ratio: float):
    if name == "bondgate":
        m = copy.deepcopy(dense)
        # MPO layers only, as the published figures were made (the library's default may also choose low-rank pairs)
        bg.compress(m, bg.CompressionConfig(param_ratio=ratio, target_modules=TARGET, kinds="mpo"), calibration=calib,
                    progress=False)
        return m
    if name == "tt-svd uniform":
        m = copy.deepcopy(dense)
        bg.compress(m, bg.CompressionConfig(param_ratio=ratio, target_modules=TARGET, allocation="uniform",
                                            calibrate=False), progress=False)
        return m
    if name == "svd":
        return bg.svd_compress(dense, param_ratio=ratio, target=block_target)[0]
    if name == "magnitude prune":
        return bg.magnitude_prune(dense, param_ratio=ratio, target=block_target)[0]
    if name == "int8 dynamic":
        return bg.quantize_int8(dense, target=block_target)
    raise ValueError(name)


def cmd_compare(args) -> None:
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(banner(info), flush=True)
    dense, tok = lm.load_model(args.model)
    block = dense.config.n_positions
    train, valid = data(tok, block)
    valid = valid[: args.valid_blocks] if args.valid_blocks else valid
    calib = [b for b in as_batches(train, 16, seed=1)[: args.calibration_batches]]
    lat_in = (train[:8],)
    rows = [{"method": "dense", "ratio": 1.0, "weights": block_weights(dense), "ppl": lm.evaluate_ppl(dense, valid),
             "mb": bg.size_on_disk(dense) / 1e6,
             "latency_ms": 1e3 * bg.latency(dense, lat_in, reps=10, threads=args.threads)["median"]}]
    print(rows[-1], flush=True)
    for ratio in args.ratios:
        for method in args.methods:
            if method == "int8 dynamic" and ratio != args.ratios[0]:
                continue
            t0 = time.time()
            m = compress_method(method, dense, calib, ratio)
            secs = time.time() - t0
            rows.append({"method": method, "ratio": None if method == "int8 dynamic" else ratio,
                         "weights": None if method == "int8 dynamic" else block_weights(m),
                         "ppl": lm.evaluate_ppl(m, valid),
                         "mb": bg.size_on_disk(m, sparse=method == "magnitude prune") / 1e6,
                         "latency_ms": 1e3 * bg.latency(m, lat_in, reps=10, threads=args.threads)["median"],
                         "compress_s": secs})
            print(rows[-1], flush=True)
    write_json(args.results / f"gpt2_compare{args.tag}.json", {"machine": info, "rows": rows, "valid_blocks": int(valid.shape[0])})
    lines = [f"Machine: {banner(info)}", "", f"Validation blocks: {int(valid.shape[0])} x {block} tokens.", "",
             "| method | target ratio | block linear weights | val perplexity | size on disk (MB) | "
             f"latency, 8x{block} tokens (ms) |", "|---|---|---|---|---|---|"]
    for r in rows:
        w = "-" if r["weights"] is None else f"{r['weights']:,}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['method']} | {ratio} | {w} | {r['ppl']:.2f} | {r['mb']:.1f} | {r['latency_ms']:.0f} |")
    (args.results / f"gpt2_compare{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def cmd_heal(args) -> None:
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(banner(info), flush=True)
    dense, tok = lm.load_model(args.model)
    block = dense.config.n_positions
    train, valid = data(tok, block)
    batches = as_batches(train, args.batch, seed=2)
    calib = batches[: args.calibration_batches]
    dense_ppl = lm.evaluate_ppl(dense, valid)
    t0 = time.time()
    student = compress_method("bondgate", dense, calib, args.ratio)
    compress_s = time.time() - t0
    before = lm.evaluate_ppl(student, valid)
    print(f"dense ppl {dense_ppl:.2f}; ratio {args.ratio}: compressed in {compress_s:.0f}s, ppl {before:.2f}",
          flush=True)
    probe = valid[: args.probe_blocks]
    res = bg.distill(student, dense, [{"input_ids": b} for b in batches[args.calibration_batches:]],
                     loss=bg.DistillLoss(hidden=1.0, logits=1.0, temperature=1.0), max_minutes=args.minutes,
                     budget_clock=args.clock,
                     lr=args.lr, eval_fn=lambda m: lm.evaluate_ppl(m, probe), higher_is_better=False,
                     eval_every=args.eval_every, patience=args.patience, progress=not args.no_progress)
    after = lm.evaluate_ppl(student, valid)
    out_dir = Path(args.out or ROOT / "runs" / f"gpt2-wt2-{round(args.ratio * 100)}{args.tag}")
    bg.save_pretrained(student, out_dir, tokenizer=tok)
    result = {"machine": info, "ratio": args.ratio, "weights": block_weights(student),
              "dense_weights": block_weights(dense), "dense_ppl": dense_ppl, "ppl_before": before,
              "ppl_after": after, "ppl_ratio": after / dense_ppl, "compress_seconds": compress_s,
              "distill_seconds": res.seconds - res.eval_seconds, "distill_budget_seconds": res.budget_seconds,
              "budget_clock": args.clock, "steps": res.steps, "stopped": res.stopped,
              "history": res.history, "args": vars(args), "checkpoint": str(out_dir)}
    write_json(args.results / f"gpt2_heal_{round(args.ratio * 100)}{args.tag}.json", result)
    print({k: v for k, v in result.items() if k not in ("history", "machine")})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=2)
    ap.add_argument("--model", default=str(ROOT / "runs" / "gpt2-wt2"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--ratios", type=number_arg(float, 0, 1, low_open=True, what="ratio"), nargs="+", default=[0.5])
    c.add_argument("--methods", nargs="+", default=["bondgate", "tt-svd uniform", "svd", "magnitude prune",
                                                     "int8 dynamic"],
                   choices=["bondgate", "tt-svd uniform", "svd", "magnitude prune", "int8 dynamic"])
    c.add_argument("--calibration-batches", type=number_arg(int, 1, what="calibration-batches"), default=16)
    c.add_argument("--valid-blocks", type=number_arg(int, 0, what="valid-blocks"), default=0, help="0 = all")
    c.add_argument("--tag", default="", help="suffix of the results files (default: the published gpt2_compare.*)")
    h = sub.add_parser("heal")
    h.add_argument("--ratio", type=number_arg(float, 0, 1, low_open=True, what="ratio"), default=0.5)
    h.add_argument("--tag", default="", help="suffix of the results file and run folder (default: the published "
                                            "gpt2_heal_<ratio>.json)")
    h.add_argument("--minutes", type=number_arg(float, 0, low_open=True, what="minutes"), default=15.0)
    h.add_argument("--lr", type=number_arg(float, 0, low_open=True, what="lr"), default=3e-4)
    h.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                   help="budget clock: cpu = process CPU time / threads (fair on a shared machine)")
    h.add_argument("--batch", type=number_arg(int, 1, what="batch"), default=16)
    h.add_argument("--calibration-batches", type=number_arg(int, 1, what="calibration-batches"), default=16)
    h.add_argument("--eval-every", type=number_arg(int, 1, what="eval-every"), default=100)
    h.add_argument("--probe-blocks", type=number_arg(int, 1, what="probe-blocks"), default=200,
                   help="early stopping keeps the best weights on the first N validation blocks (part of the "
                        "validation perplexity reported)")
    h.add_argument("--patience", type=number_arg(int, 1, what="patience"), default=4)
    h.add_argument("--out", default=None)
    h.add_argument("--no-progress", action="store_true")
    for p in (c, h):
        add_out_arg(p, "--results")
    args = ap.parse_args(argv)
    check_out_dir({"compare": c, "heal": h}[args.cmd], args.results, "--results")
    check_dense_model(ap, args.model, "--model", "train it first: python examples/gpt2_wikitext.py train --out "
                     "runs/gpt2-wt2")
    try:
        {"compare": cmd_compare, "heal": cmd_heal}[args.cmd](args)
    except FileNotFoundError as exc:  # a data file (the loader's message says where it looked)
        ap.exit(1, f"{ap.prog}: error: {exc}\n")


if __name__ == "__main__":
    main()
