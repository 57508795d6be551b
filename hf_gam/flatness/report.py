"""Flatness reports: measure one model (or two, side by side), write ``flatness.json`` and the pictures, and the
model-card section.

- :class:`FlatnessArguments`: the settings, as a dataclass for ``transformers.HfArgumentParser`` (every field is
  prefixed ``flatness_`` so it can share a parser with ``TrainingArguments``; ``--compare`` is an alias); its
  defaults are :mod:`hf_gam.flatness.defaults`.
- :func:`run_flatness`: measure one model (or two, side by side), write ``flatness.json`` and the PNG pictures.
- :func:`flatness_markdown`: the model-card section for a :func:`run_flatness` result.

The command line itself is ``hf-gam flatness`` (:mod:`hf_gam.cli`); the pictures are :mod:`hf_gam.flatness.plots`
(matplotlib is imported when they are drawn).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from torch import nn

from ..formatting import format_value
from . import defaults
from . import plots
from ._objective import batch_size, check_argument
from .landscape import loss_landscape
from .measures import first_order_flatness, hessian_eigenvalues, hessian_trace, zeroth_order_flatness

logger = logging.getLogger(__name__)

__all__ = ["FlatnessArguments", "check_settings", "run_flatness", "flatness_markdown", "DEFAULT_SETTINGS"]

FILES = {"json": "flatness.json", "spectrum": "flatness_spectrum.png", "landscape": "flatness_landscape.png",
         "landscape_1d": "flatness_landscape_1d.png"}


@dataclass
class FlatnessArguments:
    """Settings of ``hf-gam flatness`` and ``hf-gam train --flatness_at_end`` (see :func:`run_flatness`). Which
    batches are measured (split, how many, transforms) is the CLI's business, not these settings'."""

    flatness_compare: str | None = field(default=None, metadata={
        "aliases": ["--compare"],
        "help": "A second trained model (path or Hub id) measured on the same images, through its own image "
                "processor, and drawn side by side."})
    flatness_name: str | None = field(default=None, metadata={
        "help": "Label of the model in the pictures and the JSON (default: the model path's last part)."})
    flatness_compare_name: str | None = field(default=None, metadata={
        "help": "Label of the --compare model (default: its path's last part)."})
    flatness_top_k: int = field(default=defaults.REPORT_TOP_K, metadata={
        "help": "How many top Hessian eigenvalues to compute."})
    flatness_method: Literal["lanczos", "power"] = field(default=defaults.METHOD, metadata={
        "help": "Eigenvalue method: lanczos (the k largest; stores max_iter vectors) or power (power iteration with "
                "deflation, the k largest in magnitude; stores k vectors)."})
    flatness_max_iter: int = field(default=defaults.MAX_ITER, metadata={
        "help": "Most Hessian-vector products for the eigenvalues (Lanczos: in all, >= top_k; power: per value)."})
    flatness_tol: float = field(default=defaults.TOL, metadata={"help": "Relative tolerance of the eigenvalues."})
    flatness_num_samples: int = field(default=defaults.NUM_SAMPLES, metadata={
        "help": "Random probes of Hutchinson's Hessian trace estimate."})
    flatness_rho: float = field(default=defaults.RHO, metadata={
        "help": "Radius rho of the first- and zeroth-order flatness (Definitions 4.1 and 3.1)."})
    flatness_num_steps: int = field(default=defaults.NUM_STEPS, metadata={
        "help": "Projected ascent steps for the first- and zeroth-order flatness."})
    flatness_landscape_resolution: int = field(default=defaults.LANDSCAPE_RESOLUTION, metadata={
        "help": "Grid points per axis of the loss landscape (2-D: resolution^2 loss evaluations)."})
    flatness_landscape_span: float = field(default=defaults.LANDSCAPE_SPAN, metadata={
        "help": "The landscape covers [-span, span] along each filter-normalized direction."})
    flatness_seed: int = field(default=defaults.SEED, metadata={
        "help": "Seed of every random vector (results are reproducible)."})
    flatness_train_mode: bool = field(default=defaults.TRAIN_MODE, metadata={
        "help": "Measure the training-mode loss (BatchNorm batch statistics, dropout on) instead of eval mode."})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag and its value when a setting cannot be measured with; the command
        line runs it before loading anything."""
        check_settings(self.to_settings(), prefix="flatness_")

    def to_settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`run_flatness` (``name``/``compare_name`` only when set)."""
        s = {k.removeprefix("flatness_"): v for k, v in asdict(self).items()}
        s["k"] = s.pop("top_k")
        s.pop("compare")
        return {k: v for k, v in s.items() if not (k in ("name", "compare_name") and v is None)}


# run_flatness's defaults: FlatnessArguments' (the command line's) plus what only the Python API sets
DEFAULT_SETTINGS: dict[str, Any] = {**FlatnessArguments().to_settings(), "step_size": defaults.STEP_SIZE, "name": "model",
                                    "compare_name": "compare", "loss_fn": None}


def check_settings(settings: Mapping[str, Any], prefix: str = "") -> None:
    """Raise ``ValueError("{name} must be ...; got {value!r}")`` for the first :func:`run_flatness` setting that
    cannot be measured with (``prefix`` + the name; ``k`` is named ``top_k`` under a prefix), before any compute."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def positive(v) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    s = {**DEFAULT_SETTINGS, **settings}
    k = s["k"]
    rules = [("k", is_int(k) and k >= 1, "an int >= 1"),
             ("max_iter", is_int(s["max_iter"]) and s["max_iter"] >= (k if s["method"] == "lanczos" and is_int(k)
                                                                       else 1),
              f">= top_k ({k}) for Lanczos" if s["method"] == "lanczos" else "an int >= 1"),
             ("tol", positive(s["tol"]), "> 0"),
             ("num_samples", is_int(s["num_samples"]) and s["num_samples"] >= 1, "an int >= 1"),
             ("rho", positive(s["rho"]), "finite and > 0"),
             ("num_steps", is_int(s["num_steps"]) and s["num_steps"] >= 1, "an int >= 1"),
             ("landscape_resolution", is_int(s["landscape_resolution"]) and s["landscape_resolution"] >= 2,
              "an int >= 2"),
             ("landscape_span", positive(s["landscape_span"]), "finite and > 0")]
    for name, ok, need in rules:
        shown = prefix + ("top_k" if name == "k" and prefix else name)
        check_argument(shown, s[name], ok, need)


