"""Launched by tests/test_fsdp_trainer.py as one plain process (a 1-process gloo group through a file store, no
torchrun: with torchrun accelerate would wrap the model in DDP on CPU): GAMTrainer.train() on a model sharded by
`fully_shard` (per layer plus the root, a 1-process mesh) versus the same training of the unsharded model. The
Trainer's own step then goes through the core's sharded path (gradients from backward(), math on local shards); the
window has 2 micro-batches, so the per-micro-batch weighting of the sharded sweep is exercised (global), and the
gradient an earlier micro-batch left in p.grad must survive the next one's passes (local). Saves both weights."""

import os
import sys

import torch
import torch.distributed as dist
from testing_utils import tiny_data, tiny_model
from torch.distributed.fsdp import fully_shard

from hf_gam import GAMConfig, GAMTrainer


def arguments(out_dir, mode, perturbation):
    return GAMConfig(output_dir=out_dir, use_cpu=True, gam_mode=mode, gam_perturbation=perturbation, max_steps=3,
                     per_device_train_batch_size=8, gradient_accumulation_steps=2, learning_rate=0.5, optim="sgd",
                     lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], save_strategy="no",
                     disable_tqdm=True, gam_rho=0.3, seed=0)


def main():
    out_dir, modes = sys.argv[1], sys.argv[2].split(",")
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "store"), rank=0, world_size=1)
    data, results = tiny_data(48), {}
    for case in modes:
        mode, perturbation = case.split(":")
        model = tiny_model()
        fully_shard(model.fc1)
        fully_shard(model.fc2)
        fully_shard(model)
        trainer = GAMTrainer(model, arguments(os.path.join(out_dir, case), mode, perturbation), train_dataset=data)
        trainer.train()
        sharded = all(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
        plain = tiny_model()
        GAMTrainer(plain, arguments(os.path.join(out_dir, case + "_plain"), mode, perturbation),
                   train_dataset=data).train()
        results[case] = {"sharded": sharded,
                         "theta": torch.cat([p.full_tensor().reshape(-1) for p in trainer.model.parameters()]),
                         "theta_plain": torch.cat([p.detach().reshape(-1) for p in plain.parameters()]),
                         "theta0": torch.cat([p.detach().reshape(-1) for p in tiny_model().parameters()])}
    torch.save(results, os.path.join(out_dir, "result.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
