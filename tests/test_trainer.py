"""GAMTrainer as glue: bit-exact `none`, real model families, failure safety, BatchNorm, logs, flops, argument
conversion and refusals, the model card, parameters the loss does not reach. (Its losses: test_losses.py.)"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from testing_utils import (
    ALL_MODES,
    HP,
    image_data,
    params_of,
    sgd_args,
    tiny_data,
    tiny_efficientnet,
    tiny_model,
    tiny_swin,
    tiny_timm,
    tiny_vit,
    train_args,
)
from transformers import Trainer, TrainingArguments

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.core.directions import MODES

# the real families at 32 px
FAMILIES = {"vit": partial(tiny_vit, image_size=32), "swin": partial(tiny_swin, image_size=32),
            "efficientnet": partial(tiny_efficientnet, image_size=32),
            "timm": partial(tiny_timm, "test_efficientnet")}


def bn_buffers(model):
    return [b.detach().clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n]


@pytest.mark.parametrize("make", [lambda: tiny_model(dtype=torch.float32), FAMILIES["vit"]], ids=["mlp", "vit"])
def test_none_is_trainer_bit_for_bit(tmp_path, make):
    data = tiny_data(dtype=torch.float32) if make().config.model_type.startswith("hf-gam") else image_data(16, size=32)
    ref_model, gam_model = make(), make()
    ref = Trainer(model=ref_model, args=train_args(tmp_path / "r", TrainingArguments), train_dataset=data)
    gam = GAMTrainer(model=gam_model, args=train_args(tmp_path / "g", gam_mode="none"), train_dataset=data)
    ref.train()
    gam.train()
    for a, b in zip(ref_model.parameters(), gam_model.parameters()):
        assert torch.equal(a, b)
    ref_losses = [h["loss"] for h in ref.state.log_history if "loss" in h]
    assert ref_losses == [h["loss"] for h in gam.state.log_history if "loss" in h]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ALL_MODES)
def test_one_step_every_family_and_mode(tmp_path, family, mode):
    model = FAMILIES[family]()
    before = params_of(model)
    trainer = GAMTrainer(model=model, args=train_args(tmp_path, gam_mode=mode, max_steps=1,
                                                      gradient_accumulation_steps=1),
                         train_dataset=image_data(4, size=32))
    trainer.train()
    after = params_of(model)
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    logs = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(logs["loss"]))
    assert (mode == "none") == ("gam/grad_norm" not in logs)


class FailingTrainer(GAMTrainer):
    """Raises inside the ``fail_at``-th pass of a step (1 = the clean pass)."""

    fail_at = 1

    def _mean_loss(self, model, inputs):
        self.calls = getattr(self, "calls", 0) + 1
        loss = super()._mean_loss(model, inputs)
        if self.calls == self.fail_at:
            raise RuntimeError(f"injected failure in pass {self.calls}")
        return loss


@pytest.mark.parametrize("mode,fail_at", [(m, k) for m, spec in MODES.items() if m != "none"
                                          for k in range(1, spec.oracle_calls + 1)])
def test_weights_and_bn_restored_after_failure(tmp_path, mode, fail_at):
    model = tiny_model(batchnorm=True)
    trainer = FailingTrainer(model=model, args=sgd_args(tmp_path, gam_mode=mode, **HP), train_dataset=tiny_data())
    trainer.fail_at = fail_at
    batch = {"pixel_values": tiny_data().x, "labels": tiny_data().y}
    weights, stats = params_of(model), bn_buffers(model)
    with pytest.raises(RuntimeError, match="injected failure"):
        trainer.training_step(model, batch, num_items_in_batch=torch.tensor(16))
    assert all(torch.equal(a, b) for a, b in zip(weights, params_of(model)))
    assert all(torch.equal(a, b) for a, b in zip(stats, bn_buffers(model)))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", [m for m in ALL_MODES if m != "none"])
def test_bn_statistics_come_from_clean_pass_only(tmp_path, mode):
    model = tiny_model(batchnorm=True)
    clean = copy.deepcopy(model).train()
    batch = {"pixel_values": tiny_data().x, "labels": tiny_data().y}
    with torch.no_grad():
        clean(pixel_values=batch["pixel_values"])  # one train-mode forward: what the statistics should become
    trainer = GAMTrainer(model=model, args=sgd_args(tmp_path, gam_mode=mode, **HP), train_dataset=tiny_data())
    weights = params_of(model)
    trainer.training_step(model, batch, num_items_in_batch=torch.tensor(16))
    for a, b in zip(bn_buffers(clean), bn_buffers(model)):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(weights, params_of(model)))  # the step leaves θ clean


def test_logs_and_flops(tmp_path):
    trainer = GAMTrainer(model=tiny_vit(image_size=32),
                         args=train_args(tmp_path, gam_mode="gam", max_steps=2, gam_every=2),
                         train_dataset=image_data(16, size=32))
    trainer.train()
    first, second = [h for h in trainer.state.log_history if "loss" in h][:2]
    assert {"gam/grad_norm", "gam/ascent_grad_norm", "gam/r1"} <= set(first)
    assert first["gam/r1"] == pytest.approx(trainer.args.gam_rho * first["gam/ascent_grad_norm"], rel=1e-6)
    assert "gam/grad_norm" not in second  # step 1 is a plain step under gam_every=2
    batch = {"pixel_values": image_data(4, size=32).x, "labels": image_data(4, size=32).y}
    plain = Trainer.floating_point_ops(trainer, batch)
    trainer.state.global_step = 0
    assert trainer.floating_point_ops(batch) == MODES["gam"].passes * plain
    trainer.state.global_step = 1
    assert trainer.floating_point_ops(batch) == plain


def test_plain_training_arguments_converted(tmp_path, caplog):
    """A script that keeps its TrainingArguments and swaps only Trainer -> GAMTrainer gets a GAMConfig with every
    TrainingArguments value kept (hub_token included) and the gam_* defaults: gam_fast."""
    import logging

    plain = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, learning_rate=3e-3, eval_strategy="steps",
                              logging_steps=7, report_to="none", hub_token="secret", optim="sgd",
                              lr_scheduler_type="cosine", warmup_steps=0.1, gradient_checkpointing=True)
    with caplog.at_level(logging.INFO, logger="hf_gam.trainer"):
        trainer = GAMTrainer(model=tiny_model(), args=plain, eval_dataset=tiny_data())
    args = trainer.args
    assert type(args) is GAMConfig and args.gam_mode == "gam_fast" and (args.gam_rho, args.gam_alpha) == (0.2, 0.6)
    assert {k: v for k, v in args.to_dict().items() if k in plain.to_dict()} == plain.to_dict()
    assert args.hub_token == "secret" and args.eval_steps == 7 and args.activation_checkpointing is True
    assert any("TrainingArguments converted to GAMConfig" in r.getMessage() for r in caplog.records)


def test_other_training_arguments_subclass_converted(tmp_path):
    from transformers import Seq2SeqTrainingArguments

    trainer = GAMTrainer(model=tiny_model(), args=Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", predict_with_generate=True, seed=5))
    assert isinstance(trainer.args, GAMConfig) and trainer.args.seed == 5
    assert trainer.args.predict_with_generate is True  # a field GAMConfig lacks, kept as an attribute


def test_default_mode_is_gam_fast(tmp_path):
    assert GAMConfig(output_dir=str(tmp_path), use_cpu=True).gam_mode == "gam_fast"
    assert GAMTrainer(model=tiny_model(), args=None).args.gam_mode == "gam_fast"


REENTRANT_SPELLINGS = {
    "gradient_dict": dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
    "gradient_json": dict(gradient_checkpointing=True, gradient_checkpointing_kwargs='{"use_reentrant": true}'),
    "activation_dict": dict(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True}),
    "activation_json": dict(activation_checkpointing=True,
                            activation_checkpointing_kwargs='{"use_reentrant": true}'),
    "mixed": dict(gradient_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True}),
}


@pytest.mark.parametrize("spelling", list(REENTRANT_SPELLINGS))
def test_reentrant_checkpointing_refused_every_spelling(tmp_path, spelling):
    kw = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", **REENTRANT_SPELLINGS[spelling])
    with pytest.raises(ValueError, match="reentrant.*gam_fast|gam_fast.*reentrant"):
        GAMConfig(**kw)
    with pytest.raises(ValueError, match="use_reentrant"):  # plain TrainingArguments: refused at conversion
        GAMTrainer(model=tiny_model(), args=TrainingArguments(**kw))
    assert GAMConfig(gam_mode="none", **kw).activation_checkpointing_kwargs == {"use_reentrant": True}


@pytest.mark.parametrize("mode", ["gam", "gam_fast"])
def test_gradient_checkpointing_non_reentrant_matches_plain(tmp_path, mode):
    """Activation checkpointing (transformers' non-reentrant default) gives the same step as without it."""
    results = []
    for ckpt in (False, True):
        model = tiny_vit(image_size=32)
        GAMTrainer(model=model, args=train_args(tmp_path / str(ckpt), gam_mode=mode, max_steps=1,
                                                gradient_accumulation_steps=1, gradient_checkpointing=ckpt),
                   train_dataset=image_data(4, size=32)).train()
        results.append(params_of(model))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_create_model_card_is_the_gam_card(tmp_path):
    trainer = GAMTrainer(model=tiny_vit(image_size=32), args=train_args(tmp_path, gam_mode="gam_fast", max_steps=1,
                                                                        gam_every=10),
                         train_dataset=image_data(8, size=32))
    trainer.train()
    trainer.create_model_card(dataset="uoft-cs/cifar10", results={"eval_accuracy": 0.5})
    card = (tmp_path / "README.md").read_text()
    for text in ("gam_fast", "gam_rho", "gam_every", "0.5", "uoft-cs/cifar10", "Gradient Norm Aware Minimization",
                 "- gam", "- sam", "image-classification"):
        assert text in card, text


def test_logged_rho_and_r1_are_those_of_the_step(tmp_path):
    """lr_proportional with a linear schedule: step t runs at lr_t = lr (1 - t/3); the log written after step t
    shows that step's ρ (not step t+1's) and r1 = ρ_t ‖g(θ_a)‖."""
    args = train_args(tmp_path, gam_mode="gam_fast", gam_rho_schedule="lr_proportional", lr_scheduler_type="linear",
                      gradient_accumulation_steps=1, per_device_train_batch_size=16, max_steps=3)
    trainer = GAMTrainer(model=tiny_model(dtype=torch.float32), args=args, train_dataset=tiny_data(dtype=torch.float32))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        rho = args.gam_hyper(args.learning_rate * (1 - (h["step"] - 1) / 3)).rho
        assert h["gam/rho"] == pytest.approx(rho, rel=1e-9)
        assert h["gam/r1"] == pytest.approx(rho * h["gam/ascent_grad_norm"], rel=1e-6)
    assert len({h["gam/rho"] for h in logs}) == 3


def test_rho_schedule_peak_is_the_optimizers_initial_lr(tmp_path):
    """optimizer_cls_and_kwargs sets its own lr (0.25) while args.learning_rate is 1.0, constant schedule: the
    optimizer runs at its peak all along, so every step's ρ is the full gam_rho (lr / args.learning_rate would give
    ρ (r + (1 - r) / 4))."""
    args = train_args(tmp_path, gam_mode="gam_fast", gam_rho_schedule="lr_proportional", lr_scheduler_type="constant",
                      learning_rate=1.0, gradient_accumulation_steps=1, per_device_train_batch_size=16, max_steps=2)
    trainer = GAMTrainer(model=tiny_model(dtype=torch.float32), args=args, train_dataset=tiny_data(dtype=torch.float32),
                         optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.25}))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["gam/rho"] == pytest.approx(args.gam_rho, rel=1e-12) for h in logs)


