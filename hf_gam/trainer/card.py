"""The model card of a model trained with hf_gam: ``hf_gam/model_cards/gam_model_card.md`` (a Jinja template
shipped in the package) rendered with ``huggingface_hub.ModelCard.from_template``.

The card records the base model, the dataset, the GAM mode and every ``gam_*`` value, the base optimizer and its
schedule, label noise, the evaluation results (also as ``model-index`` entries, as transformers' own Trainer card
does), the per-evaluation training-results table, framework versions, the paper's citation and the tags ``gam``,
``sam``, ``image-classification``. A PEFT adapter keeps PEFT's metadata (``library_name: peft``, the
``base_model:adapter:<base>`` and method tags) and the card says which adapter it is. ``base_model`` is written only
for a Hub id (a local path would become a broken Hub link, and the Hub refuses a card whose ``base_model`` it does
not know): a name the user gave, or a name inferred from the model that resolves on the Hub (:func:`resolves_on_hub`).
``GAMTrainer.create_model_card`` and ``hf-gam train`` both render it.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..formatting import format_value as _fmt

TEMPLATE_NAME = "gam_model_card.md"
TAGS = ["gam", "sam", "image-classification", "hf-gam"]
OPTIMIZER_FIELDS = ("optim", "optim_args", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs",
                    "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                    "label_smoothing_factor", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "seed")
VERSIONED = ("hf-gam", "transformers", "torch", "torchvision", "timm", "datasets", "accelerate", "huggingface_hub")

# eval_* keys that are bookkeeping, not results; and the model-index names of the usual metrics
NOT_RESULTS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "step", "loss")
METRIC_NAMES = {"accuracy": ("accuracy", "Top-1 accuracy"), "top5_accuracy": ("accuracy", "Top-5 accuracy")}

__all__ = ["render_model_card", "template_path", "TAGS", "is_hub_id", "resolves_on_hub", "adapter_facts",
           "training_results_table"]


def template_path() -> Path:
    """The card template, shipped in the package as ``hf_gam/model_cards/`` (package data)."""
    candidate = Path(__file__).resolve().parents[1] / "model_cards" / TEMPLATE_NAME
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"hf_gam's model card template is missing: {candidate}")


def _noise_text(noise: Mapping[str, Any] | None) -> str:
    if not noise or not noise.get("rate"):
        return "none"
    return (f"{noise['rate']}: {noise.get('flipped')} of {noise.get('total')} training labels flipped uniformly to "
            f"another class (seed {noise.get('seed')}); evaluation labels clean")


def _is_result(name: str) -> bool:
    return not (name.endswith(("_runtime", "_per_second")) or name == "epoch")


def _versions(with_peft: bool = False) -> dict[str, str]:
    found = {}
    for name in VERSIONED + (("peft",) if with_peft else ()):
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


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` is an ``owner/name`` Hub repository id (not a local path): only those are linked and go in
    the ``base_model`` / ``datasets`` metadata."""
    if not name or name.count("/") != 1 or name.startswith((".", "~")) or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolves_on_hub(name: str | None) -> bool:
    """Whether ``name``, inferred from a model (``config._name_or_path``, a PEFT base) rather than named by the user,
    is a model on the Hub: :func:`is_hub_id`, and, when the Hub is reachable, a model repo it knows
    (``HfApi.model_info``). A relative folder such as ``outputs/x`` that is gone when the card is written is then
    not linked (the Hub would refuse a ``base_model`` it does not know). Offline, or when the Hub does not answer,
    the syntactic answer stands."""
    if not is_hub_id(name):
        return False
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        return True
    try:
        HfApi().model_info(name, timeout=10)
    except HfHubHTTPError as err:  # 404 RepoNotFound (or 401 for a repo that is private to someone else)
        return err.response is None or err.response.status_code not in (401, 404)
    except Exception:  # noqa: BLE001 - unreachable: nothing learned
        return True
    return True


