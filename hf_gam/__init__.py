"""hf_gam: Gradient-norm Aware Minimization (GAM, CVPR 2023) and its SAM relatives for the Hugging Face Trainer."""

from . import directions, flatness, functional, optim
from .config import GAMConfig
from .directions import GAMHyper
from .flatness import (
    FlatnessArguments,
    FlatnessCallback,
    first_order_flatness,
    flatness_markdown,
    hessian_eigenvalues,
    hessian_trace,
    loss_landscape,
    run_flatness,
    zeroth_order_flatness,
)
from .passes import MicroBatchOracle, WindowOracle, run_passes
from .trainer import GAMTrainer

__version__ = "0.1.0"

__all__ = [
    "GAMConfig", "GAMTrainer", "GAMHyper", "functional", "directions", "flatness", "optim",
    "MicroBatchOracle", "WindowOracle", "run_passes",
    "hessian_eigenvalues", "hessian_trace", "first_order_flatness", "zeroth_order_flatness", "loss_landscape",
    "FlatnessArguments", "FlatnessCallback", "run_flatness", "flatness_markdown",
    "__version__",
]
