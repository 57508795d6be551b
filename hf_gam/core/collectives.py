"""The one place that knows about processes: how many there are, and the few collectives the step needs.

Every question "is this a multi-process run" is :func:`world_size`; every reduction of gradients, losses and flags
over processes goes through :func:`all_reduce_` (one flattened collective per dtype) or
:func:`reached_on_any_process`.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["world_size", "all_reduce_", "reached_on_any_process", "average_grads_over_processes_"]


def world_size() -> int:
    """The number of processes of the default process group (1 without an initialized one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_(tensors: list[Tensor], mean: bool = False) -> None:
    """Sum (or average) ``tensors`` over all processes in place: one flattened collective per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = defaultdict(list)
    for t in tensors:
        by_dtype[t.dtype].append(t)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors(group)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if mean:
            flat /= dist.get_world_size()
        for t, r in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(r)


def reached_on_any_process(reached: list[bool], device: torch.device) -> list[bool]:
    """``reached`` or-ed over all processes (one tiny all-reduce in a multi-process run), so that every process
    writes and all-reduces the gradients of the same parameters."""
    if world_size() == 1:
        return list(reached)
    flags = torch.tensor(reached, dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(f) for f in flags.tolist()]


def average_grads_over_processes_(params: list[Tensor]) -> None:
    """Average ``p.grad`` over processes, as DDP would: every process all-reduces the same tensors (those with a
    gradient on any process; a missing one counts as zeros). Nothing to do in a one-process run."""
    if world_size() == 1:
        return
    present = reached_on_any_process([p.grad is not None for p in params], params[0].device)
    for p, r in zip(params, present):
        if r and p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_([p.grad for p, r in zip(params, present) if r], mean=True)
