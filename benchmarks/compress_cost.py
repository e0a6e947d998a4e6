"""What ``bondgate.compress`` costs at LLM widths: peak memory and time on random-init LLaMA blocks.

    python benchmarks/compress_cost.py                    # 1 and 2 blocks, calibrated, ~15 min on 2 cores

Each configuration runs in its own process (so that its peak resident memory is its own): a ``LlamaForCausalLM`` of
TinyLlama-1.1B's widths (hidden 2048, intermediate 5632, 32 heads, 4 key-value heads; vocabulary 1000 to keep the
table small), ``--layers`` blocks, compressed to half of its blocks' linear weights (``param_ratio=0.5``) with
``--batches`` calibration batches of ``--seq`` random tokens (``--no-calibration``: none) and ``--refine`` L-BFGS
steps per layer. Reports the peak RSS of the process, the RSS after building the model (its weights plus the
interpreter and imports, ~0.36 GB) and the seconds ``compress`` took. Writes benchmarks/results/compress_cost.{json,md} (``--out DIR``: into DIR instead).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import add_out_arg, args_dict, banner, check_out_dir, command_line, machine_info, write_json, write_text  # noqa: E402

from bondgate.cli import number_arg  # noqa: E402

GB = 1024**3


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(layers: int, calibrate: bool, refine: int, batches: int, seq: int) -> dict:
    """One configuration, in this process: ``{"model_gb", "peak_gb", "seconds", "ratio"}``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import bondgate as bg

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=1000, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model_gb = _rss() / GB
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 1000, (1, seq), generator=gen)} for _ in range(batches)]
    config = bg.CompressionConfig(param_ratio=0.5, target_modules=r"model\.layers\..*", refine_steps=refine,
                                  kinds="mpo")  # the MPO path, as published (the default may choose low-rank pairs)
    t0 = time.perf_counter()
    bg.compress(model, config, calibration=data if calibrate else None, progress=False)
    seconds = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # kilobytes on Linux
    return {"model_gb": model_gb, "peak_gb": peak_gb, "seconds": seconds, "ratio": model.bondgate_report.ratio}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=number_arg(int, 1, what="layers"), nargs="+", default=[1, 2])
    ap.add_argument("--no-calibration", dest="calibrate", action="store_false")
    ap.add_argument("--refine", type=number_arg(int, 0, what="refine"), default=0,
                    help="L-BFGS steps per layer (compress' default is 30; 0 here to keep the run short)")
    ap.add_argument("--batches", type=number_arg(int, 1, what="batches"), default=4)
    ap.add_argument("--seq", type=number_arg(int, 1, what="seq"), default=512)
    ap.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=torch.get_num_threads())
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:  # one configuration: the result as one JSON line
        print(json.dumps(child(args.layers[0], args.calibrate, args.refine, args.batches, args.seq)), flush=True)
        return {}
    check_out_dir(ap, args.out)
    command = command_line(__file__, argv)
    info = machine_info()
    print(banner(info), flush=True)
    rows = []
    for layers in args.layers:
        cmd = [sys.executable, __file__, "--child", "--layers", str(layers), "--refine", str(args.refine),
               "--batches", str(args.batches), "--seq", str(args.seq), "--threads", str(args.threads),
               *([] if args.calibrate else ["--no-calibration"])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the {layers}-block run failed:\n{done.stderr[-3000:]}")
        row = {"layers": layers, **json.loads(done.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"{layers} block(s): model {row['model_gb']:.2f} GB, peak {row['peak_gb']:.2f} GB, "
              f"{row['seconds']:.0f} s", flush=True)
    out = {"machine": info, "command": command, "args": args_dict(args), "rows": rows}
    write_json(args.out / "compress_cost.json", out)
    calib = f"{args.batches} x {args.seq} random tokens" if args.calibrate else "none"
    lines = [f"Machine: {banner(info)}", "", f"Command: `{command}`", "",
             f"LLaMA blocks of TinyLlama-1.1B's widths (2048 / 5632), random init, fp32, compressed to 50% of the "
             f"blocks' linear weights; calibration: {calib}; refine_steps={args.refine}; {args.threads} threads.", "",
             "| blocks | RSS with the model built (GB) | peak RSS (GB) | compress (s) | ratio reached |", "|---|---|---|---|---|"]
    lines += [f"| {r['layers']} | {r['model_gb']:.2f} | {r['peak_gb']:.2f} | {r['seconds']:.0f} | {r['ratio']:.4f} |"
              for r in rows]
    write_text(args.out / "compress_cost.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
