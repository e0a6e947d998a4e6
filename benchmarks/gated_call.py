"""What a gated layer's one-row call costs beyond its products: one LLaMA-shape layer (``--dim`` -> ``--dim``, a
low-rank pair at 25% of its weights, as ``benchmarks/llama_decode.py`` builds it), gated with error controllers at
levels 25/50/75/100% of its rank and priced so that its decode calls take the 50% level; every call is one row (a
decode step at batch 1).

    python benchmarks/gated_call.py          # ~1 min on 2 cores

Variants, microseconds per call (median of interleaved rounds, warm caches, ``--threads`` threads, no grad):

* ``full pair``: the ungated pair at full rank (what ``gated`` is compared with in llama_decode.py);
* ``static pair at the level``: a pair holding the first half of the factors (the products the gated call runs);
* ``two products``: the two ``F.linear`` calls of the gated call at its level, alone;
* ``decision``: the controller's one-row decision in numpy (what the short path computes), alone;
* ``decision + products``: the two, back to back;
* ``gated call``: the gated layer's call (its decode short path: checks, decision, count, products).

Prints a markdown table with the machine; writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import banner, machine_info, time_interleaved  # noqa: E402

import bondgate  # noqa: E402
from bondgate.cli import number_arg  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=number_arg(int, 16, what="dim"), default=2048, help="the layer's width (default 2048)")
    ap.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=2)
    ap.add_argument("--rounds", type=number_arg(int, 1, what="rounds"), default=9)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(banner(machine_info()))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(args.dim, args.dim))
    bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.25, allocation="uniform", kinds=("lowrank",),
                                                        calibrate=False), progress=False)
    pair = model[0]
    gated = bondgate.gate(copy.deepcopy(model), bondgate.GatingConfig(controller="error",
                                                                      levels=(0.25, 0.5, 0.75, 1.0)))
    data = [torch.randn(64, args.dim) for _ in range(4)]
    bondgate.fit_controllers(gated, data)
    bondgate.set_budget(gated, 0.4, data, max_groups=1)
    layer = gated.eval()[0]
    x = torch.randn(1, 1, args.dim)
    with torch.no_grad():
        layer(x)
        layer(x)  # the second one-row call runs the decode short path
        entry = layer._host.get("decode")
        if entry is None:
            raise SystemExit("the gated layer's decode short path did not arm (see GatedMPOLinear._arm_decode)")
        level = int((entry.host_cost(entry.ops, x.numpy().reshape(-1)) + entry.price[0][2]).argmin())
        V, U = entry.factors[level]
        rank = V.shape[0]
        static = bondgate.LowRankLinear.from_factors(pair.U[:, :rank].detach(), pair.V[:rank].detach(),
                                                     pair.bias.detach())
        bias = layer.bias
        linear = torch.nn.functional.linear

        def decision():
            return int((entry.host_cost(entry.ops, x.numpy().reshape(-1)) + entry.price[0][2]).argmin())

        def both():
            decision()
            return linear(linear(x, V), U, bias)

        fns = {"full pair": lambda: pair(x), "static pair at the level": lambda: static(x),
               "two products": lambda: linear(linear(x, V), U, bias), "decision": decision,
               "decision + products": both, "gated call": lambda: layer(x)}
        times = time_interleaved(fns, rounds=args.rounds)
    print(f"\n{args.dim} -> {args.dim}, rank {pair.rank}; the gated call's level: {layer.levels[level]} (rank {rank})\n")
    print("| variant | µs per call |\n|---|---|")
    for name, s in times.items():
        print(f"| {name} | {1e6 * s:.1f} |")


if __name__ == "__main__":
    main()
