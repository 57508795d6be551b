"""Image-classification datasets for ``hf-gam``: the registry of the paper's datasets, loading (Hub id, local copy in
the Hub's layout, ``imagefolder``, the embedded sklearn digits), column normalization (every split has exactly
``image`` and ``label``, a ``ClassLabel`` with the class names), validation carving, label noise (paper App. C.2).
The transforms live in :mod:`hf_gam.data.transforms`, the label rules in :mod:`hf_gam.data.labels`; both are re-exported here.
Only the splits a run uses are read: their files come from the repo's README ``configs:`` block or the Hub's file
naming, and each split is read alone with its own features."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

from ..errors import DataError
from .sources import Source, load_all, repo_source, split_files  # noqa: F401 - split_files: public here too
from .labels import label_values as _label_values
from .labels import unify_labels
from .transforms import AUGMENTS, Augment, build_transforms, collate, with_transform  # noqa: F401 - public here too

logger = logging.getLogger(__name__)

__all__ = ["AUGMENTS", "DATASETS", "DataArguments", "DataError", "DatasetSpec", "ImageData", "apply_label_noise",
           "build_transforms", "collate", "load_digits_dataset", "load_digits_split", "load_image_data", "split_files",
           "symmetric_label_noise", "with_transform"]


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
        "Local copy of a registered dataset: a snapshot of its Hub repo (the README with its configs: block and the "
        "data files it names), loaded with the same code path as the Hub; for 'imagefolder', the folder of class "
        "subfolders.")})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name, if any."})
    image_column: str | None = field(default=None, metadata={"help": (
        "Image column; default: the registry's, else a column named 'image', else the only Image column.")})
    label_column: str | None = field(default=None, metadata={"help": (
        "Label column; default: the registry's, else a column named 'label', else the only ClassLabel column.")})
    cifar100_labels: Literal["fine", "coarse"] = field(default="fine", metadata={"help": (
        "CIFAR-100 labels: fine (100 classes) or coarse (20 superclasses).")})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default=None, metadata={"help": (
        "Split to evaluate on; default: the dataset's (test, or validation for food101; else whichever exists).")})
    validation_split: float = field(default=0.0, metadata={"help": (
        "Fraction of train carved out (stratified, seeded) as a validation set used for evaluation during training "
        "(the paper tuned on 10%% of train). The final evaluation still runs on --eval_split; a dataset without an "
        "evaluation split (e.g. an imagefolder of class folders only) is evaluated on this held-out part.")})
    max_train_samples: int | None = field(default=None, metadata={"help": (
        "Keep N training images drawn at random (seeded by --seed), e.g. for quick runs.")})
    max_eval_samples: int | None = field(default=None, metadata={"help": (
        "Evaluate on N images of --eval_split drawn at random (seeded by --seed); the card says it is a subset.")})
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
    label_column: str | None = None  # the source's label column the classes come from
    eval_total: int | None = None  # rows of the evaluation split before --max_eval_samples


def load_digits_split(test_size: float = 0.2, seed: int = 0):
    """sklearn's 8x8 digits (1,797 images, 10 classes; shipped with scikit-learn, no download) with a stratified
    train/test split: ``(x_train, y_train, x_test, y_test)``, pixels as float arrays ``(n, 8, 8)`` in [0, 1]. The one
    way the package, its examples and its benchmarks load digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = digits.images / 16.0
    tr, te = train_test_split(np.arange(len(pixels)), test_size=test_size, random_state=seed, stratify=digits.target)
    return pixels[tr], digits.target[tr], pixels[te], digits.target[te]


def load_digits_dataset(test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    """:func:`load_digits_split` as a ``DatasetDict`` of grayscale PIL images (``image``) and ``ClassLabel`` labels."""
    from PIL import Image as PILImage

    x_train, y_train, x_test, y_test = load_digits_split(test_size, seed)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})

    def build(x, y):
        pixels = np.round(x * 255.0).astype(np.uint8)
        return Dataset.from_dict({"image": [PILImage.fromarray(p, mode="L") for p in pixels], "label": y.tolist()},
                                 features=features)

    return DatasetDict({"train": build(x_train, y_train), "test": build(x_test, y_test)})


