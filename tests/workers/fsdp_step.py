"""Launched by tests/test_fsdp.py with `torchrun --nproc_per_node 2` (gloo, CPU): hf_gam.optim.GAM on models sharded
by FSDP2's `fully_shard` (per layer plus the root). One launch runs every case named in argv[2] (comma-separated,
see CASES) and saves, per case, the full weights after each step (gathered with `full_tensor`) and what the test
asserts on; each rank trains on its own half of each step's batch of 16."""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from testing_utils import tiny_data, tiny_model
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from hf_gam.cli.common import exit_process
from hf_gam.optim import GAM

HP = dict(rho=0.3, alpha=0.4, rho_prime=0.1, beta=0.3, gamma=0.5)
# case -> GAM keyword arguments (besides HP) and the closure style; the test builds the union-batch reference from it
CASES = {
    "none:graph": dict(mode="none"),
    "sam:graph": dict(mode="sam"),
    "sam:backward": dict(mode="sam"),
    "asam:graph": dict(mode="sam", adaptive=True),
    "asam:backward": dict(mode="sam", adaptive=True),
    "gam_fast:graph": dict(mode="gam_fast"),
    "gam_fast:backward": dict(mode="gam_fast"),
    "gam_fast_official:graph": dict(mode="gam_fast", variant="official"),
    "gam_fast_official:backward": dict(mode="gam_fast", variant="official"),
    "gam_fast_adaptive:graph": dict(mode="gam_fast", adaptive=True),
    # every=2, the lr-proportional radius under a StepLR schedule, clipping of the sharded direction
    "gam_fast_options:backward": dict(mode="gam_fast", every=2, rho_schedule="lr_proportional", max_grad_norm=0.05),
    # a GradScaler (fp16's machinery) on the sharded gradients: unscale_, step and update on DTensors
    "sam_grad_scaler:graph": dict(mode="sam", grad_scaler=True),
}


def gam_kwargs(spec):
    """The GAM keyword arguments of a case (a fresh GradScaler where the case asks for one)."""
    kw = {k: v for k, v in spec.items() if k != "mode"}
    if kw.pop("grad_scaler", False):
        kw["grad_scaler"] = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return kw
STEPS = 3


def step_batch(data, step, rank):
    rows = slice(16 * step + 8 * rank, 16 * step + 8 * rank + 8)
    return {"pixel_values": data.x[rows], "labels": data.y[rows]}


def shard(model, layers, mp_policy=None):
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def full_weights(model):
    return torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()]).clone()


def make_closure(model, opt, batch, style):
    def closure():
        loss = F.cross_entropy(model(batch["pixel_values"]).logits, batch["labels"])
        if style == "backward":  # davda54/sam style
            opt.zero_grad()
            loss.backward()
        return loss
    return closure


