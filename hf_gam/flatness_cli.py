"""Flatness reports and monitoring on top of :mod:`hf_gam.flatness`.

- :class:`FlatnessArguments`: the settings, as a dataclass for ``transformers.HfArgumentParser`` (every field is
  prefixed ``flatness_`` so it can share a parser with ``TrainingArguments``; ``--compare`` is an alias).
- :func:`run_flatness`: measure one model (or two, side by side), write ``flatness.json`` and the PNG pictures.
- :func:`flatness_markdown`: the model-card section for a :func:`run_flatness` result.
- :class:`FlatnessCallback`: log λmax, the Hessian trace and R1 every N steps during ``Trainer.train``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from . import flatness as FL
from . import plots

logger = logging.getLogger(__name__)

__all__ = ["FlatnessArguments", "run_flatness", "flatness_markdown", "FlatnessCallback", "DEFAULT_SETTINGS"]

DEFAULT_SETTINGS: dict[str, Any] = {
    "k": 20, "method": "lanczos", "max_iter": 100, "tol": 1e-4, "num_samples": 100, "rho": 0.05, "num_steps": 10,
    "step_size": None, "landscape_resolution": 21, "landscape_span": 1.0, "seed": 0, "train_mode": False,
    "name": "model", "compare_name": "compare", "loss_fn": None,
}
FILES = {"json": "flatness.json", "spectrum": "flatness_spectrum.png", "landscape": "flatness_landscape.png",
         "landscape_1d": "flatness_landscape_1d.png"}


@dataclass
class FlatnessArguments:
    """Settings of ``hf-gam flatness`` and ``hf-gam train --flatness_at_end`` (see :func:`run_flatness`). Which
    batches are measured (split, how many, transforms) is the CLI's business, not these settings'."""

    flatness_compare: str | None = field(default=None, metadata={
        "aliases": ["--compare"],
        "help": "A second model (path or Hub id) measured on the same batches and drawn side by side."})
    flatness_name: str | None = field(default=None, metadata={
        "help": "Label of the model in the pictures and the JSON (default: the model path's last part)."})
    flatness_compare_name: str | None = field(default=None, metadata={
        "help": "Label of the --compare model (default: its path's last part)."})
    flatness_top_k: int = field(default=20, metadata={"help": "How many top Hessian eigenvalues to compute."})
    flatness_method: Literal["lanczos", "power"] = field(default="lanczos", metadata={
        "help": "Eigenvalue method: lanczos (the k largest; stores max_iter vectors) or power (power iteration with "
                "deflation, the k largest in magnitude; stores k vectors)."})
    flatness_max_iter: int = field(default=100, metadata={
        "help": "Most Hessian-vector products for the eigenvalues (Lanczos: in all, >= top_k; power: per value)."})
    flatness_tol: float = field(default=1e-4, metadata={"help": "Relative tolerance of the eigenvalues."})
    flatness_num_samples: int = field(default=100, metadata={
        "help": "Random probes of Hutchinson's Hessian trace estimate."})
    flatness_rho: float = field(default=0.05, metadata={
        "help": "Radius rho of the first- and zeroth-order flatness (Definitions 4.1 and 3.1)."})
    flatness_num_steps: int = field(default=10, metadata={
        "help": "Projected ascent steps for the first- and zeroth-order flatness."})
    flatness_landscape_resolution: int = field(default=21, metadata={
        "help": "Grid points per axis of the loss landscape (2-D: resolution^2 loss evaluations)."})
    flatness_landscape_span: float = field(default=1.0, metadata={
        "help": "The landscape covers [-span, span] along each filter-normalized direction."})
    flatness_seed: int = field(default=0, metadata={"help": "Seed of every random vector (results are reproducible)."})
    flatness_train_mode: bool = field(default=False, metadata={
        "help": "Measure the training-mode loss (BatchNorm batch statistics, dropout on) instead of eval mode."})

    def to_settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`run_flatness` (``name``/``compare_name`` only when set)."""
        s = {k.removeprefix("flatness_"): v for k, v in asdict(self).items()}
        s["k"] = s.pop("top_k")
        s.pop("compare")
        return {k: v for k, v in s.items() if not (k in ("name", "compare_name") and v is None)}


def _settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ValueError(f"unknown flatness settings {unknown}; known: {sorted(DEFAULT_SETTINGS)}")
    return {**DEFAULT_SETTINGS, **settings}


