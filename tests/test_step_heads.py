"""Every head's step is the gradient of the window's mean loss.

Single-label, single-label with ignore index -100, multi-label (float labels, BCE) and regression (MSE): `gam` with
α = 0 and `sam` with ρs = 0 (both reduce to the plain gradient), `local` and `global` perturbation, gradient accumulation 2
over uneven micro-batches (8 + 4), equal the plain Trainer's step on the whole window as one batch (float64, SGD,
lr 1). The Trainer's own accumulated step is not the reference: with a model that takes loss kwargs, its multi-label
and regression steps are the *sum* of the micro-batch means (the models' BCE / MSE ignore `num_items_in_batch`)."""

from __future__ import annotations

import pytest
import torch
from testing_utils import HEADS, head_model_and_data
from reference import flat_params
from transformers import Trainer, TrainingArguments

from hf_gam import GAMConfig, GAMTrainer


def sgd(tmp_path, cls, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=1,
                learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)
    return cls(**{**base, **kw})


_REFERENCE: dict[str, tuple] = {}


def whole_window_step(tmp_path, head):
    """The plain Trainer's step on all 12 samples as one batch, no accumulation: minus the mean-loss gradient."""
    if head not in _REFERENCE:
        model, data = head_model_and_data(head)
        theta0 = flat_params(model)
        Trainer(model=model, args=sgd(tmp_path / "ref", TrainingArguments, per_device_train_batch_size=12,
                                      gradient_accumulation_steps=1), train_dataset=data).train()
        _REFERENCE[head] = (theta0, flat_params(model))
    return _REFERENCE[head]


class Sizes(GAMTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.sizes = getattr(self, "sizes", []) + [len(inputs["labels"])]
        return super().training_step(model, inputs, num_items_in_batch)


MODES = {"gam_alpha0": dict(gam_mode="gam", gam_alpha=0.0, gam_rho=0.3), "sam_rho0": dict(gam_mode="sam", sam_rho=0.0)}


@pytest.mark.parametrize("perturbation", ["local", "global"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("head", list(HEADS))
def test_step_is_gradient_of_window_mean_loss(tmp_path, head, mode, perturbation):
    theta0, theta_ref = whole_window_step(tmp_path, head)
    model, data = head_model_and_data(head)
    assert torch.equal(flat_params(model), theta0)
    trainer = Sizes(model=model, args=sgd(tmp_path / "gam", GAMConfig, gam_perturbation=perturbation, **MODES[mode]),
                    train_dataset=data)
    trainer.train()
    assert sorted(trainer.sizes) == [4, 8]
    step, step_ref = theta0 - flat_params(model), theta0 - theta_ref
    err = ((step - step_ref).norm() / step_ref.norm()).item()
    assert err < 1e-6, f"relative error {err:.3e} (step norm ratio {(step.norm() / step_ref.norm()).item():.4f})"
    # the logged loss is the window's mean loss too
    (logged,) = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model0, _ = head_model_and_data(head)
    with torch.no_grad():
        ref_loss = Trainer(model=model0, args=sgd(tmp_path / "l", TrainingArguments)).compute_loss(
            model0, {"pixel_values": data.x, "labels": data.y})
    assert logged == pytest.approx(ref_loss.item(), rel=1e-6)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("average", [True, False])
def test_process_count_factor_one_process(tmp_path, monkeypatch, head, average):
    """The `num_processes` factor of the loss and of the micro-batch weight, checked in one process by faking a
    second one that saw the same micro-batch: `num_items_in_batch` counts both, the all-reduce (a mean) of two
    equal gradients is the gradient itself, so `p.grad` must be this micro-batch's mean-loss gradient (half of
    it without `average_tokens_across_devices`, which the Trainer then compensates by not dividing by the world)."""
    import hf_gam.core.collectives as collectives

    model, data = head_model_and_data(head, n=8)
    batch = {"pixel_values": data.x, "labels": data.y}
    trainer = GAMTrainer(model=model, args=sgd(tmp_path, GAMConfig, gam_mode="gam", gam_alpha=0.0,
                                               gradient_accumulation_steps=1, average_tokens_across_devices=average))
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    monkeypatch.setattr(collectives, "all_reduce_", lambda tensors, mean=False: None)
    n = batch["labels"].ne(-100).sum()
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    loss = trainer.training_step(model, dict(batch), num_items_in_batch=2 * n)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    expected_loss = trainer._mean_loss(model, dict(batch))
    expected_loss.backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    factor = 1.0 if average else 0.5
    torch.testing.assert_close(got, factor * expected, rtol=1e-10, atol=1e-12)
    assert loss.item() == pytest.approx(factor * expected_loss.item(), rel=1e-6)
    # compute_loss (mode none's path): Σ loss / num_items_in_batch x num_processes, like Trainer.compute_loss
    with torch.no_grad():
        mode_none = trainer.compute_loss(model, dict(batch), num_items_in_batch=2 * n)
    assert mode_none.item() == pytest.approx(factor * expected_loss.item(), rel=1e-10)


@pytest.mark.parametrize("mode", ["none", *MODES])
def test_multi_label_with_label_smoothing_is_mean_bce_step(tmp_path, mode):
    """Label smoothing belongs to the cross-entropy: with ``label_smoothing_factor=0.1`` a multi-label head (whose
    smoothing the Trainer drops, with a warning) still steps by the window's mean BCE, under accumulation 2 over
    8 + 4 samples, in mode none as in the multi-pass modes."""
    theta0, theta_ref = whole_window_step(tmp_path, "multi_label")
    model, data = head_model_and_data("multi_label")
    kw = {"gam_mode": "none"} if mode == "none" else MODES[mode]
    trainer = Sizes(model=model, args=sgd(tmp_path / "gam", GAMConfig, label_smoothing_factor=0.1, **kw),
                    train_dataset=data)
    trainer.train()
    assert sorted(trainer.sizes) == [4, 8]
    step, step_ref = theta0 - flat_params(model), theta0 - theta_ref
    err = ((step - step_ref).norm() / step_ref.norm()).item()
    assert err < 1e-6, f"relative error {err:.3e} (step norm ratio {(step.norm() / step_ref.norm()).item():.4f})"
