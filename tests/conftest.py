"""Shared fixtures: tiny models saved with ``save_pretrained`` and tiny local copies of the paper's Hub datasets in
the Hub's exact layout (``data/<split>-00000-of-00001.parquet``, the Hub's column names, ``ClassLabel`` features with
class names), written with ``datasets``. Nothing here touches the network."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), "hf_gam_tests_datasets_cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}_{i:03d}" for i in range(n)]


# name -> (image column, label column, evaluation split, class names, extra columns {name: (kind, values spec)})
HUB_LAYOUTS: dict[str, dict] = {
    "cifar10": {"image": "img", "label": "label", "eval": "test", "names": CIFAR10_NAMES},
    "cifar100": {"image": "img", "label": "fine_label", "eval": "test", "names": _names("fine", 100),
                 "coarse": ("coarse_label", _names("coarse", 20))},
    "pets": {"image": "image", "label": "label", "eval": "test", "names": _names("breed", 37),
             "pets_extra": True},
    "food101": {"image": "image", "label": "label", "eval": "validation", "names": _names("dish", 101)},
    "cars": {"image": "image", "label": "label", "eval": "test", "names": _names("car", 196)},
}


def random_image(rng: np.random.Generator, i: int):
    """Small PIL images of assorted sizes and modes: RGB, grayscale (L), RGBA; odd sizes included."""
    from PIL import Image

    w, h = [(13, 9), (16, 16), (7, 11), (20, 14)][i % 4]
    mode = ["RGB", "L", "RGB", "RGBA"][i % 4]
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    array = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode)


def write_readme(out: Path, splits: list[str]) -> None:
    """The dataset card of a Hub snapshot: YAML front matter whose ``configs:`` block maps each split to its files
    (the layout the Hub's parquet conversion writes, e.g. tanganke/stanford_cars lists 9 splits this way)."""
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in splits:
        lines += [f"  - split: {split}", f"    path: data/{split}-*"]
    (Path(out) / "README.md").write_text("\n".join(lines + ["---", "", "A tiny test copy.", ""]))


def write_hub_copy(root: Path, name: str, n_train: int = 8, n_eval: int = 4, *, drop: str | None = None,
                   labels: dict[str, list] | None = None, label_features: dict | None = None,
                   extra_splits: dict[str, bytes] | None = None, seed: int = 0) -> Path:
    """Write a tiny copy of registered dataset ``name`` under ``root`` in its Hub layout (README with its
    ``configs:`` block, ``data/<split>-00000-of-00001.parquet``) and return the directory.
    ``drop``: a column to leave out (to test errors); ``labels``: per-split label lists, cast to the ClassLabel
    without its range check (to inject out-of-range labels, as a corrupted copy would hold), unless
    ``label_features`` gives a split's label feature (``Value("string")``, ``Value("int64")``, a ClassLabel with
    other names...); ``extra_splits``: more splits listed in the README, whose file holds the given bytes."""
    from datasets import ClassLabel, Dataset, Features, Image, Value

    spec = HUB_LAYOUTS[name]
    rng = np.random.default_rng(seed)
    out = Path(root) / f"{name}-copy"
    (out / "data").mkdir(parents=True, exist_ok=True)
    n_classes = len(spec["names"])
    for split, n in (("train", n_train), (spec["eval"], n_eval)):
        label_values = (labels or {}).get(split, [i % min(n_classes, 5) for i in range(n)])
        columns = {spec["image"]: [random_image(rng, i) for i in range(n)], spec["label"]: label_values}
        label_feature = (label_features or {}).get(split) or (Value("int64") if labels else
                                                              ClassLabel(names=spec["names"]))
        features = {spec["image"]: Image(), spec["label"]: label_feature}
        if "coarse" in spec:
            col, coarse_names = spec["coarse"]
            columns[col] = [i % len(coarse_names) for i in range(n)]
            features[col] = ClassLabel(names=coarse_names)
        if spec.get("pets_extra"):
            columns["image_id"] = [f"img_{split}_{i}" for i in range(n)]
            columns["label_cat_dog"] = [i % 2 for i in range(n)]
            features["image_id"] = Value("string")
            features["label_cat_dog"] = ClassLabel(names=["cat", "dog"])
        if drop:
            columns.pop(drop)
            features.pop(drop)
        ds = Dataset.from_dict(columns, features=Features(features))
        if labels and spec["label"] in ds.column_names and split not in (label_features or {}):
            ds = ds.cast_column(spec["label"], ClassLabel(names=spec["names"]))
        ds.to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
    for split, content in (extra_splits or {}).items():
        (out / "data" / f"{split}-00000-of-00001.parquet").write_bytes(content)
    write_readme(out, ["train", spec["eval"], *(extra_splits or {})])
    return out


@pytest.fixture(scope="session")
def hub_copies(tmp_path_factory) -> dict[str, Path]:
    """Tiny Hub-layout copies of the five registered datasets, written once per session."""
    root = tmp_path_factory.mktemp("hub_copies")
    return {name: write_hub_copy(root, name) for name in HUB_LAYOUTS}


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A 1-layer, 16-wide HF ViT (16 px input, 8 px patches) and its ViTImageProcessor, saved with
    ``save_pretrained``."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    out = tmp_path_factory.mktemp("tiny_vit")
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=3)
    ViTForImageClassification(config).save_pretrained(out)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_timm_dir(tmp_path_factory) -> Path:
    """timm's ``test_vit`` (1 block, 16 px input) wrapped as ``TimmWrapperForImageClassification``; the image
    settings live in ``config.json``'s ``pretrained_cfg`` as on the Hub."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    out = tmp_path_factory.mktemp("tiny_timm")
    config = TimmWrapperConfig(
        architecture="test_vit", num_labels=3, model_args={"img_size": 16, "patch_size": 8, "depth": 1},
        pretrained_cfg={"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0,
                        "interpolation": "bilinear", "num_classes": 3})
    TimmWrapperForImageClassification(config).save_pretrained(out)
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