def run_case(name, rank, data):
    style = name.split(":")[1]
    model = tiny_model()
    shard(model, [model.fc1, model.fc2])
    kw = gam_kwargs(CASES[name])
    opt = GAM(model.parameters(), torch.optim.SGD, lr=0.5, mode=CASES[name]["mode"], model=model, **HP, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if "rho_schedule" in kw else None
    thetas = [full_weights(model)]
    for t in range(STEPS):
        opt.step(make_closure(model, opt, step_batch(data, t, rank), style))
        if sched is not None:
            sched.step()
        thetas.append(full_weights(model))
    return {"thetas": thetas}


def run_failure(rank, data):
    """gam_fast whose third pass raises: the sharded weights come back bit for bit, no gradient is left."""
    model = tiny_model()
    shard(model, [model.fc1, model.fc2])
    opt = GAM(model.parameters(), torch.optim.SGD, lr=0.5, mode="gam_fast", model=model, **HP)
    batch, calls = step_batch(data, 0, rank), []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in pass 3")
        return F.cross_entropy(model(batch["pixel_values"]).logits, batch["labels"])

    before = [p.to_local().clone() for p in model.parameters()]
    try:
        opt.step(closure)
        message = None
    except RuntimeError as err:
        message = str(err)
    after = [p.to_local().clone() for p in model.parameters()]
    return {"message": message, "bitwise": all(torch.equal(a, b) for a, b in zip(before, after)),
            "grads_none": all(p.grad is None for p in model.parameters()), "passes": len(calls)}


def run_refusals(rank):
    """What GAM refuses on sharded parameters, at construction: the messages."""
    out = {}
    for mode in ("gam", "gnp", "gam_sam"):
        model = tiny_model()
        shard(model, [model.fc1])
        try:
            GAM(model.parameters(), torch.optim.SGD, lr=0.1, mode=mode, model=model)
            out[mode] = None
        except ValueError as err:
            out[mode] = str(err)
    model = tiny_model()
    shard(model, [model.fc1])
    try:
        GAM(model.parameters(), torch.optim.SGD, lr=0.1, mode="sam", perturbation="local")
        out["local"] = None
    except ValueError as err:
        out["local"] = str(err)
    opt = GAM(model.parameters(), torch.optim.SGD, lr=0.1, mode="sam")
    out["default_perturbation"] = opt.perturbation
    return out


def run_batchnorm(rank, data):
    """BatchNorm under FSDP2: the running statistics a sam step leaves are those of its clean pass (one forward of
    this rank's batch at the step's starting weights), not of the perturbed pass."""
    batch = step_batch(data, 0, rank)
    plain = tiny_model(batchnorm=True).train()
    plain(batch["pixel_values"])  # the clean pass's statistics
    expected = [plain.bn.running_mean.clone(), plain.bn.running_var.clone(), plain.bn.num_batches_tracked.clone()]
    model = tiny_model(batchnorm=True).train()
    shard(model, [model.fc1, model.fc2])
    opt = GAM(model.parameters(), torch.optim.SGD, lr=0.5, mode="sam", model=model, rho=0.3)
    opt.step(make_closure(model, opt, batch, "graph"))
    got = [model.bn.running_mean, model.bn.running_var, model.bn.num_batches_tracked]
    moved = not torch.equal(full_weights(model), full_weights_of_plain(tiny_model(batchnorm=True)))
    return {"stats_equal": all(torch.equal(a, b) for a, b in zip(expected, got)), "moved": moved}


def full_weights_of_plain(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def vit_model():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=16, num_labels=3)
    return ViTForImageClassification(config).to(torch.float64)


def vit_batch(step, rank):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    return {"pixel_values": x[8 * rank:8 * rank + 8], "labels": y[8 * rank:8 * rank + 8]}


def run_vit(rank):
    """A tiny HF ViT sharded per encoder layer plus the root: sam, 2 steps."""
    model = vit_model()
    shard(model, list(model.vit.layers))
    opt = GAM(model.parameters(), torch.optim.SGD, lr=0.5, mode="sam", model=model, rho=0.3)
    thetas = [full_weights(model)]
    for t in range(2):
        opt.step(make_closure(model, opt, vit_batch(t, rank), "graph"))
        thetas.append(full_weights(model))
    return {"thetas": thetas}


def run_bf16(rank, data):
    """float32 weights, bf16 compute through MixedPrecisionPolicy(param_dtype=bfloat16): gam_fast, 3 steps."""
    model = tiny_model(dtype=torch.float32)
    shard(model, [model.fc1, model.fc2], MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    opt = GAM(model.parameters(), torch.optim.SGD, lr=0.5, mode="gam_fast", model=model, **HP)
    thetas = [full_weights(model)]
    for t in range(STEPS):
        batch = {k: (v.float() if v.is_floating_point() else v) for k, v in step_batch(data, t, rank).items()}

        def closure(batch=batch):
            return F.cross_entropy(model(batch["pixel_values"]).logits.float(), batch["labels"])

        opt.step(closure)
        thetas.append(full_weights(model))
    return {"thetas": thetas, "grad_dtype": str(next(model.parameters()).grad.dtype)}


def run_functional(rank, data):
    """core.functional on FSDP2 DTensors directly (outside a step): the global norm, inner products and copy_ against
    the gathered tensors; and the shard sums of one gam_fast step (one collective each: 4 norms, then <h-, h+> and
    ||h+||^2 together)."""
    from hf_gam.core import functional

    model = tiny_model()
    shard(model, [model.fc1, model.fc2])
    batch = step_batch(data, 0, rank)
    F.cross_entropy(model(batch["pixel_values"]).logits, batch["labels"]).backward()
    grads, params = [p.grad for p in model.parameters()], list(model.parameters())
    full_g = torch.cat([g.full_tensor().reshape(-1) for g in grads])
    full_p = torch.cat([p.full_tensor().reshape(-1) for p in params])
    norm = functional.global_norm(grads)
    inner, square = functional.dots([(grads, params), (grads, grads)])
    target = [p.detach().clone() * 0 for p in params]
    functional.copy_(target, params)
    calls, real = [], functional.sum_over_shards

    def counting(values, layout):
        calls.append(values.numel())
        return real(values, layout)

    functional.sum_over_shards = counting
    try:
        opt = GAM(model.parameters(), torch.optim.SGD, lr=0.5, mode="gam_fast", model=model, **HP)
        opt.step(make_closure(model, opt, batch, "graph"))
    finally:
        functional.sum_over_shards = real
    return {"norm": (float(norm), float(full_g.norm())), "plain": not hasattr(norm, "placements"),
            "dots": ((float(inner), float(full_g @ full_p)), (float(square), float(full_g @ full_g))),
            "copy": torch.equal(torch.cat([t.full_tensor().reshape(-1) for t in target]), full_p),
            "gam_fast_shard_sums": calls}


def run_trainer_cpu_fallback(out_dir, data):
    """GAMTrainer with fsdp="full_shard" and use_cpu on 2 processes: transformers and accelerate run DDP (no FSDP on
    CPU), so an exact mode is not refused and trains as under DDP."""
    from hf_gam import GAMConfig, GAMTrainer

    args = GAMConfig(output_dir=os.path.join(out_dir, "trainer"), use_cpu=True, fsdp="full_shard",
                     fsdp_config={"version": 2}, gam_mode="gam", max_steps=1, per_device_train_batch_size=8,
                     learning_rate=0.1, report_to=[], save_strategy="no", disable_tqdm=True)
    model = tiny_model()
    before = full_weights_of_plain(model).clone()
    trainer = GAMTrainer(model, args, train_dataset=data)
    trainer.train()
    return {"fsdp_enabled": trainer.is_fsdp_enabled, "ddp": type(trainer.model_wrapped).__name__,
            "moved": not torch.equal(before, full_weights_of_plain(trainer.model))}


def main():
    out_dir, names = sys.argv[1], sys.argv[2].split(",")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = tiny_data(n=16 * STEPS)
    results = {}
    for name in names:
        if name in CASES:
            results[name] = run_case(name, rank, data)
        elif name == "failure":
            results[name] = run_failure(rank, data)
        elif name == "refusals":
            results[name] = run_refusals(rank)
        elif name == "batchnorm":
            results[name] = run_batchnorm(rank, data)
        elif name == "vit":
            results[name] = run_vit(rank)
        elif name == "bf16":
            results[name] = run_bf16(rank, data)
        elif name == "functional":
            results[name] = run_functional(rank, data)
        elif name == "trainer_cpu_fallback":
            results[name] = run_trainer_cpu_fallback(out_dir, data)
        else:
            raise SystemExit(f"unknown case {name!r}")
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    exit_process(0)


if __name__ == "__main__":
    main()
