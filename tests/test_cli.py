"""`hf-gam train` end to end (in-process `hf_gam.cli.main`), config files, the model card, and every user error:
a clear message, exit status 2 and nothing written. Offline; tiny Hub-layout copies and tiny saved models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from testing_utils import HUB_LAYOUTS, write_hub_copy

from hf_gam.trainer.card import render_model_card, template_path
from hf_gam.cli import main
from hf_gam.cli.train import TRAIN_DEFAULTS
from hf_gam.trainer.config import GAMConfig

REPO = Path(__file__).resolve().parents[1]


def _check_outputs(out: Path, names: list[str]) -> dict:
    from transformers import AutoConfig

    for f in ("model.safetensors", "config.json", "README.md", "all_results.json", "eval_results.json"):
        assert (out / f).is_file(), f
    assert AutoConfig.from_pretrained(out).id2label == dict(enumerate(names))
    results = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and 0.0 <= results["eval_top5_accuracy"] <= 1.0
    assert "eval_accuracy" in json.loads((out / "all_results.json").read_text())
    card = (out / "README.md").read_text()
    assert "gam_rho" in card and "image-classification" in card and "zhang2023gradient" in card
    return results


@pytest.mark.parametrize("model", ["tiny_vit_dir", "tiny_timm_dir"])
@pytest.mark.parametrize("name", sorted(HUB_LAYOUTS))
def test_train_each_dataset(name, model, hub_copies, tmp_path, tiny_train_flags, request):
    out = tmp_path / "out"
    rc = main(["train", "--dataset", name, "--dataset_path", str(hub_copies[name]),
               "--model", str(request.getfixturevalue(model)), "--output_dir", str(out), *tiny_train_flags])
    assert rc == 0
    _check_outputs(out, HUB_LAYOUTS[name]["names"])
    assert (out / "preprocessor_config.json").is_file() or model == "tiny_timm_dir"  # timm: in config.json


def test_default_digits_job_short(tmp_path, capsys):
    """The no-argument job (built-in tiny ResNet, GAM in the default gam_fast mode, digits), cut to 2 steps."""
    out = tmp_path / "digits"
    assert main(["train", "--max_steps", "2", "--output_dir", str(out), "--disable_tqdm", "true"]) == 0
    _check_outputs(out, [str(i) for i in range(10)])
    assert "test accuracy:" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "`gam_mode` | gam_fast" in card and "tiny-resnet" in card


@pytest.mark.slow
def test_default_digits_job_full(tmp_path, monkeypatch):
    """`hf-gam train` with no arguments: >= 90 % test accuracy (measured 98.6 % with gam_fast, ~40 s on 2 shared cores)."""
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 0
    results = json.loads((tmp_path / "outputs" / "digits-gam_fast" / "eval_results.json").read_text())
    assert results["eval_accuracy"] >= 0.9


def test_config_files_yaml_and_json(tmp_path, hub_copies, tiny_vit_dir):
    values = {"dataset": "pets", "dataset_path": str(hub_copies["pets"]), "model": str(tiny_vit_dir),
              "max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": "1e-3", "gam_mode": "sam",
              "label_noise": 0.25, "validation_split": 0.25, "disable_tqdm": True, "report_to": ["none"]}
    for suffix in ("yaml", "json"):
        out = tmp_path / suffix
        path = tmp_path / f"config.{suffix}"
        text = json.dumps({**values, "output_dir": str(out)})  # JSON is valid YAML
        path.write_text(text)
        assert main(["train", str(path)]) == 0
        _check_outputs(out, HUB_LAYOUTS["pets"]["names"])
        assert (out / "validation_results.json").is_file()
        card = (out / "README.md").read_text()
        assert "2 of 6 training labels flipped" in card and "`gam_mode` | sam" in card


FLATNESS_TINY = ["--flatness_top_k", "1", "--flatness_max_iter", "2", "--flatness_num_samples", "1",
                 "--flatness_num_steps", "1", "--flatness_landscape_resolution", "3", "--flatness_batches", "1"]


def test_flatness_at_end_and_flatness_command(tmp_path, hub_copies, tiny_vit_dir, tiny_train_flags, capsys):
    out = tmp_path / "trained"
    data = ["--dataset", "cifar10", "--dataset_path", str(hub_copies["cifar10"])]
    assert main(["train", *data, "--model", str(tiny_vit_dir), "--output_dir", str(out), "--flatness_at_end",
                 "true", *tiny_train_flags, *FLATNESS_TINY]) == 0
    assert (out / "flatness" / "flatness.json").is_file()
    card = (out / "README.md").read_text()
    assert "flatness_lambda_max" in card and "### Flatness" in card
    for picture in ("flatness/flatness_spectrum.png", "flatness/flatness_landscape.png"):
        assert f"]({picture})" in card and (out / picture).is_file()
    report = tmp_path / "report"
    other = _saved_vit(tmp_path / "vit24", HUB_LAYOUTS["cifar10"]["names"], image_size=24)
    assert main(["flatness", "--model", str(out), *data, "--output_dir", str(report), "--batch_size", "4",
                 "--compare", str(other), *FLATNESS_TINY]) == 0
    result = json.loads((report / "flatness.json").read_text())
    assert result["name"] == "trained" and result["compare"]["name"] == "vit24"
    assert "lambda_max" in capsys.readouterr().out
    assert main(["flatness", "--model", str(tmp_path / "nope"), *data]) == 2


def _saved_vit(path: Path, names: list[str], image_size: int = 16) -> Path:
    """A 1-layer ViT for ``names`` at ``image_size`` px and its ViTImageProcessor, saved with save_pretrained."""
    from testing_utils import tiny_vit
    from transformers import ViTImageProcessor

    tiny_vit(image_size=image_size, num_labels=len(names), id2label=dict(enumerate(names)),
             label2id={n: i for i, n in enumerate(names)}).save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def test_flatness_compare_uses_its_own_processor(tmp_path, hub_copies, capsys):
    """--compare measures the second model on batches made by its own image processor (24 px here, the first
    model's 16 px would not even fit it), and run_flatness gets them as compare_batches."""
    from unittest import mock

    import hf_gam.flatness

    names = HUB_LAYOUTS["cifar10"]["names"]
    first, second = _saved_vit(tmp_path / "a", names), _saved_vit(tmp_path / "b", names, image_size=24)
    data = ["--dataset", "cifar10", "--dataset_path", str(hub_copies["cifar10"])]
    with mock.patch.object(hf_gam.flatness, "run_flatness", return_value={
            "lambda_max": 1.0, "hessian_trace": 1.0, "first_order_flatness": 1.0, "zeroth_order_flatness": 1.0}) as run:
        assert main(["flatness", "--model", str(first), "--compare", str(second), *data, "--batch_size", "4",
                     "--output_dir", str(tmp_path / "r"), *FLATNESS_TINY]) == 0, capsys.readouterr().err
    batches = run.call_args.args[1]
    kwargs = run.call_args.kwargs
    assert batches[0]["pixel_values"].shape[-2:] == (16, 16)
    assert kwargs["compare_batches"][0]["pixel_values"].shape[-2:] == (24, 24)
    assert torch.equal(batches[0]["labels"], kwargs["compare_batches"][0]["labels"])  # the same images
    assert kwargs["compare_model"].config.image_size == 24


def test_flatness_measures_the_saved_model_or_fails(tmp_path, hub_copies, capsys):
    """The trained model is loaded as saved: a model whose classes are not the dataset's is an error (exit 2, one
    line), not a silently re-initialized head; matching classes load with the saved head unchanged."""
    from transformers import AutoModelForImageClassification

    from hf_gam.cli import models

    names = HUB_LAYOUTS["cifar10"]["names"]
    data = ["--dataset", "cifar10", "--dataset_path", str(hub_copies["cifar10"])]
    cases = {"three": (["a", "b", "c"], "has 3 classes (num_labels) but the dataset has 10"),
             "renamed": (["zebra", *names[1:]], "class 0 is 'zebra' in the model but 'airplane' in the dataset")}
    for name, (classes, expected) in cases.items():
        path = _saved_vit(tmp_path / name, classes)
        capsys.readouterr()  # save_pretrained's progress bar
        assert main(["flatness", "--model", str(path), *data, "--output_dir", str(tmp_path / "r"),
                     *FLATNESS_TINY]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expected in err, err
        assert not (tmp_path / "r").exists()
    path = _saved_vit(tmp_path / "ok", names)
    loaded = models.load_trained_model(models.ModelArguments(model=str(path)), names)
    saved = AutoModelForImageClassification.from_pretrained(path)
    assert torch.equal(loaded.model.classifier.weight, saved.classifier.weight)


def test_card_names_the_label_column_and_an_eval_subset(tmp_path, hub_copies, tiny_vit_dir, tiny_train_flags):
    """--cifar100_labels coarse: the model-index says the results are on the coarse labels (not the default fine
    ones); --max_eval_samples: the card says the results come from a random subset of the split, and the model-index
    names no split (a subset is not the split)."""
    from huggingface_hub import ModelCard

    out = tmp_path / "out"
    assert main(["train", "--dataset", "cifar100", "--dataset_path", str(hub_copies["cifar100"]), "--model",
                 str(tiny_vit_dir), "--cifar100_labels", "coarse", "--max_eval_samples", "3", "--output_dir", str(out),
                 *tiny_train_flags]) == 0
    card = ModelCard.load(out / "README.md")
    entry = card.data.eval_results[0]
    assert entry.dataset_type == "uoft-cs/cifar100" and entry.dataset_split is None  # 3 of 4 images are not `test`
    assert entry.dataset_args == {"label_column": "coarse_label"}
    assert "results on 3 of the 4 images of split 'test', drawn at random" in card.text
    assert "| label_column | coarse_label |" in card.text


def test_help_and_usage(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--dataset", "--label_noise", "--augment", "--from_scratch", "--gam_mode", "--push_to_hub"):
        assert flag in text
    assert main(["frobnicate"]) == 2


# ------------------------------------------------------------------------------------------------ bad input
def _fails(argv: list[str], out: Path, capsys, *expected: str) -> None:
    assert main(["train", *argv, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    assert not out.exists()  # nothing half-written


def test_unknown_dataset(tmp_path, capsys):
    _fails(["--dataset", "imagenet"], tmp_path / "o", capsys, "unknown dataset 'imagenet'", "cifar10", "food101")


def test_missing_column_and_bad_labels(tmp_path, capsys, tiny_vit_dir):
    no_label = write_hub_copy(tmp_path / "a", "food101", drop="label")
    _fails(["--dataset", "food101", "--dataset_path", str(no_label), "--model", str(tiny_vit_dir)],
           tmp_path / "o", capsys, "label_column", "'label'", "columns found: image")
    bad = write_hub_copy(tmp_path / "b", "cifar10", labels={"train": [0, 12], "test": [1]}, n_train=2, n_eval=1)
    _fails(["--dataset", "cifar10", "--dataset_path", str(bad), "--model", str(tiny_vit_dir)],
           tmp_path / "o", capsys, "outside the class range")


def test_unreadable_model(tmp_path, capsys, hub_copies):
    _fails(["--dataset", "cars", "--dataset_path", str(hub_copies["cars"]), "--model", str(tmp_path / "nope")],
           tmp_path / "o", capsys, "model:", "nope")


def test_resume_from_a_checkpoint_of_another_model(tmp_path, capsys):
    """A checkpoint whose tensors do not fit the model (CheckpointMismatchError, a UserError like every other
    one the command reports) is one error line naming the checkpoint, exit status 2, no traceback."""
    from testing_utils import tiny_vit

    tiny_vit(seed=0).save_pretrained(tmp_path / "ckpt")
    assert main(["train", "--max_steps", "1", "--per_device_train_batch_size", "4", "--disable_tqdm", "true",
                 "--save_strategy", "no", "--resume_from_checkpoint", str(tmp_path / "ckpt"),
                 "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"hf-gam: error: checkpoint {tmp_path / 'ckpt'} does not hold" in err


def test_bad_values(tmp_path, capsys):
    _fails(["--gam_rho", "-1"], tmp_path / "o", capsys, "gam_rho", "-1")
    _fails(["--label_noise", "2"], tmp_path / "o", capsys, "label_noise")
    _fails(["--remove_unused_columns", "true"], tmp_path / "o", capsys, "remove_unused_columns")
    _fails(["--augment", "mixup"], tmp_path / "o", capsys, "invalid choice")  # argparse's own message
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: digits\nlerning_rate: 0.1\n")
    assert main(["train", str(cfg)]) == 2
    assert "unknown fields lerning_rate" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [
    (["--flatness_rho", "-1"], "flatness_rho must be finite and > 0; got -1.0"),
    (["--flatness_top_k", "0"], "flatness_top_k must be an int >= 1; got 0"),
    (["--flatness_batches", "0"], "flatness_batches must be an int >= 1; got 0"),
    (["--batch_size", "0"], "batch_size must be an int >= 1; got 0"),
    (["--flatness_landscape_resolution", "1"], "flatness_landscape_resolution must be an int >= 2; got 1")])
def test_flatness_command_bad_values(tmp_path, capsys, flags, expected):
    out = tmp_path / "o"
    assert main(["flatness", "--model", "tiny-resnet", "--output_dir", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"hf-gam: error: {expected}"] and not out.exists()


def test_flatness_command_bad_config_file(tmp_path, capsys):
    cfg = tmp_path / "f.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'o'}\nfoo: 1\n")
    assert main(["flatness", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"hf-gam: error: config file {str(cfg)!r}: unknown fields foo"]
    assert main(["flatness", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_train_flatness_at_end_bad_values_fail_before_training(tmp_path, capsys, monkeypatch):
    import hf_gam.data

    monkeypatch.setattr(hf_gam.data, "load_image_data", lambda *a, **k: pytest.fail("loaded data"))
    _fails(["--flatness_at_end", "true", "--flatness_top_k", "0"], tmp_path / "o", capsys,
           "flatness_top_k must be an int >= 1; got 0")
    _fails(["--flatness_at_end", "true", "--flatness_batches", "0"], tmp_path / "o", capsys,
           "flatness_batches must be an int >= 1; got 0")


def test_push_offline_fails_early(tmp_path, capsys):
    _fails(["--push_to_hub", "true", "--hub_model_id", "me/x"], tmp_path / "o", capsys, "push_to_hub", "offline")


def test_push_without_token_fails_early(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    _fails(["--push_to_hub", "true"], tmp_path / "o", capsys, "push_to_hub", "no Hugging Face token")


def test_main_ends_the_process_group(tmp_path, monkeypatch):
    """Under torchrun every process ends its process group before it exits (a process that exits with gloo's
    threads alive can SIGABRT on a busy machine): after a run that returns, and after one that raises."""
    import torch.distributed as dist

    import hf_gam.cli as cli

    def crash(argv):
        raise RuntimeError("boom")

    for i in range(2):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store{i}", rank=0, world_size=1)
        try:
            if i == 0:
                assert main(["train", "--dataset", "nope"]) == 2
            else:
                monkeypatch.setattr(cli, "train_main", crash)
                with pytest.raises(RuntimeError, match="boom"):
                    main(["train"])
            assert not dist.is_initialized()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def test_exit_process_under_a_launcher_flushes_and_keeps_the_status(tmp_path):
    """Under torchrun (WORLD_SIZE > 1) a command leaves with os._exit after flushing: the status and the output
    survive, and nothing after it runs (no C++ teardown, where a gloo thread can abort the process)."""
    code = ("import atexit, sys\nfrom hf_gam.cli.common import exit_process\n"
            "atexit.register(lambda: print('atexit ran'))\nprint('before', end='')\nsys.stderr.write('err')\n"
            "exit_process(3)\nprint('after')\n")
    env = {**os.environ, "WORLD_SIZE": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "before", "err")
    single = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**env, "WORLD_SIZE": "1"})
    assert single.returncode == 3 and single.stdout == "beforeatexit ran\n"


def test_console_script_exit_status(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}  # the checkout under test
    proc = subprocess.run([sys.executable, "-m", "hf_gam", "train", "--dataset", "nope"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "hf-gam: error: dataset: unknown dataset 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()


# ------------------------------------------------------------------------------------------------ model card
def test_card_records_every_setting():
    args = GAMConfig(output_dir="unused", gam_mode="gam_fast", gam_rho=0.3, optim="sgd", learning_rate=2e-3,
                     lr_scheduler_type="cosine", max_steps=40000, report_to="none", use_cpu=True)
    card = render_model_card(args, model_name="m", base_model="google/efficientnet-b0", dataset_name="uoft-cs/cifar10",
                             results={"eval_accuracy": 0.91234, "eval_top5_accuracy": 0.99, "eval_runtime": 3.0},
                             label_noise={"rate": 0.2, "flipped": 10, "total": 50, "seed": 1}, eval_split="test")
    text = str(card)
    for name in [n for n in vars(args) if n.startswith("gam_")] + ["sam_rho"]:
        assert f"`{name}`" in text, name
    assert "| `gam_rho` | 0.3 |" in text and "| `optim` | sgd |" in text and "| `lr_scheduler_type` | cosine |" in text
    assert "0.9123" in text and "eval_runtime" not in text
    assert "10 of 50 training labels flipped" in text and "@inproceedings{zhang2023gradient" in text
    data = card.data.to_dict()
    assert {"gam", "sam", "image-classification"} <= set(data["tags"])
    assert data["base_model"] == "google/efficientnet-b0" and data["datasets"] == ["uoft-cs/cifar10"]
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(0.91234)
    assert template_path().read_text().startswith("---")


@pytest.mark.slow
def test_wheel_ships_every_module_and_the_card_template(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, timeout=600)
    wheel = next(tmp_path.glob("hf_gam-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tree = {p.relative_to(REPO).as_posix() for p in (REPO / "hf_gam").rglob("*") if p.suffix in (".py", ".md")}
    assert "hf_gam/model_cards/gam_model_card.md" in tree and "hf_gam/core/step.py" in tree
    assert {"hf_gam/metrics/accuracy/accuracy.py", "hf_gam/metrics/top_k_accuracy/top_k_accuracy.py"} <= tree
    assert tree <= set(names), f"modules of the tree missing from the wheel: {sorted(tree - set(names))}"


def test_defaults_are_sensible():
    assert TRAIN_DEFAULTS["remove_unused_columns"] is False and TRAIN_DEFAULTS["report_to"] == "none"
