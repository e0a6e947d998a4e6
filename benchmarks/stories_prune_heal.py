"""Baseline: magnitude pruning healed by the same distillation, stories260K at 50% of the block weights.

    python benchmarks/stories_prune_heal.py --minutes 20 --threads 1

The frontier (``benchmarks/frontier.py``) compares bondgate with pruning zero-shot; this heals the pruned
model the way ``examples/stories_compress.py`` heals the MPO student (same stories, packed 512-token rows,
``DistillLoss(hidden=1, logits=1)``, AdamW, lr 3e-3, CPU-clock budget, best validation step kept), with the
pruning mask held fixed (``torch.nn.utils.prune``: pruned weights get no update). ``--ratio`` counts non-zero
weights; a sparse format also stores their positions, so the bytes of this model are more than ``--ratio`` of
dense (the frontier counts them). Writes ``benchmarks/results/stories_prune_heal.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.nn.utils import prune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
import stories_compress as sc  # noqa: E402
from common import banner, machine_info, write_json  # noqa: E402
from stories_anneal import data_args  # noqa: E402

from bondgate.baselines import magnitude_prune  # noqa: E402
from bondgate.llama2c import tinystories_perplexity  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of the block weights kept non-zero")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--samples", type=int, default=4096, help="as examples/stories_compress.py")
    ap.add_argument("--stories-cache", default=str(ROOT / "runs" / "stories_4096.json"))
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--calib-stories", type=int, default=64)
    ap.add_argument("--valid-stories", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="prune_heal")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(banner(info), flush=True)

    dense, tok, sample = sc.load()
    _, valid_st, train = sc.healing_data(dense, tok, sample, data_args(args))

    student, pruned = magnitude_prune(dense, param_ratio=args.ratio,
                                     target=[n for n, _ in dense.named_modules() if re.fullmatch(sc.TARGET, n)])
    student.requires_grad_(True)
    for name in pruned["layers"]:
        layer = student.get_submodule(name)
        prune.custom_from_mask(layer, "weight", layer.weight.detach() != 0)
    before = tinystories_perplexity(student, tok, sample).perplexity
    print(f"pruned to {pruned['params']:,} non-zero block weights: sample ppl {before:.3f}", flush=True)
    heal_args = argparse.Namespace(hidden=1.0, logits=1.0, temperature=1.0, minutes=args.minutes, clock="cpu",
                                   lr=args.lr, warmup=0.05, eval_every=200, log_every=50, seed=0)
    res = sc.heal(student, dense, train, heal_args, valid_st)
    for name in pruned["layers"]:
        prune.remove(student.get_submodule(name), "weight")
    nonzero = sum(int(torch.count_nonzero(student.get_submodule(n).weight)) for n in pruned["layers"])
    out = {"machine": info, "args": vars(args), "argv": " ".join(sys.argv[1:] if argv is None else argv),
           "dense_ppl": tinystories_perplexity(dense, tok, sample).perplexity, "ppl_before": before,
           "nonzero_block_weights": nonzero, "dense_block_weights": sc.block_weights(dense),
           "steps": res.steps, "best_step": res.best_step,
           "sample_ppl": tinystories_perplexity(student, tok, sample).perplexity,
           "valid_ppl": sc.story_perplexity(student, valid_st)}
    assert nonzero <= pruned["params"], (nonzero, pruned["params"])  # the mask held
    md = (f"Machine: {banner(info)}\n\nCommand: `python benchmarks/stories_prune_heal.py {out['argv']}`\n\n"
          f"stories260K, magnitude pruning to {nonzero:,} non-zero block weights of {out['dense_block_weights']:,} "
          f"(sample ppl {before:.3f} before healing), healed {args.minutes} min on the CPU clock, {res.steps} steps "
          f"(best {res.best_step}): **sample ppl {out['sample_ppl']:.4f}** "
          f"({out['sample_ppl'] / out['dense_ppl'] - 1:+.1%} vs dense {out['dense_ppl']:.4f}), validation "
          f"{out['valid_ppl']:.4f}.\n")
    print(md)
    if args.tag:
        write_json(ROOT / "benchmarks" / "results" / f"stories_{args.tag}.json", out)
        (ROOT / "benchmarks" / "results" / f"stories_{args.tag}.md").write_text(md)
    return out


if __name__ == "__main__":
    main()
