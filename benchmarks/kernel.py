"""Kernel benchmark: bondgate's planned MPO contraction vs dense and vs other ways to run an MPO.

For every cell (layer shape x uniform bond r x input rows B), fp32, all variants hold the SAME MPO:

* ``dense``           nn.Linear with the MPO's matrix (the speed target);
* ``einsum``          the workshop style: one ``torch.einsum`` over the input and all cores per call;
* ``sweep``           a left-to-right sweep, one pairwise einsum per core (torch-mpo / tntorch style);
* ``tltorch_fact``    tensorly-torch ``FactorizedLinear`` (block-TT), ``implementation="factorized"``;
* ``tltorch_recon``   same, ``implementation="reconstructed"`` (tensorly-torch's default);
* ``bg_memory``       bondgate ``MPOLinear`` in memory mode (never keeps a dense weight);
* ``bg_speed``        bondgate ``MPOLinear`` in speed mode (may keep the dense weight / merged cores).

Run:  python benchmarks/kernel.py --rounds 9 (full grid, ~12 min on 2 cores; the README figures)
      python benchmarks/kernel.py --quick    (a few cells, for a smoke test)
      python benchmarks/kernel.py --device cuda --rounds 3   (the grid on a GPU: benchmarks/gpu_check.sh)
Writes benchmarks/results/kernel.{json,md,png} (``--out DIR``: into DIR instead).
"""

from __future__ import annotations

import argparse
import statistics
import string
import sys
import time
import warnings
from pathlib import Path

import torch

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

SHAPES = [(256, 256), (1024, 1024), (1024, 4096), (4096, 1024)]  # (in, out)
BONDS = [8, 16, 32, 64]
ROWS = [1, 64, 2048]
MPO_VARIANTS = ["einsum", "sweep", "tltorch_fact", "tltorch_recon"]


def letters(d: int):
    ins, outs, bonds = string.ascii_lowercase[:d], string.ascii_lowercase[d:2 * d], string.ascii_uppercase[:d - 1]

    def core(k):
        return (bonds[k - 1] if k else "") + outs[k] + ins[k] + (bonds[k] if k < d - 1 else "")

    return ins, outs, core


def workshop_einsum(mpo: bg.MPO):
    d = mpo.num_cores
    ins, outs, core = letters(d)
    eq = ",".join(["Z" + ins] + [core(k) for k in range(d)]) + "->Z" + outs
    cores = [bg.planner.squeeze_core(c, k, d) for k, c in enumerate(mpo.cores)]
    in_f, N = mpo.in_factors, mpo.padded_out

    def run(x):
        return torch.einsum(eq, x.reshape(x.shape[0], *in_f), *cores).reshape(x.shape[0], N)

    return run


def sweep(mpo: bg.MPO):
    d = mpo.num_cores
    ins, outs, core = letters(d)
    bonds = string.ascii_uppercase[:d - 1]
    eqs = []
    for k in range(d):
        state = "Z" + outs[:k] + (bonds[k - 1] if k else "") + ins[k:]
        new = "Z" + outs[:k + 1] + (bonds[k] if k < d - 1 else "") + ins[k + 1:]
        eqs.append(f"{state},{core(k)}->{new}")
    cores = [bg.planner.squeeze_core(c, k, d) for k, c in enumerate(mpo.cores)]
    in_f, N = mpo.in_factors, mpo.padded_out

    def run(x):
        t = x.reshape(x.shape[0], *in_f)
        for eq, c in zip(eqs, cores):
            t = torch.einsum(eq, t, c)
        return t.reshape(x.shape[0], N)

    return run


def tltorch_layer(lin: torch.nn.Linear, mpo: bg.MPO, implementation: str):
    import tltorch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tltorch.FactorizedLinear.from_linear(
            lin, rank=(1, *mpo.bond_dims, 1), auto_tensorize=False, factorization="blocktt", bias=False,
            in_tensorized_features=mpo.in_factors, out_tensorized_features=mpo.out_factors,
            implementation=implementation)


