"""Flatness diagnostics: the Hessian's top eigenvalues and trace, first- and zeroth-order flatness (R1, R0), loss
landscapes, reports with pictures, and a callback that logs them during training.

==========================  ====================================================================================
module                      what it holds
==========================  ====================================================================================
:mod:`.measures`            ``hessian_eigenvalues``, ``hessian_trace``, ``first_order_flatness``,
                            ``zeroth_order_flatness``
:mod:`.landscape`           ``loss_landscape`` (filter-normalized random directions)
:mod:`.report`              ``FlatnessArguments`` (HfArgumentParser), ``run_flatness`` (JSON + PNGs),
                            ``flatness_markdown`` (the model-card section)
:mod:`.callback`            ``FlatnessCallback`` (a ``transformers.TrainerCallback``)
:mod:`.plots`               the pictures (matplotlib, imported only when one is drawn)
:mod:`.defaults`            every default setting, written once
:mod:`._objective`          internal: the measured loss, its gradient and exact HVPs, the context that leaves the
                            model exactly as it was, argument checks
==========================  ====================================================================================

The diagnostics import :mod:`hf_gam.core.functional` (global norms, HVPs, the SDPA math context) and nothing of the
training code (``passes``, ``trainer``, ``config``).
"""

from . import defaults
from .callback import FlatnessCallback
from .landscape import loss_landscape
from .measures import first_order_flatness, hessian_eigenvalues, hessian_trace, zeroth_order_flatness
from .report import DEFAULT_SETTINGS, FlatnessArguments, flatness_markdown, run_flatness

__all__ = ["hessian_eigenvalues", "hessian_trace", "first_order_flatness", "zeroth_order_flatness", "loss_landscape",
           "FlatnessArguments", "FlatnessCallback", "run_flatness", "flatness_markdown", "DEFAULT_SETTINGS",
           "defaults"]
