"""The transforms of ``hf-gam train`` (``hf_gam.data.build_transforms``): every augmentation preset gives
model-sized tensors from images of any size and mode; for every augmenting preset the eval transform is the image
processor alone (deterministic, whatever the RNG) and the train transform augments (its output differs from eval's
and varies from call to call; checked on a non-constant image, where a pad-crop or a flip changes the pixels), with
an HF ViT processor and a timm model's processor; rows and batches for the Trainer; an unknown preset is an error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from testing_utils import random_image

from hf_gam.data import AUGMENTS, DataArguments, DataError, build_transforms, collate, load_image_data, with_transform

AUGMENTING = [a for a in AUGMENTS if a != "none"]


@pytest.fixture(scope="module")
def processors(tiny_vit_dir, tiny_timm_dir):
    from transformers import AutoImageProcessor

    return [AutoImageProcessor.from_pretrained(tiny_vit_dir), AutoImageProcessor.from_pretrained(tiny_timm_dir)]


def textured_image():
    """A 20x14 RGB image of random pixels: no flip, crop or colour operation leaves it unchanged."""
    return random_image(np.random.default_rng(0), 3).convert("RGB")


@pytest.mark.parametrize("augment", AUGMENTING)
def test_eval_transform_is_the_processor_alone(augment, processors):
    image = textured_image()
    for processor in processors:
        _, eval_tf = build_transforms(processor, augment, autoaugment_policy="cifar10")
        alone = processor(images=[image], return_tensors="pt")["pixel_values"][0]
        for seed in range(4):
            torch.manual_seed(seed)
            assert torch.equal(eval_tf(image), alone), f"{augment}: eval output depends on the RNG (seed {seed})"


@pytest.mark.parametrize("augment", AUGMENTING)
def test_train_transform_augments(augment, processors):
    image = textured_image()
    for processor in processors:
        train_tf, eval_tf = build_transforms(processor, augment, autoaugment_policy="cifar10")
        plain = eval_tf(image)
        torch.manual_seed(0)
        outputs = [train_tf(image) for _ in range(8)]
        assert all(o.shape == plain.shape for o in outputs)
        assert any(not torch.equal(o, plain) for o in outputs), f"{augment}: training does not augment"
        assert any(not torch.equal(o, outputs[0]) for o in outputs[1:]), f"{augment}: training is not random"


def test_no_augmentation_trains_on_the_eval_transform(processors):
    image = textured_image()
    for processor in processors:
        train_tf, eval_tf = build_transforms(processor, "none")
        torch.manual_seed(0)
        assert torch.equal(train_tf(image), eval_tf(image))


@pytest.mark.parametrize("augment", AUGMENTS)
def test_augment_presets_give_model_sized_tensors(augment, processors):
    rng = np.random.default_rng(0)
    images = [random_image(rng, i) for i in range(4)]  # RGB, grayscale, odd sizes, RGBA
    for processor in processors:
        train_tf, eval_tf = build_transforms(processor, augment, autoaugment_policy="cifar10")
        for tf in (train_tf, eval_tf):
            for im in images:
                out = tf(im.convert("RGB"))
                assert out.shape == (3, 16, 16) and out.dtype == torch.float32


def test_with_transform_and_collate_batch(hub_copies, tiny_vit_dir):
    from transformers import AutoImageProcessor

    data = load_image_data(DataArguments(dataset="pets", dataset_path=str(hub_copies["pets"])))
    train_tf, _ = build_transforms(AutoImageProcessor.from_pretrained(tiny_vit_dir), "basic")
    batch = collate([with_transform(data.train, train_tf)[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["labels"].dtype == torch.long


def test_unknown_augment_is_an_error(tiny_vit_dir):
    from transformers import AutoImageProcessor

    with pytest.raises(DataError, match="augment must be one of"):
        build_transforms(AutoImageProcessor.from_pretrained(tiny_vit_dir), "mixup")
