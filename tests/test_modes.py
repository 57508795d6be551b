"""The mode registry (hf_gam.core.directions.MODES) is the one place a mode is defined: its facts match what the mode
runs, GAMHyper and GAMConfig take the same defaults from it, and a newly registered mode reaches config validation,
the dispatcher, the trainer's logs and FLOP counting with no other edit."""

from __future__ import annotations

import pytest
import torch
from testing_utils import tiny_data, tiny_model
from reference import flat_params, grad, loss_of
from transformers import Trainer

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.core import functional
from hf_gam.core.directions import MODES, GAMHyper, ModeSpec
from hf_gam.core.oracles import MicroBatchOracle
from hf_gam.core.step import compute_direction


def config(tmp_path, **kw):
    return GAMConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=16,
                     learning_rate=1.0, optim="sgd", max_grad_norm=0.0, weight_decay=0.0, **kw)


@pytest.mark.parametrize("mode", list(MODES))
def test_registry_facts_match_what_the_mode_runs(mode):
    spec = MODES[mode]
    model, data = tiny_model(), tiny_data()
    params = list(model.parameters())
    oracle = MicroBatchOracle(model, params, lambda: torch.nn.functional.cross_entropy(
        model(pixel_values=data.x).logits, data.y))
    calls = {"grad": 0, "grad_hvp": 0}
    grad, grad_hvp = oracle.grad, oracle.grad_hvp

    def counted_grad():
        calls["grad"] += 1
        return grad()

    def counted_grad_hvp(v_fn):
        calls["grad_hvp"] += 1
        return grad_hvp(v_fn)

    oracle.grad, oracle.grad_hvp = counted_grad, counted_grad_hvp
    d, stats = compute_direction(GAMHyper.for_mode(mode), params, oracle)
    assert (calls["grad"], calls["grad_hvp"]) == (spec.grad_calls, spec.hvp_calls)
    assert oracle.passes == spec.oracle_calls
    assert spec.passes == spec.grad_calls + 3 * spec.hvp_calls and spec.hvp == (spec.hvp_calls > 0)
    if spec.norm_ascent:
        assert "ascent_grad_norm" in stats
    assert len(d) == len(params) and torch.isfinite(functional.global_norm(d))


@pytest.mark.parametrize("mode", list(MODES))
def test_hyper_and_config_take_the_same_defaults(tmp_path, mode):
    assert config(tmp_path, gam_mode=mode).gam_hyper() == GAMHyper.for_mode(mode) == GAMHyper(mode=mode)
    hyper = GAMHyper(mode=mode)
    assert (hyper.rho, hyper.alpha, hyper.sam_rho) == (MODES[mode].defaults["rho"], MODES[mode].defaults["alpha"],
                                                       MODES[mode].defaults["rho"])


def test_hyper_defaults_follow_the_mode():
    # the defaults of exact GAM must not leak into another mode (GAMHyper(mode="gam_fast") had ρ = 0.04, α = 0.1)
    assert (GAMHyper(mode="gam_fast").rho, GAMHyper(mode="gam_fast").alpha) == (0.2, 0.6)
    assert GAMHyper(mode="sam").sam_rho == 0.05
    hyper = GAMHyper.for_mode("sam", rho=0.1, alpha=None)  # None = flag left unset
    assert (hyper.rho, hyper.sam_rho, hyper.alpha) == (0.1, 0.1, 0.1)
    assert GAMHyper.for_mode("gam_sam", sam_rho=0.3).sam_rho == 0.3
    with pytest.raises(ValueError, match="'adam'"):
        GAMHyper(mode="adam")


def test_mode_spec_needs_rho_and_alpha_defaults():
    with pytest.raises(ValueError, match="rho and alpha"):
        ModeSpec(MODES["sam"].direction, 2, 0, False, {"rho": 0.1}, "no α")


def _fake_direction(h, params, oracle):
    """A made-up mode: three gradient passes, d = α g, and an ascent norm to log."""
    for _ in range(3):
        loss, g = oracle.grad()
    norm = functional.global_norm(g)
    return torch._foreach_mul(g, h.alpha), {"loss": loss, "grad_norm": norm, "ascent_grad_norm": norm}


@pytest.fixture
def fake_mode(monkeypatch):
    spec = ModeSpec(_fake_direction, grad_calls=3, hvp_calls=0, norm_ascent=True, defaults={"rho": 0.3, "alpha": 0.7},
                    summary="a mode registered by a test", alpha_max=0.9)
    monkeypatch.setitem(MODES, "fake", spec)
    return spec


def test_unregistered_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="gam_mode must be one of none, sam, gnp, gam, gam_sam, gam_fast; got 'fake'"):
        config(tmp_path, gam_mode="fake")


def test_one_registry_entry_is_a_whole_mode(tmp_path, fake_mode):
    args = config(tmp_path, gam_mode="fake")  # validation reads the registry, and so do the defaults
    assert (args.gam_rho, args.gam_alpha, args.sam_rho) == (0.3, 0.7, 0.3)
    with pytest.raises(ValueError, match="gam_alpha must be in \\[0, 0.9\\]"):
        config(tmp_path, gam_mode="fake", gam_alpha=0.95)

    model, data = tiny_model(), tiny_data()
    batch = {"pixel_values": data.x, "labels": data.y}
    expected = 0.7 * grad(loss_of(model, batch), flat_params(model))
    trainer = GAMTrainer(model=model, args=args, train_dataset=data)
    trainer.training_step(model, dict(batch), num_items_in_batch=torch.tensor(16))  # the dispatcher runs it
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert "gam/r1" in trainer._gam_means()  # norm_ascent: ρ ‖g at the ascent point‖ is logged
    plain = Trainer.floating_point_ops(trainer, batch)
    assert trainer.floating_point_ops(batch) == fake_mode.passes * plain == 3 * plain


def test_alpha_bound_comes_from_the_registry_in_every_front_end(tmp_path, fake_mode):
    """One check, reading the new entry's ``alpha_max``, refuses α = 0.95 for the Trainer's config, the optimizer
    wrapper and GAMHyper alike, each error in its caller's spelling; α = 0.9 is accepted by all three."""
    from hf_gam.optim import GAM

    with pytest.raises(ValueError, match=r"^gam_alpha must be in \[0, 0.9\] for gam_mode='fake'; got 0.95$"):
        config(tmp_path, gam_mode="fake", gam_alpha=0.95)
    with pytest.raises(ValueError, match=r"^alpha must be in \[0, 0.9\] for mode='fake'; got 0.95$"):
        GAM(tiny_model().parameters(), torch.optim.SGD, mode="fake", alpha=0.95, lr=0.1)
    with pytest.raises(ValueError, match=r"^alpha must be in \[0, 0.9\]"):
        GAMHyper(mode="fake", alpha=0.95)
    assert config(tmp_path, gam_mode="fake", gam_alpha=0.9).gam_alpha == 0.9
    assert GAM(tiny_model().parameters(), torch.optim.SGD, mode="fake", alpha=0.9, lr=0.1).hyper.alpha == 0.9
    assert GAMHyper(mode="fake", alpha=0.9).alpha == 0.9


def test_every_mode_defaults_to_gam_fast():
    """The config, the optimizer wrapper and GAMHyper share one default mode."""
    from hf_gam.optim import GAM

    assert GAMConfig(output_dir="unused").gam_mode == "gam_fast"
    assert GAM(tiny_model().parameters(), torch.optim.SGD, lr=0.1).hyper.mode == "gam_fast"
    assert GAMHyper().mode == "gam_fast" and GAMHyper().alpha == MODES["gam_fast"].defaults["alpha"]
