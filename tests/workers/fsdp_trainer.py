"""Launched by tests/test_fsdp_trainer.py on CUDA with `torchrun --nproc_per_node 1`: GAMTrainer under accelerate's
FSDP2 (`fsdp="full_shard"`, `fsdp_config={"version": 2}`, a 1-process mesh is a valid FSDP2 run), a tiny HF ViT
wrapped per encoder layer, 2 steps of `gam_mode` (argv[2]) with the global perturbation; saves the trained weights
and what the Trainer enabled. accelerate enables FSDP only on accelerators (with `use_cpu` it falls back to DDP), so
this worker needs a GPU."""

import os
import sys

import torch
from testing_utils import TensorDataset, tiny_vit

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.cli.common import exit_process


def dataset():
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 3, (16,), generator=g))


def arguments(out_dir, mode, **kw):
    # the whole dataset is every step's batch: the result does not depend on the sampler's order
    return GAMConfig(output_dir=out_dir, per_device_train_batch_size=16, max_steps=2, learning_rate=0.1, optim="sgd",
                     lr_scheduler_type="constant", max_grad_norm=0.0, gam_mode=mode, gam_perturbation="global",
                     report_to=[], save_strategy="no", seed=0, disable_tqdm=True, **kw)


def main():
    out_dir, mode = sys.argv[1], sys.argv[2]
    model = tiny_vit(seed=0)
    args = arguments(out_dir, mode, fsdp="full_shard",
                     fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["ViTLayer"]})
    trainer = GAMTrainer(model, args, train_dataset=dataset())
    trainer.train()
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in trainer.model.parameters()]
    torch.save({"fsdp_enabled": trainer.is_fsdp_enabled, "fsdp2": bool(trainer.accelerator.is_fsdp2),
                "sharded": all(hasattr(p, "full_tensor") for p in trainer.model.parameters()),
                "theta": torch.cat([p.detach().float().cpu().reshape(-1) for p in params])},
               os.path.join(out_dir, "result.pt"))
    exit_process(0)


if __name__ == "__main__":
    main()
