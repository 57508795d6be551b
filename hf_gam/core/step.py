"""The step: run a mode's passes through an oracle, check them, and leave the direction in ``p.grad``.

:func:`run_passes` is the dispatcher (the mode's direction function from the registry, with the step's safety
rules); :func:`apply_direction_step` is the step driver shared by ``GAMTrainer.training_step``, ``GAM.step`` and
custom loops: passes -> the parameters the loss reached -> ``p.grad += weight · S · d`` in the parameter's layout ->
the average over processes where the perturbation was local.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .collectives import (average_grads_over_processes_, local_view, local_views, reached_on_any_process,
                          sharded_like, summing_over_shards)
from .directions import MODES, GAMHyper
from .functional import global_norm
from .oracles import WindowOracle

__all__ = ["accumulate_grads_", "loss_scale_of", "compute_direction", "run_passes", "apply_direction_step"]


def accumulate_grads_(params: list[Tensor], d: list[Tensor], weight: Tensor | float, reached: list[bool]) -> None:
    """``p.grad += weight * d`` for the parameters the loss ``reached`` (the others keep ``p.grad`` as it is, as
    autograd leaves it: ``None`` means the optimizer skips them, no weight decay or momentum), keeping gradients
    of earlier micro-batches of an accumulation window; ``d`` is consumed (its tensors may become the
    gradients: no parameter-sized copy when the layouts match). A new ``p.grad`` gets
    the parameter's own layout, as autograd's accumulation gives it: ``autograd.grad`` can return another
    one (channels-last inputs, ``torch.compile``), which fused optimizers (transformers' default
    ``adamw_torch_fused``) would read as if it were the parameter's, stepping the wrong elements.
    FSDP2: ``d`` holds local shards; a new ``p.grad`` is the DTensor around them (no copy)."""
    with torch.no_grad():
        if not (isinstance(weight, (int, float)) and weight == 1):  # a weight of 1: no parameter-sized pass
            torch._foreach_mul_(d, torch.as_tensor(weight).to(d[0].device, d[0].dtype))
        have = [i for i, p in enumerate(params) if p.grad is not None and reached[i]]
        if have:
            torch._foreach_add_([local_view(params[i].grad) for i in have], [d[i] for i in have])
        for i in [i for i, p in enumerate(params) if p.grad is None and reached[i]]:
            p, di = params[i], d[i]
            shard = local_view(p)
            if di.dtype != shard.dtype or di.stride() != shard.stride():
                di = torch.empty_like(shard, memory_format=torch.preserve_format).copy_(di)
            p.grad = sharded_like(di, p)


def loss_scale_of(scaler, device: torch.device) -> float | None:
    """A GradScaler's current scale ``S`` (every pass's gradient is of ``S·L``), or ``None`` without an enabled one.
    The scaler creates its scale lazily in ``scale()``; ``unscale_`` and ``step`` need it, so it is created here."""
    if scaler is None or not scaler.is_enabled():
        return None
    if scaler._scale is None:
        scaler.scale(torch.ones((), device=device))
    return float(scaler.get_scale())


def compute_direction(hyper: GAMHyper, params: Sequence[Tensor], oracle) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Run ``hyper.mode``'s passes through ``oracle`` (its entry in :data:`hf_gam.core.directions.MODES`) and return
    ``(d, stats)``."""
    return MODES[hyper.mode].direction(hyper, params, oracle)


def run_passes(hyper: GAMHyper, params: Sequence[Tensor], oracle: WindowOracle,
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
    - FSDP2 (``oracle.shards``): the direction is computed on the local shards of ``params`` (views sharing their
      storage) with norms and inner products summed over the shards; ``d`` holds local shards.
    """
    # FSDP2: the math on local shards, norms and inner products over all of them
    with summing_over_shards(getattr(oracle, "shards", None)):
        return _checked_direction(hyper, local_views(params), oracle)


def _checked_direction(hyper: GAMHyper, params: list[Tensor], oracle: WindowOracle,
                       ) -> tuple[list[Tensor], dict[str, Tensor]]:
    try:
        d, stats = compute_direction(hyper, params, oracle)
        d_norm = stats.pop("direction_norm", None)
        clean_ok, all_ok = torch.stack([torch.isfinite(stats["grad_norm"]),
                                        torch.isfinite(global_norm(d) if d_norm is None else d_norm)]).tolist()
    except BaseException:
        oracle.close(failed=True)
        raise
    if clean_ok and all_ok:
        oracle.close()
        return d, stats
    if oracle.loss_scale is not None:
        oracle.close(failed=True)
        # inf in every tensor: the scaler must see it through whichever parameters the loss reached
        d = [torch.full_like(p, float("inf")) for p in params]
        return d, {"overflow": torch.ones(()), "loss": stats["loss"]}  # the clean pass's loss, as computed
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
    return d, {"loss": loss, "grad_norm": global_norm(d), "nonfinite_fallback": torch.ones(())}


def apply_direction_step(hyper: GAMHyper, params: Sequence[Tensor], oracle: WindowOracle, *,
                         weight: Tensor | float = 1.0, average_over_processes: bool = False,
                         ) -> dict[str, Tensor]:
    """One micro-batch's (or window's) share of the step, the same for every caller: run the passes
    (:func:`run_passes`), add ``weight · S · d`` to ``p.grad`` of the parameters the loss reached (``S`` the
    oracle's fp16 loss scale, 1 without one; ``p.grad`` stays scaled for the GradScaler's unscale), and, when
    ``average_over_processes`` (a local perturbation at the end of an accumulation window), average ``p.grad`` over
    processes as DDP would. Returns the passes' stats.

    A global oracle (``oracle.reduce``) already summed every pass over processes: the parameters reached anywhere
    get a gradient on every process, so all hold the same tensors. Gradients already in ``p.grad`` (earlier
    micro-batches of the window) are kept; callers that start a step afresh clear them first.
    """
    params = list(params)
    d, stats = run_passes(hyper, params, oracle)
    reached = reached_on_any_process(oracle.reached, params[0].device) if oracle.reduce else oracle.reached
    accumulate_grads_(params, d, weight if oracle.loss_scale is None else weight * oracle.loss_scale, reached)
    del d
    if average_over_processes:
        with torch.no_grad():
            average_grads_over_processes_(params)
    return stats
