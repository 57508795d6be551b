"""``hf-gam train``.

``hf-gam train [FLAGS | config.yaml | config.json]`` fine-tunes (or trains from scratch) an image classifier with
:class:`hf_gam.GAMTrainer`. Flags come from ``transformers.HfArgumentParser`` over :class:`~hf_gam.cli.models.ModelArguments`,
:class:`~hf_gam.data.DataArguments`, :class:`RunArguments` and :class:`~hf_gam.GAMConfig`; with no argument at all it
trains a small ResNet with GAM (``gam_fast``, the default mode) on sklearn's digits (embedded, no download): ~98% test
accuracy in well under a minute on two idle CPU cores.

User errors are printed as one ``hf-gam: error: ...`` line with exit status 2, a push that fails after training with
exit status 3 (:mod:`hf_gam.cli`, :mod:`hf_gam.cli.push`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..atomic import WriteError
from ..flatness import defaults as flatness_defaults
from ..metrics import DEFAULT_METRICS
from .common import CONFIG_SUFFIXES, UsageError, check_flatness_args, config_to_argv, eval_batches, read_config_file
from .push import check_push, push_trained
from .resume import PREEMPTED_STATUS, Preempted, resume_point

logger = logging.getLogger("hf_gam.cli")

# Defaults of `hf-gam train` that differ from TrainingArguments': tuned for the embedded digits job, sensible for any.
TRAIN_DEFAULTS: dict[str, Any] = {
    "output_dir": None,  # -> outputs/<dataset>-<gam_mode>
    "num_train_epochs": 6.0,
    "learning_rate": 2e-3,
    "weight_decay": 0.05,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 0.05,
    "report_to": "none",
    "remove_unused_columns": False,
    "dataloader_num_workers": 0,
}

@dataclass
class RunArguments:
    """What ``hf-gam train`` does around training."""

    flatness_at_end: bool = field(default=False, metadata={"help": (
        "After training, measure the flatness of the final model (hf_gam.flatness: Hessian spectrum, trace, R1, "
        "R0, landscapes; --flatness_* settings) on the first training batches (eval transforms) and write it to "
        "OUTPUT_DIR/flatness.")})
    flatness_batches: int = field(default=flatness_defaults.NUM_BATCHES, metadata={
        "help": "Batches measured by flatness (train batch size)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": (
        "Train from scratch even when OUTPUT_DIR holds a finished run or checkpoints (its checkpoint-* folders are "
        "removed first). Without it, a run whose OUTPUT_DIR holds a complete checkpoint resumes from it.")})
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS), metadata={"help": (
        "Evaluation metrics, as `evaluate` modules: the shipped accuracy and top_k_accuracy (top-5; offline), "
        "Hub module names (e.g. f1, matthews_correlation: online or cached) or paths to module scripts; "
        "NAME:key=value,... passes arguments to compute (f1:average=macro, top_k_accuracy:k=3). Results go to "
        "eval_results.json, all_results.json and the model card.")})


def _parser():
    from transformers import HfArgumentParser

    from ..trainer.config import GAMConfig
    from ..data import DataArguments
    from ..flatness import FlatnessArguments
    from .models import ModelArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments, GAMConfig, FlatnessArguments),
                              prog="hf-gam train",
                              description="Fine-tune an image classifier with GAM / SAM (hf_gam.GAMTrainer). "
                                          "Also accepts a single YAML or JSON file of these fields.")
    parser.set_defaults(**TRAIN_DEFAULTS, use_cpu=_no_accelerator())
    return parser


def _no_accelerator() -> bool:
    import torch

    return not (torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()))


def parse_train_args(argv: list[str]):
    """``(model_args, data_args, run_args, gam_config)`` from flags or from one YAML/JSON file."""
    parser = _parser()
    if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        argv = config_to_argv(read_config_file(argv[0]), parser, argv[0])
    values = vars(parser.parse_args(argv))
    if values.get("output_dir") is None:
        dataset = os.path.basename(str(values.get("dataset") or "digits").rstrip("/")) or "dataset"
        values["output_dir"] = os.path.join("outputs", f"{dataset}-{values.get('gam_mode') or 'gam_fast'}")
    try:
        model_args, data_args, run_args, args, flat_args = parser.parse_dict(values)
    except ValueError as err:  # the dataclasses' own validation (GAMConfig, TrainingArguments)
        raise UsageError(str(err)) from err
    if args.remove_unused_columns:
        raise UsageError("remove_unused_columns must be False for hf-gam train (images are transformed on the fly "
                         "from the 'image' column); got True")
    run_args.flatness = flat_args
    if run_args.flatness_at_end:
        check_flatness_args(flat_args, flatness_batches=run_args.flatness_batches)
    args.resume_from_checkpoint = resume_point(args.output_dir, args.resume_from_checkpoint,
                                               run_args.overwrite_output_dir)
    return model_args, data_args, run_args, args


def _card_dataset_args(data, data_args) -> str | dict | None:
    """The model-index's dataset config (``--dataset_config``) or, when the classes come from a label column other
    than the dataset's default (``--cifar100_labels coarse``, ``--label_column``), loading arguments naming it."""
    from ..data import DATASETS

    spec = DATASETS.get(data.name)
    default = spec.label_column if spec else "label"
    if data.label_column in (None, default):
        return data_args.dataset_config
    return {**({"name": data_args.dataset_config} if data_args.dataset_config else {}),
            "label_column": data.label_column}


