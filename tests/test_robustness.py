"""Mixed precision, non-finite values, clipping, resume, sharded engines and memory: the step stays correct."""

from __future__ import annotations

import gc
import json
import logging
import os

import pytest
import torch
from reference import direction, flat_params, loss_of
from testing_utils import (
    ALL_MODES,
    HP,
    Recorder,
    assert_rel,
    image_data,
    one_step,
    params_of,
    ref_kwargs,
    sgd_args,
    tiny_data,
    tiny_model,
    tiny_vit,
)
from transformers import TrainerCallback

from hf_gam import GAMConfig, GAMTrainer


@pytest.mark.parametrize("mode", ALL_MODES)
def test_bf16_every_mode(tmp_path, mode):
    model = tiny_vit(image_size=32)
    before = params_of(model)
    args = GAMConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True, gam_mode=mode, max_steps=1,
                     per_device_train_batch_size=4, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = GAMTrainer(model=model, args=args, train_dataset=image_data(4, size=32))
    trainer.train()
    after = params_of(model)
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


class NaNTrainer(Recorder):
    """Returns a NaN loss from the ``nan_at``-th pass of the step (1 = the clean pass)."""

    nan_at = 2

    def _mean_loss(self, model, inputs):
        self.calls = getattr(self, "calls", 0) + 1
        loss = super()._mean_loss(model, inputs)
        return loss * float("nan") if self.calls == self.nan_at else loss


@pytest.mark.parametrize("mode", ["sam", "gam", "gam_fast"])
def test_nan_in_perturbed_pass_falls_back_to_clean_gradient(tmp_path, mode, caplog):
    model = tiny_model()
    theta0 = flat_params(model)
    trainer = NaNTrainer(model=model, args=sgd_args(tmp_path, gam_mode=mode, **HP), train_dataset=tiny_data())
    with caplog.at_level(logging.WARNING, logger="hf_gam.trainer"):
        trainer.train()
    (batch,) = trainer.seen
    g = direction("none", loss_of(model, batch), theta0, rho=0.1, alpha=0.0)
    assert_rel(theta0 - flat_params(model), g)
    assert trainer.gam_counters["nonfinite_fallbacks"] == 1
    assert "non-finite" in caplog.text
    assert trainer.state.log_history[0]["gam/nonfinite_fallbacks"] == 1


def test_nan_in_clean_pass_raises_naming_the_pass(tmp_path):
    model = tiny_model()
    weights = params_of(model)
    trainer = NaNTrainer(model=model, args=sgd_args(tmp_path, gam_mode="gam", **HP), train_dataset=tiny_data())
    trainer.nan_at = 1
    with pytest.raises(FloatingPointError, match="clean pass"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(weights, params_of(model)))


def scaled_trainer(tmp_path, mode, trainer_cls=GAMTrainer, **kw):
    """A trainer whose accelerator carries a real CPU ``torch.amp.GradScaler`` (what fp16 installs on CUDA):
    accelerate's optimizer then unscales, checks for inf, steps and updates the scale exactly as under fp16."""
    trainer = trainer_cls(model=tiny_model(dtype=torch.float32),
                          args=sgd_args(tmp_path, gam_mode=mode, lr_scheduler_type="linear", max_steps=2, **HP, **kw),
                          train_dataset=tiny_data(dtype=torch.float32))
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    return trainer


