"""The tests' one toolkit (as TRL's and PEFT's ``tests/testing_utils.py``): tiny models and datasets built in-process
(one builder per model family), the one-step helpers of the numerics tests, and tiny Hub-layout dataset copies. No
network. Test files import from here (and from ``reference.py``), never from each other; fixtures live in
``conftest.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from reference import flat_params
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_outputs import ImageClassifierOutput, SequenceClassifierOutput

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.core.directions import MODES
from hf_gam.testing import TensorDataset, TinyMLP, TinyMLPConfig

ALL_MODES = list(MODES)


def tiny_model(seed=0, dtype=torch.float64, **config):
    """A seeded :class:`~hf_gam.testing.TinyMLP` (103 parameters by default) in ``dtype``."""
    torch.manual_seed(seed)
    return TinyMLP(TinyMLPConfig(**config)).to(dtype)


def tiny_data(n=16, in_dim=6, num_labels=3, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g, dtype=dtype)
    y = torch.randint(0, num_labels, (n,), generator=g)
    return TensorDataset(x, y)


# ------------------------------------------------------------------- flatness diagnostics: models and model state
class LogitsMLP(nn.Module):
    """``i -> h (tanh) -> o`` returning bare logits (the flatness diagnostics must compute the cross-entropy);
    optional BatchNorm and dropout; float64 by default."""

    def __init__(self, i=5, h=20, o=4, bn=False, dropout=0.0, seed=0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(i, h), nn.Linear(h, o)
        self.bn = nn.BatchNorm1d(h) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.to(dtype)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


class LossMLP(LogitsMLP):
    """Takes ``labels`` and returns a ModelOutput with its own ``loss`` (like a Hugging Face model)."""

    def forward(self, x, labels=None):
        logits = super().forward(x)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def vit_batches(n=2, size=4, seed=2, dtype=torch.float64):
    """``n`` batches of ``size`` random 8 px images with labels for ``tiny_vit(**VIT_8PX)``."""
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(size, 3, 8, 8, generator=g, dtype=dtype),
             "labels": torch.randint(0, 3, (size,), generator=g)} for _ in range(n)]


def snapshot(model):
    """Everything a diagnostic must leave as it was: weights, grads, requires_grad, buffers, modes, the RNG."""
    return {"params": [p.detach().clone() for p in model.parameters()],
            "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "buffers": [b.clone() for b in model.buffers()],
            "training": [m.training for m in model.modules()],
            "rng": torch.get_rng_state()}


def assert_unchanged(model, snap):
    """``model`` is bit for bit as :func:`snapshot` saw it."""
    now = snapshot(model)
    assert all(torch.equal(a, b) for a, b in zip(snap["params"], now["params"])), "weights changed"
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(snap["grads"], now["grads"]))
    assert snap["requires_grad"] == now["requires_grad"]
    assert all(torch.equal(a, b) for a, b in zip(snap["buffers"], now["buffers"])), "buffers changed"
    assert snap["training"] == now["training"], "train/eval modes changed"
    assert torch.equal(snap["rng"], now["rng"]), "the global RNG was used"


# Heads of transformers' classification losses: (TinyMLPConfig kwargs, label maker(generator, n)).
HEADS = {
    "single_label": ({}, lambda g, n: torch.randint(0, 3, (n,), generator=g)),
    "ignore_index": ({}, lambda g, n: torch.where(torch.rand(n, generator=g) < 0.3, -100,
                                                  torch.randint(0, 3, (n,), generator=g))),
    "multi_label": ({"problem_type": "multi_label_classification"},
                    lambda g, n: torch.randint(0, 2, (n, 3), generator=g).double()),
    "regression": ({"num_labels": 1}, lambda g, n: torch.randn(n, generator=g, dtype=torch.float64)),
}


def head_model_and_data(head, n=12, seed=0):
    """A float64 :class:`TinyMLP` with head ``head`` (a key of :data:`HEADS`) and ``n`` samples with its labels."""
    config, make_labels = HEADS[head]
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return tiny_model(seed, **config), TensorDataset(x, make_labels(g, n))


class TinyConvConfig(PretrainedConfig):
    model_type = "hf-gam-tiny-conv"

    def __init__(self, channels=4, num_labels=3, **kwargs):
        self.channels = channels
        super().__init__(num_labels=num_labels, **kwargs)


class TinyConvNet(PreTrainedModel):
    """``conv3x3 -> BatchNorm -> tanh -> conv3x3 -> mean pool -> linear`` on 3-channel images: the conv weights'
    gradients take the inputs' memory format (channels-last inputs give channels-last weight gradients)."""

    config_class = TinyConvConfig
    main_input_name = "pixel_values"

    def __init__(self, config: TinyConvConfig):
        super().__init__(config)
        c = config.channels
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, pixel_values, labels=None, **kwargs):
        x = self.conv2(torch.tanh(self.bn(self.conv1(pixel_values))))
        logits = self.head(x.mean(dim=(2, 3)))
        loss = None if labels is None else ForSequenceClassificationLoss(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(loss=loss, logits=logits)


def tiny_conv(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return TinyConvNet(TinyConvConfig()).to(dtype)


def image_data(n=8, size=16, seed=1, dtype=torch.float32):
    """``n`` random ``size`` px 3-channel images with labels in 0..2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g, dtype=dtype)
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=g))


def memory_format_collator(memory_format):
    """Stack rows into a batch whose ``pixel_values`` are in ``memory_format``."""
    def collate(features):
        x = torch.stack([f["pixel_values"] for f in features]).contiguous(memory_format=memory_format)
        return {"pixel_values": x, "labels": torch.stack([f["labels"] for f in features])}
    return collate


def train_tiny_conv(tmp_path, mode, memory_format=torch.contiguous_format, dtype=torch.float64, **kw):
    """Three fused-AdamW steps of GAMTrainer on :func:`tiny_conv` (accumulation 2), inputs in ``memory_format``:
    ``(weights after, trainer)``."""
    model = tiny_conv(dtype=dtype)
    args = GAMConfig(output_dir=str(tmp_path), gam_mode=mode, optim="adamw_torch_fused", learning_rate=0.05,
                     per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=3, report_to="none",
                     use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0, **kw)
    trainer = GAMTrainer(model=model, args=args, train_dataset=image_data(32, size=6, dtype=dtype),
                         data_collator=memory_format_collator(memory_format))
    trainer.train()
    return [p.detach().clone() for p in model.parameters()], trainer


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------- real Hugging Face / timm families: one builder per family
# ``seed=None`` leaves the global RNG alone (the caller seeds, or the weights do not matter); ``dtype=None`` keeps
# float32; ``**config`` goes to the family's config class.
def _built(model_cls, config, seed, dtype):
    if seed is not None:
        torch.manual_seed(seed)
    model = model_cls(config)
    return model if dtype is None else model.to(dtype)


def tiny_vit(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_labels=3, seed=0, dtype=None,
             name_or_path=None, **config):
    """A 1-layer HF ViT (2 heads, SDPA attention). ``name_or_path``: set as ``from_pretrained(name_or_path)`` does."""
    from transformers import ViTConfig, ViTForImageClassification

    model = _built(ViTForImageClassification, ViTConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=intermediate_size, num_labels=num_labels, **config), seed, dtype)
    if name_or_path:
        model.config._name_or_path = model.name_or_path = str(name_or_path)
    return model


VIT_8PX = dict(image_size=8, patch_size=4, hidden_size=8, intermediate_size=16)  # the flatness tests' ViT


def tiny_swin(image_size=16, num_labels=3, seed=0, dtype=None, **config):
    """A 2-stage HF Swin (4 px patches, 8-wide, windows of 2)."""
    from transformers import SwinConfig, SwinForImageClassification

    return _built(SwinForImageClassification, SwinConfig(
        image_size=image_size, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2,
        num_labels=num_labels, **config), seed, dtype)


def tiny_efficientnet(image_size=16, num_labels=3, seed=0, dtype=None, **config):
    """An HF EfficientNet at width and depth coefficients 0.1 (BatchNorm, depthwise convs)."""
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    return _built(EfficientNetForImageClassification, EfficientNetConfig(
        image_size=image_size, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, num_labels=num_labels,
        **config), seed, dtype)


def tiny_timm(architecture="test_vit", num_labels=3, seed=0, dtype=None, **config):
    """timm's test architecture ``architecture`` as ``TimmWrapperForImageClassification`` (``model_args``,
    ``pretrained_cfg``... go through ``**config``)."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    return _built(TimmWrapperForImageClassification, TimmWrapperConfig(
        architecture=architecture, num_labels=num_labels, **config), seed, dtype)


