"""Ablation: gradual bond truncation ("annealing") against one-shot compression, stories260K at 50%.

    python benchmarks/stories_anneal.py --minutes 20 --anneal 0.5 --threads 1

One-shot (``examples/stories_compress.py``): factor every targeted layer at its final bonds, then heal. Here the
student starts as the dense model and trains by the same distillation loss; after every step each targeted
weight ``W`` is pulled toward its truncation ``W_r`` (TT-SVD at the bonds the one-shot allocation chose):
``W <- W_r + rho (W - W_r)``, with ``rho`` set so that the tail left of the original would shrink linearly to 0
at ``--anneal`` of the budget. There the weights are factored (``W = W_r`` up to the tail the last step
refilled) and the factored student heals for the rest of the budget. Same data, loss, optimizer, learning-rate
schedule and CPU-clock budget as the script's one-shot run; the result is compared with that run's figure.
Writes ``benchmarks/results/stories_anneal.{json,md}`` (``--out DIR``: into DIR instead).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
import stories_compress as sc  # noqa: E402
from common import add_out_arg, args_dict, banner, command_line, machine_info, write_json, write_text  # noqa: E402

import bondgate as bg  # noqa: E402
from bondgate.cli import number_arg  # noqa: E402
from bondgate.llama2c import tinystories_perplexity  # noqa: E402
from bondgate.mpo import MPO  # noqa: E402


def factor(W: torch.Tensor, out_f, in_f, bonds) -> MPO:
    """TT-SVD of ``W`` at the given legs (zero-padded to their products, as ``compress`` pads) and bonds."""
    N, M = W.shape
    A = torch.nn.functional.pad(W.detach(), (0, math.prod(in_f) - M, 0, math.prod(out_f) - N))
    m = MPO.from_matrix(A, out_factors=out_f, in_factors=in_f, max_bond=list(bonds))
    return MPO(m.cores, out_features=N, in_features=M)


def setup(ap: argparse.ArgumentParser, argv) -> tuple:
    """The arguments the stories ablations share, parsed; ``(args, machine info, (dense, tokenizer, sample path),
    (calibration stories, validation stories, training batches))`` with the stories, split and rows of
    ``examples/stories_compress.py`` (seed 0, 512-token rows, 4 per step)."""
    ap.add_argument("--lr", type=number_arg(float, 0, low_open=True, what="lr"), default=3e-3)
    ap.add_argument("--steps", type=number_arg(int, 1, what="steps"), default=None,
                    help="a budget in steps instead of --minutes (tests)")
    ap.add_argument("--samples", type=number_arg(int, 1, what="samples"), default=4096,
                    help="as examples/stories_compress.py")
    ap.add_argument("--stories-cache", default=str(ROOT / "runs" / "stories_4096.json"))
    ap.add_argument("--max-len", type=number_arg(int, 2, what="max-len"), default=None)
    ap.add_argument("--calib-stories", type=number_arg(int, 1, what="calib-stories"), default=64)
    ap.add_argument("--valid-stories", type=number_arg(int, 1, what="valid-stories"), default=100)
    ap.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=1)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine_info()
    print(banner(info), flush=True)
    dense, tok, sample = sc.load()
    data = argparse.Namespace(**vars(args), seed=0, gen_batch=256, block=512, batch=4)
    return args, info, (dense, tok, sample), sc.healing_data(dense, tok, sample, data)


def report(out: dict, script: str, body: str, tag: str, directory: Path) -> None:
    """Print the result (machine, command, ``body``, perplexities); with ``tag`` also write
    ``DIRECTORY/stories_TAG.{json,md}``."""
    command = out.get("command") or f"python benchmarks/{script} {out['argv']}"
    md = (f"Machine: {banner(out['machine'])}\n\nCommand: `{command}`\n\n{body} "
          f"**sample ppl {out['sample_ppl']:.4f}** ({out['sample_ppl'] / out['dense_ppl'] - 1:+.1%} vs dense "
          f"{out['dense_ppl']:.4f}), validation {out['valid_ppl']:.4f}.\n")
    print(md)
    if tag:
        write_json(directory / f"stories_{tag}.json", out)
        write_text(directory / f"stories_{tag}.md", md)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=number_arg(float, 0, low_open=True, what="minutes"), default=20.0,
                    help="whole budget (annealing + healing), CPU clock")
    ap.add_argument("--anneal", type=number_arg(float, 0, 1, low_open=True, high_open=True, what="anneal"), default=0.5,
                    help="fraction of the budget spent annealing")
    ap.add_argument("--ratio", type=number_arg(float, 0, 1, low_open=True, what="ratio"), default=0.5)
    ap.add_argument("--tag", default="anneal")
    args, info, (dense, tok, sample), (calib_st, valid_st, train) = setup(ap, argv)
    one_shot = sc.compress(dense, sc.story_batches(calib_st, 16, seed=0), args.ratio, 2)
    plan = {r.name: (r.out_factors, r.in_factors, r.bond_dims)
            for r in one_shot.bondgate_report.layers if r.status == "compressed"}

    student = copy.deepcopy(dense).requires_grad_(True)
    dense.requires_grad_(False).eval()
    mods = dict(student.named_modules())
    loss_fn = bg.DistillLoss(hidden=1.0, logits=1.0, temperature=1.0)  # the script's default loss

    def lr_at(f: float) -> float:  # distill()'s schedule: 5% linear warmup, cosine to 0
        return args.lr * min(1.0, f / 0.05) * 0.5 * (1 + math.cos(math.pi * min(f, 1.0)))

    budget, clock = args.minutes * 60, (lambda: time.process_time() / args.threads)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    t0, left, step, converted = clock(), 1.0, 0, None
    while (f := step / args.steps if args.steps else (clock() - t0) / budget) < 1:
        batch = train[step % len(train)]
        for g in opt.param_groups:
            g["lr"] = lr_at(f)
        student.train()
        with torch.no_grad():
            t_out = dense(**batch, output_hidden_states=True)
        loss, _ = loss_fn(student(**batch, output_hidden_states=True), t_out, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if converted is None:
            target = max(0.0, 1 - f / args.anneal)
            with torch.no_grad():
                for name, (of, inf, bonds) in plan.items():
                    W = mods[name].weight
                    W_r = factor(W, of, inf, bonds).to_matrix().to(W.dtype)
                    W.copy_(W_r + (target / left) * (W - W_r))
            left = target
            if target == 0.0:
                for name, (of, inf, bonds) in plan.items():
                    parent, leaf = name.rsplit(".", 1)
                    setattr(mods[parent], leaf, bg.MPOLinear.from_mpo(factor(mods[name].weight, of, inf, bonds)))
                opt = torch.optim.AdamW(student.parameters(), lr=lr_at(f), weight_decay=0.0)
                converted = {"step": step, "fraction": f,
                             "sample_ppl": tinystories_perplexity(student, tok, sample).perplexity}
                print(f"factored at step {step} ({f:.0%} of the budget): sample ppl {converted['sample_ppl']:.3f}",
                      flush=True)
        if step % 200 == 0:
            print(f"step {step}: {f:.0%} of the budget, loss {loss.item():.4f}", flush=True)
    out = {"machine": info, "args": args_dict(args), "argv": " ".join(sys.argv[1:] if argv is None else argv),
           "command": command_line(__file__, argv),
           "dense_ppl": tinystories_perplexity(dense, tok, sample).perplexity, "steps": step,
           "factored": converted, "block_weights": sc.block_weights(student),
           "one_shot_block_weights": sc.block_weights(one_shot),
           "one_shot_ppl": tinystories_perplexity(one_shot, tok, sample).perplexity,
           "sample_ppl": tinystories_perplexity(student, tok, sample).perplexity,
           "valid_ppl": sc.story_perplexity(student, valid_st)}
    if converted is None:
        raise SystemExit("the budget ended before the annealing did")
    budget_text = f"{step} steps" if args.steps else f"{args.minutes} min CPU clock, {step} steps"
    body = (f"stories260K at {args.ratio:.0%} of the block weights ({out['block_weights']:,}; one-shot allocation "
            f"{out['one_shot_block_weights']:,}, sample ppl {out['one_shot_ppl']:.1f} before healing), {budget_text}: "
            f"annealed for {args.anneal:.0%} of the budget, factored at step {converted['step']} (sample ppl there "
            f"{converted['sample_ppl']:.3f}), then healed:")
    report(out, "stories_anneal.py", body, args.tag, args.out)
    return out


if __name__ == "__main__":
    main()
