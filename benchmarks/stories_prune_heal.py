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
from stories_anneal import report, setup  # noqa: E402

from bondgate.baselines import magnitude_prune  # noqa: E402
from bondgate.llama2c import tinystories_perplexity  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of the block weights kept non-zero")
    ap.add_argument("--tag", default="prune_heal")
    args, info, (dense, tok, sample), (_, valid_st, train) = setup(ap, argv)

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
    res = sc.heal(student, dense, train, heal_args, valid_st, steps=args.steps)
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
    body = (f"stories260K, magnitude pruning to {nonzero:,} non-zero block weights of "
            f"{out['dense_block_weights']:,} (sample ppl {before:.3f} before healing), healed "
            f"{'' if args.steps else f'{args.minutes} min on the CPU clock, '}{res.steps} steps (best {res.best_step}):")
    report(out, "stories_prune_heal.py", body, args.tag)
    return out


if __name__ == "__main__":
    main()
