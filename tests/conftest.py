"""Shared fixtures and the offline environment: tiny models saved with ``save_pretrained`` and tiny local copies of
the paper's Hub datasets in the Hub's exact layout (built by ``testing_utils``). Nothing here touches the network."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), "hf_gam_tests_datasets_cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from testing_utils import HUB_LAYOUTS, TIMM_VIT_16PX, tiny_timm, tiny_vit, write_hub_copy  # noqa: E402
from local_hub import local_hub  # noqa: E402, F401 (fixture: a local Hub behind HF_ENDPOINT, tests/local_hub.py)


@pytest.fixture(scope="session")
def hub_copies(tmp_path_factory) -> dict[str, Path]:
    """Tiny Hub-layout copies of the five registered datasets, written once per session."""
    root = tmp_path_factory.mktemp("hub_copies")
    return {name: write_hub_copy(root, name) for name in HUB_LAYOUTS}


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A 1-layer, 16-wide HF ViT (16 px input, 8 px patches) and its ViTImageProcessor, saved with
    ``save_pretrained``."""
    from transformers import ViTImageProcessor

    out = tmp_path_factory.mktemp("tiny_vit")
    tiny_vit(seed=None).save_pretrained(out)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_timm_dir(tmp_path_factory) -> Path:
    """timm's ``test_vit`` (1 block, 16 px input) wrapped as ``TimmWrapperForImageClassification``; the image
    settings live in ``config.json``'s ``pretrained_cfg`` as on the Hub."""
    out = tmp_path_factory.mktemp("tiny_timm")
    tiny_timm("test_vit", seed=None, model_args=TIMM_VIT_16PX, pretrained_cfg={
        "input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "interpolation": "bilinear",
        "num_classes": 3}).save_pretrained(out)
    return out


# Flags that make `hf-gam train` a few-second run: one exact-GAM step, tiny batches, no progress bars.
TINY_TRAIN_FLAGS = ["--max_steps", "1", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
                    "--logging_steps", "1", "--disable_tqdm", "true", "--save_strategy", "no", "--seed", "0"]


@pytest.fixture
def tiny_train_flags() -> list[str]:
    return list(TINY_TRAIN_FLAGS)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores); use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
