"""The default settings of the flatness diagnostics, written once.

The measuring functions' keyword defaults, :class:`~hf_gam.flatness.FlatnessArguments` (``hf-gam flatness`` and
``hf-gam train --flatness_at_end``), :func:`~hf_gam.flatness.run_flatness` and
:class:`~hf_gam.flatness.FlatnessCallback` all read these names; change a value here and every front end follows.
"""

from __future__ import annotations

# Hessian eigenvalues (hessian_eigenvalues)
METHOD = "lanczos"  # or "power"
MAX_ITER = 100  # Hessian-vector products at most (Lanczos: in all; power iteration: per eigenvalue)
TOL = 1e-5  # relative tolerance of the eigenvalues
REPORT_TOP_K = 20  # eigenvalues in a report (its histogram); the function's own default is the top one (k=1)

# Hessian trace (hessian_trace)
NUM_SAMPLES = 100  # Hutchinson probes
DISTRIBUTION = "rademacher"  # or "gaussian"

# First- and zeroth-order flatness (first_order_flatness, zeroth_order_flatness)
RHO = 0.05  # radius of the ball (reports and the callback; the functions take rho explicitly)
NUM_STEPS = 10  # projected ascent steps
STEP_SIZE = None  # None: full steps to rho * d / |d|

# Loss landscape (loss_landscape)
LANDSCAPE_DIM = 2
LANDSCAPE_RESOLUTION = 21  # grid points per axis
LANDSCAPE_SPAN = 1.0  # [-span, span] along each direction

# Every measure
NUM_BATCHES = 4  # batches measured by `hf-gam flatness` and `hf-gam train --flatness_at_end`
SEED = 0
TRAIN_MODE = False  # eval-mode loss (BatchNorm running statistics, no dropout)

# FlatnessCallback: a cheap budget per logged step, so that the curves cost little next to training
CALLBACK_EVERY_N_STEPS = 100
CALLBACK_TOP_K = 1
CALLBACK_MAX_ITER = 20
CALLBACK_NUM_SAMPLES = 10
CALLBACK_NUM_STEPS = 3
CALLBACK_PROBE_SIZE = 32
