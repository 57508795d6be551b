"""hf_gam: Gradient-norm Aware Minimization (GAM, CVPR 2023) and its SAM relatives for the Hugging Face Trainer.

Floors, each importing only from those below it (``tests/test_architecture.py`` checks them):

- :mod:`hf_gam.core`: the algorithm (tensor math, the mode registry and directions, oracles, collectives, the step
  driver); imports nothing else of hf_gam.
- :mod:`hf_gam.optim` (``GAM`` / ``SAM`` for any loop) and :mod:`hf_gam.trainer` (``GAMConfig``, ``GAMTrainer``,
  losses, checkpoints, the model card): glue over the core.
- :mod:`hf_gam.flatness`: diagnostics (uses :mod:`hf_gam.core.functional` only); :mod:`hf_gam.metrics`: the
  ``evaluate`` modules shipped in the package; :mod:`hf_gam.data`: datasets and transforms.
- :mod:`hf_gam.cli`: ``hf-gam train`` and ``hf-gam flatness`` on top of everything.
- ``errors.py`` (``UserError``, the one base of user errors) and ``formatting.py``: leaves any floor may use;
  ``testing.py``: tiny models and data for tests and benchmarks (the package never imports it).
"""

from . import flatness, optim
from .core import directions, functional
from .core.directions import GAMHyper
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
from .core.oracles import MicroBatchOracle, WindowOracle
from .core.step import run_passes
from .trainer import GAMConfig, GAMTrainer

__version__ = "0.1.0"

__all__ = [
    "GAMConfig", "GAMTrainer", "GAMHyper", "functional", "directions", "flatness", "optim",
    "MicroBatchOracle", "WindowOracle", "run_passes",
    "hessian_eigenvalues", "hessian_trace", "first_order_flatness", "zeroth_order_flatness", "loss_landscape",
    "FlatnessArguments", "FlatnessCallback", "run_flatness", "flatness_markdown",
    "__version__",
]