def _eval_subset(data, seed: int) -> dict[str, str]:
    """A card row saying the results come from a random subset of the evaluation split (``--max_eval_samples``)."""
    total = data.eval_total or len(data.eval)
    if len(data.eval) >= total:
        return {}
    return {"eval_subset": f"results on {len(data.eval)} of the {total} images of split {data.eval_split!r}, drawn at "
                           f"random (--max_eval_samples, seed {seed}), not on the whole split"}


def _evaluate_and_save(trainer, data, eval_tf, args) -> tuple[dict[str, float], dict[str, float]]:
    """Evaluate on the validation part (when carved) and the evaluation split, save metrics, the trainer state and
    (unless pushing, which saves it) the model; ``(all metrics, the evaluation split's)``."""
    from ..data import with_transform

    metrics: dict[str, float] = {}
    if data.validation is not None:
        val = trainer.evaluate(metric_key_prefix="validation")
        trainer.log_metrics("validation", val)
        trainer.save_metrics("validation", val)
        metrics.update(val)
    test = trainer.evaluate(with_transform(data.eval, eval_tf), metric_key_prefix="eval")
    trainer.log_metrics("eval", test)
    trainer.save_metrics("eval", test)
    metrics.update(test)
    trainer.save_state()
    if not args.push_to_hub:
        trainer.save_model()
    return metrics, test


def _flatness_at_end(trainer, data, eval_tf, run_args, args) -> dict | None:
    """``--flatness_at_end``: the final model's flatness on the first training batches (eval transforms), written
    to ``output_dir/flatness`` by the main process; ``None`` on the others."""
    if not trainer.is_world_process_zero():
        return None
    from ..flatness import run_flatness

    batches = eval_batches(data.train, eval_tf, run_args.flatness_batches, args.per_device_train_batch_size)
    model = trainer.accelerator.unwrap_model(trainer.model)
    return run_flatness(model, [{k: v.to(args.device) for k, v in b.items()} for b in batches],
                        os.path.join(args.output_dir, "flatness"), **run_args.flatness.to_settings())


