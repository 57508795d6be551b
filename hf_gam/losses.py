"""The losses of classification and regression heads, normalized the same way for every model and head.

transformers' sequence/image classification losses pick the head from ``config.problem_type`` (or infer it from
``num_labels`` and the labels' dtype): cross-entropy, BCE with logits (multi-label) or MSE (regression). Only the
cross-entropy honours ``num_items_in_batch``; :func:`summed_head_loss` sums every head's loss over exactly the label
elements the Trainer's ``num_items_in_batch`` counts (``labels.ne(-100)``), so ``sum / num_items_in_batch`` is the
accumulation window's mean loss for every head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn
from transformers.loss.loss_utils import LOSS_MAPPING, ForSequenceClassificationLoss

__all__ = ["HEAD_LOSSES", "classifier_config", "fits_head", "problem_type", "summed_head_loss"]

HEAD_LOSSES = ("single_label_classification", "multi_label_classification", "regression")


def classifier_config(model: nn.Module):
    """The config of a model with a classification / regression head (``num_labels`` and a ``problem_type`` of
    transformers' sequence/image classification losses), else ``None``. A model whose ``loss_type`` names another
    loss (causal LM, token classification, segmentation, detection, ...) keeps its own."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_labels", 0) < 1:
        return None
    if getattr(config, "problem_type", None) not in (None, *HEAD_LOSSES):
        return None
    loss = LOSS_MAPPING.get(getattr(model, "loss_type", None))
    if loss is not None and loss is not ForSequenceClassificationLoss:
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
