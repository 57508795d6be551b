"""The measurement machinery every flatness diagnostic shares (internal to :mod:`hf_gam.flatness`).

- :class:`Objective`: ``L(θ) = Σ_b w_b L_b(θ)`` over fixed, materialized batches; its loss, gradient, exact
  Hessian-vector products (:func:`hf_gam.core.functional.hvp` under :func:`hf_gam.core.functional.second_order_context`),
  seeded random vectors and :meth:`Objective.set_weights` (``θ + Σ a·d`` from the saved ``θ``).
- :func:`measured`: the context that yields an :class:`Objective` and leaves the model exactly as it was.
- :func:`check_argument`, :func:`check_ascent_arguments`: a clear ``ValueError`` naming the argument and its value.
- :func:`normalized`, :func:`batch_size`, :func:`default_loss`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

from ..core import functional

__all__ = ["LossFn", "Objective", "measured", "check_argument", "check_ascent_arguments", "normalized",
           "batch_size", "default_loss"]

LossFn = Callable[[nn.Module, Mapping[str, Any]], Tensor]


def default_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """The model's ``loss`` output when its ``forward`` takes ``labels`` and returns one; else the cross-entropy
    (mean, ``ignore_index=-100``) of its logits (``.logits``, ``["logits"]``, a bare tensor or ``out[0]``)."""
    labels = batch.get("labels")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    takes_labels = "labels" in inspect.signature(model.forward).parameters
    out = model(**inputs, labels=labels) if labels is not None and takes_labels else model(**inputs)
    if isinstance(out, Mapping) and out.get("loss") is not None:
        return out["loss"]
    if isinstance(out, Mapping):
        logits = out["logits"]
    else:  # a bare tensor, an object with .logits, or a tuple of (logits, ...)
        logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
        logits = out[0] if logits is None else logits
    if labels is None:
        raise ValueError("batches need 'labels' when the model does not return a loss")
    return torch_F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def batch_size(batch: Mapping[str, Any]) -> int:
    """The number of examples in ``batch``: the length of ``labels`` or of its first non-scalar tensor."""
    for v in (batch.get("labels"), *batch.values()):
        if isinstance(v, Tensor) and v.ndim > 0:
            return v.shape[0]
    return 1


def check_argument(name: str, value, ok: bool, need: str) -> None:
    """Raise ``ValueError("{name} must be {need}; got {value!r}")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} must be {need}; got {value!r}")


def check_ascent_arguments(rho, num_steps, step_size) -> None:
    """Validate the settings of the first- and zeroth-order flatness ascent."""
    check_argument("rho", rho, isinstance(rho, numbers.Real) and math.isfinite(rho) and rho >= 0, "finite and >= 0")
    check_argument("num_steps", num_steps, isinstance(num_steps, int) and num_steps >= 1, "an int >= 1")
    check_argument("step_size", step_size, step_size is None or step_size > 0, "None or > 0")


def normalized(v: list[Tensor]) -> tuple[list[Tensor], float]:
    """``(v / ‖v‖, ‖v‖)``; ``v`` itself when its norm is zero."""
    norm = functional.global_norm(v)
    return (torch._foreach_div(v, norm.to(v[0].dtype)) if norm > 0 else v), float(norm)


class Objective:
    """``L(θ) = Σ_b w_b L_b(θ)`` over fixed batches (``w_b`` = batch size / total), its gradient and exact HVPs.
    ``backup`` (the saved weights ``θ``) is set by :func:`measured`."""

    backup: list[Tensor]

    def __init__(self, model: nn.Module, batches: Iterable[Mapping[str, Any]], loss_fn: LossFn | None):
        self.model, self.loss_fn = model, loss_fn or default_loss
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no parameters with requires_grad=True")
        batches = list(batches) if batches is not None else []
        if not batches:
            raise ValueError(f"batches must hold at least one batch; got {len(batches)}")
        device = self.params[0].device
        self.batches = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in b.items()} for b in batches]
        sizes = [batch_size(b) for b in self.batches]
        self.weights = [s / sum(sizes) for s in sizes]

    def _loss(self, i: int) -> Tensor:
        return self.loss_fn(self.model, self.batches[i]) * self.weights[i]

    def loss(self) -> float:
        with torch.no_grad():
            return float(sum(self._loss(i).detach().double() for i in range(len(self.batches))))

    def loss_and_grad(self) -> tuple[float, list[Tensor]]:
        total, g = 0.0, [torch.zeros_like(p) for p in self.params]
        for i in range(len(self.batches)):
            loss = self._loss(i)
            gi = torch.autograd.grad(loss, self.params, allow_unused=True, materialize_grads=True)
            torch._foreach_add_(g, list(gi))
            total += float(loss.detach())
        return total, g

    def hvps(self, vs: list[list[Tensor]]) -> list[list[Tensor]]:
        """``[H v for v in vs]`` by :func:`hf_gam.core.functional.hvp`; one graph per batch serves every vector."""
        out = [[torch.zeros_like(p) for p in self.params] for _ in vs]
        with functional.second_order_context():
            for i in range(len(self.batches)):
                g = torch.autograd.grad(self._loss(i), self.params, create_graph=True, allow_unused=True,
                                        materialize_grads=True)
                for n, v in enumerate(vs):
                    torch._foreach_add_(out[n], functional.hvp(g, self.params, v, retain_graph=n < len(vs) - 1))
                del g
        return out

    def randn(self, gen: torch.Generator, rademacher: bool = False) -> list[Tensor]:
        """A random vector shaped like the parameters (standard normal, or Rademacher), from ``gen`` on the CPU."""
        if rademacher:
            return [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in self.params]
        return [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in self.params]

    def set_weights(self, *eps: tuple[float, list[Tensor]]) -> None:
        """Set the weights to ``θ + Σ a·d`` for ``(a, d)`` in ``eps``, from the saved ``θ`` (so no drift)."""
        functional.copy_(self.params, self.backup)
        for a, d in eps:
            functional.add_(self.params, torch._foreach_mul(d, a))


@contextlib.contextmanager
def measured(model: nn.Module, batches, loss_fn, train_mode: bool, seed: int):
    """Yield an :class:`Objective` with the model in the requested mode; put everything back on exit (weights bit
    for bit, train/eval flags, buffers, the global RNG streams)."""
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}")
    obj = Objective(model, batches, loss_fn)
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in obj.params if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), functional.weights_restored(obj.params) as obj.backup:
            torch.default_generator.manual_seed(seed)  # dropout masks under train_mode; the forked state is dropped
            for i in devices:
                torch.cuda.default_generators[i].manual_seed(seed)
            model.train(train_mode)
            yield obj
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
