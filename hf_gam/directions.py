"""The update direction of every ``gam_mode``, as pure functions of two gradient oracles.

Each function perturbs ``params`` in place between passes and always leaves them bit-for-bit as it found them
(also when an oracle raises). It returns ``(d, stats)``: the direction ``d`` (a new list of tensors, the caller puts
it into ``p.grad``) and a dict of 0-dim tensors worth logging (``loss``, ``grad_norm`` = ‖g(θ)‖, and where there is an
ascent point ``ascent_grad_norm`` = ‖g‖ there; ρ times it estimates the first-order flatness R1),
and ``direction_norm`` = ‖d‖ where the function has it anyway (the caller's finiteness check then needs no norm).

The oracles are how the world reaches the math (the big_vision GSAM pattern):

``grad_fn() -> (loss, g)``
    loss and gradient of the scope's mean loss at the *current* weights.
``grad_hvp_fn(v_fn) -> (loss, g, Hv)``
    the same, plus the exact Hessian-vector product ``H(θ) v`` with ``v = v_fn(g)`` built from that gradient.

Distributed contract: the direction is exact for whatever loss the oracles define. For a per-micro-batch ("local")
direction the oracles see one micro-batch on one process and the caller averages the directions; for a "global"
direction the oracles must return gradients (and HVPs) already averaged over every micro-batch and process (an
all-reduce inside the oracle), so every process computes the same perturbations and the same ``d``. Nothing here
communicates.

Rules (``../shared/ALGORITHMS.md``): ``sam``: ``g(θ + ρs g/(‖g‖+ξ))``; ``gnp``: ``g + α ρ H g/(‖g‖+ξ)``; ``gam``
(Algorithm 1): ``g + α ρ H(θa) ga/(‖ga‖+ξ)`` with ``θa = θ + ρ f/(‖f‖+ξ)``, ``f = H g/(‖g‖+ξ)``; ``gam_sam``: the same
with SAM's gradient in place of ``g``; ``gam_fast``: Algorithm 2. ``adaptive`` makes every ascent step ASAM's
``θ + r T² v/(‖T v‖+ξ)``, ``T = |θ|`` of the point being perturbed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import functional as F

GradFn = Callable[[], tuple[Tensor, list[Tensor]]]
GradHvpFn = Callable[[Callable[[list[Tensor]], list[Tensor]]], tuple[Tensor, list[Tensor], list[Tensor]]]

__all__ = ["sam_direction", "gnp_direction", "gam_direction", "gam_fast_direction", "MODES", "ModeSpec",
           "GAMHyper"]


@dataclass(frozen=True)
class GAMHyper:
    """The hyper-parameters of one step, in the paper's symbols (``GAMConfig.gam_hyper(lr)`` builds it from a
    config; a plain loop can build it directly). ``rho`` ρ, ``alpha`` α, ``sam_rho`` ρs, ``rho_prime`` ρ',
    ``beta`` β, ``gamma`` γ, ``eps`` ξ; ``variant`` is Algorithm 2's ``h-`` rule; ``adaptive`` ASAM steps."""

    mode: str = "gam"
    rho: float = 0.04
    alpha: float = 0.1
    sam_rho: float = 0.04
    rho_prime: float = 0.02
    beta: float = 0.5
    gamma: float = 0.03
    eps: float = 1e-12
    variant: str = "paper"
    adaptive: bool = False


class _Unit:
    """``v -> v / (‖v‖ + eps)``, keeping ``‖v‖`` (the caller logs it; no second norm)."""

    def __init__(self, eps: float):
        self.eps, self.norm = eps, None

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        self.norm = F.global_norm(v)
        return torch._foreach_div(v, (self.norm + self.eps).to(v[0].dtype))


def _ascend(params: Sequence[Tensor], v: list[Tensor], r: float, eps: float, adaptive: bool,
            consume: bool = False, norm: Tensor | None = None) -> None:
    """``θ <- θ + r v/(‖v‖+ξ)`` (or ASAM's rule) in place; with ``consume`` the step is built in ``v``'s storage
    (``v`` is garbage afterwards), saving a parameter-sized temporary; ``norm`` is ``‖v‖`` if already known."""
    weights = [p.detach() for p in params] if adaptive else None
    step = (F.ascent_step_ if consume else F.ascent_step)(v, r, eps, weights, norm=norm)
    F.add_(params, step)


def sam_direction(params: Sequence[Tensor], grad_fn: GradFn, *, rho: float, eps: float, adaptive: bool = False):
    """SAM (Foret et al. 2021): ``d = g(θ + ρ g/(‖g‖+ξ))``. Two passes."""
    loss, g = grad_fn()
    stats = {"loss": loss, "grad_norm": F.global_norm(g)}
    with F.weights_restored(params):
        _ascend(params, g, rho, eps, adaptive, consume=True, norm=stats["grad_norm"])
        del g
        _, g_sam = grad_fn()
    stats["ascent_grad_norm"] = stats["direction_norm"] = F.global_norm(g_sam)
    return g_sam, stats


