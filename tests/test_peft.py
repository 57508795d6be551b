"""PEFT LoRA adapters train with GAMTrainer in every mode: only the adapter and ``modules_to_save`` weights move
(the frozen base stays bit-identical), ``save_model`` writes just the adapter, and the card keeps PEFT's metadata."""

from __future__ import annotations

import os

import pytest
import torch
from huggingface_hub import ModelCard
from testing_utils import image_data, tiny_vit

from hf_gam import GAMConfig, GAMTrainer

peft = pytest.importorskip("peft")

HUB_BASE = "google/vit-base-patch16-224-in21k"
MODES = ["none", "sam", "gnp", "gam", "gam_sam", "gam_fast"]


def base_vit():
    return tiny_vit(name_or_path=HUB_BASE)  # as from_pretrained(HUB_BASE) names it


def lora_vit():
    # transformers 5 module names (ViT's attention is q_proj / k_proj / v_proj / o_proj since the rename)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    return peft.get_peft_model(base_vit(), config)


def train_lora(tmp_path, mode, **kw):
    model = lora_vit()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args = GAMConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=0.1,
                     optim="sgd", gam_mode=mode, report_to="none", use_cpu=True, disable_tqdm=True,
                     save_strategy="no", **kw)
    trainer = GAMTrainer(model=model, args=args, train_dataset=image_data(12))
    trainer.train()
    return trainer, before


@pytest.mark.parametrize("mode", MODES)
def test_lora_trains_only_the_adapter_and_saves_only_it(tmp_path, mode):
    trainer, before = train_lora(tmp_path, mode)
    model = trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen = set(before) - trainable
    assert frozen and not (changed & frozen), sorted(changed & frozen)  # the base is bit-identical
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert {n for n in changed if "modules_to_save" in n} == {n for n in trainable if "modules_to_save" in n}
    assert any("lora_B" in n for n in changed)

    trainer.save_model()
    files = set(os.listdir(tmp_path))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "config.json"}
    reloaded = peft.PeftModel.from_pretrained(base_vit(), str(tmp_path))  # the adapter alone restores the model
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, after[key]), key


def test_lora_card_keeps_peft_metadata(tmp_path):
    trainer, _ = train_lora(tmp_path, "gam_fast")
    trainer.save_model()  # PEFT writes its README; ours replaces it and must keep PEFT's metadata
    trainer.create_model_card(license="apache-2.0", dataset="uoft-cs/cifar10")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == HUB_BASE
    assert {f"base_model:adapter:{HUB_BASE}", "lora", "transformers", "gam", "gam_fast"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "image-classification"
    for text in ("LoRA adapter", "| `r` | 4 |", "| `lora_alpha` | 8 |", "| `target_modules` | q_proj, v_proj |",
                 "| `modules_to_save` | classifier |", "- peft "):
        assert text in card.text, text


def test_lora_resume_is_bit_exact(tmp_path):
    """Adapter checkpoints resume through PEFT's own ``load_adapter`` (hf_gam leaves them to the stock Trainer)."""
    sgd = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, gam_every=2, gam_rho_schedule="lr_proportional",
              lr_scheduler_type="linear")
    runs = []
    for name, resume in (("full", None), ("resumed", str(tmp_path / "full" / "checkpoint-2"))):
        args = GAMConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, learning_rate=0.1,
                         gam_mode="gam", report_to="none", use_cpu=True, disable_tqdm=True, **kw)
        trainer = GAMTrainer(model=lora_vit(), args=args, train_dataset=image_data(16),
                             optimizer_cls_and_kwargs=sgd)
        trainer.train(resume_from_checkpoint=resume)
        runs.append(trainer.model.state_dict())
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]), key


def test_lora_best_model_reload_equals_the_best_checkpoint(tmp_path):
    scores = iter([1.0, 0.0])
    args = GAMConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=0.1,
                     optim="sgd", gam_mode="gam_fast", report_to="none", use_cpu=True, disable_tqdm=True,
                     save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                     load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True)
    trainer = GAMTrainer(model=lora_vit(), args=args, train_dataset=image_data(16), eval_dataset=image_data(4, seed=2),
                         compute_metrics=lambda _: {"score": next(scores)})
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = peft.PeftModel.from_pretrained(base_vit(), str(tmp_path / "checkpoint-2")).state_dict()
    last = peft.PeftModel.from_pretrained(base_vit(), str(tmp_path / "checkpoint-4")).state_dict()
    assert any(not torch.equal(best[k], last[k]) for k in best)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, best[key]), key
