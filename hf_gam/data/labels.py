"""Class labels across splits: one ``ClassLabel`` for every split of a run, read from each split's own features.

Each split is loaded with its own features (``datasets`` would otherwise apply the first file's features to every
split and cast class ids blindly). Then: a ``ClassLabel`` split whose names are the same set in another order is
remapped by name, and so is one whose names are a subset of the training split's (an imagefolder's test/ folder
may lack some classes); a class the training split lacks, strings mixed with class ids, missing (None) labels and
non-label columns are a :class:`DataError` naming the column and the value; plain integers are class ids ``0..max`` (a warning when none is
0: numbered from 1, class "0" would be empty); plain strings become classes in sorted order."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow.compute as pc

from datasets import ClassLabel, Dataset, Value

from ..errors import DataError


def _kind(feature) -> str | None:
    if isinstance(feature, ClassLabel):
        return "class"
    if isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")):
        return "int"
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return "str"
    return None


def label_values(ds: Dataset) -> np.ndarray:
    """The ``label`` column as a NumPy array."""
    return np.asarray(ds.with_format(None)["label"])


def _check_present(split: str, ds: Dataset, column: str, shown: str) -> None:
    labels = ds.data.column("label")
    if labels.null_count:
        row = int(pc.index(pc.is_null(labels), True).as_py())
        raise DataError(f"label_column: split {split!r} of {shown!r} has a missing label (None) in column {column!r} "
                        f"at row {row} ({labels.null_count} such rows)")


def _with_labels(ds: Dataset, values, names: list[str]) -> Dataset:
    return ds.remove_columns("label").add_column("label", list(values), feature=ClassLabel(names=names))


def unify_labels(splits: dict[str, Dataset], column: str, shown: str) -> tuple[dict[str, Dataset], list[str]]:
    """Give every split (``image`` and ``label`` columns; the first is the training split) the same ``ClassLabel``.
    ``column`` is the label column's name in the source, for messages. Returns the splits and the class names."""
    kinds = {}
    for split, ds in splits.items():
        kinds[split] = _kind(ds.features["label"])
        if kinds[split] is None:
            raise DataError(f"label_column: column {column!r} of split {split!r} of {shown!r} holds "
                            f"{ds.features['label']}, not class labels (ClassLabel, integers or strings)")
        _check_present(split, ds, column, shown)
    if "str" in kinds.values() and set(kinds.values()) != {"str"}:
        text = next(s for s, k in kinds.items() if k == "str")
        other = next(s for s, k in kinds.items() if k != "str")
        first = {s: splits[s].data.column("label")[0].as_py() if len(splits[s]) else None for s in (text, other)}
        raise DataError(f"label_column: column {column!r} of {shown!r} holds strings in split {text!r} (e.g. "
                        f"{first[text]!r}) but class ids in split {other!r} (e.g. {first[other]!r}); use one kind "
                        "of label in every split")
    out = dict(splits)
    if set(kinds.values()) == {"str"}:
        names = sorted({v for ds in splits.values() for v in ds.unique("label")})
        index = {n: i for i, n in enumerate(names)}
        for split, ds in splits.items():
            out[split] = _with_labels(ds, (index[v] for v in ds.with_format(None)["label"]), names)
        return out, names
    source = next((s for s, k in kinds.items() if k == "class"), None)
    if source is None:  # plain integers: class ids 0..max
        values = np.concatenate([label_values(ds) for ds in splits.values()])
        names = [str(i) for i in range(int(values.max()) + 1)] if values.size else []
        if values.size and values.min() >= 1:
            warnings.warn(f"label_column: the integer labels in column {column!r} of {shown!r} start at "
                          f"{int(values.min())} (no 0): classes are ids 0..{int(values.max())}, so class '0' has "
                          "no example; renumber them from 0 if they are numbered from 1", UserWarning, stacklevel=3)
    else:
        names = list(splits[source].features["label"].names)
    for split, ds in splits.items():
        feature = ds.features["label"]
        if kinds[split] == "class" and list(feature.names) != names:
            extra = sorted(set(feature.names) - set(names))[:5]
            if extra:  # an evaluation split may lack classes (an imagefolder's test/ without some class folders)
                raise DataError(f"label_column: split {split!r} of {shown!r} has classes that split {source!r} lacks "
                                f"in column {column!r} (e.g. {', '.join(map(repr, extra))})")
            index = {n: i for i, n in enumerate(names)}
            remap = np.array([index[n] for n in feature.names])
            labels = label_values(ds)
            known = (labels >= 0) & (labels < len(remap))  # the others (e.g. -1, no label) fail the range check
            ds = out[split] = _with_labels(ds, np.where(known, remap[np.clip(labels, 0, len(remap) - 1)], labels),
                                           names)
        labels = label_values(ds)
        bad = labels[(labels < 0) | (labels >= len(names))]
        if bad.size:
            raise DataError(f"label_column: split {split!r} of {shown!r} has labels outside the class range "
                            f"[0, {len(names) - 1}] (e.g. {int(bad[0])}; {bad.size} such rows)")
        if not isinstance(ds.features["label"], ClassLabel) or list(ds.features["label"].names) != names:
            out[split] = ds.cast_column("label", ClassLabel(names=names))
    return out, names
