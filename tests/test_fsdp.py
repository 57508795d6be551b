"""hf_gam.optim.GAM on FSDP2 (`fully_shard`) models: two real processes (torchrun, gloo, CPU), one launch for every
case (tests/workers/fsdp_step.py). Each sharded run is compared with one process training on the union batch
(plain parameters, the same optimizer and closure style), and the first step with the independent float64
transcription of the rules (tests/reference.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from reference import direction, loss_of
from testing_utils import tiny_data, tiny_model

from hf_gam.optim import GAM

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "workers"))
import fsdp_step as W  # noqa: E402  (the worker's case table and model builders: one definition)

EXTRA = ["failure", "refusals", "batchnorm", "vit", "bf16", "functional", "trainer_cpu_fallback"]


def torchrun(script, *args, nproc=2, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(HERE, "workers", script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun("fsdp_step.py", str(out), ",".join([*W.CASES, *EXTRA]))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def union_run(model, steps, batch_of, style="graph", schedule=False, **kw):
    """One process, plain parameters, the union of both ranks' batches: the weights after each step."""
    opt = GAM(model.parameters(), torch.optim.SGD, lr=0.5, model=model, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if schedule else None
    thetas = [flat(model)]
    for t in range(steps):
        opt.step(W.make_closure(model, opt, batch_of(t), style))
        if sched is not None:
            sched.step()
        thetas.append(flat(model))
    return thetas


def union_batch(t):
    data = tiny_data(n=16 * W.STEPS)
    return {"pixel_values": data.x[16 * t:16 * t + 16], "labels": data.y[16 * t:16 * t + 16]}


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(W.CASES))
def test_sharded_steps_equal_union_batch_run(sharded, case):
    """3 steps per mode and closure style on a float64 MLP sharded per layer plus the root (uneven shards: 3 output
    rows over 2 processes) reach the weights of one process on the union batch to 1e-12; the ranks agree bit for
    bit and the weights moved."""
    style = case.split(":")[1]
    r0, r1 = (r[case]["thetas"] for r in sharded)
    assert all(torch.equal(a, b) for a, b in zip(r0, r1)), "ranks diverged"
    spec = W.CASES[case]
    ref = union_run(tiny_model(), W.STEPS, union_batch, style, schedule="rho_schedule" in spec, mode=spec["mode"],
                    **W.HP, **W.gam_kwargs(spec))
    assert max_diff(r0, ref) < 1e-12
    assert (r0[-1] - r0[0]).abs().max() > 1e-3


@pytest.mark.distributed
@pytest.mark.parametrize("case,mode", [("sam:graph", "sam"), ("gam_fast:graph", "gam_fast"),
                                       ("gam_fast_official:backward", "gam_fast")])
def test_first_sharded_step_matches_independent_reference(sharded, case, mode):
    """The first step against the float64 transcription of the rules on the union batch: θ1 = θ0 - lr·d."""
    theta = sharded[0][case]["thetas"]
    kw = dict(rho=W.HP["rho"], alpha=W.HP["alpha"], rho_prime=W.HP["rho_prime"], beta=W.HP["beta"],
              gamma=W.HP["gamma"], variant=W.CASES[case].get("variant", "paper"))
    d = direction(mode, loss_of(tiny_model(), union_batch(0)), theta[0], **kw)
    torch.testing.assert_close(theta[0] - theta[1], 0.5 * d, rtol=1e-9, atol=1e-12)


@pytest.mark.distributed
def test_graph_style_closure_moves_sharded_weights(sharded):
    """`torch.autograd.grad` on sharded parameters returns None for every one: a graph-style closure must still
    move the weights, exactly as the backward style does."""
    graph, backward = sharded[0]["gam_fast:graph"]["thetas"], sharded[0]["gam_fast:backward"]["thetas"]
    assert (graph[1] - graph[0]).abs().max() > 1e-3
    assert max_diff(graph, backward) < 1e-15


