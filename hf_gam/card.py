"""The model card of a model trained with hf_gam: ``model_cards/gam_model_card.md`` (a Jinja template shipped in
the package) rendered with ``huggingface_hub.ModelCard.from_template``.

The card records the base model, the dataset, the GAM mode and every ``gam_*`` value, the base optimizer and its
schedule, label noise, a results table, framework versions, the paper's citation and the tags ``gam``, ``sam``,
``image-classification``. ``GAMTrainer.create_model_card`` and ``hf-gam train`` both render it.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .formatting import format_value as _fmt

TEMPLATE_NAME = "gam_model_card.md"
TAGS = ["gam", "sam", "image-classification", "hf-gam"]
OPTIMIZER_FIELDS = ("optim", "optim_args", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs",
                    "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                    "label_smoothing_factor", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "seed")
VERSIONED = ("hf-gam", "transformers", "torch", "torchvision", "timm", "datasets", "accelerate", "huggingface_hub")

__all__ = ["render_model_card", "template_path", "TAGS"]


def template_path() -> Path:
    """The card template: inside the installed package (``hf_gam/model_cards/``, a wheel install) or, in a source
    checkout / editable install, the repository's top-level ``model_cards/`` (one file, mapped into the wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "model_cards" / TEMPLATE_NAME, here.parent / "model_cards" / TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"hf_gam's model card template {TEMPLATE_NAME} is missing from {here / 'model_cards'}")


def _noise_text(noise: Mapping[str, Any] | None) -> str:
    if not noise or not noise.get("rate"):
        return "none"
    return (f"{noise['rate']}: {noise.get('flipped')} of {noise.get('total')} training labels flipped uniformly to "
            f"another class (seed {noise.get('seed')}); evaluation labels clean")


def _is_result(name: str) -> bool:
    return not (name.endswith(("_runtime", "_per_second")) or name == "epoch")


def _versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _gam_settings(args: Any) -> dict[str, Any]:
    names = sorted(n for n in vars(args) if n.startswith("gam_")) + ["sam_rho"]
    return {n: _fmt(getattr(args, n)) for n in names if hasattr(args, n)}


def _optimizer_settings(args: Any) -> dict[str, Any]:
    skip = {"num_train_epochs"} if getattr(args, "max_steps", -1) > 0 else {"max_steps"}
    out = {n: _fmt(getattr(args, n)) for n in OPTIMIZER_FIELDS
           if n not in skip and getattr(args, n, None) not in (None, "", {})}
    try:
        world = int(args.world_size)
    except Exception:  # noqa: BLE001 - not a TrainingArguments (duck-typed args)
        world = 1
    if hasattr(args, "per_device_train_batch_size"):
        out["world_size"] = world
        out["total_train_batch_size"] = (args.per_device_train_batch_size * world
                                         * getattr(args, "gradient_accumulation_steps", 1))
    out["precision"] = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32"
    return out


def _eval_results(results: Mapping[str, Any], dataset_name: str | None, split: str | None) -> list[EvalResult]:
    if not dataset_name:
        return []
    metrics = (("eval_accuracy", "accuracy", "Top-1 accuracy"), ("eval_top5_accuracy", "accuracy", "Top-5 accuracy"))
    return [EvalResult(task_type="image-classification", dataset_type=dataset_name, dataset_name=dataset_name,
                       dataset_split=split, metric_type=kind, metric_name=label, metric_value=float(results[key]))
            for key, kind, label in metrics if isinstance(results.get(key), (int, float))]


def render_model_card(args: Any, *, model_name: str, base_model: str | None = None, dataset_name: str | None = None,
                      results: Mapping[str, Any] | None = None, label_noise: Mapping[str, Any] | None = None,
                      extra: Mapping[str, Any] | None = None, tags: list[str] | str | None = None,
                      eval_split: str | None = None, flatness: Mapping[str, Any] | None = None,
                      flatness_dir: str = "flatness/") -> ModelCard:
    """Render the GAM model card.

    Args:
        args: the run's :class:`~hf_gam.GAMConfig` (any object with its ``gam_*`` and optimizer attributes works).
        model_name: title of the card (e.g. the output directory's name or the Hub repo name).
        base_model: Hub id of the pretrained weights; ``None`` when trained from scratch or from a local directory.
        dataset_name: Hub id (``owner/name``: linked and listed in the metadata) or a free-form name.
        results: final metrics (``eval_accuracy``, ``eval_top5_accuracy``, ``eval_loss``, ...); floats are rounded.
        label_noise: ``{"rate", "flipped", "total", "seed"}`` as :func:`hf_gam.data.load_image_data` records it.
        extra: more rows for the "Model and data" table (``architecture`` also names a from-scratch model).
        tags: tags added to ``gam``, ``sam``, ``image-classification``, ``hf-gam`` and the mode.
        eval_split: split the ``eval_*`` results come from (metadata only).
        flatness: a :func:`hf_gam.run_flatness` result: the card gets a flatness section with its numbers and its
            pictures (``flatness_dir`` is their folder relative to the card).
    """
    from .directions import MODES

    results = {k: v for k, v in (results or {}).items() if _is_result(k)}
    extra = {**dict(extra or {}), "label noise": _noise_text(label_noise)}
    mode = getattr(args, "gam_mode", "gam")
    spec = MODES.get(mode)
    every = max(1, int(getattr(args, "gam_every", 1) or 1))
    passes = (spec.passes + every - 1) / every if spec else 1
    all_tags = list(dict.fromkeys(TAGS + [mode] + ([tags] if isinstance(tags, str) else list(tags or []))))
    hub_dataset = bool(dataset_name) and "/" in dataset_name and not Path(dataset_name).exists()
    card_data = ModelCardData(
        model_name=model_name, base_model=base_model, datasets=[dataset_name] if hub_dataset else None,
        tags=all_tags, library_name="transformers", pipeline_tag="image-classification",
        metrics=["accuracy"] if results else None,
        eval_results=_eval_results(results, dataset_name if hub_dataset else None, eval_split) or None)
    return ModelCard.from_template(
        card_data, template_path=str(template_path()), model_name=model_name, base_model=base_model,
        dataset_name=dataset_name or "an unnamed dataset", dataset_is_hub=hub_dataset, gam_mode=mode,
        mode_summary=spec.summary if spec else mode, passes=f"{passes:.3g}",
        architecture=extra.get("architecture", "an image classifier"),
        results={k: _fmt(v) for k, v in results.items()}, gam=_gam_settings(args),
        optimizer=_optimizer_settings(args), data={k: _fmt(v) for k, v in extra.items()}, versions=_versions(),
        flatness_section=_flatness_section(flatness, flatness_dir))


def _flatness_section(flatness: Mapping[str, Any] | None, image_dir: str) -> str:
    if not flatness:
        return ""
    from .flatness.report import flatness_markdown

    return flatness_markdown(flatness, image_prefix=image_dir).replace("## Flatness", "### Flatness", 1)
