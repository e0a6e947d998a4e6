"""The tensor-network workshop (UTokyo, July 2024) on UCI bank marketing, runnable end to end.

1. Baseline MLP 62-256-256-1, Adam lr 1e-4, batch 128, early stopping on the validation loss.
2. ``--mpo-middle``: replace the trained 256x256 middle layer by ``MPOLinear.from_linear`` with 4 cores
   and bonds capped at ``--max-bond`` (chi=32: 65,536 weights -> 16,896), evaluate, then fine-tune the
   whole model (Adam lr 1e-5, same early stopping) and evaluate again.

Examples::

    python examples/bank_mlp.py --seeds 0 1 2 --out baseline.json
    python examples/bank_mlp.py --seeds 0 1 2 --mpo-middle --max-bond 32 --out mpo32.json

The functions (``build_mlp``, ``train``, ``evaluate``, ``mpo_middle``) are imported by the tests,
tutorials and benchmarks: ``sys.path.insert(0, "<repo>/examples"); import bank_mlp``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import os
import platform
import statistics
import time
from dataclasses import replace

import torch
from torch import nn

from bondgate import LowRankLinear, MPOLinear, PlanPolicy
from bondgate.cli import number_arg
from bondgate.data import BankMarketing, load_bank_marketing

MIDDLE = 2  # index of the 256x256 Linear in build_mlp()'s Sequential
MPO_POLICY: str | PlanPolicy = "memory"  # bondgate's default; tests use PlanPolicy(select="flops")


def build_mlp(in_features: int = 62, hidden: int = 256, seed: int | None = None) -> nn.Sequential:
    """Linear(62,256)-ReLU-Linear(256,256)-ReLU-Linear(256,1) producing logits of shape ``(n, 1)``.

    The workshop's final Sigmoid is left out: training uses ``BCEWithLogitsLoss`` (same loss, stabler)
    and ``evaluate`` applies the sigmoid itself.
    """
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 1),
    )


def train(
    model: nn.Module,
    data: BankMarketing,
    lr: float = 1e-4,
    epochs: int = 1000,
    patience: int = 20,
    seed: int = 0,
    batch_size: int = 128,
    verbose: bool = False,
) -> dict:
    """Adam + BCE-with-logits with early stopping on the validation loss; trains ``model`` in place.

    Stops after ``patience`` epochs without a strictly lower validation loss (or after ``epochs``) and
    restores the weights of the best epoch. ``seed`` fixes the minibatch order.

    Returns: ``{"train_loss": [...], "valid_loss": [...], "best_epoch": int (1-based),
    "best_valid_loss": float, "epochs_run": int, "seconds": float}``.
    """
    t0 = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(seed)
    X, y = data.X_train, data.y_train
    n = X.shape[0]
    best_loss, best_epoch, best_state = math.inf, 0, copy.deepcopy(model.state_dict())
    hist: dict = {"train_loss": [], "valid_loss": []}
    for epoch in range(1, epochs + 1):
        model.train()
        total = 0.0
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(X[idx]).squeeze(-1), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        valid = _loss(model, data.X_valid, data.y_valid)
        hist["train_loss"].append(total / n)
        hist["valid_loss"].append(valid)
        if valid < best_loss:
            best_loss, best_epoch, best_state = valid, epoch, copy.deepcopy(model.state_dict())
        if verbose:
            print(f"  epoch {epoch:4d}  train {total / n:.5f}  valid {valid:.5f}"
                  f"{'  *' if best_epoch == epoch else ''}", flush=True)
        if epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    hist.update(best_epoch=best_epoch, best_valid_loss=best_loss, epochs_run=len(hist["valid_loss"]),
                seconds=time.perf_counter() - t0)
    return hist


EVAL_CHUNK = 1024


@torch.no_grad()
def predict(model: nn.Module, X: torch.Tensor, chunk: int = EVAL_CHUNK) -> torch.Tensor:
    """Logits ``(n,)`` of ``X`` ``(n, 62)`` in eval mode.

    Runs in chunks of ``chunk`` rows: an ``MPOLinear`` autotunes its contraction once per power-of-two
    row bucket, which takes tens of seconds at 8k rows; fixed chunks keep that to a few small buckets.
    """
    model.eval()
    return torch.cat([model(part).squeeze(-1) for part in X.split(chunk)])


def _loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    return nn.functional.binary_cross_entropy_with_logits(predict(model, X), y).item()


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict:
    """Test metrics of a logit model on ``X`` ``(n, 62)``, ``y`` ``(n,)`` in {0, 1}; threshold p = 0.5.

    Returns ``{"accuracy", "recall", "precision", "roc_auc", "loss"}`` (loss = mean BCE) as floats.
    """
    from sklearn.metrics import accuracy_score, precision_score, recall_score, roc_auc_score

    logits = predict(model, X)
    prob = torch.sigmoid(logits).numpy()
    pred = (prob >= 0.5).astype("float32")
    truth = y.numpy()
    return {
        "accuracy": float(accuracy_score(truth, pred)),
        "recall": float(recall_score(truth, pred, zero_division=0)),
        "precision": float(precision_score(truth, pred, zero_division=0)),
        "roc_auc": float(roc_auc_score(truth, prob)),
        "loss": float(nn.functional.binary_cross_entropy_with_logits(logits, y).item()),
    }


def mpo_middle(model: nn.Sequential, max_bond: int | None = 32, num_cores: int = 4,
               policy: str | PlanPolicy | None = None) -> nn.Sequential:
    """A copy of ``model`` whose middle 256x256 Linear is an ``MPOLinear`` (``max_bond=None``: exact).

    ``policy``: the layer's contraction-plan policy (default :data:`MPO_POLICY`).
    """
    out = copy.deepcopy(model)
    out[MIDDLE] = MPOLinear.from_linear(model[MIDDLE], max_bond=max_bond, num_cores=num_cores,
                                        policy=MPO_POLICY if policy is None else policy)
    return out


def count_params(model: nn.Module) -> int:
    """All trainable parameters (weights and biases)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def linear_weights(model: nn.Module) -> int:
    """Weight values stored by the linear layers (dense, MPO or low-rank), biases excluded."""
    return sum(m.num_params if isinstance(m, (MPOLinear, LowRankLinear)) else m.weight.numel()
               for m in model.modules() if isinstance(m, (nn.Linear, MPOLinear, LowRankLinear)))


