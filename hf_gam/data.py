"""Image-classification datasets for ``hf-gam``: the registry of the paper's datasets, loading (Hub id, local copy in
the Hub's layout, ``imagefolder``, the embedded sklearn digits), column normalization (every split has exactly
``image`` and ``label``, a ``ClassLabel`` with the class names), validation carving, label noise (paper App. C.2)
and the transforms (geometry from the model's image processor; torchvision augmentations)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset

logger = logging.getLogger(__name__)

Augment = Literal["none", "basic", "cutout", "randaugment", "autoaugment"]
AUGMENTS: tuple[str, ...] = get_args(Augment)


class DataError(ValueError):
    """A dataset argument or a dataset's content that cannot be used (a user error, reported without traceback)."""


@dataclass(frozen=True)
class DatasetSpec:
    """What ``hf-gam`` knows about a registered dataset: where it lives and how its columns and splits are named."""

    hub_id: str | None  # None: embedded (built locally)
    image_column: str
    label_column: str
    eval_split: str
    image_size: int  # input size of the built-in (from-scratch) models on this dataset
    default_augment: str = "basic"
    coarse_label_column: str | None = None


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("uoft-cs/cifar10", "img", "label", "test", 32),
    "cifar100": DatasetSpec("uoft-cs/cifar100", "img", "fine_label", "test", 32, coarse_label_column="coarse_label"),
    # Paper Table 3 fine-tunes Cars, Pets and Food-101 without augmentation, CIFAR with the basic one.
    "pets": DatasetSpec("timm/oxford-iiit-pet", "image", "label", "test", 224, default_augment="none"),
    "food101": DatasetSpec("ethz/food101", "image", "label", "validation", 224, default_augment="none"),
    "cars": DatasetSpec("tanganke/stanford_cars", "image", "label", "test", 224, default_augment="none"),
    "digits": DatasetSpec(None, "image", "label", "test", 32, default_augment="none"),  # 8x8, upsampled
}


@dataclass
class DataArguments:
    """Which dataset ``hf-gam train`` uses and how it is prepared."""

    dataset: str = field(default="digits", metadata={"help": (
        f"Dataset: a registered name ({', '.join(DATASETS)}), any Hub dataset id (owner/name), a local dataset "
        "directory, or 'imagefolder' (with --dataset_path). 'digits' is sklearn's 8x8 digits, embedded.")})
    dataset_path: str | None = field(default=None, metadata={"help": (
        "Local copy of a registered dataset laid out like its Hub repo (parquet files under data/), loaded with the "
        "same code path as the Hub; for 'imagefolder', the folder of class subfolders.")})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name, if any."})
    image_column: str | None = field(default=None, metadata={"help": (
        "Image column; default: the registry's, else the only Image feature, else 'image'.")})
    label_column: str | None = field(default=None, metadata={"help": (
        "Label column; default: the registry's, else the only ClassLabel feature, else 'label'.")})
    cifar100_labels: Literal["fine", "coarse"] = field(default="fine", metadata={"help": (
        "CIFAR-100 labels: fine (100 classes) or coarse (20 superclasses).")})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default=None, metadata={"help": (
        "Split to evaluate on; default: the dataset's (test, or validation for food101; else whichever exists).")})
    validation_split: float = field(default=0.0, metadata={"help": (
        "Fraction of train carved out (stratified, seeded) as a validation set used for evaluation during training "
        "(the paper tuned on 10%% of train). The final evaluation still runs on --eval_split.")})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation images."})
    augment: Augment | None = field(default=None, metadata={"help": (
        "Train augmentation: none | basic (random crop with 1/8 padding + horizontal flip) | cutout (basic + "
        "random erasing of one square) | randaugment | autoaugment (basic + torchvision's policy). Default: the "
        "paper's: basic for CIFAR and unregistered datasets, none for pets, food101, cars and digits.")})
    label_noise: float = field(default=0.0, metadata={"help": (
        "Fraction of training labels flipped uniformly to another class (paper App. C.2), in [0, 1].")})
    label_noise_seed: int | None = field(default=None, metadata={"help": "Seed of the label noise; default: --seed."})


@dataclass
class ImageData:
    """The prepared splits. ``eval`` is the dataset's evaluation split; ``validation`` the carved set, if any."""

    train: Dataset
    eval: Dataset
    class_names: list[str]
    name: str
    hub_id: str | None = None
    eval_split: str = "test"
    validation: Dataset | None = None
    image_size: int = 224
    default_augment: str = "basic"
    noise: dict[str, Any] | None = None