@pytest.mark.parametrize("mode", ["sam", "gam", "gam_fast"])
def test_fp16_grad_scaler_step_equals_unscaled_step(tmp_path, mode):
    plain = GAMTrainer(model=tiny_model(dtype=torch.float32),
                       args=sgd_args(tmp_path / "p", gam_mode=mode, max_steps=1, **HP),
                       train_dataset=tiny_data(dtype=torch.float32))
    plain.train()
    scaled = scaled_trainer(tmp_path / "s", mode, max_grad_norm=1e9)
    scaled.args.max_steps = 1
    scaled.train()
    assert scaled.accelerator.scaler.get_scale() == 2.0**12
    for a, b in zip(params_of(plain.model), params_of(scaled.model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class OverflowTrainer(GAMTrainer):
    def _mean_loss(self, model, inputs):
        self.calls = getattr(self, "calls", 0) + 1
        loss = super()._mean_loss(model, inputs)
        return loss * float("inf") if self.calls == 2 else loss  # the first step's first perturbed pass


def test_fp16_overflow_in_a_perturbed_pass_skips_the_whole_step(tmp_path):
    trainer = scaled_trainer(tmp_path, "gam_fast", trainer_cls=OverflowTrainer)
    trainer.args.max_steps = 1
    weights = params_of(trainer.model)
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(weights, params_of(trainer.model)))  # step skipped, θ clean
    assert trainer.accelerator.scaler.get_scale() == 2.0**11  # the scaler saw the overflow
    assert trainer.accelerator.optimizer_step_was_skipped
    assert trainer.lr_scheduler.last_epoch == 0  # the scheduler was not stepped
    assert trainer.gam_counters["overflow_steps"] == 1


def test_clipping_applies_once_to_the_final_direction(tmp_path):
    trainer, theta0, theta1 = one_step(tmp_path, gam_mode="gam", max_grad_norm=0.01, **HP)
    (batch,) = trainer.seen
    d = direction("gam", loss_of(trainer.model, batch), theta0, **ref_kwargs(trainer.args))
    assert d.norm() > 0.01
    assert_rel(theta0 - theta1, d * 0.01 / (d.norm() + 1e-6))


def resume_args(tmp_path, **kw):
    base = dict(per_device_train_batch_size=8, max_steps=6, save_strategy="steps", save_steps=3,
                lr_scheduler_type="linear", learning_rate=0.5, gam_mode="gam", gam_every=2,
                gam_rho_schedule="lr_proportional", **HP)
    return sgd_args(tmp_path, **{**base, **kw})


def test_resume_reproduces_the_run_bit_for_bit(tmp_path):
    sgd = (torch.optim.SGD, {"lr": 0.5, "momentum": 0.9})  # the kwargs must carry lr (else SGD's 1e-3)
    full = GAMTrainer(model=tiny_model(), args=resume_args(tmp_path / "full"), train_dataset=tiny_data(32),
                      optimizer_cls_and_kwargs=sgd)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert json.loads((ckpt / "gam_state.json").read_text())["counters"] == full.gam_counters
    resumed = GAMTrainer(model=tiny_model(seed=123), args=resume_args(tmp_path / "resumed"),
                         train_dataset=tiny_data(32), optimizer_cls_and_kwargs=sgd)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    rho_logged = [h["gam/rho"] for h in full.state.log_history if "gam/rho" in h]
    assert len(set(rho_logged)) > 1  # the radius really moved with the learning rate


def test_deepspeed_refused_at_construction(tmp_path):
    args = sgd_args(tmp_path, gam_mode="gam")
    args.deepspeed = {"zero_optimization": {"stage": 2}}  # set after __post_init__: no DeepSpeed install needed
    with pytest.raises(ValueError, match="DeepSpeed"):
        GAMTrainer(model=tiny_model(), args=args, train_dataset=tiny_data())


class LiveTensorCounter(TrainerCallback):
    def __init__(self):
        self.counts = []

    def on_log(self, args, state, control, **kw):
        gc.collect()
        self.counts.append(sum(1 for o in gc.get_objects() if torch.is_tensor(o)))


@pytest.mark.parametrize("mode", ["gam", pytest.param("gam_fast", marks=pytest.mark.slow)])
def test_no_growth_of_live_tensors(tmp_path, mode):
    counter = LiveTensorCounter()
    args = sgd_args(tmp_path, gam_mode=mode, max_steps=240, logging_steps=40, learning_rate=0.01,
                    per_device_train_batch_size=8, **HP)
    GAMTrainer(model=tiny_model(batchnorm=True), args=args, train_dataset=tiny_data(32), callbacks=[counter]).train()
    assert len(counter.counts) >= 6
    assert counter.counts[1:-1] == [counter.counts[1]] * (len(counter.counts) - 2), counter.counts


def test_checkpoint_has_no_half_written_gam_state(tmp_path):
    trainer = GAMTrainer(model=tiny_model(), args=resume_args(tmp_path, gam_every=1), train_dataset=tiny_data(32))
    trainer.train()
    for name in ("checkpoint-3", "checkpoint-6"):
        assert os.path.isfile(tmp_path / name / "gam_state.json")
