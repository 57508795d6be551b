"""``GAMConfig`` combined with another ``TrainingArguments`` subclass (TRL's ``SFTConfig``, ``DPOConfig``, ...), keeping
that class's fields and defaults.

A hand-written ``@dataclass class C(GAMConfig, SFTConfig)`` would, by dataclass field resolution, take every
``TrainingArguments`` field from ``GAMConfig`` (it inherits them with ``TrainingArguments``' defaults) and so silently
swap TRL's defaults (``bf16``, ``gradient_checkpointing``, ``learning_rate``, ``logging_steps``) for the stock ones.
``GAMConfig.__init_subclass__`` calls :func:`shadowed_fields` and re-declares those fields on the subclass with the
other class's definition, so the subclass resolves every field as if ``GAMConfig`` held only its ``gam_*`` fields.
"""

from __future__ import annotations

import dataclasses
import typing
from functools import lru_cache

from transformers import TrainingArguments

__all__ = ["gam_config_class", "rebuild_combined", "redeclare_shadowed_fields", "with_gam"]


def _gam_config():
    from .config import GAMConfig

    return GAMConfig


def _gam_own_fields() -> set[str]:
    """The fields ``GAMConfig`` adds to ``TrainingArguments`` (the ``gam_*`` ones)."""
    return {f.name for f in dataclasses.fields(_gam_config())} - {f.name for f in dataclasses.fields(TrainingArguments)}


def shadowed_fields(cls: type) -> dict[str, tuple[dataclasses.Field, type]]:
    """``{name: (field, owner)}`` of the fields that ``GAMConfig``'s inherited ``TrainingArguments`` fields would
    shadow in ``cls``: resolved over ``cls``'s bases as the dataclass machinery does (the last base in reverse MRO
    order wins), once as it is and once with ``GAMConfig`` holding only its own fields."""
    gam_fields = _gam_config().__dataclass_fields__
    own = _gam_own_fields()
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


def redeclare_shadowed_fields(cls: type) -> None:
    """Declare on ``cls`` (before ``@dataclass`` processes it) each field of :func:`shadowed_fields` that ``cls`` does
    not declare itself, with its owner's definition and resolved type (``HfArgumentParser`` reads the types)."""
    own_annotations = dict(cls.__dict__.get("__annotations__", {}))
    redeclared = {}
    for name, (f, owner) in shadowed_fields(cls).items():
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
def gam_config_class(config_class: type) -> type:
    """``GAMConfig`` combined with ``config_class`` (a ``TrainingArguments`` subclass such as TRL's ``SFTConfig``):
    a dataclass with every field of ``config_class`` at ``config_class``'s default plus the ``gam_*`` fields; its
    instances are both. ``gam_config_class(SFTConfig)(output_dir="out", gam_mode="sam")`` is an ``SFTConfig`` with
    TRL's defaults and ``gam_mode="sam"``. The same class is returned for the same ``config_class``; instances pickle
    (the Trainer saves ``training_args.bin``) through :func:`rebuild_combined`."""
    GAMConfig = _gam_config()
    if not (isinstance(config_class, type) and issubclass(config_class, TrainingArguments)):
        raise TypeError(f"gam_config_class needs a TrainingArguments subclass; got {config_class!r}")
    if issubclass(config_class, GAMConfig):
        return config_class
    name = f"GAM{config_class.__name__}"
    namespace = {"__module__": __name__, "__qualname__": name, "_gam_combined_with": config_class,
                 "__doc__": f"``GAMConfig`` (the ``gam_*`` fields) combined with ``{config_class.__qualname__}``, "
                            f"whose fields and defaults it keeps."}
    return dataclasses.dataclass(type(name, (GAMConfig, config_class), namespace))


def with_gam(config: TrainingArguments, **gam_fields) -> TrainingArguments:
    """``config`` (any ``TrainingArguments``, e.g. an ``SFTConfig``) as an instance of
    ``gam_config_class(type(config))`` with every value it has and ``gam_fields`` (``gam_mode=...``, ...) set:
    ``with_gam(SFTConfig(output_dir="out", max_length=512), gam_mode="sam", sam_rho=0.05)``. Values are read from the
    init fields with ``getattr`` after ``__post_init__`` resolved them (``to_dict`` would mask ``hub_token``)."""
    if not isinstance(config, TrainingArguments):
        raise TypeError(f"with_gam needs a TrainingArguments instance; got {type(config).__name__}")
    base = getattr(type(config), "_gam_combined_with", type(config))
    cls = gam_config_class(base)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(gam_fields) - names)
    if unknown:
        raise TypeError(f"with_gam: {', '.join(unknown)} is not a field of {cls.__name__}")
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init and f.name in names}
    values.update(gam_fields)
    return cls(**values)


def rebuild_combined(config_class: type, state: dict):
    """Unpickle an instance of ``gam_config_class(config_class)`` (generated classes have no importable name)."""
    cls = gam_config_class(config_class)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj
