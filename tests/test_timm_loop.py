"""examples/timm_loop.py: timm create_model (a tiny test_* architecture, no weights), timm's data config and
transforms, hf_gam.optim.GAM with timm's scheduler, bf16 autocast on CPU: trains a few steps offline."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from timm_loop import main  # noqa: E402


def test_timm_loop_trains_with_gam_bf16(tmp_path):
    out = tmp_path / "result.json"
    result = main(["--model", "test_efficientnet", "--image_size", "32", "--max_steps", "3", "--batch_size", "8",
                   "--mode", "gam_fast", "--amp", "bf16", "--max_grad_norm", "5", "--output_json", str(out)])
    assert result == json.loads(out.read_text())
    assert result["steps"] == 3 and math.isfinite(result["first_loss"]) and math.isfinite(result["last_loss"])
    assert result["param_groups"] == 2  # timm's factory: no weight decay on norms and biases
    lrs = result["lrs"]  # timm's cosine scheduler (per step) drives the wrapper's groups, which are the base's
    assert lrs[0] == 0.05 and lrs[0] > lrs[1] > lrs[2] > 0
    cfg = result["data_config"]  # test_efficientnet's pretrained_cfg (ImageNet statistics), size overridden
    assert cfg["input_size"] == [3, 32, 32] and cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert cfg["interpolation"] == "bicubic"


@pytest.mark.slow
def test_timm_loop_learns_digits():
    result = main(["--model", "test_resnet", "--image_size", "32", "--epochs", "2", "--batch_size", "32",
                   "--mode", "gam_fast", "--lr", "0.1"])
    assert result["val_accuracy"] > 0.25  # chance is 0.1 (timm's training augmentation on 8x8 digits is harsh)
