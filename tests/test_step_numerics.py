"""One optimizer step of every mode equals the float64 reference of docs/algorithms.md (explicit Hessians)."""

from __future__ import annotations

import pytest
import torch
from reference import direction, loss_of
from testing_utils import HP, assert_rel, one_step, ref_kwargs, tiny_data


CASES = [
    dict(gam_mode="none"),
    dict(gam_mode="sam"),
    dict(gam_mode="sam", sam_rho=0.7),
    dict(gam_mode="sam", gam_adaptive=True),
    dict(gam_mode="gnp"),
    dict(gam_mode="gam"),
    dict(gam_mode="gam", gam_adaptive=True),
    dict(gam_mode="gam_sam", sam_rho=0.2),
    dict(gam_mode="gam_fast", gam_fast_variant="paper"),
    dict(gam_mode="gam_fast", gam_fast_variant="official"),
    dict(gam_mode="gam_fast", gam_fast_variant="paper", gam_adaptive=True),
    dict(gam_mode="gam", gam_eps=0.5),  # a large ξ: every division by a norm must carry it
    dict(gam_mode="gam_fast", gam_eps=0.5),
    dict(gam_mode="sam", gam_eps=0.5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_one_step_equals_reference(tmp_path, case):
    trainer, theta0, theta1 = one_step(tmp_path, **HP, **case)
    (batch,) = trainer.seen
    d_ref = direction(trainer.args.gam_mode, loss_of(trainer.model, batch), theta0, **ref_kwargs(trainer.args))
    assert_rel(theta0 - theta1, d_ref)


@pytest.mark.parametrize("mode", ["sam", "gam", "gam_fast"])
def test_accumulation_local_is_mean_of_micro_batch_directions(tmp_path, mode):
    trainer, theta0, theta1 = one_step(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                                       gam_mode=mode, **HP)
    assert len(trainer.seen) == 2
    kw = ref_kwargs(trainer.args)
    d_ref = sum(direction(mode, loss_of(trainer.model, b), theta0, **kw) for b in trainer.seen) / 2
    assert_rel(theta0 - theta1, d_ref)


@pytest.mark.parametrize("mode", ["sam", "gam", "gam_fast"])
def test_global_perturbation_with_accumulation_is_direction_of_union(tmp_path, mode):
    trainer, theta0, theta1 = one_step(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                                       gam_mode=mode, gam_perturbation="global", **HP)
    union = {k: torch.cat([b[k] for b in trainer.seen]) for k in trainer.seen[0]}
    d_ref = direction(mode, loss_of(trainer.model, union), theta0, **ref_kwargs(trainer.args))
    assert_rel(theta0 - theta1, d_ref)


def test_uneven_micro_batches_weighted_by_items(tmp_path):
    """12 samples, micro-batches of 8 and 4: each direction weighs n_i / N, as the stock loss does."""
    trainer, theta0, theta1 = one_step(tmp_path, data=tiny_data(n=12), per_device_train_batch_size=8,
                                       gradient_accumulation_steps=2, gam_mode="gam", **HP)
    kw = ref_kwargs(trainer.args)
    n = [len(b["labels"]) for b in trainer.seen]
    assert sorted(n) == [4, 8]
    d_ref = sum(ni * direction("gam", loss_of(trainer.model, b), theta0, **kw) for ni, b in zip(n, trainer.seen))
    assert_rel(theta0 - theta1, d_ref / sum(n))


def test_gam_every_schedule(tmp_path):
    """gam_every=2: steps 0 and 2 use GAM, step 1 the plain gradient (full batch, so each step sees all data)."""
    trainer, theta0, theta3 = one_step(tmp_path, max_steps=3, gam_mode="gam", gam_every=2, **HP)
    kw = ref_kwargs(trainer.args)
    batches = trainer.seen
    theta = theta0
    for t, b in enumerate(batches):
        mode = "gam" if t % 2 == 0 else "none"
        theta = theta - direction(mode, loss_of(trainer.model, b), theta, **kw)
    assert_rel(theta3, theta, tol=1e-9)


REDUCTIONS = [
    (dict(gam_mode="sam", sam_rho=0.0), dict(gam_mode="none")),
    (dict(gam_mode="gam", gam_alpha=0.0), dict(gam_mode="none")),
    (dict(gam_mode="gam_sam", gam_alpha=0.0, sam_rho=0.2), dict(gam_mode="sam", sam_rho=0.2)),
    (dict(gam_mode="gam_fast", gam_gamma=0.0, gam_alpha=1.0, gam_rho_prime=0.1), dict(gam_mode="sam", sam_rho=0.1)),
]


@pytest.mark.parametrize("a,b", REDUCTIONS, ids=["sam0=none", "gam_a0=none", "gamsam_a0=sam", "fast=sam"])
def test_reductions(tmp_path, a, b):
    hp = {k: v for k, v in HP.items() if k not in a}
    _, theta0, theta_a = one_step(tmp_path / "a", **{**hp, **a})
    _, theta0b, theta_b = one_step(tmp_path / "b", **{**hp, **b})
    assert torch.equal(theta0, theta0b)
    assert_rel(theta0 - theta_a, theta0 - theta_b, tol=1e-12)
