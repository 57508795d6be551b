"""Image preprocessing for ``hf-gam``: the model's own image processor, by construction.

Evaluation calls the processor itself (``processor(images=...)``): an HF image processor (torchvision backend where
transformers has one, the default of ``AutoImageProcessor`` in transformers 5) or a timm model's
``TimmWrapperImageProcessor``, whose ``val_transforms`` are timm's own eval transforms built from the model's
``pretrained_cfg``. Nothing here re-derives sizes, crops, interpolation or normalization. Training runs an
augmentation preset on the PIL image at its own size, then hands it to the same processor, so train and eval inputs
share one resize and one normalization (``include_top``, ``rescale_offset``, ``rescale_factor``, mean/std, ...).
Images of any PIL mode are first converted to RGB as the processors' own ``do_convert_rgb`` does (transformers'
``convert_to_rgb``: transparency composited onto white)."""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torchvision.transforms import v2 as T

from ..errors import DataError

Augment = Literal["none", "basic", "cutout", "randaugment", "autoaugment"]
AUGMENTS: tuple[str, ...] = get_args(Augment)


def to_rgb(image):
    """A PIL image in RGB, converted exactly as the image processors' ``do_convert_rgb=True`` converts it."""
    if image.mode == "RGB":
        return image
    from PIL import Image as PILImage
    from transformers.image_transforms import convert_to_rgb

    return PILImage.fromarray(convert_to_rgb(image, return_numpy=True))


class PadCrop:
    """A random crop of the image's own size after reflect-padding 1/8 of its shorter side (at least one pixel): the
    CIFAR recipe of the GAM/SAM papers (32 px, padding 4), at any image size."""

    def __call__(self, image):
        w, h = image.size
        pad = max(1, min(w, h) // 8)
        mode = "reflect" if min(w, h) > pad else "edge"
        return T.RandomCrop((h, w), padding=pad, padding_mode=mode)(image)


class ProcessorTransform:
    """PIL image(s) of any mode -> ``pixel_values`` from ``processor``: one image gives ``(C, H, W)``, a list gives
    ``(N, C, H, W)``. ``augment`` (PIL -> PIL) runs before the processor, ``erase`` (tensor -> tensor, on the
    normalized pixels) after it; without both this is ``processor(images=[to_rgb(im), ...])``."""

    def __init__(self, processor: Any, augment=None, erase=None):
        self.processor, self.augment, self.erase = processor, augment, erase

    def __call__(self, images):
        single = not isinstance(images, (list, tuple))
        images = [to_rgb(im) for im in ([images] if single else images)]
        if self.augment is not None:
            images = [self.augment(im) for im in images]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        if self.erase is not None:
            pixels = torch.stack([self.erase(p) for p in pixels])
        return pixels[0] if single else pixels


def build_transforms(processor: Any, augment: str = "none", autoaugment_policy: str = "imagenet"):
    """``(train_transform, eval_transform)`` (:class:`ProcessorTransform`) for ``processor``.

    Eval: the processor alone. Train: ``basic`` = :class:`PadCrop` + horizontal flip; ``cutout`` = basic, then one
    erased square of 1/4 of the side on the processor's output (value 0: the normalized mean, as in DeVries &
    Taylor's Cutout); ``randaugment`` / ``autoaugment`` = basic + torchvision's ``RandAugment`` / ``AutoAugment``
    (``autoaugment_policy``: imagenet, cifar10 or svhn); ``none`` = the eval transform. The processor then resizes
    and normalizes as for eval.
    """
    if augment not in AUGMENTS:
        raise DataError(f"augment must be one of {', '.join(AUGMENTS)}; got {augment!r}")
    eval_tf = ProcessorTransform(processor)
    if augment == "none":
        return eval_tf, eval_tf
    ops: list = [PadCrop(), T.RandomHorizontalFlip()]
    if augment == "randaugment":
        ops.append(T.RandAugment())
    elif augment == "autoaugment":
        ops.append(T.AutoAugment(T.AutoAugmentPolicy(autoaugment_policy)))
    erase = T.RandomErasing(p=1.0, scale=(1 / 16, 1 / 16), ratio=(1.0, 1.0), value=0) if augment == "cutout" else None
    return ProcessorTransform(processor, T.Compose(ops), erase), eval_tf


def with_transform(ds, transform):
    """A view of ``ds`` whose rows are ``{"pixel_values": tensor, "labels": int}``. A :class:`ProcessorTransform`
    processes each fetched batch in one processor call; any other callable is applied to each RGB image."""

    def apply(batch: dict[str, list]) -> dict[str, list]:
        if isinstance(transform, ProcessorTransform):
            pixels = list(transform(batch["image"]))
        else:
            pixels = [transform(to_rgb(im)) for im in batch["image"]]
        return {"pixel_values": pixels, "labels": batch["label"]}

    return ds.with_format(None).with_transform(apply)


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack ``pixel_values`` and ``labels`` of :func:`with_transform` rows into a batch."""
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)}