def compress_whole_model(model: nn.Module, param_ratio: float, calibration: torch.Tensor,
                         num_cores: int = 3) -> nn.Module:
    """A copy of ``model`` with ALL its linear layers (62-wide input included) targeted by ``bondgate.compress`` at
    ``param_ratio`` of their weights as MPOs (the reference workflow's form; the library's default would also let a
    layer become a low-rank pair), calibrated on ``calibration`` rows. The budget may keep a layer dense (the 256 -> 1
    output layer, whose MPO is no smaller)."""
    import bondgate

    out = copy.deepcopy(model)
    cfg = bondgate.CompressionConfig(param_ratio=param_ratio, num_cores=num_cores, policy=MPO_POLICY, kinds="mpo")
    bondgate.compress(out, cfg, calibration=[calibration], progress=False)
    return out


def machine_info() -> dict:
    """Platform, versions and CPU facts, printed at the start of a run and stored in the JSON."""
    import numpy
    import pandas
    import sklearn

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
        "sklearn": sklearn.__version__,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "bondgate": importlib.metadata.version("bondgate"),
    }


METRICS = ("roc_auc", "accuracy", "recall", "precision")


def _summary(rows: list[dict]) -> dict:
    out = {}
    for k in METRICS:
        vals = [r[k] for r in rows]
        # a sample std needs two seeds: None for one (0.0 read as "no spread")
        out[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None}
    return out