def _settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ValueError(f"unknown flatness settings {unknown}; known: {sorted(DEFAULT_SETTINGS)}")
    check_settings(settings)
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

    timed("hessian_eigenvalues", hessian_eigenvalues, s["k"], method=s["method"], max_iter=s["max_iter"],
          tol=s["tol"], **common)
    timed("hessian_trace", hessian_trace, s["num_samples"], return_stderr=True, **common)
    out["hessian_trace"], out["hessian_trace_stderr"] = out["hessian_trace"]
    timed("first_order_flatness", first_order_flatness, **ascent)
    timed("zeroth_order_flatness", zeroth_order_flatness, **ascent)
    timed("landscape_1d", loss_landscape, dim=1, **land)
    timed("landscape_2d", loss_landscape, dim=2, **land)
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
    ``landscape_span``, ``seed``, ``train_mode``, ``loss_fn`` (all passed to the measures of
    :mod:`hf_gam.flatness`), ``name`` and ``compare_name`` (labels). The result has the model's ``hessian_eigenvalues``, ``lambda_max``,
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
    saved["num_batches"], saved["num_examples"] = len(batches), sum(batch_size(b) for b in batches)
    result = {**results[name], "name": name, "settings": saved, "files": dict(FILES)}
    if compare_model is not None:
        result["compare"] = {**results[other], "name": other}
    with open(os.path.join(output_dir, FILES["json"]), "w") as f:
        json.dump(result, f, indent=2, allow_nan=True)
    return result


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
        cells = [format_value(r[k]) for k in ("lambda_max", "hessian_trace", "hessian_trace_stderr",
                                              "first_order_flatness", "zeroth_order_flatness")]
        lines.append(f"| {r['name']} | {cells[0]} | {cells[1]} ± {cells[2]} | {cells[3]} | {cells[4]} |")
    files = result["files"]
    lines += ["", f"![Top Hessian eigenvalues and trace]({image_prefix}{files['spectrum']})", "",
              f"![Loss landscape]({image_prefix}{files['landscape']})", ""]
    return "\n".join(lines)
