"""Image classifiers for ``hf-gam``: load a Hub id or a local ``save_pretrained`` directory (HF ViT, Swin,
EfficientNet, ... and timm models through ``TimmWrapperForImageClassification``) with its head resized to the
dataset's classes, build the architecture from its config without weights (``--from_scratch``), or build one of the
small built-in architectures (no download; the default for the embedded digits job).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import (AutoConfig, AutoImageProcessor, AutoModelForImageClassification, PretrainedConfig,
                          PreTrainedModel, ResNetConfig, ResNetForImageClassification, ViTConfig,
                          ViTForImageClassification, ViTImageProcessor)

from ..errors import UserError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class ModelLoadError(UserError):
    """A model argument that cannot be used (a user error, reported without traceback)."""


def _processor(image_size: int) -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3)


def _tiny_resnet(image_size: int, labels: dict) -> tuple[PreTrainedModel, ViTImageProcessor]:
    """A 3-stage basic-block ResNet (16-32-64 channels, one block each, BatchNorm): ~80 k parameters. On digits
    at 32 px it reaches ~98% test accuracy in a few epochs."""
    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                          layer_type="basic", downsample_in_first_stage=False, **labels)
    return ResNetForImageClassification(config), _processor(image_size)


def _tiny_vit(image_size: int, labels: dict) -> tuple[PreTrainedModel, ViTImageProcessor]:
    """A 4-layer, 64-wide ViT whose patch grid is 8x8 at any ``image_size`` (patch = size / 8): ~0.2 M parameters."""
    patch = max(1, image_size // 8)
    config = ViTConfig(image_size=image_size, patch_size=patch, num_channels=3, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, **labels)
    return ViTForImageClassification(config), _processor(image_size)


def _timm_architecture(architecture: str, image_size: int, labels: dict, model_args: dict | None = None):
    """Any timm architecture built from scratch as ``TimmWrapperForImageClassification`` (no download): the image
    settings go to ``pretrained_cfg`` as on the Hub, ``model_args`` to ``timm.create_model``."""
    import timm
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, TimmWrapperImageProcessor

    if not timm.is_model(architecture):
        raise ModelLoadError(f"model: timm has no architecture {architecture!r} (see timm.list_models())")
    pretrained_cfg = {"input_size": [3, image_size, image_size], "mean": [0.5] * 3, "std": [0.5] * 3,
                      "crop_pct": 1.0, "interpolation": "bilinear", "num_classes": labels["num_labels"]}
    config = TimmWrapperConfig(architecture=architecture, model_args=model_args or None,
                               pretrained_cfg=pretrained_cfg, **labels)
    return TimmWrapperForImageClassification(config), TimmWrapperImageProcessor(pretrained_cfg=pretrained_cfg)


BUILTIN_MODELS: dict[str, Callable[[int, dict], tuple[PreTrainedModel, object]]] = {
    "tiny-resnet": _tiny_resnet, "tiny-vit": _tiny_vit}
TIMM_PREFIX = "timm:"


@dataclass
class ModelArguments:
    """Which model ``hf-gam train`` fine-tunes (or trains from scratch)."""

    model: str = field(default="tiny-resnet", metadata={"help": (
        "Hub id or local directory (save_pretrained layout) of an image classifier: HF ViT, Swin, EfficientNet, ... "
        "or a timm model (timm/...; loaded as TimmWrapperForImageClassification). Built in, always from scratch: "
        f"{', '.join(BUILTIN_MODELS)} (tiny-resnet is the default), and timm:<architecture> (any timm "
        "architecture, e.g. timm:resnet18); no download.")})
    from_scratch: bool = field(default=False, metadata={"help": (
        "Build the architecture from its config with random weights instead of loading pretrained weights "
        "(the paper's from-scratch setting).")})
    image_size: int | None = field(default=None, metadata={"help": (
        "Input size of a built-in model; default: 32 for digits and CIFAR, else 224.")})
    timm_model_args: str | None = field(default=None, metadata={"help": (
        'JSON keyword arguments for timm.create_model of a timm:<architecture> model, e.g. '
        '\'{"img_size": 32, "patch_size": 4}\' for a ViT on CIFAR.')})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models are cached."})


@dataclass
class LoadedModel:
    model: PreTrainedModel
    processor: object
    base_model: str | None  # Hub id of the pretrained weights, None when built from scratch or from a local dir
    from_scratch: bool


def _label_maps(class_names: list[str]) -> dict:
    names = [str(n) for n in class_names]
    maps = {"num_labels": len(names), "id2label": dict(enumerate(names))}
    if len(set(names)) == len(names):
        maps["label2id"] = {n: i for i, n in enumerate(names)}
    return maps


def _check_source(name: str) -> bool:
    """True if ``name`` is a local directory; raise a clear error if it is neither that nor a plausible Hub id."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelLoadError(f"model: {name!r} is a directory without config.json (not a save_pretrained layout)")
        return True
    if os.path.exists(name) or name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise ModelLoadError(f"model: {name!r} is not a local model directory, a Hub id or a built-in model "
                             f"({', '.join(BUILTIN_MODELS)})")
    return False