def _measure(model: nn.Module, batches: list, s: Mapping[str, Any]) -> dict[str, Any]:
    common = {"seed": s["seed"], "train_mode": s["train_mode"], "loss_fn": s["loss_fn"]}
    ascent = {"rho": s["rho"], "num_steps": s["num_steps"], "step_size": s["step_size"], **common}
    land = {"resolution": s["landscape_resolution"], "span": s["landscape_span"], **common}
    out, times = {}, {}

    def timed(key, fn, *args, **kwargs):
        start = time.perf_counter()
        out[key] = fn(model, batches, *args, **kwargs)
        times[key] = round(time.perf_counter() - start, 3)

    timed("hessian_eigenvalues", FL.hessian_eigenvalues, s["k"], method=s["method"], max_iter=s["max_iter"],
          tol=s["tol"], **common)
    timed("hessian_trace", FL.hessian_trace, s["num_samples"], return_stderr=True, **common)
    out["hessian_trace"], out["hessian_trace_stderr"] = out["hessian_trace"]
    timed("first_order_flatness", FL.first_order_flatness, **ascent)
    timed("zeroth_order_flatness", FL.zeroth_order_flatness, **ascent)
    timed("landscape_1d", FL.loss_landscape, dim=1, **land)
    timed("landscape_2d", FL.loss_landscape, dim=2, **land)
    out["lambda_max"] = out["hessian_eigenvalues"][0]
    out["seconds"] = times
    return out


def run_flatness(model: nn.Module, batches: Iterable[Mapping[str, Any]], output_dir: str | os.PathLike,
                 compare_model: nn.Module | None = None, compare_batches: Iterable[Mapping[str, Any]] | None = None,
                 **settings: Any) -> dict[str, Any]:
    """Measure ``model`` on ``batches`` (and ``compare_model`` on ``compare_batches``, default: the same batches),
    write ``output_dir/flatness.json`` and the pictures, and return what was written.

    ``settings`` (defaults in :data:`DEFAULT_SETTINGS`): ``k``, ``method``, ``max_iter``, ``tol`` (eigenvalues),
    ``num_samples`` (trace), ``rho``, ``num_steps``, ``step_size`` (R1 and R0), ``landscape_resolution``,
    ``landscape_span``, ``seed``, ``train_mode``, ``loss_fn`` (all passed to :mod:`hf_gam.flatness`), ``name`` and
    ``compare_name`` (labels). The result has the model's ``hessian_eigenvalues``, ``lambda_max``,
    ``hessian_trace`` (+ ``hessian_trace_stderr``), ``first_order_flatness``, ``zeroth_order_flatness``,
    ``landscape_1d``/``landscape_2d`` and ``seconds`` at the top level, plus ``name``, ``settings``, ``files``
    (file names relative to ``output_dir``) and, with a comparison, ``compare`` (the same measures).
    Pictures: ``flatness_spectrum.png`` (Figure 3 style), ``flatness_landscape.png`` (Figure 5 style, 2-D) and
    ``flatness_landscape_1d.png``.
    """
    s = _settings(settings)
    batches = list(batches)
    name, other = str(s["name"]), str(s["compare_name"])
    if compare_model is not None and other == name:
        other = f"{other} (2)"
    logger.info("Measuring the flatness of %s on %d batches", name, len(batches))
    results = {name: _measure(model, batches, s)}
    if compare_model is not None:
        logger.info("Measuring the flatness of %s", other)
        cmp_batches = list(compare_batches) if compare_batches is not None else batches
        results[other] = _measure(compare_model, cmp_batches, s)
    os.makedirs(output_dir, exist_ok=True)
    plots.plot_spectrum(results, os.path.join(output_dir, FILES["spectrum"]),
                        title=f"Hessian spectrum (top {s['k']} eigenvalues, trace from {s['num_samples']} probes)")
    plots.plot_landscape({k: r["landscape_2d"] for k, r in results.items()},
                         os.path.join(output_dir, FILES["landscape"]))
    plots.plot_landscape_1d({k: r["landscape_1d"] for k, r in results.items()},
                            os.path.join(output_dir, FILES["landscape_1d"]))
    saved = {k: v for k, v in s.items() if k != "loss_fn"}
    saved["loss_fn"] = "default" if s["loss_fn"] is None else getattr(s["loss_fn"], "__name__", repr(s["loss_fn"]))
    saved["num_batches"], saved["num_examples"] = len(batches), sum(FL._batch_size(b) for b in batches)
    result = {**results[name], "name": name, "settings": saved, "files": dict(FILES)}
    if compare_model is not None:
        result["compare"] = {**results[other], "name": other}
    with open(os.path.join(output_dir, FILES["json"]), "w") as f:
        json.dump(result, f, indent=2, allow_nan=True)
    return result


def _fmt(x: float) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) and math.isfinite(x) else str(x)


