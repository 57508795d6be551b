"""Flatness diagnostics: Hessian spectrum and trace, first- and zeroth-order flatness, loss landscapes.

Every function takes a model and an iterable of batches (dicts of the model's inputs plus ``labels``; materialized
once). The loss is the example-weighted mean of the batch losses: the model's own ``loss`` when its ``forward``
takes ``labels`` and returns one, else the cross-entropy of its logits (or pass ``loss_fn(model, batch)``).

- **The model is left as it was**: weights bit for bit (:func:`hf_gam.functional.weights_restored`), train/eval
  flags, buffers (BatchNorm statistics), ``requires_grad``, ``p.grad`` and the global RNG streams. Only parameters
  with ``requires_grad=True`` are measured.
- **Eval mode by default** (``train_mode=False``): BatchNorm uses its running statistics, dropout is off.
  ``train_mode=True`` measures the training-mode loss (batch statistics; dropout masks from a forked RNG seeded
  with ``seed``).
- **Deterministic under ``seed``**: random vectors come from a local CPU ``torch.Generator`` in the parameters'
  dtype (device-independent). Everything runs in the model's dtype; exact HVPs (double backward) run under the
  SDPA math kernel (:func:`hf_gam.passes.second_order_context`), so ViT/Swin attention works.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from . import functional as F
from .passes import second_order_context

__all__ = ["hessian_eigenvalues", "hessian_trace", "first_order_flatness", "zeroth_order_flatness", "default_loss"]

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
    return TF.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _batch_size(batch: Mapping[str, Any]) -> int:
    for v in (batch.get("labels"), *batch.values()):
        if isinstance(v, Tensor) and v.ndim > 0:
            return v.shape[0]
    return 1


class _Objective:
    """``L(θ) = Σ_b w_b L_b(θ)`` over fixed batches (``w_b`` = batch size / total), its gradient and exact HVPs."""

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
        sizes = [_batch_size(b) for b in self.batches]
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
        """``[H v for v in vs]``: like :func:`hf_gam.functional.hvp`, but one graph per batch serves every vector."""
        out = [[torch.zeros_like(p) for p in self.params] for _ in vs]
        with second_order_context():
            for i in range(len(self.batches)):
                g = torch.autograd.grad(self._loss(i), self.params, create_graph=True, allow_unused=True,
                                        materialize_grads=True)
                idx = [j for j, x in enumerate(g) if x.requires_grad]  # others have no second-order path: H v = 0
                for n, v in enumerate(vs if idx else []):
                    hv = torch.autograd.grad([g[j] for j in idx], self.params, [v[j].detach() for j in idx],
                                             retain_graph=n < len(vs) - 1, allow_unused=True, materialize_grads=True)
                    torch._foreach_add_(out[n], list(hv))
                del g
        return out

    def randn(self, gen: torch.Generator, rademacher: bool = False) -> list[Tensor]:
        if rademacher:
            return [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in self.params]
        return [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in self.params]


@contextlib.contextmanager
def _measured(model: nn.Module, batches, loss_fn, train_mode: bool, seed: int):
    """Yield an :class:`_Objective` with the model in the requested mode; put everything back on exit."""
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}")
    obj = _Objective(model, batches, loss_fn)
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in obj.params if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), F.weights_restored(obj.params) as obj.backup:
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


def _check(name: str, value, ok: bool, need: str) -> None:
    if not ok:  # a clear error naming the argument and its value
        raise ValueError(f"{name} must be {need}; got {value!r}")


def _normalized(v: list[Tensor]) -> tuple[list[Tensor], float]:
    norm = F.global_norm(v)
    return (torch._foreach_div(v, norm.to(v[0].dtype)) if norm > 0 else v), float(norm)


def hessian_eigenvalues(model: nn.Module, batches, k: int = 1, *, method: str = "lanczos", max_iter: int = 100,
                        tol: float = 1e-5, seed: int = 0, train_mode: bool = False,
                        loss_fn: LossFn | None = None) -> list[float]:
    """The ``k`` top eigenvalues of the Hessian of the loss, in descending order.

    ``method="lanczos"`` (default): the ``k`` *largest* eigenvalues, by Lanczos with full reorthogonalization (it
    restarts with a fresh orthogonal vector when the Krylov space is exhausted, so repeated eigenvalues are found
    with their multiplicity); stops when the top-``k`` Ritz residuals are below ``tol * |λ|`` or after ``max_iter``
    Hessian-vector products. It stores up to ``max_iter`` parameter-sized vectors.
    ``method="power"``: power iteration with deflation (PyHessian, the paper's Section 5.4): the ``k`` eigenvalues
    of largest *magnitude*, ``max_iter`` HVPs at most per eigenvalue, stored vectors: ``k``.
    """
    for name, value in (("k", k), ("max_iter", max_iter)):
        _check(name, value, isinstance(value, int) and value >= 1, "an int >= 1")
    _check("max_iter", max_iter, method == "power" or max_iter >= k, f">= k ({k}) for Lanczos")
    _check("method", method, method in ("lanczos", "power"), "'lanczos' or 'power'")
    _check("tol", tol, tol > 0, "> 0")
    with _measured(model, batches, loss_fn, train_mode, seed) as obj:
        n = sum(p.numel() for p in obj.params)
        _check("k", k, k <= n, f"at most the number of trainable parameters ({n})")
        run = _lanczos if method == "lanczos" else _power
        return run(obj, k, max_iter, tol, torch.Generator().manual_seed(seed), n)


def _orthogonalize(v: list[Tensor], basis: list[list[Tensor]]) -> None:
    for _ in range(2):  # twice is enough (Kahan-Parlett)
        for q in basis:
            torch._foreach_add_(v, torch._foreach_mul(q, F.dot(v, q).to(v[0].dtype)), alpha=-1.0)


def _lanczos(obj: _Objective, k: int, max_iter: int, tol: float, gen: torch.Generator, n: int) -> list[float]:
    q, _ = _normalized(obj.randn(gen))
    basis, alphas, betas = [], [], []
    for j in range(min(max_iter, n)):
        basis.append(q)
        w = obj.hvps([q])[0]
        alphas.append(float(F.dot(w, q)))
        _orthogonalize(w, basis)
        w, beta = _normalized(w)
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
            w, beta = _normalized(w)[0], 0.0
        betas.append(beta)
        q = w
    return theta.flip(0)[:k].tolist()


def _power(obj: _Objective, k: int, max_iter: int, tol: float, gen: torch.Generator, n: int) -> list[float]:
    found: list[list[Tensor]] = []
    lams: list[float] = []
    for _ in range(k):
        v, lam = obj.randn(gen), None
        for _ in range(max_iter):
            _orthogonalize(v, found)  # deflation by projection: power iteration on P H P
            v, _ = _normalized(v)
            hv = obj.hvps([v])[0]
            new = float(F.dot(hv, v))
            done = lam is not None and abs(new - lam) <= tol * abs(new)
            lam, v = new, hv
            if done:
                break
        _orthogonalize(v, found)
        found.append(_normalized(v)[0])
        lams.append(lam)
    return sorted(lams, reverse=True)


def hessian_trace(model: nn.Module, batches, num_samples: int = 100, *, distribution: str = "rademacher",
                  seed: int = 0, train_mode: bool = False, loss_fn: LossFn | None = None,
                  return_stderr: bool = False) -> float | tuple[float, float]:
    """Hutchinson's estimate of ``tr(H)``: the mean of ``vᵀHv`` over ``num_samples`` random ``v`` (Rademacher by
    default, or ``"gaussian"``). With ``return_stderr`` also the standard error of that mean. Each batch's graph
    is built once and reused for a chunk of probes (chunks keep probe memory under ~50M elements)."""
    _check("num_samples", num_samples, isinstance(num_samples, int) and num_samples >= 1, "an int >= 1")
    _check("distribution", distribution, distribution in ("rademacher", "gaussian"), "'rademacher' or 'gaussian'")
    gen = torch.Generator().manual_seed(seed)
    with _measured(model, batches, loss_fn, train_mode, seed) as obj:
        chunk = max(1, min(num_samples, 50_000_000 // sum(p.numel() for p in obj.params)))
        samples: list[float] = []
        while len(samples) < num_samples:
            vs = [obj.randn(gen, distribution == "rademacher") for _ in range(min(chunk, num_samples - len(samples)))]
            samples += [float(F.dot(hv, v)) for hv, v in zip(obj.hvps(vs), vs)]
    s = torch.tensor(samples, dtype=torch.float64)
    mean = float(s.mean())
    stderr = float(s.std() / math.sqrt(num_samples)) if num_samples > 1 else float("nan")
    return (mean, stderr) if return_stderr else mean


def _step(eps: list[Tensor] | None, d: list[Tensor], rho: float, step_size: float | None) -> list[Tensor]:
    """Projected ascent step along ``d``: ``Proj_ρ(ε + step_size·ρ·d/‖d‖)``; ``None``: the full step ``ρ·d/‖d‖``."""
    d, _ = _normalized(d)
    if step_size is None or eps is None:
        return torch._foreach_mul(d, rho)
    new = torch._foreach_add(eps, d, alpha=step_size * rho)
    norm = float(F.global_norm(new))
    return torch._foreach_mul(new, min(1.0, rho / norm)) if norm > 0 else new


def _at(obj: _Objective, *eps: tuple[float, list[Tensor]]) -> None:
    """Set the weights to ``θ + Σ a·d`` for ``(a, d)`` in ``eps``, from the saved ``θ`` (so no drift)."""
    F.copy_(obj.params, obj.backup)
    for a, d in eps:
        F.add_(obj.params, torch._foreach_mul(d, a))


def _ascent_args(rho, num_steps, step_size) -> None:
    _check("rho", rho, isinstance(rho, numbers.Real) and math.isfinite(rho) and rho >= 0, "finite and >= 0")
    _check("num_steps", num_steps, isinstance(num_steps, int) and num_steps >= 1, "an int >= 1")
    _check("step_size", step_size, step_size is None or step_size > 0, "None or > 0")


def _zeroth(obj, rho, num_steps, step_size, gen) -> tuple[float, float]:
    """Projected ascent on ``L(θ+ε) - L(θ)`` from the gradient direction. Returns the best loss increase (R0
    estimate) and ``ρ·max‖g‖`` over the visited points (a lower bound of R1)."""
    l0, g = obj.loss_and_grad()
    r0, r1, eps = 0.0, rho * float(F.global_norm(g)), None
    for _ in range(num_steps):
        eps = _step(eps, g if F.global_norm(g) > 0 else obj.randn(gen), rho, step_size)
        _at(obj, (1.0, eps))
        loss, g = obj.loss_and_grad()
        r0, r1 = max(r0, loss - l0), max(r1, rho * float(F.global_norm(g)))
    return r0, r1


def zeroth_order_flatness(model: nn.Module, batches, rho: float, *, num_steps: int = 10,
                          step_size: float | None = None, seed: int = 0, train_mode: bool = False,
                          loss_fn: LossFn | None = None) -> float:
    """``R0_ρ(θ) = max_{‖ε‖≤ρ} L(θ+ε) - L(θ)`` (Definition 3.1), by ``num_steps`` steps of projected gradient
    ascent on ``L(θ+ε)`` started along ``g(θ)`` (a seeded random direction if ``g = 0``); see :func:`_step`.
    Returns the best value found: a lower bound of the true maximum, ``>= 0``. Cost: ``num_steps + 1``
    forward+backward passes."""
    _ascent_args(rho, num_steps, step_size)
    with _measured(model, batches, loss_fn, train_mode, seed) as obj:
        return _zeroth(obj, float(rho), num_steps, step_size, torch.Generator().manual_seed(seed))[0]


def first_order_flatness(model: nn.Module, batches, rho: float, *, num_steps: int = 10,
                         step_size: float | None = None, seed: int = 0, train_mode: bool = False,
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
    _ascent_args(rho, num_steps, step_size)
    rho = float(rho)
    gen = torch.Generator().manual_seed(seed)
    with _measured(model, batches, loss_fn, train_mode, seed) as obj:
        best = max(_zeroth(obj, rho, num_steps, step_size, gen)) if include_zeroth_order else 0.0
        _at(obj)
        gen.manual_seed(seed + 1)
        eps, (_, g) = None, obj.loss_and_grad()
        best = max(best, rho * float(F.global_norm(g)))
        for _ in range(num_steps):
            u, norm = _normalized(g)
            d = obj.hvps([u])[0] if norm > 0 else obj.randn(gen)
            if F.global_norm(d) == 0:  # e.g. a linear loss: ‖g‖ is flat, any direction is as good
                d = obj.randn(gen)
            eps = _step(eps, d, rho, step_size)
            _at(obj, (1.0, eps))
            g = obj.loss_and_grad()[1]
            best = max(best, rho * float(F.global_norm(g)))
        return best


def __getattr__(name: str):
    """``run_flatness``, ``FlatnessArguments``, ``FlatnessCallback`` and ``flatness_markdown`` live in
    :mod:`hf_gam.flatness_cli` (they need matplotlib and transformers), ``loss_landscape`` in
    :mod:`hf_gam.landscape`; reachable from here as well."""
    if name in ("run_flatness", "FlatnessArguments", "FlatnessCallback", "flatness_markdown"):
        from . import flatness_cli
        return getattr(flatness_cli, name)
    if name in ("loss_landscape", "_filter_normalized"):
        from . import landscape
        return getattr(landscape, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
