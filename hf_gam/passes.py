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
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import directions as D
from . import functional as GF
from .functional import second_order_context  # the one definition; importable from here too

LossFn = Callable[[], Tensor]

__all__ = ["accumulate_grads_", "all_reduce_", "loss_scale_of", "reached_on_any_process", "second_order_context", "BatchNormGuard", "WindowOracle", "MicroBatchOracle", "compute_direction", "run_passes"]


def all_reduce_(tensors: list[Tensor], mean: bool = False) -> None:
    """Sum (or average) ``tensors`` over all processes in place: one flattened collective per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = defaultdict(list)
    for t in tensors:
        by_dtype[t.dtype].append(t)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors(group)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if mean:
            flat /= dist.get_world_size()
        for t, r in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(r)


def reached_on_any_process(reached: list[bool], device: torch.device) -> list[bool]:
    """``reached`` or-ed over all processes (one tiny all-reduce in a multi-process run), so that every process
    writes and all-reduces the gradients of the same parameters."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(reached)
    flags = torch.tensor(reached, dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(f) for f in flags.tolist()]


def accumulate_grads_(params: list[Tensor], d: list[Tensor], weight: Tensor | float, reached: list[bool]) -> None:
    """``p.grad += weight * d`` for the parameters the loss ``reached`` (the others keep ``p.grad`` as it is, as
    autograd leaves it: ``None`` means the optimizer skips them, no weight decay or momentum), keeping gradients
    of earlier micro-batches of an accumulation window; ``d`` is consumed (its tensors may become the
    gradients: no parameter-sized copy when the layouts match). A new ``p.grad`` gets
    the parameter's own layout, as autograd's accumulation gives it: ``autograd.grad`` can return another
    one (channels-last inputs, ``torch.compile``), which fused optimizers (transformers' default
    ``adamw_torch_fused``) would read as if it were the parameter's, stepping the wrong elements."""
    with torch.no_grad():
        torch._foreach_mul_(d, torch.as_tensor(weight).to(d[0].device, d[0].dtype))
        have = [i for i, p in enumerate(params) if p.grad is not None and reached[i]]
        if have:
            torch._foreach_add_([params[i].grad for i in have], [d[i] for i in have])
        for i in [i for i, p in enumerate(params) if p.grad is None and reached[i]]:
            p, di = params[i], d[i]
            if di.dtype == p.dtype and di.stride() == p.stride():
                p.grad = di
            else:
                p.grad = torch.empty_like(p, memory_format=torch.preserve_format).copy_(di)


def loss_scale_of(scaler, device: torch.device) -> float | None:
    """A GradScaler's current scale ``S`` (every pass's gradient is of ``S·L``), or ``None`` without an enabled one.
    The scaler creates its scale lazily in ``scale()``; ``unscale_`` and ``step`` need it, so it is created here."""
    if scaler is None or not scaler.is_enabled():
        return None
    if scaler._scale is None:
        scaler.scale(torch.ones((), device=device))
    return float(scaler.get_scale())


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
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor], batches: Sequence, loss_fn: Callable,
                 count_fn: Callable | None = None, *, reduce: bool = True, loss_scale: float | None = None,
                 pass_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.params = list(params)
        self.loss_scale = loss_scale
        self.batches = list(batches)
        self.loss_fn = loss_fn
        self.pass_context = pass_context
        self.reduce = reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
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

    def _materialize(self, g) -> tuple[Tensor, ...]:
        """Zeros for the parameters the loss does not reach (the direction math needs every tensor), remembering
        which it did reach: the caller leaves the others' ``p.grad`` as ``None``, as autograd does, so the optimizer
        does not decay or move them."""
        out = []
        for i, (p, x) in enumerate(zip(self.params, g)):
            if x is None:
                out.append(torch.zeros_like(p))
            else:
                self.reached[i] = True
                out.append(x)
        return tuple(out)

    def _grad_sweep(self) -> tuple[Tensor, list[Tensor]]:
        losses, grads = [], []
        for batch in self.batches:
            with self.pass_context():
                loss, g = self._pass(batch, create_graph=False)
            losses.append(loss.detach())
            grads.append(list(g))
        loss, g = self._combine(losses, grads)
        return loss, self._unscale(g)

    def grad(self) -> tuple[Tensor, list[Tensor]]:
        loss, g = self._grad_sweep()
        self._after_call()
        return loss, g

    def grad_hvp(self, v_fn: Callable[[list[Tensor]], list[Tensor]]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        if self.weights is None:  # one micro-batch, no reduction: gradient and HVP from one graph
            with self.pass_context(), second_order_context():
                loss, g = self._pass(self.batches[0], create_graph=True)
                g_detached = self._unscale([x.detach() for x in g])
                hv = self._unscale(GF.hvp(g, self.params, v_fn(g_detached)))
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
                hvs.append(GF.hvp(g_i, self.params, v))
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


def compute_direction(hyper: D.GAMHyper, params: Sequence[Tensor], oracle) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Run ``hyper.mode``'s passes through ``oracle`` (its entry in :data:`hf_gam.directions.MODES`) and return
    ``(d, stats)``."""
    spec = D.MODES.get(hyper.mode)
    if spec is None:
        raise ValueError(f"gam_mode must be one of {', '.join(D.MODES)}; got {hyper.mode!r}")
    return spec.direction(hyper, params, oracle)


def run_passes(hyper: D.GAMHyper, params: Sequence[Tensor], oracle: WindowOracle,
               ) -> tuple[list[Tensor], dict[str, Tensor]]:
    """:func:`compute_direction` with the step's safety rules, then the oracle's BatchNorm clean-up.

    - A pass raises: weights are already restored (the direction functions), BatchNorm statistics go back to
      their pre-step values, the exception propagates.
    - Finiteness is read once per step (one host sync) from two norms the step has anyway: ‖g(θ)‖ of the clean
      pass and ‖d‖ (a non-finite value in any later pass reaches ``d`` through the ascent points or the
      combination).
    - fp16 (``oracle.loss_scale`` set) and anything overflows: the direction is ``inf`` so the GradScaler skips
      the whole step (and the scheduler with it) and lowers the scale; ``stats["overflow"] = 1``.
    - Otherwise a non-finite perturbed pass: the step falls back to the clean gradient
      (``stats["nonfinite_fallback"] = 1``); a non-finite clean pass: ``FloatingPointError`` naming it.
    """
    try:
        d, stats = compute_direction(hyper, params, oracle)
        d_norm = stats.pop("direction_norm", None)
        clean_ok, all_ok = torch.stack([torch.isfinite(stats["grad_norm"]),
                                        torch.isfinite(GF.global_norm(d) if d_norm is None else d_norm)]).tolist()
    except BaseException:
        oracle.close(failed=True)
        raise
    if clean_ok and all_ok:
        oracle.close()
        return d, stats
    if oracle.loss_scale is not None:
        oracle.close(failed=True)
        d = [torch.zeros_like(p) for p in params]
        d[0].fill_(float("inf"))
        return d, {"overflow": torch.ones(()), "loss": torch.tensor(float("nan"))}
    if not clean_ok:
        oracle.close(failed=True)
        raise FloatingPointError(
            f"gam_mode={hyper.mode!r}: the clean pass (pass 1, the gradient at the current weights) produced a "
            "non-finite gradient; lower the learning rate or check the data")
    try:
        loss, d = oracle.grad()  # the clean gradient again, at the restored weights
    except BaseException:
        oracle.close(failed=True)
        raise
    oracle.close()
    return d, {"loss": loss, "grad_norm": GF.global_norm(d), "nonfinite_fallback": torch.ones(())}
