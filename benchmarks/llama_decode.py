"""LLaMA-shape decode benchmark: tokens/s of HF ``generate()`` (greedy, KV cache) at batch 1, 4, 16 for a
LlamaForCausalLM with LLaMA's layer widths (hidden 2048, intermediate 5632, 32 heads, 4 KV heads: GQA, SwiGLU,
RMSNorm), random weights (speed does not depend on the values), as

* ``dense``     fp32;
* ``dense_t``   the dense model with every linear weight stored as ``LowRankLinear`` stores ``U`` (the transpose
                of a contiguous ``(in, out)`` matrix): same values, the layout one-row products run fastest in, so
                ``mpo`` vs ``dense_t`` takes that layout advantage out of the low-rank model's speed-up;
* ``int8``      torch's dynamic int8 quantization of the same target layers (``bondgate.quantize_int8``);
* ``mpo``       the target layers compressed to ``--ratio`` of their weights (``bondgate.compress`` with one bond
                cap for every layer, ``allocation="uniform"``: random weights have flat spectra, on which the global
                allocation's choices are arbitrary (it gave the LM head 1.1% and two layers 2.8%); default policy
                ``auto``: an MPO layer whose factored kernels are slower than dense keeps the dense weight);
* ``mpo_int8``  the same with int8 cores (``bondgate.quantize_mpo``);
* ``lowrank_int8`` with ``--kinds lowrank``: the low-rank pairs' two factors as ``nn.Linear`` layers
                (``LowRankLinear.to_linears``) through the same dynamic int8 quantization;
* ``gated``     the ``mpo`` model with per-token bond gating (error controllers fitted on random prompts, one shared
                price calibrated for a ``--budget`` fraction of the full-width FLOPs; several budgets: one variant
                ``gated@B`` each, from the same fitted controllers); with ``--kinds lowrank``
                the low-rank pairs are gated by rank prefix (2-core MPOs whose bond is the rank) and run the
                nested-prefix kernel;
* ``static``    (with ``gated``) the gated model with every bond cut to the ``--budget`` fraction for every token
                (``set_mode(model, B)``; ``static@B`` per budget): no controller, no decision — for a low-rank pair
                exactly ``B`` of the full-width FLOPs, so ``gated@B`` vs ``static@B`` is what the decisions cost or
                gain in time at the same FLOPs, and ``static@B`` vs ``mpo`` is the most a ``B`` budget can give.

The targets are every linear layer: the blocks' and the LM head (``--no-head``: the blocks only; the head is 2048 x
``--vocab``, 43% of the weights a decode step reads with 2 layers); the embedding table stays dense (a lookup).
Variants are timed in interleaved rounds (every other round in reverse order); the figure is the median tokens/s (new tokens of all sequences / wall
time of the ``generate`` call, prefill of a ``--prompt``-token prompt included). The length is not forced
(``--min-new-tokens`` forces it, as results before 2026-12-04 did, at a vocabulary scan per step); every call is
checked to have generated ``--new-tokens`` tokens in every sequence.

Run:  python benchmarks/llama_decode.py                      (2 layers; ~12 min on 2 cores)
      python benchmarks/llama_decode.py --allocation global --kinds mpo lowrank --max-latency-ratio 0.5 --tag _latency
      (latency-aware: each layer an MPO, a low-rank pair or dense, predicted time <= 0.5 x dense at the largest batch)
      python benchmarks/llama_decode.py --allocation uniform --kinds lowrank --variants dense int8 mpo lowrank_int8 --tag _lowrank
      python benchmarks/llama_decode.py --allocation uniform --kinds lowrank --variants dense int8 mpo lowrank_int8 gated --budget 0.5 0.4 0.3 --max-groups 1 --track 0.05 --tag _lowrank_budgets
      (low-rank 25%, its int8 factors, and gated at three FLOPs budgets, one level per call, price held on the decode tokens)
      python benchmarks/llama_decode.py --allocation uniform --kinds lowrank --variants dense mpo gated static --budget 0.5 0.4 0.3 --max-groups 1 --track 0.05 --tag _lowrank_static
      (gated against static truncation at the same FLOPs: what the decisions cost in time)
Writes benchmarks/results/llama_decode{TAG}.{json,md} (``--out DIR``: into DIR instead).
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out_arg, args_dict, banner, command_line, machine_info, write_json, write_text  # noqa: E402

import bondgate  # noqa: E402
from bondgate.cli import number_arg  # noqa: E402

BLOCKS = r"model\.layers\..*"
HEAD = r"lm_head"
#: what --variants may name (several --budget values make ``gated@B`` / ``static@B`` of gated / static)
VARIANTS = ["dense", "dense_t", "int8", "mpo", "mpo_int8", "lowrank_int8", "gated", "static"]


def build_dense(layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=512, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def prompts(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def build_variants(dense, args) -> dict:
    variants = {"dense": dense}
    if "dense_t" in args.variants:
        variants["dense_t"] = copy.deepcopy(dense)
        with torch.no_grad():
            for m in variants["dense_t"].modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight = torch.nn.Parameter(m.weight.detach().t().contiguous().t(), requires_grad=False)
    if "int8" in args.variants:
        variants["int8"] = bondgate.quantize_int8(dense, target=lambda name, _: re.fullmatch(args.target, name) is not None)
    if {"mpo", "mpo_int8", "lowrank_int8", "gated"} & set(args.variants):
        t0 = time.perf_counter()
        mpo = bondgate.compress(copy.deepcopy(dense), bondgate.CompressionConfig(
            param_ratio=args.ratio, target_modules=args.target, calibrate=False, num_cores=args.num_cores,
            allocation=args.allocation, kinds=args.kinds, max_latency_ratio=args.max_latency_ratio,
            deploy_rows=max(args.batches)), progress=not args.no_progress)
        print(f"compressed in {time.perf_counter() - t0:.0f} s", flush=True)
        print(mpo.bondgate_report.table(), flush=True)
        if "mpo" in args.variants:
            variants["mpo"] = mpo
        if "lowrank_int8" in args.variants:  # the low-rank pairs' factors through torch's dynamic int8
            low = copy.deepcopy(mpo)
            for name, m in list(low.named_modules()):
                if isinstance(m, bondgate.LowRankLinear):
                    low.set_submodule(name, m.to_linears())
            variants["lowrank_int8"] = bondgate.quantize_int8(
                low, target=lambda name, _: re.fullmatch(args.target, name.rpartition(".")[0]) is not None
                or re.fullmatch(args.target, name) is not None)
        if not any(isinstance(m, bondgate.MPOLinear) for m in mpo.modules()):
            print("no MPO layer was chosen (low-rank / dense only): skipping mpo_int8", flush=True)
            args.variants = [v for v in args.variants if v != "mpo_int8"]
        if "mpo_int8" in args.variants:
            variants["mpo_int8"] = bondgate.quantize_mpo(copy.deepcopy(mpo), "int8")
        if "gated" in args.variants:
            gated = bondgate.gate(copy.deepcopy(mpo), bondgate.GatingConfig(controller="error",
                                                                            levels=(0.25, 0.5, 0.75, 1.0)))
            data = [{"input_ids": prompts(4, 32, args.vocab, 100 + i)} for i in range(4)]
            bondgate.fit_controllers(gated, data)
            for budget in args.budget:  # one fitted model, a price per budget
                model = gated if len(args.budget) == 1 else copy.deepcopy(gated)
                got = bondgate.set_budget(model, budget, data, max_groups=args.max_groups, track=args.track)
                print(f"{variant_name(args, budget)}: {got:.3f} of the full-width FLOPs on the calibration prompts",
                      flush=True)
                variants[variant_name(args, budget)] = model
                if "static" in args.variants:
                    variants[variant_name(args, budget, "static")] = bondgate.set_mode(copy.deepcopy(gated), budget)
    keep = [v for v in args.variants if v not in ("gated", "static")] + [
        variant_name(args, b, kind) for kind in ("gated", "static") if kind in args.variants for b in args.budget]
    return {k: v.eval() for k, v in variants.items() if k in keep}


def variant_name(args, budget: float, kind: str = "gated") -> str:
    """``gated`` (``static``) for one budget, ``gated@B`` (``static@B``) for each of several."""
    return kind if len(args.budget) == 1 else f"{kind}@{budget:g}"


def static_fraction(model) -> float:
    """FLOPs per row of a model whose gated layers all run one static width (``set_mode(model, f)``), as a
    fraction of their full width (one-row plans, as gating counts them; no controller runs)."""
    from bondgate.gating import _widths  # the widths set_mode(model, f) runs
    from bondgate.planner import min_flops

    used = full = 0.0
    for m in (m for m in model.modules() if isinstance(m, bondgate.GatedMPOLinear)):
        used += min_flops(m.out_factors, m.in_factors, _widths(m.bond_dims, m.mode), 1)
        full += m.full_cost
    return used / full


def decode(model, ids: torch.Tensor, new_tokens: int, min_new_tokens: bool = False) -> torch.Tensor:
    """Greedy ``generate`` of ``new_tokens`` after ``ids`` (batch, prompt) -> (batch, prompt + new_tokens).

    By default the length is not forced: ``min_new_tokens`` adds logits processors that scan the whole vocabulary
    for the end-of-sequence id at every step (0.5 ms of a 2-layer step at batch 1), which a deployment that stops
    at EOS does not pay. Instead the output is checked: a sequence that ended early would leave padded steps in
    the timing, and is an error."""
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens if min_new_tokens else None, do_sample=False,
                             use_cache=True, pad_token_id=0)
    eos = model.generation_config.eos_token_id
    if out.shape != (ids.shape[0], ids.shape[1] + new_tokens) or (eos is not None and bool(
            torch.isin(out[:, ids.shape[1]:], torch.tensor(eos)).any())):
        raise RuntimeError(f"a sequence ended before {new_tokens} new tokens (output {tuple(out.shape)}): its padded "
                           "steps would count as tokens; rerun with --min-new-tokens")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=number_arg(int, 1, what="layers"), default=2)
    ap.add_argument("--vocab", type=number_arg(int, 1, what="vocab"), default=32000)
    ap.add_argument("--ratio", type=number_arg(float, 0, 1, low_open=True, what="ratio"), default=0.25,
                    help="kept fraction of the block layers' weights")
    ap.add_argument("--num-cores", type=number_arg(int, 1, 17, what="num-cores"), default=3)
    ap.add_argument("--budget", type=number_arg(float, 0, 1, low_open=True, what="budget"), nargs="+", default=[0.5],
                    help="gated: average FLOPs fraction of the full width (several: one gated variant per budget, "
                    "named gated@B)")
    ap.add_argument("--max-groups", type=number_arg(int, 1, what="max-groups"), default=None,
                    help="gated: at most this many distinct levels per call (set_budget max_groups; default: each "
                    "token its own level)")
    ap.add_argument("--track", type=number_arg(float, 0, 10, what="track"), default=0.0,
                    help="gated: set_budget track (online price correction holding the budget on the decode "
                    "tokens; 0 = the price calibrated on the prompts stays)")
    ap.add_argument("--batches", type=number_arg(int, 1, what="batch"), nargs="+", default=[1, 4, 16])
    ap.add_argument("--prompt", type=number_arg(int, 1, what="prompt"), default=16)
    ap.add_argument("--new-tokens", type=number_arg(int, 1, what="new-tokens"), default=32)
    ap.add_argument("--rounds", type=number_arg(int, 1, what="rounds"), default=3)
    ap.add_argument("--min-new-tokens", action="store_true", help="force the length with generate's min_new_tokens "
                    "(how results before 2026-12-04 were measured; adds a vocabulary scan per step)")
    ap.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=2)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=["dense", "int8", "mpo", "mpo_int8", "gated"],
                    metavar="VARIANT", help=f"any of {', '.join(VARIANTS)} (see above)")
    ap.add_argument("--no-head", dest="head", action="store_false", help="leave the LM head dense")
    ap.add_argument("--allocation", choices=["uniform", "global"], default="uniform")
    ap.add_argument("--kinds", nargs="+", choices=["mpo", "lowrank"], default=None,
                    help="CompressionConfig.kinds (forms a layer may take; --allocation uniform takes one form, global "
                    "chooses between them)")
    ap.add_argument("--max-latency-ratio", type=number_arg(float, 0, low_open=True, what="max-latency-ratio"),
                    default=None,
                    help="CompressionConfig.max_latency_ratio at deploy_rows = the largest batch (needs global)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--tag", default="")
    add_out_arg(ap)
    args = ap.parse_args()
    command = command_line(__file__)
    if "static" in args.variants and "gated" not in args.variants:
        ap.error("the static variants are cut from the gated model: --variants needs gated too")
    args.target = BLOCKS + ("|" + HEAD if args.head else "")
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(banner(info), flush=True)

    dense = build_dense(args.layers, args.vocab)
    variants = build_variants(dense, args)
    sizes = {k: bondgate.size_on_disk(m) for k, m in variants.items()}
    block_params = {k: sum(p.numel() for n, p in m.named_parameters() if n.startswith("model.layers."))
                    for k, m in variants.items()}
    results: dict[str, dict[int, list[float]]] = {k: {b: [] for b in args.batches} for k in variants}
    gating_by_batch: dict[int, float] = {}
    for b in args.batches:
        ids = prompts(b, args.prompt, args.vocab, seed=b)
        for model in variants.values():  # warm-up: plans, autotuning, allocator
            decode(model, ids, args.new_tokens, args.min_new_tokens)
        gated = [k for k in variants if k.startswith("gated")]
        for k in gated:  # the FLOPs fraction of this batch's timed calls only
            bondgate.gating.average_flops(variants[k], reset=True)
        for r in range(args.rounds):
            for name, model in (list(variants.items()) if r % 2 == 0 else list(variants.items())[::-1]):
                t0 = time.perf_counter()
                decode(model, ids, args.new_tokens, args.min_new_tokens)
                results[name][b].append(b * args.new_tokens / (time.perf_counter() - t0))
            print(f"batch {b} round {r}: " + "  ".join(f"{k} {v[b][-1]:.1f}" for k, v in results.items()), flush=True)
        for k in gated:
            gating_by_batch.setdefault(k, {})[b] = bondgate.gating.average_flops(variants[k], reset=True)
    tps = {k: {b: statistics.median(v) for b, v in per.items()} for k, per in results.items()}
    for k, m in variants.items():  # a static width: the same FLOPs at every batch
        if k.startswith("static"):
            frac = static_fraction(m)
            gating_by_batch[k] = {b: frac for b in args.batches}
    gating = gating_by_batch or None  # {variant: {batch: FLOPs fraction}}
    write_json(args.out / f"llama_decode{args.tag}.json", {
        "machine": info, "command": command, "args": args_dict(args),
        "tokens_per_s": tps, "samples": results, "size_bytes": sizes, "block_params": block_params,
        "gated_flops_fraction": gating,
        "report": variants["mpo"].bondgate_report.to_dict() if "mpo" in variants else None})
    lines = [f"# LLaMA-shape decode ({args.layers} layers, hidden 2048, intermediate 5632, vocab {args.vocab})", "",
             f"Machine: {banner(info)}", "", f"Command: `{command}`", "",
             f"All settings: `python benchmarks/llama_decode.py --layers {args.layers} --vocab {args.vocab} "
             f"--ratio {args.ratio} --num-cores {args.num_cores} --budget "
             f"{' '.join(f'{b:g}' for b in args.budget)}"
             f"{' --max-groups ' + str(args.max_groups) if args.max_groups else ''}"
             f"{' --track ' + str(args.track) if args.track else ''}"
             f"{'' if args.head else ' --no-head'} --allocation {args.allocation}"
             f"{' --kinds ' + ' '.join(args.kinds) if args.kinds else ''}"
             f"{' --max-latency-ratio ' + str(args.max_latency_ratio) if args.max_latency_ratio else ''}"
             f" --batches {' '.join(map(str, args.batches))} --prompt {args.prompt} --new-tokens {args.new_tokens}"
             f" --rounds {args.rounds} --threads {args.threads} --variants {' '.join(args.variants)}"
             f"{' --min-new-tokens' if args.min_new_tokens else ''}"
             f"{' --tag ' + args.tag if args.tag else ''}` (targets `{args.target}`); "
             f"greedy generate, prompt {args.prompt} tokens, {args.new_tokens} new tokens"
             f"{' (forced by min_new_tokens)' if args.min_new_tokens else ' (checked: no sequence ended early)'}, median of {args.rounds} "
             "interleaved rounds; tokens/s counts the new tokens of all sequences.", "",
             "| variant | block weights | size on disk (MB) | " + " | ".join(f"tok/s @ {b}" for b in args.batches)
             + " | " + " | ".join(f"vs dense @ {b}" for b in args.batches) + " |",
             "|---" * (3 + 2 * len(args.batches)) + "|"]
    for k in variants:
        lines.append(f"| {k} | {block_params[k]:,} | {sizes[k] / 1e6:.1f} | "
                     + " | ".join(f"{tps[k][b]:.1f}" for b in args.batches) + " | "
                     + " | ".join(f"{tps[k][b] / tps['dense'][b]:.2f}x" if "dense" in tps else "-"
                                  for b in args.batches) + " |")
    if "mpo" in variants:
        forms: dict[str, int] = {}
        for r in variants["mpo"].bondgate_report.layers:
            forms[r.form] = forms.get(r.form, 0) + 1
        lines += ["", "`mpo` variant's layers by form: " + ", ".join(f"{v} {k}" for k, v in sorted(forms.items()))
                  + " (a `lowrank` layer is a pair of factors, `LowRankLinear`)"]
    for k in gating or {}:
        if "mpo" in variants:
            what = ("FLOPs fraction of the static width" if k.startswith("static") else
                    "average FLOPs fraction of the gated layers over the timed calls, controllers included")
            lines += ["", f"{k} vs full width (the ungated `mpo` variant): " + ", ".join(
                f"{tps[k][b] / tps['mpo'][b]:.2f}x at batch {b}" for b in args.batches)
                + f" ({what}: " + ", ".join(f"{gating[k][b]:.3f} at batch {b}" for b in args.batches) + ")"]
    write_text(args.out / f"llama_decode{args.tag}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
