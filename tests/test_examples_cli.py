"""The example scripts (and the kernel benchmark) end a run that cannot start -- a missing data file, model folder or
checkpoint, an output folder that cannot be made -- with one ``PROG: error: ...`` line instead of a traceback, before
they load a model or train. Each runs as a subprocess, the way a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# ~40 s of interpreter starts: run with the slow tests (CI runs them), keeping the default suite short
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent-bondgate-test"


def _run(script: str, *argv: str, data: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if data is not None:
        env["BONDGATE_DATA"] = data
    return subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def _assert_error(proc: subprocess.CompletedProcess, prog: str, *texts: str) -> None:
    err = proc.stderr
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}") and ": error: " in last, err
    for text in texts:
        assert text in last, err


def test_bank_mlp_missing_data_file():
    proc = _run("examples/bank_mlp.py", "--data", f"{MISSING}/bank.csv", "--no-download")
    _assert_error(proc, "bank_mlp.py", "the given path has no such file", f"{MISSING}/bank.csv")


def test_bank_mlp_missing_data_root():
    proc = _run("examples/bank_mlp.py", "--no-download", data=MISSING)
    _assert_error(proc, "bank_mlp.py", "bank-additional-full.csv not found", "BONDGATE_DATA")


def test_minilm_eval_missing_data():
    _assert_error(_run("examples/minilm_stsb.py", "eval", data=MISSING), "minilm_stsb.py", "stsb/sts-dev.tsv not found")


def test_minilm_eval_missing_checkpoint():
    proc = _run("examples/minilm_stsb.py", "eval", "--checkpoint", MISSING)
    assert proc.returncode == 2
    _assert_error(proc, "minilm_stsb.py eval", f"argument --checkpoint: no checkpoint directory '{MISSING}'")


@pytest.mark.parametrize("script,data_file", [("examples/gpt2_wikitext.py", "wikitext-2/wiki.train.tokens"),
                                              ("examples/ptb_lstm.py", "ptb/ptb.train.txt")])
def test_train_missing_data(script, data_file, tmp_path):
    argv = ["train", "--out", str(tmp_path / "model")]
    _assert_error(_run(script, *argv, data=MISSING), Path(script).name, f"{data_file} not found")
    assert not (tmp_path / "model").exists()


def test_gpt2_compress_missing_model_says_how_to_make_it(tmp_path):
    proc = _run("examples/gpt2_compress.py", "--model", str(tmp_path / "gpt2-wt2"), "compare")
    assert proc.returncode == 2
    _assert_error(proc, "gpt2_compress.py", "argument --model", "python examples/gpt2_wikitext.py train")


def test_gpt2_wikitext_eval_missing_model(tmp_path):
    proc = _run("examples/gpt2_wikitext.py", "eval", "--model", str(tmp_path / "none"))
    _assert_error(proc, "gpt2_wikitext.py eval", "argument --model: no checkpoint directory")


def test_ptb_lstm_default_dense_is_under_the_repo(tmp_path):
    """Run from another folder, ``compress`` looks for its default model under the repository's runs/."""
    default = ROOT / "runs" / "ptb-lstm"
    if default.exists():
        pytest.skip(f"{default} exists: compress would start")
    proc = _run("examples/ptb_lstm.py", "compress", cwd=tmp_path)
    assert proc.returncode == 2
    _assert_error(proc, "ptb_lstm.py compress", f"argument --dense: no checkpoint directory '{default}'",
                  "examples/ptb_lstm.py train")


def test_ptb_lstm_speed_missing_compressed(tmp_path):
    proc = _run("examples/ptb_lstm.py", "speed", "--dense", str(tmp_path), "--compressed", MISSING)
    assert proc.returncode == 2
    _assert_error(proc, "ptb_lstm.py speed", f"argument --compressed: no checkpoint directory '{MISSING}'")


def test_kernel_out_that_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("")
    proc = _run("benchmarks/kernel.py", "--quick", "--out", str(tmp_path / "file" / "results"))
    assert proc.returncode == 2
    _assert_error(proc, "kernel.py", "argument --out: cannot make the directory")


@pytest.mark.parametrize("script,argv", [("examples/minilm_stsb.py", ["compare"]),
                                         ("examples/minilm_stsb.py", ["heal"]),
                                         ("examples/gpt2_compress.py", ["--model", MISSING, "heal"]),
                                         ("examples/stories_compress.py", []),
                                         ("examples/ptb_lstm.py", ["control", "--steps", "1"])])
def test_results_folder_that_cannot_be_made(script, argv, tmp_path):
    """``--results DIR`` (the result files' folder; they all went to benchmarks/results, over the published figures)
    is checked before a model is loaded."""
    (tmp_path / "file").write_text("")
    data = tmp_path / "data"
    (data / "ptb").mkdir(parents=True)
    for split in ("train", "valid"):
        (data / "ptb" / f"ptb.{split}.txt").write_text(" a b c <unk>\n")
    proc = _run(script, *argv, "--results", str(tmp_path / "file" / "results"), data=str(data))
    assert proc.returncode == 2, proc.stderr
    _assert_error(proc, Path(script).name, "argument --results: cannot make the directory")
