"""Per-input bond gating: quality vs FLOPs against static prefix truncation, and wall-clock time.

For a compressed + healed model (a bondgate checkpoint from examples/minilm_stsb.py heal or
examples/gpt2_compress.py heal):

1. nested training: distill with a random bond level per row, so every prefix is a good truncation
   (the per-layer "error vs kept width" curves are reported and must fall monotonically);
2. controllers: ``--controller linear`` (default) distills with straight-through Gumbel probes and the
   budget penalty (which also trains the cores); ``--controller error`` instead fits each layer's error
   predictor in closed form on train inputs (:func:`bondgate.fit_controllers`; the cores are not touched
   again) — ``--objective model`` (default) weights the error by its effect on the model (GPT-2: the LM
   loss's Fisher; MiniLM: random probes of the pooled embedding), ``--objective layer`` uses the layer's
   own relative error; ``--levels N`` re-gates with N evenly spaced levels first; ``--controller oracle`` is a diagnostic upper bound for error-based
   routing: every row's exact per-level output error ``|D_l x|^2`` decides (it costs more than the
   layer itself, so its FLOPs are not a real saving; the FLOPs column still counts the error controller's);
3. frontier: for average-FLOPs budgets 25/50/75% of full width, calibrate the price(s) on train
   inputs (``--per-layer``: one price per layer, each layer at the budget; default: one shared
   price), evaluate on held-out data (STS-B dev / WikiText-2 validation), and compare with static
   prefix truncation of every bond to the width that costs the same FLOPs (same cores); ``--track G``
   lets the prices follow the held-out calls online (a fixed price drifts when they differ from train);
4. wall-clock (``speed``): all gated layers together and each alone, gated (controller included; no limit,
   <= 2 or 1 level per call, and 1 level priced at the FLOPs of a B-row call, ``cost_rows=B``) vs full-width
   MPO vs dense nn.Linear at 1, 32 and 256 rows of real activations; every level's own timing, the
   controllers' time, the levels alone with the same routing (the bound for a free controller) and the
   FLOPs the B-row calls execute.

    python benchmarks/gating.py minilm --checkpoint runs/minilm-50
    python benchmarks/gating.py gpt2 --checkpoint runs/gpt2-wt2-50
    python benchmarks/gating.py speed --checkpoint runs/gating-minilm

Writes benchmarks/results/gating_<model>_<controller>.{json,md,png} and gating_speed[_<tag>].{json,md}
(``--results DIR``: into DIR instead; ``--out`` is where minilm / gpt2 save the gated model).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if (ROOT.parent / "shared" / "data").exists():  # a checkout beside the shared data: use it
    os.environ.setdefault("BONDGATE_DATA", str(ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
from common import (  # noqa: E402
    RESULTS,
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
from bondgate.data import load_stsb  # noqa: E402
from bondgate.gating import _gated_layers, _widths, average_flops, gating_report, width_error_curve  # noqa: E402
from bondgate.planner import min_flops  # noqa: E402

BUDGETS = (0.25, 0.5, 0.75)


def _bisect_fraction(cost, target: float) -> float:
    """Width fraction ``f`` in (0, 1] with ``cost(f)`` closest to ``target`` (``cost`` increases with ``f``)."""
    lo, hi = 1e-3, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cost(mid) < target else (lo, mid)
    return lo if abs(cost(lo) - target) <= abs(cost(hi) - target) else hi


def static_fraction(model, budget: float) -> float:
    """Width fraction ``f`` whose static truncation costs ``budget`` x the full-width FLOPs (all layers)."""
    return _bisect_fraction(lambda f: static_flops(model, f), budget)


def layer_fraction(m, flops: float) -> float:
    """Width fraction whose static truncation of layer ``m`` costs ``flops`` x its full-width FLOPs."""
    return _bisect_fraction(lambda f: min_flops(m.out_factors, m.in_factors, _widths(m.bond_dims, f), 1)
                            / m.full_cost, flops)


def static_flops(model, f: float) -> float:
    layers = [m for _, m in _gated_layers(model)]
    return sum(min_flops(m.out_factors, m.in_factors, _widths(m.bond_dims, f), 1) for m in layers) / sum(
        m.full_cost for m in layers)


class ExactError(torch.nn.Module):
    """Scores the levels by minus each row's exact output error relative to the layer's mean output energy."""

    def __init__(self, layer, ref: float) -> None:
        super().__init__()
        mpo = layer.to_mpo()
        W = mpo.to_matrix().detach()
        self.D = [W - mpo.slice_bonds(w).to_matrix().detach() for w in layer.level_widths]
        self.ref = ref

    def forward(self, x):
        return -torch.stack([(x @ D.T).pow(2).sum(-1) for D in self.D], -1) / self.ref


def install_oracles(student, calib) -> None:
    energy: dict[str, list[float]] = {}

    def measure(n, mod, x, batch):
        x = x.reshape(-1, mod.in_features)
        energy.setdefault(n, []).append(float((x @ mod.weight_matrix().T).pow(2).sum(-1).mean()))

    layers = _gated_layers(student)
    bg.set_mode(student, "full")
    capture_inputs(student, dict(layers), calib, measure)
    for n, m in layers:
        m.controller = ExactError(m, statistics.mean(energy[n]))


def train_gating(student, teacher, batches, calib, loss, args, budget=0.5, progress=True, sensitivity_loss=None):
    kind = "error" if args.controller == "oracle" else args.controller
    bg.gate(student, bg.GatingConfig(budget=budget, controller=kind))
    log = {}
    if args.nested_minutes > 0:
        bg.set_mode(student, "nested")
        r = bg.distill(student, teacher, batches, loss=loss, max_minutes=args.nested_minutes, lr=args.lr,
                       progress=progress, sandwich=args.sandwich)
        log["nested"] = {"steps": r.steps, "seconds": r.seconds, "sandwich": args.sandwich}
        if args.nested_out:  # the nested-trained cores, for other controllers: --checkpoint DIR --nested-minutes 0
            bg.save(student, args.nested_out)
    if args.levels:  # finer levels: keeps the cores, replaces the controllers
        bg.gate(student, bg.GatingConfig(budget=budget, controller=kind,
                                         levels=tuple((i + 1) / args.levels for i in range(args.levels))))
    bg.set_mode(student, "gate")
    if args.controller == "oracle":
        install_oracles(student, calib)
        bg.set_mode(student, "gate")
    elif args.controller == "error":
        t0 = time.perf_counter()
        fit = bg.fit_controllers(student, calib, objective=args.objective,
                                 loss=sensitivity_loss if args.objective == "model" else None)
        log["fit_controllers"] = {"seconds": time.perf_counter() - t0, "layers": fit,
                                  "min_r2": min(min(f["r2"]) for f in fit),
                                  "median_r2": statistics.median(v for f in fit for v in f["r2"][:-1])}
        print(f"controllers fitted: median R^2 of per-row errors {log['fit_controllers']['median_r2']:.3f}, "
              f"min {log['fit_controllers']['min_r2']:.3f}", flush=True)
    else:
        r = bg.distill(student, teacher, batches[::-1], loss=loss, max_minutes=args.gate_minutes, lr=args.lr,
                       progress=progress)
        log["gate"] = {"steps": r.steps, "seconds": r.seconds}
    return log


def frontier(student, evaluate, calib, higher_is_better: bool, per_layer: bool = False, metric=float,
             interval=None, track: float = 0.0) -> list[dict]:
    """Gated vs static prefix truncation at the FLOPs the gated model used on the held-out rows; also each
    layer truncated to the constant width that costs what that layer used ("per-layer static"), which
    separates the gain of allocating compute across layers from that of choosing it per row.

    ``evaluate(model)`` gives predictions, ``metric(predictions)`` the score; ``interval(a, b)``, if given,
    a 95% interval of ``metric(a) - metric(b)`` over resamples of the held-out items (paired bootstrap).
    ``track``: the prices follow the held-out calls online (``set_budget(..., track=)``), starting from the
    calibrated ones; the static baselines are matched to the FLOPs the gated model then used."""
    rows = []
    bg.set_mode(student, "full")
    full_q = metric(evaluate(student))
    rows.append({"budget": 1.0, "kind": "full width", "quality": full_q, "flops": 1.0})
    sign = 1.0 if higher_is_better else -1.0

    def margin(a, b):  # (+ = gated better, its 95% interval or None)
        ci = interval(a, b) if interval else None
        return sign * (metric(a) - metric(b)), (None if ci is None else sorted(sign * v for v in ci))

    for b in BUDGETS:
        bg.set_mode(student, "gate")
        achieved_train = bg.set_budget(student, b, calib, per_layer=per_layer, track=track)
        gating_report(student, reset=True)
        pg = evaluate(student)
        held = average_flops(student)
        rep = gating_report(student)
        f = static_fraction(student, held)
        bg.set_mode(student, f)
        ps = evaluate(student)
        for (_, m), r in zip(_gated_layers(student), rep):
            m.mode = layer_fraction(m, max(r["avg_flops_fraction"] - r["controller_fraction"], 1e-3))
        pl = evaluate(student)
        q, qs, ql = metric(pg), metric(ps), metric(pl)
        (ms_, ci_s), (ml, ci_l) = margin(pg, ps), margin(pg, pl)
        rows.append({"budget": b, "kind": "gated", "quality": q, "flops": held, "flops_calibration": achieved_train,
                     "static_fraction": f, "static_quality": qs, "static_flops": static_flops(student, f),
                     "margin_vs_static": ms_, "margin_vs_static_ci95": ci_s, "layer_static_quality": ql,
                     "margin_vs_layer_static": ml, "margin_vs_layer_static_ci95": ci_l,
                     "histograms": [r["histogram"] for r in rep],
                     "layer_fractions": [m.mode for _, m in _gated_layers(student)]})
        print(rows[-1]["budget"], f"gated {q:.3f} @ {held:.3f} FLOPs | static {qs:.3f} @ f={f:.3f} "
              f"(margin {ms_:+.3f}, 95% {ci_s}) | per-layer static {ql:.3f}", flush=True)
    bg.set_mode(student, "gate")
    return rows


def spearman_difference_interval(gold: torch.Tensor, resamples: int = 2000, seed: int = 0):
    """Paired bootstrap over STS-B pairs: 95% percentile interval of Spearman(a) - Spearman(b), x100."""
    import numpy as np
    from scipy.stats import rankdata

    idx = np.random.default_rng(seed).integers(0, len(gold), size=(resamples, len(gold)))
    g = np.asarray(gold, dtype=np.float64)[idx]

    def rho(pred):  # Spearman per resample: Pearson of average ranks
        ra, rb = rankdata(np.asarray(pred, dtype=np.float64)[idx], axis=1), rankdata(g, axis=1)
        ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
        return 100 * (ra * rb).sum(1) / np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))

    def interval(a, b):
        d = rho(a) - rho(b)
        return float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))

    return interval


def width_curves(student) -> dict:
    return {n: width_error_curve(m) for n, m in _gated_layers(student)}


def report(name: str, info: dict, rows: list[dict], curves: dict, extra: dict, metric: str,
           directory: Path = RESULTS) -> None:
    """Write ``DIRECTORY/gating_NAME.{json,md,png}``; ``extra`` (JSON) may hold the ``args`` and ``command``."""
    write_json(directory / f"gating_{name}.json", {"machine": info, "rows": rows, "width_error_curves": curves,
                                                    **extra})
    args = extra.get("args", {})
    prices = (f"Prices: calibrated on train inputs, then corrected online on the held-out calls "
              f"(`track={args['track']:g}`)" if args.get("track") else "Prices: calibrated on train inputs, fixed")
    prices += " (one per layer)." if args.get("per_layer") else " (one shared by all layers)."
    metric_line = f"Metric: {metric}"
    if any(r.get("margin_vs_static_ci95") for r in rows):
        metric_line += ". Brackets: 95% paired-bootstrap interval of the margin over the held-out items."
    lines = [f"Machine: {banner(info)}", ""] + ([f"Command: `{extra['command']}`", ""] if extra.get("command") else [])
    lines += [metric_line, "", prices, "",
              "| budget (avg FLOPs / full) | gated | FLOPs on held-out rows | static prefix (width f) | static "
              "FLOPs | gated vs static (+ = gated better) | per-layer static, same per-layer FLOPs | gated vs "
              "per-layer static |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "full width":
            lines.append(f"| 1.00 (full width) | {r['quality']:.3f} | 1.000 | - | - | - | - | - |")
            continue
        lines.append(f"| {r['budget']:.2f} | {r['quality']:.3f} | {r['flops']:.3f} | {r['static_quality']:.3f} "
                     f"(f={r['static_fraction']:.2f}) | {r['static_flops']:.3f} | "
                     f"{r['margin_vs_static']:+.3f}{_ci(r.get('margin_vs_static_ci95'))} | "
                     f"{r.get('layer_static_quality', float('nan')):.3f} | "
                     f"{r.get('margin_vs_layer_static', float('nan')):+.3f}{_ci(r.get('margin_vs_layer_static_ci95'))} |")
    mono = all(all(a >= b - 1e-9 for a, b in zip(c, c[1:])) for c in curves.values())
    lines += ["", f"Error-vs-kept-width curves (25/50/75/100% of every bond) fall monotonically in every layer: "
              f"{mono}", ""]
    for n, c in list(curves.items())[:6]:
        lines.append(f"- {n}: " + ", ".join(f"{v:.3f}" for v in c))
    write_text(directory / f"gating_{name}.md", "\n".join(lines) + "\n")
    plot(name, rows, metric, directory)
    print("\n".join(lines))


def _ci(ci) -> str:
    return "" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def plot(name: str, rows: list[dict], metric: str, directory: Path = RESULTS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r for r in rows if r["kind"] == "gated"]
    full = next(r for r in rows if r["kind"] == "full width")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["flops"] for r in g] + [1.0], [r["quality"] for r in g] + [full["quality"]], "o-", label="gated")
    ax.plot([r["static_flops"] for r in g] + [1.0], [r["static_quality"] for r in g] + [full["quality"]], "s--",
            label="static prefix")
    ax.set_xlabel("average FLOPs / full-width FLOPs")
    ax.set_ylabel(metric)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(directory / f"gating_{name}.png", dpi=110)


# ---------------------------------------------------------------------------------------------- models
def result_name(model: str, args) -> str:
    name = f"{model}_{args.controller}"
    if args.controller == "error" and args.objective == "model":
        name += "_model"
    name += (f"_L{args.levels}" if args.levels else "") + (f"_{args.tag}" if args.tag else "")
    name += f"_track{args.track:g}" if args.track else ""
    return name + ("_trainpairs" if getattr(args, "eval_split", "dev") == "train" else "")


def run_minilm(args) -> None:
    import minilm_stsb as ms

    info = machine_info()
    print(banner(info), flush=True)
    teacher, tok = ms.load_minilm()
    student = bg.load(args.checkpoint)
    pool = ms.unlabeled_sentences(seed=3)
    batches = ms.batches(tok, pool[: args.train_sentences], batch=32)
    # calibration (prices, error fits): STS-B train sentences, the task's own distribution (no labels used)
    sts = [s for a, b, _ in load_stsb(split="train") for s in (a, b)]
    random.Random(7).shuffle(sts)
    calib = ms.batches(tok, sts[: args.calib_sentences], batch=32)
    if args.eval_split == "dev":
        pairs = load_stsb(split="dev")[: args.dev_pairs or None]
    else:  # a second check: STS-B train pairs (labels used only to score) that share no sentence with calib
        seen = set(sts[: args.calib_sentences])
        pairs = [p for p in load_stsb(split="train") if p[0] not in seen and p[1] not in seen]
        random.Random(11).shuffle(pairs)
        pairs = pairs[: args.dev_pairs or 1500]
    gen = torch.Generator().manual_seed(0)

    def embedding_probe(out, batch):  # random probes of the normalized mean-pooled embedding (what STS-B scores)
        h, mask = out.last_hidden_state, batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        e = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
        return (e * torch.randn(e.shape, generator=gen)).sum()

    log = train_gating(student, teacher, batches, calib, bg.DistillLoss(hidden=1.0, pooled=1.0), args,
                       progress=not args.no_progress, sensitivity_loss=embedding_probe)
    gold = torch.tensor([p[2] for p in pairs], dtype=torch.float64)

    def cosines(m):  # one prediction per pair: the paired bootstrap resamples pairs
        a, b = ms.embed(m, tok, [p[0] for p in pairs]), ms.embed(m, tok, [p[1] for p in pairs])
        return torch.nn.functional.cosine_similarity(a, b)

    rows = frontier(student, cosines, calib, True, args.per_layer, metric=lambda c: 100 * ms.spearman(c, gold),
                    interval=spearman_difference_interval(gold), track=args.track)
    if args.controller != "oracle":  # the exact-error diagnostic is not a savable controller
        bg.save_pretrained(student, args.out, tokenizer=tok)
    report(result_name("minilm", args), info, rows, width_curves(student), {"training": log, "command": args.command,
                                                                          "args": args_dict(args)},
           "STS-B dev Spearman x100" if args.eval_split == "dev" else
           "Spearman x100 on 1500 STS-B train pairs sharing no sentence with the calibration set", args.results)


def run_gpt2(args) -> None:
    import gpt2_compress as gc
    import gpt2_wikitext as lm

    info = machine_info()
    print(banner(info), flush=True)
    teacher, tok = lm.load_model(args.teacher)
    student = bg.load(args.checkpoint)
    train, valid = gc.data(tok, teacher.config.n_positions)
    batches = [{"input_ids": b} for b in gc.as_batches(train, 16, seed=4)]
    calib = [{"input_ids": b} for b in gc.as_batches(train, 16, seed=5)[:16]]

    def nll(out, batch):  # the LM loss on train blocks: its diagonal Fisher weights each output channel
        ids, logits = batch["input_ids"], out.logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1))

    log = train_gating(student, teacher, batches, calib, bg.DistillLoss(hidden=1.0, logits=1.0, temperature=1.0),
                       args, progress=not args.no_progress, sensitivity_loss=nll)
    valid = valid[: args.valid_blocks] if args.valid_blocks else valid
    rows = frontier(student, lambda m: lm.evaluate_ppl(m, valid), calib, False, args.per_layer, track=args.track)
    if args.controller != "oracle":  # the exact-error diagnostic is not a savable controller
        bg.save_pretrained(student, args.out, tokenizer=tok)
    report(result_name("gpt2", args), info, rows, width_curves(student), {"training": log, "command": args.command,
                                                                          "args": args_dict(args)},
           "WikiText-2 validation perplexity (lower is better)", args.results)


# ---------------------------------------------------------------------------------------------- speed
# variants timed: (max_groups, price the levels at the FLOPs of a B-row call instead of one row: cost_rows=B)
LIMITS = {"no limit": (None, False), "<=2 groups": (2, False), "1 group": (1, False),
          "1 group, B-row FLOPs": (1, True)}
ONE_GROUP = [lb for lb, (k, _) in LIMITS.items() if k == 1]  # one level per call: broken down layer by layer
SPEED_LAYERS = ["layer.0.attention.self.query", "layer.0.intermediate.dense", "layer.0.output.dense"]


class SideBySide(torch.nn.Module):
    """Layers side by side, each fed its own recorded input rows: ``forward(**{key(name): x})`` runs every
    layer on one call of rows, so ``set_budget`` prices the whole set on calls of the timed size."""

    def __init__(self, layers: dict[str, torch.nn.Module]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleDict({self.key(n): m for n, m in layers.items()})

    @staticmethod
    def key(name: str) -> str:  # ModuleDict keys cannot hold dots
        return name.replace(".", "_")

    def forward(self, **xs: torch.Tensor) -> list[torch.Tensor]:
        return [self.layers[k](x) for k, x in xs.items()]


@torch.no_grad()
def run_speed(args) -> None:
    """All gated layers of the model, each on calls of ``B`` of its real input rows, priced together (one
    shared price, as in the quality runs) so that the average FLOPs per row over all of them is
    ``--budget`` of full width, calibrated on one half of the rows and timed on the other half."""
    import minilm_stsb as ms

    torch.set_num_threads(args.threads)
    info = machine_info()
    print(banner(info), flush=True)
    model = bg.load(args.checkpoint)
    _, tok = ms.load_minilm()
    sentences = ms.unlabeled_sentences(seed=6)[: args.sentences]
    layers = dict(_gated_layers(model))
    unmatched = [s for s in args.layers if not any(n.endswith(s) for n in layers)]
    if unmatched and args.layers == SPEED_LAYERS:  # the default: a checkpoint may keep some of them dense
        print(f"--layers: not gated in this checkpoint: {', '.join(unmatched)}", flush=True)
    elif unmatched:
        raise SystemExit(f"gating.py speed: error: argument --layers: no gated layer of {args.checkpoint} ends with "
                         f"{', '.join(unmatched)} (gated layers: {', '.join(layers)})")
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    bg.set_mode(model, "full")  # inputs of the full-width model
    capture_inputs(model, layers, ms.batches(tok, sentences, batch=32),
                   lambda n, m, x, batch: acts[n].append(x[batch["attention_mask"].bool()]))
    bg.set_mode(model, "gate")
    X = {n: torch.cat(v) for n, v in acts.items()}
    rows = min(x.shape[0] for x in X.values())
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    X = {n: x[:rows][perm] for n, x in X.items()}
    half = rows // 2
    key = {n: SideBySide.key(n) for n in layers}
    name = {f"layers.{k}": n for n, k in key.items()}  # SideBySide's module names -> the model's
    full = {n: bg.MPOLinear.from_mpo(m.to_mpo(), m.bias.detach(), policy="memory") for n, m in layers.items()}
    dense = {n: f.to_linear() for n, f in full.items()}
    shown = [n for n in layers if any(n.endswith(s) for s in args.layers)]
    cells = []
    for B in args.rows:
        calib = [{key[n]: x[i:i + B] for n, x in X.items()} for i in range(0, min(half, 256 * B) - B + 1, B)]
        calls = [{key[n]: x[half + i * B:half + (i + 1) * B] for n, x in X.items()}
                 for i in range(min(32, (rows - half) // B))]
        it = {"i": 0}

        def nxt():
            it["i"] = (it["i"] + 1) % len(calls)
            return calls[it["i"]]

        fns = {"dense": lambda: [dense[n](nxt()[key[n]]) for n in layers],
               "mpo_full": lambda: [full[n](nxt()[key[n]]) for n in layers]}
        variants, flops, per_layer = {}, {}, {}
        for label, (k, at_b) in LIMITS.items():
            v = variants[label] = SideBySide({n: copy.deepcopy(m) for n, m in layers.items()}).eval()
            bg.set_budget(v, args.budget, calib, max_groups=k, cost_rows=B if at_b else 1)
            gating_report(v, reset=True)
            for c in calls:  # plans every (level, group-size bucket): autotuning is not part of the timing
                v(**c)
            flops[label] = average_flops(v)
            per_layer[label] = {name[r["name"]]: r for r in gating_report(v)}
            fns[f"gated {label}"] = (lambda v=v: v(**nxt()))
        for n in layers:  # every layer alone: dense, full width, each level, controllers, gated variants
            fns[f"{n}|dense"] = (lambda n=n: dense[n](nxt()[key[n]]))
            fns[f"{n}|mpo_full"] = (lambda n=n: full[n](nxt()[key[n]]))
            for lv, w in enumerate(layers[n].level_widths):  # plus the bias, as the full-width MPO and gated layers do
                fns[f"{n}|level{lv}"] = (lambda n=n, w=w: layers[n].width_output(nxt()[key[n]], w) + layers[n].bias)
            for label, v in variants.items():
                if n in shown or label in ONE_GROUP:
                    fns[f"{n}|gated {label}"] = (lambda n=n, v=v: v.layers[key[n]](nxt()[key[n]]))
                if label in ONE_GROUP:
                    # what a one-level call runs to choose its level (decide would also build a (B,) tensor)
                    fns[f"{n}|decide {label}"] = (lambda n=n, v=v: v.layers[key[n]]._one_level(nxt()[key[n]]))
        t = {k: s * 1e6 for k, s in time_interleaved(fns, rounds=args.rounds, min_time=0.05).items()}
        # With one level per call, every timed call runs exactly one level on all its rows, so the level
        # times weighted by the routed rows are what the gated layer would cost with a free controller.
        # One-row pricing counts a row at its one-row cost (the per-row sweep, quadratic in the bonds); a call of
        # B rows runs the plan that is cheapest for B rows, which often merges cores first (cost linear in the
        # bonds, or a rebuilt weight and a GEMM that the bonds do not change). Those per-row FLOPs (each level,
        # then full width) are what the layers priced with cost_rows=B hold.
        at_b = variants[next(lb for lb, (_, b) in LIMITS.items() if b)].layers
        fl = {n: [*at_b[key[n]].level_cost, at_b[key[n]].full_cost] for n in layers}
        alone = {part: sum(t[f"{n}|{part}"] for n in layers) for part in ("dense", "mpo_full")}
        for lb in ONE_GROUP:
            hist = {n: per_layer[lb][n]["histogram"] for n in layers}
            alone[lb] = {
                "gated": sum(t[f"{n}|gated {lb}"] for n in layers),
                "decide": sum(t[f"{n}|decide {lb}"] for n in layers),
                "levels only": sum(sum(c * t[f"{n}|level{lv}"] for lv, c in enumerate(h)) / sum(h)
                                   for n, h in hist.items()),
                "flops at B rows": sum(sum(c * f for c, f in zip(h, fl[n])) / sum(h) for n, h in hist.items())
                / sum(f[-1] for f in fl.values()),
            }
        cell = {"rows": B, "us": t, "flops": flops, "calibration_calls": len(calib), "timed_calls": len(calls),
                "layers_alone_us": alone,
                "speedup_vs_full": {lb: t["mpo_full"] / t[f"gated {lb}"] for lb in LIMITS},
                "layers": {n: {"flops": {lb: per_layer[lb][n]["avg_flops_fraction"] for lb in LIMITS},
                               "histograms": {lb: per_layer[lb][n]["histogram"] for lb in LIMITS},
                               "bond_dims": list(layers[n].bond_dims),
                               "level_widths": [list(w) for w in layers[n].level_widths],
                               "full_width_plan": full[n].plan(B).id} for n in shown}}
        cells.append(cell)
        print(B, {k: round(v) for k, v in t.items() if "|" not in k},
              {lb: f"{cell['speedup_vs_full'][lb]:.2f}x @ {flops[lb]:.3f}" for lb in LIMITS}, flush=True)
    stem = "gating_speed" + (f"_{args.tag}" if args.tag else "")
    write_json(args.results / f"{stem}.json", {"machine": info, "command": args.command, "args": args_dict(args),
                                               "budget": args.budget, "layers": list(layers), "cells": cells})
    lines = [f"Machine: {banner(info)}", "", f"Command: `{args.command}`", "",
             f"All {len(layers)} gated layers of `{args.checkpoint}` with one shared price so that their average "
             f"FLOPs per row is {args.budget} of full width (controllers included), priced on calls of the timed "
             "row count (one half of each layer's real input rows, padding dropped) and timed on calls from the "
             f"other half; memory mode, {args.threads} threads; microseconds per call. `max_groups`: distinct levels "
             "allowed per call. The FLOPs column is measured on the timed calls; it counts a row at its one-row "
             "cost (the per-row sweep, quadratic in the bonds), except in the `B-row FLOPs` variant "
             "(`set_budget(..., cost_rows=B)`), which prices and counts every level at the FLOPs of the cheapest "
             "plan for a B-row call.", "",
             "**All gated layers together** (one call = every layer on its B rows):", "",
             "| rows | dense | full-width MPO | " + " | ".join(f"gated, {lb} (speedup, FLOPs)" for lb in LIMITS) + " |",
             "|---|---|---|" + "---|" * len(LIMITS)]
    for c in cells:
        u = c["us"]
        g = " | ".join(f"{u[f'gated {lb}']:.0f} ({c['speedup_vs_full'][lb]:.2f}x, {c['flops'][lb]:.2f})"
                       for lb in LIMITS)
        lines.append(f"| {c['rows']} | {u['dense']:.0f} | {u['mpo_full']:.0f} | {g} |")
    lines += ["", f"**Where the time goes** (one level per call; each of the {len(layers)} layers timed alone on the same "
              "calls, times summed): the gated layers' controllers (the one-level decision, `_one_level`) and their levels alone with the same "
              "routing, i.e. what the gated model would cost if choosing the level were free. Last column: the FLOPs that "
              "a call of B rows executes (cheapest plan of each level at B rows) relative to full width; one-row pricing "
              "counts every row at its one-row cost, which at many rows is not what the plans do.", "",
              "| rows, variant | dense | full-width MPO | gated (speedup) | its controllers | its levels alone "
              "(speedup: the bound for a free controller) | FLOPs a B-row call executes |", "|---|---|---|---|---|---|---|"]
    for c in cells:
        a = c["layers_alone_us"]
        for lb in ONE_GROUP:
            g = a[lb]
            lines.append(f"| {c['rows']}, {lb} | {a['dense']:.0f} | {a['mpo_full']:.0f} | {g['gated']:.0f} "
                         f"({a['mpo_full'] / g['gated']:.2f}x) | {g['decide']:.0f} | {g['levels only']:.0f} "
                         f"({a['mpo_full'] / g['levels only']:.2f}x) | {g['flops at B rows']:.2f} |")
    lv_names = "/".join(f"{100 * v:.0f}" for v in next(iter(layers.values())).levels)
    lines += ["", "**Single layers** under the same price (their FLOPs fraction is what the shared price gave them):", "",
              "| layer | rows | dense | full-width MPO | " + " | ".join(f"gated, {lb} (speedup, FLOPs)" for lb in LIMITS)
              + f" | each level alone: {lv_names}% |", "|---|---|---|---|" + "---|" * len(LIMITS) + "---|"]
    for c in cells:
        u = c["us"]
        for n, info_n in c["layers"].items():
            full_us = u[f"{n}|mpo_full"]
            g = " | ".join(f"{u[f'{n}|gated {lb}']:.0f} ({full_us / u[f'{n}|gated {lb}']:.2f}x, "
                           f"{info_n['flops'][lb]:.2f})" for lb in LIMITS)
            lv = " / ".join(f"{u[f'{n}|level{i}']:.0f}" for i in range(len(info_n["level_widths"])))
            lines.append(f"| {n} | {c['rows']} | {u[f'{n}|dense']:.0f} | {full_us:.0f} | {g} | {lv} |")
    write_text(args.results / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=2)
    ap.add_argument("--no-progress", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("minilm")
    m.add_argument("--checkpoint", default=str(ROOT / "runs" / "minilm-50"))
    m.add_argument("--nested-minutes", type=number_arg(float, 0, what="nested-minutes"), default=10)
    m.add_argument("--gate-minutes", type=number_arg(float, 0, low_open=True, what="gate-minutes"), default=10)
    m.add_argument("--lr", type=number_arg(float, 0, low_open=True, what="lr"), default=5e-5)
    m.add_argument("--train-sentences", type=number_arg(int, 1, what="train-sentences"), default=60000)
    m.add_argument("--dev-pairs", type=number_arg(int, 0, what="dev-pairs"), default=0,
                   help="0 = all 1500 (a smaller number is for smoke tests)")
    m.add_argument("--eval-split", choices=["dev", "train"], default="dev",
                   help="pairs the frontier is scored on: STS-B dev, or 1500 STS-B train pairs that share no "
                        "sentence with the calibration set (a second check; their sentences may have been "
                        "distilled on, unlabeled)")
    m.add_argument("--calib-sentences", type=number_arg(int, 1, what="calib-sentences"), default=512,
                   help="STS-B train sentences for the prices and the controller fits")
    m.add_argument("--out", default=str(ROOT / "runs" / "gating-minilm"))
    for p in (m, g := sub.add_parser("gpt2")):
        p.add_argument("--controller", choices=["linear", "error", "oracle"], default="linear")
        p.add_argument("--per-layer", action="store_true", help="one price per layer (default: one shared price)")
        p.add_argument("--track", type=number_arg(float, 0, 10, what="track"), default=0.0,
                       help="gain of the online price correction on the held-out calls (0: calibrated prices fixed)")
        p.add_argument("--nested-out", default=None, help="also save the model right after nested training")
        p.add_argument("--sandwich", action="store_true",
                       help="nested training also trains the full width every step (distill(sandwich=True))")
        p.add_argument("--levels", type=number_arg(int, 0, what="levels"), default=0,
                       help="re-gate with N evenly spaced levels 1/N..1 before the controllers (0: keep 25/50/75/100%%)")
        p.add_argument("--tag", default="", help="suffix of the result files (e.g. the checkpoint's name)")
        p.add_argument("--objective", choices=["layer", "model"], default="model",
                       help="error controller target: the layer's own relative error, or its effect on the model "
                            "(LM loss Fisher for GPT-2, embedding probes for MiniLM)")
    g.add_argument("--checkpoint", default=str(ROOT / "runs" / "gpt2-wt2-50"))
    g.add_argument("--teacher", default=str(ROOT / "runs" / "gpt2-wt2"))
    g.add_argument("--nested-minutes", type=number_arg(float, 0, what="nested-minutes"), default=8)
    g.add_argument("--gate-minutes", type=number_arg(float, 0, low_open=True, what="gate-minutes"), default=8)
    g.add_argument("--lr", type=number_arg(float, 0, low_open=True, what="lr"), default=1e-4)
    g.add_argument("--valid-blocks", type=number_arg(int, 0, what="valid-blocks"), default=0)
    g.add_argument("--out", default=str(ROOT / "runs" / "gating-gpt2"))
    s = sub.add_parser("speed")
    s.add_argument("--checkpoint", default=str(ROOT / "runs" / "gating-minilm"))
    s.add_argument("--budget", type=number_arg(float, 0, 1, low_open=True, what="budget"), default=0.5)
    s.add_argument("--rows", type=number_arg(int, 1, what="rows"), nargs="+", default=[1, 32, 256])
    s.add_argument("--rounds", type=number_arg(int, 1, what="rounds"), default=5)
    s.add_argument("--sentences", type=number_arg(int, 1, what="sentences"), default=512,
                   help="real sentences whose layer inputs are timed")
    s.add_argument("--layers", nargs="+", default=SPEED_LAYERS,
                   help="layers (name endings) broken down one by one in the tables")
    s.add_argument("--tag", default="", help="suffix of the result files (gating_speed_<tag>.*)")
    for p in (m, g, s):
        add_out_arg(p, "--results")
    args = ap.parse_args(argv)
    parser = {"minilm": m, "gpt2": g, "speed": s}[args.cmd]
    if getattr(args, "levels", 0) == 1:
        parser.error("--levels 1: gating chooses between at least two levels (0 keeps 25/50/75/100%)")
    check_checkpoint(parser, args.checkpoint, hint={
        "minilm": "make one with examples/minilm_stsb.py heal", "gpt2": "make one with examples/gpt2_compress.py heal",
        "speed": "make one with benchmarks/gating.py minilm --out DIR"}[args.cmd])
    if args.cmd == "gpt2":
        check_checkpoint(parser, args.teacher, "--teacher", "make one with examples/gpt2_wikitext.py train")
    args.command = command_line(__file__, argv)
    if args.cmd != "speed":
        torch.set_num_threads(args.threads)
    {"minilm": run_minilm, "gpt2": run_gpt2, "speed": run_speed}[args.cmd](args)


if __name__ == "__main__":
    main()
