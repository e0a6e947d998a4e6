"""Shared helpers for the benchmark scripts: machine/version banner, interleaved timing, where results go and
how they were made."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

#: where the scripts write their results by default (``--out DIR`` redirects them, e.g. for a smoke run)
RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """What the numbers were measured on."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),  # PASSIVE slows small ops
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for mod in ("bondgate", "opt_einsum", "tensorly", "tltorch", "transformers", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def banner(info: dict) -> str:
    return " | ".join(f"{k}={v}" for k, v in info.items())


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 5, min_time: float = 0.05,
                     min_reps: int = 3, sync: Callable[[], None] | None = None,
                     samples_out: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Median seconds per call for each function, measured in interleaved rounds.

    Every round times every function once (``reps`` calls, enough to last ``min_time``; every other round in
    reverse order), so slow drifts of a shared machine hit all variants alike; the result is the median over rounds. ``samples_out``
    (a dict) receives each function's per-round times, in round order (for paired ratios).
    """
    sync = sync or (lambda: None)
    reps: dict[str, int] = {}
    for name, fn in fns.items():  # warm up and size the repetition count
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        one = time.perf_counter() - t0
        reps[name] = max(min_reps, int(min_time / max(one, 1e-7)))
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(rounds):
        for name, fn in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):  # no variant always first
            n = reps[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / n)
    if samples_out is not None:
        samples_out.update(samples)
    return {n: statistics.median(s) for n, s in samples.items()}


def forward_fn(model: torch.nn.Module, inputs: dict) -> Callable[[], object]:
    """A timeable call: ``model(**inputs)`` under ``torch.inference_mode``."""
    @torch.inference_mode()
    def run():
        return model(**inputs)
    return run


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str))


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def add_out_arg(parser: argparse.ArgumentParser, flag: str = "--out") -> None:
    """``--out DIR`` (``dest`` from the flag): the directory the results are written to, default
    benchmarks/results (created if missing)."""
    parser.add_argument(flag, type=Path, default=RESULTS, metavar="DIR",
                        help="directory the result files are written to (created if missing; default: "
                        "benchmarks/results, the published results)")


def check_out_dir(parser: argparse.ArgumentParser, path, flag: str = "--out") -> None:
    """A usage error (exit 2) unless ``path`` is a writable directory, made here if missing: checked before the run
    rather than found out when its results are written."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"argument {flag}: cannot make the directory {str(path)!r}: {exc.strerror or exc}")
    if not os.access(path, os.W_OK):
        parser.error(f"argument {flag}: the directory {str(path)!r} is not writable")


def command_line(script: str, argv=None) -> str:
    """The command as run, ``python benchmarks/SCRIPT ARGS``: ``argv`` as given to ``main`` (None: ``sys.argv[1:]``),
    quoted for a shell."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"benchmarks/{Path(script).name}", *([shlex.join(args)] if args else [])])


def args_dict(args: argparse.Namespace | dict) -> dict:
    """``vars(args)`` for a results file: paths as strings."""
    return {k: str(v) if isinstance(v, os.PathLike) else v for k, v in (args if isinstance(args, dict) else
                                                                      vars(args)).items()}


def check_checkpoint(parser: argparse.ArgumentParser, path, flag: str = "--checkpoint", hint: str = "") -> None:
    """A usage error (exit 2) unless ``path`` is an existing checkpoint directory."""
    p = Path(path)
    if not p.is_dir():
        parser.error(f"argument {flag}: no checkpoint directory {str(p)!r}"
                     + (f" (cwd {os.getcwd()})" if not p.is_absolute() else "") + (f"; {hint}" if hint else ""))


def check_dense_model(parser: argparse.ArgumentParser, path, flag: str = "--model", hint: str = "") -> None:
    """:func:`check_checkpoint`, and a usage error (exit 2) where ``path`` is a bondgate checkpoint (it has a
    ``bondgate.json``) rather than the dense model the script loads with transformers -- as ``bondgate compress``
    refuses one: transformers' dense loader does not read bondgate's compressed layers."""
    check_checkpoint(parser, path, flag, hint)
    if (Path(path) / "bondgate.json").is_file():
        parser.error(f"argument {flag}: {str(path)!r} is a bondgate checkpoint, not a dense model; give the original "
                     "model")


def check_new_out(parser: argparse.ArgumentParser, path, flag: str = "--out") -> None:
    """A usage error (exit 2) where ``path`` exists and is not an empty directory: a file, a bondgate checkpoint (its
    ``bondgate.json`` would be left beside the new weights) or any other non-empty directory -- checked before the
    run, as ``bondgate compress`` refuses a non-empty ``--out``."""
    p = Path(path)
    if not p.exists():
        return
    if not p.is_dir():
        parser.error(f"argument {flag}: {str(p)!r} exists and is not a directory")
    if (p / "bondgate.json").is_file():
        parser.error(f"argument {flag}: {str(p)!r} holds a bondgate checkpoint; choose a new or empty directory")
    if any(p.iterdir()):
        parser.error(f"argument {flag}: {str(p)!r} is a non-empty directory; refusing to write into it "
                     "(choose a new or empty directory)")