@pytest.mark.distributed
def test_failed_sharded_step_restores_weights_bitwise(sharded):
    """A closure raising in pass 3 of gam_fast (weights perturbed at that point): every rank's shards are bit for bit
    what they were, no gradient is left, the error propagates."""
    for rank in sharded:
        res = rank["failure"]
        assert res["message"] == "boom in pass 3" and res["passes"] == 3
        assert res["bitwise"] and res["grads_none"]


@pytest.mark.distributed
def test_exact_modes_and_local_perturbation_refused_under_fsdp2(sharded):
    refusals = sharded[0]["refusals"]
    for mode in ("gam", "gnp", "gam_sam"):
        assert refusals[mode].startswith(f"mode={mode!r} does not run under FSDP2")
        assert "double backward" in refusals[mode] and "sam or gam_fast" in refusals[mode]
    assert "needs each process's unsharded gradient; FSDP2 reduce-scatters it" in refusals["local"]
    assert refusals["default_perturbation"] == "global"


@pytest.mark.distributed
def test_batchnorm_statistics_come_from_the_clean_pass_under_fsdp2(sharded):
    for rank in sharded:
        assert rank["batchnorm"] == {"stats_equal": True, "moved": True}


@pytest.mark.distributed
def test_vit_sharded_per_encoder_layer_sam_equals_union_batch(sharded):
    """A 2-layer HF ViT (from a config, SDPA attention), fully_shard per encoder layer plus the root: 2 sam steps."""
    def batch_of(t):
        parts = [W.vit_batch(t, rank) for rank in range(2)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    ref = union_run(W.vit_model(), 2, batch_of, mode="sam", rho=0.3)
    got = sharded[0]["vit"]["thetas"]
    assert all(torch.equal(a, b) for a, b in zip(got, sharded[1]["vit"]["thetas"]))
    assert max_diff(got, ref) < 1e-12
    assert (got[-1] - got[0]).abs().max() > 1e-2


@pytest.mark.distributed
def test_bf16_mixed_precision_policy_within_bf16_tolerance(sharded):
    """float32 shards, bf16 compute (MixedPrecisionPolicy(param_dtype=bfloat16)): gam_fast trains, the sharded
    gradients are float32, and the displacement after each step is within bf16 round-off (2%) of the float64
    union-batch run's."""
    got = sharded[0]["bf16"]["thetas"]
    assert sharded[0]["bf16"]["grad_dtype"] == "torch.float32"
    ref = union_run(tiny_model(), W.STEPS, union_batch, mode="gam_fast", **W.HP)
    for g, r in zip(got[1:], ref[1:]):
        moved = (r - ref[0]).norm()
        assert moved > 1e-2
        assert (g.double() - r).norm() / moved < 2e-2


@pytest.mark.distributed
def test_functional_on_dtensors_and_one_collective_per_scalar_group(sharded):
    """core.functional on FSDP2 DTensors: global norm and inner products equal those of the gathered tensors (plain
    tensors, equal on both ranks), copy_ copies every shard; a gam_fast step sums over shards once per norm (‖g0‖,
    ‖g1-g0‖, ‖g2‖, ‖d‖ for the finiteness check) and once for <h-, h+> and ‖h+‖² together."""
    for rank in sharded:
        res = rank["functional"]
        assert res["plain"] and res["copy"]
        assert res["norm"][0] == pytest.approx(res["norm"][1], rel=1e-14)
        for got, want in res["dots"]:
            assert got == pytest.approx(want, rel=1e-13)
        assert res["gam_fast_shard_sums"] == [1, 1, 1, 2, 1]
    assert sharded[0]["functional"]["norm"] == sharded[1]["functional"]["norm"]


@pytest.mark.distributed
def test_trainer_fsdp_with_use_cpu_runs_as_ddp_and_is_not_refused(sharded):
    """transformers and accelerate do not enable FSDP with `use_cpu` (2 processes: DDP). GAMTrainer must then neither
    refuse nor claim anything about FSDP: an exact mode trains as under DDP (a warning says FSDP is not active)."""
    for rank in sharded:
        res = rank["trainer_cpu_fallback"]
        assert res["fsdp_enabled"] is False and res["ddp"] == "DistributedDataParallel" and res["moved"]
