"""examples/lightning_gam.py: a Lightning module trains with hf_gam.optim.GAM in automatic optimization (Lightning's
closure with backward inside) and manual optimization (a graph-style closure), in every first-order mode and exact
GAM; one step equals the float64 reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from testing_utils import tiny_data, tiny_model
from reference import direction, flat_params, loss_of

L = pytest.importorskip("lightning")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from lightning_gam import GAMModule, main  # noqa: E402

HP = dict(rho=0.3, alpha=0.4, rho_prime=0.1, beta=0.3, gamma=0.5)


def fit_one_step(mode, manual, precision="64-true", model=None, data=None):
    model = model or tiny_model()
    data = data or tiny_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x, data.y), batch_size=16)
    module = GAMModule(model, mode=mode, lr=1.0, momentum=0.0, manual=manual, **HP)
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", precision=precision, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    return module, trainer


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
@pytest.mark.parametrize("mode", ["none", "sam", "gam_fast", "gam"])
def test_lightning_step_equals_reference(mode, manual):
    model, data = tiny_model(), tiny_data()
    theta0 = flat_params(model)
    module, trainer = fit_one_step(mode, manual, model=model, data=data)
    opt = module.optimizers(use_pl_optimizer=False)
    assert opt.step_count == 1
    d = direction(mode, loss_of(model, {"pixel_values": data.x, "labels": data.y}), theta0, rho=0.3, alpha=0.4,
                  sam_rho=0.3, rho_prime=0.1, beta=0.3, gamma=0.5)
    step = theta0 - flat_params(model)
    assert (step - d).norm() / d.norm() < 1e-6
    assert torch.isfinite(trainer.callback_metrics["train_loss"])


def test_lightning_bf16_mixed_trains():
    model = tiny_model(dtype=torch.float32)
    theta0 = flat_params(model)
    fit_one_step("gam_fast", manual=False, precision="bf16-mixed", model=model, data=tiny_data(dtype=torch.float32))
    theta1 = flat_params(model)
    assert torch.isfinite(theta1).all() and not torch.equal(theta0, theta1)


def test_gradient_accumulation_is_refused():
    module = GAMModule(tiny_model(), mode="sam")
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", accumulate_grad_batches=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    data = tiny_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x, data.y), batch_size=8)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer.fit(module, loader)


@pytest.mark.slow
def test_example_script_trains_digits(capsys):
    main(["--mode", "gam_fast", "--epochs", "1"])
    assert "val_accuracy" in capsys.readouterr().out
