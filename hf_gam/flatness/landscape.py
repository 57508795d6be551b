"""Loss landscapes along random (filter-normalized) directions (Li et al., 2018; the paper's Section 5.6), on the
measurement machinery shared by the flatness diagnostics (:mod:`hf_gam.flatness._objective`: materialized batches,
the model left exactly as it was, eval mode by default, deterministic under ``seed``)."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor, nn

from . import defaults
from ._objective import LossFn, Objective, check_argument, measured, normalized

__all__ = ["loss_landscape", "filter_normalized_direction"]


def filter_normalized_direction(obj: Objective, gen: torch.Generator, ignore_1d: bool) -> list[Tensor]:
    """A random direction with each filter (slice along dim 0) scaled to the norm of the weights' filter (Li et
    al., 2018); 1-D parameters (biases, norm scales) get zero when ``ignore_1d``, else their own norm."""
    def norm(t: Tensor) -> Tensor:
        return torch.linalg.vector_norm(t.detach(), dim=tuple(range(1, t.ndim)) or None, keepdim=t.ndim > 1)

    return [torch.zeros_like(p) if p.ndim <= 1 and ignore_1d else d * (norm(p) / norm(d).clamp_min(1e-30))
            for d, p in zip(obj.randn(gen), obj.params)]


def loss_landscape(model: nn.Module, batches, *, dim: int = defaults.LANDSCAPE_DIM,
                   resolution: int = defaults.LANDSCAPE_RESOLUTION, span: float = defaults.LANDSCAPE_SPAN,
                   filter_normalize: bool = True, ignore_1d: bool = True, seed: int = defaults.SEED,
                   train_mode: bool = defaults.TRAIN_MODE, loss_fn: LossFn | None = None) -> dict[str, Any]:
    """Loss along ``dim`` (1 or 2) random directions (Li et al., 2018; the paper's Figure 5):
    ``L(θ + a·d1 + b·d2)`` for ``a, b`` on ``resolution`` evenly spaced points in ``[-span, span]``. With
    ``filter_normalize`` each filter of a direction has the norm of the matching filter of ``θ`` (1-D parameters:
    zero when ``ignore_1d``, else scaled to their own norm); without it, a direction is a random unit vector.
    Returns ``{"dim", "coords", "losses"}`` (``losses``: a list, or a list of rows indexed ``[b][a]`` for 2-D)
    plus ``"center_loss"`` and the settings."""
    check_argument("dim", dim, dim in (1, 2), "1 or 2")
    check_argument("resolution", resolution, isinstance(resolution, int) and resolution >= 2, "an int >= 2")
    check_argument("span", span, isinstance(span, numbers.Real) and span > 0, "> 0")
    gen = torch.Generator().manual_seed(seed)
    coords = torch.linspace(-span, span, resolution, dtype=torch.float64).tolist()
    with measured(model, batches, loss_fn, train_mode, seed) as obj:
        dirs = [filter_normalized_direction(obj, gen, ignore_1d) if filter_normalize
                else normalized(obj.randn(gen))[0] for _ in range(dim)]
        center = obj.loss()

        def at(*ab: float) -> float:
            obj.set_weights(*zip(ab, dirs))
            return obj.loss()

        losses = [at(a) for a in coords] if dim == 1 else [[at(a, b) for a in coords] for b in coords]
    return {"dim": dim, "coords": coords, "losses": losses, "center_loss": center, "span": span,
            "resolution": resolution, "filter_normalize": filter_normalize, "ignore_1d": ignore_1d, "seed": seed,
            "train_mode": train_mode}
