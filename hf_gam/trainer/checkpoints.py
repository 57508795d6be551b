"""Model weights of a Trainer checkpoint restored exactly: every tensor, through the model's own key conversion.

transformers 5 renamed the modules of several models (ViT: ``vit.layers.N.attention.q_proj``) but
``save_pretrained`` writes the legacy keys (``vit.encoder.layer.N.attention.attention.query``); ``from_pretrained``
converts them back with the model's conversion mapping (``transformers.conversion_mapping``). The stock Trainer's
``_load_from_checkpoint`` (resume) and ``_load_best_model`` use a non-strict ``load_state_dict`` instead: the tensors
stored under legacy names are silently not restored (a "missing keys" warning is the only sign).

:func:`restore_checkpoint_weights` reads the checkpoint's full-model weights, renames / converts the keys with the
same transforms ``from_pretrained`` applies (``get_model_conversion_mapping`` + ``rename_source_key`` and the
converters' own ``convert``), checks that the result covers the model exactly (names and shapes), and only then
copies the tensors into the live parameters in place (the optimizer and any DDP wrapper keep their references).
Anything missing, unexpected or of the wrong shape raises :class:`CheckpointMismatchError` before a tensor is copied.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import safetensors.torch
import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
from transformers.utils import (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME,
                                logging)

from ..errors import UserError

__all__ = ["CheckpointMismatchError", "convert_checkpoint_keys", "load_model_weights", "read_checkpoint_weights",
           "restore_checkpoint_weights"]

logger = logging.get_logger(__name__)
_SHOWN = 8  # keys named per category in an error message


class CheckpointMismatchError(UserError):
    """A checkpoint's weights do not cover the model exactly (missing, unexpected or mis-shaped tensors)."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose ``state_dict`` names the checkpoint's tensors (without DDP's ``module.`` or
    ``torch.compile``'s ``_orig_mod.`` prefixes)."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def _weight_files(checkpoint: str) -> list[str]:
    for name in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME):
        if os.path.isfile(os.path.join(checkpoint, name)):
            return [os.path.join(checkpoint, name)]
    for name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        if os.path.isfile(os.path.join(checkpoint, name)):
            with open(os.path.join(checkpoint, name)) as f:
                return [os.path.join(checkpoint, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    return []


def read_checkpoint_weights(checkpoint: str) -> dict[str, Tensor] | None:
    """The full-model tensors saved in ``checkpoint`` (one file or shards, safetensors or ``.bin``), on CPU; ``None``
    when the directory holds no full-model weights (an adapter-only PEFT checkpoint, FSDP shards)."""
    files = _weight_files(checkpoint)
    if not files:
        return None
    state: dict[str, Tensor] = {}
    for path in files:
        if path.endswith(".safetensors"):
            state.update(safetensors.torch.load_file(path, device="cpu"))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def convert_checkpoint_keys(model: nn.Module, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """``state`` under the model's own parameter names, converted as ``from_pretrained`` converts a checkpoint
    (``transformers.core_model_loading.convert_and_load_state_dict_in_model``, without touching the model).

    Returns the converted tensors and the checkpoint keys that match nothing in the model."""
    model = _unwrap(model)
    expected = model.state_dict()
    if not isinstance(model, PreTrainedModel):
        return dict(state), sorted(set(state) - set(expected))
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = model.base_model_prefix
    out: dict[str, Tensor] = {}
    pending: dict[str, WeightConverter] = {}
    unexpected: list[str] = []
    for key, tensor in sorted(state.items(), key=lambda kv: dot_natural_key(kv[0])):
        name, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:  # as from_pretrained: the key needed no renaming
            name, pattern = rename_source_key(key, [], [], prefix, expected)
        if name not in expected:
            unexpected.append(key)
        elif pattern is None:
            if name in out:
                raise CheckpointMismatchError(f"two checkpoint tensors map to the model's {name!r}")
            out[name] = tensor
        else:
            pending.setdefault(name, copy.deepcopy(by_pattern[pattern])).add_tensor(name, key, pattern, tensor)
    for first, converter in pending.items():
        for name, value in converter.convert(first, model=model, config=model.config).items():
            out[name] = value[0] if isinstance(value, list) else value
    return out, unexpected


def _tied_targets(model: nn.Module) -> dict[str, str]:
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def load_model_weights(model: nn.Module, state: dict[str, Tensor], *, source: str = "the checkpoint") -> None:
    """Copy ``state`` (checkpoint keys) into ``model`` in place after converting its keys; raise
    :class:`CheckpointMismatchError` (nothing copied) unless every tensor of the model is restored exactly once."""
    model = _unwrap(model)
    converted, unexpected = convert_checkpoint_keys(model, state)
    expected = model.state_dict()
    tied = _tied_targets(model)
    missing = [k for k in expected if k not in converted and not (k in tied and tied[k] in converted)]
    unexpected += [k for k in converted if k not in expected]
    mismatched = [f"{k} {tuple(v.shape)} (model {tuple(expected[k].shape)})" for k, v in converted.items()
                  if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:_SHOWN])}{', ...' if len(keys) > _SHOWN else ''}"
                 for label, keys in (("missing", missing), ("unexpected", sorted(unexpected)),
                                     ("wrong shape", mismatched)) if keys]
        raise CheckpointMismatchError(
            f"{source} does not hold exactly the weights of {type(model).__name__} (after transformers' key "
            f"conversion for this model); refusing to load it partially. " + "; ".join(parts))
    result = model.load_state_dict(converted, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - set(tied):  # checked above; never silently partial
        raise CheckpointMismatchError(f"{source}: load_state_dict left {result}")


def restore_checkpoint_weights(trainer: Any, checkpoint: str, model: nn.Module | None = None) -> bool:
    """Restore the model weights of a Trainer checkpoint strictly (see the module docstring). Returns ``False``
    (the caller falls back to the stock Trainer) where the Trainer's own engine owns the weights: DeepSpeed, FSDP,
    SageMaker MP, PEFT adapters (restored by PEFT's ``load_adapter``, which converts keys itself) or a checkpoint
    without full-model weights."""
    from transformers.trainer import _is_peft_model
    from transformers.utils import is_sagemaker_mp_enabled

    model = trainer.model if model is None else model
    if (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or is_sagemaker_mp_enabled()
            or _is_peft_model(_unwrap(model))):
        return False
    state = read_checkpoint_weights(checkpoint)
    if state is None:
        return False
    logger.info("Loading model weights from %s (strict, with the model's key conversion).", checkpoint)
    load_model_weights(model, state, source=f"checkpoint {checkpoint}")
    return True