def load_digits_dataset(test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    """sklearn's 8x8 digits (1,797 images, 10 classes) as a ``DatasetDict`` with a stratified train/test split."""
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    tr, te = train_test_split(np.arange(len(pixels)), test_size=test_size, random_state=seed, stratify=digits.target)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})

    def build(idx):
        return Dataset.from_dict({"image": [PILImage.fromarray(pixels[i], mode="L") for i in idx],
                                  "label": digits.target[idx].tolist()}, features=features)

    return DatasetDict({"train": build(tr), "test": build(te)})


def _load_raw(args: DataArguments) -> tuple[DatasetDict, DatasetSpec | None, str | None]:
    name = args.dataset
    spec = DATASETS.get(name)
    if name == "digits":
        if args.dataset_path:
            raise DataError("dataset_path: 'digits' is embedded and takes no --dataset_path")
        return load_digits_dataset(), spec, None
    if name == "imagefolder":
        if not args.dataset_path or not os.path.isdir(args.dataset_path):
            raise DataError(f"dataset_path: 'imagefolder' needs an existing folder; got {args.dataset_path!r}")
        return _call_load("imagefolder", args.dataset_path, data_dir=args.dataset_path), None, None
    if spec is not None:
        source = args.dataset_path or spec.hub_id
        if args.dataset_path and not os.path.isdir(args.dataset_path):
            raise DataError(f"dataset_path: {args.dataset_path!r} is not a directory")
        return _call_load(source, source, name=args.dataset_config), spec, spec.hub_id
    if os.path.isdir(name):
        return _call_load(name, name, name=args.dataset_config), None, None
    if name.count("/") == 1 and not name.startswith(("/", ".")) and all(name.split("/")):
        return _call_load(name, name, name=args.dataset_config), None, name
    raise DataError(f"dataset: unknown dataset {name!r}; known names: {', '.join(DATASETS)}, 'imagefolder' "
                    "(with --dataset_path), a Hub id (owner/name) or a local dataset directory")


def _call_load(path: str, shown: str, **kwargs) -> DatasetDict:
    try:
        loaded = load_dataset(path, **{k: v for k, v in kwargs.items() if v is not None})
    except Exception as err:  # noqa: BLE001 - every loader failure is reported as a user error
        raise DataError(f"dataset: could not load {shown!r}: {type(err).__name__}: {err}") from err
    if not isinstance(loaded, DatasetDict):
        raise DataError(f"dataset: {shown!r} did not load as a dict of splits")
    return loaded


def _pick_column(ds: Dataset, given: str | None, feature_type: type, fallback: str) -> str:
    """``given``, else the only column of ``feature_type``, else ``fallback``."""
    typed = [c for c, f in ds.features.items() if isinstance(f, feature_type)]
    return given or (typed[0] if len(typed) == 1 else fallback)


def _label_values(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.with_format(None)["label"])


def _normalize(raw: DatasetDict, splits: list[str], image_col: str, label_col: str, shown: str) -> DatasetDict:
    """Keep ``image`` and ``label`` only, with a shared ``ClassLabel``; check columns and label range."""
    out = {}
    for split in splits:
        ds = raw[split]
        for col, flag in ((image_col, "image_column"), (label_col, "label_column")):
            if col not in ds.column_names:
                raise DataError(f"{flag}: split {split!r} of {shown!r} has no column {col!r}; columns found: "
                                f"{', '.join(ds.column_names)}")
        ds = ds.select_columns([image_col, label_col])
        ds = ds.rename_columns({c: n for c, n in ((image_col, "image"), (label_col, "label")) if c != n})
        if not isinstance(ds.features["image"], Image):
            try:
                ds = ds.cast_column("image", Image())
            except Exception as err:  # noqa: BLE001
                raise DataError(f"image_column: column {image_col!r} of {shown!r} does not hold images "
                                f"({ds.features['image']})") from err
        out[split] = ds
    first = out[splits[0]].features["label"]
    if isinstance(first, ClassLabel):
        names = list(first.names)
    else:  # plain values: integers 0..max, or strings (sorted)
        values = sorted({v for ds in out.values() for v in _label_values(ds).tolist()})
        numeric = all(isinstance(v, (int, np.integer)) for v in values)
        names = [str(i) for i in range(int(values[-1]) + 1)] if numeric and values else [str(v) for v in values]
        out = {split: ds.cast_column("label", ClassLabel(names=names)) for split, ds in out.items()}
    for split, ds in out.items():
        labels = _label_values(ds)
        bad = labels[(labels < 0) | (labels >= len(names))]
        if bad.size:
            raise DataError(f"label_column: split {split!r} of {shown!r} has labels outside the class range "
                            f"[0, {len(names) - 1}] (e.g. {int(bad[0])}; {bad.size} such rows)")
        if not isinstance(ds.features["label"], ClassLabel) or list(ds.features["label"].names) != names:
            out[split] = ds.cast_column("label", ClassLabel(names=names))
    return DatasetDict(out)


