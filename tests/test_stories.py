"""examples/stories_compress.py on a tiny budget: stories260K compressed to 50% of its block weights with
calibration on a few stories sampled from the model itself, then a few distillation steps."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = SHARED / "models" / "stories260K"
DENSE_PPL = 3.548  # tests/test_llama2c.py


@pytest.fixture(scope="module")
def sc():
    missing = [p for p in ("stories260K.bin", "tok512.bin", "tinystories_sample.txt") if not (MODEL_DIR / p).is_file()]
    if missing:
        pytest.skip(f"stories260K files not found in {MODEL_DIR} (set BONDGATE_SHARED): {', '.join(missing)}")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import stories_compress
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return stories_compress


@pytest.fixture(scope="module")
def setup(sc):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dense, tok, sample = sc.load(MODEL_DIR)
        raw = sc.generate_stories(dense, 12, seed=0, batch=12, max_len=160)
        yield sc, dense, tok, sample, raw
    finally:
        torch.set_num_threads(threads)


def test_generated_stories(setup):
    sc, dense, tok, sample, raw = setup
    assert len(raw) == 12 and all(s[0] == 1 and 1 not in s[1:] and 0 not in s and len(s) <= 160 for s in raw)
    assert raw == sc.generate_stories(dense, 12, seed=0, batch=12, max_len=160)  # seeded
    text = sample.read_text(encoding="utf-8")
    stories, dropped = sc.clean_stories(raw, tok, text)
    assert len(stories) + sum(dropped.values()) == len(raw)
    # a story that quotes the evaluation sample, and a repeat, are dropped
    sentence = "The shiny stone made everyone happy, and they forgot about the fish for dinner."
    assert sentence in sc.sample_sentences(text)
    leak = tok.encode("Once upon a time there was a cat. " + sentence + " The end.")
    kept, dropped = sc.clean_stories([leak, stories[0], stories[0]], tok, text)
    assert kept == [stories[0]] and dropped == {"short": 0, "duplicate": 1, "contains_sample_sentence": 1}
    # packed rows are the stories' tokens in some order, BOS included
    rows = sc.packed_batches(stories, 32, 2)
    assert all(b["input_ids"].shape == (2, 32) for b in rows)
    assert (torch.cat([b["input_ids"] for b in rows]) == 1).sum() >= 1
    # per-story batches: padding is masked, each story starts at BOS
    batches = sc.story_batches(stories, 4)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == sum(map(len, stories))
    assert all((b["input_ids"][:, 0] == 1).all() for b in batches)
    # the validation metric on token stories is tinystories_perplexity's (batched, padded, masked)
    from bondgate.llama2c import split_stories

    ids = [tok.encode(s) for s in split_stories(text)]
    assert sc.story_perplexity(dense, ids, batch=2) == pytest.approx(DENSE_PPL, abs=0.01)


def test_compress_and_heal(setup, tmp_path):
    import bondgate as bg
    from bondgate.llama2c import tinystories_perplexity

    sc, dense, tok, sample, raw = setup
    stories, _ = sc.clean_stories(raw, tok, sample.read_text(encoding="utf-8"))
    dense_ppl = tinystories_perplexity(dense, tok, sample).perplexity
    assert abs(dense_ppl - DENSE_PPL) < 0.01

    student = sc.compress(dense, sc.story_batches(stories[:6], 6), ratio=0.5, num_cores=2, refine_steps=10)
    assert sc.block_weights(dense) == 226_560
    assert 0.49 < sc.block_weights(student) / 226_560 <= 0.5
    assert student.bondgate_report.params_after == sc.block_weights(student)
    assert dense.model.embed_tokens.weight.data_ptr() != student.model.embed_tokens.weight.data_ptr()
    before = tinystories_perplexity(student, tok, sample).perplexity
    # measured 422 (with 64 calibration stories: ~400; uniform guessing over the 512 tokens: 512): at half its
    # block weights, before healing, this small model has lost most of what it knew, but it is not broken
    assert 20 * dense_ppl < before < 2000

    train = sc.packed_batches(stories, 64, 4)
    loss = bg.DistillLoss(hidden=1.0, logits=1.0, temperature=1.0)

    def mean_loss():
        with torch.no_grad():
            return sum(float(loss(student(**b, output_hidden_states=True), dense(**b, output_hidden_states=True),
                                  b)[0]) for b in train) / len(train)

    loss_before = mean_loss()
    res = bg.distill(student, dense, train, loss=loss, steps=20, lr=3e-3, progress=False, log_every=5)
    loss_after = mean_loss()
    assert res.steps == 20
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)  # measured 5.0 -> 1.8
    after = tinystories_perplexity(student, tok, sample).perplexity
    assert after < before / 3, (before, after)  # measured 422 -> 44

    bg.save(student, tmp_path / "s")
    again = bg.load(tmp_path / "s")
    assert tinystories_perplexity(again, tok, sample).perplexity == pytest.approx(after, rel=1e-5)
    # --resume: the saved student, trainable again, as the script heals it further
    resumed = sc.resumed(str(tmp_path / "s"))
    assert sc.cores_of(resumed) == 2 and sc.block_weights(resumed) == sc.block_weights(student)
    assert all(p.requires_grad for p in resumed.parameters())
    assert tinystories_perplexity(resumed, tok, sample).perplexity == pytest.approx(after, rel=1e-5)


def test_uniform_allocation(setup):
    """``--allocation uniform``: every block layer factored with one bond cap, none kept dense."""
    import bondgate as bg

    sc, dense, tok, sample, raw = setup
    stories, _ = sc.clean_stories(raw, tok, sample.read_text(encoding="utf-8"))
    student = sc.compress(dense, sc.story_batches(stories[:6], 6), ratio=0.5, num_cores=2, refine_steps=0,
                          allocation="uniform")
    layers = [m for n, m in student.named_modules() if n.startswith("model.layers.") and isinstance(m, bg.MPOLinear)]
    assert len(layers) == 35 and not any(isinstance(m, torch.nn.Linear) for m in student.model.layers.modules())
    # one cap for all: a layer's bond is the cap or, where its reshaped matrix has fewer rows/columns, its full rank
    cap = max(m.bond_dims[0] for m in layers)
    assert all(m.bond_dims[0] == min(cap, *m.to_mpo().max_bond_dims()) for m in layers)
    assert 0.45 < sc.block_weights(student) / 226_560 <= 0.5


@pytest.mark.slow
def test_script_end_to_end(sc, tmp_path):
    """The script's whole pipeline on a tiny budget: generate, clean, compress, heal, save, reload on the CPU."""
    threads = torch.get_num_threads()
    try:
        out = sc.main(["--samples", "48", "--gen-batch", "48", "--max-len", "96", "--calib-stories", "8",
                       "--valid-stories", "8", "--num-cores", "2", "--minutes", "0.1", "--refine-steps", "5",
                       "--batch", "4", "--eval-every", "5", "--model-dir", str(MODEL_DIR), "--tag", "",
                       "--out", str(tmp_path / "s")])
    finally:
        torch.set_num_threads(threads)
    assert out["args"]["device"] == "cpu" and out["args"]["clock"] == "cpu"  # the CPU clock is the CPU default
    assert out["data"]["train_stories"] == out["data"]["kept"] - 8
    (row,) = out["rows"]
    assert 0.49 < row["ratio"] <= 0.5 and row["steps"] > 0
    assert row["ppl_after"] < row["ppl_before"] / 2, row  # measured 793 -> 60 after 6 steps (3 s)
    assert out["saved"]["ppl_reloaded"] == pytest.approx(row["ppl_after"], rel=1e-4)
    assert (tmp_path / "s" / "model.safetensors").is_file()