def flatness_markdown(result: Mapping[str, Any], image_prefix: str = "") -> str:
    """A model-card section (markdown) for a :func:`run_flatness` result: a table of the measures (both models
    when compared), the settings and the two pictures (``image_prefix`` is prepended to their file names)."""
    s = result["settings"]
    rows = [result] + ([result["compare"]] if "compare" in result else [])
    lines = [
        "## Flatness", "",
        f"Measured with `hf_gam.flatness` on {s['num_batches']} batches ({s['num_examples']} examples), "
        f"{'training' if s['train_mode'] else 'eval'}-mode loss, seed {s['seed']}. λmax and the top-{s['k']} "
        f"eigenvalues by {s['method']}; trace by Hutchinson ({s['num_samples']} probes); "
        f"R1 (first-order flatness, Definition 4.1) and R0 (zeroth-order, Definition 3.1) with ρ = {s['rho']} "
        f"and {s['num_steps']} ascent steps (lower-bound estimates; R0 ≤ R1).", "",
        "| model | λmax | Hessian trace | R1 (first-order) | R0 (zeroth-order) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {_fmt(r['lambda_max'])} | {_fmt(r['hessian_trace'])} ± "
                     f"{_fmt(r['hessian_trace_stderr'])} | {_fmt(r['first_order_flatness'])} | "
                     f"{_fmt(r['zeroth_order_flatness'])} |")
    files = result["files"]
    lines += ["", f"![Top Hessian eigenvalues and trace]({image_prefix}{files['spectrum']})", "",
              f"![Loss landscape]({image_prefix}{files['landscape']})", ""]
    return "\n".join(lines)


class FlatnessCallback(TrainerCallback):
    """Log ``{prefix}lambda_max``, ``{prefix}hessian_trace`` and ``{prefix}first_order_flatness`` (plus
    ``{prefix}seconds``) every ``every_n_steps`` optimizer steps, on one fixed probe batch.

    Cheap by default: λmax by Lanczos with at most ``max_iter=20`` HVPs, the trace from ``num_samples=10`` probes,
    R1 with ``num_steps=3`` (at ρ = ``rho``), on ``probe_size=32`` examples, with the same random vectors every
    time (``seed``), so the curves are comparable across steps. ``measures`` picks a subset (or adds
    ``"zeroth_order_flatness"``). ``probe_batch``: a batch (dict) or a list of batches; by default the first
    ``probe_size`` examples of the training set, collated by the training dataloader (without touching any RNG).

    The values reach the Trainer's trackers (``report_to``) and ``state.log_history`` through ``trainer.log``:
    attach the trainer with ``FlatnessCallback(...).attach(trainer)`` (or pass ``trainer=``). Without a trainer
    they are only appended to ``state.log_history``. Measured on the unwrapped model in its own dtype, in eval mode
    unless ``train_mode``; weights, modes, buffers and gradients are left exactly as they were. Not for DeepSpeed
    ZeRO-3 or FSDP (sharded parameters).
    """

    MEASURES = ("lambda_max", "hessian_trace", "first_order_flatness", "zeroth_order_flatness")

    def __init__(self, probe_batch=None, every_n_steps: int = 100, *, k: int = 1, max_iter: int = 20,
                 num_samples: int = 10, rho: float = 0.05, num_steps: int = 3, probe_size: int = 32, seed: int = 0,
                 train_mode: bool = False, measures=("lambda_max", "hessian_trace", "first_order_flatness"),
                 prefix: str = "flatness/", loss_fn=None, trainer=None):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1; got {every_n_steps!r}")
        if not isinstance(probe_size, int) or probe_size < 1:
            raise ValueError(f"probe_size must be an int >= 1; got {probe_size!r}")
        bad = [m for m in measures if m not in self.MEASURES]
        if bad or not measures:
            raise ValueError(f"measures must be a non-empty subset of {self.MEASURES}; got {measures!r}")
        FL._check("k", k, isinstance(k, int) and k >= 1, "an int >= 1")
        FL._check("num_samples", num_samples, isinstance(num_samples, int) and num_samples >= 1, "an int >= 1")
        FL._ascent_args(rho, num_steps, None)
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
            out[p + "lambda_max"] = FL.hessian_eigenvalues(model, self.probe, self.k, max_iter=self.max_iter,
                                                           **self.kw)[0]
        if "hessian_trace" in self.measures:
            out[p + "hessian_trace"] = FL.hessian_trace(model, self.probe, self.num_samples, **self.kw)
        ascent = {"rho": self.rho, "num_steps": self.num_steps, **self.kw}
        if "first_order_flatness" in self.measures:
            out[p + "first_order_flatness"] = FL.first_order_flatness(model, self.probe, **ascent)
        if "zeroth_order_flatness" in self.measures:
            out[p + "zeroth_order_flatness"] = FL.zeroth_order_flatness(model, self.probe, **ascent)
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
