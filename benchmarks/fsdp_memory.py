"""Per-process memory of hf_gam.optim.GAM under FSDP2 (``fully_shard``) versus DDP, on 2 CPU processes (gloo).

    python benchmarks/fsdp_memory.py            # launches torchrun --nproc_per_node 2 itself; ~1 CPU-minute
    python benchmarks/fsdp_memory.py --quick    # a small model (the smoke test)

The model is hf_gam.testing's TinyMLP (the CPU benchmarks' MLP) with eight equal 512-wide layers (2x16x16 -> 512 x 8 -> 10, 2.1M float32
parameters, batch 8 per process: parameter-dominated, and no layer dominates, so FSDP2's transient all-gathered
layer is 1/8 of the model), sharded per Linear layer plus the root under FSDP2, wrapped whole in DDP otherwise; base
optimizer AdamW (two state buffers per parameter). Reported per process, after 2 steps:

- parameter, gradient and optimizer-state bytes held between steps (local shards under FSDP2);
- the buffers each mode holds across its passes: at the start of every pass (the closure's entry) the bytes of all
  live tensors (``benchmarks/_common.live_tensor_bytes``) minus those live before the step (parameters, optimizer
  state; the previous step's gradients count only if still held); the most over the step's passes, in units of the
  process's own parameter bytes P (the local shard under FSDP2). Each pass adds its own gradient (1 P) and its
  activations on top; FSDP2 also all-gathers one layer at a time (the same in every mode). ``torch.profiler``'s
  allocator records are not used here: under FSDP2 on gloo they do not balance (repeated identical backward passes
  gave peaks of 0.8 to 2.0 P).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODES = ("none", "sam", "gam_fast")
HIDDEN = {"full": (512,) * 8, "quick": (64, 64)}
IN_SHAPE = {"full": (2, 16, 16), "quick": (1, 8, 8)}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def measure(wrapper: str, mode: str, x, y, size: str) -> dict:
    """One case: the model wrapped (DDP) or sharded per Linear layer plus the root (FSDP2), two GAM steps; the
    bytes held after them and the buffers held across the second step's passes."""
    import torch
    import torch.nn.functional as F
    from _common import live_tensor_bytes
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from hf_gam.optim import GAM
    from hf_gam.testing import TinyMLP, TinyMLPConfig

    torch.manual_seed(0)
    model = TinyMLP(TinyMLPConfig(in_dim=x[0].numel(), hidden=HIDDEN[size], num_labels=10))
    if wrapper == "fsdp2":
        for layer in [model.fc1, *model.hidden_layers, model.fc2]:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        net = model
    else:
        net = DistributedDataParallel(model)
    opt = GAM(net.parameters(), torch.optim.AdamW, lr=1e-3, mode=mode, model=net)
    at_pass_starts: list[int] = []

    def closure():
        at_pass_starts.append(live_tensor_bytes())
        return F.cross_entropy(net(x).logits, y)

    opt.step(closure)  # optimizer state exists from here on
    gc.collect()  # earlier cases' models are garbage now
    params = list(model.parameters())
    # what is live before the step, less the previous step's gradients (freed or kept: counted if kept)
    before = live_tensor_bytes() - _tensor_bytes(_local(p.grad) for p in params if p.grad is not None)
    at_pass_starts.clear()
    opt.step(closure)
    state = [v for s in opt.base_optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"wrapper": wrapper, "mode": mode,
            "params": _tensor_bytes(_local(p) for p in params),
            "grads": _tensor_bytes(_local(p.grad) for p in params if p.grad is not None),
            "optimizer_state": _tensor_bytes(_local(v) for v in state),
            "full_params": sum(p.numel() * p.element_size() for p in params),
            "held_across_passes": max(at_pass_starts) - before, "passes": len(at_pass_starts)}


def worker(out: str, size: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, HERE)
    from hf_gam.cli.common import exit_process

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1 + rank)
    x, y = torch.randn(8, *IN_SHAPE[size], generator=g), torch.randint(0, 10, (8,), generator=g)
    rows = [{**measure(wrapper, mode, x, y, size), "rank": rank} for wrapper in ("ddp", "fsdp2") for mode in MODES]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        with open(out, "w") as f:
            json.dump([r for part in gathered for r in part], f)
    dist.barrier()
    exit_process(0)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def report(rows: list[dict], size: str) -> str:
    sys.path.insert(0, HERE)
    from _common import git_commit, machine_line

    rank0 = {(r["wrapper"], r["mode"]): r for r in rows if r["rank"] == 0}
    full = rank0[("ddp", "none")]["full_params"]
    lines = [
        "# Memory per process: FSDP2 (fully_shard) vs DDP, 2 CPU processes",
        "",
        f"`python benchmarks/fsdp_memory.py{' --quick' if size == 'quick' else ''}`; commit {git_commit()}; "
        f"{machine_line()} (each worker: 1 thread).",
        f"MLP {'x'.join(map(str, IN_SHAPE[size]))} -> {' -> '.join(map(str, HIDDEN[size]))} -> 10, {full / 4:,.0f} "
        f"float32 parameters ({_mib(full)} MiB), batch 8 per process, AdamW; FSDP2 shards per Linear layer plus the "
        "root. Rank 0's figures (rank 1's shards differ by the uneven split only).",
        "",
        "## Held between steps (gam_fast), MiB per process",
        "",
        "| wrapper | parameters | gradients | optimizer state | total | vs DDP |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ddp_total = None
    for wrapper in ("ddp", "fsdp2"):
        r = rank0[(wrapper, "gam_fast")]
        total = r["params"] + r["grads"] + r["optimizer_state"]
        ddp_total = ddp_total or total
        lines.append(f"| {wrapper.upper()} | {_mib(r['params'])} | {_mib(r['grads'])} | {_mib(r['optimizer_state'])} "
                     f"| {_mib(total)} | {total / ddp_total:.2f}x |")
    lines += ["", "## Buffers a mode holds across its passes, per process (most over the passes' starts; P: the "
              "whole model under DDP, the local shard under FSDP2)", "",
              "| mode | passes | DDP: buffers / P | DDP, MiB | FSDP2: buffers / P_shard | FSDP2, MiB |",
              "|---|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        ddp, fsdp = rank0[("ddp", mode)], rank0[("fsdp2", mode)]
        lines.append(f"| `{mode}` | {fsdp['passes']} | {ddp['held_across_passes'] / ddp['params']:.2f} | "
                     f"{_mib(ddp['held_across_passes'])} | {fsdp['held_across_passes'] / fsdp['params']:.2f} | "
                     f"{_mib(fsdp['held_across_passes'])} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small MLP (smoke test)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "fsdp_memory_cpu.md"))
    parser.add_argument("--json", default="")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = "quick" if args.quick else "full"
    if args.worker:
        worker(args.worker, size)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "rows.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, HERE])}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.abspath(__file__), "--worker", raw, *(["--quick"] if args.quick else [])]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(proc.stdout[-2000:] + proc.stderr[-4000:])
        with open(raw) as f:
            rows = json.load(f)
    text = report(rows, size)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return {"rows": rows, "text": text}


if __name__ == "__main__":
    main()
