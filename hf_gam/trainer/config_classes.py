"""``GAMConfig`` combined with another ``TrainingArguments`` subclass (TRL's ``SFTConfig``, ``DPOConfig``, ...), keeping
that class's fields and defaults.

A hand-written ``@dataclass class C(GAMConfig, SFTConfig)`` would, by dataclass field resolution, take every
``TrainingArguments`` field from ``GAMConfig`` (it inherits them with ``TrainingArguments``' defaults) and so silently
swap TRL's defaults (``bf16``, ``gradient_checkpointing``, ``learning_rate``, ``logging_steps``) for the stock ones.
``GAMConfig.__init_subclass__`` calls :func:`redeclare_shadowed_fields`, which re-declares those fields on the
subclass with the
other class's definition, so the subclass resolves every field as if ``GAMConfig`` held only its ``gam_*`` fields.
"""

from __future__ import annotations

import dataclasses
import typing
from functools import lru_cache

from transformers import TrainingArguments

__all__ = ["combined_class", "rebuild_combined", "redeclare_shadowed_fields", "shadowed_fields"]


def _own_fields(gam_class: type) -> set[str]:
    """The fields ``gam_class`` adds to ``TrainingArguments`` (the ``gam_*`` ones)."""
    return {f.name for f in dataclasses.fields(gam_class)} - {f.name for f in dataclasses.fields(TrainingArguments)}


def shadowed_fields(cls: type, gam_class: type) -> dict[str, tuple[dataclasses.Field, type]]:
    """``{name: (field, owner)}`` of the fields that ``gam_class``'s inherited ``TrainingArguments`` fields would
    shadow in ``cls``: resolved over ``cls``'s bases as the dataclass machinery does (the last base in reverse MRO
    order wins), once as it is and once with ``gam_class`` holding only its own fields."""
    gam_fields = gam_class.__dict__["__dataclass_fields__"]
    own = _own_fields(gam_class)
    standard: dict[str, dataclasses.Field] = {}
    wanted: dict[str, tuple[dataclasses.Field, type]] = {}
    for base in reversed(cls.__mro__[1:]):
        fields = getattr(base, "__dataclass_fields__", None)
        if not fields:
            continue
        standard.update(fields)
        owner = next((b for b in base.__mro__ if b.__dict__.get("__dataclass_fields__") is fields), base)
        for name, f in fields.items():
            if fields is gam_fields and name not in own:
                continue
            wanted[name] = (f, owner)
    return {name: (f, owner) for name, (f, owner) in wanted.items() if standard[name] is not f}


def _copy_field(f: dataclasses.Field) -> dataclasses.Field:
    kwargs = dict(init=f.init, repr=f.repr, hash=f.hash, compare=f.compare, metadata=f.metadata, kw_only=f.kw_only)
    if f.default is not dataclasses.MISSING:
        kwargs["default"] = f.default
    elif f.default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = f.default_factory
    return dataclasses.field(**kwargs)


def redeclare_shadowed_fields(cls: type, gam_class: type) -> None:
    """Declare on ``cls`` (before ``@dataclass`` processes it) each field of :func:`shadowed_fields` that ``cls`` does
    not declare itself, with its owner's definition and resolved type (``HfArgumentParser`` reads the types)."""
    own_annotations = dict(cls.__dict__.get("__annotations__", {}))
    redeclared = {}
    for name, (f, owner) in shadowed_fields(cls, gam_class).items():
        if name in own_annotations:
            continue
        try:
            redeclared[name] = typing.get_type_hints(owner)[name]
        except Exception:  # an unresolvable annotation: keep it as written
            redeclared[name] = f.type
        setattr(cls, name, _copy_field(f))
    if redeclared:
        cls.__annotations__ = {**redeclared, **own_annotations}


@lru_cache(maxsize=None)
def combined_class(gam_class: type, config_class: type) -> type:
    """The dataclass ``(gam_class, config_class)``: every field of ``config_class`` at ``config_class``'s default plus
    ``gam_class``'s own fields; one class per pair; its instances pickle through :func:`rebuild_combined`."""
    name = f"GAM{config_class.__name__}"
    namespace = {"__module__": __name__, "__qualname__": name, "_gam_combined_with": config_class,
                 "__doc__": f"``{gam_class.__name__}`` (the ``gam_*`` fields) combined with "
                            f"``{config_class.__qualname__}``, whose fields and defaults it keeps."}
    return dataclasses.dataclass(type(name, (gam_class, config_class), namespace))


def rebuild_combined(gam_class: type, config_class: type, state: dict):
    """Unpickle an instance of ``combined_class(gam_class, config_class)`` (generated classes have no importable
    name)."""
    cls = combined_class(gam_class, config_class)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj
