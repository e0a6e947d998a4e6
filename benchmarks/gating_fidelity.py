"""Does gating or static truncation stay closer to the model it approximates? (MiniLM, STS-B dev sentences)

The error controllers minimize a model's deviation from its full-width MPO; STS-B Spearman is what point 3 of
the gating issue scores. This puts both side by side for a gated MiniLM checkpoint of ``benchmarks/gating.py``
(controllers already fitted; saved with ``--out``): for budgets 25/50/75%, prices calibrated on the same 512
STS-B train sentences as there, and static truncation at the FLOPs the gated model used on the dev sentences,

* the mean squared distance of the normalized mean-pooled embeddings (what STS-B scores with cosines) to the
  full-width MPO's and to the dense teacher's (all-MiniLM-L6-v2), over the 3000 dev sentences;
* the same distances after centering (each model's mean embedding over the dev sentences subtracted), and the
  agreement (Spearman) of the dev pairs' cosines with the full width's and the teacher's — what STS-B ranks;
* STS-B dev Spearman x100 (the same figures as ``gating.py``'s for that checkpoint and pricing).

    python benchmarks/gating_fidelity.py --checkpoint runs/gating-minilm25-perlayer-L16 --per-layer --tag m25_perlayer_L16

Writes benchmarks/results/gating_fidelity_<tag>.{json,md} (``--out DIR``: into DIR instead).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import (  # noqa: E402
    add_out_arg,
    args_dict,
    banner,
    check_checkpoint,
    command_line,
    machine_info,
    write_json,
    write_text,
)

# importing gating sets up the offline hub, the shared data and the examples/ path, as every benchmark does
from gating import BUDGETS, static_fraction  # noqa: E402

import bondgate as bg  # noqa: E402
from bondgate.cli import number_arg  # noqa: E402
from bondgate.data import load_stsb  # noqa: E402
from bondgate.gating import average_flops  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a gated MiniLM saved by benchmarks/gating.py --out")
    ap.add_argument("--per-layer", action="store_true", help="one price per layer (as the run that made it)")
    ap.add_argument("--calib-sentences", type=number_arg(int, 1, what="calib-sentences"), default=512)
    ap.add_argument("--tag", default="")
    ap.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=2)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    check_checkpoint(ap, args.checkpoint, hint="make one with benchmarks/gating.py minilm --controller error --out DIR")
    command = command_line(__file__, argv)
    import minilm_stsb as ms

    torch.set_num_threads(args.threads)
    info = machine_info()
    print(banner(info), flush=True)
    teacher, tok = ms.load_minilm()
    model = bg.load(args.checkpoint).eval()
    sts = [s for a, b, _ in load_stsb(split="train") for s in (a, b)]
    random.Random(7).shuffle(sts)  # the calibration set of benchmarks/gating.py
    calib = ms.batches(tok, sts[: args.calib_sentences], batch=32)
    dev = load_stsb(split="dev")
    n = len(dev)
    sents = [p[0] for p in dev] + [p[1] for p in dev]
    gold = torch.tensor([p[2] for p in dev], dtype=torch.float64)

    def embed(m) -> torch.Tensor:
        return torch.nn.functional.normalize(ms.embed(m, tok, sents), dim=-1)

    def pair_cos(e: torch.Tensor) -> torch.Tensor:  # (pairs,): what STS-B ranks
        return torch.nn.functional.cosine_similarity(e[:n], e[n:]).double()

    def spearman(e: torch.Tensor) -> float:
        return 100 * ms.spearman(pair_cos(e), gold)

    def dist(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).pow(2).sum(-1).mean())

    def centered(e: torch.Tensor) -> torch.Tensor:  # without the direction all sentences share
        return torch.nn.functional.normalize(e - e.mean(0), dim=-1)

    def cdist(a: torch.Tensor, b: torch.Tensor) -> float:
        return dist(centered(a), centered(b))

    def agreement(a: torch.Tensor, b: torch.Tensor) -> float:  # Spearman x100 between the pairs' cosines
        return 100 * ms.spearman(pair_cos(a), pair_cos(b))

    def versus(e: torch.Tensor) -> dict:
        return {"to_full": dist(e, e_full), "to_teacher": dist(e, e_teacher), "c_to_full": cdist(e, e_full),
                "c_to_teacher": cdist(e, e_teacher), "agree_full": agreement(e, e_full),
                "agree_teacher": agreement(e, e_teacher)}

    with torch.no_grad():
        e_teacher = embed(teacher)
        bg.set_mode(model, "full")
        e_full = embed(model)
    rows = [{"kind": "teacher", "spearman": spearman(e_teacher), **versus(e_teacher)},
            {"kind": "full width", "spearman": spearman(e_full), **versus(e_full)}]
    for b in BUDGETS:
        bg.set_mode(model, "gate")
        bg.set_budget(model, b, calib, per_layer=args.per_layer)
        bg.gating_report(model, reset=True)
        with torch.no_grad():
            e_gated = embed(model)
        held = average_flops(model)
        f = static_fraction(model, held)
        bg.set_mode(model, f)
        with torch.no_grad():
            e_static = embed(model)
        for kind, e in (("gated", e_gated), ("static", e_static)):
            rows.append({"kind": kind, "budget": b, "flops": held, "static_fraction": f, "spearman": spearman(e),
                         **versus(e)})
        print(rows[-2], rows[-1], flush=True)
    name = "gating_fidelity" + (f"_{args.tag}" if args.tag else "")
    write_json(args.out / f"{name}.json", {"machine": info, "command": command, "args": args_dict(args), "rows": rows})
    text = table(info, vars(args), rows, n, command)
    write_text(args.out / f"{name}.md", text)
    print(text)


def table(info: dict, args: dict, rows: list[dict], n: int, command: str | None = None) -> str:
    """The markdown report of one run (rows as in its JSON; ``command``: the command line that made it)."""
    lines = [f"Machine: {banner(info)}", ""] + ([f"Command: `{command}`", ""] if command else []) + [
             f"Checkpoint `{args['checkpoint']}`, prices {'per layer' if args['per_layer'] else 'shared'}, calibrated "
             f"on {args['calib_sentences']} STS-B train sentences; {2 * n} STS-B dev sentences. Distances: mean "
             "|e - e_ref|^2 of the normalized mean-pooled embeddings (2 - 2 cos; 0 = identical); centered: the same "
             "after subtracting each model's mean embedding over the dev sentences and normalizing again; agreement: "
             "Spearman x100 between the dev pairs' cosines and the reference's (what STS-B ranks).", "",
             "| model | FLOPs / full width | STS-B dev Spearman x100 | distance to full-width MPO | distance to teacher |"
             " centered, to full width | centered, to teacher | agreement with full width | agreement with teacher |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = r["kind"] if "budget" not in r else (
            f"{r['kind']} at {r['budget']:.0%}" + (f" (width f={r['static_fraction']:.2f})" if r["kind"] == "static" else ""))
        flops = "-" if r["kind"] == "teacher" else f"{r.get('flops', 1.0):.3f}"
        cells = [label, flops, f"{r['spearman']:.3f}", f"{r['to_full']:.4f}", f"{r['to_teacher']:.4f}",
                 f"{r['c_to_full']:.4f}", f"{r['c_to_teacher']:.4f}", f"{r['agree_full']:.2f}", f"{r['agree_teacher']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
