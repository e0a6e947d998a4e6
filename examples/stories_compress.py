"""Compress llama2.c's stories260K (a real pretrained LLaMA-architecture model) and heal it by distillation.

    python examples/stories_compress.py --ratio 0.5 --num-cores 2 3 --minutes 6 --samples 1600 --threads 1

Targets: the linear layers of the 5 transformer blocks (``model.layers.*`` q/k/v/o_proj, gate/up/down_proj;
226,560 weights); the tied embedding / LM head and the norms stay dense (they are trained during healing).
Quality: token perplexity on ``tinystories_sample.txt`` (5 TinyStories stories, 1,804 predicted tokens), exactly
as ``bondgate.llama2c.tinystories_perplexity`` computes it. Those 5 stories are the held-out evaluation only.

Data (data-free self-distillation): ``--samples`` stories sampled from the dense model itself, from BOS, at
temperature 1 with no top-k/top-p truncation (unbiased samples of the teacher's distribution), seeded, each
ending where the model emits BOS (llama2.c's story separator) or at 512 tokens. Stories that repeat another
story or contain any sentence of the evaluation sample are dropped (and the script asserts none is left).
The first ``--calib-stories`` calibrate the compression, the next ``--valid-stories`` are held out from
training to choose between the configurations (and the best healing step); the rest, plus the calibration
stories, are the distillation data. The evaluation sample is never used to choose anything.

For each ``--num-cores`` the script compresses a copy of the dense model to ``--ratio`` of the block weights,
heals it for ``--minutes`` (``DistillLoss(hidden=..., logits=...)``, AdamW, budget on the CPU clock), and
measures. The configuration with the lowest perplexity on the generated validation stories is saved with
``bondgate.save`` to ``--out``, reloaded with ``bondgate.load`` and re-scored. Results go to
``benchmarks/results/stories_compress.{json,md}`` (``--tag`` changes the name, ``--results DIR`` the folder).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import add_out_arg, banner, check_checkpoint, check_out_dir, machine_info, write_json  # noqa: E402

import bondgate as bg  # noqa: E402
from bondgate.calibration import model_device, to_device  # noqa: E402
from bondgate.cli import MAX_CORES, number_arg  # noqa: E402
from bondgate.llama2c import (  # noqa: E402
    BOS_ID,
    Llama2cTokenizer,
    load_llama2c,
    split_stories,
    tinystories_perplexity,
)

SHARED = Path(os.environ.get("BONDGATE_SHARED", ROOT.parent / "shared"))
MODEL_DIR = SHARED / "models" / "stories260K"
#: the blocks' linear layers (the embedding / tied LM head are not targeted)
TARGET = r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
PAD_ID = 0  # <unk>: never generated after the story ends, and masked out everywhere


# ------------------------------------------------------------------------------------------------ model
def load(model_dir: Path = MODEL_DIR):
    """``(dense model, tokenizer, sample path)`` of stories260K."""
    model = load_llama2c(model_dir / "stories260K.bin")
    tok = Llama2cTokenizer(model_dir / "tok512.bin", vocab_size=model.config.vocab_size)
    return model, tok, model_dir / "tinystories_sample.txt"


def block_weights(model) -> int:
    """Stored weight values of the blocks' linear layers (``model.layers.*``; MPO cores and low-rank factors count
    as stored)."""
    total = 0
    for name, mod in model.named_modules():
        if not name.startswith("model.layers.") or ".controller" in name:
            continue
        if isinstance(mod, (bg.MPOLinear, bg.LowRankLinear)):
            total += mod.num_params
        elif isinstance(mod, torch.nn.Linear):
            total += mod.weight.numel()
    return total


# ------------------------------------------------------------------------------------------------- data
@torch.no_grad()
def generate_stories(model, n: int, seed: int, batch: int = 32, max_len: int | None = None,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     static_cache: bool = False) -> list[list[int]]:
    """``n`` stories sampled from ``model`` from BOS: token id lists that start with BOS and stop before the BOS
    that ends the story (or at ``max_len`` tokens). ``static_cache`` preallocates the KV cache (HF's default cache
    grows by concatenation, which dominates the time of large batches: 1.5x faster at batch 256)."""
    extra = {"cache_implementation": "static"} if static_cache else {}
    max_len = max_len or model.config.max_position_embeddings
    gen = torch.Generator().manual_seed(seed)
    stories: list[list[int]] = []
    while len(stories) < n:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))  # generate() draws from the global RNG
        k = min(batch, n - len(stories))
        bos = torch.full((k, 1), BOS_ID, device=model_device(model))
        out = model.generate(bos, do_sample=True, temperature=temperature, top_k=top_k,
                             top_p=top_p, max_new_tokens=max_len - 1, eos_token_id=BOS_ID, pad_token_id=PAD_ID, **extra)
        for row in out.tolist():
            end = row.index(BOS_ID, 1) if BOS_ID in row[1:] else len(row)
            stories.append(row[:end])
    return stories


def load_or_generate(dense, args) -> tuple[list[list[int]], bool]:
    """The ``args.samples`` stories of ``args.seed``: read from ``args.stories_cache`` when it holds the same
    samples / seed / max-len / gen-batch, else generated (and written there). Returns ``(stories, read)``."""
    cache = Path(args.stories_cache) if args.stories_cache else None
    key = {"samples": args.samples, "seed": args.seed, "max_len": args.max_len, "gen_batch": args.gen_batch}
    if cache is not None and cache.exists():
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            print(f"read {len(saved['stories'])} generated stories from {cache}", flush=True)
            return saved["stories"], True
    raw = generate_stories(dense, args.samples, args.seed, batch=args.gen_batch, max_len=args.max_len,
                           static_cache=args.gen_batch > 32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "stories": raw}))
    return raw, False


def sample_sentences(text: str) -> list[str]:
    """The sentences of the evaluation stories (split after . ! ? and at line breaks), whitespace-normalised."""
    out = []
    for story in split_stories(text):
        for s in re.split(r"(?<=[.!?\u201d\"])\s+|\n+", story):
            s = " ".join(s.split())
            if s:
                out.append(s)
    return sorted(set(out))


def contains_any(text: str, sentences: list[str]) -> list[str]:
    flat = " ".join(text.split())
    return [s for s in sentences if s in flat]


def clean_stories(stories: list[list[int]], tok, sample_text: str, min_tokens: int = 8):
    """Drop too-short stories, repeats, and every story containing a sentence of the evaluation sample.
    Returns ``(kept stories, counts of what was dropped)``."""
    sentences = sample_sentences(sample_text)
    seen, kept = set(), []
    dropped = {"short": 0, "duplicate": 0, "contains_sample_sentence": 0}
    for ids in stories:
        if len(ids) < min_tokens:
            dropped["short"] += 1
            continue
        key = tuple(ids)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        if contains_any(tok.decode(ids), sentences):
            dropped["contains_sample_sentence"] += 1
            continue
        kept.append(ids)
    for ids in kept:  # the held-out evaluation must stay unseen
        assert not contains_any(tok.decode(ids), sentences)
    return kept, dropped


def split(stories: list[list[int]], calib: int, valid: int) -> tuple[list, list, list]:
    """``(calibration, validation, training)`` stories: the first ``calib``, the next ``valid`` (held out), and the
    calibration stories plus all the rest."""
    calib_st, valid_st = stories[:calib], stories[calib:calib + valid]
    train_st = calib_st + stories[calib + valid:]
    if len(train_st) <= len(calib_st) or not valid_st:
        raise SystemExit(f"too few stories ({len(stories)} kept) for {calib} calibration + {valid} validation stories")
    return calib_st, valid_st, train_st


def healing_data(dense, tok, sample: Path, args) -> tuple[list, list, list[dict]]:
    """``(calibration stories, validation stories, training batches)`` as :func:`run` prepares them with packed rows
    (``args``: samples, seed, max_len, gen_batch, stories_cache, calib_stories, valid_stories, block > 0, batch), for
    the ablations in ``benchmarks/`` that heal other students on the same data."""
    stories, _ = clean_stories(load_or_generate(dense, args)[0], tok, sample.read_text(encoding="utf-8"))
    calib_st, valid_st, train_st = split(stories, args.calib_stories, args.valid_stories)
    return calib_st, valid_st, packed_batches(train_st, args.block, args.batch, seed=args.seed)


def story_batches(stories: list[list[int]], batch: int, seed: int = 0) -> list[dict]:
    """Per-story batches (each story from its BOS, as the evaluation scores them): stories of similar length
    padded together with an ``attention_mask``; the batch order is shuffled."""
    order = sorted(range(len(stories)), key=lambda i: len(stories[i]))
    out = []
    for i in range(0, len(order), batch):
        chunk = [stories[j] for j in order[i:i + batch]]
        L = max(map(len, chunk))
        ids = torch.full((len(chunk), L), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    g = torch.Generator().manual_seed(seed)
    return [out[i] for i in torch.randperm(len(out), generator=g).tolist()]


def packed_batches(stories: list[list[int]], block: int, batch: int, seed: int = 0) -> list[dict]:
    """llama2.c's training layout: the stories (each starting with BOS) concatenated into one stream, cut into
    ``block``-token rows, ``batch`` rows per batch, rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(stories), generator=g).tolist()
    stream = torch.tensor([t for i in perm for t in stories[i]])
    rows = stream[: len(stream) // block * block].view(-1, block)
    rows = rows[torch.randperm(rows.shape[0], generator=g)]
    if rows.shape[0] < batch:
        raise SystemExit(f"the training stories ({len(stream):,} tokens) make {rows.shape[0]} rows of {block} tokens, "
                         f"not one batch of {batch}: lower --batch or --block, or raise --samples")
    return [{"input_ids": rows[i:i + batch]} for i in range(0, rows.shape[0] - batch + 1, batch)]


@torch.no_grad()
def story_perplexity(model, stories: list[list[int]], batch: int = 16) -> float:
    """Perplexity over token-id stories, each from its BOS (every token after BOS predicted once)."""
    nll, count = 0.0, 0
    device = model_device(model)
    for b in story_batches(stories, batch):
        b = to_device(b, device)
        logits = model(**b, use_cache=False).logits[:, :-1].float()
        target = b["input_ids"][:, 1:].masked_fill(b["attention_mask"][:, 1:] == 0, -100)
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    return math.exp(nll / count)


# ---------------------------------------------------------------------------------------------- pipeline
def compress(dense, calib: list[dict], ratio: float, num_cores: int, weighting: str = "relative",
             refine_steps: int = 30, kinds: list[str] | None = ("mpo",), allocation: str = "global"):
    """A compressed copy of ``dense``, on ``dense``'s device (the factorization itself runs on the CPU). ``kinds``: MPO
    layers only by default, as the published figures were made (``None``: the library's default)."""
    device = model_device(dense)
    # distill() freezes its teacher's parameters and compress() keeps a frozen layer frozen: unfreeze the copy
    student = copy.deepcopy(dense).cpu().requires_grad_(True)
    bg.compress(student, bg.CompressionConfig(param_ratio=ratio, target_modules=TARGET, num_cores=num_cores,
                                              layer_weighting=weighting, refine_steps=refine_steps,
                                              kinds=kinds, allocation=allocation),
                calibration=calib, progress=False)
    return student.to(device)


def resumed(path: str):
    """A student saved by this script (``bondgate.save``), every parameter trainable."""
    student = bg.load(path).requires_grad_(True)
    if not any(isinstance(m, (bg.MPOLinear, bg.LowRankLinear)) for m in student.modules()):
        raise SystemExit(f"{path} holds no compressed layer: not a student of this script")
    return student


def cores_of(student) -> int:
    """MPO cores per layer of a student (2 for a low-rank pair)."""
    return max((len(m.cores) if isinstance(m, bg.MPOLinear) else 2) for m in student.modules()
               if isinstance(m, (bg.MPOLinear, bg.LowRankLinear)))


def forms_of(student) -> str:
    """The layer forms of a student, for labels: ``"2-core MPO"``, ``"low-rank"``, ``"3-core MPO + low-rank"``."""
    return " + ".join(sorted({f"{len(m.cores)}-core MPO" if isinstance(m, bg.MPOLinear) else "low-rank"
                              for m in student.modules() if isinstance(m, (bg.MPOLinear, bg.LowRankLinear))}))


def warm_up(student, batch: dict) -> None:
    """One forward/backward pass of ``student`` on a training batch, gradients dropped.

    The first call of each MPO layer at a new input shape times its candidate contraction plans (about 5 s of
    CPU for the 35 layers here). Inside ``distill`` that time would land in the first 20 steps, from whose speed a
    time-budgeted run plans its learning-rate schedule: the schedule would end after about half the budget and
    the rest would train at learning rate 0."""
    student.train()
    student(**to_device(batch, model_device(student)), output_hidden_states=True).logits.float().sum().backward()
    student.zero_grad(set_to_none=True)


def heal(student, dense, train: list[dict], args, valid_stories: list[list[int]] | None = None,
         steps: int | None = None):
    warm_up(student, train[0])
    eval_fn = None if not valid_stories else (lambda m: story_perplexity(m, valid_stories))
    return bg.distill(student, dense, train,
                      loss=bg.DistillLoss(hidden=args.hidden, logits=args.logits, temperature=args.temperature),
                      steps=steps, max_minutes=None if steps else args.minutes, budget_clock=args.clock, lr=args.lr,
                      warmup=args.warmup, eval_fn=eval_fn, higher_is_better=False, eval_every=args.eval_every,
                      patience=None, progress=False, log_every=args.log_every, seed=args.seed)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine_info()
    print(banner(info), flush=True)
    t_all = time.perf_counter()
    dense, tok, sample = load(Path(args.model_dir))
    if args.block > dense.config.max_position_embeddings:
        raise SystemExit(f"--block {args.block} is longer than the model's {dense.config.max_position_embeddings} "
                         "positions")
    dense.to(device)
    sample_text = sample.read_text(encoding="utf-8")
    dense_ppl, n_tokens = tinystories_perplexity(dense, tok, sample)
    print(f"dense: sample ppl {dense_ppl:.4f} over {n_tokens} tokens; block weights {block_weights(dense):,}",
          flush=True)

    t0 = time.perf_counter()
    raw, cached = load_or_generate(dense, args)
    stories, dropped = clean_stories(raw, tok, sample_text)
    gen_s = time.perf_counter() - t0
    calib_st, valid_st, train_st = split(stories, args.calib_stories, args.valid_stories)
    calib = story_batches(calib_st, 16, seed=args.seed)
    shuffle = args.seed if args.shuffle_seed is None else args.shuffle_seed
    train = (packed_batches(train_st, args.block, args.batch, seed=shuffle) if args.block
             else story_batches(train_st, args.batch, seed=shuffle))
    data = {"generated": len(raw), "kept": len(stories), "dropped": dropped,
            "tokens": sum(map(len, stories)), "calibration_stories": len(calib_st),
            "calibration_tokens": sum(map(len, calib_st)), "validation_stories": len(valid_st),
            "validation_tokens": sum(map(len, valid_st)), "train_stories": len(train_st),
            "train_tokens": sum(map(len, train_st)), "train_batches": len(train), "generate_seconds": gen_s,
            "read_from_cache": cached}
    dense_valid = story_perplexity(dense, valid_st)
    print(f"data: {data}; dense ppl on the generated validation stories {dense_valid:.4f}", flush=True)

    rows, best = [], None
    configs = [("resumed", 0)] if args.resume else [(w, n) for w in args.weighting for n in args.num_cores]
    for weighting, nc in configs:
        t0 = time.perf_counter()
        if args.resume:  # a saved student, healed further (a new schedule from --lr down, on the same data)
            student = resumed(args.resume).to(device)
            nc, report = cores_of(student), None
        else:
            student = compress(dense, calib, args.ratio, nc, weighting, args.refine_steps, args.kinds,
                               args.allocation)
            report = student.bondgate_report
        compress_s = time.perf_counter() - t0
        forms = forms_of(student)
        before = tinystories_perplexity(student, tok, sample).perplexity
        before_valid = story_perplexity(student, valid_st)
        print(f"{forms}, {weighting}: {block_weights(student):,} block weights "
              f"({block_weights(student) / block_weights(dense):.4f}), {'loaded' if args.resume else 'compressed'} in "
              f"{compress_s:.1f}s; sample ppl before healing {before:.3f} (validation {before_valid:.3f})", flush=True)
        res = heal(student, dense, train, args, valid_st)
        after = tinystories_perplexity(student, tok, sample).perplexity
        after_valid = story_perplexity(student, valid_st)
        row = {"num_cores": nc, "forms": forms, "weighting": weighting, "block_weights": block_weights(student),
               "ratio": block_weights(student) / block_weights(dense), "ppl_before": before,
               "valid_ppl_before": before_valid, "ppl_after": after, "valid_ppl_after": after_valid,
               "ppl_vs_dense": after / dense_ppl, "compress_seconds": compress_s,
               "distill_seconds": res.seconds - res.eval_seconds, "distill_budget_seconds": res.budget_seconds,
               "steps": res.steps, "stopped": res.stopped, "best_step": res.best_step,
               "history": res.history, "layers": report.to_dict()["layers"] if report else None,
               "table": report.table() if report else f"(the layers of the student loaded from `{args.resume}`)"}
        rows.append(row)
        print(f"{forms}, {weighting}: after {res.steps} steps ({row['distill_seconds'] / 60:.1f} min wall, "
              f"{res.budget_seconds / 60:.1f} min {args.clock}; best step {res.best_step}): sample ppl "
              f"{after:.4f} ({after / dense_ppl - 1:+.1%} vs dense), validation {after_valid:.4f}", flush=True)
        if best is None or after_valid < best[0]["valid_ppl_after"]:
            best = (row, student)

    out = {"machine": info, "args": vars(args), "dense_ppl": dense_ppl, "sample_tokens": n_tokens,
           "dense_valid_ppl": dense_valid, "dense_block_weights": block_weights(dense), "data": data, "rows": rows}
    if args.out:
        row, student = best
        bg.save(student.cpu(), args.out)
        reloaded = bg.load(args.out)  # on the CPU, whatever --device trained it
        ppl_reloaded = tinystories_perplexity(reloaded, tok, sample).perplexity
        assert abs(ppl_reloaded - row["ppl_after"]) <= 1e-4 * row["ppl_after"], (ppl_reloaded, row["ppl_after"])
        out["saved"] = {"path": str(args.out), "num_cores": row["num_cores"], "forms": row["forms"],
                        "weighting": row["weighting"],
                        "ppl_reloaded": ppl_reloaded,
                        "bytes": sum(f.stat().st_size for f in Path(args.out).iterdir() if f.is_file())}
        print(f"saved the {row['forms']} {row['weighting']} model to {args.out}; reloaded: sample ppl {ppl_reloaded:.4f}",
              flush=True)
    out["total_seconds"] = time.perf_counter() - t_all
    if args.tag:
        write_json(args.results / f"stories_{args.tag}.json", out)
        (args.results / f"stories_{args.tag}.md").write_text(markdown(out))
        print(markdown(out))
    return out


def markdown(out: dict) -> str:
    a, d = out["args"], out["data"]
    lines = [f"Machine: {banner(out['machine'])}", "",
             f"Command: `python examples/stories_compress.py {a['argv']}`", "",
             f"stories260K, block linear weights {out['dense_block_weights']:,}; dense perplexity on "
             f"tinystories_sample.txt {out['dense_ppl']:.4f} ({out['sample_tokens']} tokens), on the generated "
             f"validation stories {out['dense_valid_ppl']:.4f}.", "",
             f"Data: {d['generated']} stories sampled from the dense model (seed {a['seed']}, temperature 1, no "
             f"truncation), {d['kept']} kept ({d['dropped']}), {d['tokens']:,} tokens: {d['calibration_stories']} "
             f"calibrate ({d['calibration_tokens']:,} tokens), {d['validation_stories']} validate "
             f"({d['validation_tokens']:,} tokens), {d['train_stories']} train ({d['train_tokens']:,} tokens, "
             f"{d['train_batches']} batches, {'packed ' + str(a['block']) + '-token rows' if a['block'] else 'one story per row'}"
             f"). " + ("Read from the --stories-cache file." if d.get("read_from_cache") else
                     f"Generation took {d['generate_seconds']:.0f} s."), "",
             f"Healing: `DistillLoss(hidden={a['hidden']}, logits={a['logits']}, temperature={a['temperature']})`, "
             f"AdamW lr {a['lr']}, warmup {a['warmup']}, batch {a['batch']}, {a['minutes']} min on the "
             f"{a['clock']} clock, {a['threads']} thread(s), on {a.get('device', 'cpu')}; the weights of the step with the best validation "
             f"perplexity (evaluated every {a['eval_every']} steps) are kept.", "",
             "| layer form | layer weighting | block weights | ratio | sample ppl before healing | after healing | vs dense "
             "| validation ppl before / after | steps (best) | compress s | distill min (budget clock / wall) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r.get('forms', r['num_cores'])} | {r['weighting']} | {r['block_weights']:,} | {r['ratio']:.4f} | "
                     f"{r['ppl_before']:.3f} | **{r['ppl_after']:.4f}** | {r['ppl_vs_dense'] - 1:+.1%} | "
                     f"{r['valid_ppl_before']:.3f} / {r['valid_ppl_after']:.4f} | {r['steps']} ({r['best_step']}) | "
                     f"{r['compress_seconds']:.1f} | {r['distill_budget_seconds'] / 60:.1f} / {r['distill_seconds'] / 60:.1f} |")
    if "saved" in out:
        s = out["saved"]
        lines += ["", f"Saved the {s.get('forms', str(s['num_cores']) + '-core')}, {s.get('weighting', 'relative')} model (best validation perplexity) to `{s['path']}` "
                      f"({s['bytes'] / 1e3:.0f} kB); `bondgate.load` gives sample perplexity {s['ppl_reloaded']:.4f}."]
    lines += ["", f"Total wall time {out['total_seconds'] / 60:.1f} min."]
    for r in out["rows"]:
        lines += ["", f"Layers, {r.get('forms', r['num_cores'])}, {r['weighting']} weighting:", "", r["table"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=number_arg(float, 0, 1, low_open=True, what="ratio"), default=0.5, help="fraction of the block weights to keep")
    ap.add_argument("--num-cores", type=number_arg(int, 2, MAX_CORES, what="cores"), nargs="+", default=[2, 3], help=f"MPO cores per layer, 2 to {MAX_CORES} (each is tried)")
    ap.add_argument("--minutes", type=number_arg(float, 0, low_open=True, what="minutes"), default=6.0, help="healing budget per configuration")
    ap.add_argument("--samples", type=number_arg(int, 1, what="samples"), default=1600, help="stories to sample from the dense model")
    ap.add_argument("--seed", type=number_arg(int, 0, what="seed"), default=0)
    ap.add_argument("--gen-batch", type=number_arg(int, 1, what="gen-batch"), default=32, help="stories generated per generate() call (above 32 "
                    "with a static KV cache)")
    ap.add_argument("--stories-cache", default="", help="JSON file the generated stories are saved to, and read "
                    "back from when samples / seed / max-len / gen-batch match")
    ap.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=1)
    ap.add_argument("--device", default="cpu", help="where to generate, heal and measure; "
                    "the factorization runs on the CPU and the saved model is re-scored there")
    ap.add_argument("--out", default=str(ROOT / "runs" / "stories260K-50"), help="where to save the best model "
                    "('' = do not save)")
    ap.add_argument("--tag", default="compress", help="results name: benchmarks/results/stories_TAG.{json,md} ('' = write none)")
    add_out_arg(ap, "--results")
    ap.add_argument("--resume", default="", help="heal a student saved by this script (its --out folder) further "
                    "instead of compressing: one row, --num-cores / --weighting / --ratio unused")
    ap.add_argument("--shuffle-seed", type=number_arg(int, 0, what="shuffle-seed"), default=None, help="order of the training rows (default: --seed; "
                    "a resumed heal on the same stories may want a new order)")
    ap.add_argument("--model-dir", default=str(MODEL_DIR))
    ap.add_argument("--max-len", type=number_arg(int, 2, what="max-len"), default=None, help="longest generated story (default: the model's 512)")
    ap.add_argument("--calib-stories", type=number_arg(int, 1, what="calib-stories"), default=64)
    ap.add_argument("--valid-stories", type=number_arg(int, 1, what="valid-stories"), default=40)
    ap.add_argument("--weighting", nargs="+", default=["relative"], choices=["relative", "sensitivity", "absolute"],
                    help="CompressionConfig.layer_weighting (each is tried)")
    ap.add_argument("--allocation", choices=["global", "uniform"], default="global",
                    help="CompressionConfig.allocation: one budget over all bonds, or one bond cap for every layer")
    ap.add_argument("--refine-steps", type=number_arg(int, 0, what="refine-steps"), default=30)
    ap.add_argument("--kinds", nargs="+", choices=["mpo", "lowrank"], default=["mpo"],
                    help="CompressionConfig.kinds: the forms a layer may take (default: MPO)")
    # 512 = the model's context, as llama2.c trained it. Rows of 128 tokens (the default before) never show the student
    # a position past 127, while the evaluation scores whole stories (~360 tokens, up to 512) from BOS: with 128 the
    # validation perplexity rose from step ~1700 on while the training loss kept falling.
    ap.add_argument("--block", type=number_arg(int, 0, what="block"), default=512, help="train on packed rows of this many tokens (0: one story "
                    "per row, padded)")
    ap.add_argument("--batch", type=number_arg(int, 1, what="batch"), default=4, help="rows per step (4 x 512 tokens)")
    ap.add_argument("--lr", type=number_arg(float, 0, low_open=True, what="lr"), default=3e-3)
    ap.add_argument("--warmup", type=number_arg(float, 0, 1, high_open=True, what="warmup"), default=0.05)
    ap.add_argument("--hidden", type=number_arg(float, 0, what="hidden"), default=1.0, help="weight of the hidden-state loss")
    ap.add_argument("--logits", type=number_arg(float, 0, what="logits"), default=1.0, help="weight of the logits KL")
    ap.add_argument("--temperature", type=number_arg(float, 0, low_open=True, what="temperature"), default=1.0, help="KL temperature")
    ap.add_argument("--clock", choices=["wall", "cpu"], default=None,
                    help="budget clock: cpu = process CPU time / threads (fair on a shared machine; the default on "
                    "--device cpu), wall (the default on a GPU, where the CPU clock does not count the work)")
    ap.add_argument("--eval-every", type=number_arg(int, 1, what="eval-every"), default=50)
    ap.add_argument("--log-every", type=number_arg(int, 1, what="log-every"), default=25)
    args = ap.parse_args(argv)
    args.argv = shlex.join(sys.argv[1:] if argv is None else argv)
    if args.tag:
        check_out_dir(ap, args.results, "--results")
    if not Path(args.model_dir).is_dir():
        ap.error(f"--model-dir {args.model_dir!r} is not a directory")
    if args.resume:
        check_checkpoint(ap, args.resume, "--resume", "give the --out folder of an earlier run")
    if args.clock is None:
        args.clock = "cpu" if torch.device(args.device).type == "cpu" else "wall"
    if not args.out:
        args.out = None
    try:
        return run(args)
    except FileNotFoundError as exc:  # a file of --model-dir or --resume
        ap.exit(1, f"{ap.prog}: error: {exc}\n")


if __name__ == "__main__":
    main()