def _open_source(args: DataArguments) -> Source:
    name = args.dataset
    spec = DATASETS.get(name)
    if name == "digits":
        if args.dataset_path:
            raise DataError("dataset_path: 'digits' is embedded and takes no --dataset_path")
        dsd = load_digits_dataset()
        return Source("digits", list(dsd), lambda splits: {s: dsd[s] for s in splits}, spec)
    if name == "imagefolder":
        if not args.dataset_path or not os.path.isdir(args.dataset_path):
            raise DataError(f"dataset_path: 'imagefolder' needs an existing folder; got {args.dataset_path!r}")
        dsd = load_all("imagefolder", args.dataset_path, data_dir=args.dataset_path)
        return Source(args.dataset_path, list(dsd), lambda splits: {s: dsd[s] for s in splits})
    if spec is not None:
        if args.dataset_path and not os.path.isdir(args.dataset_path):
            raise DataError(f"dataset_path: {args.dataset_path!r} is not a directory")
        return repo_source(args.dataset_path or spec.hub_id, args.dataset_config, spec, spec.hub_id)
    if os.path.isdir(name):
        return repo_source(name, args.dataset_config, None, None)
    if name.count("/") == 1 and not name.startswith(("/", ".")) and all(name.split("/")):
        return repo_source(name, args.dataset_config, None, name)
    raise DataError(f"dataset: unknown dataset {name!r}; known names: {', '.join(DATASETS)}, 'imagefolder' "
                    "(with --dataset_path), a Hub id (owner/name) or a local dataset directory")


def _pick_column(ds: Dataset, given: str | None, feature_type: type, fallback: str) -> str:
    """``given``, else a column literally named ``fallback`` (``image``, ``label``), else the only column of
    ``feature_type``, else ``fallback`` (whose absence is then reported). The choice is logged."""
    if given:
        return given
    typed = [c for c, f in ds.features.items() if isinstance(f, feature_type)]
    if fallback in ds.column_names:
        chosen, why = fallback, "its name"
    elif len(typed) == 1:
        chosen, why = typed[0], f"the only {feature_type.__name__} column"
    else:
        return fallback
    others = [c for c in typed if c != chosen]
    log = logger.warning if others else logger.info
    log("%s_column: using column %r (%s)%s; pass --%s_column to choose another", fallback, chosen, why,
        f", not {', '.join(map(repr, others))}" if others else "", fallback)
    return chosen


def _normalize(raw: dict[str, Dataset], image_col: str, label_col: str, shown: str) -> tuple[dict, list[str]]:
    """Keep ``image`` and ``label`` only, with one ``ClassLabel`` (:func:`hf_gam.data.labels.unify_labels`)."""
    out = {}
    for split, ds in raw.items():
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
    return unify_labels(out, label_col, shown)


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


def _carve_validation(train: Dataset, fraction: float, seed: int, shown: str) -> tuple[Dataset, Dataset]:
    """``(train, validation)``: ``fraction`` of ``train`` held out, seeded; stratified by label when every class
    has >= 2 rows and both parts get at least one row per class, else a plain random split."""
    n = len(train)
    n_val = int(np.ceil(fraction * n))  # datasets' own rounding of a float test_size
    if n_val < 1 or n - n_val < 1:
        raise DataError(f"validation_split {fraction!r} of the {n} training images of {shown!r} leaves "
                        f"{n - n_val} to train on and {n_val} to validate on; both need at least one")
    counts = np.bincount(_label_values(train))
    counts = counts[counts > 0]
    stratify = "label" if counts.min() >= 2 and min(n_val, n - n_val) >= counts.size else None
    if stratify is None:
        logger.warning("validation_split: not stratified (%d classes, %d training images, smallest class %d)",
                       counts.size, n, counts.min())
    try:
        parts = train.train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"validation_split: could not carve {fraction!r} of the {n} training images of {shown!r}: "
                        f"{type(err).__name__}: {err}") from err
    return parts["train"], parts["test"]


