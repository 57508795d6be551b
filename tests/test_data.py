"""hf_gam.data: registry, loading of Hub-layout copies with the real `datasets.load_dataset` path, normalization,
validation carving, label noise. Offline; tiny copies from conftest. (The transforms: test_transforms.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from testing_utils import HUB_LAYOUTS, random_image, write_hub_copy, write_readme

from hf_gam.data import (DATASETS, DataArguments, DataError, apply_label_noise, load_digits_dataset, load_image_data,
                         split_files)


def test_registry_knows_the_papers_datasets():
    assert set(DATASETS) == {"cifar10", "cifar100", "pets", "food101", "cars", "digits"}
    assert DATASETS["food101"].eval_split == "validation"
    assert DATASETS["cifar100"].label_column == "fine_label"


@pytest.mark.parametrize("name", sorted(HUB_LAYOUTS))
def test_hub_copy_loads_normalized(name, hub_copies):
    data = load_image_data(DataArguments(dataset=name, dataset_path=str(hub_copies[name])))
    layout = HUB_LAYOUTS[name]
    assert data.class_names == layout["names"]
    assert data.eval_split == layout["eval"]
    assert len(data.train) == 8 and len(data.eval) == 4
    for ds in (data.train, data.eval):
        assert ds.column_names == ["image", "label"]
        assert list(ds.features["label"].names) == layout["names"]
    assert data.hub_id == DATASETS[name].hub_id


def test_cifar100_coarse_labels_on_request(hub_copies):
    data = load_image_data(DataArguments(dataset="cifar100", dataset_path=str(hub_copies["cifar100"]),
                                         cifar100_labels="coarse"))
    assert len(data.class_names) == 20 and data.class_names[0] == "coarse_000"


def test_digits_embedded_stratified_split():
    dsd = load_digits_dataset()
    assert (len(dsd["train"]), len(dsd["test"])) == (1437, 360)
    assert dsd["train"].features["label"].names == [str(i) for i in range(10)]
    counts = np.bincount(np.asarray(dsd["test"]["label"]), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified 20 %
    assert dsd["train"][0]["image"].size == (8, 8)


def test_validation_split_carves_train(hub_copies):
    data = load_image_data(DataArguments(dataset="cifar10", dataset_path=str(hub_copies["cifar10"]),
                                         validation_split=0.25), seed=1)
    assert len(data.validation) == 2 and len(data.train) == 6 and len(data.eval) == 4


def test_local_directory_and_imagefolder(tmp_path, hub_copies):
    data = load_image_data(DataArguments(dataset=str(hub_copies["pets"])))  # columns auto-detected by feature type
    assert len(data.class_names) == 37
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("ant", "bee"):
            (tmp_path / "folder" / split / cls).mkdir(parents=True)
            for i in range(2):
                random_image(rng, i).convert("RGB").save(tmp_path / "folder" / split / cls / f"{i}.png")
    data = load_image_data(DataArguments(dataset="imagefolder", dataset_path=str(tmp_path / "folder")))
    assert data.class_names == ["ant", "bee"] and len(data.train) == 4


@pytest.mark.parametrize("rate", [0.25, 0.5, 1.0])
def test_label_noise_flips_the_requested_fraction(rate):
    ds = load_digits_dataset()["train"]
    noisy, flipped = apply_label_noise(ds, rate, 10, seed=3)
    before, after = np.asarray(ds["label"]), np.asarray(noisy["label"])
    assert flipped == round(rate * len(ds)) == int((before != after).sum())
    assert after.min() >= 0 and after.max() <= 9
    again, _ = apply_label_noise(ds, rate, 10, seed=3)
    assert np.array_equal(np.asarray(again["label"]), after)  # seeded
    assert noisy.features["label"].names == ds.features["label"].names


def test_label_noise_recorded_and_validated(hub_copies):
    data = load_image_data(DataArguments(dataset="cifar10", dataset_path=str(hub_copies["cifar10"]),
                                         label_noise=0.5, label_noise_seed=0))
    assert data.noise == {"rate": 0.5, "flipped": 4, "total": 8, "seed": 0}
    with pytest.raises(DataError, match="label_noise"):
        load_image_data(DataArguments(label_noise=1.5))


# ------------------------------------------------------------------------------------------------ bad input
def test_unknown_dataset_lists_known_names():
    with pytest.raises(DataError) as err:
        load_image_data(DataArguments(dataset="mnist"))
    for name in DATASETS:
        assert name in str(err.value)


@pytest.mark.parametrize("drop,flag", [("img", "image_column"), ("label", "label_column")])
def test_missing_column_names_column_and_found(tmp_path, drop, flag):
    path = write_hub_copy(tmp_path, "cifar10", drop=drop)
    with pytest.raises(DataError) as err:
        load_image_data(DataArguments(dataset="cifar10", dataset_path=str(path)))
    message = str(err.value)
    assert flag in message and repr(drop) in message and "columns found" in message


def test_labels_outside_class_range(tmp_path):
    path = write_hub_copy(tmp_path, "cars", labels={"train": [0, 1, 2, 5], "test": [0, -1]}, n_train=4, n_eval=2)
    with pytest.raises(DataError, match="outside the class range"):
        load_image_data(DataArguments(dataset="cars", dataset_path=str(path)))


def test_bad_paths_and_splits(tmp_path, hub_copies):
    with pytest.raises(DataError, match="dataset_path"):
        load_image_data(DataArguments(dataset="cifar10", dataset_path=str(tmp_path / "missing")))
    with pytest.raises(DataError, match="imagefolder"):
        load_image_data(DataArguments(dataset="imagefolder"))
    with pytest.raises(DataError, match="eval_split"):
        load_image_data(DataArguments(dataset="cifar10", dataset_path=str(hub_copies["cifar10"]),
                                      eval_split="nope"))
    with pytest.raises(DataError, match="validation_split"):
        load_image_data(DataArguments(validation_split=1.0))


# ------------------------------------------------------------------------------- only the splits used are read
CARS_CORRUPTIONS = ["contrast", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur", "pixelate",
                    "spatter"]  # tanganke/stanford_cars' 7 extra splits (dataset card `configs:` block)


def test_extra_splits_are_never_read(tmp_path):
    from datasets import load_dataset

    path = write_hub_copy(tmp_path, "cars", extra_splits={s: b"not a parquet file" for s in CARS_CORRUPTIONS})
    with pytest.raises(Exception):  # noqa: B017 - what reading every split (datasets' default) does with them
        load_dataset(str(path))
    data = load_image_data(DataArguments(dataset="cars", dataset_path=str(path)))
    assert (len(data.train), len(data.eval), data.eval_split) == (8, 4, "test")
    with pytest.raises(DataError, match="could not load split 'contrast'"):
        load_image_data(DataArguments(dataset="cars", dataset_path=str(path), eval_split="contrast"))


def test_split_files_from_the_card_then_from_the_file_naming(tmp_path):
    path = write_hub_copy(tmp_path, "cars", extra_splits={"contrast": b"x"})
    assert split_files(str(path)) == {"train": ["data/train-*"], "test": ["data/test-*"],
                                      "contrast": ["data/contrast-*"]}
    (path / "README.md").unlink()  # no card: the Hub's data/<split>-xxxxx-of-xxxxx naming
    assert set(split_files(str(path))) == {"train", "test", "contrast"}
    assert len(load_image_data(DataArguments(dataset=str(path))).train) == 8


# ----------------------------------------------------------------------------------------------------- labels
def _eval_names(data) -> list[str]:
    return [data.class_names[i] for i in data.eval["label"]]


def test_eval_classlabel_in_another_order_is_remapped_by_name(tmp_path):
    from datasets import ClassLabel

    reordered = list(reversed(HUB_LAYOUTS["cifar10"]["names"]))
    path = write_hub_copy(tmp_path, "cifar10", labels={"test": [0, 1, 2, 3]},
                          label_features={"test": ClassLabel(names=reordered)})
    data = load_image_data(DataArguments(dataset="cifar10", dataset_path=str(path)))
    assert data.class_names == HUB_LAYOUTS["cifar10"]["names"]
    assert _eval_names(data) == reordered[:4]  # by id it would read airplane, automobile, bird, cat
    assert data.eval["label"] == [9, 8, 7, 6]


def test_eval_classlabel_with_other_names_is_an_error(tmp_path):
    from datasets import ClassLabel

    other = HUB_LAYOUTS["cifar10"]["names"][:-1] + ["zebra"]
    path = write_hub_copy(tmp_path, "cifar10", labels={"test": [0, 1]}, n_eval=2,
                          label_features={"test": ClassLabel(names=other)})
    with pytest.raises(DataError, match=r"classes of column 'label' differ.*'truck'.*'zebra'|'zebra'"):
        load_image_data(DataArguments(dataset="cifar10", dataset_path=str(path)))


def test_plain_string_labels_through_the_loading_path(tmp_path):
    from datasets import Value

    strings = {"train": ["pear", "apple", "fig", "apple"], "test": ["fig", "pear"]}
    path = write_hub_copy(tmp_path, "cars", n_train=4, n_eval=2, labels=strings,
                          label_features={"train": Value("string"), "test": Value("string")})
    data = load_image_data(DataArguments(dataset="cars", dataset_path=str(path)))
    assert data.class_names == ["apple", "fig", "pear"]
    assert [data.class_names[i] for i in data.train["label"]] == strings["train"]
    assert _eval_names(data) == strings["test"]


def test_plain_integer_labels_through_the_loading_path(tmp_path, recwarn):
    from datasets import Value

    ints = {"train": [0, 2, 1, 2], "test": [1, 0]}
    path = write_hub_copy(tmp_path, "cars", n_train=4, n_eval=2, labels=ints,
                          label_features={"train": Value("int64"), "test": Value("int32")})
    data = load_image_data(DataArguments(dataset="cars", dataset_path=str(path)))
    assert data.class_names == ["0", "1", "2"] and data.train["label"] == ints["train"]
    assert data.eval["label"] == ints["test"]
    assert not [w for w in recwarn if "no 0" in str(w.message)]


def test_integer_labels_numbered_from_one_warn(tmp_path):
    from datasets import Value

    path = write_hub_copy(tmp_path, "cars", n_train=4, n_eval=2, labels={"train": [1, 2, 3, 1], "test": [2, 3]},
                          label_features={"train": Value("int64"), "test": Value("int64")})
    with pytest.warns(UserWarning, match=r"start at 1 \(no 0\)"):
        data = load_image_data(DataArguments(dataset="cars", dataset_path=str(path)))
    assert data.class_names == ["0", "1", "2", "3"]


def test_string_train_with_classlabel_eval_is_an_error(tmp_path):
    from datasets import Value

    path = write_hub_copy(tmp_path, "cars", n_train=4, n_eval=2, labels={"train": ["apple", "fig", "fig", "apple"]},
                          label_features={"train": Value("string")})
    with pytest.raises(DataError, match=r"column 'label'.*strings in split 'train' \(e.g. 'apple'\).*class ids"):
        load_image_data(DataArguments(dataset="cars", dataset_path=str(path)))


@pytest.mark.parametrize("kind", ["string", "int64"])
def test_missing_labels_name_column_and_row(tmp_path, kind):
    from datasets import Value

    values = ["a", None, "b", "a"] if kind == "string" else [0, None, 1, 0]
    other = ["a", "b"] if kind == "string" else [0, 1]
    path = write_hub_copy(tmp_path, "cars", n_train=4, n_eval=2, labels={"train": values, "test": other},
                          label_features={"train": Value(kind), "test": Value(kind)})
    with pytest.raises(DataError, match=r"split 'train'.*missing label \(None\) in column 'label' at row 1"):
        load_image_data(DataArguments(dataset="cars", dataset_path=str(path)))


def test_label_errors_on_the_command_line_are_one_line_exit_2(tmp_path, capsys):
    from datasets import Value

    from hf_gam.cli import main

    path = write_hub_copy(tmp_path, "cars", n_train=4, n_eval=2, labels={"train": ["a", None, "b", "a"]},
                          label_features={"train": Value("string")})
    capsys.readouterr()
    assert main(["train", "--dataset", "cars", "--dataset_path", str(path), "--output_dir",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-gam")]  # datasets' progress bars aside
    assert len(lines) == 1 and lines[0].startswith("hf-gam: error: label_column:") and "None" in lines[0]
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_hub_cars_reads_only_train_and_test_data_files(tmp_path, monkeypatch, hub_copies):
    """The Hub-id path, offline: the dataset card (README with the 9-split `configs:` block of tanganke/stanford_cars)
    names each split's files, and `load_dataset` is asked for train and test only, each alone."""
    import huggingface_hub
    from datasets import load_dataset

    import hf_gam.data.sources as sources_module

    write_readme(tmp_path, ["train", "test", *CARS_CORRUPTIONS])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, **kw: str(tmp_path / filename))
    assert list(split_files("tanganke/stanford_cars")) == ["train", "test", *CARS_CORRUPTIONS]
    calls = []

    def fake_load(path, **kwargs):  # serve the local copy's split in place of the Hub's
        calls.append((path, kwargs))
        return load_dataset(str(hub_copies["cars"]), **kwargs)

    monkeypatch.setattr(sources_module, "load_dataset", fake_load)
    data = load_image_data(DataArguments(dataset="cars"))
    assert (len(data.train), len(data.eval), data.hub_id) == (8, 4, "tanganke/stanford_cars")
    assert calls == [("tanganke/stanford_cars", {"data_files": {"train": ["data/train-*"]}, "split": "train"}),
                     ("tanganke/stanford_cars", {"data_files": {"test": ["data/test-*"]}, "split": "test"})]


