"""bondgate: compress PyTorch models into matrix-product operators, gate their bonds per input,
and run them through a planned contraction kernel."""

from .baselines import LowRankLinear, latency, magnitude_prune, quantize_int8, size_on_disk, svd_compress
from .factors import choose_factors, factorize_shape
from .layer import MPOLinear
from .mpo import MPO
from .planner import MEMORY, SPEED, PlanPolicy, clear_plan_cache

__version__ = "0.1.0"

__all__ = [
    "MPO",
    "MPOLinear",
    "PlanPolicy",
    "MEMORY",
    "SPEED",
    "choose_factors",
    "factorize_shape",
    "clear_plan_cache",
    "LowRankLinear",
    "svd_compress",
    "magnitude_prune",
    "quantize_int8",
    "size_on_disk",
    "latency",
]