def symmetric_label_noise(labels: np.ndarray, rate: float, num_classes: int, seed: int) -> tuple[np.ndarray, int]:
    """Flip ``round(rate * n)`` of ``labels``, chosen without replacement, each to a class drawn uniformly among the
    *other* classes (symmetric noise, paper App. C.2). Returns a new int64 array and the number flipped."""
    if not 0.0 <= rate <= 1.0 or (rate > 0 and num_classes < 2):
        raise DataError(f"label_noise must be in [0, 1] (with >= 2 classes); got {rate!r} ({num_classes} classes)")
    labels = np.array(labels, dtype=np.int64)
    if rate == 0.0:
        return labels, 0
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(labels), size=int(round(rate * len(labels))), replace=False)
    labels[idx] = (labels[idx] + rng.integers(1, num_classes, size=idx.size)) % num_classes
    return labels, int(idx.size)


def apply_label_noise(ds: Dataset, rate: float, num_classes: int, seed: int) -> tuple[Dataset, int]:
    """:func:`symmetric_label_noise` on the ``label`` column of ``ds``: ``(new dataset, number flipped)``."""
    labels, flipped = symmetric_label_noise(_label_values(ds), rate, num_classes, seed)
    if flipped == 0:
        return ds, 0
    feature = ds.features["label"]
    return ds.remove_columns("label").add_column("label", labels.tolist(), feature=feature), flipped


def load_image_data(args: DataArguments, seed: int = 42) -> ImageData:
    """Load, normalize and prepare the dataset ``args`` describes (see :class:`DataArguments`)."""
    if not 0.0 <= args.validation_split < 1.0:
        raise DataError(f"validation_split must be in [0, 1); got {args.validation_split!r}")
    if not 0.0 <= args.label_noise <= 1.0:
        raise DataError(f"label_noise must be in [0, 1]; got {args.label_noise!r}")
    raw, spec, hub_id = _load_raw(args)
    shown = args.dataset_path or args.dataset
    image_col = args.image_column or (spec.image_column if spec else None)
    label_col = args.label_column or (spec.label_column if spec else None)
    if spec and spec.coarse_label_column and args.cifar100_labels == "coarse" and not args.label_column:
        label_col = spec.coarse_label_column
    if args.train_split not in raw:
        raise DataError(f"train_split: {shown!r} has no split {args.train_split!r}; splits found: {', '.join(raw)}")
    eval_split = args.eval_split or (spec.eval_split if spec else None)
    if eval_split is None:
        eval_split = next((s for s in ("test", "validation", "valid", "val") if s in raw), None)
    if eval_split is None or eval_split not in raw:
        raise DataError(f"eval_split: {shown!r} has no split {eval_split!r}; splits found: {', '.join(raw)}")
    sample = raw[args.train_split]
    image_col = _pick_column(sample, image_col, Image, "image")
    label_col = _pick_column(sample, label_col, ClassLabel, "label")
    dsd = _normalize(raw, [args.train_split, eval_split], image_col, label_col, shown)
    train, test = dsd[args.train_split], dsd[eval_split]
    names = list(train.features["label"].names)
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        test = test.select(range(min(args.max_eval_samples, len(test))))
    validation = None
    if args.validation_split > 0:
        counts = np.bincount(_label_values(train), minlength=len(names))
        stratify = "label" if counts.min() >= 2 and round(args.validation_split * len(train)) >= len(names) else None
        parts = train.train_test_split(test_size=args.validation_split, seed=seed, stratify_by_column=stratify)
        train, validation = parts["train"], parts["test"]
    noise = None
    if args.label_noise > 0:
        noise_seed = seed if args.label_noise_seed is None else args.label_noise_seed
        train, flipped = apply_label_noise(train, args.label_noise, len(names), noise_seed)
        noise = {"rate": args.label_noise, "flipped": flipped, "total": len(train), "seed": noise_seed}
        logger.warning("label noise: flipped %(flipped)d of %(total)d training labels (rate %(rate)s)", noise)
    return ImageData(train=train, eval=test, class_names=names, name=args.dataset, hub_id=hub_id,
                     eval_split=eval_split, validation=validation, image_size=spec.image_size if spec else 224,
                     default_augment=spec.default_augment if spec else "basic", noise=noise)


