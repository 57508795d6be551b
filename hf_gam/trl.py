"""TRL's trainers, sharpness-aware: ``GAMSFTTrainer``, ``GAMDPOTrainer``, ``GAMRewardTrainer`` are ``GAMTrainer``
mixed with TRL's ``SFTTrainer``, ``DPOTrainer`` and ``RewardTrainer`` (``pip install hf_gam[trl]``; this is the one
module of hf_gam that imports trl).

Each takes the arguments of the TRL trainer it swaps for. ``args`` may be the user's own TRL config (``SFTConfig``,
...: it trains with ``gam_mode="gam_fast"`` and the ``gam_*`` defaults, every value and default of that config
kept), a ``GAMSFTConfig`` / ``GAMDPOConfig`` / ``GAMRewardConfig`` (TRL's config with the ``gam_*`` fields, TRL's
defaults kept), ``with_gam(SFTConfig(...), gam_mode="sam")``, or a hand-written ``@dataclass class C(GAMConfig,
SFTConfig)``. What the mixing does (TRL's per-call metrics recorded by the clean pass only, DPO's reference
log-probabilities computed once per micro-batch, the refusals) lives in :mod:`hf_gam.trainer.integrations`, so that a
hand-written ``class C(GAMTrainer, SFTTrainer)`` behaves the same. See ``docs/trl.md``.
"""

from __future__ import annotations

try:
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
except ImportError as error:  # trl is an optional extra
    raise ImportError(f"hf_gam.trl needs TRL: pip install 'hf_gam[trl]' ({error})") from error

from .trainer.config import gam_config_class, with_gam
from .trainer.trainer import GAMTrainer

__all__ = ["GAMDPOConfig", "GAMDPOTrainer", "GAMRewardConfig", "GAMRewardTrainer", "GAMSFTConfig", "GAMSFTTrainer",
           "gam_config_class", "with_gam"]

GAMSFTConfig = gam_config_class(SFTConfig)
GAMDPOConfig = gam_config_class(DPOConfig)
GAMRewardConfig = gam_config_class(RewardConfig)


class GAMSFTTrainer(GAMTrainer, SFTTrainer):
    """TRL's ``SFTTrainer`` with GAM / SAM steps (``args``: an ``SFTConfig``, a ``GAMSFTConfig`` or ``with_gam(...)``).
    Exact-HVP modes (``gnp``, ``gam``, ``gam_sam``) are refused: TRL's fused LM head has no double backward."""


class GAMDPOTrainer(GAMTrainer, DPOTrainer):
    """TRL's ``DPOTrainer`` with GAM / SAM steps; the reference log-probabilities of each micro-batch are computed once
    and reused by every pass (``trainer.gam_reuse_ref_log_probs = False`` recomputes them in each pass, as TRL's loss
    would). Exact-HVP modes are refused (TRL's fused LM head)."""

    gam_reuse_ref_log_probs = True


class GAMRewardTrainer(GAMTrainer, RewardTrainer):
    """TRL's ``RewardTrainer`` with GAM / SAM steps (every mode, exact HVPs included)."""
