"""Per-call overhead of an ``MPOLinear`` that runs its cached dense weight (speed mode, plan ``dense-cached``) against
``nn.Linear`` holding the same weight: the time the compressed MiniLM spends on top of dense where every MPO layer
runs one ``F.linear`` (benchmarks/minilm_speed.py). And of a rank-form ``MPOLinear`` (a low-rank pair as two cores,
as ``compress(..., quantize="int8")`` stores its pairs; rank ``--rank``) against ``LowRankLinear`` holding the same
two factors: two ``F.linear`` calls each.

    python benchmarks/call_overhead.py          # ~1 min on 2 cores

Shapes: MiniLM's (384 -> 384, 384 -> 1536, 1536 -> 384), at 11 rows (one 11-token sentence) and 416 rows (32
sentences of 13 tokens). Timing, ``torch.inference_mode``, ``--threads`` threads, in microseconds per call with the
difference and the ratio:

* warm: median of interleaved rounds (``time_interleaved``) of back-to-back calls, everything in cache;
* cold: median of ``--cold-calls`` single calls, each after writing a 64 MB buffer (more than this machine's caches),
  the two layers alternating. This is the state a layer is called in inside a model, where the other layers' weights
  have gone through the caches since its last call: there every Python-level read costs a cache miss, and per-call
  code that is invisible warm costs tens of microseconds (it made the compressed MiniLM 4-7% slower than dense at one
  sentence before forward's short path).

Writes benchmarks/results/call_overhead.{json,md} (``--out DIR``: into DIR instead).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_out_arg,
    args_dict,
    banner,
    check_out_dir,
    command_line,
    machine_info,
    time_interleaved,
    write_json,
    write_text,
)

import bondgate as bg  # noqa: E402
from bondgate.cli import number_arg  # noqa: E402

SHAPES = [(384, 384), (384, 1536), (1536, 384)]  # (in, out)
ROWS = [11, 416]


def cold_us(layers: dict[str, nn.Module], x: torch.Tensor, calls: int) -> dict[str, float]:
    """Median microseconds of one call of each layer on ``x`` with cold caches: before each call a 64 MB buffer is
    written, the layers alternating (in turn first)."""
    junk = torch.zeros(16 * 2**20)
    times: dict[str, list[float]] = {k: [] for k in layers}
    with torch.inference_mode():
        for i in range(calls):
            for name, layer in (list(layers.items()) if i % 2 else list(layers.items())[::-1]):
                junk.add_(1.0)
                t0 = time.perf_counter_ns()
                layer(x)
                times[name].append((time.perf_counter_ns() - t0) / 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=number_arg(int, 1, what="rounds"), default=15)
    parser.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=2)
    parser.add_argument("--cold-calls", type=number_arg(int, 1, what="cold-calls"), default=200)
    parser.add_argument("--rank", type=number_arg(int, 1, what="rank"), default=96,
                        help="rank of the low-rank pair (MiniLM's default compression at 50%%: ranks 2-147)")
    add_out_arg(parser)
    args = parser.parse_args(argv)
    check_out_dir(parser, args.out)
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(banner(info))
    rows_out = []
    for (n_in, n_out), form in ((shape, form) for shape in SHAPES for form in ("dense-cached", "rank-form")):
        torch.manual_seed(0)
        if form == "dense-cached":
            # a layer the size budget keeps at a 3-core MPO whose dense product is the faster plan (MiniLM's 12)
            mpo = bg.MPOLinear.from_linear(nn.Linear(n_in, n_out), max_bond=64,
                                           policy=bg.PlanPolicy(cache_dense=True, select="flops")).eval()
            ref, ref_name = mpo.to_linear().eval(), "nn.Linear"
        else:
            ref = bg.LowRankLinear.from_linear(nn.Linear(n_in, n_out), rank=min(args.rank, n_in, n_out)).eval()
            mpo, ref_name = ref.to_mpo_linear(policy=bg.PlanPolicy(select="flops")).eval(), "LowRankLinear"
        for rows in ROWS:
            x = torch.randn(rows, n_in)
            with torch.inference_mode():
                mpo(x)
                plan = mpo.plan(rows).name
            if plan == "dense-cached":  # nn.Linear holds the very tensor the MPO layer keeps: the same memory, so
                # only the per-call code differs (a weight allocated elsewhere runs a few percent apart either way)
                (kept,) = [ops[0] for _, ops, _ in mpo._ops_cache.values()]
                ref.weight = nn.Parameter(kept, requires_grad=False)
            elif mpo.plan(rows).chain:  # the pair holds the very factors the rank-form layer keeps (V, then U)
                (kept,) = [ops for _, ops, _ in mpo._ops_cache.values()]
                ref.V, ref.U = (nn.Parameter(t, requires_grad=False) for t in kept)

            def call(m, x=x):
                with torch.inference_mode():
                    return m(x)

            t = time_interleaved({"nn.Linear": lambda: call(ref), "MPOLinear": lambda: call(mpo)},
                                 rounds=args.rounds, min_time=0.05)
            us = {k: v * 1e6 for k, v in t.items()}
            cold = cold_us({"nn.Linear": ref, "MPOLinear": mpo}, x, args.cold_calls)
            row = {"form": form, "baseline": ref_name, "in": n_in, "out": n_out, "rows": rows, "plan": plan,
                   "linear_us": us["nn.Linear"],
                   "mpo_us": us["MPOLinear"], "extra_us": us["MPOLinear"] - us["nn.Linear"],
                   "ratio": us["MPOLinear"] / us["nn.Linear"], "cold_linear_us": cold["nn.Linear"],
                   "cold_mpo_us": cold["MPOLinear"], "cold_extra_us": cold["MPOLinear"] - cold["nn.Linear"]}
            rows_out.append(row)
            print(f"{form} {n_in}->{n_out} at {rows} rows ({plan}): warm {ref_name} {row['linear_us']:.1f} us, MPOLinear "
                  f"{row['mpo_us']:.1f} us ({row['extra_us']:+.1f} us, {row['ratio']:.3f}x); cold "
                  f"{row['cold_linear_us']:.1f} / {row['cold_mpo_us']:.1f} us ({row['cold_extra_us']:+.1f} us)",
                  flush=True)
    lines = [f"Machine: {banner(info)}", "", f"Command: `{command_line(__file__, argv)}`", "",
             f"Warm: median of {args.rounds} interleaved rounds; cold: median of {args.cold_calls} single calls, each "
             f"after writing a 64 MB buffer. {args.threads} threads, torch.inference_mode. `dense-cached`: a 3-core MPO "
             "layer running its cached dense weight (one F.linear) against nn.Linear holding that tensor; `rank-form`: "
             f"a low-rank pair of rank {args.rank} as a two-core MPO layer against LowRankLinear holding the factors it "
             "keeps (two F.linear each). `baseline` is the reference layer of the row.", "",
             "| form | layer (in -> out) | rows | plan | warm baseline (us) | warm MPOLinear (us) | extra (us) | ratio "
             "| cold baseline (us) | cold MPOLinear (us) | extra (us) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['form']} | {r['in']} -> {r['out']} | {r['rows']} | {r['plan']} | {r['linear_us']:.1f} | {r['mpo_us']:.1f} | "
              f"{r['extra_us']:+.1f} | {r['ratio']:.3f} | {r['cold_linear_us']:.1f} | {r['cold_mpo_us']:.1f} | "
              f"{r['cold_extra_us']:+.1f} |" for r in rows_out]
    write_text(args.out / "call_overhead.md", "\n".join(lines) + "\n")
    write_json(args.out / "call_overhead.json", {"machine": info, "args": args_dict(args),
                                                 "command": command_line(__file__, argv), "rows": rows_out})
    print(f"wrote {args.out / 'call_overhead.md'}")


if __name__ == "__main__":
    main()
