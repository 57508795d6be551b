"""Gradient oracles: "the loss of these inputs at the current weights" turned into the gradients and
Hessian-vector products the direction functions of :mod:`hf_gam.core.directions` call, with everything a pass
through a real model needs around it.

- Exact HVP passes run under the SDPA math kernel (the fused kernels have no double backward), so ViT and Swin
  with their default attention work; gradients come from ``torch.autograd.grad`` (never
  ``backward(create_graph=True)``).
- BatchNorm running statistics come from the clean (first) pass only: :class:`BatchNormGuard` snapshots them and puts
  them back, also when a pass raises.
- Weights are restored bit-for-bit by the direction functions themselves
  (:func:`hf_gam.core.functional.weights_restored`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .collectives import all_reduce_, local_view, local_views, shard_layout, world_size
from .functional import hvp, second_order_context

LossFn = Callable[[], Tensor]
SHARDED_HVP_REASON = ("exact Hessian-vector products need double backward, which fully_shard (FSDP2) does not give "
                      "(the gradients come back None and carry no graph); use a first-order mode: sam or gam_fast")
SHARDED_LOCAL_REASON = "it needs each process's unsharded gradient; FSDP2 reduce-scatters it"

__all__ = ["BatchNormGuard", "WindowOracle", "MicroBatchOracle", "LossFn", "SHARDED_HVP_REASON",
           "SHARDED_LOCAL_REASON"]


class BatchNormGuard:
    """Snapshot and restore the running statistics of every BatchNorm layer that would update them
    (``running_mean``, ``running_var``, ``num_batches_tracked``). Cheap: BN buffers are tiny."""

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training]

    def _buffers(self) -> list[Tensor]:
        return [b for m in self.modules for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                if b is not None]

    def snapshot(self) -> list[Tensor]:
        with torch.no_grad():
            return [b.clone() for b in self._buffers()]

    def restore(self, saved: list[Tensor] | None) -> None:
        if saved is None:
            return
        with torch.no_grad():
            for b, s in zip(self._buffers(), saved):
                b.copy_(s)


class WindowOracle:
    """Gradient oracles for a global perturbation (``gam_perturbation="global"``): over the micro-batches
    ``batches`` of this process and, with ``reduce=True`` in a multi-process run, over those of every process: the
    loss is the item-weighted mean ``Σ n_i L_i / Σ n_i`` (``n_i = count_fn(batch_i)``, ``L_i = loss_fn(batch_i)``
    the mean loss of micro-batch ``i`` at the current weights), its gradient and HVPs are summed with one
    all-reduce per oracle call, so every process gets the same values whatever the world size and accumulation
    split.

    With one micro-batch and no reduction (:class:`MicroBatchOracle`) an HVP costs one pass; otherwise the
    gradient that defines ``v`` must be complete before any HVP, so an HVP point costs a gradient sweep and a
    graph-building sweep.

    The first call is the clean pass: it may update BatchNorm statistics; the statistics it leaves are snapshotted
    and later passes' changes are undone by :meth:`close` (call it in a ``finally``; after a failure it puts back
    the statistics of before the step). ``pass_context`` wraps every
    pass (e.g. ``accelerator.no_sync(model)``). ``passes`` counts the forward passes run.

    FSDP2 (``params`` sharded by ``fully_shard``, ``self.shards`` set): gradients come from ``backward()``, which FSDP
    reduce-scatters (:meth:`_sharded_sweep`); they are returned as local shards. Exact HVPs and a local perturbation
    are refused (``ValueError``). ``pass_context`` must then not skip FSDP's gradient sync: every pass needs the
    global gradient.
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor], batches: Sequence, loss_fn: Callable,
                 count_fn: Callable | None = None, *, reduce: bool = True, loss_scale: float | None = None,
                 pass_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.params = list(params)
        self.loss_scale = loss_scale
        self.batches = list(batches)
        self.loss_fn = loss_fn
        self.pass_context = pass_context
        self.reduce = reduce and world_size() > 1
        self.shards = shard_layout(self.params)
        if self.shards is not None and not self.reduce and world_size() > 1:
            raise ValueError(f"a local perturbation does not run under FSDP2: {SHARDED_LOCAL_REASON}")
        self.weights: list[Tensor] | None = None
        if self.reduce or len(self.batches) > 1:
            counts = torch.stack([torch.as_tensor(count_fn(b)).double().cpu() for b in self.batches])
            total = counts.sum()
            if self.reduce:
                total = total.to(self._device)
                all_reduce_([total])
                total = total.cpu()
            self.weights = list(counts / total)
        self.bn = BatchNormGuard(model)
        self._bn_before = self.bn.snapshot()  # pre-step statistics: put back if the step fails
        self._bn_clean: list[Tensor] | None = None  # after the clean pass: what a successful step keeps
        self.passes = 0
        self.reached = [False] * len(self.params)  # which parameters any pass's loss reached (others: no gradient)

    @property
    def _device(self) -> torch.device:
        return self.params[0].device

    def _combine(self, loss_parts: list[Tensor], parts: list[list[Tensor]]) -> tuple[Tensor, list[Tensor]]:
        """Item-weighted sum of per-micro-batch values, all-reduced when ``reduce``."""
        if self.weights is None:
            return loss_parts[0], parts[0]
        loss = sum(w.to(l.dtype) * l for w, l in zip(self.weights, loss_parts))
        for w, part in zip(self.weights, parts):  # the parts are this call's own gradients: weight them in place
            torch._foreach_mul_(part, w.to(part[0].device, part[0].dtype))
        total = parts[0]
        for part in parts[1:]:
            torch._foreach_add_(total, part)
        if self.reduce:
            all_reduce_([loss, *total])
        return loss, total

    def _unscale(self, tensors: list[Tensor]) -> list[Tensor]:
        """fp16: gradients of ``S·L`` back to gradients of ``L`` (norms and thresholds use unscaled values)."""
        if self.loss_scale is not None:
            torch._foreach_div_(tensors, self.loss_scale)
        return tensors

    def _after_call(self) -> None:
        """Snapshot BatchNorm statistics after the clean (first) call: what a successful step keeps."""
        if self._bn_clean is None:
            self._bn_clean = self.bn.snapshot()

    def _pass(self, batch, create_graph: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        self.passes += 1
        loss = self.loss_fn(batch)
        scaled = loss if self.loss_scale is None else loss * self.loss_scale
        g = torch.autograd.grad(scaled, self.params, create_graph=create_graph, allow_unused=True)
        return loss, self._materialize(g)

    def _materialize(self, g, like: Sequence[Tensor] | None = None) -> tuple[Tensor, ...]:
        """Zeros (shaped as ``like``, default the parameters) for the parameters the loss does not reach (the direction
        math needs every tensor), remembering which it did reach: the caller leaves the others' ``p.grad`` as
        ``None``, as autograd does, so the optimizer does not decay or move them."""
        out = []
        for i, (p, x) in enumerate(zip(self.params if like is None else like, g)):
            if x is None:
                out.append(torch.zeros_like(p))
            else:
                self.reached[i] = True
                out.append(x)
        return tuple(out)

    def _grad_sweep(self) -> tuple[Tensor, list[Tensor]]:
        if self.shards is not None:
            return self._sharded_sweep()
        losses, grads = [], []
        for batch in self.batches:
            with self.pass_context():
                loss, g = self._pass(batch, create_graph=False)
            losses.append(loss.detach())
            grads.append(list(g))
        loss, g = self._combine(losses, grads)
        return loss, self._unscale(g)

    def _sharded_sweep(self) -> tuple[Tensor, list[Tensor]]:
        """FSDP2: ``torch.autograd.grad`` on sharded parameters returns None (the graph's leaves are FSDP's unsharded
        copies), so every pass runs ``backward()``; FSDP reduce-scatters and averages the gradient over processes
        into ``p.grad``, so no gradient is all-reduced here. Micro-batch ``i``'s loss is weighted by its share times
        the process count (FSDP averages) and the gradients accumulate in ``p.grad``; only the loss is all-reduced.
        Returns this process's shards of the gradient; ``p.grad`` is left as it was (earlier micro-batches' share)."""
        kept = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        processes = world_size() if self.reduce else 1
        losses = []
        for i, batch in enumerate(self.batches):
            share = 1.0 if self.weights is None else float(self.weights[i]) * processes
            with self.pass_context():
                losses.append(self._backward_pass(batch, share * (self.loss_scale or 1.0)))
        grads = [None if p.grad is None else local_view(p.grad) for p in self.params]
        for p, k in zip(self.params, kept):
            p.grad = k
        g = list(self._materialize(grads, like=local_views(self.params)))
        loss = losses[0] if self.weights is None else sum(w.to(l.dtype) * l for w, l in zip(self.weights, losses))
        if self.reduce:
            all_reduce_([loss])
        return loss, self._unscale(g)

    def _backward_pass(self, batch, factor: float) -> Tensor:
        """One pass whose gradient lands in ``p.grad``: ``backward`` of ``factor`` times the loss. Returns the loss."""
        self.passes += 1
        loss = self.loss_fn(batch)
        (loss if factor == 1.0 else loss * factor).backward()
        return loss.detach()

    def grad(self) -> tuple[Tensor, list[Tensor]]:
        loss, g = self._grad_sweep()
        self._after_call()
        return loss, g

    def grad_hvp(self, v_fn: Callable[[list[Tensor]], list[Tensor]]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        if self.shards is not None:
            raise ValueError(f"exact-HVP modes do not run under FSDP2: {SHARDED_HVP_REASON}")
        if self.weights is None:  # one micro-batch, no reduction: gradient and HVP from one graph
            with self.pass_context(), second_order_context():
                loss, g = self._pass(self.batches[0], create_graph=True)
                g_detached = self._unscale([x.detach() for x in g])
                hv = self._unscale(hvp(g, self.params, v_fn(g_detached)))
                del g
            self._after_call()
            return loss.detach(), g_detached, hv
        loss, g = self._grad_sweep()
        self._after_call()
        v = v_fn(g)
        losses, hvs = [], []
        for batch in self.batches:
            with self.pass_context(), second_order_context():
                loss_i, g_i = self._pass(batch, create_graph=True)
                hvs.append(hvp(g_i, self.params, v))
                losses.append(loss_i.detach())
                del g_i
        _, hv = self._combine(losses, hvs)
        return loss, g, self._unscale(hv)

    def close(self, failed: bool = False) -> None:
        """Put back the BatchNorm statistics the clean pass left, or those of before the step when it ``failed``."""
        self.bn.restore(self._bn_before if failed or self._bn_clean is None else self._bn_clean)


class MicroBatchOracle(WindowOracle):
    """Oracles for a local perturbation (``gam_perturbation="local"``): over one micro-batch on this process only;
    ``loss_fn()`` is its mean loss at the current weights."""

    def __init__(self, model: nn.Module, params: Sequence[Tensor], loss_fn: LossFn, *,
                 loss_scale: float | None = None,
                 pass_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        super().__init__(model, params, [None], lambda _: loss_fn(), reduce=False, loss_scale=loss_scale,
                         pass_context=pass_context)
