"""Launched by tests/test_distributed.py with `torchrun --nproc_per_node 2`: one SGD step (lr 1, float64) per case
on the tiny model; every rank saves θ before/after and the micro-batches it saw to OUT/rank{r}.pt."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from testing_utils import HP, Recorder, sgd_args, tiny_data, tiny_model  # noqa: E402
from reference import flat_params  # noqa: E402
from hf_gam.cli.common import exit_process  # noqa: E402

out_dir = sys.argv[1]
cases = [c.split(":") for c in sys.argv[2].split(",")]  # mode:perturbation[:gam_every] (gam_every > 1: three steps)
rank = int(os.environ["RANK"])
results = {}
for mode, perturbation, *every in cases:
    every = int(every[0]) if every else 1
    model = tiny_model()
    theta0 = flat_params(model)
    args = sgd_args(os.path.join(out_dir, f"{mode}-{perturbation}-{every}"), per_device_train_batch_size=8,
                    gam_mode=mode, gam_perturbation=perturbation, ddp_backend="gloo", gam_every=every,
                    max_steps=1 if every == 1 else 3, **HP)
    trainer = Recorder(model=model, args=args, train_dataset=tiny_data())
    trainer.train()
    key = ":".join([mode, perturbation] + ([str(every)] if every > 1 else []))
    results[key] = {"theta0": theta0, "theta1": flat_params(trainer.model), "seen": trainer.seen,
                    "world": trainer.accelerator.num_processes, "logs": trainer.state.log_history}
torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
dist.barrier()
exit_process(0)  # ends the process group and leaves without C++ teardown (a gloo thread there can SIGABRT)