# ------------------------------------------------------------------------- local layouts without a configs: block
def _image_folders(root, layout: dict[str, list[str]], per_class: int = 2, seed: int = 0):
    """``root/<split>/<class>/<i>.png`` for ``{split: classes}`` (``split`` "" : class folders at the root)."""
    rng = np.random.default_rng(seed)
    for split, classes in layout.items():
        for cls in classes:
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                random_image(rng, i).convert("RGB").save(folder / f"{i}.png")
    return root


def _parquet(path, labels: list[str]) -> None:
    from datasets import Dataset, Features, Image, Value

    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict({"image": [random_image(rng, i) for i in range(len(labels))], "label": labels},
                      features=Features({"image": Image(), "label": Value("string")})).to_parquet(str(path))


@pytest.mark.parametrize("where", ["", "data/"])
def test_parquet_files_without_a_card(tmp_path, where):
    """root train.parquet/test.parquet and data/train.parquet: split names from the Hub's file naming (datasets
    returns them as NamedSplit, which once crashed the loader with a TypeError)."""
    _parquet(tmp_path / f"{where}train.parquet", ["dog", "cat", "bird", "dog"])
    _parquet(tmp_path / f"{where}test.parquet", ["cat", "dog"])
    assert split_files(str(tmp_path)) is not None and all(type(k) is str for k in split_files(str(tmp_path)))
    data = load_image_data(DataArguments(dataset=str(tmp_path)))
    assert data.class_names == ["bird", "cat", "dog"] and (len(data.train), len(data.eval)) == (4, 2)
    assert _eval_names(data) == ["cat", "dog"]


