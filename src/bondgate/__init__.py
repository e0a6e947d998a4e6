"""bondgate: compress PyTorch models into matrix-product operators, gate their bonds per input,
and run them through a planned contraction kernel."""

from . import hf  # noqa: F401 - registers the transformers integration once transformers loads its quantizers
from .baselines import latency, magnitude_prune, quantize_int8, size_on_disk, svd_compress
from .deploy import deploy_float, deploy_int8
from .distill import DistillLoss, aux_losses, distill
from .embedding import MPOEmbedding
from .factors import choose_factors, factorize_shape
from .gating import GatedMPOLinear, GatingConfig, fit_controllers, gate, gating_report, set_budget, set_mode
from .io import from_pretrained, load, register_layer_type, save, save_pretrained
from .layer import MPOLinear
from .lowrank import LowRankLinear
from .mpo import MPO
from .planner import MEMORY, SPEED, PlanPolicy, clear_plan_cache
from .quant import quantize_mpo
from .recurrent import Recurrent
from .surgery import CompressionConfig, CompressionReport, compress

__version__ = "0.1.0"

__all__ = [
    # the MPO core
    "MPO",
    "MPOLinear",
    "MPOEmbedding",
    "Recurrent",
    "PlanPolicy",
    "MEMORY",
    "SPEED",
    "choose_factors",
    "factorize_shape",
    "clear_plan_cache",
    # whole models
    "CompressionConfig",
    "CompressionReport",
    "compress",
    "DistillLoss",
    "distill",
    "aux_losses",
    "save",
    "load",
    "save_pretrained",
    "from_pretrained",
    "register_layer_type",
    # int8 MPO cores, int8 kernels
    "quantize_mpo",
    "deploy_float",
    "deploy_int8",
    # per-input bond gating
    "GatingConfig",
    "GatedMPOLinear",
    "gate",
    "set_mode",
    "set_budget",
    "fit_controllers",
    "gating_report",
    # baselines
    "LowRankLinear",
    "svd_compress",
    "magnitude_prune",
    "quantize_int8",
    "size_on_disk",
    "latency",
]


def __getattr__(name: str):
    if name == "DistillationTrainer":  # needs transformers: built on first access
        from .distill import DistillationTrainer

        return DistillationTrainer
    raise AttributeError(f"module 'bondgate' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names plus ``DistillationTrainer``, which ``__getattr__`` builds on first access (so that
    ``dir(bondgate)`` and tab completion list it)."""
    return sorted({*globals(), "DistillationTrainer"})