TIMM_VIT_16PX = {"img_size": 16, "patch_size": 8, "depth": 1}  # model_args of a 1-block 16 px test_vit

# ------------------------------------------- one optimizer step of GAMTrainer against the float64 reference
HP = dict(gam_rho=0.3, gam_alpha=0.4, gam_rho_prime=0.1, gam_beta=0.3, gam_gamma=0.5)


def sgd_args(tmp_path, **kw):
    """SGD with lr 1, no momentum, no weight decay, no clipping: the step moves θ by exactly -d."""
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=1, learning_rate=1.0, optim="sgd",
                lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, report_to="none", use_cpu=True,
                save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)
    base.update(kw)
    return GAMConfig(**base)


def train_args(tmp_path, cls=GAMConfig, **kw):
    """Arguments of a short CPU run (3 steps, batch 4, accumulation 2), as ``cls`` (``TrainingArguments`` too)."""
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
                learning_rate=0.1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                logging_steps=1, seed=0)
    base.update(kw)
    return cls(**base)


def ref_kwargs(args):
    return dict(rho=args.gam_rho, alpha=args.gam_alpha, sam_rho=args.sam_rho, rho_prime=args.gam_rho_prime,
                beta=args.gam_beta, gamma=args.gam_gamma, xi=args.gam_eps, variant=args.gam_fast_variant,
                adaptive=args.gam_adaptive)


class Recorder(GAMTrainer):
    """Keeps the micro-batches the Trainer fed to ``training_step`` (so references use exactly those)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = getattr(self, "seen", []) + [dict(inputs)]
        return super().training_step(model, inputs, num_items_in_batch)


def one_step(tmp_path, model=None, data=None, **kw):
    model = model or tiny_model()
    theta0 = flat_params(model)
    args = sgd_args(tmp_path, **kw)
    trainer = Recorder(model=model, args=args, train_dataset=data or tiny_data())
    trainer.train()
    return trainer, theta0, flat_params(model)


def assert_rel(actual, expected, tol=1e-6):
    err = (actual - expected).norm() / expected.norm()
    assert err < tol, f"relative error {err:.3e}"


# --------------------------------------------- tiny copies of the paper's Hub datasets, in the Hub's layout
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
