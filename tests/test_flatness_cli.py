"""Tests of hf_gam.flatness_cli and hf_gam.plots: the flatness report (JSON + PNGs + model-card section), its
command-line arguments next to TrainingArguments, and the FlatnessCallback inside a real Trainer run."""

from __future__ import annotations

import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from test_flatness import _one_thread  # noqa: F401 (the module's autouse fixture: one thread)
from test_flatness import LossMLP, assert_unchanged, snapshot, tiny_vit, vit_batches
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from hf_gam import flatness as FL
from hf_gam.flatness_cli import (DEFAULT_SETTINGS, FlatnessArguments, FlatnessCallback, flatness_markdown,
                                 run_flatness)


# ----------------------------------------------------------------------------------------- report, CLI piece
def test_run_flatness_writes_json_and_readable_pngs(tmp_path):
    from PIL import Image

    batches = vit_batches(dtype=torch.float32)
    model, other = tiny_vit(0, torch.float32), tiny_vit(1, torch.float32)
    snap = snapshot(model)
    result = run_flatness(model, batches, tmp_path, compare_model=other, k=4, max_iter=30, tol=1e-3,
                          num_samples=10, num_steps=2, landscape_resolution=5, name="SGD", compare_name="GAM")
    assert_unchanged(model, snap)
    saved = json.loads((tmp_path / "flatness.json").read_text())
    for key in ("hessian_eigenvalues", "hessian_trace", "first_order_flatness", "zeroth_order_flatness"):
        assert key in saved and key in saved["compare"]
    assert saved["settings"]["k"] == 4 and saved["settings"]["rho"] == DEFAULT_SETTINGS["rho"]
    assert saved["settings"]["num_batches"] == 2 and saved["settings"]["num_examples"] == 8
    assert len(saved["hessian_eigenvalues"]) == 4 and saved["name"] == "SGD" and saved["compare"]["name"] == "GAM"
    assert saved["zeroth_order_flatness"] <= saved["first_order_flatness"]
    assert saved["hessian_eigenvalues"] == result["hessian_eigenvalues"]
    for name in ("spectrum", "landscape", "landscape_1d"):
        path = tmp_path / saved["files"][name]
        assert path.stat().st_size > 10_000
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300
            assert len(im.convert("L").getcolors(maxcolors=1 << 16) or range(999)) > 20  # not blank
    card = flatness_markdown(saved)
    assert "| SGD |" in card and "| GAM |" in card and "(flatness_landscape.png)" in card
    with pytest.raises(ValueError, match="unknown flatness settings"):
        run_flatness(model, batches, tmp_path, top_k=3)


def test_flatness_arguments_parse_alongside_training_arguments(tmp_path):
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(FlatnessArguments))
    parser = HfArgumentParser((TrainingArguments, FlatnessArguments))
    targs, fargs = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--compare", "other/model", "--flatness_top_k", "5", "--flatness_train_mode"])
    assert fargs.flatness_compare == "other/model" and fargs.flatness_train_mode and targs.seed == 42
    settings = fargs.to_settings()
    assert settings["k"] == 5 and settings["train_mode"] and set(settings) <= set(DEFAULT_SETTINGS)
    assert FL.run_flatness is run_flatness and FL.FlatnessArguments is FlatnessArguments  # hf_gam.flatness has them


# --------------------------------------------------------------------------------------------------- callback
class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 5, generator=g), torch.randint(0, 4, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class _Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _train(tmp_path, callback=None, attach=True):
    torch.manual_seed(0)
    model = LossMLP().float()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=0.1, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0)
    recorder = _Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=_Dataset(), callbacks=[recorder])
    if callback is not None:
        callback.attach(trainer) if attach else trainer.add_callback(callback)
    trainer.train()
    return trainer, recorder


def test_flatness_callback_logs_its_keys_without_changing_training(tmp_path):
    keys = {"flatness/lambda_max", "flatness/hessian_trace", "flatness/first_order_flatness"}
    trainer, recorder = _train(tmp_path / "a", FlatnessCallback(every_n_steps=2))
    logged = [entry for entry in recorder.logs if keys & set(entry)]
    assert len(logged) == 2 and all(keys <= set(entry) for entry in logged)  # steps 2 and 4, seen by trackers
    history = [e for e in trainer.state.log_history if keys & set(e)]
    assert [e["step"] for e in history] == [2, 4]
    assert all(e["flatness/lambda_max"] > 0 and e["flatness/first_order_flatness"] > 0 for e in history)
    plain, _ = _train(tmp_path / "b")
    for p, q in zip(trainer.model.parameters(), plain.model.parameters()):
        assert torch.equal(p, q)  # same data order, same steps: the callback touches no RNG and no weight
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        detached, recorder = _train(tmp_path / "c", FlatnessCallback(every_n_steps=4, measures=("lambda_max",)),
                                    attach=False)
    assert [e["step"] for e in detached.state.log_history if "flatness/lambda_max" in e] == [4]
    with pytest.raises(ValueError, match="every_n_steps"):
        FlatnessCallback(every_n_steps=0)
