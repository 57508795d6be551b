"""The ``hf-gam`` command line.

``hf-gam train [FLAGS | config.yaml | config.json]`` fine-tunes (or trains from scratch) an image classifier with
:class:`hf_gam.GAMTrainer`. Flags come from ``transformers.HfArgumentParser`` over :class:`~hf_gam.models.ModelArguments`,
:class:`~hf_gam.data.DataArguments`, :class:`RunArguments` and :class:`~hf_gam.GAMConfig`; with no argument at all it
trains a small ResNet with GAM (``gam_fast``, the default mode) on sklearn's digits (embedded, no download): ~98% test
accuracy in well under a minute on two idle CPU cores.

User errors (bad flags, unknown datasets, missing columns, unreadable models, a push that cannot succeed) are
printed as one ``hf-gam: error: ...`` line with exit status 2, before anything is computed or written.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from .flatness import defaults as flatness_defaults

logger = logging.getLogger("hf_gam.cli")

USAGE = """usage: hf-gam <command> [options]

commands:
  train      fine-tune / train an image classifier with GAM (no options: GAM on sklearn's digits)
  flatness   flatness diagnostics of a trained model (Hessian spectrum, R0/R1, landscape)

'hf-gam <command> --help' lists a command's options."""

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

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class UsageError(ValueError):
    """A user error of the CLI itself (flag combinations, config files, push preconditions)."""


@dataclass
class RunArguments:
    """What ``hf-gam train`` does around training."""

    flatness_at_end: bool = field(default=False, metadata={"help": (
        "After training, measure the flatness of the final model (hf_gam.flatness: Hessian spectrum, trace, R1, "
        "R0, landscapes; --flatness_* settings) on the first training batches (eval transforms) and write it to "
        "OUTPUT_DIR/flatness.")})
    flatness_batches: int = field(default=flatness_defaults.NUM_BATCHES, metadata={
        "help": "Batches measured by flatness (train batch size)."})
    metrics: list[str] = field(default_factory=lambda: ["accuracy", "top_k_accuracy"], metadata={"help": (
        "Evaluation metrics, as `evaluate` modules: the shipped accuracy and top_k_accuracy (top-5; offline), "
        "Hub module names (e.g. f1, matthews_correlation: online or cached) or paths to module scripts; "
        "NAME:key=value,... passes arguments to compute (f1:average=macro, top_k_accuracy:k=3). Results go to "
        "eval_results.json, all_results.json and the model card.")})


@dataclass
class FlatnessRunArguments:
    """What ``hf-gam flatness`` measures on and where it writes."""

    output_dir: str = field(default="outputs/flatness", metadata={"help": "Where flatness.json and the PNGs go."})
    split: Literal["train", "eval"] = field(default="train", metadata={"help": "Measure on train or eval images."})
    flatness_batches: int = field(default=flatness_defaults.NUM_BATCHES, metadata={
        "help": "How many batches are measured."})
    batch_size: int = field(default=64, metadata={"help": "Images per batch."})


def _parser():
    from transformers import HfArgumentParser

    from .config import GAMConfig
    from .data import DataArguments
    from .flatness import FlatnessArguments
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


def _read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    with open(path) as f:
        try:
            if path.endswith(".json"):
                values = json.load(f)
            else:
                import yaml

                values = yaml.safe_load(f)
        except Exception as err:  # noqa: BLE001
            raise UsageError(f"config file {path!r} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                             f"{err}") from err
    if not isinstance(values, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of field names to values")
    return values


def _config_to_argv(values: dict[str, Any], parser, path: str) -> list[str]:
    """The flags equivalent to a config file's mapping, so that files and flags share types, choices and checks."""
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"config file {path!r}: unknown fields {', '.join(map(str, unknown))}")
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_train_args(argv: list[str]):
    """``(model_args, data_args, run_args, gam_config)`` from flags or from one YAML/JSON file."""
    parser = _parser()
    if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        argv = _config_to_argv(_read_config_file(argv[0]), parser, argv[0])
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
    return model_args, data_args, run_args, args


def check_flatness_args(flat_args, **counts: int) -> None:
    """The flatness settings (:meth:`FlatnessArguments.validate`) and the batch counts (``flatness_batches``,
    ``batch_size``: ints >= 1), as a :class:`UsageError` naming the flag and its value, before any compute."""
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be an int >= 1; got {value!r}")
    try:
        flat_args.validate()
    except ValueError as err:
        raise UsageError(str(err)) from err


def check_push(args) -> None:
    """Fail early, before any compute, when ``--push_to_hub`` cannot succeed (offline, no token, rejected token)."""
    if not args.push_to_hub:
        return
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise UsageError("push_to_hub: the Hugging Face Hub is unreachable in offline mode (HF_HUB_OFFLINE=1); "
                         "unset it or drop --push_to_hub")
    token = args.hub_token or get_token()
    if not token:
        raise UsageError("push_to_hub: no Hugging Face token found; run `hf auth login`, set HF_TOKEN, or pass "
                         "--hub_token")
    try:
        HfApi().whoami(token=token)
    except Exception as err:  # noqa: BLE001
        raise UsageError(f"push_to_hub: the Hub did not accept the token ({type(err).__name__}: {err})") from err


def _eval_batches(ds, transform, n: int, batch_size: int) -> list[dict]:
    from torch.utils.data import DataLoader

    from .data import collate, with_transform

    loader = DataLoader(with_transform(ds, transform), batch_size=batch_size, shuffle=False, collate_fn=collate)
    return [b for _, b in zip(range(n), loader)]


def _card_dataset_args(data, data_args) -> str | dict | None:
    """The model-index's dataset config (``--dataset_config``) or, when the classes come from a label column other
    than the dataset's default (``--cifar100_labels coarse``, ``--label_column``), loading arguments naming it."""
    from .data import DATASETS

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


def train(model_args, data_args, run_args, args) -> dict[str, float]:
    """Load, train, evaluate, save (weights, config, image processor, metrics, model card) and optionally push."""
    from .data import build_transforms, collate, load_image_data, with_transform
    from .models import load_model, model_summary
    from .trainer import GAMTrainer

    check_push(args)
    from .metrics import check_metrics, compute_metrics_fn, load_metrics

    metric_modules = load_metrics(run_args.metrics)  # a bad name fails here, before any data
    with args.main_process_first(desc="loading the dataset"):
        data = load_image_data(data_args, seed=args.seed)
    check_metrics(metric_modules, len(data.class_names))  # a metric unfit for this task fails before training
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
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
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

    flat = None
    if run_args.flatness_at_end and trainer.is_world_process_zero():
        from .flatness import run_flatness

        batches = _eval_batches(data.train, eval_tf, run_args.flatness_batches, args.per_device_train_batch_size)
        model = trainer.accelerator.unwrap_model(trainer.model)
        flat = run_flatness(model, [{k: v.to(args.device) for k, v in b.items()} for b in batches],
                            os.path.join(args.output_dir, "flatness"), **run_args.flatness.to_settings())
        metrics.update({f"flatness_{k}": flat[k] for k in ("lambda_max", "hessian_trace", "first_order_flatness",
                                                           "zeroth_order_flatness") if k in flat})

    card = {"model_name": os.path.basename(os.path.normpath(args.output_dir)), "finetuned_from": loaded.base_model,
            "dataset": data.hub_id or data.name, "dataset_args": _card_dataset_args(data, data_args),
            "results": metrics, "label_noise": data.noise, "eval_split": data.eval_split, "flatness": flat,
            "extra": {"model": model_args.model, "from_scratch": loaded.from_scratch, "augment": augment,
                      "classes": len(data.class_names), "label_column": data.label_column,
                      "train_examples": len(data.train), "eval_split": data.eval_split,
                      **_eval_subset(data, args.seed), **model_summary(trainer.model)}}
    if args.push_to_hub:  # saves the model and writes the same card (GAMTrainer.create_model_card), then uploads
        trainer.push_to_hub(commit_message="hf-gam train", **{k: v for k, v in card.items() if k != "model_name"})
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
    from .data import DataError
    from .metrics import MetricLoadError
    from .models import ModelLoadError

    try:
        model_args, data_args, run_args, args = parse_train_args(argv)
        train(model_args, data_args, run_args, args)
    except (UsageError, DataError, ModelLoadError, MetricLoadError) as err:
        print(f"hf-gam: error: {err}", file=sys.stderr)
        return 2
    return 0


def flatness_main(argv: list[str]) -> int:
    """``hf-gam flatness --model DIR --dataset NAME [--compare DIR2] [--flatness_* ...]``."""
    from transformers import HfArgumentParser

    from .data import DataArguments, DataError, build_transforms, load_image_data
    from .flatness import FlatnessArguments, run_flatness
    from .models import ModelArguments, ModelLoadError, load_trained_model

    parser = HfArgumentParser((ModelArguments, DataArguments, FlatnessRunArguments, FlatnessArguments),
                              prog="hf-gam flatness", description="Flatness of a trained image classifier.")
    try:
        if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
            argv = _config_to_argv(_read_config_file(argv[0]), parser, argv[0])
        model_args, data_args, run, fa = parser.parse_args_into_dataclasses(argv)
        check_flatness_args(fa, flatness_batches=run.flatness_batches, batch_size=run.batch_size)
        data = load_image_data(data_args)
        measured = data.train if run.split == "train" else data.eval
        # each model as saved (its own head and classes) on the batches its own image processor makes
        loaded = load_trained_model(model_args, data.class_names, default_image_size=data.image_size)
        batches = _eval_batches(measured, build_transforms(loaded.processor, "none")[1], run.flatness_batches,
                                run.batch_size)
        compare = compare_batches = None
        if fa.flatness_compare:
            other = load_trained_model(ModelArguments(model=fa.flatness_compare, image_size=model_args.image_size),
                                       data.class_names, default_image_size=data.image_size)
            compare = other.model
            compare_batches = _eval_batches(measured, build_transforms(other.processor, "none")[1],
                                            run.flatness_batches, run.batch_size)
    except (UsageError, DataError, ModelLoadError) as err:
        print(f"hf-gam: error: {err}", file=sys.stderr)
        return 2
    settings = fa.to_settings()
    settings.setdefault("name", os.path.basename(os.path.normpath(model_args.model)))
    if compare is not None:
        settings.setdefault("compare_name", os.path.basename(os.path.normpath(fa.flatness_compare)))
    result = run_flatness(loaded.model, batches, run.output_dir, compare_model=compare, compare_batches=compare_batches,
                          **settings)
    print(f"lambda_max {result['lambda_max']:.4g}, trace {result['hessian_trace']:.4g}, R1 "
          f"{result['first_order_flatness']:.4g}, R0 {result['zeroth_order_flatness']:.4g}; written to "
          f"{run.output_dir}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-gam`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    commands = {"train": train_main, "flatness": flatness_main}
    if command not in commands:
        print(f"{USAGE}\n\nhf-gam: error: unknown command {command!r}; choose from {', '.join(commands)}",
              file=sys.stderr)
        return 2
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        status = commands[command](rest)
    except SystemExit as exit_:  # argparse: --help (0) or a bad flag (2, message already printed)
        status = exit_.code if isinstance(exit_.code, int) else 2
    except BaseException:
        end_process_group(wait=False)  # the other processes may be inside a collective: do not wait for them
        raise
    end_process_group(wait=True)
    return status


def end_process_group(wait: bool = True) -> None:
    """Under torchrun / accelerate launch: wait for every process (``wait``), then end the process group. A process
    that exits with gloo's threads still alive can die in C++ teardown (SIGABRT, "terminate called without an active
    exception"), most often on a busy machine."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
