"""Could a one-level call (``max_groups=1``) be decided on a sample of its rows?

At 256 rows the controllers' time is reading the input once more (memory-bound), so deciding the call's one
level from every ``ceil(B / 32)``-th row would cut it. This measures, on real MiniLM activations (the gated
layers of a ``benchmarks/gating.py`` checkpoint, padding dropped, calls of ``B`` shuffled rows):

* the controller's time per call on all rows vs on the sample (``decide``'s operations);
* how good the sampled pick is: per held-out call, its total objective (predicted error + price x FLOPs,
  summed over all the call's rows) relative to the best and worst level's, ``(total[pick] - min) / (max - min)``
  (0 = the level all rows would pick), with each layer's price set for a 50% budget on the other calls.

    python benchmarks/decision_sampling.py --checkpoint runs/gating-minilm-model

Writes benchmarks/results/decision_sampling.{json,md} (``--out DIR``: into DIR instead).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if (ROOT.parent / "shared" / "data").exists():
    os.environ.setdefault("BONDGATE_DATA", str(ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
from common import (  # noqa: E402
    add_out_arg,
    args_dict,
    banner,
    check_checkpoint,
    command_line,
    machine_info,
    time_interleaved,
    write_json,
    write_text,
)

import bondgate as bg  # noqa: E402
from bondgate.calibration import capture_inputs  # noqa: E402
from bondgate.cli import number_arg  # noqa: E402
from bondgate.gating import _calibrate_lambda, _gated_layers  # noqa: E402

SAMPLE = 32


@torch.no_grad()
def main() -> None:
    import minilm_stsb as ms

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="runs/gating-minilm-model",
                   help="a gated MiniLM with error controllers (benchmarks/gating.py minilm --controller error --out DIR)")
    p.add_argument("--sentences", type=number_arg(int, 1, what="sentences"), default=1024)
    p.add_argument("--rows", type=number_arg(int, 1, what="rows"), default=256)
    p.add_argument("--budget", type=number_arg(float, 0, 1, low_open=True, what="budget"), default=0.5)
    p.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=2)
    add_out_arg(p)
    args = p.parse_args()
    check_checkpoint(p, args.checkpoint, hint="make one with benchmarks/gating.py minilm --controller error --out DIR")
    command = command_line(__file__)
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(banner(info), flush=True)
    model = bg.load(args.checkpoint)
    _, tok = ms.load_minilm()
    layers = dict(_gated_layers(model))
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    bg.set_mode(model, "full")
    capture_inputs(model, layers, ms.batches(tok, ms.unlabeled_sentences(seed=6)[: args.sentences], batch=32),
                   lambda n, m, x, batch: acts[n].append(x[batch["attention_mask"].bool()]))
    B, stride = args.rows, -(-args.rows // SAMPLE)
    rows = []
    for n, m in layers.items():
        if m.controller_kind != "error":
            raise SystemExit("this diagnostic needs error controllers")
        X = torch.cat(acts[n])
        X = X[torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))]
        calls = [X[i:i + B] for i in range(0, X.shape[0] - B + 1, B)]
        half = len(calls) // 2
        m.max_groups = 1
        scores = [m.scores(c) for c in calls]
        lam = _calibrate_lambda([(n, m)], {n: scores[:half]}, args.budget)
        regret, same, worst = [], 0, 0
        for s in scores[half:]:
            obj = lam * m.rel_cost - s
            total = obj.sum(0)
            pick = int(obj[::stride].sum(0).argmin())
            spread = float(total.max() - total.min())
            regret.append(float(total[pick] - total.min()) / spread if spread > 0 else 0.0)
            same += pick == int(total.argmin())
            worst += pick == int(total.argmax())
        m.budget_lambda.fill_(lam)
        x = calls[half]  # the layer's own one-level decision, on all rows and on the sample
        t = time_interleaved({"all": lambda: m._one_level(x), "sample": lambda: m._one_level(x[::stride])}, rounds=5)
        regret.sort()
        rows.append({"layer": n, "in_features": m.in_features, "calls": len(regret), "same_pick": same / len(regret),
                     "median_regret": regret[len(regret) // 2], "max_regret": regret[-1],
                     "calls_regret_over_half": sum(r > 0.5 for r in regret), "calls_worst_level": worst,
                     "us_all_rows": t["all"] * 1e6, "us_sample": t["sample"] * 1e6})
        print(rows[-1], flush=True)
    write_json(args.out / "decision_sampling.json", {"machine": info, "command": command, "args": args_dict(args),
                                                     "rows": rows})
    lines = [f"Machine: {banner(info)}", "", f"Command: `{command}`", "",
             f"Calls of {B} real input rows per gated layer of `{args.checkpoint}`; one level per call, priced per "
             f"layer for a {args.budget:.0%} budget on half of the calls, evaluated on the other half. The sampled "
             f"pick uses every {stride}th row. Regret: (total objective of the sampled pick - best) / (worst - best), "
             "totals over all the call's rows.", "",
             "| layer | in | calls | same pick | median regret | max regret | calls with regret > 0.5 | "
             "calls at the worst level | controller, all rows (µs) | on the sample (µs) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['in_features']} | {r['calls']} | {r['same_pick']:.2f} | "
                     f"{r['median_regret']:.3f} | {r['max_regret']:.3f} | {r['calls_regret_over_half']} | "
                     f"{r['calls_worst_level']} | {r['us_all_rows']:.0f} | {r['us_sample']:.0f} |")
    write_text(args.out / "decision_sampling.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