def train(model_args, data_args, run_args, args) -> dict[str, float]:
    """Load, train, evaluate, save (weights, config, image processor, metrics, model card) and optionally push."""
    from ..data import build_transforms, collate, load_image_data, with_transform
    from .models import load_model, model_summary
    from ..trainer import GAMTrainer

    check_push(args)
    from ..metrics import check_metrics, compute_metrics_fn, load_metrics

    metric_modules = load_metrics(run_args.metrics)  # a bad name fails here, before any data
    with args.main_process_first(desc="loading the dataset"):
        data = load_image_data(data_args, seed=args.seed)
    check_metrics(metric_modules, len(data.class_names))  # a metric unfit for this task fails before training
    from transformers import set_seed

    set_seed(args.seed)  # before the model is built: a model trained from scratch starts from the same weights
    loaded = load_model(model_args, data.class_names, default_image_size=data.image_size)
    augment = data_args.augment or data.default_augment
    policy = "cifar10" if data.name.startswith("cifar") else "imagenet"
    train_tf, eval_tf = build_transforms(loaded.processor, augment, autoaugment_policy=policy)

    trainer = GAMTrainer(model=loaded.model, args=args, data_collator=collate, compute_metrics=compute_metrics_fn(metric_modules),
                         train_dataset=with_transform(data.train, train_tf),
                         eval_dataset=with_transform(data.validation if data.validation is not None else data.eval,
                                                     eval_tf),
                         processing_class=loaded.processor)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if trainer.preempted:
        raise Preempted(f"stopped by SIGTERM after saving checkpoint-{trainer.state.global_step} in "
                        f"{args.output_dir}; run the same command again to resume from it")
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    metrics, test = _evaluate_and_save(trainer, data, eval_tf, args)
    flat = _flatness_at_end(trainer, data, eval_tf, run_args, args) if run_args.flatness_at_end else None
    if flat is not None:
        metrics.update({f"flatness_{k}": flat[k] for k in ("lambda_max", "hessian_trace", "first_order_flatness",
                                                           "zeroth_order_flatness") if k in flat})

    card = {"model_name": os.path.basename(os.path.normpath(args.output_dir)), "finetuned_from": loaded.base_model,
            "dataset": data.hub_id or data.name, "dataset_args": _card_dataset_args(data, data_args),
            "results": metrics, "label_noise": data.noise, "flatness": flat,
            "eval_split": None if _eval_subset(data, args.seed) else data.eval_split,  # a subset is not the split
            "extra": {"model": model_args.model, "from_scratch": loaded.from_scratch, "augment": augment,
                      "classes": len(data.class_names), "label_column": data.label_column,
                      "train_examples": len(data.train), "eval_split": data.eval_split,
                      **_eval_subset(data, args.seed), **model_summary(trainer.model)}}
    if args.push_to_hub:  # saves the model and writes the same card (GAMTrainer.create_model_card), then uploads
        push_trained(trainer, {k: v for k, v in card.items() if k != "model_name"})
    else:
        trainer.create_model_card(**card)
    if trainer.is_world_process_zero():
        shown = ", ".join(f"{k.removeprefix('eval_').replace('_', ' ')}: {v:.4f}" for k, v in test.items()
                          if isinstance(v, float) and k.removeprefix("eval_") not in
                          ("loss", "runtime", "samples_per_second", "steps_per_second", "epoch"))
        print(f"test {shown} on {len(data.eval)} images of {data.name}; "
              f"{time.perf_counter() - started:.0f} s; written to {args.output_dir}", flush=True)
    return metrics


def train_main(argv: list[str]) -> int:
    """``hf-gam train [flags | config.yaml]``; user errors propagate to :func:`hf_gam.cli.main`; a SIGTERM stop
    (``--enable_jit_checkpoint``) returns 143 after saying where to resume; a failed write is one error line."""
    try:
        model_args, data_args, run_args, args = parse_train_args(argv)
        train(model_args, data_args, run_args, args)
    except Preempted as stop:
        print(f"hf-gam: {stop}", file=sys.stderr)
        return PREEMPTED_STATUS
    except WriteError as err:
        print(f"hf-gam: error: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0