def _print_table(stages: dict[str, list[dict]], params: dict[str, int]) -> None:
    n = len(next(iter(stages.values())))
    print(f"\nTest metrics, mean ± std over {n} seed(s) (sample std):")
    width = max(len(name) for name in stages) + 2
    head = f"{'model':<{width}}{'params':>9}" + "".join(f"{k:>21}" for k in METRICS)
    print(head)
    print("-" * len(head))
    for name, rows in stages.items():
        s = _summary(rows)
        cells = "".join(f"{s[k]['mean']:>12.4f} ± {s[k]['std']:.4f}" if s[k]["std"] is not None
                        else f"{s[k]['mean']:>12.4f} ± {'n/a':<6}" for k in METRICS)
        print(f"{name:<{width}}{params[name]:>9,}{cells}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=number_arg(int, 0, what="seed"), nargs="+", default=[0],
                    help="seeds (init and batch order)")
    ap.add_argument("--epochs", type=number_arg(int, 1, what="epochs"), default=1000,
                    help="max epochs per training (default 1000)")
    ap.add_argument("--patience", type=number_arg(int, 1, what="patience"), default=20,
                    help="early-stopping patience in epochs")
    ap.add_argument("--lr", type=number_arg(float, 0, low_open=True, what="lr"), default=1e-4,
                    help="Adam learning rate for the baseline")
    ap.add_argument("--batch-size", type=number_arg(int, 1, what="batch-size"), default=128)
    ap.add_argument("--mpo-middle", action="store_true",
                    help="also replace the middle layer by an MPO, evaluate, fine-tune, evaluate")
    ap.add_argument("--max-bond", type=number_arg(int, 0, what="max-bond"), default=32,
                    help="bond cap for --mpo-middle (0 = exact)")
    ap.add_argument("--ft-lr", type=number_arg(float, 0, low_open=True, what="ft-lr"), default=1e-5,
                    help="Adam learning rate for fine-tuning")
    ap.add_argument("--whole", type=number_arg(float, 0, 1, low_open=True, what="whole"), default=None, metavar="RATIO",
                    help="also compress ALL linear layers to RATIO of their weights (e.g. 0.1) and fine-tune")
    ap.add_argument("--whole-ft-lr", type=number_arg(float, 0, low_open=True, what="whole-ft-lr"), default=1e-4,
                    help="fine-tuning learning rate for --whole")
    ap.add_argument("--data", default=None, help="bank-additional-full.csv or a data root (else resolver)")
    ap.add_argument("--no-download", action="store_true", help="fail instead of downloading the data")
    ap.add_argument("--max-train-rows", type=number_arg(int, 1, what="max-train-rows"), default=None,
                    help="train on the first N training rows only (quick smoke runs)")
    ap.add_argument("--threads", type=number_arg(int, 1, what="threads"), default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every epoch")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    t_start = time.perf_counter()
    try:
        data = load_bank_marketing(args.data, download=not args.no_download)
    except FileNotFoundError as exc:  # the loader's message says where it looked
        ap.exit(1, f"{ap.prog}: error: {exc}\n")
    if args.max_train_rows:
        data = replace(data, X_train=data.X_train[:args.max_train_rows], y_train=data.y_train[:args.max_train_rows])
    print(f"data: train {len(data.y_train)}, valid {len(data.y_valid)}, test {len(data.y_test)}, "
          f"{data.num_features} features, positive rate {data.y_train.mean().item():.4f}", flush=True)
    max_bond = args.max_bond or None

    mpo_name = f"mpo-middle chi={max_bond or 'exact'}"
    stages: dict[str, list[dict]] = {"baseline": []}
    if args.mpo_middle:
        stages[f"{mpo_name} (before ft)"] = []
        stages[f"{mpo_name} (after ft)"] = []
    whole_name = f"whole model {args.whole:.0%} of linear weights" if args.whole else ""
    if args.whole:
        stages[f"{whole_name} (before ft)"] = []
        stages[f"{whole_name} (after ft)"] = []
    params: dict[str, int] = {}
    runs = []
    for seed in args.seeds:
        model = build_mlp(data.num_features, seed=seed)
        hist = train(model, data, args.lr, args.epochs, args.patience, seed, args.batch_size, args.verbose)
        m = evaluate(model, data.X_test, data.y_test)
        params["baseline"] = count_params(model)
        stages["baseline"].append(m)
        run = {"seed": seed, "baseline": {**m, **_hist_facts(hist)}}
        print(f"seed {seed}: baseline  auc {m['roc_auc']:.4f}  best epoch {hist['best_epoch']}/"
              f"{hist['epochs_run']}  {hist['seconds']:.1f}s", flush=True)
        if args.mpo_middle:
            cmodel = mpo_middle(model, max_bond)
            layer = cmodel[MIDDLE]
            before = evaluate(cmodel, data.X_test, data.y_test)
            ft = train(cmodel, data, args.ft_lr, args.epochs, args.patience, seed, args.batch_size, args.verbose)
            after = evaluate(cmodel, data.X_test, data.y_test)
            for key, val in ((f"{mpo_name} (before ft)", before), (f"{mpo_name} (after ft)", after)):
                stages[key].append(val)
                params[key] = count_params(cmodel)
            run["mpo"] = {"max_bond": max_bond, "bond_dims": list(layer.bond_dims),
                          "core_weights": layer.num_params, "weight_rel_error": layer.error,
                          "before_ft": before, "after_ft": {**after, **_hist_facts(ft)}}
            print(f"seed {seed}: {mpo_name}  {layer.num_params:,} core weights, bonds {layer.bond_dims}, "
                  f"rel. weight error {layer.error:.4f}; auc before ft {before['roc_auc']:.4f}, after "
                  f"{after['roc_auc']:.4f} (best epoch {ft['best_epoch']}/{ft['epochs_run']}, "
                  f"{ft['seconds']:.1f}s)", flush=True)
        if args.whole:
            wmodel = compress_whole_model(model, args.whole, data.X_train[:4096])
            before = evaluate(wmodel, data.X_test, data.y_test)
            ft = train(wmodel, data, args.whole_ft_lr, args.epochs, args.patience, seed, args.batch_size,
                       args.verbose)
            after = evaluate(wmodel, data.X_test, data.y_test)
            for key, val in ((f"{whole_name} (before ft)", before), (f"{whole_name} (after ft)", after)):
                stages[key].append(val)
                params[key] = count_params(wmodel)
            rep = wmodel.bondgate_report
            run["whole"] = {"param_ratio": args.whole, "linear_weights": linear_weights(wmodel),
                            "dense_linear_weights": linear_weights(model), "report": rep.to_dict(),
                            "before_ft": before, "after_ft": {**after, **_hist_facts(ft)}}
            print(f"seed {seed}: {whole_name}: {linear_weights(wmodel):,} of {linear_weights(model):,} linear "
                  f"weights; auc before ft {before['roc_auc']:.4f}, after {after['roc_auc']:.4f} "
                  f"(best epoch {ft['best_epoch']}/{ft['epochs_run']})", flush=True)
        runs.append(run)

    wall = time.perf_counter() - t_start
    _print_table(stages, params)
    print(f"\nwall time {wall:.1f}s")
    result = {"machine": info, "args": vars(args), "wall_seconds": wall, "params": params,
              "summary": {k: _summary(v) for k, v in stages.items()}, "runs": runs}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"results written to {args.out}")
    return result


def _hist_facts(hist: dict) -> dict:
    return {k: hist[k] for k in ("best_epoch", "epochs_run", "best_valid_loss", "seconds")}


if __name__ == "__main__":
    main()
