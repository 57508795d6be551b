"""Flatness during training: :class:`FlatnessCallback` logs λmax, the Hessian trace and R1 every N steps of a
``transformers.Trainer`` run (defaults: the cheap ``CALLBACK_*`` budget of :mod:`hf_gam.flatness.defaults`)."""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from . import defaults
from ._objective import check_argument, check_ascent_arguments
from .measures import first_order_flatness, hessian_eigenvalues, hessian_trace, zeroth_order_flatness

__all__ = ["FlatnessCallback"]


class FlatnessCallback(TrainerCallback):
    """Log ``{prefix}lambda_max``, ``{prefix}hessian_trace`` and ``{prefix}first_order_flatness`` (plus
    ``{prefix}seconds``) every ``every_n_steps`` optimizer steps, on one fixed probe batch.

    Cheap by default (the ``CALLBACK_*`` values of :mod:`hf_gam.flatness.defaults`, in the signature): λmax by
    Lanczos with at most ``max_iter`` HVPs, the trace from ``num_samples`` probes, R1 with ``num_steps`` ascent
    steps (at ρ = ``rho``), on ``probe_size`` examples, with the same random vectors every time (``seed``), so the
    curves are comparable across steps. ``measures`` picks a subset (or adds
    ``"zeroth_order_flatness"``). ``probe_batch``: a batch (dict) or a list of batches; by default the first
    ``probe_size`` examples of the training set, collated by the training dataloader (without touching any RNG).

    The values reach the Trainer's trackers (``report_to``) and ``state.log_history`` through ``trainer.log``:
    attach the trainer with ``FlatnessCallback(...).attach(trainer)`` (or pass ``trainer=``). Without a trainer
    they are only appended to ``state.log_history``. Measured on the unwrapped model in its own dtype, in eval mode
    unless ``train_mode``; weights, modes, buffers and gradients are left exactly as they were. Not for DeepSpeed
    ZeRO-3 or FSDP (sharded parameters).
    """

    MEASURES = ("lambda_max", "hessian_trace", "first_order_flatness", "zeroth_order_flatness")

    def __init__(self, probe_batch=None, every_n_steps: int = defaults.CALLBACK_EVERY_N_STEPS, *, k: int = defaults.CALLBACK_TOP_K,
                 max_iter: int = defaults.CALLBACK_MAX_ITER, num_samples: int = defaults.CALLBACK_NUM_SAMPLES, rho: float = defaults.RHO,
                 num_steps: int = defaults.CALLBACK_NUM_STEPS, probe_size: int = defaults.CALLBACK_PROBE_SIZE, seed: int = defaults.SEED,
                 train_mode: bool = defaults.TRAIN_MODE, measures=("lambda_max", "hessian_trace", "first_order_flatness"),
                 prefix: str = "flatness/", loss_fn=None, trainer=None):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1; got {every_n_steps!r}")
        if not isinstance(probe_size, int) or probe_size < 1:
            raise ValueError(f"probe_size must be an int >= 1; got {probe_size!r}")
        bad = [m for m in measures if m not in self.MEASURES]
        if bad or not measures:
            raise ValueError(f"measures must be a non-empty subset of {self.MEASURES}; got {measures!r}")
        check_argument("k", k, isinstance(k, int) and k >= 1, "an int >= 1")
        check_argument("num_samples", num_samples, isinstance(num_samples, int) and num_samples >= 1, "an int >= 1")
        check_ascent_arguments(rho, num_steps, None)
        self.probe = [probe_batch] if isinstance(probe_batch, Mapping) else probe_batch
        self.every_n_steps, self.probe_size, self.measures, self.prefix = every_n_steps, probe_size, measures, prefix
        self.kw = {"seed": seed, "train_mode": train_mode, "loss_fn": loss_fn}
        self.k, self.max_iter, self.num_samples = k, max(max_iter, k), num_samples
        self.rho, self.num_steps = rho, num_steps
        self.trainer = trainer
        self._warned = False

    def attach(self, trainer) -> FlatnessCallback:
        """Add this callback to ``trainer`` and log through it; returns ``self``."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def measure(self, model: nn.Module) -> dict[str, float]:
        """The logged values for ``model`` on the probe batch, now."""
        start, out, p = time.perf_counter(), {}, self.prefix
        if "lambda_max" in self.measures:
            out[p + "lambda_max"] = hessian_eigenvalues(model, self.probe, self.k, max_iter=self.max_iter,
                                                        **self.kw)[0]
        if "hessian_trace" in self.measures:
            out[p + "hessian_trace"] = hessian_trace(model, self.probe, self.num_samples, **self.kw)
        ascent = {"rho": self.rho, "num_steps": self.num_steps, **self.kw}
        if "first_order_flatness" in self.measures:
            out[p + "first_order_flatness"] = first_order_flatness(model, self.probe, **ascent)
        if "zeroth_order_flatness" in self.measures:
            out[p + "zeroth_order_flatness"] = zeroth_order_flatness(model, self.probe, **ascent)
        out[p + "seconds"] = time.perf_counter() - start
        return out

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if self.probe is None:
            if train_dataloader is None:
                raise ValueError("FlatnessCallback needs probe_batch when the Trainer has no train_dataloader")
            self.probe = [_first_examples(train_dataloader, self.probe_size)]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every_n_steps:
            return
        metrics = self.measure(model)
        if self.trainer is not None:
            self.trainer.log(dict(metrics))
            return
        if not self._warned:
            warnings.warn("FlatnessCallback has no trainer: its values go to state.log_history only; use "
                          "FlatnessCallback(...).attach(trainer) to reach the trackers", stacklevel=2)
            self._warned = True
        state.log_history.append({**metrics, "step": state.global_step})


def _first_examples(dataloader, n: int) -> dict:
    """The first ``n`` examples of the dataloader's dataset, collated by its ``collate_fn``; every RNG (torch,
    Python, NumPy) is left as it was, so training sees the same data order and augmentations."""
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            ds = dataloader.dataset
            if hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
                batch = dataloader.collate_fn([ds[i] for i in range(min(n, len(ds)))])
            else:
                batch = next(iter(dataloader))
    finally:
        random.setstate(py)
        np.random.set_state(npy)
    return {k: v for k, v in dict(batch).items()}