def test_split_folders_whose_eval_lacks_a_class(tmp_path):
    """train/ and test/ class folders read as a local directory (each split alone): test/ without class 'c'
    still loads, its labels remapped by name; a class only test/ has is an error naming it."""
    root = _image_folders(tmp_path / "f", {"train": ["a", "b", "c"], "test": ["b", "c"]})
    data = load_image_data(DataArguments(dataset=str(root)))
    assert data.class_names == ["a", "b", "c"] and len(data.train) == 6
    assert _eval_names(data) == ["b", "b", "c", "c"]  # by id they would read a, a, b, b
    _image_folders(root, {"test": ["zebra"]})
    with pytest.raises(DataError, match="'zebra'"):
        load_image_data(DataArguments(dataset=str(root)))


# ------------------------------------------------------------------------------------ sizes, carving, sampling
def test_validation_split_sizes_are_errors_or_unstratified(tmp_path):
    two_per_class = write_hub_copy(tmp_path, "cifar10", n_train=20, labels={"train": [i % 10 for i in range(20)]})
    args = {"dataset": "cifar10", "dataset_path": str(two_per_class)}
    with pytest.raises(DataError, match=r"validation_split 0.999 .* leaves 0 to train on and 20 to validate on"):
        load_image_data(DataArguments(**args, validation_split=0.999))
    # 12 held out, 8 left: fewer than the 10 classes, so no stratification (datasets would raise ValueError)
    data = load_image_data(DataArguments(**args, validation_split=0.6))
    assert (len(data.train), len(data.validation)) == (8, 12)
    data = load_image_data(DataArguments(**args, validation_split=0.5))  # 10 / 10: stratified, one per class
    assert sorted(data.validation["label"]) == list(range(10)) and sorted(data.train["label"]) == list(range(10))


