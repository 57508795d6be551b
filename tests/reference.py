"""An independent float64 transcription of docs/algorithms.md on flat parameter vectors, with explicit Hessians.

Nothing here imports hf_gam: it is what the library is checked against. ``loss_of(model, batches)`` turns a model
and its micro-batches into ``L(θ)`` of a flat vector; every rule below is written from the paper's formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).clone()


def loss_of(model, batch):
    """``L(θ)``: mean cross-entropy of ``batch`` as a function of the flat trainable parameters."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in model.named_parameters() if p.requires_grad]
    x, y = batch["pixel_values"], batch["labels"]

    def L(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            params[n] = theta[i:i + k].view(s)
            i += k
        logits = functional_call(model, params, (x,)).logits
        return F.cross_entropy(logits, y)

    return L


def grad(L, theta):
    return torch.autograd.functional.jacobian(L, theta)


def hessian(L, theta):
    return torch.autograd.functional.hessian(L, theta)


def ascend(theta, v, r, xi, adaptive):
    if adaptive:
        t = theta.abs()
        return theta + r * t * t * v / ((t * v).norm() + xi)
    return theta + r * v / (v.norm() + xi)


def direction(mode, L, theta, *, rho, alpha, sam_rho=None, rho_prime=0.02, beta=0.5, gamma=0.03, xi=1e-12,
              variant="paper", adaptive=False):
    """The direction ``d`` of ``mode`` at ``theta`` (docs/algorithms.md), HVPs as explicit Hessian products."""
    sam_rho = rho if sam_rho is None else sam_rho
    g = grad(L, theta)
    if mode == "none":
        return g
    if mode == "sam":
        return grad(L, ascend(theta, g, sam_rho, xi, adaptive))
    if mode == "gnp":
        H = hessian(L, theta)
        return g + alpha * rho * (H @ g) / (g.norm() + xi)
    if mode in ("gam", "gam_sam"):
        H = hessian(L, theta)
        f = H @ g / (g.norm() + xi)
        theta_a = ascend(theta, f, rho, xi, adaptive)
        ga = grad(L, theta_a)
        h = rho * hessian(L, theta_a) @ ga / (ga.norm() + xi)
        oracle = g if mode == "gam" else grad(L, ascend(theta, g, sam_rho, xi, adaptive))
        return oracle + alpha * h
    if mode == "gam_fast":
        g0 = g
        g1 = grad(L, ascend(theta, g0, rho_prime, xi, adaptive))
        theta2 = ascend(theta, g1 - g0, rho, xi, adaptive)
        g2 = grad(L, theta2)
        g3 = grad(L, ascend(theta2, g2, rho_prime, xi, adaptive))
        h_plus = alpha * g1 + (1 - alpha) * g3
        h_minus = beta * g0 + (1 - beta) * g2 if variant == "paper" else g0 + abs(1 - beta) * g2
        h_perp = h_minus - (h_minus @ h_plus) / (h_plus @ h_plus + xi) * h_plus
        return h_plus - gamma * h_perp
    raise ValueError(mode)
