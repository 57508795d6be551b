"""`hf-gam train --push_to_hub` against the local Hub (tests/local_hub.py, huggingface_hub's real client over real
HTTP): what the repo holds, the card's model-index, no token anywhere, and the round trip (``from_pretrained``,
``AutoImageProcessor``, ``pipeline``) bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from local_hub import TOKEN, serving, validate_card_yaml

REPO = Path(__file__).resolve().parents[1]
REPO_ID = "me/digits"


def hf_gam_env(**extra: str | None) -> dict[str, str]:
    """The environment of a launched ``hf-gam``: this checkout, one thread, and the local Hub's variables (set by
    :func:`local_hub.serving` in ``os.environ``); ``extra`` values override them (``None``: unset)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_hf_gam(args: list[str], cwd: Path, **extra_env: str | None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_gam", "train", *map(str, args)], capture_output=True,
                          text=True, env=hf_gam_env(**extra_env), cwd=cwd, timeout=600)


PUSH_FLAGS = ["--max_steps", "2", "--disable_tqdm", "true", "--logging_steps", "1", "--push_to_hub", "true"]


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """One ``hf-gam train --push_to_hub`` of the embedded digits job (2 steps, 100 random test images), the token
    passed as ``--hub_token`` only (no HF_TOKEN, no saved token)."""
    root = tmp_path_factory.mktemp("cli_push")
    with serving(root / "hf_home") as hub:
        out = root / "digits"
        proc = run_hf_gam([*PUSH_FLAGS, "--output_dir", out, "--hub_model_id", REPO_ID, "--hub_token", TOKEN,
                           "--max_eval_samples", "100"], cwd=root, HF_TOKEN=None)
        assert proc.returncode == 0, proc.stderr[-3000:]
        yield SimpleNamespace(hub=hub, out=out, proc=proc, files=hub.files(REPO_ID))


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_push_uploads_a_complete_repo(pushed):
    files = pushed.files
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md"):
        assert name in files, name
    assert json.loads(files["config.json"])["id2label"] == {str(i): str(i) for i in range(10)}
    assert not any(path.startswith("checkpoint-") for path in files)
    for path in files:  # every file pushed is the local output's
        if path != ".gitattributes":
            assert (pushed.out / path).read_bytes() == files[path], path


def test_token_is_in_no_uploaded_file_and_no_log_line(pushed):
    leaked = [path for path, data in pushed.files.items() if TOKEN.encode() in data]
    assert leaked == []
    assert TOKEN not in pushed.proc.stdout and TOKEN not in pushed.proc.stderr
    assert not any(TOKEN.encode() in r.body for r in pushed.hub.requests)  # headers only


def test_card_passes_validation_with_model_index_results(pushed):
    card = pushed.files["README.md"].decode()
    assert validate_card_yaml(card) == []
    assert [r.status for r in pushed.hub.seen("POST", "/api/validate-yaml")] == [200]
    meta = _front_matter(card)
    results = meta["model-index"][0]["results"]
    metrics = {m["name"]: m for r in results for m in r["metrics"]}
    assert set(metrics) == {"Top-1 accuracy", "Top-5 accuracy"}
    local = json.loads((pushed.out / "eval_results.json").read_text())
    assert metrics["Top-1 accuracy"]["value"] == pytest.approx(local["eval_accuracy"])
    assert metrics["Top-5 accuracy"]["value"] == pytest.approx(local["eval_top5_accuracy"])
    for result in results:
        assert result["task"]["type"] == "image-classification"
        assert result["dataset"]["type"] == "digits" and result["dataset"]["name"] == "digits"
        assert result["dataset"].get("split") != "test"  # 100 random images of test are not the test split


def test_requests_of_one_push(pushed):
    """What the client sent for one push, in order (the token check, the repo, the card, one commit)."""
    seen = [f"{r.method} {r.path}" for r in pushed.hub.seen()]
    assert seen == ["GET /api/whoami-v2", "POST /api/repos/create", "POST /api/validate-yaml",
                    f"POST /api/models/{REPO_ID}/preupload/main", f"POST /api/models/{REPO_ID}/commit/main"], seen
    commit = pushed.hub.commits(REPO_ID)[-1]
    assert commit.message == "hf-gam train"


def test_round_trip_from_the_hub_is_bit_exact(pushed):
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    local_weights = load_file(pushed.out / "model.safetensors")
    model = AutoModelForImageClassification.from_pretrained(REPO_ID)
    state = model.state_dict()
    for name, tensor in local_weights.items():
        assert torch.equal(state[name], tensor), name
    processor = AutoImageProcessor.from_pretrained(REPO_ID)
    assert processor.to_dict() == AutoImageProcessor.from_pretrained(pushed.out).to_dict()
    from sklearn.datasets import load_digits
    from PIL import Image

    images = [Image.fromarray((img * 255 / 16).astype("uint8")).convert("RGB") for img in load_digits().images[:8]]
    from_hub = pipeline("image-classification", model=REPO_ID, device="cpu")(images, top_k=3)
    from_disk = pipeline("image-classification", model=str(pushed.out), device="cpu")(images, top_k=3)
    assert from_hub == from_disk
    downloads = pushed.hub.seen("GET", f"/{REPO_ID}/resolve/")
    assert any(r.path.endswith("/model.safetensors") and r.status == 200 for r in downloads)  # over HTTP


def test_config_is_pickled_without_the_token(tmp_path):
    """``training_args.bin`` (in the output and every checkpoint, pushed with them) holds no token; the live config
    keeps it for the push itself."""
    import io

    from hf_gam import GAMConfig

    args = GAMConfig(output_dir=str(tmp_path), hub_token=TOKEN, report_to="none")
    buffer = io.BytesIO()
    torch.save(args, buffer)
    assert TOKEN.encode() not in buffer.getvalue() and args.hub_token == TOKEN
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert restored.hub_token is None and restored.gam_mode == args.gam_mode and restored.output_dir == str(tmp_path)
