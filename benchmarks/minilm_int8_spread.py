"""How much does torch's int8 dynamic speed-up on MiniLM move between two near-identical 32-sentence batches?

    python benchmarks/minilm_int8_spread.py           # ~2 min on 2 cores

The frontier run (``benchmarks/frontier.py``: 32 dev *first* sentences, 12 tokens) put int8 dynamic at 0.45x dense
where ``benchmarks/minilm_speed.py`` (the first 16 dev *pairs*, both sentences, 13 tokens) measured 0.38x. This
script times both batches for dense and int8 dynamic (``bondgate.quantize_int8`` of the encoder's linear layers)
in one run, interleaved rounds, and reports each ratio to dense on the same batch, median and range of the paired
per-round ratios. Writes benchmarks/results/minilm_int8_spread.{json,md} (``--out DIR``: into DIR instead).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
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
    ap.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=2)
    ap.add_argument("--rounds", type=number_arg(int, 1, what="rounds"), default=9)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    command = command_line(__file__, argv)
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(banner(info), flush=True)
    dense, tok = ms.load_minilm()
    dense.eval()
    dev = ms.load_stsb(split="dev")
    batches = {
        "frontier batch (first sentences of 32 pairs)": [p[0] for p in dev[:32]],
        "minilm_speed batch (both sentences of 16 pairs)": [s for p in dev[:16] for s in p[:2]],
    }
    inputs = {k: dict(tok(v, padding=True, truncation=True, max_length=128, return_tensors="pt"))
              for k, v in batches.items()}
    models = {"dense": dense, "int8 dynamic": bg.quantize_int8(dense, target=ms.encoder_target)}


    fns = {(m, b): forward_fn(models[m], inputs[b]) for m in models for b in inputs}
    samples: dict[str, list[float]] = {}
    times = time_interleaved({f"{m} | {b}": f for (m, b), f in fns.items()}, rounds=args.rounds, min_time=0.2,
                             samples_out=samples)
    rows = []
    for b in inputs:
        d, q = samples[f"dense | {b}"], samples[f"int8 dynamic | {b}"]
        paired = sorted(x / y for x, y in zip(q, d))
        rows.append({"batch": b, "shape": list(inputs[b]["input_ids"].shape),
                     "dense_ms": 1e3 * times[f"dense | {b}"], "int8_ms": 1e3 * times[f"int8 dynamic | {b}"],
                     "paired_median": statistics.median(paired), "paired_min": paired[0], "paired_max": paired[-1]})
    out = {"machine": info, "command": command, "args": args_dict(args), "rows": rows}
    write_json(args.out / "minilm_int8_spread.json", out)
    lines = [f"Machine: {banner(info)}", "", f"Command: `{command}`", "",
             f"all-MiniLM-L6-v2, dense vs torch's int8 dynamic (encoder linear layers), {args.threads} threads, "
             f"{args.rounds} interleaved rounds; ratio = int8 time / dense time of the same round and batch.", "",
             "| batch | tokens (padded) | dense (ms) | int8 dynamic (ms) | paired ratio, median [min, max] |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['shape'][0]}x{r['shape'][1]} | {r['dense_ms']:.2f} | {r['int8_ms']:.2f} | "
                     f"{r['paired_median']:.3f} [{r['paired_min']:.3f}, {r['paired_max']:.3f}] |")
    write_text(args.out / "minilm_int8_spread.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
