"""``GAMTrainer(..., push_to_hub=True)`` in a user's script against the local Hub (tests/local_hub.py; the script,
tests/workers/hub_push.py, runs in its own process because huggingface_hub reads HF_ENDPOINT at import): a PEFT
LoRA adapter pushed and loaded back with ``PeftModel.from_pretrained``, a commit that fails once and is retried,
``hub_strategy`` every_save / checkpoint / all_checkpoints (what the Hub holds after each save), and background
pushes that fail: a warning naming the step and the repo, then a loud final push."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi
from local_hub import serving, validate_card_yaml
from testing_utils import image_data, tiny_vit

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "workers" / "hub_push.py"
BASE = "me/tiny-vit-base"

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A local Hub that holds the tiny ViT base ``me/tiny-vit-base`` (pushed with ``HfApi.upload_folder``)."""
    root = tmp_path_factory.mktemp("hub_trainer")
    with serving(root / "hf_home") as local:
        tiny_vit(seed=0).save_pretrained(root / "base")
        api = HfApi()
        api.create_repo(BASE)
        api.upload_folder(repo_id=BASE, folder_path=root / "base", commit_message="tiny base")
        local.requests.clear()
        yield local


def run_worker(what: str, where: Path, **env: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(REPO), str(WORKER.parents[1])])  # this checkout; tests/ for testing_utils
    proc = subprocess.run([sys.executable, str(WORKER), what, str(where)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _meta(card: bytes) -> dict:
    return yaml.safe_load(card.decode().split("---")[1])


def test_peft_adapter_push_retried_once_and_loaded_back(hub, tmp_path):
    # without hf_xet's pipeline huggingface_hub posts the commit once: the retry is GAMTrainer's
    hub.fail("POST", r"^/api/models/me/peft/commit/", status=500, times=1)
    proc = run_worker("peft", tmp_path / "peft", HF_HUB_DISABLE_XET="1")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r.status for r in hub.seen("POST", "/api/models/me/peft/commit/")] == [500, 200]
    assert "retry" in proc.stderr.lower()
    files = hub.files("me/peft")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(files)
    assert "model.safetensors" not in files and not any(p.startswith("checkpoint-") for p in files)
    assert validate_card_yaml(files["README.md"].decode()) == []
    meta = _meta(files["README.md"])
    assert meta["library_name"] == "peft" and meta["base_model"] == BASE
    assert f"base_model:adapter:{BASE}" in meta["tags"] and meta["datasets"] == ["tiny-shapes"]
    (entry,) = meta["model-index"][0]["results"]
    assert entry["dataset"] == {"type": "tiny-shapes", "name": "Tiny shapes"}
    assert entry["metrics"][0]["type"] == "accuracy"
    assert entry["metrics"][0]["value"] == pytest.approx(result["metrics"]["eval_accuracy"])

    from transformers import AutoModelForImageClassification

    from_hub = peft.PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(BASE), "me/peft")
    from_disk = peft.PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(BASE),
                                               str(tmp_path / "peft"))
    for (name, a), (_, b) in zip(from_hub.state_dict().items(), from_disk.state_dict().items()):
        assert torch.equal(a, b), name
    x = image_data(4, seed=5).x
    with torch.no_grad():
        assert torch.equal(from_hub(pixel_values=x).logits, from_disk(pixel_values=x).logits)


def _paths(commit) -> set[str]:
    return set(commit.files)


def test_hub_strategies_and_failed_background_pushes(hub, tmp_path):
    hub.fail("POST", r"^/api/models/me/bgfail/commit/", status=403, times=2,
             message="You don't have the rights to write to me/bgfail")  # the step-1 pushes: model and checkpoint
    proc = run_worker("strategies", tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    every = hub.commits("me/every_save")
    messages = [c.message for c in every[1:]]
    # the stock background push reads output_dir when it runs: when step 2's save lands first, step 1's commit
    # carries step 2's files and step 2's push finds nothing new (no empty commit), so step 2 may not show
    assert messages[0] == "Training in progress, step 1" and messages[-1] == "End of training", messages
    assert set(messages) <= {"Training in progress, step 1", "Training in progress, step 2", "End of training"}
    assert all(not any("checkpoint" in p for p in c.files) for c in every)
    assert {"model.safetensors", "config.json", "README.md"} <= _paths(every[-1])

    last = hub.commits("me/checkpoint")
    steps = [json.loads(c.files["last-checkpoint/trainer_state.json"])["global_step"]
             for c in last if "last-checkpoint/trainer_state.json" in c.files]
    assert steps[0] == 1 and steps[-1] == 2
    assert {"last-checkpoint/optimizer.pt", "last-checkpoint/scheduler.pt", "last-checkpoint/rng_state.pth",
            "last-checkpoint/gam_state.json", "last-checkpoint/model.safetensors"} <= _paths(last[-1])
    assert not any(p.startswith("checkpoint-") for p in _paths(last[-1]))

    every_ckpt = _paths(hub.commits("me/all_checkpoints")[-1])
    assert {"checkpoint-1/trainer_state.json", "checkpoint-2/trainer_state.json"} <= every_ckpt
    assert not any(p.startswith("last-checkpoint/") for p in every_ckpt)
    assert all(result[s]["error"] is None for s in ("every_save", "checkpoint", "all_checkpoints"))

    failed = result["bgfail"]
    assert failed["error"] == "HubPushError" and "step 1 (checkpoint, me/bgfail)" in failed["message"]
    assert "step 2" not in failed["message"]  # step 2's pushes went through
    warnings = [line for line in proc.stderr.splitlines() if "push to the Hub at step 1" in line]
    assert len(warnings) == 2 and all("me/bgfail" in line and "403" in line for line in warnings), proc.stderr[-3000:]
    assert json.loads(hub.files("me/bgfail")["last-checkpoint/trainer_state.json"])["global_step"] == 2
