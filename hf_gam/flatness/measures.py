"""Flatness measures: the Hessian's top eigenvalues and trace, first- and zeroth-order flatness (R1, R0).

Every function takes a model and an iterable of batches (dicts of the model's inputs plus ``labels``; materialized
once). The loss is the example-weighted mean of the batch losses: the model's own ``loss`` when its ``forward``
takes ``labels`` and returns one, else the cross-entropy of its logits (or pass ``loss_fn(model, batch)``).

- **The model is left as it was**: weights bit for bit (:func:`hf_gam.core.functional.weights_restored`), train/eval
  flags, buffers (BatchNorm statistics), ``requires_grad``, ``p.grad`` and the global RNG streams. Only parameters
  with ``requires_grad=True`` are measured.
- **Eval mode by default** (``train_mode=False``): BatchNorm uses its running statistics, dropout is off.
  ``train_mode=True`` measures the training-mode loss (batch statistics; dropout masks from a forked RNG seeded
  with ``seed``).
- **Deterministic under ``seed``**: random vectors come from a local CPU ``torch.Generator`` in the parameters'
  dtype (device-independent). Everything runs in the model's dtype; exact HVPs (double backward) run under the
  SDPA math kernel (:func:`hf_gam.core.functional.second_order_context`), so ViT/Swin attention works.

Defaults come from :mod:`hf_gam.flatness.defaults`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..core import functional
from . import defaults
from ._objective import LossFn, Objective, check_argument, check_ascent_arguments, measured, normalized

__all__ = ["hessian_eigenvalues", "hessian_trace", "first_order_flatness", "zeroth_order_flatness"]


def hessian_eigenvalues(model: nn.Module, batches, k: int = 1, *, method: str = defaults.METHOD,
                        max_iter: int = defaults.MAX_ITER, tol: float = defaults.TOL, seed: int = defaults.SEED,
                        train_mode: bool = defaults.TRAIN_MODE, loss_fn: LossFn | None = None) -> list[float]:
    """The ``k`` top eigenvalues of the Hessian of the loss, in descending order.

    ``method="lanczos"`` (default): the ``k`` *largest* eigenvalues, by Lanczos with full reorthogonalization (it
    restarts with a fresh orthogonal vector when the Krylov space is exhausted, so repeated eigenvalues are found
    with their multiplicity); stops when the top-``k`` Ritz residuals are below ``tol * |λ|`` or after ``max_iter``
    Hessian-vector products. It stores up to ``max_iter`` parameter-sized vectors.
    ``method="power"``: power iteration with deflation (PyHessian, the paper's Section 5.4): the ``k`` eigenvalues
    of largest *magnitude*, ``max_iter`` HVPs at most per eigenvalue, stored vectors: ``k``.
    """
    for name, value in (("k", k), ("max_iter", max_iter)):
        check_argument(name, value, isinstance(value, int) and value >= 1, "an int >= 1")
    check_argument("max_iter", max_iter, method == "power" or max_iter >= k, f">= k ({k}) for Lanczos")
    check_argument("method", method, method in ("lanczos", "power"), "'lanczos' or 'power'")
    check_argument("tol", tol, tol > 0, "> 0")
    with measured(model, batches, loss_fn, train_mode, seed) as obj:
        n = sum(p.numel() for p in obj.params)
        check_argument("k", k, k <= n, f"at most the number of trainable parameters ({n})")
        run = _lanczos if method == "lanczos" else _power
        return run(obj, k, max_iter, tol, torch.Generator().manual_seed(seed), n)


def _orthogonalize(v: list[Tensor], basis: list[list[Tensor]]) -> None:
    for _ in range(2):  # twice is enough (Kahan-Parlett)
        for q in basis:
            torch._foreach_add_(v, torch._foreach_mul(q, functional.dot(v, q).to(v[0].dtype)), alpha=-1.0)


def _lanczos(obj: Objective, k: int, max_iter: int, tol: float, gen: torch.Generator, n: int) -> list[float]:
    q, _ = normalized(obj.randn(gen))
    basis, alphas, betas = [], [], []
    for j in range(min(max_iter, n)):
        basis.append(q)
        w = obj.hvps([q])[0]
        alphas.append(float(functional.dot(w, q)))
        _orthogonalize(w, basis)
        w, beta = normalized(w)
        off = torch.tensor(betas, dtype=torch.float64)
        theta, s = torch.linalg.eigh(torch.diag(torch.tensor(alphas, dtype=torch.float64))
                                     + torch.diag(off, 1) + torch.diag(off, -1))
        top, scale = slice(max(0, j + 1 - k), j + 1), max(float(theta.abs().max()), 1e-30)
        breakdown = beta <= 1e-10 * scale  # the Krylov space is invariant: residuals say nothing about the rest
        if j + 1 >= k and not breakdown and bool((beta * s[-1, top].abs() <= tol * theta[top].abs()).all()):
            break
        if breakdown:  # restart orthogonally to the basis, with a zero coupling (finds multiplicities)
            w = obj.randn(gen)
            _orthogonalize(w, basis)
            w, beta = normalized(w)[0], 0.0
        betas.append(beta)
        q = w
    return theta.flip(0)[:k].tolist()


def _power(obj: Objective, k: int, max_iter: int, tol: float, gen: torch.Generator, n: int) -> list[float]:
    found: list[list[Tensor]] = []
    lams: list[float] = []
    for _ in range(k):
        v, lam = obj.randn(gen), None
        for _ in range(max_iter):
            _orthogonalize(v, found)  # deflation by projection: power iteration on P H P
            v, _ = normalized(v)
            hv = obj.hvps([v])[0]
            new = float(functional.dot(hv, v))
            done = lam is not None and abs(new - lam) <= tol * abs(new)
            lam, v = new, hv
            if done:
                break
        _orthogonalize(v, found)
        found.append(normalized(v)[0])
        lams.append(lam)
    return sorted(lams, reverse=True)


def hessian_trace(model: nn.Module, batches, num_samples: int = defaults.NUM_SAMPLES, *, distribution: str = defaults.DISTRIBUTION,
                  seed: int = defaults.SEED, train_mode: bool = defaults.TRAIN_MODE, loss_fn: LossFn | None = None,
                  return_stderr: bool = False) -> float | tuple[float, float]:
    """Hutchinson's estimate of ``tr(H)``: the mean of ``vᵀHv`` over ``num_samples`` random ``v`` (Rademacher by
    default, or ``"gaussian"``). With ``return_stderr`` also the standard error of that mean. Each batch's graph
    is built once and reused for a chunk of probes (chunks keep probe memory under ~50M elements)."""
    check_argument("num_samples", num_samples, isinstance(num_samples, int) and num_samples >= 1, "an int >= 1")
    check_argument("distribution", distribution, distribution in ("rademacher", "gaussian"),
                   "'rademacher' or 'gaussian'")
    gen = torch.Generator().manual_seed(seed)
    with measured(model, batches, loss_fn, train_mode, seed) as obj:
        chunk = max(1, min(num_samples, 50_000_000 // sum(p.numel() for p in obj.params)))
        samples: list[float] = []
        while len(samples) < num_samples:
            vs = [obj.randn(gen, distribution == "rademacher") for _ in range(min(chunk, num_samples - len(samples)))]
            samples += [float(functional.dot(hv, v)) for hv, v in zip(obj.hvps(vs), vs)]
    s = torch.tensor(samples, dtype=torch.float64)
    mean = float(s.mean())
    stderr = float(s.std() / math.sqrt(num_samples)) if num_samples > 1 else float("nan")
    return (mean, stderr) if return_stderr else mean


def _step(eps: list[Tensor] | None, d: list[Tensor], rho: float, step_size: float | None) -> list[Tensor]:
    """Projected ascent step along ``d``: ``Proj_ρ(ε + step_size·ρ·d/‖d‖)``; ``None``: the full step ``ρ·d/‖d‖``."""
    d, _ = normalized(d)
    if step_size is None or eps is None:
        return torch._foreach_mul(d, rho)
    new = torch._foreach_add(eps, d, alpha=step_size * rho)
    norm = float(functional.global_norm(new))
    return torch._foreach_mul(new, min(1.0, rho / norm)) if norm > 0 else new


def _zeroth(obj, rho, num_steps, step_size, gen) -> tuple[float, float]:
    """Projected ascent on ``L(θ+ε) - L(θ)`` from the gradient direction. Returns the best loss increase (R0
    estimate) and ``ρ·max‖g‖`` over the visited points (a lower bound of R1)."""
    l0, g = obj.loss_and_grad()
    r0, r1, eps = 0.0, rho * float(functional.global_norm(g)), None
    for _ in range(num_steps):
        eps = _step(eps, g if functional.global_norm(g) > 0 else obj.randn(gen), rho, step_size)
        obj.set_weights((1.0, eps))
        loss, g = obj.loss_and_grad()
        r0, r1 = max(r0, loss - l0), max(r1, rho * float(functional.global_norm(g)))
    return r0, r1


def zeroth_order_flatness(model: nn.Module, batches, rho: float, *, num_steps: int = defaults.NUM_STEPS,
                          step_size: float | None = defaults.STEP_SIZE, seed: int = defaults.SEED, train_mode: bool = defaults.TRAIN_MODE,
                          loss_fn: LossFn | None = None) -> float:
    """``R0_ρ(θ) = max_{‖ε‖≤ρ} L(θ+ε) - L(θ)`` (Definition 3.1), by ``num_steps`` steps of projected gradient
    ascent on ``L(θ+ε)`` started along ``g(θ)`` (a seeded random direction if ``g = 0``); see :func:`_step`.
    Returns the best value found: a lower bound of the true maximum, ``>= 0``. Cost: ``num_steps + 1``
    forward+backward passes."""
    check_ascent_arguments(rho, num_steps, step_size)
    with measured(model, batches, loss_fn, train_mode, seed) as obj:
        return _zeroth(obj, float(rho), num_steps, step_size, torch.Generator().manual_seed(seed))[0]


def first_order_flatness(model: nn.Module, batches, rho: float, *, num_steps: int = defaults.NUM_STEPS,
                         step_size: float | None = defaults.STEP_SIZE, seed: int = defaults.SEED, train_mode: bool = defaults.TRAIN_MODE,
                         loss_fn: LossFn | None = None, include_zeroth_order: bool = True) -> float:
    """``R1_ρ(θ) = ρ · max_{‖ε‖≤ρ} ‖g(θ+ε)‖`` (Definition 4.1), by ``num_steps`` steps of projected gradient
    ascent on ``‖g(θ+ε)‖``, whose gradient is ``H(θ+ε) g/‖g‖`` (exact HVP); the first step is GAM's ``f`` of
    Eq. 15 (a seeded random direction if ``g(θ) = 0``). ``step_size``: ``None`` (default) steps to
    ``ρ·d/‖d‖``, the maximizer of the linearization over the ball (as SAM does); a number ``η`` takes
    ``Proj_ρ(ε + η·ρ·d/‖d‖)``. At a quadratic's minimum the full steps are power iteration on ``H²``, so the
    result tends to ``ρ²·λmax`` (Lemma 4.1). Cost per step: one forward+backward and one HVP pass.

    Every visited point gives a lower bound of R1; the best is returned. With ``include_zeroth_order`` (default)
    the zeroth-order ascent of :func:`zeroth_order_flatness` runs too (same settings, ``num_steps + 1`` cheap
    first-order passes) and its gradient norms and loss increase (``R0 <= R1``, Proposition 4.2) count as lower
    bounds as well, so ``zeroth_order_flatness(...) <= first_order_flatness(...)`` holds for the estimates.
    """
    check_ascent_arguments(rho, num_steps, step_size)
    rho = float(rho)
    gen = torch.Generator().manual_seed(seed)
    with measured(model, batches, loss_fn, train_mode, seed) as obj:
        best = max(_zeroth(obj, rho, num_steps, step_size, gen)) if include_zeroth_order else 0.0
        obj.set_weights()
        gen.manual_seed(seed + 1)
        eps, (_, g) = None, obj.loss_and_grad()
        best = max(best, rho * float(functional.global_norm(g)))
        for _ in range(num_steps):
            u, norm = normalized(g)
            d = obj.hvps([u])[0] if norm > 0 else obj.randn(gen)
            if functional.global_norm(d) == 0:  # e.g. a linear loss: ‖g‖ is flat, any direction is as good
                d = obj.randn(gen)
            eps = _step(eps, d, rho, step_size)
            obj.set_weights((1.0, eps))
            g = obj.loss_and_grad()[1]
            best = max(best, rho * float(functional.global_norm(g)))
        return best
