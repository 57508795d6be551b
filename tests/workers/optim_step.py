"""Launched by tests/test_optim.py with `torchrun --nproc_per_node 2`: one hf_gam.optim.GAM step (SGD lr 1, float64)
of a DDP-wrapped tiny model per case (mode:local|global|backward), each rank on its own half of the batch; saves θ before/after and its batch."""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from testing_utils import tiny_data, tiny_model
from reference import flat_params

from hf_gam.optim import GAM
from hf_gam.cli.common import exit_process  # noqa: E402

out_dir, cases = sys.argv[1], [c.split(":") for c in sys.argv[2].split(",")]
dist.init_process_group("gloo")
rank = dist.get_rank()
data = tiny_data()
batch = {"pixel_values": data.x[8 * rank:8 * rank + 8], "labels": data.y[8 * rank:8 * rank + 8]}
results = {}
for mode, scope in cases:
    model = DistributedDataParallel(tiny_model())
    theta0 = flat_params(model.module)
    opt = GAM(model.parameters(), torch.optim.SGD, lr=1.0, mode=mode, model=model, rho=0.3, alpha=0.4,
              rho_prime=0.1, beta=0.3, gamma=0.5, perturbation="global" if scope == "global" else "local")

    def closure():
        loss = F.cross_entropy(model(batch["pixel_values"]).logits, batch["labels"])
        if scope == "backward":  # davda54/sam style: backward inside the closure
            opt.zero_grad()
            loss.backward()
        return loss

    opt.step(closure)
    results[f"{mode}:{scope}"] = {"theta0": theta0, "theta1": flat_params(model.module), "batch": batch}
torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
dist.barrier()
exit_process(0)  # ends the process group and leaves without C++ teardown (a gloo thread there can SIGABRT)