def test_gam_logs_averaged_over_processes(tmp_path, monkeypatch):
    """One all-reduce of [Σ, count] per figure per log: the logged value is the mean over every micro-batch of
    every process (faked here: a second process that recorded 2 micro-batches with grad_norm summing to 8 and one
    ascent_grad_norm of 5, which this process never recorded)."""
    import types

    import hf_gam.core.collectives as collectives

    calls = []

    def all_reduce(t, op=None):
        calls.append(t.clone())
        t += torch.tensor([8.0, 2.0, 5.0, 1.0, 0.0, 0.0], dtype=t.dtype)

    fake = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, get_world_size=lambda: 2,
                                 all_reduce=all_reduce, ReduceOp=torch.distributed.ReduceOp)
    monkeypatch.setattr(collectives, "dist", fake)
    trainer = GAMTrainer(model=tiny_model(), args=train_args(tmp_path, gam_mode="sam"))
    hyper = trainer.args.gam_hyper()
    for g in (1.0, 3.0):
        trainer._record({"grad_norm": torch.tensor(g)}, hyper)
    trainer.log({"loss": 1.0})
    trainer.log({"eval_loss": 1.0})  # evaluation logs: no collective (not every process writes them)
    assert len(calls) == 1
    logged = trainer.state.log_history[0]
    assert logged["gam/grad_norm"] == pytest.approx((1 + 3 + 8) / 4)
    assert logged["gam/ascent_grad_norm"] == pytest.approx(5.0) and "gam/r1" not in logged


