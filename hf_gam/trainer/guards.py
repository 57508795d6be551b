"""What ``GAMTrainer`` converts or refuses at construction, before any compute: plain ``TrainingArguments`` become a
``GAMConfig``; DeepSpeed, FSDP1, what FSDP2 cannot run, and accelerate's regional compilation are refused where the
passes cannot run; and the uncompiled module the exact-HVP passes run on."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import TrainingArguments
from transformers.utils import logging

from ..core.directions import MODES
from ..core.oracles import SHARDED_HVP_REASON, SHARDED_LOCAL_REASON
from .config import GAMConfig, with_gam

__all__ = ["as_gam_config", "refuse_regional_compilation", "refuse_sharded_engines", "refuse_data_parallel",
           "enabled_fsdp_version", "uncompiled"]

logger = logging.get_logger(__name__)

def uncompiled(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` (``OptimizedModule._orig_mod``, same parameters and buffers): exact-HVP
    passes run on it, since compiled graphs (aot_autograd) have no double backward."""
    while isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


def as_gam_config(args: TrainingArguments) -> GAMConfig:
    """``TrainingArguments`` as a ``GAMConfig`` with every ``gam_*`` field at its default, as TRL's trainers convert
    plain arguments to their configs: plain ``TrainingArguments`` become a ``GAMConfig``; any other subclass becomes
    ``gam_config_class(that subclass)`` (:func:`~hf_gam.trainer.config.with_gam`), keeping its fields and defaults.
    Values are read from the init fields with ``getattr`` (``to_dict`` would mask ``hub_token`` and turn dtypes into
    strings) after ``__post_init__`` resolved them; ``__post_init__`` runs again on them, which changes nothing (it
    only resolves aliases, enums and defaults)."""
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"GAMTrainer needs args=GAMConfig(...) or TrainingArguments(...); got {type(args).__name__}")
    if type(args) is TrainingArguments:
        ours = {f.name for f in dataclasses.fields(GAMConfig) if f.init}
        config = GAMConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name in ours})
    else:
        config = with_gam(args)
    logger.info("GAMTrainer: %s converted to %s with gam_mode=%r and the gam_* defaults", type(args).__name__,
                type(config).__name__, config.gam_mode)
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


DEEPSPEED_REASON = ("ZeRO partitions gradients into its own buffers, so p.grad is None after backward, and ZeRO-2/3 "
                    "refuse a second backward before step() (\"Gradient computed twice for this partition\"), while "
                    "every mode but 'none' runs several backward passes per step")
FSDP1_REASON = ("FSDP1 parameters are flattened shards (FlatParameter, or views into them), not DTensors: hf_gam "
                "cannot tell that they are sharded, so its norms would cover one process's shard")


def refuse_sharded_engines(args: GAMConfig, *, deepspeed: bool, fsdp_version: int | None) -> None:
    """What cannot run the passes, refused at construction, before any compute, with the reason and the way out:
    DeepSpeed; FSDP1; under FSDP2 (``fsdp_version=2``) the exact-HVP modes and the local perturbation. First-order
    modes with the global perturbation run under FSDP2 (:mod:`hf_gam.core` on the local shards; docs/fsdp.md).
    ``fsdp_version`` is the version accelerate enabled (``None``: no FSDP; with ``use_cpu`` transformers and
    accelerate fall back to DDP, so nothing is refused for FSDP's sake)."""
    mode = args.gam_mode
    if mode == "none":
        return
    if deepspeed:
        raise ValueError(f"gam_mode={mode!r} does not run under DeepSpeed: {DEEPSPEED_REASON}. Use FSDP2 "
                         "(fsdp='full_shard', fsdp_config={'version': 2}) with sam or gam_fast, or DDP, or "
                         "gam_mode='none'.")
    if fsdp_version is None:
        return
    if fsdp_version != 2:
        raise ValueError(f"gam_mode={mode!r} does not run under FSDP1: {FSDP1_REASON}. Use FSDP2: "
                         "fsdp_config={'version': 2} (transformers' default), or gam_mode='none'.")
    if MODES[mode].hvp:
        raise ValueError(f"gam_mode={mode!r} does not run under FSDP2: {SHARDED_HVP_REASON}, or DDP for exact GAM.")
    if args.gam_perturbation != "global":
        raise ValueError(f"gam_perturbation={args.gam_perturbation!r} does not run under FSDP2: "
                         f"{SHARDED_LOCAL_REASON}. Set gam_perturbation='global' (every pass over the global batch).")


def refuse_data_parallel(args: GAMConfig) -> None:
    """One process that sees several GPUs: the Trainer wraps the model in ``torch.nn.DataParallel``, gathers one loss
    per GPU and splits ``num_items_in_batch`` per GPU, so the passes (one scalar loss of the micro-batch) cannot run;
    refused before any compute (``gam_mode='none'`` is the stock step and runs)."""
    if args.gam_mode != "none" and args.n_gpu > 1:
        raise ValueError(f"gam_mode={args.gam_mode!r} does not run under torch.nn.DataParallel (one process seeing "
                         f"n_gpu={args.n_gpu} GPUs): launch one process per GPU (torchrun --nproc_per_node "
                         f"{args.n_gpu} or accelerate launch: DDP), or make one GPU visible (CUDA_VISIBLE_DEVICES=0).")


def enabled_fsdp_version(trainer) -> int | None:
    """The FSDP version accelerate enabled for ``trainer`` (``None``: none). ``args.fsdp`` alone does not tell:
    with ``use_cpu`` transformers and accelerate silently run DDP; that is logged here."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if trainer.is_fsdp_enabled and plugin is not None:
        return int(getattr(plugin, "fsdp_version", 1))
    if trainer.args.fsdp:
        logger.warning("GAMTrainer: fsdp=%s is not active on this device (accelerate enables FSDP on accelerators "
                       "only; with use_cpu it runs DDP): gam_mode=%r runs as under DDP", trainer.args.fsdp,
                       trainer.args.gam_mode)
    return None