def load_image_data(args: DataArguments, seed: int = 42) -> ImageData:
    """Load, normalize and prepare the dataset ``args`` describes (see :class:`DataArguments`)."""
    if not 0.0 <= args.validation_split < 1.0:
        raise DataError(f"validation_split must be in [0, 1); got {args.validation_split!r}")
    if not 0.0 <= args.label_noise <= 1.0:
        raise DataError(f"label_noise must be in [0, 1]; got {args.label_noise!r}")
    for flag in ("max_train_samples", "max_eval_samples"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise DataError(f"{flag} must be >= 1 (or unset); got {getattr(args, flag)!r}")
    source = _open_source(args)
    spec, shown = source.spec, args.dataset_path or args.dataset
    image_col = args.image_column or (spec.image_column if spec else None)
    label_col = args.label_column or (spec.label_column if spec else None)
    if spec and spec.coarse_label_column and args.cifar100_labels == "coarse" and not args.label_column:
        label_col = spec.coarse_label_column
    found = ", ".join(source.splits)
    if args.train_split not in source.splits:
        raise DataError(f"train_split: {shown!r} has no split {args.train_split!r}; splits found: {found}")
    eval_split = args.eval_split or (spec.eval_split if spec else None)
    if eval_split is None:
        eval_split = next((s for s in ("test", "validation", "valid", "val") if s in source.splits), None)
    held_out = eval_split is None and args.validation_split > 0  # evaluate on the carved part of train
    if eval_split is None and not held_out:
        raise DataError(f"eval_split: no evaluation split (test/validation/valid/val) found in {shown!r} (splits "
                        f"found: {found}); pass --eval_split SPLIT or --validation_split FRACTION")
    if not held_out and eval_split not in source.splits:
        raise DataError(f"eval_split: {shown!r} has no split {eval_split!r}; splits found: {found}")
    raw = source.read([args.train_split] if held_out else list(dict.fromkeys([args.train_split, eval_split])))
    sample = raw[args.train_split]
    image_col = _pick_column(sample, image_col, Image, "image")
    label_col = _pick_column(sample, label_col, ClassLabel, "label")
    dsd, names = _normalize(raw, image_col, label_col, shown)
    train = dsd[args.train_split]
    for split, ds in dsd.items():
        if len(ds) == 0:
            raise DataError(f"dataset: split {split!r} of {shown!r} is empty")
    # a seeded random subset, as transformers' run_image_classification does (the first N rows of class-sorted
    # data would hold one class)
    if args.max_train_samples is not None and args.max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(args.max_train_samples))
    validation = None
    if args.validation_split > 0:
        train, validation = _carve_validation(train, args.validation_split, seed, shown)
    if held_out:  # the held-out part is the evaluation set (during training and at the end)
        test, validation = validation, None
        eval_split = f"{args.train_split} (held-out {args.validation_split:g})"
        logger.warning("no evaluation split in %s: evaluating on the %d images held out of %r by --validation_split",
                       shown, len(test), args.train_split)
    else:
        test = dsd[eval_split]
    eval_total = len(test)
    if args.max_eval_samples is not None and args.max_eval_samples < len(test):
        test = test.shuffle(seed=seed).select(range(args.max_eval_samples))
    noise = None
    if args.label_noise > 0:
        noise_seed = seed if args.label_noise_seed is None else args.label_noise_seed
        train, flipped = apply_label_noise(train, args.label_noise, len(names), noise_seed)
        noise = {"rate": args.label_noise, "flipped": flipped, "total": len(train), "seed": noise_seed}
        logger.warning("label noise: flipped %(flipped)d of %(total)d training labels (rate %(rate)s)", noise)
    return ImageData(train=train, eval=test, class_names=names, name=args.dataset, hub_id=source.hub_id,
                     eval_split=eval_split, validation=validation, image_size=spec.image_size if spec else 224,
                     default_augment=spec.default_augment if spec else "basic", noise=noise, label_column=label_col,
                     eval_total=eval_total)