# ------------------------------------------------------------------ parameters the loss does not reach
def tiny_dinov2():
    """A 1-layer HF Dinov2 classifier (16 px, 8 px patches): its ``mask_token`` is used only with
    ``bool_masked_pos``, so a classification loss never reaches it (set to ones: zero weights would hide decay)."""
    from transformers import Dinov2Config, Dinov2ForImageClassification

    torch.manual_seed(0)
    model = Dinov2ForImageClassification(Dinov2Config(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=32, num_labels=3))
    with torch.no_grad():
        model.dinov2.embeddings.mask_token.fill_(1.0)
    return model


@pytest.mark.parametrize("mode,perturbation", [("stock", None), ("sam", "local"), ("sam", "global"),
                                               ("gam_fast", "local"), ("gam_fast", "global")])
def test_unreached_parameter_not_decayed(tmp_path, mode, perturbation):
    """A parameter the loss does not reach keeps ``.grad`` None, so AdamW's weight decay does not shrink it: as the
    stock Trainer leaves it, GAMTrainer leaves it bit-identical, in both perturbations."""
    model = tiny_dinov2()
    mask0, head0 = model.dinov2.embeddings.mask_token.detach().clone(), model.classifier.weight.detach().clone()
    if mode == "stock":
        args = train_args(tmp_path, TrainingArguments, weight_decay=0.5, max_steps=2, learning_rate=1e-2)
        trainer = Trainer(model=model, args=args, train_dataset=image_data(8))
    else:
        args = train_args(tmp_path, gam_mode=mode, gam_perturbation=perturbation, weight_decay=0.5, max_steps=2,
                          learning_rate=1e-2)
        trainer = GAMTrainer(model=model, args=args, train_dataset=image_data(8))
    trainer.train()
    assert torch.equal(model.dinov2.embeddings.mask_token, mask0)
    assert not torch.equal(model.classifier.weight, head0)


