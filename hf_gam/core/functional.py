"""Pure tensor math of GAM and its SAM relatives, on lists of tensors.

Every function here takes and returns lists of tensors (one per trainable parameter) and knows nothing about the
Trainer, accelerate or I/O. Sharded parameters (FSDP2 DTensors) are the one thing it knows of processes: copies
run shard by shard, and norms and inner products add their per-shard sums over the shards
(:mod:`hf_gam.core.collectives`), on DTensors or on local shards while ``summing_over_shards`` is active.

Names follow the paper (Zhang et al., "Gradient Norm Aware Minimization Seeks First-Order Flatness and Improves
Generalization", CVPR 2023): ``rho`` (ρ), ``rho_prime`` (ρ'), ``alpha`` (α), ``beta`` (β), ``gamma`` (γ), ``eps``
(ξ), ``g0..g3`` and ``h_plus`` / ``h_minus`` of Algorithm 2.

The kernels are ``torch._foreach_*`` (one launch per op for the whole list) where one exists; the tests check them
against a plain per-tensor loop in float64.

The mode-level algorithms (which passes, where to perturb) live in :mod:`hf_gam.core.directions`; they call these,
and this module imports only :mod:`hf_gam.core.collectives`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from .collectives import ShardLayout, active_shards, is_sharded, local_views, shard_layout, sum_over_shards

TensorList = list[Tensor]

__all__ = [
    "global_norm",
    "dot",
    "dots",
    "ascent_step",
    "ascent_step_",
    "add_",
    "copy_",
    "axpy",
    "hvp",
    "second_order_context",
    "gam_combine",
    "h_plus_",
    "h_minus_",
    "gam_fast_final_",
    "weights_restored",
]


def global_norm(tensors: Sequence[Tensor], weights: Sequence[Tensor] | None = None) -> Tensor:
    """L2 norm of all ``tensors`` taken together, ``‖v‖``; with ``weights`` the norm of ``|weights| * v`` (ASAM's
    ``‖T·v‖``). Returns a 0-dim tensor in the dtype of the first tensor (float32 at least, so bf16 norms do not
    round the threshold), on its device."""
    if len(tensors) == 0:
        raise ValueError("global_norm needs at least one tensor")
    tensors, layout = _as_shards(tensors)
    if weights is not None:
        tensors = torch._foreach_mul(torch._foreach_abs(_as_shards(weights)[0]), tensors)
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    norms = torch._foreach_norm(tensors)
    if any(n.dtype != dtype for n in norms):
        norms = [n.to(dtype) for n in norms]
    if layout is None:
        return torch.linalg.vector_norm(torch.stack(norms))
    # shards: their squared norms add up, in one collective
    return sum_over_shards(torch.stack(norms).square().sum().reshape(1), layout)[0].sqrt()


def _as_shards(tensors: Sequence[Tensor]) -> tuple[TensorList, ShardLayout | None]:
    """``tensors`` as plain tensors, with the layout whose shards they are: FSDP2 DTensors become their local
    shards; plain tensors are local shards while :func:`hf_gam.core.collectives.summing_over_shards` is active."""
    if is_sharded(tensors[0]):
        return local_views(tensors), shard_layout(tensors)
    return list(tensors), active_shards()


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Inner product ``<a, b>`` over all tensors together (a 0-dim tensor)."""
    return dots([(a, b)])[0]


def dots(pairs: Sequence[tuple[Sequence[Tensor], Sequence[Tensor]]]) -> Tensor:
    """The inner products ``<a, b>`` of several pairs, as a vector; over shards (FSDP2) the partial sums of all
    pairs are added in one collective."""
    layout, parts = None, []
    for a, b in pairs:
        (a, layout), (b, _) = _as_shards(a), _as_shards(b)
        parts.append(_local_dot(a, b))
    local = torch.stack(parts)
    return local if layout is None else sum_over_shards(local, layout)


def _local_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    dtype = torch.promote_types(a[0].dtype, torch.float32)
    def flat(t: Tensor) -> Tensor:
        return t.reshape(-1) if t.dtype == dtype else t.reshape(-1).to(dtype)

    # one reduction over the per-tensor products: half the kernels of a running sum
    return torch.stack([torch.vdot(flat(x), flat(y)) for x, y in zip(a, b, strict=True)]).sum()


def _ascent_scale(v: Sequence[Tensor], rho: float, eps: float, weights, norm: Tensor | None) -> Tensor:
    """``rho / (‖v‖ + eps)`` (``‖T v‖`` when adaptive), as a 0-dim tensor in ``v``'s dtype."""
    if norm is None or weights is not None:
        norm = global_norm(v, weights)
    return (rho / (norm + eps)).to(v[0].dtype)


def ascent_step(v: Sequence[Tensor], rho: float, eps: float, weights: Sequence[Tensor] | None = None,
                norm: Tensor | None = None) -> TensorList:
    """The perturbation ``e`` of an ascent step ``θ + e`` along ``v`` with radius ``rho``.

    Plain: ``e = rho * v / (‖v‖ + eps)``. Adaptive (ASAM, ``weights`` = the current weights θ, ``T = |θ|``):
    ``e = rho * T² v / (‖T v‖ + eps)``. A new list is returned; ``v`` is not modified.
    """
    if weights is None:  # the scaled copy in one kernel
        return torch._foreach_mul(list(v), _ascent_scale(v, rho, eps, None, norm))
    return ascent_step_(torch._foreach_mul(list(v), 1.0), rho, eps, weights, norm=norm)


