"""Datasets for ``hf-gam``: the registry of the paper's datasets and loading (:mod:`~hf_gam.data.loading`), each
split's files of a dataset repo read alone (:mod:`~hf_gam.data.sources`), label columns unified by class name
(:mod:`~hf_gam.data.labels`), and the model's own image processor with training augmentation before it
(:mod:`~hf_gam.data.transforms`). The public names are re-exported here."""

from .loading import (
    AUGMENTS,
    DATASETS,
    DataArguments,
    DataError,
    DatasetSpec,
    ImageData,
    apply_label_noise,
    build_transforms,
    collate,
    load_digits_dataset,
    load_digits_split,
    load_image_data,
    split_files,
    symmetric_label_noise,
    with_transform,
)

__all__ = ["AUGMENTS", "DATASETS", "DataArguments", "DataError", "DatasetSpec", "ImageData", "apply_label_noise",
           "build_transforms", "collate", "load_digits_dataset", "load_digits_split",
           "load_image_data", "split_files", "symmetric_label_noise",
           "with_transform"]
