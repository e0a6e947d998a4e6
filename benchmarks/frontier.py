"""The whole-model size-quality and latency-quality frontier, one run, one plot.

Methods, each applied to a copy of the dense model in this run:

* ``dense``                       fp32;
* ``int8 dynamic``                torch's dynamic int8 quantization of the targeted linear layers;
* ``svd``                         truncated SVD of each targeted layer at ``ratio`` of its weights;
* ``magnitude prune``             ``ratio`` of each targeted layer's weights kept, stored sparse (the smallest of a
                                  bitmask and CSR: ``bondgate.baselines.sparse_state_dict``);
* ``bondgate``                    ``bondgate.compress`` at ``ratio`` of the targeted weights (calibrated, default
                                  policy ``auto``: MPO / dense kernels chosen per layer for speed);
* ``bondgate int8``               the same with int8 cores (``quantize="int8"``);
* ``bondgate int8 + embeddings``  the embedding table (and a tied LM head) compressed too, under the same budget.
* ``bondgate int8 + fitted table``  the table as two low-rank factors fitted to the calibration text's token
                                  frequencies (``embedding_form="lowrank"``), at 0.8x the linear layers' ``ratio``,
                                  with the exact rows of the 1024 most frequent tokens kept (MiniLM; stories260K's
                                  table is tied to its LM head: no kept rows).
* ``bondgate int8 + fitted table, int8 kernels``  that model converted by ``bondgate.deploy_int8`` for CPU
                                  inference with torch's dynamic int8 kernels (each layer timed at the subject's rows
                                  per call, kept where int8 is not faster); size = the bondgate checkpoint it is
                                  converted from after loading.

plus ``healed`` points: checkpoints saved by the healing scripts (``--healed``; by default every ``runs/minilm-*``
and ``runs/stories260K-*`` found), re-loaded and re-measured here, each also converted with ``deploy_int8``.
Every other point is zero-shot (no training after compression): the healed points had minutes of distillation the
baselines did not get.

Subjects:

* ``minilm``   all-MiniLM-L6-v2 (targets: the encoder's linear layers), quality = STS-B dev Spearman x100,
               latency = one forward of 32 dev sentences;
* ``stories``  llama2.c stories260K (targets: the blocks' linear layers), quality = perplexity on
               ``tinystories_sample.txt`` (lower is better), latency = greedy ``generate()`` of 32 tokens at
               batch 1 (KV cache), per token. Calibration: 64 stories sampled from the dense model.

Size = bytes of the whole model's state dict as shipped (``bondgate.size_on_disk``: safetensors, tied weights
once, the pruned layers sparse, ``torch.save`` for dynamic int8). Latency: median over interleaved rounds, all
variants of a subject timed in the same run, ``--threads`` intra-op threads.

    python benchmarks/frontier.py                        # both subjects; ~25 min on 2 cores
    python benchmarks/frontier.py --subjects stories --ratios 0.5

Writes benchmarks/results/frontier.{json,md,png} (``--tag`` names them; ``--out DIR``: into DIR instead).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
from common import (  # noqa: E402
    add_out_arg,
    args_dict,
    banner,
    command_line,
    forward_fn,
    machine_info,
    time_interleaved,
    write_json,
    write_text,
)

import bondgate as bg  # noqa: E402
from bondgate.cli import number_arg  # noqa: E402

KERNELS = ", int8 kernels"  # a method name ending so: the model of the method before it, through deploy_int8
METHODS = ["svd", "magnitude prune", "bondgate", "bondgate int8", "bondgate int8 + embeddings",
           "bondgate int8 + fitted table", "bondgate int8 + fitted table" + KERNELS]


# ----------------------------------------------------------------------------------------------- subjects
class MiniLM:
    name, metric, higher_is_better = "minilm", "STS-B dev Spearman x100", True
    healed_glob = "minilm-*"

    def __init__(self, args):
        import minilm_stsb as ms

        self.ms = ms
        self.dense, self.tok = ms.load_minilm()
        self.dev = ms.load_stsb(split="dev")
        self.calib = ms.batches(self.tok, ms.unlabeled_sentences(args.calibration, seed=1))
        self.target, self.embedding = ms.TARGET, r"embeddings\.word_embeddings"
        self.kept_rows = 1024
        sents = [p[0] for p in self.dev[:32]]
        self.example = dict(self.tok(sents, padding=True, truncation=True, max_length=128, return_tensors="pt"))
        self.rows = self.example["input_ids"].numel()  # rows per linear-layer call
        self.latency_unit = "ms per 32 sentences"

    def quality(self, model) -> float:
        return self.ms.stsb_score(model, self.tok, self.dev)

    def timer(self, model):
        return forward_fn(model, self.example)


class Stories:
    name, metric, higher_is_better = "stories", "TinyStories sample perplexity", False
    healed_glob = "stories260K-*"

    def __init__(self, args):
        import stories_compress as sc

        from bondgate.llama2c import tinystories_perplexity

        self.sc, self.ppl = sc, tinystories_perplexity
        self.dense, self.tok, self.sample = sc.load(Path(args.shared) / "models" / "stories260K")
        stories, _ = sc.clean_stories(sc.generate_stories(self.dense, 64, seed=0), self.tok,
                                      self.sample.read_text(encoding="utf-8"))
        self.calib = sc.story_batches(stories, 16)
        self.target, self.embedding = sc.TARGET, r"model\.embed_tokens"
        self.kept_rows = 0  # the table is tied to the LM head
        self.latency_unit, self.new_tokens = "ms per generated token (batch 1)", 32
        self.rows = 1

    def quality(self, model) -> float:
        return self.ppl(model, self.tok, self.sample).perplexity

    def timer(self, model):
        bos = torch.tensor([[1]])

        @torch.inference_mode()
        def run():
            model.generate(bos, do_sample=False, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                           pad_token_id=0)
        return run


# -------------------------------------------------------------------------------------------------- methods
def build(subject, method: str, ratio: float | None):
    if method.endswith(KERNELS):
        model, extra = build(subject, method.removesuffix(KERNELS), ratio)
        return bg.deploy_int8(model, rows=subject.rows), {**extra, "shipped": model}
    dense = subject.dense
    target = subject.target  # a regex, for the baselines as for CompressionConfig.target_modules
    if method == "dense":
        return dense, {}
    if method == "int8 dynamic":
        return bg.quantize_int8(dense, target=target), {}
    if method == "svd":
        return bg.svd_compress(dense, param_ratio=ratio, target=target)[0], {}
    if method == "magnitude prune":
        model, info = bg.magnitude_prune(dense, param_ratio=ratio, target=target)
        return model, {"sparse": info["layers"]}
    # MPO layers only, as the published frontier was made (the library's default with a param_ratio may also choose
    # low-rank pairs; benchmarks/minilm_speed.py measures that default)
    kw: dict = {"param_ratio": ratio, "target_modules": subject.target, "kinds": "mpo"}
    if "int8" in method:
        kw["quantize"] = "int8"
    if "embeddings" in method or "table" in method:
        kw.update(embeddings=True, target_modules=f"{subject.target}|{subject.embedding}")
    if "fitted table" in method:
        kw.update(embedding_form="lowrank", embedding_ratio=0.8 * ratio, embedding_rows=subject.kept_rows)
    model = copy.deepcopy(dense)
    bg.compress(model, bg.CompressionConfig(**kw), calibration=subject.calib, progress=False)
    return model, {}


def healed_points(subject, dirs: list[Path]) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """``(name, model to measure, model whose checkpoint is shipped)`` per healed checkpoint and its int8 kernels."""
    out = []
    for d in dirs:
        try:
            model = bg.load(d).eval()
        except Exception as e:  # noqa: BLE001 - a stale or foreign run dir is reported, not fatal
            print(f"skipping {d}: {e}", flush=True)
            continue
        out.append((f"healed {d.name}", model, model))
        out.append((f"healed {d.name}{KERNELS}", bg.deploy_int8(model, rows=subject.rows), model))
    return out


def measure_subject(subject, args) -> list[dict]:
    rows, models = [], {}
    plan = [("dense", None), ("int8 dynamic", None)] + [(m, r) for r in args.ratios for m in args.methods]
    for method, ratio in plan:
        t0 = time.perf_counter()
        model, extra = build(subject, method, ratio)
        build_s = time.perf_counter() - t0
        model.eval()
        key = method if ratio is None else f"{method} @ {ratio:g}"
        row = {"subject": subject.name, "method": method, "ratio": ratio, "healed": False, "build_seconds": build_s,
               "bytes": bg.size_on_disk(extra.get("shipped", model), sparse=extra.get("sparse", False)),
               "quality": subject.quality(model)}
        if hasattr(model, "bondgate_report"):
            row["report_ratio"] = model.bondgate_report.ratio
        rows.append(row)
        models[key] = model
        print(f"[{subject.name}] {key}: {row['bytes'] / 1e6:.2f} MB, {subject.metric} {row['quality']:.3f} "
              f"({build_s:.0f} s)", flush=True)
    dirs = [Path(d) for d in args.healed] if args.healed is not None else sorted((ROOT / "runs").glob(subject.healed_glob))
    for key, model, shipped in healed_points(subject, [d for d in dirs if d.is_dir()]):
        row = {"subject": subject.name, "method": key, "ratio": getattr(getattr(shipped, "bondgate_report", None),
                                                                         "ratio", None),
               "healed": True, "bytes": bg.size_on_disk(shipped), "quality": subject.quality(model)}
        rows.append(row)
        models[key] = model
        print(f"[{subject.name}] {key}: {row['bytes'] / 1e6:.2f} MB, {subject.metric} {row['quality']:.3f}", flush=True)
    if args.latency:
        times = time_interleaved({k: subject.timer(m) for k, m in models.items()}, rounds=args.rounds, min_time=0.2)
        scale = 1e3 / getattr(subject, "new_tokens", 1)
        for row, key in zip(rows, models):
            row["latency_ms"] = times[key] * scale
            row["latency_vs_dense"] = times[key] / times["dense"]
    return rows


# --------------------------------------------------------------------------------------------------- output
def markdown(out: dict) -> str:
    command = out.get("command") or f"python benchmarks/frontier.py {out['argv']}"
    lines = [f"Machine: {banner(out['machine'])}", "", f"Command: `{command}`", "",
             "Zero-shot points are compressed in this run and not trained afterwards; `healed` points are checkpoints "
             "from the healing scripts (distilled for minutes), re-loaded and re-measured here.", ""]
    for subj in out["subjects"]:
        rows = [r for r in out["rows"] if r["subject"] == subj["name"]]
        lines += [f"## {subj['name']}: {subj['metric']} ({'higher' if subj['higher_is_better'] else 'lower'} is "
                  f"better), latency in {subj['latency_unit']}", "",
                  "| method | target ratio | size on disk (MB) | vs dense | quality | latency | vs dense |",
                  "|---|---|---|---|---|---|---|"]
        dense_b = rows[0]["bytes"]
        for r in rows:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            lat = (f"{r['latency_ms']:.2f} | {r['latency_vs_dense']:.2f}x" if "latency_ms" in r else "- | -")
            lines.append(f"| {r['method']} | {ratio} | {r['bytes'] / 1e6:.2f} | {r['bytes'] / dense_b:.3f} | "
                         f"{r['quality']:.3f} | {lat} |")
        lines.append("")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subjects = out["subjects"]
    fig, axes = plt.subplots(len(subjects), 2, figsize=(12, 4.5 * len(subjects)), squeeze=False)
    markers = {"dense": "*", "int8 dynamic": "D", "svd": "v", "magnitude prune": "x", "bondgate": "o",
               "bondgate int8": "s", "bondgate int8 + embeddings": "P", "bondgate int8 + fitted table": "X"}
    for (ax_size, ax_lat), subj in zip(axes, subjects):
        rows = [r for r in out["rows"] if r["subject"] == subj["name"]]
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [r for r in rows if r["method"] == method]
            style = dict(marker="*" if pts[0]["healed"] else markers.get(method, "o"), label=method,
                         linestyle="-" if len(pts) > 1 else "none", markersize=12 if pts[0]["healed"] else 7)
            ax_size.plot([r["bytes"] / 1e6 for r in pts], [r["quality"] for r in pts], **style)
            if all("latency_ms" in r for r in pts):
                ax_lat.plot([r["latency_ms"] for r in pts], [r["quality"] for r in pts], **style)
        ax_size.set_xscale("log")
        ax_size.set_xlabel("whole model size on disk (MB, log)")
        ax_lat.set_xlabel(f"latency ({subj['latency_unit']})")
        for ax in (ax_size, ax_lat):
            ax.set_ylabel(subj["metric"])
            ax.set_title(subj["name"])
            ax.grid(alpha=0.3)
            if not subj["higher_is_better"]:
                ax.set_yscale("log")
                ax.invert_yaxis()  # better is up on every panel
        ax_size.legend(fontsize=7)
    fig.suptitle(f"bondgate frontier ({out['machine'].get('cpu', '?')}, {out['machine']['torch_threads']} threads, "
                 f"torch {out['machine']['torch']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", nargs="+", default=["minilm", "stories"], choices=["minilm", "stories"])
    ap.add_argument("--ratios", type=number_arg(float, 0, 1, low_open=True, what="ratio"), nargs="+",
                    default=[0.5, 0.25])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--healed", nargs="*", default=None, help="healed checkpoint dirs (default: runs/minilm-*, "
                    "runs/stories260K-*); give none to skip")
    ap.add_argument("--calibration", type=number_arg(int, 1, what="calibration"), default=512,
                    help="MiniLM calibration sentences")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=torch.get_num_threads())
    ap.add_argument("--rounds", type=number_arg(int, 1, what="rounds"), default=5)
    ap.add_argument("--no-latency", dest="latency", action="store_false")
    ap.add_argument("--tag", default="frontier")
    add_out_arg(ap)
    args = ap.parse_args(argv)
    missing = [d for d in args.healed or [] if not Path(d).is_dir()]
    if missing:  # the default glob finds only directories; a directory named on the command line must exist
        ap.error(f"argument --healed: no checkpoint directory {', '.join(map(repr, missing))}")
    # the latencies are matched to the rows by the points' names: two points of one name would shift them
    keys = [f"{m} @ {r:g}" for r in args.ratios for m in args.methods] + [Path(d).name for d in args.healed or []]
    if dup := sorted({k for k in keys if keys.count(k) > 1}):
        ap.error(f"two points named {', '.join(map(repr, dup))} (a repeated --ratios or --methods value, or "
                 f"--healed folders of one name)")
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(banner(info), flush=True)
    t0 = time.perf_counter()
    rows, subjects = [], []
    for name in args.subjects:
        subject = {"minilm": MiniLM, "stories": Stories}[name](args)
        subjects.append({"name": subject.name, "metric": subject.metric, "higher_is_better": subject.higher_is_better,
                         "latency_unit": subject.latency_unit})
        rows += measure_subject(subject, args)
    out = {"machine": info, "argv": " ".join(sys.argv[1:] if argv is None else argv),
           "command": command_line(__file__, argv), "args": args_dict(args), "subjects": subjects,
           "rows": rows, "total_seconds": time.perf_counter() - t0}
    write_json(args.out / f"{args.tag}.json", out)
    write_text(args.out / f"{args.tag}.md", markdown(out))
    plot(out, args.out / f"{args.tag}.png")
    print(markdown(out))
    return out


if __name__ == "__main__":
    main()