def test_sample_limits_below_one_and_empty_splits_are_errors(tmp_path, hub_copies):
    for flag in ("max_train_samples", "max_eval_samples"):
        with pytest.raises(DataError, match=rf"^{flag} must be >= 1 \(or unset\); got 0$"):
            load_image_data(DataArguments(**{flag: 0}))
    empty = write_hub_copy(tmp_path, "cifar10", n_eval=0)
    with pytest.raises(DataError, match="split 'test' of .*(is empty|corresponds to no data)"):
        load_image_data(DataArguments(dataset="cifar10", dataset_path=str(empty)))


def test_sample_limits_draw_a_seeded_random_subset(tmp_path):
    """Class-sorted data (as many exports are): the first 6 rows would all be class 0."""
    sorted_labels = {"train": [i // 10 for i in range(20)], "test": [i // 10 for i in range(20)]}
    path = write_hub_copy(tmp_path, "cifar10", n_train=20, n_eval=20, labels=sorted_labels)
    args = DataArguments(dataset="cifar10", dataset_path=str(path), max_train_samples=6, max_eval_samples=6)
    data = load_image_data(args, seed=3)
    assert len(data.train) == 6 and len(data.eval) == 6
    assert len(set(data.train["label"])) > 1 and len(set(data.eval["label"])) > 1
    assert load_image_data(args, seed=3).train["label"] == data.train["label"]  # reproducible
    assert len(load_image_data(DataArguments(dataset="cifar10", dataset_path=str(path), max_train_samples=50)).train) \
        == 20


def test_class_folders_only_need_an_eval_split_or_a_held_out_part(tmp_path):
    root = _image_folders(tmp_path / "f", {"": ["x", "y"]}, per_class=4)
    with pytest.raises(DataError) as err:
        load_image_data(DataArguments(dataset="imagefolder", dataset_path=str(root)))
    assert "no evaluation split (test/validation/valid/val) found in" in str(err.value)
    assert "pass --eval_split SPLIT or --validation_split FRACTION" in str(err.value) and "None" not in str(err.value)
    data = load_image_data(DataArguments(dataset="imagefolder", dataset_path=str(root), validation_split=0.25))
    assert (len(data.train), len(data.eval), data.validation) == (6, 2, None)
    assert sorted(data.eval["label"]) == [0, 1] and data.eval_split == "train (held-out 0.25)"


def test_a_column_named_label_wins_over_a_lone_classlabel(tmp_path, caplog):
    """An unregistered dataset with an integer `label` column and one ClassLabel column of another name (a coarse
    grouping, say): `label` is the label; the choice is logged."""
    import logging

    from datasets import ClassLabel, Dataset, Features, Image, Value

    rng = np.random.default_rng(0)
    features = Features({"image": Image(), "label": Value("int64"), "group": ClassLabel(names=["odd", "even"])})
    for split, n in (("train", 6), ("test", 3)):
        (tmp_path / "data").mkdir(exist_ok=True)
        Dataset.from_dict({"image": [random_image(rng, i) for i in range(n)], "label": [i % 3 for i in range(n)],
                           "group": [i % 2 for i in range(n)]}, features=features).to_parquet(
            str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))
    with caplog.at_level(logging.INFO, logger="hf_gam.data"):
        data = load_image_data(DataArguments(dataset=str(tmp_path)))
    assert data.class_names == ["0", "1", "2"] and data.label_column == "label"
    assert "label_column: using column 'label' (its name), not 'group'" in caplog.text
    assert load_image_data(DataArguments(dataset=str(tmp_path), label_column="group")).class_names == ["odd", "even"]
