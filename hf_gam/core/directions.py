"""The update direction of every ``gam_mode``, as pure functions of two gradient oracles.

Each function perturbs ``params`` in place between passes and always leaves them bit-for-bit as it found them
(also when an oracle raises). It returns ``(d, stats)``: the direction ``d`` (a new list of tensors, the caller puts
it into ``p.grad``) and a dict of 0-dim tensors worth logging (``loss``, ``grad_norm`` = ‖g(θ)‖, and where there is an
ascent point ``ascent_grad_norm`` = ‖g‖ there; ρ times it estimates the first-order flatness R1),
and ``direction_norm`` = ‖d‖ where the function has it anyway (the caller's finiteness check then needs no norm).

The oracles are how the world reaches the math (the big_vision GSAM pattern):

``grad_fn() -> (loss, g)``
    loss and gradient, at the *current* weights, of the mean loss over the batch the perturbation is computed from
    (``gam_perturbation``: one micro-batch for ``"local"``, the whole global batch for ``"global"``).
``grad_hvp_fn(v_fn) -> (loss, g, Hv)``
    the same, plus the exact Hessian-vector product ``H(θ) v`` with ``v = v_fn(g)`` built from that gradient.

Distributed contract (``docs/algorithms.md``): the direction is exact for whatever loss the oracles define. For a
"local" perturbation the oracles see one micro-batch on one process and the caller averages the directions; for a
"global" perturbation the oracles must return gradients (and HVPs) already averaged over every micro-batch and
process (an all-reduce inside the oracle), so every process computes the same perturbations and the same ``d``.
Nothing here communicates.

:data:`MODES` is the one list of modes: each :class:`ModeSpec` holds the mode's rule (an adapter from
``(GAMHyper, params, oracle)`` to one of the functions here), its cost, and its default ρ and α. The config's
choices and defaults, the dispatcher, the trainer, FLOP counting, model cards, tests and benchmarks all read it, so a
new mode is one entry there (plus its direction function, in this file).

Rules (``docs/algorithms.md``): ``sam``: ``g(θ + ρs g/(‖g‖+ξ))``; ``gnp``: ``g + α ρ H g/(‖g‖+ξ)``; ``gam``
(Algorithm 1): ``g + α ρ H(θa) ga/(‖ga‖+ξ)`` with ``θa = θ + ρ f/(‖f‖+ξ)``, ``f = H g/(‖g‖+ξ)``; ``gam_sam``: the same
with SAM's gradient in place of ``g``; ``gam_fast``: Algorithm 2. ``adaptive`` makes every ascent step ASAM's
``θ + r T² v/(‖T v‖+ξ)``, ``T = |θ|`` of the point being perturbed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch
from torch import Tensor

from . import functional

GradFn = Callable[[], tuple[Tensor, list[Tensor]]]
GradHvpFn = Callable[[Callable[[list[Tensor]], list[Tensor]]], tuple[Tensor, list[Tensor], list[Tensor]]]

__all__ = ["plain_direction", "sam_direction", "gnp_direction", "gam_direction", "gam_fast_direction", "MODES",
           "ModeSpec", "GAMHyper", "Oracle"]


# Choices of the settings every mode shares (GAMConfig's Literal types read them too).
VARIANTS = ("paper", "official")
PERTURBATIONS = ("local", "global")
RHO_SCHEDULES = ("constant", "lr_proportional")
_AT_LEAST_0 = (lambda v: v >= 0, "a finite number >= 0")
_UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
# name -> (test, rule) of the numeric settings but ``alpha`` (its bound is the mode's ``alpha_max``)
_NUMBERS = {"rho": _AT_LEAST_0, "sam_rho": _AT_LEAST_0, "rho_prime": _AT_LEAST_0, "gamma": _AT_LEAST_0,
            "eps": _AT_LEAST_0, "beta": _UNIT, "rho_min_ratio": _UNIT,
            "max_grad_norm": (lambda v: v > 0, "a finite number > 0 (or None)")}
_CHOICES = {"variant": VARIANTS, "perturbation": PERTURBATIONS, "rho_schedule": RHO_SCHEDULES}
_NONE_MEANS_DEFAULT = ("rho", "alpha", "sam_rho", "max_grad_norm")  # None: the mode's default (clipping: off)


@dataclass(frozen=True)
class GAMHyper:
    """The hyper-parameters of one step, in the paper's symbols (``GAMConfig.gam_hyper(lr)`` builds it from a
    config; a plain loop builds it with :meth:`for_mode`). ``rho`` ρ, ``alpha`` α, ``sam_rho`` ρs, ``rho_prime``
    ρ', ``beta`` β, ``gamma`` γ, ``eps`` ξ; ``variant`` is Algorithm 2's ``h-`` rule; ``adaptive`` ASAM steps.

    ``rho`` and ``alpha`` left at ``None`` take the mode's defaults (``MODES[mode].defaults``, the same the config
    takes); ``sam_rho`` left at ``None`` equals ``rho``. Every value is checked (:meth:`check`) on construction."""

    mode: str = "gam_fast"
    rho: float | None = None
    alpha: float | None = None
    sam_rho: float | None = None
    rho_prime: float = 0.02
    beta: float = 0.5
    gamma: float = 0.03
    eps: float = 1e-12
    variant: str = "paper"
    adaptive: bool = False

    def __post_init__(self):
        self.check(mode=self.mode)
        for name, value in MODES[self.mode].defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.sam_rho is None:
            object.__setattr__(self, "sam_rho", self.rho)
        self.check(**{f.name: getattr(self, f.name) for f in fields(self)})

    @staticmethod
    def check(spelling: Mapping[str, str] | None = None, **values) -> None:
        """Every hyper-parameter check, written once: raise ``ValueError`` naming the first out-of-range value of
        ``values`` and the setting as the user spelled it. Names are the fields of this class and the step options
        ``every``, ``perturbation``, ``rho_schedule``, ``rho_min_ratio``, ``max_grad_norm`` (the optimizer
        wrapper's spelling); ``spelling`` maps them to the caller's (``GAMConfig``: ``gam_rho``, ...). The modes
        and each mode's largest α come from :data:`MODES`; ``None`` is valid where it means a default."""
        spelled = {**{name: name for name in values}, **(spelling or {})}
        mode = values.get("mode")
        for name, value in values.items():
            rule = _violated_rule(name, value, mode, spelled)
            if rule is not None:
                raise ValueError(f"{spelled[name]} must be {rule}; got {value!r}")

    @classmethod
    def for_mode(cls, mode: str, **overrides) -> GAMHyper:
        """``mode``'s hyper-parameters: its defaults (``MODES[mode].defaults`` and the fields' own), then
        ``overrides`` (``None`` values are ignored, so ``for_mode(m, rho=args.rho)`` works with an unset flag)."""
        return cls(mode=mode, **{k: v for k, v in overrides.items() if v is not None})

    def at_learning_rate(self, lr: float, peak_lr: float, min_ratio: float) -> GAMHyper:
        """The ``lr_proportional`` schedule (the released code's proportional scheduler): every radius (ρ, ρs, ρ')
        times ``r + (1 - r) clip(lr / peak_lr, 0, 1)``, ``r = min_ratio``; unchanged when ``peak_lr <= 0``."""
        if peak_lr <= 0:
            return self
        scale = min_ratio + (1.0 - min_ratio) * min(max(lr / peak_lr, 0.0), 1.0)
        return replace(self, rho=self.rho * scale, sam_rho=self.sam_rho * scale, rho_prime=self.rho_prime * scale)


def _violated_rule(name: str, value, mode, spelled: Mapping[str, str]) -> str | None:
    """The rule ``value`` breaks as setting ``name`` (for :meth:`GAMHyper.check`), else ``None``."""
    if name == "mode":
        return None if value in MODES else f"one of {', '.join(MODES)}"
    if value is None and name in _NONE_MEANS_DEFAULT:
        return None
    if name in _CHOICES:
        return None if value in _CHOICES[name] else f"one of {', '.join(_CHOICES[name])}"
    if name == "adaptive":
        return None if isinstance(value, bool) else "True or False"
    if name == "every":
        return None if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else "an integer >= 1"
    if name == "alpha":
        alpha_max = MODES[mode].alpha_max if mode in MODES else math.inf
        bounded = (lambda v: 0 <= v <= alpha_max, f"in [0, {alpha_max:g}] for {spelled.get('mode', 'mode')}={mode!r}")
        test, rule = _AT_LEAST_0 if alpha_max == math.inf else bounded
    else:
        test, rule = _NUMBERS[name]
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return None if number and test(value) else rule


class _Unit:
    """``v -> v / (‖v‖ + eps)``, keeping ``‖v‖`` (the caller logs it; no second norm)."""

    def __init__(self, eps: float):
        self.eps, self.norm = eps, None

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        self.norm = functional.global_norm(v)
        return torch._foreach_div(v, (self.norm + self.eps).to(v[0].dtype))


def _ascend(params: Sequence[Tensor], v: list[Tensor], r: float, eps: float, adaptive: bool,
            consume: bool = False, norm: Tensor | None = None) -> None:
    """``θ <- θ + r v/(‖v‖+ξ)`` (or ASAM's rule) in place; with ``consume`` the step is built in ``v``'s storage
    (``v`` is garbage afterwards), saving a parameter-sized temporary; ``norm`` is ``‖v‖`` if already known."""
    weights = [p.detach() for p in params] if adaptive else None
    step = (functional.ascent_step_ if consume else functional.ascent_step)(v, r, eps, weights, norm=norm)
    functional.add_(params, step)


def plain_direction(grad_fn: GradFn):
    """No perturbation (mode ``none``): ``d = g(θ)``. One pass."""
    loss, g = grad_fn()
    norm = functional.global_norm(g)  # also ‖d‖: the finiteness check reads it (no second norm, no collective)
    return g, {"loss": loss, "grad_norm": norm, "direction_norm": norm}


def sam_direction(params: Sequence[Tensor], grad_fn: GradFn, *, rho: float, eps: float, adaptive: bool = False):
    """SAM (Foret et al. 2021): ``d = g(θ + ρ g/(‖g‖+ξ))``. Two passes."""
    loss, g = grad_fn()
    stats = {"loss": loss, "grad_norm": functional.global_norm(g)}
    with functional.weights_restored(params):
        _ascend(params, g, rho, eps, adaptive, consume=True, norm=stats["grad_norm"])
        del g
        _, g_sam = grad_fn()
    stats["ascent_grad_norm"] = stats["direction_norm"] = functional.global_norm(g_sam)
    return g_sam, stats


def gnp_direction(params: Sequence[Tensor], grad_hvp_fn: GradHvpFn, *, rho: float, alpha: float, eps: float):
    """Gradient-norm penalty (GAM without the ascent, paper App. C "ρ = 0"): ``d = g + α ρ H g/(‖g‖+ξ)``
    (``H g/‖g‖ = ∇‖g‖``). One pass and one HVP; the weights are not moved."""
    unit = _Unit(eps)
    loss, g, f = grad_hvp_fn(unit)
    stats = {"loss": loss, "grad_norm": unit.norm}
    return functional.gam_combine(g, torch._foreach_mul(f, rho), alpha), stats


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
    with functional.weights_restored(params) as theta:
        if sam_rho is not None:
            _ascend(params, g, sam_rho, eps, adaptive, consume=True, norm=unit.norm)
            _, g = grad_fn()
            stats["sam_grad_norm"] = functional.global_norm(g)
            functional.copy_(params, theta)
        _ascend(params, f, rho, eps, adaptive, consume=True)
        del f
        _, ga, h = grad_hvp_fn(unit_a)
    stats["ascent_grad_norm"] = unit_a.norm
    del ga
    torch._foreach_mul_(h, rho)
    return functional.gam_combine(g, h, alpha), stats


def gam_fast_direction(params: Sequence[Tensor], grad_fn: GradFn, *, rho: float, rho_prime: float, alpha: float,
                       beta: float, gamma: float, eps: float, variant: str = "paper", adaptive: bool = False):
    """Accelerated GAM, Algorithm 2: four first-order passes, no HVP.

    ``g0 = g(θ)``; ``g1 = g(θ + ρ' g0/(‖g0‖+ξ))``; ``θ2 = θ + ρ (g1-g0)/(‖g1-g0‖+ξ)``; ``g2 = g(θ2)``;
    ``g3 = g(θ2 + ρ' g2/(‖g2‖+ξ))``; ``h+`` (:func:`hf_gam.core.functional.h_plus_`), ``h-``
    (:func:`~hf_gam.core.functional.h_minus_`), ``d = h+ - γ h-⊥`` (:func:`~hf_gam.core.functional.gam_fast_final_`).
    Beyond the pass's own gradient it holds three parameter-sized buffers: the saved θ, ``h-`` (built in g0's
    storage) and ``h+`` (built in g1's).
    """
    loss, g0 = grad_fn()
    stats = {"loss": loss, "grad_norm": functional.global_norm(g0)}
    with functional.weights_restored(params) as theta:
        _ascend(params, g0, rho_prime, eps, adaptive, norm=stats["grad_norm"])
        _, g1 = grad_fn()
        functional.copy_(params, theta)
        h0 = torch._foreach_sub(g1, g0)
        _ascend(params, h0, rho, eps, adaptive, consume=True)
        del h0
        _, g2 = grad_fn()
        stats["ascent_grad_norm"] = functional.global_norm(g2)
        h_minus = functional.h_minus_(g0, g2, beta, variant)
        _ascend(params, g2, rho_prime, eps, adaptive, consume=True, norm=stats["ascent_grad_norm"])
        del g2
        _, g3 = grad_fn()
    h_plus = functional.h_plus_(g1, g3, alpha)
    del g3
    return functional.gam_fast_final_(h_plus, h_minus, gamma, eps), stats


class Oracle(Protocol):
    """What the registry's adapters call (implemented by :class:`hf_gam.core.oracles.WindowOracle` and
    :class:`~hf_gam.core.oracles.MicroBatchOracle`)."""

    def grad(self) -> tuple[Tensor, list[Tensor]]: ...

    def grad_hvp(self, v_fn: Callable[[list[Tensor]], list[Tensor]]) -> tuple[Tensor, list[Tensor], list[Tensor]]: ...


Direction = Callable[[GAMHyper, Sequence[Tensor], Oracle], tuple[list[Tensor], dict[str, Tensor]]]


@dataclass(frozen=True)
class ModeSpec:
    """Everything the package knows about one ``gam_mode``.

    - ``direction(hyper, params, oracle) -> (d, stats)``: the rule, reading its hyper-parameters from ``hyper``.
    - ``grad_calls`` / ``hvp_calls``: calls per step to ``oracle.grad`` and to ``oracle.grad_hvp`` (a gradient and
      an exact HVP at one point). Derived: ``oracle_calls`` (forward passes of one micro-batch), ``passes``
      (forward+backward equivalents, an exact HVP counting as two more: FLOP counting and model cards) and ``hvp``
      (double-backward graphs, so the SDPA math kernel).
    - ``norm_ascent``: the mode climbs the gradient norm, so ρ times its ``ascent_grad_norm`` estimates the
      first-order flatness R1 (logged as ``gam/r1``).
    - ``defaults``: the mode's ``rho`` and ``alpha`` (what :class:`GAMHyper` and ``GAMConfig`` take when left unset;
      the other hyper-parameters have mode-independent defaults).
    - ``alpha_max``: the largest valid α (``gam_fast``: α weighs ``g1`` against ``g3``, so at most 1).
    - ``summary``: one line for model cards and docs.
    """

    direction: Direction
    grad_calls: int
    hvp_calls: int
    norm_ascent: bool
    defaults: Mapping[str, float]
    summary: str
    alpha_max: float = math.inf

    def __post_init__(self):
        if set(self.defaults) != {"rho", "alpha"}:
            raise ValueError(f"ModeSpec.defaults must give exactly rho and alpha; got {dict(self.defaults)}")

    @property
    def oracle_calls(self) -> int:
        return self.grad_calls + self.hvp_calls

    @property
    def passes(self) -> int:
        return self.grad_calls + 3 * self.hvp_calls

    @property
    def hvp(self) -> bool:
        return self.hvp_calls > 0


# Adapters: (hyper, params, oracle) -> the mode's direction function with its hyper-parameters.
def _none(h: GAMHyper, params: Sequence[Tensor], oracle: Oracle):
    return plain_direction(oracle.grad)


def _sam(h: GAMHyper, params: Sequence[Tensor], oracle: Oracle):
    return sam_direction(params, oracle.grad, rho=h.sam_rho, eps=h.eps, adaptive=h.adaptive)


def _gnp(h: GAMHyper, params: Sequence[Tensor], oracle: Oracle):
    return gnp_direction(params, oracle.grad_hvp, rho=h.rho, alpha=h.alpha, eps=h.eps)


def _gam(h: GAMHyper, params: Sequence[Tensor], oracle: Oracle):
    return gam_direction(params, oracle.grad, oracle.grad_hvp, rho=h.rho, alpha=h.alpha, eps=h.eps,
                         adaptive=h.adaptive)


def _gam_sam(h: GAMHyper, params: Sequence[Tensor], oracle: Oracle):
    return gam_direction(params, oracle.grad, oracle.grad_hvp, rho=h.rho, alpha=h.alpha, eps=h.eps,
                         adaptive=h.adaptive, sam_rho=h.sam_rho)


def _gam_fast(h: GAMHyper, params: Sequence[Tensor], oracle: Oracle):
    return gam_fast_direction(params, oracle.grad, rho=h.rho, rho_prime=h.rho_prime, alpha=h.alpha, beta=h.beta,
                              gamma=h.gamma, eps=h.eps, variant=h.variant, adaptive=h.adaptive)


# The one list of modes (a new mode: its direction function and adapter above, and one entry here).
# Default ρ, α: exact GAM / gnp: the paper's CIFAR-10 setting (App. C.5); sam: Foret et al.'s ρ = 0.05 (ρs follows
# ρ); gam_fast: the released code's CIFAR-100 ResNet setting (its ρ', β, γ are GAMHyper's field defaults).
MODES: dict[str, ModeSpec] = {
    "none": ModeSpec(_none, grad_calls=1, hvp_calls=0, norm_ascent=False, defaults={"rho": 0.04, "alpha": 0.1},
                     summary="plain gradient, identical to transformers.Trainer"),
    "sam": ModeSpec(_sam, grad_calls=2, hvp_calls=0, norm_ascent=False, defaults={"rho": 0.05, "alpha": 0.1},
                    summary="SAM: gradient at θ + ρs g/‖g‖"),
    "gnp": ModeSpec(_gnp, grad_calls=0, hvp_calls=1, norm_ascent=False, defaults={"rho": 0.04, "alpha": 0.1},
                    summary="gradient-norm penalty g + αρ∇‖g‖ (1 pass + HVP)"),
    "gam": ModeSpec(_gam, grad_calls=0, hvp_calls=2, norm_ascent=True, defaults={"rho": 0.04, "alpha": 0.1},
                    summary="GAM, Algorithm 1 (2 passes + 2 HVPs)"),
    "gam_sam": ModeSpec(_gam_sam, grad_calls=1, hvp_calls=2, norm_ascent=True, defaults={"rho": 0.04, "alpha": 0.1},
                        summary="GAM with SAM's oracle gradient (3 passes + 2 HVPs)"),
    "gam_fast": ModeSpec(_gam_fast, grad_calls=4, hvp_calls=0, norm_ascent=True, defaults={"rho": 0.2, "alpha": 0.6},
                         alpha_max=1.0, summary="accelerated GAM, Algorithm 2 (4 passes)"),
}
