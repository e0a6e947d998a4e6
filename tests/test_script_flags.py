"""The scripts in examples/ and benchmarks/ refuse a bad numeric flag with a one-line usage error (exit code 2) before
they load a model, generate data or train; their defaults pass their own checks, and the documented 0 ("none/off")
values still parse.

Scripts with ``main(argv=None)`` run in-process; the others (``main()`` reads ``sys.argv``) as subprocesses. In-process,
a command line that parses stops right after ``parse_args``: a flag the script wrongly accepts fails the test at once
instead of starting the run."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: every script with numeric flags; those whose main() takes no argv run as subprocesses
SCRIPTS = ["examples/gpt2_compress.py", "examples/gpt2_wikitext.py", "examples/minilm_stsb.py", "examples/bank_mlp.py",
           "examples/ptb_lstm.py", "benchmarks/decision_sampling.py", "benchmarks/form_limits.py",
           "benchmarks/frontier.py", "benchmarks/gating.py", "benchmarks/gating_fidelity.py", "benchmarks/kernel.py",
           "benchmarks/llama_decode.py", "benchmarks/minilm_speed.py", "benchmarks/stories_anneal.py",
           "benchmarks/stories_prune_heal.py", "examples/stories_compress.py", "benchmarks/minilm_int8_spread.py",
           "benchmarks/compress_cost.py", "benchmarks/call_overhead.py", "benchmarks/gated_call.py"]
NO_ARGV = {"benchmarks/decision_sampling.py", "benchmarks/kernel.py", "benchmarks/llama_decode.py"}

#: (script, argv, the flag the error must name)
BAD = [
    ("examples/gpt2_compress.py", ["--threads", "0", "compare"], "--threads"),
    ("examples/gpt2_compress.py", ["compare", "--ratios", "0.5", "0"], "--ratios"),
    ("examples/gpt2_compress.py", ["heal", "--ratio", "1.5"], "--ratio"),
    ("examples/gpt2_compress.py", ["heal", "--lr", "nan"], "--lr"),
    ("examples/gpt2_compress.py", ["heal", "--patience", "0"], "--patience"),
    ("examples/gpt2_wikitext.py", ["train", "--out", "x", "--minutes", "0"], "--minutes"),
    ("examples/gpt2_wikitext.py", ["train", "--out", "x", "--dropout", "1.5"], "--dropout"),
    ("examples/gpt2_wikitext.py", ["bench", "--block-size", "1"], "--block-size"),
    ("examples/gpt2_wikitext.py", ["eval", "--model", "x", "--eval-batch-size", "0"], "--eval-batch-size"),
    ("examples/minilm_stsb.py", ["--threads", "-1", "eval"], "--threads"),
    ("examples/minilm_stsb.py", ["compare", "--ratios", "2"], "--ratios"),
    ("examples/minilm_stsb.py", ["heal", "--ratio", "0"], "--ratio"),
    ("examples/minilm_stsb.py", ["heal", "--probe-pairs", "1"], "--probe-pairs"),
    ("examples/minilm_stsb.py", ["heal", "--embedding-ratio", "inf"], "--embedding-ratio"),
    ("examples/bank_mlp.py", ["--threads", "0"], "--threads"),
    ("examples/bank_mlp.py", ["--whole", "1.5"], "--whole"),
    ("examples/bank_mlp.py", ["--max-train-rows", "0"], "--max-train-rows"),
    ("examples/bank_mlp.py", ["--seeds", "0", "-1"], "--seeds"),
    ("examples/bank_mlp.py", ["--epochs", "ten"], "--epochs"),
    ("examples/ptb_lstm.py", ["train", "--minutes", "0"], "--minutes"),
    ("examples/ptb_lstm.py", ["train", "--threads", "0"], "--threads"),
    ("examples/ptb_lstm.py", ["compress", "--minutes", "-1"], "--minutes"),
    ("examples/ptb_lstm.py", ["compress", "--ratio", "1.5"], "--ratio"),
    ("examples/ptb_lstm.py", ["control", "--steps", "0"], "--steps"),
    ("examples/ptb_lstm.py", ["speed", "--rounds", "0"], "--rounds"),
    ("benchmarks/decision_sampling.py", ["--budget", "1.5"], "--budget"),
    ("benchmarks/form_limits.py", ["--shares", "0.5", "0"], "--shares"),
    ("benchmarks/form_limits.py", ["--perms", "-1"], "--perms"),
    ("benchmarks/frontier.py", ["--ratios", "1.5"], "--ratios"),
    ("benchmarks/compress_cost.py", ["--layers", "0"], "--layers"),
    ("benchmarks/minilm_int8_spread.py", ["--rounds", "0"], "--rounds"),
    ("benchmarks/frontier.py", ["--rounds", "0"], "--rounds"),
    ("benchmarks/gating.py", ["--threads", "0", "speed"], "--threads"),
    ("benchmarks/gating.py", ["minilm", "--track", "11"], "--track"),
    ("benchmarks/gating.py", ["gpt2", "--lr", "0"], "--lr"),
    ("benchmarks/gating.py", ["speed", "--budget", "0"], "--budget"),
    ("benchmarks/gating.py", ["speed", "--rows", "1", "0"], "--rows"),
    ("benchmarks/gating_fidelity.py", ["--checkpoint", "x", "--calib-sentences", "0"], "--calib-sentences"),
    ("benchmarks/kernel.py", ["--rounds", "0"], "--rounds"),
    ("benchmarks/call_overhead.py", ["--threads", "0"], "--threads"),
    ("benchmarks/gated_call.py", ["--dim", "8"], "--dim"),
    ("benchmarks/gated_call.py", ["--rounds", "0"], "--rounds"),
    ("benchmarks/llama_decode.py", ["--budget", "0.5", "1.5"], "--budget"),
    ("benchmarks/minilm_speed.py", ["--batches", "1", "0"], "--batches"),
    ("benchmarks/minilm_speed.py", ["--ratio", "-0.5"], "--ratio"),
    ("benchmarks/stories_anneal.py", ["--anneal", "1"], "--anneal"),
    ("benchmarks/stories_anneal.py", ["--steps", "0"], "--steps"),
    ("benchmarks/stories_prune_heal.py", ["--mpo-share", "1.5"], "--mpo-share"),
    ("benchmarks/stories_prune_heal.py", ["--minutes", "0"], "--minutes"),
    ("examples/stories_compress.py", ["--num-cores", "1"], "--num-cores"),  # 1 core is the dense weight: as the CLI
    ("examples/stories_compress.py", ["--num-cores", "2", "18"], "--num-cores"),
]

#: documented "0 = none/off/all" values (and other boundaries) that must still parse: (script, argv, {dest: value})
GOOD = [
    ("examples/gpt2_compress.py", ["compare", "--valid-blocks", "0", "--ratios", "1"], {"valid_blocks": 0, "ratios": [1.0]}),
    ("examples/gpt2_wikitext.py", ["train", "--out", "x", "--warmup", "0", "--dropout", "0"], {"warmup": 0, "dropout": 0.0}),
    ("examples/minilm_stsb.py", ["heal", "--embedding-rows", "0"], {"embedding_rows": 0}),
    ("examples/bank_mlp.py", ["--max-bond", "0", "--seeds", "0", "1"], {"max_bond": 0, "seeds": [0, 1]}),
    ("examples/ptb_lstm.py", ["compress", "--minutes", "0", "--steps", "3"], {"minutes": 0.0, "steps": 3}),
    ("benchmarks/form_limits.py", ["--perms", "0", "--shares", "1"], {"perms": 0, "shares": [1.0]}),
    ("benchmarks/gating.py", ["minilm", "--nested-minutes", "0", "--dev-pairs", "0", "--levels", "0", "--track", "0"],
     {"nested_minutes": 0.0, "dev_pairs": 0, "levels": 0, "track": 0.0}),
    ("benchmarks/stories_prune_heal.py", ["--mpo-share", "0"], {"mpo_share": 0.0}),
    ("examples/stories_compress.py", ["--num-cores", "2", "17"], {"num_cores": [2, 17]}),
]


class _Parsed(Exception):
    """Raised right after the top-level ``parse_args``, so that an accepted command line starts nothing."""

    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace | None) -> None:
        super().__init__("the command line parsed: the script accepted it")
        self.parser, self.namespace = parser, namespace


@pytest.fixture(scope="module")
def scripts():
    """``load(script)``: the script imported as a module (once); sys.path and the environment, which the scripts
    extend on import, are restored after this file's tests."""
    path, environ, loaded = list(sys.path), dict(os.environ), {}

    def load(script: str):
        if script not in loaded:
            file = ROOT / script
            spec = importlib.util.spec_from_file_location(f"_flags_{file.stem}", file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up while it executes
            try:
                spec.loader.exec_module(module)
            except ImportError as exc:
                del sys.modules[spec.name]
                pytest.skip(f"{script} needs {exc.name or exc}")
            loaded[script] = module
        return loaded[script]

    yield load
    sys.path[:] = path
    os.environ.clear()
    os.environ.update(environ)


def _run_main(module, script: str, argv: list[str], monkeypatch, parse: bool = True):
    """``module.main`` on ``argv`` (via sys.argv where main takes none), stopped by :class:`_Parsed` once the command
    line is parsed (``parse=False``: before it is parsed)."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(self, original(self, args, namespace) if parse else None)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if script in NO_ARGV:
        monkeypatch.setattr(sys, "argv", [str(ROOT / script), *argv])
        return module.main()
    return module.main(argv)


@pytest.mark.parametrize("script,argv,flag", [pytest.param(*case, id=f"{Path(case[0]).stem}:{' '.join(case[1])}")
                                              for case in BAD])
def test_bad_flag_is_a_usage_error(script, argv, flag, scripts, monkeypatch, capsys):
    if script in NO_ARGV:  # main() reads sys.argv: the real command line, in a subprocess
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, env=env,
                              timeout=60, cwd=ROOT)
        code, err = proc.returncode, proc.stderr
    else:
        module = scripts(script)
        with pytest.raises(SystemExit) as exc:
            _run_main(module, script, argv, monkeypatch)
        code, err = exc.value.code, capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines and f"error: argument {flag}: " in lines[-1], err  # argparse's one error line names the flag
    assert "Traceback" not in err


def _number_actions(parser: argparse.ArgumentParser):
    """``(parser, action)`` of every flag typed by ``bondgate.cli.number_arg``, subcommands' included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _number_actions(sub)
        elif getattr(action.type, "__qualname__", "").startswith("number_arg."):
            yield parser, action


@pytest.mark.parametrize("script", SCRIPTS, ids=[Path(s).stem for s in SCRIPTS])
def test_defaults_pass_their_checks(script, scripts, monkeypatch):
    """Every numeric flag is checked (no bare ``type=int`` / ``type=float`` left), and its default passes the check."""
    with pytest.raises(_Parsed) as exc:
        _run_main(scripts(script), script, [], monkeypatch, parse=False)
    parser = exc.value.parser
    checked = list(_number_actions(parser))
    assert checked, f"{script}: no flag uses number_arg"
    stack = [parser]
    while stack:  # no numeric flag left unchecked
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack += action.choices.values()
            assert action.type not in (int, float), f"{script}: {action.option_strings} has a bare type"
    for p, action in checked:
        defaults = action.default if isinstance(action.default, list) else [action.default]
        for value in defaults:
            if value is not None:
                assert action.type(str(value)) == value, (p.prog, action.option_strings, value)


@pytest.mark.parametrize("script,argv,expected", [pytest.param(*case, id=f"{Path(case[0]).stem}:{' '.join(case[1])}")
                                                  for case in GOOD])
def test_documented_boundaries_still_parse(script, argv, expected, scripts, monkeypatch):
    with pytest.raises(_Parsed) as exc:
        _run_main(scripts(script), script, argv, monkeypatch)
    namespace = vars(exc.value.namespace)
    assert {k: namespace[k] for k in expected} == expected


def _not_called(*args, **kwargs):
    raise AssertionError("the script went on past its argument checks")


def _usage_error(module, argv: list[str], monkeypatch, capsys) -> str:
    """``module.main(argv)`` must end in a usage error (exit 2, one ``error: ...`` line, no traceback) and the
    line."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture
def bondgate_checkpoint(tmp_path):
    """A folder that reads as a bondgate checkpoint (what the scripts look at: its bondgate.json)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("bondgate.json", "config.json"):
        (folder / name).write_text("{}")
    return folder


@pytest.mark.parametrize("cmd", ["compare", "heal"])
def test_gpt2_compress_refuses_a_bondgate_checkpoint_as_the_dense_model(cmd, bondgate_checkpoint, scripts,
                                                                         monkeypatch, capsys):
    module = scripts("examples/gpt2_compress.py")
    monkeypatch.setattr(module.lm, "load_model", _not_called)
    line = _usage_error(module, ["--model", str(bondgate_checkpoint), cmd], monkeypatch, capsys)
    assert "argument --model: " in line and "is a bondgate checkpoint, not a dense model" in line, line


def test_gpt2_wikitext_eval_refuses_a_bondgate_checkpoint(bondgate_checkpoint, scripts, monkeypatch, capsys):
    module = scripts("examples/gpt2_wikitext.py")
    monkeypatch.setattr(module, "load_model", _not_called)
    line = _usage_error(module, ["eval", "--model", str(bondgate_checkpoint)], monkeypatch, capsys)
    assert "argument --model: " in line and "is a bondgate checkpoint, not a dense model" in line, line


@pytest.mark.parametrize("kind,message", [("checkpoint", "holds a bondgate checkpoint"),
                                          ("non-empty", "is a non-empty directory"),
                                          ("file", "exists and is not a directory")])
def test_gpt2_wikitext_train_refuses_an_out_in_use(kind, message, bondgate_checkpoint, tmp_path, scripts,
                                                   monkeypatch, capsys):
    """Before training: an old bondgate.json beside the new weights would make the folder a broken checkpoint."""
    out = {"checkpoint": bondgate_checkpoint, "non-empty": tmp_path / "full", "file": tmp_path / "file"}[kind]
    if kind == "non-empty":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    elif kind == "file":
        out.write_text("")
    module = scripts("examples/gpt2_wikitext.py")
    monkeypatch.setattr(module, "cmd_train", _not_called)
    line = _usage_error(module, ["train", "--out", str(out)], monkeypatch, capsys)
    assert "argument --out: " in line and message in line, line


@pytest.mark.parametrize("kind", ["new", "empty"])
def test_gpt2_wikitext_train_takes_a_new_or_empty_out(kind, tmp_path, scripts, monkeypatch):
    out = tmp_path / "model"
    if kind == "empty":
        out.mkdir()
    module = scripts("examples/gpt2_wikitext.py")
    started = []
    monkeypatch.setattr(module, "cmd_train", lambda args: started.append(args.out))
    module.main(["train", "--out", str(out)])
    assert started == [out]