def run_cell(n_in: int, n_out: int, r: int, B: int, rounds: int, min_time: float,
             device: torch.device | None = None) -> dict:
    device = device or torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    mpo = bg.MPO.random(n_out, n_in, bond=r, num_cores=4, generator=g)
    W = mpo.to_matrix()
    lin = torch.nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    x = torch.randn(B, n_in, generator=g).to(device)
    mem = bg.MPOLinear.from_mpo(mpo, policy="memory").to(device)
    spd = bg.MPOLinear.from_mpo(mpo, policy="speed").to(device)
    tl_fact, tl_recon = (tltorch_layer(lin, mpo, impl).to(device) for impl in ("factorized", "reconstructed"))
    lin, mpo = lin.to(device), mpo.to(device)
    fns = {
        "dense": lambda: lin(x),
        "einsum": (lambda f: lambda: f(x))(workshop_einsum(mpo)),
        "sweep": (lambda f: lambda: f(x))(sweep(mpo)),
        "tltorch_fact": lambda: tl_fact(x),
        "tltorch_recon": lambda: tl_recon(x),
        "bg_memory": lambda: mem(x),
        "bg_speed": lambda: spd(x),
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    with torch.inference_mode():
        ref = lin(x)
        plan_s = {}
        for name in ("bg_memory", "bg_speed"):
            t0 = time.perf_counter()
            fns[name]()  # first call plans and autotunes (reported, not timed)
            plan_s[name] = time.perf_counter() - t0
        for name, fn in fns.items():
            err = float((fn() - ref).norm() / ref.norm().clamp_min(1e-30))
            if err > 1e-3:
                raise AssertionError(f"{name} disagrees with dense at {n_in}x{n_out} r={r} B={B}: rel err {err:.2e}")
        times = time_interleaved(fns, rounds=rounds, min_time=min_time, sync=sync)
    pm, ps = mem.plan(B), spd.plan(B)
    act = B * (n_in + n_out)
    return {
        "in": n_in, "out": n_out, "r": r, "B": B, "device": device.type, "bond_dims": mpo.bond_dims,
        "in_factors": mpo.in_factors, "out_factors": mpo.out_factors,
        "us": {k: v * 1e6 for k, v in times.items()},
        "plan_memory": pm.name + "/" + pm.executor, "plan_speed": ps.name + "/" + ps.executor,
        "plan_ms": {k: v * 1e3 for k, v in plan_s.items()},
        "stored_bytes": {"dense": 4 * n_in * n_out, "mpo": 4 * mpo.num_params,
                         "memory_cache": mem.cache_nbytes, "speed_cache": spd.cache_nbytes},
        "peak_bytes_memory": 4 * pm.peak_elements, "peak_bytes_speed": 4 * ps.peak_elements,
        "memory_limit_bytes": 4 * max(n_in * n_out, 4 * act),
        "flops": {"dense": 2 * B * n_in * n_out, "bg_memory": pm.flops, "bg_speed": ps.flops},
    }


def summarize(cells: list[dict]) -> dict:
    within, speedups, speed_ok, faster_ok, mem_ok = [], [], [], [], []
    for c in cells:
        t = c["us"]
        best_mpo = min(t[v] for v in MPO_VARIANTS)
        c["mem_vs_best_mpo"] = t["bg_memory"] / best_mpo
        c["mem_speedup_vs_tltorch_default"] = t["tltorch_recon"] / t["bg_memory"]
        c["speed_vs_dense"] = t["bg_speed"] / t["dense"]
        c["best_mpo_beats_dense"] = min(best_mpo, t["bg_memory"]) < t["dense"]
        within.append(c["mem_vs_best_mpo"] <= 1.10)
        speedups.append(c["mem_speedup_vs_tltorch_default"])
        speed_ok.append(c["speed_vs_dense"] <= 1.10)
        if c["best_mpo_beats_dense"]:
            faster_ok.append(t["bg_speed"] < t["dense"])
        mem_ok.append(c["peak_bytes_memory"] <= c["memory_limit_bytes"])
    return {
        "cells": len(cells),
        "memory_mode_within_1.10x_of_best_mpo_variant": f"{sum(within)}/{len(within)} ({sum(within) / len(within):.0%})",
        "memory_mode_median_speedup_vs_tltorch_default": statistics.median(speedups),
        "speed_mode_within_1.10x_of_dense": f"{sum(speed_ok)}/{len(speed_ok)}",
        "speed_mode_worst_ratio_vs_dense": max(c["speed_vs_dense"] for c in cells),
        "speed_mode_faster_than_dense_where_an_mpo_plan_is": f"{sum(faster_ok)}/{len(faster_ok)}",
        "memory_mode_peak_within_limit": f"{sum(mem_ok)}/{len(mem_ok)}",
        "memory_mode_keeps_at_most_one_copy_of_the_cores":
            f"{sum(c['stored_bytes']['memory_cache'] <= c['stored_bytes']['mpo'] for c in cells)}/{len(cells)}",
    }


def markdown(cells: list[dict], summary: dict, info: dict, command: str | None = None) -> str:
    lines = ["# Kernel benchmark", "", f"Machine: {banner(info)}", ""]
    lines += [f"Command: `{command}`", ""] if command else []
    lines += ["Times in microseconds per call (median of interleaved rounds), fp32. "
              "`mem/best` = bondgate memory mode / fastest other MPO variant; `spd/dense` = speed mode / nn.Linear; "
              "`kept MB (mem)`: what memory mode keeps between calls besides the cores (their sweep layout, if that plan won).",
              "", "| in x out | r | B | dense | einsum | sweep | tltorch fact | tltorch recon | bg memory | bg speed |"
              " mem/best | spd/dense | plan (memory) | peak MB (mem) | limit MB | kept MB (mem) | cores MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        t = c["us"]
        lines.append(
            f"| {c['in']}x{c['out']} | {c['r']} | {c['B']} | {t['dense']:.0f} | {t['einsum']:.0f} | {t['sweep']:.0f} | "
            f"{t['tltorch_fact']:.0f} | {t['tltorch_recon']:.0f} | {t['bg_memory']:.0f} | {t['bg_speed']:.0f} | "
            f"{c['mem_vs_best_mpo']:.2f} | {c['speed_vs_dense']:.2f} | {c['plan_memory']} | "
            f"{c['peak_bytes_memory'] / 2**20:.1f} | {c['memory_limit_bytes'] / 2**20:.1f} | "
            f"{c['stored_bytes']['memory_cache'] / 2**20:.2f} | {c['stored_bytes']['mpo'] / 2**20:.2f} |")
    lines += ["", "## Summary", ""] + [f"- {k}: {v}" for k, v in summary.items()]
    return "\n".join(lines) + "\n"


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(c["in"], c["out"]) for c in cells}, key=lambda s: s[0] * s[1] + s[1])
    rows = sorted({c["B"] for c in cells})
    fig, axes = plt.subplots(len(rows), len(shapes), figsize=(4 * len(shapes), 3.2 * len(rows)), squeeze=False)
    style = {"dense": ("k", "-"), "einsum": ("tab:orange", ":"), "sweep": ("tab:brown", ":"),
             "tltorch_fact": ("tab:purple", "--"), "tltorch_recon": ("tab:pink", "--"),
             "bg_memory": ("tab:blue", "-"), "bg_speed": ("tab:green", "-")}
    for i, B in enumerate(rows):
        for j, sh in enumerate(shapes):
            ax = axes[i][j]
            sel = sorted((c for c in cells if c["B"] == B and (c["in"], c["out"]) == sh), key=lambda c: c["r"])
            if not sel:
                ax.axis("off")
                continue
            for v, (col, ls) in style.items():
                ax.plot([c["r"] for c in sel], [c["us"][v] for c in sel], color=col, ls=ls, marker="o", ms=3, label=v)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{sh[0]}->{sh[1]}, B={B}", fontsize=9)
            ax.set_xlabel("bond r")
            if j == 0:
                ax.set_ylabel("us / call")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=2)
    ap.add_argument("--rounds", type=number_arg(int, 1, what="rounds"), default=5)
    ap.add_argument("--min-time", type=number_arg(float, 0, what="min-time"), default=0.05,
                    help="seconds per variant per round")
    ap.add_argument("--quick", action="store_true", help="3 cells only")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="results get a _cuda suffix")
    add_out_arg(ap)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("argument --device: cuda requested, but torch.cuda.is_available() is False on this machine")
    check_out_dir(ap, args.out)
    command = command_line(__file__)
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(banner(info), flush=True)
    grid = [(i, o, r, B) for (i, o) in SHAPES for r in BONDS for B in ROWS]
    if args.quick:
        grid = [(256, 256, 32, 1), (1024, 4096, 8, 1), (1024, 1024, 16, 64)]
    cells = []
    t0 = time.time()
    for n_in, n_out, r, B in grid:
        c = run_cell(n_in, n_out, r, B, args.rounds, args.min_time, torch.device(args.device))
        cells.append(c)
        t = c["us"]
        print(f"{n_in}x{n_out} r={r} B={B}: dense {t['dense']:.0f}us  best-other-mpo "
              f"{min(t[v] for v in MPO_VARIANTS):.0f}us  bg-mem {t['bg_memory']:.0f}us ({c['plan_memory']})  "
              f"bg-speed {t['bg_speed']:.0f}us ({c['plan_speed']})  [{time.time() - t0:.0f}s]", flush=True)
    summary = summarize(cells)
    stem = ("kernel_quick" if args.quick else "kernel") + ("" if args.device == "cpu" else f"_{args.device}")
    write_json(args.out / f"{stem}.json", {"machine": info, "command": command, "args": args_dict(args),
                                           "summary": summary, "cells": cells})
    write_text(args.out / f"{stem}.md", markdown(cells, summary, info, command))
    plot(cells, args.out / f"{stem}.png")
    print("\n".join(f"{k}: {v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
