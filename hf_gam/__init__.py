"""hf_gam: Gradient-norm Aware Minimization (GAM, CVPR 2023) and its SAM relatives for the Hugging Face Trainer."""

from . import directions, flatness, functional, landscape
from .config import GAMConfig
from .directions import GAMHyper
from .flatness import (
    first_order_flatness,
    hessian_eigenvalues,
    hessian_trace,
    zeroth_order_flatness,
)
from .landscape import loss_landscape
from .flatness_cli import FlatnessArguments, FlatnessCallback, flatness_markdown, run_flatness
from .passes import MicroBatchOracle, WindowOracle, run_passes
from .trainer import GAMTrainer

__version__ = "0.1.0"

__all__ = [
    "GAMConfig", "GAMTrainer", "GAMHyper", "functional", "directions", "flatness", "landscape",
    "MicroBatchOracle", "WindowOracle", "run_passes",
    "hessian_eigenvalues", "hessian_trace", "first_order_flatness", "zeroth_order_flatness", "loss_landscape",
    "FlatnessArguments", "FlatnessCallback", "run_flatness", "flatness_markdown",
    "__version__",
]
