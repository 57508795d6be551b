"""``hf-gam flatness``: the flatness diagnostics of a trained image classifier (:mod:`hf_gam.flatness`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from .common import CONFIG_SUFFIXES, check_flatness_args, config_to_argv, eval_batches, read_config_file
from ..flatness import defaults as flatness_defaults

__all__ = ["FlatnessRunArguments", "flatness_main"]


@dataclass
class FlatnessRunArguments:
    """What ``hf-gam flatness`` measures on and where it writes."""

    output_dir: str = field(default="outputs/flatness", metadata={"help": "Where flatness.json and the PNGs go."})
    split: Literal["train", "eval"] = field(default="train", metadata={"help": "Measure on train or eval images."})
    flatness_batches: int = field(default=flatness_defaults.NUM_BATCHES, metadata={
        "help": "How many batches are measured."})
    batch_size: int = field(default=64, metadata={"help": "Images per batch."})


def flatness_main(argv: list[str]) -> int:
    """``hf-gam flatness --model DIR --dataset NAME [--compare DIR2] [--flatness_* ...]``."""
    from transformers import HfArgumentParser

    from ..data import DataArguments, build_transforms, load_image_data
    from ..flatness import FlatnessArguments, run_flatness
    from .models import ModelArguments, load_trained_model

    parser = HfArgumentParser((ModelArguments, DataArguments, FlatnessRunArguments, FlatnessArguments),
                              prog="hf-gam flatness", description="Flatness of a trained image classifier.")
    if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        argv = config_to_argv(read_config_file(argv[0]), parser, argv[0])
    model_args, data_args, run, fa = parser.parse_args_into_dataclasses(argv)
    check_flatness_args(fa, flatness_batches=run.flatness_batches, batch_size=run.batch_size)
    data = load_image_data(data_args)
    measured = data.train if run.split == "train" else data.eval
    # each model as saved (its own head and classes) on the batches its own image processor makes
    loaded = load_trained_model(model_args, data.class_names, default_image_size=data.image_size)
    batches = eval_batches(measured, build_transforms(loaded.processor, "none")[1], run.flatness_batches,
                           run.batch_size)
    compare = compare_batches = None
    if fa.flatness_compare:
        other = load_trained_model(ModelArguments(model=fa.flatness_compare, image_size=model_args.image_size),
                                   data.class_names, default_image_size=data.image_size)
        compare = other.model
        compare_batches = eval_batches(measured, build_transforms(other.processor, "none")[1],
                                       run.flatness_batches, run.batch_size)
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