# ----------------------------------------------------------------------------------------------- transforms
def _interpolation(value: Any) -> InterpolationMode:
    """torchvision's mode for a timm string, a PIL resample code (HF processors) or None (bilinear)."""
    from PIL.Image import Resampling

    if value is None or isinstance(value, InterpolationMode):
        return value or InterpolationMode.BILINEAR
    return InterpolationMode(value.lower()) if isinstance(value, str) else InterpolationMode[Resampling(value).name]


def image_geometry(processor: Any) -> dict[str, Any]:
    """``size`` (h, w) the model sees, ``resize`` (what to resize to before the center crop), ``mean``, ``std``,
    ``interpolation``: read from an HF image processor or a timm wrapper's ``data_config``."""
    cfg = getattr(processor, "data_config", None)
    if cfg is not None:  # timm: resize by crop_pct, then center crop
        h, w = cfg["input_size"][-2:]
        crop_pct = cfg.get("crop_pct") or 1.0
        return {"size": (h, w), "resize": (int(h / crop_pct), int(w / crop_pct)), "mean": tuple(cfg["mean"]),
                "std": tuple(cfg["std"]), "interpolation": _interpolation(cfg.get("interpolation"))}
    size = dict(getattr(processor, "size", None) or {"height": 224, "width": 224})
    if size.get("height") and size.get("width"):
        resize = (size["height"], size["width"])
    elif size.get("shortest_edge"):
        edge = size["shortest_edge"]
        crop_pct = getattr(processor, "crop_pct", None)
        resize = int(edge / crop_pct) if crop_pct else edge
    else:
        raise DataError(f"model: cannot read the input size from the image processor's size {size}")
    final = resize if isinstance(resize, tuple) else (size.get("shortest_edge"),) * 2
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop:
        crop = dict(crop)
        final = (crop["height"], crop["width"])
    mean = getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5)
    std = getattr(processor, "image_std", None) or (0.5, 0.5, 0.5)
    return {"size": tuple(final), "resize": resize, "mean": tuple(mean), "std": tuple(std),
            "interpolation": _interpolation(getattr(processor, "resample", None))}


def build_transforms(processor: Any, augment: str = "none", autoaugment_policy: str = "imagenet"):
    """``(train_transform, eval_transform)``: PIL image -> normalized float tensor of the model's input size.

    Eval: the timm wrapper's own ``val_transforms``, or resize (+ center crop) and normalize as the HF processor
    does. Train: resize to the model's size, then the preset: ``basic`` = random crop with 1/8 padding (reflect) +
    horizontal flip (the CIFAR recipe of the GAM/SAM papers, scaled to any size); ``cutout`` = basic + one erased
    square of 1/4 of the side (torchvision ``RandomErasing``); ``randaugment`` / ``autoaugment`` = basic +
    torchvision's ``RandAugment`` / ``AutoAugment`` (``autoaugment_policy``: imagenet, cifar10 or svhn).
    """
    if augment not in AUGMENTS:
        raise DataError(f"augment must be one of {', '.join(AUGMENTS)}; got {augment!r}")
    geo = image_geometry(processor)
    to_tensor = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(geo["mean"], geo["std"])]
    if hasattr(processor, "val_transforms"):
        eval_tf = processor.val_transforms
    else:
        eval_tf = T.Compose([T.Resize(geo["resize"], interpolation=geo["interpolation"], antialias=True),
                             T.CenterCrop(geo["size"]), *to_tensor])
    if augment == "none":
        return eval_tf, eval_tf
    h, w = geo["size"]
    ops: list = [T.Resize((h, w), interpolation=geo["interpolation"], antialias=True),
                 T.RandomCrop((h, w), padding=max(1, min(h, w) // 8), padding_mode="reflect"),
                 T.RandomHorizontalFlip()]
    if augment == "randaugment":
        ops.append(T.RandAugment())
    elif augment == "autoaugment":
        ops.append(T.AutoAugment(T.AutoAugmentPolicy(autoaugment_policy)))
    ops.extend(to_tensor)
    if augment == "cutout":
        ops.append(T.RandomErasing(p=1.0, scale=(1 / 16, 1 / 16), ratio=(1.0, 1.0), value=0))
    return T.Compose(ops), eval_tf


def with_transform(ds: Dataset, transform) -> Dataset:
    """A view of ``ds`` whose rows are ``{"pixel_values": tensor, "labels": int}`` (images converted to RGB)."""

    def apply(batch: dict[str, list]) -> dict[str, list]:
        return {"pixel_values": [transform(im.convert("RGB")) for im in batch["image"]], "labels": batch["label"]}

    return ds.with_format(None).with_transform(apply)


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack ``pixel_values`` and ``labels`` of :func:`with_transform` rows into a batch."""
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)}
