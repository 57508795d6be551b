"""The GAM model card parses back with ``huggingface_hub.ModelCard.load`` and carries the stock card's metadata:
license, language, tags, base model (Hub ids only), datasets, model-index results, the training-results table."""

from __future__ import annotations

import numpy as np
from huggingface_hub import ModelCard
from testing_utils import image_data, tiny_vit

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.trainer.card import is_hub_id, render_model_card

HUB_BASE = "google/vit-base-patch16-224-in21k"


def accuracy(pred):
    return {"accuracy": float(np.mean(pred.predictions.argmax(-1) == pred.label_ids))}


def trained(tmp_path, model, **kw):
    args = GAMConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=0.01,
                     optim="sgd", gam_mode="gam_fast", eval_strategy="steps", eval_steps=2, report_to="none",
                     use_cpu=True, disable_tqdm=True, save_strategy="no", **kw)
    trainer = GAMTrainer(model=model, args=args, train_dataset=image_data(), eval_dataset=image_data(4, seed=2),
                         compute_metrics=accuracy)
    trainer.train()
    return trainer


def test_card_metadata_parses_back(tmp_path):
    trainer = trained(tmp_path, tiny_vit(name_or_path=HUB_BASE))
    trainer.create_model_card(license="apache-2.0", language="en", tags=["my-tag"], dataset="uoft-cs/cifar10",
                              dataset_tags="uoft-cs/cifar10", dataset_args="plain_text")
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.license == "apache-2.0" and data.language == "en"
    assert {"my-tag", "gam", "sam", "gam_fast", "image-classification"} <= set(data.tags)
    assert data.base_model == HUB_BASE and data.datasets == ["uoft-cs/cifar10"]
    (result,) = data.eval_results  # model-index: accuracy on the dataset (the loss is not a model-index metric)
    last_eval = [h for h in trainer.state.log_history if "eval_accuracy" in h][-1]
    assert (result.task_type, result.dataset_type, result.dataset_config, result.metric_type) == (
        "image-classification", "uoft-cs/cifar10", "plain_text", "accuracy")
    assert result.metric_value == last_eval["eval_accuracy"]
    assert data.to_dict()["model-index"][0]["name"] == tmp_path.name
    text = card.text
    assert "### Training results" in text and "Validation Loss" in text
    table = text.split("### Training results")[1].split("##")[0]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines() if line.startswith("|")]
    assert rows[0][:4] == ["Training Loss", "Epoch", "Step", "Validation Loss"] and "Accuracy" in rows[0]
    assert [row[2] for row in rows[2:]] == ["2", "4"]  # one row per evaluation during training
    assert f"(https://huggingface.co/{HUB_BASE})" in text and " a an " not in text


def test_local_base_model_is_not_a_hub_link(tmp_path):
    local = tmp_path / "my-checkpoints" / "vit"
    local.mkdir(parents=True)
    trainer = trained(tmp_path / "out", tiny_vit(name_or_path=local))
    trainer.create_model_card(dataset="my local images")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model is None and card.data.datasets is None
    # a local dataset: its name is the model-index's dataset type, as in the stock Trainer's card
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.dataset_name, result.metric_type) == ("my local images", "my local images",
                                                                              "accuracy")
    assert "huggingface.co/" + str(local) not in card.text and "huggingface.co//" not in card.text
    assert "This model is an image classifier trained on my local images" in card.text


def test_is_hub_id(tmp_path):
    assert is_hub_id("google/efficientnet-b0") and is_hub_id("timm/vit_small_patch16_224.augreg_in21k_ft_in1k")
    for name in (None, "", "efficientnet", "./a/b", "~/a", "/abs/path", "a/b/c", str(tmp_path), "bad id/x y"):
        assert not is_hub_id(name), name


def test_card_grammar_and_architecture():
    args = GAMConfig(output_dir="unused", report_to="none", use_cpu=True)
    text = str(render_model_card(args, model_name="m", dataset_name="pets"))
    assert "This model is an image classifier trained on pets" in text and "a an" not in text
    text = str(render_model_card(args, model_name="m", extra={"architecture": "ViTForImageClassification",
                                                              "from_scratch": True}))
    assert ("This model is an image classifier (`ViTForImageClassification`) trained from randomly initialized "
            "weights") in text