def _eval_results(results: Mapping[str, Any], dataset_type: str | None, dataset_name: str | None,
                  split: str | None, dataset_args: str | Mapping[str, Any] | None) -> list[EvalResult]:
    """One model-index entry per numeric ``eval_*`` metric (loss and timings left out, as the stock card does)."""
    if not dataset_type:
        return []
    out = []
    for key, value in results.items():
        name = key.removeprefix("eval_")
        if key == name or name in NOT_RESULTS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        kind, label = METRIC_NAMES.get(name, (name, name.replace("_", " ")))
        out.append(EvalResult(
            task_type="image-classification", dataset_type=dataset_type, dataset_name=dataset_name or dataset_type,
            dataset_split=split, dataset_config=dataset_args if isinstance(dataset_args, str) else None,
            dataset_args=dict(dataset_args) if isinstance(dataset_args, Mapping) else None,
            metric_type=kind, metric_name=label, metric_value=float(value)))
    return out


def adapter_facts(model: Any, is_base: Callable[[str | None], bool] = is_hub_id) -> dict[str, Any] | None:
    """What a PEFT model's card must say: ``{"method", "settings", "tags", "base_model"}`` (``None`` for a model
    without adapters). The tags are PEFT's own (``PeftModel._get_peft_specific_model_tags``: ``transformers``,
    ``lora``, ``base_model:adapter:<base>``), the adapter tag only when ``is_base(base)`` (:func:`is_hub_id`, or
    :func:`resolves_on_hub` for a base only inferred from the model)."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, Mapping) or not peft_config or not hasattr(model, "get_base_model"):
        return None
    active = getattr(model, "active_adapter", None)
    config = peft_config.get(active) if isinstance(active, str) else next(iter(peft_config.values()))
    method = getattr(config.peft_type, "value", config.peft_type)
    method = {"LORA": "LoRA"}.get(method, method)
    settings: dict[str, Any] = {"adapter": active or "default", "method": method}
    for attr in ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "use_rslora", "use_dora"):
        value = getattr(config, attr, None)
        if value not in (None, False, [], ()):
            settings[attr] = ", ".join(sorted(value)) if isinstance(value, (set, list, tuple)) else _fmt(value)
    base_model = model.get_base_model()
    base = getattr(base_model, "name_or_path", None) or None
    tags = list(getattr(base_model, "model_tags", None) or [])  # as PeftModel.create_or_update_model_card
    tags += model._get_peft_specific_model_tags() if hasattr(model, "_get_peft_specific_model_tags") else []
    linked = is_base(base)
    tags = [t for t in tags if not t.startswith("base_model:adapter:")
            or (linked if t.split(":", 2)[2] == base else is_hub_id(t.split(":", 2)[2]))]
    return {"method": method, "settings": settings, "tags": tags, "base_model": base if linked else None}


def training_results_table(log_history: Sequence[Mapping[str, Any]]) -> str:
    """The stock card's "Training results" table (transformers' ``parse_log_history`` and
    ``make_markdown_table``): one row per evaluation during training; empty without one."""
    from transformers.modelcard import make_markdown_table, parse_log_history

    _, lines, _ = parse_log_history(list(log_history))
    return make_markdown_table(lines) if lines else ""


def render_model_card(args: Any, *, model_name: str, base_model: str | None = None, dataset_name: str | None = None,
                      results: Mapping[str, Any] | None = None, label_noise: Mapping[str, Any] | None = None,
                      extra: Mapping[str, Any] | None = None, tags: list[str] | str | None = None,
                      eval_split: str | None = None, flatness: Mapping[str, Any] | None = None,
                      flatness_dir: str = "flatness/", license: str | None = None,
                      language: str | list[str] | None = None, dataset_tags: str | list[str] | None = None,
                      dataset_args: str | Mapping[str, Any] | None = None, adapter: Mapping[str, Any] | None = None,
                      training_results: str = "") -> ModelCard:
    """Render the GAM model card.

    Args:
        args: the run's :class:`~hf_gam.GAMConfig` (any object with its ``gam_*`` and optimizer attributes works).
        model_name: title of the card (e.g. the output directory's name or the Hub repo name).
        base_model: Hub id of the pretrained weights; anything else (``None``, a local directory) is neither linked
            nor written to the metadata.
        dataset_name: Hub id (``owner/name``: linked and listed in the metadata) or a free-form name.
        results: final metrics (``eval_accuracy``, ``eval_top5_accuracy``, ``eval_loss``, ...); floats are rounded;
            every numeric ``eval_*`` metric but the loss becomes a ``model-index`` entry when the dataset is known.
        label_noise: ``{"rate", "flipped", "total", "seed"}`` as :func:`hf_gam.data.load_image_data` records it.
        extra: more rows for the "Model and data" table (``architecture`` also names a from-scratch model).
        tags: tags added to ``gam``, ``sam``, ``image-classification``, ``hf-gam`` and the mode.
        eval_split: split the ``eval_*`` results come from (metadata only); ``None`` for results on a subset of
            a split (``--max_eval_samples``), which are not that split's.
        flatness: a :func:`hf_gam.run_flatness` result: the card gets a flatness section with its numbers and its
            pictures (``flatness_dir`` is their folder relative to the card).
        license, language: card metadata, as in ``Trainer.create_model_card``.
        dataset_tags: dataset ids for the ``datasets`` metadata and the model-index's dataset type, trusted as given
            (owner or not, as the stock Trainer); default: ``dataset_name`` when a Hub id. Without either the type
            is ``dataset_name`` (a local dataset's name) and ``datasets`` is left out.
        dataset_args: the dataset's config name (``str``) or loading arguments (``dict``) for the model-index.
        adapter: :func:`adapter_facts` of a PEFT model: ``library_name: peft``, PEFT's tags, an adapter section.
        training_results: :func:`training_results_table` of the run's log history.
    """
    from ..core.directions import MODES

    results = {k: v for k, v in (results or {}).items() if _is_result(k)}
    extra = {**dict(extra or {}), "label noise": _noise_text(label_noise)}
    mode = getattr(args, "gam_mode", "none")  # plain TrainingArguments: a plain Trainer run
    spec = MODES.get(mode)
    every = max(1, int(getattr(args, "gam_every", 1) or 1))
    passes = (spec.passes + every - 1) / every if spec else 1
    base_model = base_model if is_hub_id(base_model) else None
    # as the stock Trainer: explicit dataset tags are trusted (owner or not); else the dataset's Hub id; a local
    # dataset is not listed in `datasets`, and its name is the model-index's dataset type
    explicit = [dataset_tags] if isinstance(dataset_tags, str) else list(dataset_tags or [])
    hub_datasets = explicit or ([dataset_name] if is_hub_id(dataset_name) else [])
    all_tags = list(dict.fromkeys(TAGS + [mode] + ([tags] if isinstance(tags, str) else list(tags or []))
                                  + list((adapter or {}).get("tags", []))))
    eval_results = _eval_results(results, (hub_datasets or [dataset_name])[0], dataset_name, eval_split,
                                 dataset_args)
    card_data = ModelCardData(
        model_name=model_name, base_model=base_model, datasets=hub_datasets or None, tags=all_tags,
        library_name="peft" if adapter else "transformers", pipeline_tag="image-classification",
        license=license, language=language, metrics=sorted({r.metric_type for r in eval_results}) or None,
        eval_results=eval_results or None)
    architecture = extra.get("architecture")
    return ModelCard.from_template(
        card_data, template_path=str(template_path()), model_name=model_name, base_model=base_model,
        dataset_name=dataset_name or "an unnamed dataset", dataset_is_hub=is_hub_id(dataset_name), gam_mode=mode,
        mode_summary=spec.summary if spec else mode, passes=f"{passes:.3g}",
        architecture=f"an image classifier (`{architecture}`)" if architecture else "an image classifier",
        results={k: _fmt(v) for k, v in results.items()}, gam=_gam_settings(args),
        optimizer=_optimizer_settings(args), data={k: _fmt(v) for k, v in extra.items()},
        versions=_versions(with_peft=bool(adapter)), flatness_section=_flatness_section(flatness, flatness_dir),
        adapter=adapter, training_results=training_results, from_scratch=bool(extra.get("from_scratch")))


def _flatness_section(flatness: Mapping[str, Any] | None, image_dir: str) -> str:
    if not flatness:
        return ""
    from ..flatness.report import flatness_markdown

    return flatness_markdown(flatness, image_prefix=image_dir).replace("## Flatness", "### Flatness", 1)