class RecordingTrainer(GAMTrainer):
    """Keeps every micro-batch's gradient norm as ``_record`` sees it."""

    def _record(self, stats, hyper):
        self.norms = getattr(self, "norms", []) + [stats["grad_norm"].item()]
        super()._record(stats, hyper)


def test_gam_figures_kept_as_fixed_size_sums(tmp_path):
    """Without logging nothing grows per step: six running numbers ([Σ, count] of three figures) whatever the step
    count; with logging every 2 steps each log is the mean over its window's micro-batches."""
    silent = RecordingTrainer(model=tiny_model(dtype=torch.float32), args=train_args(
        tmp_path / "s", gam_mode="sam", max_steps=6, logging_strategy="no"), train_dataset=tiny_data(dtype=torch.float32))
    silent.train()
    assert silent._gam_sums.numel() == 6
    assert silent._gam_sums[1].item() == len(silent.norms) == 12  # 6 steps x 2 micro-batches, nothing lost
    assert silent._gam_sums[0].item() == pytest.approx(sum(silent.norms), rel=1e-6)

    logged = RecordingTrainer(model=tiny_model(dtype=torch.float32), args=train_args(
        tmp_path / "l", gam_mode="sam", max_steps=4, logging_steps=2), train_dataset=tiny_data(dtype=torch.float32))
    logged.train()
    logs = [h["gam/grad_norm"] for h in logged.state.log_history if "loss" in h]
    norms = logged.norms
    assert logs == pytest.approx([sum(norms[:4]) / 4, sum(norms[4:]) / 4], rel=1e-6)


def test_logged_rho_of_sam_is_its_own_radius(tmp_path):
    """``gam_mode="sam"`` ascends by ``sam_rho`` (here 0.5, not ``gam_rho`` 0.3): under ``lr_proportional`` the
    logged ``gam/rho`` is that step's SAM radius."""
    args = train_args(tmp_path, gam_mode="sam", gam_rho=0.3, sam_rho=0.5, gam_rho_schedule="lr_proportional",
                      lr_scheduler_type="linear", gradient_accumulation_steps=1, per_device_train_batch_size=16,
                      max_steps=3)
    trainer = GAMTrainer(model=tiny_model(dtype=torch.float32), args=args, train_dataset=tiny_data(dtype=torch.float32))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    r = args.gam_rho_min_ratio
    for h in logs:  # ρs_t = ρs (r + (1 - r) lr_t / lr), lr_t = lr (1 - t/3) at step t = h["step"] - 1
        assert h["gam/rho"] == pytest.approx(0.5 * (r + (1 - r) * (1 - (h["step"] - 1) / 3)), rel=1e-9)
    assert len({h["gam/rho"] for h in logs}) == 3


def test_docstring_names_every_override():
    """The module docstring's list of overrides is complete: every Trainer method GAMTrainer or one of its hf_gam
    mixins redefines is named."""
    import hf_gam.trainer.trainer as module
    from transformers import Trainer

    own = [cls for cls in GAMTrainer.__mro__ if cls.__module__.startswith("hf_gam.")]
    overrides = sorted({name for cls in own for name in vars(cls) if callable(getattr(Trainer, name, None))})
    assert "training_step" in overrides and "_load_best_model" in overrides
    missing = [name for name in overrides if f"``{name}``" not in module.__doc__]
    assert not missing, f"overrides missing from hf_gam.trainer.trainer's docstring: {missing}"
