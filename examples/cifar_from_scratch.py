"""Training from scratch on CIFAR-10 / CIFAR-100 with GAM, the paper's Table 1 setting (Section 5.2, App. C.5.1).

ResNet-18 from random weights, SGD (momentum 0.9), learning rate 0.1 with cosine decay, weight decay 5e-4, global
batch 128, 200 epochs (Table 8); GAM with rho 0.04 on CIFAR-10 and 0.1 on CIFAR-100, alpha 0.3 for ResNet-18
(App. C.5.1); augmentation: basic (pad 4 + random crop + flip), or --augment cutout | randaugment | autoaugment
as in Table 1's columns. The model is timm's resnet18 built from its config (`--model timm:resnet18`, no download;
note timm's ImageNet stem: 7x7 stride-2 conv + max-pool, not the 3x3 CIFAR stem of the paper's code). Any
`hf-gam train` flag on the command line overrides these defaults (the last occurrence wins), e.g.
`--model timm:vit_small_patch16_224 --timm_model_args '{"img_size": 32, "patch_size": 4}' --optim adamw_torch
--learning_rate 1e-3 --weight_decay 0.1` for a ViT-S/4, or `--gam_mode gam_fast` for Algorithm 2.

Launch (4 GPUs; per-device batch = 128 / processes, computed here):

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml --num_processes 4 \
        examples/cifar_from_scratch.py --dataset cifar100 --augment cutout --bf16 true

    torchrun --nproc_per_node 4 examples/cifar_from_scratch.py --dataset cifar10 --gam_mode sam   # SAM baseline

One GPU: `accelerate launch --config_file examples/accelerate_configs/single_gpu.yaml examples/cifar_from_scratch.py`.
Label-noise runs (App. C.2): add `--label_noise 0.4`.
"""

from __future__ import annotations

import argparse
import os
import sys

from hf_gam.cli import main as hf_gam_main
from hf_gam.cli.common import exit_process

PAPER_RHO = {"cifar10": "0.04", "cifar100": "0.1"}
GLOBAL_BATCH = 128


def paper_flags(dataset: str, world_size: int, mode: str = "gam") -> list[str]:
    """The `hf-gam train` flags of the paper's from-scratch CIFAR setting."""
    if dataset not in PAPER_RHO:
        raise SystemExit(f"--dataset must be cifar10 or cifar100 for this setting; got {dataset!r}")
    if GLOBAL_BATCH % world_size:
        raise SystemExit(f"global batch {GLOBAL_BATCH} is not divisible by {world_size} processes")
    return ["--dataset", dataset, "--model", "timm:resnet18", "--image_size", "32",
            "--optim", "sgd", "--optim_args", "momentum=0.9", "--learning_rate", "0.1", "--weight_decay", "5e-4",
            "--lr_scheduler_type", "cosine", "--warmup_steps", "0", "--num_train_epochs", "200",
            "--per_device_train_batch_size", str(GLOBAL_BATCH // world_size), "--per_device_eval_batch_size", "256",
            "--gam_mode", mode, "--gam_rho", PAPER_RHO[dataset], "--gam_alpha", "0.3", "--augment", "basic",
            "--eval_strategy", "epoch", "--save_strategy", "epoch", "--save_total_limit", "2",
            "--logging_steps", "50", "--dataloader_num_workers", str(min(8, os.cpu_count() or 1)),
            "--output_dir", os.path.join("outputs", f"scratch-resnet18-{dataset}-{mode}")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--gam_mode", default="gam")
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    flags = paper_flags(known.dataset, int(os.environ.get("WORLD_SIZE", "1")), known.gam_mode)
    return hf_gam_main(["train", *flags, *rest])


if __name__ == "__main__":
    exit_process(main())  # under torchrun: ends the process group and exits without C++ teardown
