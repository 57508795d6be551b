"""Resume and ``load_best_model_at_end`` restore every tensor of HF models whose modules transformers 5 renamed.

``save_pretrained`` writes ViT / Swin under their legacy key names; the stock Trainer reloads checkpoints with a
non-strict ``load_state_dict`` and silently skips those tensors. :mod:`hf_gam.trainer.checkpoints` converts the keys with
the model's own conversion mapping (as ``from_pretrained`` does) and refuses anything missing or unexpected."""

from __future__ import annotations

import os
from functools import partial

import pytest
import safetensors.torch
import torch
from testing_utils import TIMM_VIT_16PX, image_data, tiny_efficientnet, tiny_swin, tiny_timm, tiny_vit
from transformers import ViTForImageClassification

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.trainer.checkpoints import CheckpointMismatchError  # noqa: E402

SLOW = pytest.mark.slow
SGD_MOMENTUM = (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})  # the kwargs must carry lr (else SGD's 1e-3)


def build(factory, seed):
    torch.manual_seed(seed)
    return factory()


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, save_strategy="steps", save_steps=2,
                learning_rate=0.05, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=0.0,
                gam_mode="gam", gam_every=2, gam_rho_schedule="lr_proportional", report_to="none", use_cpu=True,
                disable_tqdm=True, logging_steps=1, seed=0, save_only_model=False)
    return GAMConfig(**{**base, **kw})


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(expected, model):
    got = model.state_dict()
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ: {different[:4]}"


def resume_matches_uninterrupted(tmp_path, factory, size=16, first=None):
    first = factory(seed=0) if first is None else first
    full = GAMTrainer(model=first, args=args(tmp_path / "full"), train_dataset=image_data(16, size=size),
                      optimizer_cls_and_kwargs=SGD_MOMENTUM)
    full.train()
    assert full.state.global_step == 4 and full.gam_counters is not None
    resumed = GAMTrainer(model=factory(seed=123), args=args(tmp_path / "resumed"),
                         train_dataset=image_data(16, size=size), optimizer_cls_and_kwargs=SGD_MOMENTUM)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert_same_state(state_of(full.model), resumed.model)


def test_vit_resume_is_bit_exact(tmp_path, tiny_vit_dir):
    """The run starts from ``from_pretrained`` weights (the user's path); the resumed model is a fresh one."""
    resume_matches_uninterrupted(tmp_path, tiny_vit, first=ViTForImageClassification.from_pretrained(tiny_vit_dir))


@pytest.mark.parametrize("factory, size", [  # EfficientNet and timm keep their key names: regression coverage
    pytest.param(tiny_swin, 16, id="swin"), pytest.param(tiny_efficientnet, 32, id="efficientnet", marks=SLOW),
    pytest.param(partial(tiny_timm, model_args=TIMM_VIT_16PX), 16, id="timm", marks=SLOW)])
def test_resume_is_bit_exact(tmp_path, factory, size):
    resume_matches_uninterrupted(tmp_path, factory, size)


def test_best_model_reload_equals_the_best_checkpoint(tmp_path):
    scores = iter([1.0, 0.0])
    trainer = GAMTrainer(
        model=tiny_vit(seed=0),
        args=args(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                  metric_for_best_model="score", greater_is_better=True),
        train_dataset=image_data(16), eval_dataset=image_data(4, seed=5), optimizer_cls_and_kwargs=SGD_MOMENTUM,
        compute_metrics=lambda _: {"score": next(scores)})
    trainer.train()
    best = tmp_path / "checkpoint-2"
    assert trainer.state.best_model_checkpoint == str(best)
    reference = ViTForImageClassification.from_pretrained(best)  # transformers' own loading (key conversion)
    last = ViTForImageClassification.from_pretrained(tmp_path / "checkpoint-4")
    assert any(not torch.equal(a, b) for a, b in zip(reference.state_dict().values(), last.state_dict().values()))
    assert_same_state(state_of(reference), trainer.model)


def tamper(checkpoint, drop=None, add=None):
    path = os.path.join(checkpoint, "model.safetensors")
    tensors = safetensors.torch.load_file(path)
    if drop:
        tensors.pop(drop)
    if add:
        tensors[add] = torch.zeros(2)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("change", [{"drop": "vit.encoder.layer.0.attention.attention.query.weight"},
                                    {"add": "vit.encoder.layer.0.extra.weight"},
                                    {"drop": "classifier.bias", "add": "classifier.bias.bad"}])
def test_missing_or_unexpected_tensors_are_refused(tmp_path, change):
    tiny_vit(seed=0).save_pretrained(tmp_path / "ckpt")
    tamper(tmp_path / "ckpt", **change)
    trainer = GAMTrainer(model=tiny_vit(seed=1), args=args(tmp_path / "out"), train_dataset=image_data(16))
    before = state_of(trainer.model)
    with pytest.raises(CheckpointMismatchError) as err:
        trainer._load_from_checkpoint(str(tmp_path / "ckpt"))
    for key in change.values():
        assert key.replace("vit.encoder.layer.0.attention.attention.query", "vit.layers.0.attention.q_proj") \
            in str(err.value) or key in str(err.value)
    assert str(tmp_path / "ckpt") in str(err.value)
    assert_same_state(before, trainer.model)  # nothing copied before the check


def test_sharded_checkpoint_is_restored_through_the_conversion(tmp_path):
    source = tiny_vit(seed=0)
    source.save_pretrained(tmp_path / "ckpt", max_shard_size="4KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    trainer = GAMTrainer(model=tiny_vit(seed=1), args=args(tmp_path / "out"), train_dataset=image_data(16))
    trainer._load_from_checkpoint(str(tmp_path / "ckpt"))
    assert_same_state(state_of(source), trainer.model)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_converters_and_tied_weights(tmp_path, tied):
    """Beyond renames: a Mixtral checkpoint stores one tensor per expert, the model one fused tensor (transformers'
    MergeModulelist + Concatenate converters); tied embeddings are saved once."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from hf_gam.trainer.checkpoints import load_model_weights, read_checkpoint_weights

    config = MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
                           tie_word_embeddings=tied)
    source = build(lambda: MixtralForCausalLM(config), 0)
    source.save_pretrained(tmp_path)
    saved = read_checkpoint_weights(str(tmp_path))
    assert "model.layers.0.block_sparse_moe.experts.1.w3.weight" in saved and ("lm_head.weight" in saved) != tied
    target = build(lambda: MixtralForCausalLM(config), 1)
    load_model_weights(target, saved)
    assert_same_state(state_of(source), target)