def load_model(args: ModelArguments, class_names: list[str], default_image_size: int = 224) -> LoadedModel:
    """The classifier and its image processor for ``class_names`` (``id2label``/``label2id`` set from them).

    Pretrained weights keep everything but the classification head, which is re-initialized at the dataset's
    number of classes (``ignore_mismatched_sizes``). ``from_scratch`` builds the same architecture from its config.
    Raises :class:`ModelLoadError` (before any compute) when the model cannot be read.
    """
    labels = _label_maps(class_names)
    builtin = args.model in BUILTIN_MODELS or args.model.startswith(TIMM_PREFIX)
    if builtin and not os.path.isdir(args.model):
        size = args.image_size or default_image_size
        if size < 1:
            raise ModelLoadError(f"image_size must be >= 1; got {size!r}")
        if args.model.startswith(TIMM_PREFIX):
            try:
                extra = json.loads(args.timm_model_args) if args.timm_model_args else None
            except json.JSONDecodeError as err:
                raise ModelLoadError(f"timm_model_args must be a JSON object; got {args.timm_model_args!r}") from err
            try:
                model, processor = _timm_architecture(args.model[len(TIMM_PREFIX):], size, labels, extra)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ModelLoadError(f"model: could not build {args.model!r}: {err}") from err
        else:
            model, processor = BUILTIN_MODELS[args.model](size, labels)
        return LoadedModel(model, processor, None, True)
    is_local = _check_source(args.model)
    hub = {} if is_local else {"revision": args.model_revision, "cache_dir": args.cache_dir}
    try:
        config = AutoConfig.from_pretrained(args.model, **hub, **labels)
        processor = AutoImageProcessor.from_pretrained(args.model, **hub)
    except Exception as err:  # noqa: BLE001 - unreadable/offline/unknown: a user error with the cause
        raise ModelLoadError(f"model: could not load {args.model!r}: {type(err).__name__}: {_first_line(err)}"
                             f"{_missing_folder_hint(args.model)}") from err
    _check_image_classifier(args.model, config)
    if getattr(config, "label_names", None) is not None:  # timm wrapper: saved as label_names, which setdefault
        config.label_names = list(labels["id2label"].values())  # in to_dict would otherwise keep stale
    try:
        if args.from_scratch:
            model = AutoModelForImageClassification.from_config(config)
        else:
            model = AutoModelForImageClassification.from_pretrained(args.model, config=config,
                                                                    ignore_mismatched_sizes=True, **hub)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"model: could not build {args.model!r}: {type(err).__name__}: {_first_line(err)}") \
            from err
    base = None if (is_local or args.from_scratch) else args.model
    return LoadedModel(model, processor, base, args.from_scratch)


def _check_image_classifier(name: str, config: PretrainedConfig) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        raise ModelLoadError(f"model: {name!r} has model_type {config.model_type!r}, which has no image "
                             "classification head in transformers")


def _missing_folder_hint(name: str) -> str:
    """``outputs/x`` reads as a Hub id (owner ``outputs``) when no such folder exists; when its first part is a local
    folder the user most likely meant a path: say so."""
    head = name.split("/")[0]
    if "/" in name and os.path.isdir(head):
        return f" (tried as a Hub id: there is no local folder {name!r}, though {head + '/'!r} exists)"
    return ""


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def model_summary(model: PreTrainedModel) -> dict:
    """Architecture facts for the model card: class, parameter count, timm architecture if any."""
    config = model.config
    summary = {"architecture": type(model).__name__,
               "parameters": sum(p.numel() for p in model.parameters()),
               "model_type": config.model_type}
    if getattr(config, "architecture", None):
        summary["timm_architecture"] = config.architecture
    return summary


_DEFAULT_LABEL = re.compile(r"^LABEL_\d+$")


def load_trained_model(args: ModelArguments, class_names: list[str], default_image_size: int = 224) -> LoadedModel:
    """A trained classifier exactly as saved (no head resizing, no relabelling) and its image processor, for
    measuring it (``hf-gam flatness``). Raises :class:`ModelLoadError` when it cannot be read or when its classes
    do not match ``class_names`` (its ``num_labels``, or its ``id2label`` names unless they are transformers'
    placeholders ``LABEL_i``): measuring a head that is not the trained one would be meaningless. A built-in name
    (``tiny-resnet``, ``timm:...``) builds that model from scratch for ``class_names``, as :func:`load_model` does."""
    if (args.model in BUILTIN_MODELS or args.model.startswith(TIMM_PREFIX)) and not os.path.isdir(args.model):
        return load_model(args, class_names, default_image_size)
    is_local = _check_source(args.model)
    hub = {} if is_local else {"revision": args.model_revision, "cache_dir": args.cache_dir}
    try:
        config = AutoConfig.from_pretrained(args.model, **hub)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"model: could not load {args.model!r}: {type(err).__name__}: {_first_line(err)}") \
            from err
    _check_image_classifier(args.model, config)
    names = [str(n) for n in class_names]
    saved = [str(config.id2label[i]) for i in range(config.num_labels)] if config.id2label else []
    if config.num_labels != len(names):
        raise ModelLoadError(f"model: {args.model!r} has {config.num_labels} classes (num_labels) but the dataset has "
                             f"{len(names)}; measure it on the dataset it was trained on")
    if not all(_DEFAULT_LABEL.match(n) for n in saved) and saved != names:
        diff = next(i for i, (a, b) in enumerate(zip(saved, names)) if a != b)
        raise ModelLoadError(f"model: the classes of {args.model!r} (id2label) are not the dataset's: class {diff} is "
                             f"{saved[diff]!r} in the model but {names[diff]!r} in the dataset")
    try:
        processor = AutoImageProcessor.from_pretrained(args.model, **hub)
        model = AutoModelForImageClassification.from_pretrained(args.model, config=config, **hub)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"model: could not load {args.model!r}: {type(err).__name__}: {_first_line(err)}") \
            from err
    return LoadedModel(model, processor, None if is_local else args.model, False)
