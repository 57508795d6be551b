"""hf_gam: Gradient-norm Aware Minimization (GAM, CVPR 2023) and its SAM relatives for the Hugging Face Trainer."""

from . import directions, functional
from .config import GAMConfig
from .trainer import GAMTrainer

__version__ = "0.1.0"

__all__ = ["GAMConfig", "GAMTrainer", "functional", "directions", "__version__"]
