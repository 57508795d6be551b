"""Transfer learning with GAM, the paper's Table 3 setting (Section 5.3, App. C.5.2).

ImageNet-pretrained EfficientNet-b0 (SGD, momentum 0.9) or Swin-t (AdamW, betas 0.9/0.999) fine-tuned on Stanford
Cars, CIFAR-10, CIFAR-100, Oxford-IIIT Pets or Food-101 with a new classification head: 40k steps, global batch 128,
learning rate 2e-3 with cosine decay, weight decay 1e-5; no augmentation on Cars/Pets/Food-101, the basic one on
CIFAR (each dataset's default in hf_gam.data). GAM hyper-parameters are GAMConfig's (rho 0.04, alpha 0.1); any flag
of `hf-gam train` given on the command line overrides these defaults (the last occurrence wins).

Launch (8 GPUs, one machine; per-device batch = 128 / processes, computed here):

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/transfer_learning.py \
        --backbone efficientnet-b0 --dataset cars --gam_mode gam --bf16 true

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/transfer_learning.py \
        --backbone swin-t --dataset pets --gam_mode gam_fast --bf16 true

    # baseline (plain SGD), SAM, and GAM on top of SAM:
    ... --gam_mode none        ... --gam_mode sam        ... --gam_mode gam_sam

One GPU: `accelerate launch --config_file examples/accelerate_configs/single_gpu.yaml examples/transfer_learning.py
--backbone swin-t --dataset cifar10`; two nodes: `examples/accelerate_configs/multi_node.yaml`; `torchrun
--nproc_per_node 8 examples/transfer_learning.py ...` works too. Push the result with `--push_to_hub true
--hub_model_id you/swin-t-cars-gam`.
"""

from __future__ import annotations

import argparse
import os
import sys

from hf_gam.cli import main as hf_gam_main
from hf_gam.cli.common import exit_process

BACKBONES = {
    # Table 3: EfficientNet-b0 with SGD (momentum 0.9), Swin-t with AdamW (betas 0.9, 0.999).
    "efficientnet-b0": ["--model", "google/efficientnet-b0", "--optim", "sgd", "--optim_args", "momentum=0.9"],
    "swin-t": ["--model", "microsoft/swin-tiny-patch4-window7-224", "--optim", "adamw_torch", "--adam_beta1", "0.9",
               "--adam_beta2", "0.999"],
}
GLOBAL_BATCH = 128


def paper_flags(backbone: str, dataset: str, world_size: int, grad_accum: int = 1, mode: str = "gam") -> list[str]:
    """The `hf-gam train` flags of the paper's transfer setting for this backbone, dataset and world size."""
    if GLOBAL_BATCH % (world_size * grad_accum):
        raise SystemExit(f"global batch {GLOBAL_BATCH} is not divisible by {world_size} processes x {grad_accum} "
                         "accumulation steps; pass --per_device_train_batch_size yourself")
    return [*BACKBONES[backbone], "--dataset", dataset,
            "--max_steps", "40000", "--per_device_train_batch_size", str(GLOBAL_BATCH // (world_size * grad_accum)),
            "--gradient_accumulation_steps", str(grad_accum), "--learning_rate", "2e-3",
            "--lr_scheduler_type", "cosine", "--warmup_steps", "0", "--weight_decay", "1e-5",
            "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "5000", "--save_total_limit", "2",
            "--logging_steps", "100", "--dataloader_num_workers", str(min(8, os.cpu_count() or 1)),
            "--gam_mode", mode, "--output_dir", os.path.join("outputs", f"transfer-{backbone}-{dataset}-{mode}")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="efficientnet-b0")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gam_mode", default="gam")
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    flags = paper_flags(known.backbone, known.dataset, world_size, known.gradient_accumulation_steps, known.gam_mode)
    return hf_gam_main(["train", *flags, *rest])


if __name__ == "__main__":
    exit_process(main())  # under torchrun: ends the process group and exits without C++ teardown