TINY = ["--samples", "48", "--max-len", "96", "--calib-stories", "8", "--valid-stories", "8", "--tag", ""]


def _benchmark(name: str, tmp_path, steps: int, *extra: str) -> dict:
    """``benchmarks/NAME.py`` run on :data:`TINY` stories for ``steps``; torch's thread count restored."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        return module.main(TINY + ["--stories-cache", str(tmp_path / "st.json"), "--steps", str(steps), *extra])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_anneal_ablation(sc, tmp_path):
    """benchmarks/stories_anneal.py on a tiny budget: annealed, factored at the one-shot bonds, healed."""
    out = _benchmark("stories_anneal", tmp_path, 8)
    assert out["block_weights"] == out["one_shot_block_weights"] and 0.49 < out["block_weights"] / 226_560 <= 0.5
    # the step that starts at half the budget (step 4 of 0..7) is the last pull toward the truncation; then factored
    assert out["factored"]["step"] == 5 and out["steps"] == 8
    assert out["sample_ppl"] < out["one_shot_ppl"] / 2, out  # measured 154 vs the one-shot start's 519


@pytest.mark.slow
def test_prune_heal_baseline(sc, tmp_path):
    """benchmarks/stories_prune_heal.py on a tiny budget: the pruning mask holds through healing."""
    out = _benchmark("stories_prune_heal", tmp_path, 6)
    assert out["nonzero_block_weights"] <= 226_560 // 2 and out["steps"] > 0
    assert out["sample_ppl"] < out["ppl_before"], out  # measured 43.5 -> 12.2 after 6 steps


@pytest.mark.slow
def test_factors_plus_sparse_baseline(sc, tmp_path):
    """``--mpo-share``: each layer an MPO within the share plus a pruned residual; the total stays in budget."""
    out = _benchmark("stories_prune_heal", tmp_path, 6, "--mpo-share", "0.25")
    assert 0.49 < out["nonzero_block_weights"] / 226_560 <= 0.5 and out["steps"] == 6
    assert out["sample_ppl"] < out["ppl_before"] / 2, out  # measured 176 -> 35.8 after 6 steps


@pytest.mark.parametrize("flags", [["--ratio", "1.5"], ["--batch", "0"], ["--minutes", "-1"], ["--num-cores", "0"],
                                   ["--valid-stories", "0"], ["--lr", "nan"], ["--model-dir", "/nonexistent"]])
def test_script_refuses_bad_flags_before_loading(sc, flags, capsys):
    """A bad flag is a one-line usage error (exit 2) before the model is loaded or a story generated."""
    with pytest.raises(SystemExit) as exc:
        sc.main(flags)
    assert exc.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_too_few_rows_for_a_batch_is_an_error(sc):
    stories = [[1, *range(3, 40)]] * 4  # 152 tokens: one row of 128
    assert len(sc.packed_batches(stories, 64, 2)) == 1
    with pytest.raises(SystemExit, match="not one batch of 2"):
        sc.packed_batches(stories, 128, 2)
