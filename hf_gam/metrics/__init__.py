"""Metrics through ``evaluate``: the modules shipped here (``accuracy``, ``top_k_accuracy``) load offline from their
path; other names go to ``evaluate.load`` (Hub modules such as ``f1`` or ``matthews_correlation`` when online or
cached) and existing paths load as local module scripts.

``hf-gam train --metrics accuracy top_k_accuracy f1`` uses :func:`load_metrics` before training and
:func:`compute_metrics_fn` as the Trainer's ``compute_metrics``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["SHIPPED", "DEFAULT_METRICS", "MetricLoadError", "metric_path", "load_metrics", "compute_metrics_fn"]

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = ("accuracy", "top_k_accuracy")
DEFAULT_METRICS = ("accuracy", "top_k_accuracy")


class MetricLoadError(ValueError):
    """A metric named on the command line could not be loaded (message names it)."""


def metric_path(name: str) -> str:
    """Directory of the shipped module ``name`` (``evaluate.load`` takes it)."""
    if name not in SHIPPED:
        raise KeyError(f"{name!r} is not a shipped metric; shipped: {', '.join(SHIPPED)}")
    return os.path.join(HERE, name)


def load_metrics(names: Sequence[str]) -> dict[str, Any]:
    """``{name: evaluate.EvaluationModule}``: shipped names from their path, existing paths as module scripts, other
    names through ``evaluate.load`` (the Hub). Raises :class:`MetricLoadError` naming the metric that fails."""
    import evaluate

    modules: dict[str, Any] = {}
    for name in names:
        source = metric_path(name) if name in SHIPPED else name
        try:
            modules[name] = evaluate.load(source, keep_in_memory=True)  # in memory: no cache files per process
        except Exception as err:  # noqa: BLE001
            offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                          for v in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"))
            hint = (" (offline: only the shipped metrics and cached or local modules load)" if offline
                    and not os.path.exists(name) else "")
            raise MetricLoadError(f"--metrics: cannot load the evaluate module {name!r}{hint}: "
                                  f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; shipped "
                                  f"metrics: {', '.join(SHIPPED)}") from err
    return modules


def _takes_scores(module) -> bool:
    """Whether the module's ``predictions`` are per-class scores (a sequence feature) rather than class ids."""
    import datasets

    features = module.features if not isinstance(module.features, list) else module.features[0]
    return not isinstance(features["predictions"], datasets.Value)


def compute_metrics_fn(modules: dict[str, Any]) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for ``transformers.Trainer``: logits and labels -> every module's results, merged
    (a key two modules share is prefixed with the module's name). Class-id metrics get ``argmax`` of the logits,
    score metrics the logits."""
    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits)
        labels = np.asarray(labels).reshape(-1)
        preds = logits.argmax(-1)
        out: dict[str, float] = {}
        for name, module in modules.items():
            result = module.compute(predictions=logits if _takes_scores(module) else preds, references=labels)
            for key, value in (result or {}).items():
                label = key if key not in out else f"{os.path.basename(name.rstrip('/'))}_{key}"
                out[label] = float(value) if np.ndim(value) == 0 else value
        return out

    return compute_metrics