def gnp_direction(params: Sequence[Tensor], grad_hvp_fn: GradHvpFn, *, rho: float, alpha: float, eps: float):
    """Gradient-norm penalty (GAM without the ascent, paper App. C "ρ = 0"): ``d = g + α ρ H g/(‖g‖+ξ)``
    (``H g/‖g‖ = ∇‖g‖``). One pass and one HVP; the weights are not moved."""
    unit = _Unit(eps)
    loss, g, f = grad_hvp_fn(unit)
    stats = {"loss": loss, "grad_norm": unit.norm}
    return F.gam_combine(g, torch._foreach_mul(f, rho), alpha), stats


def gam_direction(params: Sequence[Tensor], grad_fn: GradFn, grad_hvp_fn: GradHvpFn, *, rho: float, alpha: float,
                  eps: float, adaptive: bool = False, sam_rho: float | None = None):
    """GAM, Algorithm 1, with exact HVPs: ``f = H(θ) g/(‖g‖+ξ)``; ``θa = θ + ρ f/(‖f‖+ξ)``;
    ``h = ρ H(θa) ga/(‖ga‖+ξ)``; ``d = g + α h``. Two passes with an HVP each.

    With ``sam_rho`` (mode ``gam_sam``) the oracle gradient ``g`` in ``d`` is SAM's, ``g(θ + ρs g/(‖g‖+ξ))``:
    one more pass.
    """
    unit, unit_a = _Unit(eps), _Unit(eps)
    loss, g, f = grad_hvp_fn(unit)
    stats = {"loss": loss, "grad_norm": unit.norm}
    with F.weights_restored(params) as theta:
        if sam_rho is not None:
            _ascend(params, g, sam_rho, eps, adaptive, consume=True, norm=unit.norm)
            _, g = grad_fn()
            stats["sam_grad_norm"] = F.global_norm(g)
            F.copy_(params, theta)
        _ascend(params, f, rho, eps, adaptive, consume=True)
        del f
        _, ga, h = grad_hvp_fn(unit_a)
    stats["ascent_grad_norm"] = unit_a.norm
    del ga
    torch._foreach_mul_(h, rho)
    return F.gam_combine(g, h, alpha), stats


def gam_fast_direction(params: Sequence[Tensor], grad_fn: GradFn, *, rho: float, rho_prime: float, alpha: float,
                       beta: float, gamma: float, eps: float, variant: str = "paper", adaptive: bool = False):
    """Accelerated GAM, Algorithm 2: four first-order passes, no HVP.

    ``g0 = g(θ)``; ``g1 = g(θ + ρ' g0/(‖g0‖+ξ))``; ``θ2 = θ + ρ (g1-g0)/(‖g1-g0‖+ξ)``; ``g2 = g(θ2)``;
    ``g3 = g(θ2 + ρ' g2/(‖g2‖+ξ))``; then :func:`hf_gam.functional.fast_gam_combine`.
    Beyond the pass's own gradient it holds three parameter-sized buffers: the saved θ, ``h-`` (built in g0's
    storage) and ``h+`` (built in g1's).
    """
    loss, g0 = grad_fn()
    stats = {"loss": loss, "grad_norm": F.global_norm(g0)}
    with F.weights_restored(params) as theta:
        _ascend(params, g0, rho_prime, eps, adaptive, norm=stats["grad_norm"])
        _, g1 = grad_fn()
        F.copy_(params, theta)
        h0 = torch._foreach_sub(g1, g0)
        _ascend(params, h0, rho, eps, adaptive, consume=True)
        del h0
        _, g2 = grad_fn()
        stats["ascent_grad_norm"] = F.global_norm(g2)
        h_minus = F.h_minus_(g0, g2, beta, variant)
        _ascend(params, g2, rho_prime, eps, adaptive, consume=True, norm=stats["ascent_grad_norm"])
        del g2
        _, g3 = grad_fn()
    h_plus = F.h_plus_(g1, g3, alpha)
    del g3
    return F.fast_gam_final_(h_plus, h_minus, gamma, eps), stats


@dataclass(frozen=True)
class ModeSpec:
    """What a ``gam_mode`` costs and needs. ``passes``: forward+backward equivalents per micro-batch (an exact HVP
    counts as two); ``hvp``: whether it builds double-backward graphs (SDPA math kernel needed)."""

    passes: int
    hvp: bool
    summary: str


MODES: dict[str, ModeSpec] = {
    "none": ModeSpec(1, False, "plain gradient, identical to transformers.Trainer"),
    "sam": ModeSpec(2, False, "SAM: gradient at θ + ρs g/‖g‖"),
    "gnp": ModeSpec(3, True, "gradient-norm penalty g + αρ∇‖g‖ (1 pass + HVP)"),
    "gam": ModeSpec(6, True, "GAM, Algorithm 1 (2 passes + 2 HVPs)"),
    "gam_sam": ModeSpec(7, True, "GAM with SAM's oracle gradient (3 passes + 2 HVPs)"),
    "gam_fast": ModeSpec(4, False, "accelerated GAM, Algorithm 2 (4 passes)"),
}
