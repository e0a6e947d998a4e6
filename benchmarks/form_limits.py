"""How well can each form of a layer approximate its trained weight, at best? (a capacity diagnostic)

For every targeted linear layer of stories260K (dim 64) and all-MiniLM-L6-v2 (dim 384), and for a share of the
layer's weights, the smallest relative Frobenius error ``||W - W_form|| / ||W||`` each form can reach:

- ``rank``: a rank-r pair ``U @ V`` with ``r * (out + in) <= share * out * in`` weights: Eckart-Young, the
  exact optimum of any two-factor form (bondgate's ``lowrank``, SVD, ...);
- ``mpo2``: a 2-core MPO on bondgate's legs (``factorize_shape``, padding counted) with bond r, ``r * (o1 i1 +
  o2 i2)`` weights: the SVD of the rearranged matrix (Van Loan-Pitsianis), the exact optimum for those legs;
- ``mpo2 permuted``: the same after the best of ``--perms`` random row/column permutations (permuting the
  hidden units of a trained network is free: it does not change the function);
- ``sparse``: the ``share * out * in`` largest entries (magnitude pruning), the exact optimum of any form
  that keeps that many entries; the index storage is not charged, so this flatters it.

These are weight-space errors. What calibration minimises is the output error ``||(W - W_form) X|| / ||W X||`` on
real layer inputs X (second moment ``C = E[x x^T]``); two output-space columns bound it:

- ``rank out``: the exact optimum of a rank-r pair (Eckart-Young on ``W C^(1/2)``, what bondgate's calibrated
  ``lowrank`` form starts from);
- ``sparse out``: the kept entries scored ``|W_ij| * sqrt(C_jj)`` (Wanda), an upper bound of the best sparse form.

Calibration inputs: stories260K, 64 stories sampled from the model (as benchmarks/frontier.py); MiniLM, 512 STS-B /
WikiText-2 train sentences. Output: benchmarks/results/form_limits.{json,md} (``--tag`` names them, ``--out DIR``:
into DIR instead).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
from common import add_out_arg, args_dict, banner, command_line, machine_info, write_json, write_text  # noqa: E402

from bondgate.calibration import collect_input_stats  # noqa: E402
from bondgate.cli import number_arg  # noqa: E402
from bondgate.factors import factorize_shape  # noqa: E402


def tail(s: torch.Tensor, keep: int) -> float:
    """Relative error of keeping the ``keep`` largest singular values ``s`` (descending)."""
    e = s.double().pow(2)
    return (e[keep:].sum() / e.sum()).sqrt().item()


def rank_error(W: torch.Tensor, share: float) -> float:
    r = int(share * W.numel() // sum(W.shape))
    return tail(torch.linalg.svdvals(W.double()), r)


def mpo2_error(W: torch.Tensor, share: float, perms: int = 0, seed: int = 0) -> tuple[float, float]:
    """(error on the layer's own order, best error over ``perms`` random row/column permutations)."""
    (o1, o2), (i1, i2) = factorize_shape(*W.shape, 2)
    r = int(share * W.numel() // (o1 * i1 + o2 * i2))

    def err(M: torch.Tensor) -> float:
        P = torch.nn.functional.pad(M, (0, i1 * i2 - M.shape[1], 0, o1 * o2 - M.shape[0]))  # bondgate's padding
        R = P.reshape(o1, o2, i1, i2).permute(0, 2, 1, 3).reshape(o1 * i1, o2 * i2)
        return tail(torch.linalg.svdvals(R), r)

    W = W.double()
    g = torch.Generator().manual_seed(seed)
    best = own = err(W)
    for _ in range(perms):
        p, q = torch.randperm(W.shape[0], generator=g), torch.randperm(W.shape[1], generator=g)
        best = min(best, err(W[p][:, q]))
    return own, best


def sparse_error(W: torch.Tensor, share: float) -> float:
    a = W.double().flatten().pow(2).sort().values
    drop = a.numel() - int(share * a.numel())
    return (a[:drop].sum() / a.sum()).sqrt().item()


def rank_out_error(W: torch.Tensor, root: torch.Tensor, share: float) -> float:
    """``root``: ``C^(1/2)`` of the layer's input second moment."""
    r = int(share * W.numel() // sum(W.shape))
    return tail(torch.linalg.svdvals(W.double() @ root), r)


def sparse_out_error(W: torch.Tensor, C: torch.Tensor, share: float) -> float:
    W = W.double()
    score = (W.abs() * C.diagonal().clamp_min(0).sqrt()).flatten()
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep[score.topk(int(share * score.numel())).indices] = True
    E = W * ~keep.reshape(W.shape)
    return (((E @ C) * E).sum() / ((W @ C) * W).sum()).sqrt().item()


def psd_root(C: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(C)
    return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T


def layers(model: torch.nn.Module, pattern: str) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)}


def kind(name: str) -> str:
    """The layer's role, with the block index dropped (``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``)."""
    return re.sub(r"^.*?\.\d+\.", "", name)


def measure(weights: dict[str, torch.Tensor], seconds: dict[str, torch.Tensor], shares: list[float],
            perms: int) -> list[dict]:
    """``seconds``: each layer's input second moment ``E[x x^T]`` (float64)."""
    rows = []
    for name, W in weights.items():
        C = seconds[name]
        root = psd_root(C)
        for share in shares:
            own, best = mpo2_error(W, share, perms)
            rows.append(dict(layer=name, kind=kind(name), shape=list(W.shape), share=share,
                             rank=rank_error(W, share), mpo2=own, mpo2_permuted=best,
                             sparse=sparse_error(W, share), rank_out=rank_out_error(W, root, share),
                             sparse_out=sparse_out_error(W, C, share)))
    return rows


FORMS = ("rank", "mpo2", "mpo2_permuted", "sparse", "rank_out", "sparse_out")


def summary(rows: list[dict]) -> list[dict]:
    """Mean error per (layer kind, share) over the blocks."""
    out = {}
    for r in rows:
        out.setdefault((r["kind"], tuple(r["shape"]), r["share"]), []).append(r)
    forms = FORMS
    return [dict(kind=k, shape=list(s), share=sh, n=len(g), **{f: sum(x[f] for x in g) / len(g) for f in forms})
            for (k, s, sh), g in out.items()]


def markdown(out: dict) -> str:
    command = out.get("command") or f"python benchmarks/form_limits.py {out['argv']}"
    lines = [f"Machine: {banner(out['machine'])}", "", f"Command: `{command}`",
             "", "Smallest relative weight error `||W - W_form|| / ||W||` each form can reach with the given share of "
             "the layer's weights, and the output error `||(W - W_form) X|| / ||W X||` on calibration inputs (`out` "
             "columns); means over the blocks; see the script's docstring for what each column is. "
             f"`mpo2 permuted`: best of {out['perms']} random row/column permutations.", ""]
    for model, rows in out["models"].items():
        lines += [f"## {model}", "", "| layer | shape | blocks | share | rank | mpo2 | mpo2 permuted | sparse | rank out | sparse out |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in summary(rows):
            lines.append(f"| {r['kind']} | {r['shape'][0]}x{r['shape'][1]} | {r['n']} | {r['share']:.2f} | "
                         + " | ".join(f"{r[f]:.3f}" for f in FORMS) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=["stories260K", "minilm"], default=["stories260K", "minilm"])
    ap.add_argument("--shares", nargs="+", type=number_arg(float, 0, 1, low_open=True, what="share"),
                    default=[0.25, 0.5, 0.75])
    ap.add_argument("--perms", type=number_arg(int, 0, what="perms"), default=20,
                    help="random permutations tried per layer and share")
    ap.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=torch.get_num_threads(),
                    help="torch intra-op threads (default: torch's, here %(default)s)")
    ap.add_argument("--tag", default="form_limits", help="results name ('' = write none)")
    add_out_arg(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(banner(info), flush=True)
    out = dict(machine=info, argv=" ".join(sys.argv[1:] if argv is None else argv),
               command=command_line(__file__, argv), args=args_dict(args), perms=args.perms, models={})
    for name in args.models:
        if name == "stories260K":
            import stories_compress as sc

            model, tok, sample = sc.load()
            stories, _ = sc.clean_stories(sc.generate_stories(model, 64, seed=0), tok, sample.read_text("utf-8"))
            pattern, calib = sc.TARGET, sc.story_batches(stories, 16)
        else:
            import minilm_stsb as ms

            model, tok = ms.load_minilm()
            pattern, calib = ms.TARGET, ms.batches(tok, ms.unlabeled_sentences(512, seed=1))
        weights = layers(model, pattern)
        mods = dict(model.named_modules())
        stats = collect_input_stats(model.eval(), {n: mods[n] for n in weights}, calib)
        out["models"][name] = measure(weights, {n: s.second for n, s in stats.items()}, args.shares, args.perms)
    md = markdown(out)
    print(md)
    if args.tag:
        write_json(args.out / f"{args.tag}.json", out)
        write_text(args.out / f"{args.tag}.md", md + "\n")
    return out


if __name__ == "__main__":
    main()
