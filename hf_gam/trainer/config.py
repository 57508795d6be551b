"""``GAMConfig``: ``transformers.TrainingArguments`` plus the ``gam_*`` hyper-parameters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Literal

from transformers import TrainingArguments

from ..core.directions import MODES, PERTURBATIONS, RHO_SCHEDULES, VARIANTS, GAMHyper
from .config_classes import combined_class, rebuild_combined, redeclare_shadowed_fields

__all__ = ["GAMConfig", "gam_config_class", "with_gam"]

# The choices come from the one mode registry (hf_gam.core.directions.MODES), and so do the mode-dependent defaults.
GamMode = Literal[tuple(MODES)]
# GAMHyper's fields and the step options (the optimizer wrapper's names) -> this config's fields
CONFIG_NAMES = {"mode": "gam_mode", "rho": "gam_rho", "alpha": "gam_alpha", "sam_rho": "sam_rho",
                "rho_prime": "gam_rho_prime", "beta": "gam_beta", "gamma": "gam_gamma", "eps": "gam_eps",
                "variant": "gam_fast_variant", "adaptive": "gam_adaptive", "every": "gam_every",
                "perturbation": "gam_perturbation", "rho_schedule": "gam_rho_schedule",
                "rho_min_ratio": "gam_rho_min_ratio"}
HYPER_FIELDS = tuple(f.name for f in fields(GAMHyper))


def _defaults_by_mode(name: str) -> str:
    """``"gam_fast 0.2, sam 0.05, otherwise 0.04"``: a default of every mode, read from the registry (``--help``)."""
    values = {mode: spec.defaults[name] for mode, spec in MODES.items()}
    common = max(set(values.values()), key=list(values.values()).count)
    return ", ".join([f"{mode} {value:g}" for mode, value in values.items() if value != common]
                     + [f"otherwise {common:g}"])


@dataclass
class GAMConfig(TrainingArguments):
    r"""
    Configuration of [`GAMTrainer`]: every field of `transformers.TrainingArguments` plus the hyper-parameters of
    Gradient-norm Aware Minimization (Zhang et al., CVPR 2023) and its relatives. Symbols are the paper's.

    Parameters:
        gam_mode (`str`, *optional*, defaults to `"gam_fast"`):
            Update rule: `"none"` (plain gradient, identical to `Trainer`), `"sam"` (SAM), `"gnp"` (gradient-norm
            penalty, GAM without the ascent), `"gam"` (Algorithm 1, exact Hessian-vector products), `"gam_sam"` (GAM
            with SAM's gradient as oracle) or `"gam_fast"` (Algorithm 2, four first-order passes: the released
            code's algorithm and the default; exact `"gam"` is opt-in).
        gam_rho (`float` or `None`, *optional*, defaults to `None`):
            ρ, radius of the ascent on the gradient norm. `None` takes the mode's default (`MODES[mode].defaults`,
            tabled in docs/algorithms.md).
        gam_alpha (`float` or `None`, *optional*, defaults to `None`):
            α, weight of the first-order flatness term (Algorithm 1) or of `g1` in `h+` (Algorithm 2). `None` takes
            the mode's default.
        sam_rho (`float` or `None`, *optional*, defaults to `None`):
            ρ of the SAM oracle (`sam`, `gam_sam`); `None` means equal to `gam_rho`.
        gam_rho_prime (`float`, *optional*, defaults to `0.02`):
            ρ' of Algorithm 2 (`gam_fast`), the radius of its SAM-like ascent steps.
        gam_beta (`float`, *optional*, defaults to `0.5`):
            β of Algorithm 2, weight of `g0` in `h-`.
        gam_gamma (`float`, *optional*, defaults to `0.03`):
            γ of Algorithm 2, weight of the orthogonal part of `h-` subtracted from `h+`.
        gam_fast_variant (`str`, *optional*, defaults to `"paper"`):
            `h-` of Algorithm 2: `"paper"` is Eq. 45, `β g0 + (1-β) g2`; `"official"` is what the released code
            computes, `g0 + |1-β| g2`.
        gam_eps (`float`, *optional*, defaults to `1e-12`):
            ξ, the small constant added to every norm that is divided by.
        gam_adaptive (`bool`, *optional*, defaults to `False`):
            ASAM-style ascent steps `θ + r T² v/(‖T v‖+ξ)` with `T = |θ|`.
        gam_every (`int`, *optional*, defaults to `1`):
            Apply the mode on optimizer steps `t` with `t % gam_every == 0` only; the others use the plain gradient
            (paper Table 7: 10 keeps most of the gain at about 1.3x the cost).
        gam_perturbation (`str`, *optional*, defaults to `"local"`):
            `"local"`: every micro-batch on every process computes its own direction and the step's gradient is their
            mean (SAM's m-sharpness; what the released code does per GPU). `"global"`: every pass runs over the whole
            global batch, so the result does not depend on world size or accumulation split.
        gam_rho_schedule (`str`, *optional*, defaults to `"constant"`):
            `"constant"`, or `"lr_proportional"`: every radius (ρ, ρs, ρ') moves with the learning rate between
            `gam_rho_min_ratio` times its value (at learning rate 0) and its value (at the peak `learning_rate`), as
            the released code's proportional scheduler does.
        gam_rho_min_ratio (`float`, *optional*, defaults to `0.5`):
            Lower end of `lr_proportional` as a fraction of each radius (e.g. 0.5 takes ρ' = 0.04 at the peak
            learning rate to 0.02 at learning rate 0). The released `main_cifar.py` has that 0.04/0.02 range only
            commented out: its `ProportionScheduler`s get equal max and min values, so it trains with constant radii
            (`gam_rho_schedule="constant"`).
    """

    gam_mode: GamMode = field(
        default="gam_fast",
        metadata={"help": "Update rule: none | sam | gnp | gam (Algorithm 1) | gam_sam | gam_fast (Algorithm 2)."},
    )
    gam_rho: float | None = field(
        default=None,
        metadata={"help": "ρ (rho): radius of the ascent on the gradient norm. Default by mode: "
                  f"{_defaults_by_mode('rho')}."},
    )
    gam_alpha: float | None = field(
        default=None,
        metadata={"help": "α (alpha): weight of the first-order flatness term (Alg. 1) or of g1 in h+ (Alg. 2). "
                  f"Default by mode: {_defaults_by_mode('alpha')}."},
    )
    sam_rho: float | None = field(
        default=None, metadata={"help": "ρs: radius of the SAM oracle (modes sam, gam_sam); default: gam_rho."}
    )
    gam_rho_prime: float = field(
        default=0.02, metadata={"help": "ρ' (rho prime): radius of Algorithm 2's SAM-like steps (gam_fast)."}
    )
    gam_beta: float = field(default=0.5, metadata={"help": "β (beta): weight of g0 in h- (gam_fast), in [0, 1]."})
    gam_gamma: float = field(
        default=0.03, metadata={"help": "γ (gamma): weight of the orthogonal part of h- (gam_fast), >= 0."}
    )
    gam_fast_variant: Literal[VARIANTS] = field(
        default="paper",
        metadata={"help": "h- of Algorithm 2: paper = β g0 + (1-β) g2 (Eq. 45); official = g0 + |1-β| g2 "
                  "(released code)."},
    )
    gam_eps: float = field(default=1e-12, metadata={"help": "ξ (xi): small constant added to divided norms."})
    gam_adaptive: bool = field(
        default=False, metadata={"help": "ASAM-style ascent steps θ + r T²v/(‖Tv‖+ξ), T = |θ|."}
    )
    gam_every: int = field(
        default=1, metadata={"help": "Apply the mode on optimizer steps t with t %% gam_every == 0; plain otherwise."}
    )
    gam_perturbation: Literal[PERTURBATIONS] = field(
        default="local",
        metadata={"help": "local: each micro-batch perturbs with its own gradient, directions averaged; global: "
                  "every pass over the whole global batch."},
    )

    gam_rho_schedule: Literal[RHO_SCHEDULES] = field(
        default="constant",
        metadata={"help": "constant, or lr_proportional: ρ, ρs and ρ' move with the learning rate between "
                  "gam_rho_min_ratio x their value (lr 0) and their value (peak learning_rate)."},
    )
    gam_rho_min_ratio: float = field(
        default=0.5, metadata={"help": "Lower end of the lr_proportional ρ schedule, as a fraction of each ρ."}
    )

    def __init_subclass__(cls, **kwargs):
        """A subclass that also derives from another ``TrainingArguments`` subclass (``@dataclass class
        C(GAMConfig, SFTConfig)``) keeps that class's fields and defaults (:mod:`hf_gam.trainer.config_classes`)."""
        super().__init_subclass__(**kwargs)
        redeclare_shadowed_fields(cls, GAMConfig)

    def __reduce_ex__(self, protocol):
        """Instances of ``gam_config_class(C)`` pickle through ``C`` (the generated class has no importable name)."""
        base = type(self).__dict__.get("_gam_combined_with")
        if base is None:
            return super().__reduce_ex__(protocol)
        return rebuild_combined, (GAMConfig, base, self.__getstate__())

    def __getstate__(self) -> dict:
        """Pickled without its tokens (``hub_token``): the Trainer writes ``training_args.bin`` into the output and
        every checkpoint, and pushes them to the Hub; the stock ``TrainingArguments`` pickles the token in clear.
        A copy made by pickling or ``copy`` has no token; this object keeps it."""
        return {key: None if key.endswith("_token") and isinstance(value, str) else value
                for key, value in self.__dict__.items()}

    def gam_hyper(self, lr: float | None = None, peak_lr: float | None = None) -> GAMHyper:
        """The step's hyper-parameters; with ``gam_rho_schedule="lr_proportional"`` the radii at learning rate
        ``lr`` (:meth:`GAMHyper.at_learning_rate`): ``ρ_t = ρ (r + (1 - r) clip(lr / peak_lr, 0, 1))``,
        ``r = gam_rho_min_ratio``, ``peak_lr`` the optimizer's initial learning rate (default ``learning_rate``)."""
        hyper = GAMHyper(**{name: getattr(self, CONFIG_NAMES[name]) for name in HYPER_FIELDS})
        if self.gam_rho_schedule != "lr_proportional" or lr is None:
            return hyper
        peak = self.learning_rate if peak_lr is None else peak_lr
        return hyper.at_learning_rate(lr, peak, self.gam_rho_min_ratio)

    def __post_init__(self):
        # every check is GAMHyper's (one home, reading the mode registry); errors name the gam_* fields
        GAMHyper.check(spelling=CONFIG_NAMES, **{name: getattr(self, field) for name, field in CONFIG_NAMES.items()})
        hyper = self.gam_hyper()  # unset ρ, α, ρs take the mode's defaults
        self.gam_rho, self.gam_alpha, self.sam_rho = hyper.rho, hyper.alpha, hyper.sam_rho
        super().__post_init__()
        self._refuse_reentrant_checkpointing()

    def _refuse_reentrant_checkpointing(self) -> None:
        """Reentrant activation checkpointing raises inside ``torch.autograd.grad``, which every pass of every mode but
        ``none`` uses. Checked on the arguments as ``TrainingArguments.__post_init__`` resolved them (the deprecated
        ``gradient_checkpointing*`` aliases folded into ``activation_checkpointing*``, JSON strings parsed), so every
        spelling is caught, before any compute."""
        ckpt_kwargs = self.activation_checkpointing_kwargs
        if (self.gam_mode != "none" and self.activation_checkpointing and isinstance(ckpt_kwargs, dict)
                and ckpt_kwargs.get("use_reentrant")):
            raise ValueError(
                f"activation_checkpointing_kwargs (gradient_checkpointing_kwargs)={ckpt_kwargs!r} with "
                f"gam_mode={self.gam_mode!r}: reentrant checkpointing does not work with torch.autograd.grad, which "
                "every gam_mode but 'none' uses; drop use_reentrant (the default is non-reentrant)")


def gam_config_class(config_class: type) -> type:
    """``GAMConfig`` combined with ``config_class`` (a ``TrainingArguments`` subclass such as TRL's ``SFTConfig``):
    a dataclass with every field of ``config_class`` at ``config_class``'s default plus the ``gam_*`` fields; its
    instances are both. ``gam_config_class(SFTConfig)(output_dir="out", gam_mode="sam")`` is an ``SFTConfig`` with
    TRL's defaults and ``gam_mode="sam"``. The same class is returned for the same ``config_class``; instances pickle
    (the Trainer saves ``training_args.bin``)."""
    if not (isinstance(config_class, type) and issubclass(config_class, TrainingArguments)):
        raise TypeError(f"gam_config_class needs a TrainingArguments subclass; got {config_class!r}")
    if issubclass(config_class, GAMConfig):
        return config_class
    return combined_class(GAMConfig, config_class)


def with_gam(config: TrainingArguments, **gam_fields) -> TrainingArguments:
    """``config`` (any ``TrainingArguments``, e.g. an ``SFTConfig``) as an instance of
    ``gam_config_class(type(config))`` with every value it has and ``gam_fields`` (``gam_mode=...``, ...) set:
    ``with_gam(SFTConfig(output_dir="out", max_length=512), gam_mode="sam", sam_rho=0.05)``. Values are read from the
    init fields with ``getattr`` after ``__post_init__`` resolved them (``to_dict`` would mask ``hub_token``)."""
    if not isinstance(config, TrainingArguments):
        raise TypeError(f"with_gam needs a TrainingArguments instance; got {type(config).__name__}")
    cls = gam_config_class(getattr(type(config), "_gam_combined_with", type(config)))
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(gam_fields) - names)
    if unknown:
        raise TypeError(f"with_gam: {', '.join(unknown)} is not a field of {cls.__name__}")
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init and f.name in names}
    return cls(**{**values, **gam_fields})
