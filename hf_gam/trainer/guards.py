"""What ``GAMTrainer`` converts or refuses at construction, before any compute: plain ``TrainingArguments`` become a
``GAMConfig``; FSDP, DeepSpeed and accelerate's regional compilation are refused where the passes cannot run; and the
uncompiled module the exact-HVP passes run on."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import TrainingArguments
from transformers.utils import logging

from .config import GAMConfig
from ..core.directions import MODES

__all__ = ["as_gam_config", "refuse_regional_compilation", "refuse_sharded_engines", "uncompiled"]

logger = logging.get_logger(__name__)

def uncompiled(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` (``OptimizedModule._orig_mod``, same parameters and buffers): exact-HVP
    passes run on it, since compiled graphs (aot_autograd) have no double backward."""
    while isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


def as_gam_config(args: TrainingArguments) -> GAMConfig:
    """Plain ``TrainingArguments`` (or any other subclass) as a ``GAMConfig`` with every ``gam_*`` field at its
    default, as TRL's trainers convert plain arguments to their configs. Values are read from the init fields with
    ``getattr`` (``to_dict`` would mask ``hub_token`` and turn dtypes into strings) after ``__post_init__`` resolved
    them; ``__post_init__`` runs again on them, which changes nothing (it only resolves aliases, enums and defaults).
    Fields of another subclass that ``GAMConfig`` lacks are kept as plain attributes."""
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"GAMTrainer needs args=GAMConfig(...) or TrainingArguments(...); got {type(args).__name__}")
    ours = {f.name for f in dataclasses.fields(GAMConfig) if f.init}
    theirs = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    config = GAMConfig(**{k: v for k, v in theirs.items() if k in ours})
    extra = sorted(set(theirs) - ours)
    for name in extra:
        setattr(config, name, theirs[name])
    logger.info("GAMTrainer: %s converted to GAMConfig with gam_mode=%r and the gam_* defaults%s",
                type(args).__name__, config.gam_mode, f" (also kept: {', '.join(extra)})" if extra else "")
    return config


def refuse_regional_compilation(args: GAMConfig, plugin) -> None:
    """Exact-HVP modes run their passes on the module under ``torch.compile``; accelerate's regional compilation
    compiles submodules in place, leaving no uncompiled module to run them on: refuse it at construction."""
    if (MODES[args.gam_mode].hvp and args.torch_compile and plugin is not None
            and getattr(plugin, "use_regional_compilation", False)):
        working = ", ".join(m for m, spec in MODES.items() if not spec.hvp)
        raise ValueError(
            f"torch_compile=True with accelerate's regional compilation (ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION) "
            f"does not work with gam_mode={args.gam_mode!r}: its Hessian-vector products need double backward, which "
            f"compiled graphs lack. Use whole-model compilation (the default), or torch_compile=False, or a "
            f"first-order mode ({working}).")


def refuse_sharded_engines(args: GAMConfig, *, deepspeed: bool, fsdp: bool) -> None:
    """DeepSpeed and FSDP cannot run the passes: refuse them at construction, before any compute."""
    if args.gam_mode == "none":
        return
    if deepspeed:
        raise ValueError(
            f"gam_mode={args.gam_mode!r} does not work with DeepSpeed: it steps the optimizer inside backward and "
            "partitions gradients, while GAM/SAM need the full gradient between passes. Launch with DDP instead "
            "(accelerate launch --multi_gpu, or torchrun), or use gam_mode='none'.")
    if fsdp:
        raise ValueError(
            f"gam_mode={args.gam_mode!r} does not work with FSDP: FSDP shards parameters and gradients, and the "
            "passes (sam, gnp, gam, gam_sam, gam_fast) need the full gradient and full weights on every process to "
            "perturb and restore them (exact-HVP modes also need double backward, which FSDP does not support). "
            "Launch with DDP instead (accelerate launch --multi_gpu, or torchrun); gam_mode='none' runs under FSDP.")
