"""GAM in your own training loop: accelerate + the functional API, no Trainer.

Per step: a :class:`hf_gam.core.oracles.MicroBatchOracle` says how to get the loss of this batch at the current
weights (its passes run under ``accelerator.no_sync``, since DDP does not reduce ``torch.autograd.grad`` results);
:func:`hf_gam.core.step.apply_direction_step`, the step driver ``GAMTrainer`` and ``hf_gam.optim.GAM`` use too, runs
the passes of the mode (``gam``: Algorithm 1) with the weights restored bit for bit, puts the update direction in
``p.grad`` (in the parameter's layout) and averages it over processes (what DDP would have done); the optimizer
steps. ``--gam_mode none`` is plain training.

Launch:

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/custom_accelerate_loop.py \
        --dataset cifar10 --model timm:resnet18 --image_size 32 --epochs 10 --gam_mode gam

    torchrun --nproc_per_node 2 examples/custom_accelerate_loop.py --epochs 1   # CPU works too (gloo)

Datasets and models come from :mod:`hf_gam.data` / :mod:`hf_gam.cli.models` (defaults: sklearn digits, the built-in
tiny ResNet; no download).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from hf_gam.data import DataArguments, build_transforms, collate, load_image_data, with_transform
from hf_gam.core.directions import MODES, GAMHyper
from hf_gam.cli.models import ModelArguments, load_model
from hf_gam.cli.common import exit_process
from hf_gam.core.oracles import MicroBatchOracle
from hf_gam.core.step import apply_direction_step, loss_scale_of


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GAM in a plain accelerate loop")
    p.add_argument("--dataset", default="digits", help="hf_gam.data registry name, Hub id or local directory")
    p.add_argument("--dataset_path", default=None, help="local copy in the Hub layout")
    p.add_argument("--model", default="tiny-resnet", help="Hub id, local directory, tiny-resnet, timm:<arch>")
    p.add_argument("--image_size", type=int, default=None, help="input size of built-in / timm: models")
    p.add_argument("--gam_mode", default="gam_fast", choices=list(MODES))
    p.add_argument("--gam_rho", type=float, default=None, help="default: the mode's (hf_gam.core.directions.MODES)")
    p.add_argument("--gam_alpha", type=float, default=None, help="default: the mode's")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--batch_size", type=int, default=32, help="per process")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    return p.parse_args(argv)


def train_step(accelerator: Accelerator, model, params, optimizer, hyper: GAMHyper, loss_fn) -> dict:
    """One optimizer step: the mode's passes (under ``no_sync``: the oracle's direction is averaged over processes
    once), ``p.grad = S·d`` and the prepared optimizer's step. ``S`` is the fp16 GradScaler's scale when accelerate
    made one (``mixed_precision="fp16"`` on a GPU): the prepared optimizer unscales ``p.grad`` by it and skips the
    step on overflow, so the gradients must carry it (without it every update would be ``S`` times too small)."""
    oracle = MicroBatchOracle(model, params, loss_fn, loss_scale=loss_scale_of(accelerator.scaler, params[0].device),
                              pass_context=lambda: accelerator.no_sync(model))
    # passes (BatchNorm clean-up, non-finite fallback included), p.grad = S·d, averaged over processes
    stats = apply_direction_step(hyper, params, oracle, average_over_processes=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def main(argv=None) -> float:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    set_seed(args.seed)
    with accelerator.main_process_first():
        data = load_image_data(DataArguments(dataset=args.dataset, dataset_path=args.dataset_path), seed=args.seed)
    loaded = load_model(ModelArguments(model=args.model, image_size=args.image_size), data.class_names,
                        default_image_size=data.image_size)
    train_tf, eval_tf = build_transforms(loaded.processor, data.default_augment)
    train_dl = DataLoader(with_transform(data.train, train_tf), batch_size=args.batch_size, shuffle=True,
                          collate_fn=collate, drop_last=True)
    eval_dl = DataLoader(with_transform(data.eval, eval_tf), batch_size=256, collate_fn=collate)
    model = loaded.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    total = args.max_steps or math.ceil(args.epochs * len(train_dl))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    hyper = GAMHyper.for_mode(args.gam_mode, rho=args.gam_rho, alpha=args.gam_alpha)  # unset flags: the mode's
    params = [p for p in model.parameters() if p.requires_grad]

    step = 0
    model.train()
    while step < total:
        for batch in train_dl:
            def loss_fn(batch=batch):  # mean loss of this batch at the current weights
                return F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"])

            stats = train_step(accelerator, model, params, optimizer, hyper, loss_fn)
            scheduler.step()
            step += 1
            if step % 10 == 0 or step == total:
                accelerator.print(f"step {step}/{total} loss {stats['loss'].item():.4f} "
                                  f"|g| {stats['grad_norm'].item():.4f}")
            if step >= total:
                break

    model.eval()
    correct = count = 0
    with torch.no_grad():
        for batch in eval_dl:
            logits = model(pixel_values=batch["pixel_values"]).logits
            preds, labels = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
            correct += (preds == labels).sum().item()
            count += labels.numel()
    accuracy = correct / max(count, 1)
    accelerator.print(f"test accuracy: {accuracy:.4f} on {count} images ({args.gam_mode}, {step} steps)")
    accelerator.end_training()  # waits for every process, then ends the process group
    return accuracy


if __name__ == "__main__":
    main()
    exit_process(0)  # under torchrun: leaves without C++ teardown (a gloo thread there can SIGABRT)
