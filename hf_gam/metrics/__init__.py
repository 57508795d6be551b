"""Metrics through ``evaluate``: the modules shipped here (``accuracy``, ``top_k_accuracy``) load offline from their
path; other names go to ``evaluate.load`` (Hub modules such as ``f1`` or ``matthews_correlation`` when online or
cached) and existing paths load as local module scripts. ``NAME:key=value,...`` passes keyword arguments to the
module's ``compute`` (``f1:average=macro``, ``top_k_accuracy:k=3``).

``hf-gam train --metrics accuracy top_k_accuracy f1:average=macro`` loads them with :func:`load_metrics` and runs
:func:`check_metrics` before training, then uses :func:`compute_metrics_fn` as the Trainer's ``compute_metrics``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from ..errors import UserError

__all__ = ["SHIPPED", "DEFAULT_METRICS", "MetricLoadError", "LoadedMetric", "metric_path", "parse_spec", "load_metrics",
           "check_metrics", "compute_metrics_fn"]

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = ("accuracy", "top_k_accuracy")
DEFAULT_METRICS = ("accuracy", "top_k_accuracy")


class MetricLoadError(UserError):
    """A metric named on the command line could not be loaded (message names it)."""


def metric_path(name: str) -> str:
    """Directory of the shipped module ``name`` (``evaluate.load`` takes it)."""
    if name not in SHIPPED:
        raise KeyError(f"{name!r} is not a shipped metric; shipped: {', '.join(SHIPPED)}")
    return os.path.join(HERE, name)


class LoadedMetric(NamedTuple):
    """An ``evaluate`` module and the keyword arguments its ``compute`` gets (from ``NAME:key=value,...``)."""

    module: Any
    kwargs: dict[str, Any]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"f1:average=macro"`` -> ``("f1", {"average": "macro"})``; values are JSON when they parse (``k=3`` is an
    int), else strings. A spec without ``=`` after its last ``:`` is a plain name or path."""
    name, sep, tail = spec.rpartition(":")
    if not sep or "=" not in tail or not name:
        return spec, {}
    kwargs: dict[str, Any] = {}
    for item in tail.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise MetricLoadError(f"--metrics: {spec!r}: expected NAME:key=value[,key=value...]; got {item!r}")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value
    return name, kwargs


def load_metrics(specs: Sequence[str]) -> dict[str, LoadedMetric]:
    """``{spec: LoadedMetric}`` for specs ``NAME[:key=value,...]``: shipped names from their path, existing paths as
    module scripts, other names through ``evaluate.load`` (the Hub). Raises :class:`MetricLoadError` naming the
    metric that fails."""
    import evaluate

    loaded: dict[str, LoadedMetric] = {}
    for spec in specs:
        name, kwargs = parse_spec(spec)
        source = metric_path(name) if name in SHIPPED else name
        try:
            module = evaluate.load(source, keep_in_memory=True)  # in memory: no cache files per process
        except Exception as err:  # noqa: BLE001
            offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                          for v in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"))
            hint = (" (offline: only the shipped metrics and cached or local modules load)" if offline
                    and not os.path.exists(name) else "")
            raise MetricLoadError(f"--metrics: cannot load the evaluate module {name!r}{hint}: "
                                  f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; shipped "
                                  f"metrics: {', '.join(SHIPPED)}") from err
        loaded[spec] = LoadedMetric(module, kwargs)
    return loaded


def check_metrics(metrics: dict[str, LoadedMetric], num_classes: int) -> None:
    """Run every metric once on made-up predictions over ``num_classes`` classes, so that a metric that cannot take
    this task (e.g. ``f1`` without ``average`` on more than two classes) or returns a non-scalar value (per-class
    arrays, e.g. ``f1:average=null``) fails before training, naming itself and the key."""
    logits = np.eye(max(num_classes, 2), dtype=np.float32)[:num_classes]
    labels = np.arange(num_classes)
    for spec, metric in metrics.items():
        try:
            results = _compute(spec, metric, logits, labels)
        except Exception as err:  # noqa: BLE001
            raise MetricLoadError(f"--metrics: {spec!r} fails on {num_classes}-class predictions: "
                                  f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
        for key, value in results.items():  # the Trainer logs, saves and writes to the card scalars only
            if not _is_scalar(value):
                shape = f"shape {np.shape(value)}" if np.ndim(value) else type(value).__name__
                raise MetricLoadError(f"--metrics: {spec!r} returns a non-scalar value for {key!r} ({shape}) on "
                                      f"{num_classes}-class predictions; pass arguments that make it one number "
                                      "(e.g. f1:average=macro)")


def _is_scalar(value: Any) -> bool:
    if np.ndim(value) != 0 or isinstance(value, (str, bytes)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _compute(spec: str, metric: LoadedMetric, logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    predictions = logits if _takes_scores(metric.module) else logits.argmax(-1)
    return metric.module.compute(predictions=predictions, references=labels, **metric.kwargs) or {}


def _takes_scores(module) -> bool:
    """Whether the module's ``predictions`` are per-class scores (a sequence feature) rather than class ids."""
    import datasets

    features = module.features if not isinstance(module.features, list) else module.features[0]
    return not isinstance(features["predictions"], datasets.Value)


def compute_metrics_fn(metrics: dict[str, LoadedMetric]) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for ``transformers.Trainer``: logits and labels -> every metric's results, merged
    (a key two metrics share is prefixed with the metric's name). Class-id metrics get ``argmax`` of the logits,
    score metrics the logits."""
    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits)
        labels = np.asarray(labels).reshape(-1)
        out: dict[str, float] = {}
        for spec, metric in metrics.items():
            for key, value in _compute(spec, metric, logits, labels).items():
                name = os.path.basename(parse_spec(spec)[0].rstrip("/"))
                out[key if key not in out else f"{name}_{key}"] = float(value) if np.ndim(value) == 0 else value
        return out

    return compute_metrics
