"""Where a dataset's splits come from: the files of each split of a dataset repo (a local snapshot or a Hub id), read
on demand, each split alone with its own features, so only the splits a run uses are read (``datasets`` would
prepare every split and cast them all with the first file's features)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset

from ..errors import DataError

__all__ = ["Source", "load_all", "repo_source", "split_files"]


@dataclass
class Source:
    """A dataset whose splits are known by name and read on demand (only the splits a run uses are read)."""

    shown: str
    splits: list[str]
    read: Callable[[list[str]], dict[str, Dataset]]
    spec: Any = None  # the registry entry (hf_gam.data.DatasetSpec), if any
    hub_id: str | None = None


def split_files(path: str, config: str | None = None) -> dict[str, list[str]] | None:
    """Each split's data-file patterns of a dataset repo (a local snapshot or a Hub id), relative to the repo: from
    the ``configs:`` block of its README (``config``, else the default one), else from the Hub's standard naming
    (``data/<split>-*``, ...). ``None`` when they cannot be told (then the whole dataset is loaded)."""
    from huggingface_hub import DatasetCard
    from datasets.data_files import get_data_patterns
    from datasets.utils.metadata import MetadataConfigs

    local = os.path.isdir(path)
    try:
        readme = os.path.join(path, "README.md") if local else None
        if readme is None:
            from huggingface_hub import hf_hub_download

            readme = hf_hub_download(path, "README.md", repo_type="dataset")
        configs = MetadataConfigs.from_dataset_card_data(DatasetCard.load(readme).data) \
            if os.path.isfile(readme) else {}
    except Exception:  # noqa: BLE001 - no readable card: fall back to the file naming
        configs = {}
    if configs:
        chosen = config or configs.get_default_config_name() or (next(iter(configs)) if len(configs) == 1 else None)
        files = configs.get(chosen, {}).get("data_files")
        if isinstance(files, str):
            files = [{"split": "train", "path": files}]
        if not isinstance(files, list) or not all(isinstance(f, dict) and "split" in f for f in files):
            return None
        return {f["split"]: [f["path"]] if isinstance(f["path"], str) else list(f["path"]) for f in files}
    if config is not None:
        return None
    try:
        patterns = get_data_patterns(path if local else f"hf://datasets/{path}")
    except Exception:  # noqa: BLE001
        return None
    return {str(k): list(v) for k, v in patterns.items()}  # NamedSplit keys -> split names


def repo_source(path: str, config: str | None, spec: Any, hub_id: str | None) -> Source:
    patterns = split_files(path, config)
    if patterns is None:  # unknown layout: let datasets read it all
        dsd = load_all(path, path, name=config)
        return Source(path, list(dsd), lambda splits: {s: dsd[s] for s in splits}, spec, hub_id)

    def read(splits: list[str]) -> dict[str, Dataset]:  # each split alone, with its own features
        return {s: _load_split(path, s, patterns[s]) for s in splits}

    return Source(path, list(patterns), read, spec, hub_id)


def _load_split(path: str, split: str, files: list[str]) -> Dataset:
    try:
        return load_dataset(path, data_files={split: files}, split=split)
    except Exception as err:  # noqa: BLE001 - every loader failure is reported as a user error
        raise DataError(f"dataset: could not load split {split!r} of {path!r}: {type(err).__name__}: {err}") from err


def load_all(path: str, shown: str, **kwargs) -> DatasetDict:
    try:
        loaded = load_dataset(path, **{k: v for k, v in kwargs.items() if v is not None})
    except Exception as err:  # noqa: BLE001 - every loader failure is reported as a user error
        raise DataError(f"dataset: could not load {shown!r}: {type(err).__name__}: {err}") from err
    if not isinstance(loaded, DatasetDict):
        raise DataError(f"dataset: {shown!r} did not load as a dict of splits")
    return loaded
