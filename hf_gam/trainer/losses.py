"""The losses of classification and regression heads, normalized the same way for every model and head.

transformers' sequence/image classification losses pick the head from ``config.problem_type`` (or infer it from
``num_labels`` and the labels' dtype): cross-entropy, BCE with logits (multi-label) or MSE (regression). Only the
cross-entropy honours ``num_items_in_batch``; :func:`summed_head_loss` sums every head's loss over exactly the label
elements the Trainer's ``num_items_in_batch`` counts (``labels.ne(-100)``), so ``sum / num_items_in_batch`` is the
accumulation window's mean loss for every head.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn
from transformers.loss.loss_utils import LOSS_MAPPING, ForSequenceClassificationLoss

__all__ = ["HEAD_LOSSES", "classifier_config", "fits_head", "problem_type", "summed_head_loss"]

HEAD_LOSSES = ("single_label_classification", "multi_label_classification", "regression")


@lru_cache(maxsize=1)
def _language_model_classes() -> frozenset[str]:
    """transformers' causal, masked and sequence-to-sequence LM classes (the Trainer's own causal-LM rule reads the
    same registry): some have no ``loss_type`` (``GPT2LMHeadModel``, ``XLNetLMHeadModel``, ``MarianMTModel``...)."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for mapping in ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"):
        for value in getattr(modeling_auto, mapping, {}).values():
            names.update(value if isinstance(value, (tuple, list)) else [value])
    return frozenset(names)


def classifier_config(model: nn.Module):
    """The config of a model with a classification / regression head (``num_labels`` and a ``problem_type`` of
    transformers' sequence/image classification losses), else ``None``. A model whose ``loss_type`` names another
    loss (causal LM, token classification, segmentation, detection, ...), or a language model of transformers'
    registry, keeps its own."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_labels", 0) < 1:
        return None
    if getattr(config, "problem_type", None) not in (None, *HEAD_LOSSES):
        return None
    loss = LOSS_MAPPING.get(getattr(model, "loss_type", None))
    if loss is not None and loss is not ForSequenceClassificationLoss:
        return None
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # PEFT
    if type(base).__name__ in _language_model_classes():
        return None
    return config


def fits_head(config, labels: Tensor) -> bool:
    """Whether ``labels`` have the shape of a classification / regression head's labels (one class id per row;
    one float per row, or per row and class): a per-token or per-pixel label (a language model's ``input_ids``, a
    segmentation map) does not, and keeps the model's own loss."""
    if labels.dtype in (torch.long, torch.int):
        return labels.dim() == 1
    return ((labels.dim() == 1 and config.num_labels == 1)
            or (labels.dim() == 2 and labels.shape[1] == config.num_labels))


def problem_type(config, labels: Tensor) -> str:
    """transformers' ``ForSequenceClassificationLoss`` rule (without writing it into the config)."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    return "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"


def summed_head_loss(problem_type: str, logits: Tensor, labels: Tensor, smoothing: float) -> Tensor:
    """Sum over the label elements that are not ``-100`` of the head's loss: cross-entropy (one label per row),
    binary cross-entropy with logits (multi-label, one float per class) or squared error (regression). The elements
    summed are exactly those the Trainer's ``num_items_in_batch`` counts (``labels.ne(-100).sum()``), so
    ``sum / num_items_in_batch`` is the window's mean loss for every head (the models' own BCE and MSE ignore
    ``num_items_in_batch``: an upstream defect not copied here). ``smoothing`` applies to the cross-entropy only
    (the Trainer also drops label smoothing for multi-label heads)."""
    labels = labels.to(logits.device)
    if problem_type == "single_label_classification":
        return torch_F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                     reduction="sum", label_smoothing=smoothing)
    logits, labels = logits.reshape(-1), labels.reshape(-1).to(logits.dtype)
    keep = labels.ne(-100)
    labels = torch.where(keep, labels, torch.zeros_like(labels))
    if problem_type == "multi_label_classification":
        per_element = torch_F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    else:
        per_element = torch_F.mse_loss(logits, labels, reduction="none")
    return (per_element * keep).sum()
