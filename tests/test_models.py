"""hf_gam.cli.models: local save_pretrained directories (HF ViT, timm wrapper), head resizing with id2label/label2id,
from-scratch builds, built-in architectures, and clear errors for unreadable models. Offline."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from hf_gam.cli.models import ModelArguments, ModelLoadError, load_model, model_summary

NAMES = ["cat", "dog", "bird", "fish", "frog"]


def _head(model) -> torch.nn.Linear:
    return model.classifier if hasattr(model, "classifier") else model.timm_model.head


def test_hf_vit_head_resized_with_labels(tiny_vit_dir):
    loaded = load_model(ModelArguments(model=str(tiny_vit_dir)), NAMES)
    config = loaded.model.config
    assert config.id2label == dict(enumerate(NAMES)) and config.label2id == {n: i for i, n in enumerate(NAMES)}
    assert _head(loaded.model).out_features == 5
    assert loaded.base_model is None and not loaded.from_scratch  # a local directory is not a Hub base model
    assert type(loaded.processor).__name__.startswith("ViTImageProcessor")


def test_timm_wrapper_head_resized(tiny_timm_dir):
    loaded = load_model(ModelArguments(model=str(tiny_timm_dir)), NAMES)
    assert type(loaded.model).__name__ == "TimmWrapperForImageClassification"
    assert _head(loaded.model).out_features == 5
    assert loaded.model.config.id2label[4] == "frog"
    assert hasattr(loaded.processor, "data_config")
    assert model_summary(loaded.model)["timm_architecture"] == "test_vit"


@pytest.mark.parametrize("fixture", ["tiny_vit_dir", "tiny_timm_dir"])
def test_pretrained_keeps_backbone_from_scratch_does_not(fixture, request):
    path = str(request.getfixturevalue(fixture))
    torch.manual_seed(0)
    pre = load_model(ModelArguments(model=path), NAMES).model
    torch.manual_seed(1)
    scratch = load_model(ModelArguments(model=path, from_scratch=True), NAMES)
    assert scratch.from_scratch
    pre_sd, scratch_sd = pre.state_dict(), scratch.model.state_dict()
    body = [k for k, v in pre_sd.items() if v.is_floating_point() and v.numel() > 1 and "head" not in k
            and "classifier" not in k and "norm" not in k and "layernorm" not in k]
    assert body and any(not torch.equal(pre_sd[k], scratch_sd[k]) for k in body)
    saved = load_model(ModelArguments(model=path), NAMES).model.state_dict()
    assert all(torch.equal(pre_sd[k], saved[k]) for k in body)  # pretrained weights are the saved ones


@pytest.mark.parametrize("name,size", [("tiny-resnet", 32), ("tiny-vit", 8), ("timm:test_resnet", 32)])
def test_builtin_models_build_offline(name, size):
    loaded = load_model(ModelArguments(model=name), NAMES, default_image_size=size)
    assert loaded.from_scratch and loaded.base_model is None
    out = loaded.model(pixel_values=torch.randn(2, 3, size, size)).logits
    assert out.shape == (2, 5)
    assert loaded.model.config.id2label[0] == "cat"


def test_saved_model_round_trip_labels(tmp_path, tiny_timm_dir):
    loaded = load_model(ModelArguments(model=str(tiny_timm_dir)), NAMES)
    loaded.model.save_pretrained(tmp_path / "out")
    assert AutoConfig.from_pretrained(tmp_path / "out").id2label == dict(enumerate(NAMES))


def test_unreadable_models_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not a local model directory"):
        load_model(ModelArguments(model=str(tmp_path / "missing")), NAMES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(ModelArguments(model=str(tmp_path / "empty")), NAMES)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(ModelArguments(model=str(tmp_path / "broken")), NAMES)
    with pytest.raises(ModelLoadError, match="google/vit-base-patch16-224-in21k"):  # offline Hub id
        load_model(ModelArguments(model="google/vit-base-patch16-224-in21k"), NAMES)
    with pytest.raises(ModelLoadError, match="timm has no architecture"):
        load_model(ModelArguments(model="timm:no_such_net"), NAMES)


def test_not_an_image_classifier(tmp_path, tiny_vit_dir):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (bert / "preprocessor_config.json").write_text((tiny_vit_dir / "preprocessor_config.json").read_text())
    with pytest.raises(ModelLoadError, match="image classification"):
        load_model(ModelArguments(model=str(bert)), NAMES)