def ascent_step_(v: list[Tensor], rho: float, eps: float, weights: Sequence[Tensor] | None = None,
                 norm: Tensor | None = None) -> TensorList:
    """:func:`ascent_step` computed in ``v``'s storage (no parameter-sized temporary in the plain case).
    ``norm``: ``‖v‖`` when the caller has it already (plain steps only; adaptive steps need ``‖T v‖``)."""
    scale = _ascent_scale(v, rho, eps, weights, norm)
    if weights is not None:
        torch._foreach_mul_(v, list(weights))
        torch._foreach_mul_(v, list(weights))
    torch._foreach_mul_(v, scale)
    return v


def add_(params: Sequence[Tensor], e: Sequence[Tensor]) -> None:
    """``params += e`` in place (one foreach kernel)."""
    with torch.no_grad():
        torch._foreach_add_(list(params), list(e))


def copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``dst[:] = src`` in place, bit for bit; FSDP2 DTensors shard by shard (``aten._foreach_copy_`` has no DTensor
    rule)."""
    with torch.no_grad():
        torch._foreach_copy_(local_views(dst), local_views(src))


def axpy(y: Sequence[Tensor], a: float | Tensor, x: Sequence[Tensor]) -> TensorList:
    """``y + a * x`` as a new list (``a`` a Python number or a 0-dim tensor)."""
    if isinstance(a, Tensor):
        return torch._foreach_add(list(y), torch._foreach_mul(list(x), a.to(x[0].dtype)))
    return torch._foreach_add(list(y), list(x), alpha=a)


def hvp(grads: Sequence[Tensor], params: Sequence[Tensor], v: Sequence[Tensor],
        retain_graph: bool = False) -> TensorList:
    """Exact Hessian-vector product ``H v`` by double backward: ``∇_θ <g(θ), v>``.

    ``grads`` must come from ``torch.autograd.grad(loss, params, create_graph=True)`` (never from
    ``backward(create_graph=True)``, which leaks through a parameter-gradient cycle); ``v`` is treated as a constant.
    Parameters whose gradient is constant (no second-order path) get an exact zero. The graph is freed unless
    ``retain_graph`` (for more products with the same ``grads``). Run it under :func:`second_order_context`.
    """
    idx = [i for i, g in enumerate(grads) if g.requires_grad]
    if not idx:
        return [torch.zeros_like(p) for p in params]
    parts = torch.autograd.grad([grads[i] for i in idx], list(params), grad_outputs=[v[i].detach() for i in idx],
                                retain_graph=retain_graph, allow_unused=True, materialize_grads=True)
    return [p.detach() for p in parts]


def gam_combine(g: Sequence[Tensor], h: Sequence[Tensor], alpha: float) -> TensorList:
    """Algorithm 1's direction ``d = g + alpha * h`` (``h`` already carries its factor ρ)."""
    return axpy(g, alpha, h)


def h_plus_(g1: list[Tensor], g3: Sequence[Tensor], alpha: float) -> list[Tensor]:
    """``h+ = α g1 + (1-α) g3`` (Eq. 45), built in ``g1``'s storage and returned."""
    torch._foreach_mul_(g1, alpha)
    torch._foreach_add_(g1, list(g3), alpha=1.0 - alpha)
    return g1


def h_minus_(g0: list[Tensor], g2: Sequence[Tensor], beta: float, variant: str = "paper") -> list[Tensor]:
    """``h- = β g0 + (1-β) g2`` (``variant="paper"``, Eq. 45) or ``h- = g0 + |1-β| g2`` (``variant="official"``, the
    released code's rule), built in ``g0``'s storage and returned. (``GAMHyper`` checks ``variant`` before any pass.)"""
    if variant == "official":
        torch._foreach_add_(g0, list(g2), alpha=abs(1.0 - beta))
    else:
        torch._foreach_mul_(g0, beta)
        torch._foreach_add_(g0, list(g2), alpha=1.0 - beta)
    return g0


def gam_fast_final_(h_plus: list[Tensor], h_minus: Sequence[Tensor], gamma: float, eps: float) -> list[Tensor]:
    """``d = h+ - γ h-⊥`` (Algorithm 2, lines 15-16) with ``h-⊥ = h- - (<h-, h+> / (‖h+‖² + ξ)) h+`` the part of
    ``h-`` orthogonal to ``h+``; built in ``h_plus``'s storage and returned."""
    inner, square = dots([(h_minus, h_plus), (h_plus, h_plus)])  # one collective over shards
    coef = inner / (square + eps)
    # d = h+ - γ h- + γ coef h+ = (1 + γ coef) h+ - γ h-
    torch._foreach_mul_(h_plus, (1.0 + gamma * coef).to(h_plus[0].dtype))
    torch._foreach_add_(h_plus, list(h_minus), alpha=-gamma)
    return h_plus


@contextmanager
def weights_restored(params: Sequence[Tensor]):
    """Keep a copy of ``params`` and copy it back on exit, also when the body raises: the weights are bit-for-bit
    what they were (``θ + e - e`` is not ``θ`` in floating point). Yields the copy (read-only by contract)."""
    with torch.no_grad():
        backup = [p.detach().clone() for p in params]
    try:
        yield backup
    finally:
        copy_(params, backup)


@contextmanager
def second_order_context():
    """Context for passes that build a double-backward graph (exact HVPs): the SDPA math kernel, the only one with a
    double backward on CPU and CUDA, so ViT and Swin attention work. Used by the pass runner and the flatness
    diagnostics alike."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield
