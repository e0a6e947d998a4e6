"""Is the default-compressed MiniLM ever slower than dense? Forward latency at 1, 32 and 256 sentences.

    python benchmarks/minilm_speed.py                 # ~6 min on 2 cores

Variants: ``dense`` (fp32), ``dense copy`` (a second copy of the dense model: the control, whose ratio to ``dense``
is this machine's noise floor), ``bondgate`` (``bondgate.compress`` at ``--ratio`` of the encoder's linear weights with
the defaults: calibrated, each layer an MPO, a low-rank pair or dense by the global allocation, policy ``auto`` of the
MPO layers judged at ``deploy_rows`` = the tokens of a 32-sentence batch),
``bondgate, deploy_float`` (that model through ``bondgate.deploy_float`` at ``deploy_rows``: its MPO layers that run
their dense product as ``nn.Linear``; its size is the checkpoint it is converted from), ``bondgate int8`` (the same
with ``quantize="int8"``: int8 MPO cores, int8 low-rank pairs held as two-core MPO layers, the layers kept dense as
one-core int8 ones), ``bondgate int8, deploy_float`` (that model through ``bondgate.deploy_float``: its layers running
their dense product as ``nn.Linear``, its pairs as ``LowRankLinear``, the dequantized weights in fp32; its size is the
int8 checkpoint), ``bondgate int8, int8 kernels`` (that model through ``bondgate.deploy_int8`` at ``deploy_rows``:
torch's dynamic int8 kernels; its size is the checkpoint it is converted from) and ``int8 dynamic`` (torch's dynamic quantization of the same layers, for reference). Quality: STS-B dev
Spearman x100 of each variant. Inputs: STS-B dev sentences, padded per batch (max 128 tokens). Timing: median of interleaved
rounds (every variant once per round), ``--threads`` threads, in ``torch.inference_mode``; besides the ratio of
medians, the per-round paired ratios (variant / dense of the same round): median and range.

``--quality-pairs N`` scores quality on the first N dev pairs only (a smoke run; default all 1500).

Writes benchmarks/results/minilm_speed.{json,md} (``--out DIR``: into DIR instead).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


def main(argv=None) -> dict:
    import minilm_stsb as ms

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=number_arg(float, 0, 1, low_open=True, what="ratio"), default=0.5)
    ap.add_argument("--batches", type=number_arg(int, 1, what="batch"), nargs="+", default=[1, 32, 256])
    ap.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=2)
    ap.add_argument("--rounds", type=number_arg(int, 1, what="rounds"), default=7)
    ap.add_argument("--calibration", type=number_arg(int, 1, what="calibration"), default=512)
    ap.add_argument("--quality-pairs", type=number_arg(int, 0, what="quality-pairs"), default=0,
                    help="STS-B dev pairs the quality is scored on (the first N; 0 = all 1500)")
    add_out_arg(ap)
    args = ap.parse_args(argv)
    command = command_line(__file__, argv)
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(banner(info), flush=True)

    dense, tok = ms.load_minilm()
    dense.eval()
    dev = ms.load_stsb(split="dev")
    sents = [s for p in dev for s in p[:2]]
    calib = ms.batches(tok, ms.unlabeled_sentences(args.calibration, seed=1))
    inputs = {b: dict(tok(sents[:b], padding=True, truncation=True, max_length=128, return_tensors="pt"))
              for b in args.batches}
    rows32 = int(inputs[32]["attention_mask"].numel()) if 32 in inputs else 128
    variants = {"dense": dense, "dense copy": copy.deepcopy(dense).eval()}
    t0 = time.perf_counter()
    for name, kw in [("bondgate", {}), ("bondgate int8", {"quantize": "int8"})]:
        m = copy.deepcopy(dense)
        bg.compress(m, bg.CompressionConfig(param_ratio=args.ratio, target_modules=ms.TARGET, deploy_rows=rows32,
                                            **kw), calibration=calib, progress=False)
        variants[name] = m.eval()
    compress_s = time.perf_counter() - t0
    variants["bondgate, deploy_float"] = bg.deploy_float(variants["bondgate"], rows=rows32)
    variants["bondgate int8, deploy_float"] = bg.deploy_float(variants["bondgate int8"], rows=rows32)
    variants["bondgate int8, int8 kernels"] = bg.deploy_int8(variants["bondgate int8"], rows=rows32)
    variants["int8 dynamic"] = bg.quantize_int8(dense, target=ms.encoder_target)
    kernels = dict(Counter(c.chosen for c in variants["bondgate int8, int8 kernels"].bondgate_int8.values()))
    print(f"deploy_int8 at {rows32} rows: {kernels}", flush=True)
    report = variants["bondgate"].bondgate_report
    policies = {}
    for r in report.layers:
        key = r.form if r.form != "mpo" else f"mpo ({r.policy})"
        policies[key] = policies.get(key, 0) + 1
    int8_forms = dict(Counter(r.form for r in variants["bondgate int8"].bondgate_report.layers))
    print(f"compressed in {compress_s:.0f} s; layer forms: {policies}; int8 model's: {int8_forms}", flush=True)


    times, paired = {}, {}
    for b in args.batches:
        samples: dict[str, list[float]] = {}
        times[b] = time_interleaved({k: forward_fn(m, inputs[b]) for k, m in variants.items()}, rounds=args.rounds,
                                    min_time=0.3, samples_out=samples)
        paired[b] = {k: sorted(t / d for t, d in zip(v, samples["dense"])) for k, v in samples.items()}
        print(f"{b} sentences ({tuple(inputs[b]['input_ids'].shape)}): "
              + "  ".join(f"{k} {1e3 * v:.2f} ms ({v / times[b]['dense']:.2f}x)" for k, v in times[b].items()),
              flush=True)
    # the plan each MPO layer of the default model ran at each size (rows per call: the batch's tokens)
    mpos = [m for m in variants["bondgate"].modules() if isinstance(m, bg.MPOLinear)]
    plans = {b: dict(Counter(m.plan(int(inputs[b]["input_ids"].numel())).name for m in mpos)) for b in args.batches}
    print(f"bondgate MPO layers' plans per size: {plans}", flush=True)
    shipped = {"bondgate int8, int8 kernels": variants["bondgate int8"], "bondgate, deploy_float": variants["bondgate"],
               "bondgate int8, deploy_float": variants["bondgate int8"]}
    sizes = {k: bg.size_on_disk(shipped.get(k, m)) for k, m in variants.items()}
    scored = dev[: args.quality_pairs or None]
    quality = {k: ms.stsb_score(m, tok, scored) for k, m in variants.items() if k != "dense copy"}
    quality["dense copy"] = quality["dense"]
    out = {"machine": info, "command": command, "args": args_dict(args), "quality_pairs": len(scored),
           "deploy_rows": rows32, "policies": policies, "int8_forms": int8_forms, "plans": plans, "times_s": times,
           "paired_ratios": paired, "int8_kernels": kernels, "quality": quality,
           "sizes": sizes, "shapes": {b: list(inputs[b]["input_ids"].shape) for b in args.batches},
           "report": report.to_dict()}
    write_json(args.out / "minilm_speed.json", out)
    scope = f" on the first {len(scored)} of {len(dev)} pairs" if len(scored) < len(dev) else ""
    lines = [f"Machine: {banner(info)}", "", f"Command: `{command}`",
             "", f"all-MiniLM-L6-v2, encoder linear layers at {args.ratio} of their weights (defaults: policy auto "
             f"judged at deploy_rows={rows32}); bondgate layer forms: {policies}, its MPO layers' plans per size (sentences): "
             f"{plans}; int8 model's layer forms: {int8_forms}; deploy_int8 of the int8 model: "
             f"{kernels}. Median of {args.rounds} interleaved rounds, {args.threads} threads. Quality: STS-B dev "
             f"Spearman x100{scope}.", "",
             "| variant | size on disk (MB) | quality | " + " | ".join(f"{b} sentences (ms) | vs dense" for b in args.batches) + " |",
             "|---|---|---|" + "---|---|" * len(args.batches)]
    for k in variants:
        lines.append(f"| {k} | {sizes[k] / 1e6:.1f} | {quality[k]:.3f} | " + " | ".join(
            f"{1e3 * times[b][k]:.2f} | {times[b][k] / times[b]['dense']:.2f}x" for b in args.batches) + " |")
    lines += ["", f"Per-round paired ratios (time / dense time of the same round), median [min, max] of {args.rounds}:",
              "", "| variant | " + " | ".join(f"{b} sentences" for b in args.batches) + " |",
              "|---|" + "---|" * len(args.batches)]
    for k in variants:
        if k != "dense":
            lines.append(f"| {k} | " + " | ".join(
                f"{statistics.median(paired[b][k]):.3f} [{paired[b][k][0]:.3f}, {paired[b][k][-1]:.3f}]"
                for b in args.batches) + " |")
    write_text(args.out / "minilm_speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
