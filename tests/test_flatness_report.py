"""Tests of hf_gam.flatness.report, .plots, .callback and .defaults: the flatness report (JSON + PNGs + model-card
section), its command-line arguments next to TrainingArguments, the FlatnessCallback inside a real Trainer run, and
the one set of defaults they all read."""

from __future__ import annotations

import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from testing_utils import VIT_8PX, LossMLP, assert_unchanged, snapshot, tiny_vit, vit_batches
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from hf_gam import flatness as FL
from hf_gam.flatness import defaults
from hf_gam.flatness import (DEFAULT_SETTINGS, FlatnessArguments, FlatnessCallback, flatness_markdown,
                             run_flatness)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- report, CLI piece
def test_run_flatness_writes_json_and_readable_pngs(tmp_path):
    from PIL import Image

    batches = vit_batches(dtype=torch.float32)
    model, other = tiny_vit(**VIT_8PX, seed=0), tiny_vit(**VIT_8PX, seed=1)
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


BAD_SETTINGS = [("k", 0, "top_k"), ("max_iter", 2, "max_iter"), ("tol", 0.0, "tol"), ("num_samples", 0, "num_samples"),
                ("rho", -1.0, "rho"), ("rho", 0.0, "rho"), ("num_steps", 0, "num_steps"),
                ("landscape_resolution", 1, "landscape_resolution"), ("landscape_span", 0.0, "landscape_span")]


@pytest.mark.parametrize("key, value, flag", BAD_SETTINGS)
def test_bad_settings_fail_before_any_compute(tmp_path, key, value, flag):
    """Every setting is checked up front (run_flatness and FlatnessArguments.validate), naming it and the value:
    a bad landscape setting must not wait for minutes of eigenvalues, and nothing is written."""
    settings = {"k": 3, key: value}  # max_iter 2 < k 3 (Lanczos)
    model = tiny_vit(**VIT_8PX, seed=0)
    called = []
    model.register_forward_pre_hook(lambda *a: called.append(1))
    with pytest.raises(ValueError, match=rf"^{key} must be .*; got {value!r}$"):
        run_flatness(model, vit_batches(dtype=torch.float32), tmp_path / "out", **settings)
    assert not called and not (tmp_path / "out").exists()
    args = FlatnessArguments(**{"flatness_top_k": 3, f"flatness_{flag}": value})
    with pytest.raises(ValueError, match=rf"^flatness_{flag} must be .*; got {value!r}$"):
        args.validate()
    FlatnessArguments().validate()  # the defaults are valid
    FlatnessArguments(flatness_top_k=3, flatness_max_iter=2, flatness_method="power").validate()  # per value


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


def test_defaults_are_written_once():
    """The functions, FlatnessArguments (the command line), run_flatness and FlatnessCallback agree with
    hf_gam.flatness.defaults (they used to disagree: tol 1e-5 in the functions, 1e-4 in the report)."""
    import inspect

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    args = FlatnessArguments()
    measures = (FL.hessian_eigenvalues, FL.hessian_trace, FL.first_order_flatness, FL.zeroth_order_flatness,
                FL.loss_landscape, FlatnessCallback)
    checks = [  # (the value in defaults.py, the values every front end uses)
        (defaults.TOL, [default(FL.hessian_eigenvalues, "tol"), args.flatness_tol, DEFAULT_SETTINGS["tol"]]),
        (defaults.MAX_ITER, [default(FL.hessian_eigenvalues, "max_iter"), args.flatness_max_iter,
                      DEFAULT_SETTINGS["max_iter"]]),
        (defaults.METHOD, [default(FL.hessian_eigenvalues, "method"), args.flatness_method, DEFAULT_SETTINGS["method"]]),
        (defaults.NUM_SAMPLES, [default(FL.hessian_trace, "num_samples"), args.flatness_num_samples,
                         DEFAULT_SETTINGS["num_samples"]]),
        (defaults.NUM_STEPS, [default(FL.first_order_flatness, "num_steps"), default(FL.zeroth_order_flatness, "num_steps"),
                       args.flatness_num_steps, DEFAULT_SETTINGS["num_steps"]]),
        (defaults.RHO, [args.flatness_rho, DEFAULT_SETTINGS["rho"], default(FlatnessCallback, "rho")]),
        (defaults.LANDSCAPE_RESOLUTION, [default(FL.loss_landscape, "resolution"), args.flatness_landscape_resolution,
                                  DEFAULT_SETTINGS["landscape_resolution"]]),
        (defaults.LANDSCAPE_SPAN, [default(FL.loss_landscape, "span"), args.flatness_landscape_span,
                            DEFAULT_SETTINGS["landscape_span"]]),
        (defaults.REPORT_TOP_K, [args.flatness_top_k, DEFAULT_SETTINGS["k"]]),
        (defaults.SEED, [default(fn, "seed") for fn in measures] + [args.flatness_seed, DEFAULT_SETTINGS["seed"]]),
        (defaults.TRAIN_MODE, [default(fn, "train_mode") for fn in measures]
         + [args.flatness_train_mode, DEFAULT_SETTINGS["train_mode"]]),
    ]
    for value, used in checks:
        assert all(u == value and type(u) is type(value) for u in used), (value, used)
    cb = FlatnessCallback()
    assert (cb.max_iter, cb.num_samples, cb.num_steps, cb.rho) == (defaults.CALLBACK_MAX_ITER, defaults.CALLBACK_NUM_SAMPLES,
                                                                   defaults.CALLBACK_NUM_STEPS, defaults.RHO)


def test_plots_name_the_empty_input(tmp_path):
    from hf_gam.flatness import plots

    for draw in (plots.plot_spectrum, plots.plot_landscape, plots.plot_landscape_1d):
        with pytest.raises(ValueError, match="results must name at least one model; got an empty mapping"):
            draw({}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


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
