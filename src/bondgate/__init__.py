"""bondgate: compress PyTorch models into matrix-product operators, gate their bonds per input,
and run them through a planned contraction kernel."""

from .factors import choose_factors, factorize_shape
from .io import from_pretrained, load, register_layer_type, save, save_pretrained
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
    "save",
    "load",
    "save_pretrained",
    "from_pretrained",
    "register_layer_type",
]
