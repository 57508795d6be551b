"""Faults on the way to the Hub (tests/local_hub.py): a Hub that keeps failing at commit (exit 3, one line naming the
saved output, the repo and the ``hf upload`` command that pushes it later, which then works), an invalid
``hub_model_id`` and a rejected token (exit 2 before training), and which names the card calls Hub ids."""

from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest
import yaml
from local_hub import TOKEN, serving, validate_card_yaml
from test_hub_push import PUSH_FLAGS, hf_gam_env, run_hf_gam
from testing_utils import image_data, tiny_vit

from hf_gam.cli import main


def test_hub_failing_at_commit_exits_3_with_the_command_that_pushes_later(tmp_path):
    with serving(tmp_path / "hf_home") as hub:
        hub.fail("POST", r"/commit/", status=500, retry_after=0)  # past huggingface_hub's own retries
        out = tmp_path / "digits"
        proc = run_hf_gam([*PUSH_FLAGS, "--max_steps", "1", "--output_dir", out, "--hub_model_id", "me/digits"],
                          cwd=tmp_path)
        assert proc.returncode == 3, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr + proc.stdout
        errors = [line for line in proc.stderr.splitlines() if line.startswith("hf-gam: error:")]
        assert len(errors) == 1, proc.stderr[-3000:]
        line = errors[0]
        assert str(out) in line and "me/digits" in line and "500" in line
        for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md",
                     "eval_results.json"):
            assert (out / name).is_file(), name  # the local output is complete
        assert len(hub.seen("POST", "/commit/")) > 1  # retried before giving up
        assert hub.commits("me/digits")[-1].message == "initial commit"

        command = line.split("`")[-2]  # the one command the line names, between backquotes
        assert command.startswith("hf upload me/digits ")
        hub.failures.clear()
        later = subprocess.run(shlex.split(command), capture_output=True, text=True, env=hf_gam_env(), timeout=300,
                               cwd=tmp_path)
        assert later.returncode == 0, later.stderr[-3000:]
        files = hub.files("me/digits")
        assert (out / "model.safetensors").read_bytes() == files["model.safetensors"]
        assert validate_card_yaml(files["README.md"].decode()) == [] and "model-index" in files["README.md"].decode()
        assert not any(p.startswith(("checkpoint-", "_")) for p in files)


@pytest.mark.parametrize("repo_id", ["me/bad name", "me/x/y", "me/x--y", "me/x-", "me/" + "x" * 97])
def test_invalid_hub_model_id_exits_2_before_training(tmp_path, capsys, repo_id):
    out = tmp_path / "o"
    assert main(["train", "--push_to_hub", "true", "--hub_model_id", repo_id, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "hf-gam: error: hub_model_id" in err and repr(repo_id) in err and "Traceback" not in err
    assert not out.exists()


def test_repo_named_after_an_invalid_output_dir_exits_2_before_training(tmp_path, capsys):
    out = tmp_path / "my run"  # no --hub_model_id: the Trainer would name the repo "my run"
    assert main(["train", "--push_to_hub", "true", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "hf-gam: error: hub_model_id: not set" in err and "'my run'" in err and not out.exists()


def test_rejected_token_stops_before_training(local_hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_rejected")
    out = tmp_path / "o"
    assert main(["train", "--push_to_hub", "true", "--hub_model_id", "me/x", "--output_dir", str(out)]) == 2
    assert "did not accept the token" in capsys.readouterr().err and not out.exists()
    assert [(r.path, r.status) for r in local_hub.seen()] == [("/api/whoami-v2", 401)]


def _card_base_model(tmp_path, model, **card) -> str | None:
    from hf_gam import GAMConfig, GAMTrainer

    args = GAMConfig(output_dir=str(tmp_path / "card"), report_to="none", use_cpu=True, max_steps=1)
    trainer = GAMTrainer(model=model, args=args, train_dataset=image_data(4))
    trainer.create_model_card(**card)
    text = (tmp_path / "card" / "README.md").read_text()
    assert validate_card_yaml(text) == []
    return yaml.safe_load(text.split("---")[1]).get("base_model")


def test_base_model_is_a_hub_id_only_when_it_resolves(local_hub, tmp_path, monkeypatch):
    """A model loaded from a relative folder (``outputs/x``) that is gone when the card is written is not linked as
    ``base_model`` (the Hub would refuse the card); a name that resolves on the Hub is; a base the user names
    explicitly (``finetuned_from``) is trusted; offline nothing can be asked and a name of the form ``owner/name``
    that is not a local path is kept."""
    from huggingface_hub import HfApi, constants

    monkeypatch.chdir(tmp_path)
    tiny_vit().save_pretrained("outputs/x")
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained("outputs/x")
    shutil.rmtree("outputs")
    assert model.config._name_or_path == "outputs/x"
    assert _card_base_model(tmp_path, model) is None

    tiny_vit().save_pretrained(tmp_path / "base")
    HfApi().create_repo("me/base")
    HfApi().upload_folder(repo_id="me/base", folder_path=tmp_path / "base")
    on_hub = AutoModelForImageClassification.from_pretrained("me/base")
    assert _card_base_model(tmp_path, on_hub) == "me/base"
    assert _card_base_model(tmp_path, model, finetuned_from="google/vit-base-patch16-224-in21k") == \
        "google/vit-base-patch16-224-in21k"
    n_requests = len(local_hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert _card_base_model(tmp_path, on_hub) == "me/base" and len(local_hub.requests) == n_requests


def test_missing_relative_model_folder_is_named_as_such(local_hub, tmp_path, capsys, monkeypatch):
    """``--model outputs/x`` where ``outputs/`` exists but ``x`` does not: tried on the Hub (where it does not
    resolve), and the error says the local folder is missing; exit 2 before training."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "y").mkdir(parents=True)
    assert main(["train", "--model", "outputs/x", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "could not load 'outputs/x'" in err and "no local folder 'outputs/x'" in err and "Traceback" not in err
    assert local_hub.seen("GET", "/api/models/outputs/x") or local_hub.seen("HEAD", "/outputs/x/resolve/")
    assert not (tmp_path / "o").exists()
