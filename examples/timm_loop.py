"""A timm-style training loop with :class:`hf_gam.optim.GAM`: ``timm.create_model``, timm's data config and
transforms (``resolve_data_config`` / ``create_transform``), timm's optimizer factory (``create_optimizer_v2``, wrapped
as an instance), cosine scheduler and label-smoothing loss, AMP.

    python examples/timm_loop.py --model resnet18 --data_dir /path/to/imagefolder --mode gam_fast --amp bf16
    python examples/timm_loop.py                      # test_efficientnet on sklearn's digits, CPU, no download

``--data_dir`` is an ImageFolder root with ``train/`` and ``val/``; without it the 8x8 sklearn digits (as RGB PIL
images) go through the model's own transforms. ``--amp bf16``: autocast inside the closure (CPU or CUDA);
``--amp fp16`` (CUDA): autocast plus ``GAM(grad_scaler=torch.amp.GradScaler("cuda"))``, which skips a step whose
passes overflow. BatchNorm statistics come from the clean pass only (``model=``).
"""

from __future__ import annotations

import argparse
import contextlib
import json

import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from hf_gam.optim import GAM


class DigitsImages(torch.utils.data.Dataset):
    """sklearn's digits as RGB PIL images (shipped with scikit-learn: no download)."""

    def __init__(self, train: bool, transform=None):
        from hf_gam.data import load_digits_dataset

        split = load_digits_dataset()["train" if train else "test"]
        self.images = [image.convert("RGB") for image in split["image"]]
        self.labels, self.transform, self.classes = list(split["label"]), transform, list(range(10))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def datasets(data_dir: str | None):
    """Train and validation sets; their ``transform`` is set once the model's data config is known."""
    if data_dir is None:
        return DigitsImages(True), DigitsImages(False)
    from torchvision.datasets import ImageFolder

    return ImageFolder(f"{data_dir}/train"), ImageFolder(f"{data_dir}/val")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GAM in a timm-style loop")
    p.add_argument("--model", default="test_efficientnet")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--image_size", type=int, default=None, help="override the model's input size")
    p.add_argument("--mode", default="gam_fast")
    p.add_argument("--rho", type=float, default=None)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--max_grad_norm", type=float, default=None)
    p.add_argument("--output_json", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_ds, val_ds = datasets(args.data_dir)
    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=len(train_ds.classes)).to(device)
    overrides = {"input_size": (3, args.image_size, args.image_size)} if args.image_size else {}
    config = resolve_data_config(overrides, model=model)  # the model's own mean/std/size/interpolation
    train_ds.transform, val_ds.transform = create_transform(**config, is_training=True), create_transform(**config)
    train = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True)
    val = torch.utils.data.DataLoader(val_ds, batch_size=2 * args.batch_size)

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    # timm's optimizer factory (no weight decay on norms and biases: two param groups), wrapped as it is
    base = create_optimizer_v2(model, "sgd", lr=args.lr, momentum=0.9, weight_decay=5e-4)
    opt = GAM(None, base, mode=args.mode, rho=args.rho, every=args.every, model=model, grad_scaler=scaler,
              max_grad_norm=args.max_grad_norm, rho_schedule="lr_proportional")
    steps = args.max_steps or args.epochs * len(train)
    sched = CosineLRScheduler(opt, t_initial=steps, warmup_t=min(100, steps // 10), warmup_lr_init=args.lr / 10,
                              t_in_epochs=False)  # per optimizer step (step_update)
    loss_fn = LabelSmoothingCrossEntropy(args.smoothing)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    step, losses, lrs = 0, [], []
    model.train()
    while step < steps:
        for x, y in train:
            x, y = x.to(device), y.to(device)

            def closure():
                with autocast():
                    return loss_fn(model(x), y)

            lrs.append(opt.param_groups[0]["lr"])
            losses.append(float(opt.step(closure)))
            opt.zero_grad()
            step += 1
            sched.step_update(step)
            if step >= steps:
                break

    model.eval()
    correct = total = 0
    with torch.no_grad(), autocast():
        for x, y in val:
            correct += int((model(x.to(device)).argmax(-1).cpu() == y).sum())
            total += len(y)
    result = {"steps": step, "first_loss": losses[0], "last_loss": losses[-1], "val_accuracy": correct / total,
              "param_groups": len(opt.param_groups), "lrs": lrs,
              "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}
    print(json.dumps(result))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    main()
