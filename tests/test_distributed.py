"""Two real processes (torchrun, gloo, CPU): the step of each perturbation (local, global) equals the float64
reference of the micro-batches actually seen, and the ranks end bit-identical."""

from __future__ import annotations

import os

import pytest
import torch
from reference import direction, loss_of
from testing_utils import HP, assert_rel, one_step, ref_kwargs, sgd_args, tiny_model, torchrun

HERE = os.path.dirname(__file__)
CASES = [(m, s) for m in ("sam", "gam_fast", "gam") for s in ("local", "global")]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun("ddp_step.py", str(out), ",".join([f"{m}:{s}" for m, s in CASES] + ["gam:local:2"]))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.parametrize("mode,perturbation", CASES)
def test_two_processes_match_reference(ddp_results, mode, perturbation):
    r0, r1 = (r[f"{mode}:{perturbation}"] for r in ddp_results)
    assert r0["world"] == 2
    assert torch.equal(r0["theta1"], r1["theta1"]), "ranks diverged"
    assert torch.equal(r0["theta0"], r1["theta0"])
    batches = r0["seen"] + r1["seen"]
    assert len(batches) == 2 and all(len(b["labels"]) == 8 for b in batches)
    model = tiny_model()
    kw = ref_kwargs(sgd_args("unused", gam_mode=mode, **HP))
    if perturbation == "local":
        d_ref = sum(direction(mode, loss_of(model, b), r0["theta0"], **kw) for b in batches) / 2
    else:
        union = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        d_ref = direction(mode, loss_of(model, union), r0["theta0"], **kw)
    assert_rel(r0["theta0"] - r0["theta1"], d_ref)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["sam", "gam_fast", "gam"])
def test_gam_logs_are_means_over_processes(ddp_results, mode):
    """`local` perturbation: each rank's micro-batch has its own gradient norm; the logged `gam/*` figures are their mean
    over both ranks (one all-reduce per log), so both ranks log the same values, and the mean of the two local
    norms equals the norm of neither rank's own micro-batch."""
    logs = [[h for h in r[f"{mode}:local"]["logs"] if "loss" in h][0] for r in ddp_results]
    keys = [k for k in logs[0] if k.startswith("gam/")]
    assert "gam/grad_norm" in keys and "gam/ascent_grad_norm" in keys
    assert all(logs[0][k] == logs[1][k] for k in keys)
    model, r0 = tiny_model(), ddp_results[0][f"{mode}:local"]
    norms = []
    for batch in r0["seen"] + ddp_results[1][f"{mode}:local"]["seen"]:
        g = torch.autograd.functional.jacobian(loss_of(model, batch), r0["theta0"])
        norms.append(g.norm().item())
    assert logs[0]["gam/grad_norm"] == pytest.approx(sum(norms) / 2, rel=1e-6)
    assert all(abs(n - logs[0]["gam/grad_norm"]) > 1e-6 for n in norms)


@pytest.mark.distributed
@pytest.mark.parametrize("mode,perturbation", CASES)
def test_one_process_accumulation_two_equals_same_reference(tmp_path, mode, perturbation):
    """The other split of the same global batch of 16: one process, two micro-batches of 8."""
    trainer, theta0, theta1 = one_step(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                                       gam_mode=mode, gam_perturbation=perturbation, **HP)
    kw = ref_kwargs(trainer.args)
    if perturbation == "local":
        d_ref = sum(direction(mode, loss_of(trainer.model, b), theta0, **kw) for b in trainer.seen) / 2
    else:
        union = {k: torch.cat([b[k] for b in trainer.seen]) for k in trainer.seen[0]}
        d_ref = direction(mode, loss_of(trainer.model, union), theta0, **kw)
    assert_rel(theta0 - theta1, d_ref)


@pytest.mark.distributed
def test_accelerate_launch_multi_process(tmp_path):
    """The same step launched by `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU)."""
    torchrun("ddp_step.py", str(tmp_path), "gam_fast:global",
             launcher=("accelerate.commands.launch", "--multi_gpu", "--main_process_port", "0", "--num_processes"))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["gam_fast:global"] for r in range(2))
    assert r0["world"] == 2 and torch.equal(r0["theta1"], r1["theta1"])
    batches = r0["seen"] + r1["seen"]
    union = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    kw = ref_kwargs(sgd_args("unused", gam_mode="gam_fast", **HP))
    assert_rel(r0["theta0"] - r0["theta1"], direction("gam_fast", loss_of(tiny_model(), union), r0["theta0"], **kw))


@pytest.mark.distributed
def test_two_processes_gam_every_mixes_plain_ddp_steps(ddp_results):
    """gam_every=2 under DDP: GAM step (explicit all-reduce), plain DDP step (the reducer), GAM step again."""
    r0, r1 = (r["gam:local:2"] for r in ddp_results)
    assert torch.equal(r0["theta1"], r1["theta1"])
    kw = ref_kwargs(sgd_args("unused", gam_mode="gam", **HP))
    model, theta = tiny_model(), r0["theta0"]
    for t, pair in enumerate(zip(r0["seen"], r1["seen"])):
        mode = "gam" if t % 2 == 0 else "none"
        theta = theta - sum(direction(mode, loss_of(model, b), theta, **kw) for b in pair) / 2
    assert_rel(r0["theta1"], theta, tol=1e-9)
