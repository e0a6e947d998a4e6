"""Baseline: magnitude pruning healed by the same distillation, stories260K at 50% of the block weights.

    python benchmarks/stories_prune_heal.py --minutes 20 --threads 1

The frontier (``benchmarks/frontier.py``) compares bondgate with pruning zero-shot; this heals the pruned
model the way ``examples/stories_compress.py`` heals the MPO student (same stories, packed 512-token rows,
``DistillLoss(hidden=1, logits=1)``, AdamW, lr 3e-3, CPU-clock budget, best validation step kept), with the
pruning mask held fixed (``torch.nn.utils.prune``: pruned weights get no update). ``--ratio`` counts non-zero
weights; a sparse format also stores their positions, so the bytes of this model are more than ``--ratio`` of
dense (the frontier counts them). Writes ``benchmarks/results/stories_prune_heal.{json,md}`` (``--out DIR``: into
DIR instead).

``--mpo-share s``: factors plus a sparse residual — each layer is first a 2-core MPO with the largest bond that
stores at most ``s`` of its weights, and the residual ``W - W_mpo`` is magnitude-pruned to the rest of the
layer's ``--ratio``; both parts heal.
"""

from __future__ import annotations

import argparse
import copy
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
from common import args_dict, command_line  # noqa: E402
from stories_anneal import factor, report, setup  # noqa: E402

import bondgate as bg  # noqa: E402
from bondgate.baselines import magnitude_prune  # noqa: E402
from bondgate.cli import number_arg  # noqa: E402
from bondgate.factors import factorize_shape  # noqa: E402
from bondgate.llama2c import tinystories_perplexity  # noqa: E402


class FactorsPlusSparse(torch.nn.Module):
    """``y = mpo(x) + residual(x)``: an MPO layer beside a (to be pruned) dense residual."""

    def __init__(self, W: torch.Tensor, share: float) -> None:
        super().__init__()
        N, M = W.shape
        (o1, o2), (i1, i2) = legs = factorize_shape(N, M, 2)
        # a 2-core MPO of bond r stores r * (o1*i1 + o2*i2) weights: the largest bond within the share, directly
        r = min(int(share * W.numel()) // (o1 * i1 + o2 * i2), o1 * i1, o2 * i2)
        if r < 1:
            raise ValueError(f"no MPO of a {N}x{M} layer stores at most {share} of its weights")
        mpo = factor(W, *legs, [r])
        self.mpo = bg.MPOLinear.from_mpo(mpo)
        self.residual = torch.nn.Linear(M, N, bias=False)
        with torch.no_grad():
            self.residual.weight.copy_(W - self.mpo.weight_matrix())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mpo(x) + self.residual(x)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=number_arg(float, 0, low_open=True, what="minutes"), default=20.0)
    ap.add_argument("--ratio", type=number_arg(float, 0, 1, low_open=True, what="ratio"), default=0.5,
                    help="fraction of the block weights kept non-zero")
    ap.add_argument("--mpo-share", type=number_arg(float, 0, 1, what="mpo-share"), default=0.0,
                    help="fraction of each layer's weights in MPO factors")
    ap.add_argument("--tag", default="prune_heal")
    args, info, (dense, tok, sample), (_, valid_st, train) = setup(ap, argv)

    targets = [n for n, _ in dense.named_modules() if re.fullmatch(sc.TARGET, n)]
    budgets, factored = {n: round(args.ratio * dense.get_submodule(n).weight.numel()) for n in targets}, 0
    hybrid = copy.deepcopy(dense)
    if args.mpo_share:
        for name in targets:
            layer = FactorsPlusSparse(dense.get_submodule(name).weight.detach(), args.mpo_share)
            hybrid.set_submodule(name, layer)
            factored += layer.mpo.num_params
            budgets[f"{name}.residual"] = budgets.pop(name) - layer.mpo.num_params
    student, pruned = magnitude_prune(hybrid, params=budgets)
    student.requires_grad_(True)
    for name in pruned["layers"]:
        layer = student.get_submodule(name)
        prune.custom_from_mask(layer, "weight", layer.weight.detach() != 0)
    before = tinystories_perplexity(student, tok, sample).perplexity
    print(f"{factored:,} weights in MPO factors + {pruned['params']:,} non-zero: sample ppl {before:.3f}", flush=True)
    heal_args = argparse.Namespace(hidden=1.0, logits=1.0, temperature=1.0, minutes=args.minutes, clock="cpu",
                                   lr=args.lr, warmup=0.05, eval_every=200, log_every=50, seed=0)
    res = sc.heal(student, dense, train, heal_args, valid_st, steps=args.steps)
    for name in pruned["layers"]:
        prune.remove(student.get_submodule(name), "weight")
    nonzero = sum(int(torch.count_nonzero(student.get_submodule(n).weight)) for n in pruned["layers"]) + factored
    out = {"machine": info, "args": args_dict(args), "argv": " ".join(sys.argv[1:] if argv is None else argv),
           "command": command_line(__file__, argv),
           "dense_ppl": tinystories_perplexity(dense, tok, sample).perplexity, "ppl_before": before,
           "nonzero_block_weights": nonzero, "dense_block_weights": sc.block_weights(dense),
           "steps": res.steps, "best_step": res.best_step,
           "sample_ppl": tinystories_perplexity(student, tok, sample).perplexity,
           "valid_ppl": sc.story_perplexity(student, valid_st)}
    assert nonzero <= pruned["params"] + factored, (nonzero, pruned["params"])  # the mask held
    what = f"{factored:,} in 2-core MPO factors + a pruned residual" if factored else "magnitude pruning"
    body = (f"stories260K, {what}: {nonzero:,} stored block weights of "
            f"{out['dense_block_weights']:,} (sample ppl {before:.3f} before healing), healed "
            f"{'' if args.steps else f'{args.minutes} min on the CPU clock, '}{res.steps} steps (best {res.best_step}):")
    report(out, "stories_prune_heal.py", body, args.tag, args.out)
    return out


if __name__ == "__main__":
    main()
