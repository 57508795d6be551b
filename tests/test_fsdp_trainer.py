"""GAMTrainer and the sharded engines: what runs under accelerate's FSDP2, what is refused before any compute (exact
modes, the local perturbation, FSDP1, DeepSpeed) and why, and the CPU fallback (transformers and accelerate do not
enable FSDP with `use_cpu`: the run is DDP, so nothing about FSDP may be claimed or refused; that needs two processes:
tests/test_fsdp.py). The real FSDP2 run needs CUDA: `test_gam_trainer_fsdp2_on_cuda_equals_plain_run` (slow,
skipped without a GPU; benchmarks/gpu_checks.sh)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from testing_utils import tiny_vit

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.core.directions import MODES
from hf_gam.trainer.guards import refuse_sharded_engines

HERE = os.path.dirname(__file__)
FIRST_ORDER = [m for m, spec in MODES.items() if not spec.hvp]
EXACT = [m for m, spec in MODES.items() if spec.hvp]


def config(tmp_path, **kw):
    return GAMConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", **kw)


@pytest.mark.parametrize("mode", FIRST_ORDER)
def test_first_order_modes_with_global_perturbation_run_under_fsdp2(tmp_path, mode):
    refuse_sharded_engines(config(tmp_path, gam_mode=mode, gam_perturbation="global"), deepspeed=False,
                           fsdp_version=2)


@pytest.mark.parametrize("mode", EXACT)
def test_exact_modes_refused_under_fsdp2_with_the_reason(tmp_path, mode):
    with pytest.raises(ValueError) as err:
        refuse_sharded_engines(config(tmp_path, gam_mode=mode, gam_perturbation="global"), deepspeed=False,
                               fsdp_version=2)
    text = str(err.value)
    assert text.startswith(f"gam_mode={mode!r} does not run under FSDP2")
    assert "double backward" in text and "gam_fast" in text and "\n" not in text


def test_local_perturbation_refused_under_fsdp2(tmp_path):
    with pytest.raises(ValueError, match="needs each process's unsharded gradient; FSDP2 reduce-scatters it"):
        refuse_sharded_engines(config(tmp_path, gam_mode="sam", gam_perturbation="local"), deepspeed=False,
                               fsdp_version=2)


@pytest.mark.parametrize("mode", ["sam", "gam_fast", "gam"])
def test_fsdp1_refused_with_fsdp2_as_the_alternative(tmp_path, mode):
    with pytest.raises(ValueError) as err:
        refuse_sharded_engines(config(tmp_path, gam_mode=mode, gam_perturbation="global"), deepspeed=False,
                               fsdp_version=1)
    assert "FSDP1" in str(err.value) and "'version': 2" in str(err.value)


@pytest.mark.parametrize("mode", ["sam", "gam_fast", "gam"])
def test_deepspeed_refused_with_its_own_reason(tmp_path, mode):
    with pytest.raises(ValueError) as err:
        refuse_sharded_engines(config(tmp_path, gam_mode=mode), deepspeed=True, fsdp_version=None)
    text = str(err.value)
    assert "p.grad is None after backward" in text and "Gradient computed twice for this partition" in text
    assert "FSDP" in text  # the alternative


def test_mode_none_runs_under_every_engine(tmp_path):
    args = config(tmp_path, gam_mode="none")
    for deepspeed, version in ((True, None), (False, 1), (False, 2)):
        refuse_sharded_engines(args, deepspeed=deepspeed, fsdp_version=version)


def test_trainer_step_on_a_sharded_model_equals_plain_run(tmp_path):
    """GAMTrainer.train() on a model sharded by fully_shard (1-process mesh, CPU; accelerate cannot enable FSDP on
    CPU, so the model is sharded before the Trainer gets it): sam and gam_fast with the global perturbation, sam with
    the local one (a 1-process mesh has no other process to reduce-scatter with), 2 micro-batches per step, 3 steps,
    equal to the unsharded model's training (float64)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE])}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "workers", "fsdp_trainer_cpu.py"), str(tmp_path),
                           "sam:global,gam_fast:global,sam:local"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = torch.load(tmp_path / "result.pt", weights_only=False)
    for mode, res in results.items():
        assert res["sharded"], mode
        assert (res["theta_plain"] - res["theta0"]).abs().max() > 1e-2, mode
        torch.testing.assert_close(res["theta"], res["theta_plain"], rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate enables FSDP only on accelerators")
@pytest.mark.parametrize("mode", ["sam", "gam_fast"])
def test_gam_trainer_fsdp2_on_cuda_equals_plain_run(tmp_path, mode):
    """The Trainer under accelerate's FSDP2 on 1 GPU (a 1-process mesh), ViT wrapped per encoder layer, 2 steps with
    the global perturbation, against the same 2 steps of GAMTrainer without FSDP on the CPU (float32)."""
    sys.path.insert(0, os.path.join(HERE, "workers"))
    import fsdp_trainer

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           os.path.join(HERE, "workers", "fsdp_trainer.py"), str(tmp_path), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    got = torch.load(tmp_path / "result.pt", weights_only=False)
    assert got["fsdp_enabled"] and got["fsdp2"] and got["sharded"]
    model = tiny_vit(seed=0)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    ref = GAMTrainer(model, fsdp_trainer.arguments(str(tmp_path / "ref"), mode, use_cpu=True),
                     train_dataset=fsdp_trainer.dataset())
    ref.train()
    theta_ref = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    moved = (theta_ref - theta0).norm()
    assert moved > 1e-3
    assert (got["theta"] - theta_ref).norm() / moved < 1e-3
