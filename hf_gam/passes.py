"""The pass runner: turns "the loss of these inputs at the current weights" into the gradient oracles of
:mod:`hf_gam.directions`, with everything a pass through a real model needs around it.

- Exact HVP passes run under the SDPA math kernel (the fused kernels have no double backward), so ViT and Swin
  with their default attention work; gradients come from ``torch.autograd.grad`` (never
  ``backward(create_graph=True)``).
- BatchNorm running statistics come from the clean (first) pass only: :class:`BatchNormGuard` snapshots them and puts
  them back, also when a pass raises.
- Weights are restored bit-for-bit by the direction functions themselves (:func:`hf_gam.functional.weights_restored`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import directions as D
from . import functional as F

LossFn = Callable[[], Tensor]

__all__ = ["second_order_context", "BatchNormGuard", "MicroBatchOracle", "compute_direction"]


def second_order_context() -> contextlib.AbstractContextManager:
    """Context for passes that build a double-backward graph: the SDPA math kernel (the only one with a double
    backward on CPU and CUDA)."""
    return sdpa_kernel([SDPBackend.MATH])


class BatchNormGuard:
    """Snapshot and restore the running statistics of every BatchNorm layer that would update them
    (``running_mean``, ``running_var``, ``num_batches_tracked``). Cheap: BN buffers are tiny."""

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training]
        self._saved: list[list[Tensor]] | None = None

    def _buffers(self, m: nn.Module) -> list[Tensor]:
        return [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]

    def snapshot(self) -> None:
        with torch.no_grad():
            self._saved = [[b.clone() for b in self._buffers(m)] for m in self.modules]

    def restore(self) -> None:
        if self._saved is None:
            return
        with torch.no_grad():
            for m, saved in zip(self.modules, self._saved):
                for b, s in zip(self._buffers(m), saved):
                    b.copy_(s)


class MicroBatchOracle:
    """Gradient oracles over one micro-batch (``loss_fn`` = its mean loss at the current weights).

    The first pass is the clean one: it may update BatchNorm statistics; the statistics it leaves are snapshotted
    and every later pass's changes are undone by :meth:`close` (the caller's ``finally``). ``pass_context`` wraps
    every pass (e.g. ``accelerator.no_sync(model)``). ``passes`` counts the forward passes run.
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor], loss_fn: LossFn,
                 pass_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.params = list(params)
        self.loss_fn = loss_fn
        self.pass_context = pass_context
        self.bn = BatchNormGuard(model)
        self.bn.snapshot()  # pre-step statistics: restored if the clean pass itself fails
        self.passes = 0
        self._clean_done = False

    def _after_pass(self) -> None:
        self.passes += 1
        if not self._clean_done:
            self._clean_done = True
            self.bn.snapshot()  # statistics after the clean pass: what the step keeps

    def grad(self) -> tuple[Tensor, list[Tensor]]:
        with self.pass_context():
            loss = self.loss_fn()
            g = torch.autograd.grad(loss, self.params, allow_unused=True, materialize_grads=True)
        self._after_pass()
        return loss.detach(), list(g)

    def grad_hvp(self, v_fn: Callable[[list[Tensor]], list[Tensor]]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        with self.pass_context(), second_order_context():
            loss = self.loss_fn()
            g = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True)
            g_detached = [x.detach() for x in g]
            hv = F.hvp(g, self.params, v_fn(g_detached))
            del g
        self._after_pass()
        return loss.detach(), g_detached, hv

    def close(self) -> None:
        """Put back the BatchNorm statistics of the clean pass (or of before the step, if it never finished)."""
        self.bn.restore()


def compute_direction(args, params: Sequence[Tensor], oracle) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Run ``args.gam_mode``'s passes through ``oracle`` and return ``(d, stats)``. ``args`` is a
    :class:`~hf_gam.GAMConfig` (or anything with its ``gam_*`` attributes)."""
    mode = args.gam_mode
    common = {"eps": args.gam_eps}
    if mode == "none":
        loss, g = oracle.grad()
        return g, {"loss": loss, "grad_norm": F.global_norm(g)}
    if mode == "sam":
        return D.sam_direction(params, oracle.grad, rho=args.sam_rho, adaptive=args.gam_adaptive, **common)
    if mode == "gnp":
        return D.gnp_direction(params, oracle.grad_hvp, rho=args.gam_rho, alpha=args.gam_alpha, **common)
    if mode in ("gam", "gam_sam"):
        return D.gam_direction(params, oracle.grad, oracle.grad_hvp, rho=args.gam_rho, alpha=args.gam_alpha,
                               adaptive=args.gam_adaptive, sam_rho=args.sam_rho if mode == "gam_sam" else None,
                               **common)
    if mode == "gam_fast":
        return D.gam_fast_direction(params, oracle.grad, rho=args.gam_rho, rho_prime=args.gam_rho_prime,
                                    alpha=args.gam_alpha, beta=args.gam_beta, gamma=args.gam_gamma,
                                    variant=args.gam_fast_variant, adaptive=args.gam_adaptive, **common)
    raise ValueError(f"gam_mode must be one of {', '.join(D.MODES)}; got {mode!r}")
