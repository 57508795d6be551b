"""A user's script that builds its own `TrainingArguments` and changes only `Trainer` to `GAMTrainer` trains with GAM
(the default `gam_fast`).

`scripts/run_image_classification.py` follows transformers' example script of the same name (HfArgumentParser over
its own dataclasses and `TrainingArguments`, `AutoImageProcessor`, torchvision transforms, `Trainer(...,
processing_class=image_processor, data_collator=collate_fn)`; see its docstring for the offline differences). The
test swaps `Trainer` for `GAMTrainer` (one import line added, one call changed) and runs it in a fresh process,
offline, on a tiny saved ViT and a tiny imagefolder dataset written here."""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
SCRIPT = HERE / "scripts" / "run_image_classification.py"


def swap_trainer(text: str) -> str:
    """The user's whole change: import GAMTrainer, construct it where the script constructed Trainer."""
    text = text.replace("from transformers.trainer_utils import get_last_checkpoint\n",
                        "from transformers.trainer_utils import get_last_checkpoint\nfrom hf_gam import GAMTrainer\n")
    return text.replace("    trainer = Trainer(\n", "    trainer = GAMTrainer(\n")


def write_imagefolder(root: Path, classes=("cat", "dog", "fish"), per_class=4, seed=0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "validation"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                size = (13 + 3 * i, 11 + 2 * i)
                Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_user_script_with_only_trainer_swapped_trains_with_gam(tmp_path, tiny_vit_dir):
    original = SCRIPT.read_text()
    swapped = swap_trainer(original)
    changed = [line for line in difflib.ndiff(original.splitlines(), swapped.splitlines()) if line[:2] in ("+ ", "- ")]
    assert changed == ["+ from hf_gam import GAMTrainer", "-     trainer = Trainer(", "+     trainer = GAMTrainer("]
    script = tmp_path / "run_image_classification.py"
    script.write_text(swapped)
    data, out = write_imagefolder(tmp_path / "data"), tmp_path / "out"
    argv = ["--model_name_or_path", str(tiny_vit_dir), "--train_dir", str(data / "train"),
            "--validation_dir", str(data / "validation"), "--output_dir", str(out), "--do_train", "--do_eval",
            "--remove_unused_columns", "False", "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "6", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--seed", "0", "--disable_tqdm", "true"]
    root = str(HERE.parent)  # the checkout under test, not whatever hf_gam is installed
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 2
    for h in steps:
        assert {"gam/grad_norm", "gam/ascent_grad_norm", "gam/r1"} <= set(h), h
        assert np.isfinite(h["loss"]) and h["gam/grad_norm"] > 0
    assert "eval_accuracy" in json.loads((out / "eval_results.json").read_text())
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    assert "gam_fast" in (out / "README.md").read_text()
