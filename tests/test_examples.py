"""The examples run under `torchrun --nproc_per_node 2` on the CPU (gloo) with tiny settings: tiny Hub-layout
copies, tiny saved models, 1-2 steps. Offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from testing_utils import HUB_LAYOUTS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def torchrun(script: str, *args: str, cwd: Path, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(EXAMPLES.parent)}  # the checkout under test, not whatever hf_gam is installed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLES / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


TRAINER_FLAGS = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
                 "--use_cpu", "true", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
                 "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", "1"]


@pytest.mark.distributed
def test_transfer_learning_torchrun(tmp_path, hub_copies, tiny_vit_dir):
    out = tmp_path / "transfer"
    proc = torchrun("transfer_learning.py", "--backbone", "swin-t", "--dataset", "food101", "--dataset_path",
                    str(hub_copies["food101"]), "--model", str(tiny_vit_dir), "--output_dir", str(out),
                    *TRAINER_FLAGS, cwd=tmp_path)
    assert "test accuracy:" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert list(config["id2label"].values()) == HUB_LAYOUTS["food101"]["names"]
    card = (out / "README.md").read_text()
    assert "| `optim` | adamw_torch |" in card and "| `world_size` | 2 |" in card and "| `max_steps` | 2 |" in card
    assert "| `lr_scheduler_type` | cosine |" in card and "| `weight_decay` | 1e-05 |" in card


@pytest.mark.distributed
def test_custom_accelerate_loop_torchrun(tmp_path, hub_copies, tiny_timm_dir):
    proc = torchrun("custom_accelerate_loop.py", "--dataset", "cifar10", "--dataset_path", str(hub_copies["cifar10"]),
                    "--model", str(tiny_timm_dir), "--max_steps", "2", "--batch_size", "2", "--cpu", cwd=tmp_path)
    assert "test accuracy:" in proc.stdout and "step 2/2" in proc.stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_cifar_from_scratch_torchrun(tmp_path, hub_copies):
    out = tmp_path / "scratch"
    torchrun("cifar_from_scratch.py", "--dataset", "cifar100", "--dataset_path", str(hub_copies["cifar100"]),
             "--model", "timm:test_resnet", "--image_size", "16", "--output_dir", str(out), "--gam_mode", "gam_fast",
             *TRAINER_FLAGS, cwd=tmp_path)
    card = (out / "README.md").read_text()
    assert "| `gam_rho` | 0.1 |" in card and "| `gam_alpha` | 0.3 |" in card and "| `optim` | sgd |" in card


def test_paper_flags():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import cifar_from_scratch
        import transfer_learning
    finally:
        sys.path.remove(str(EXAMPLES))
    flags = transfer_learning.paper_flags("efficientnet-b0", "cars", world_size=4)
    assert flags[flags.index("--per_device_train_batch_size") + 1] == "32"
    assert flags[flags.index("--max_steps") + 1] == "40000" and "momentum=0.9" in flags
    assert flags[flags.index("--learning_rate") + 1] == "2e-3" and flags[flags.index("--weight_decay") + 1] == "1e-5"
    flags = cifar_from_scratch.paper_flags("cifar10", world_size=1)
    assert flags[flags.index("--gam_rho") + 1] == "0.04" and flags[flags.index("--num_train_epochs") + 1] == "200"


def test_accelerate_configs_parse():
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in (EXAMPLES / "accelerate_configs").glob("*.yaml")}
    assert configs["single_gpu"]["distributed_type"] == "NO"
    assert configs["multi_gpu"]["distributed_type"] == "MULTI_GPU" and configs["multi_gpu"]["num_machines"] == 1
    assert configs["multi_node"]["num_machines"] == 2 and "main_process_ip" in configs["multi_node"]
