"""The one place that knows about processes: how many there are, the few collectives the step needs, and whether
the parameters are sharded.

Every question "is this a multi-process run" is :func:`world_size`; every reduction of gradients, losses and flags
over processes goes through :func:`all_reduce_` (one flattened collective per dtype) or
:func:`reached_on_any_process`.

FSDP2 (``fully_shard``): every parameter and gradient is a DTensor holding this process's shard. Whether parameters
are sharded is :func:`shard_layout` (nowhere else). The step's math then runs on the *local shards*
(:func:`local_views`: plain tensors sharing the parameters' storage, so in-place updates move the sharded weights and
the ``torch._foreach_*`` kernels run at plain-tensor speed instead of DTensor dispatch, about 0.13 ms per tensor and
op on a CPU); only scalars need the other shards: :func:`sum_over_shards` adds several partial sums in one
collective, and the norms and inner products of :mod:`hf_gam.core.functional` call it on DTensors, or on local
shards while :func:`summing_over_shards` is active (the step driver enters it).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["world_size", "all_reduce_", "reached_on_any_process", "average_grads_over_processes_", "ShardLayout",
           "is_sharded", "shard_layout", "local_view", "local_views", "sharded_like", "summing_over_shards",
           "active_shards", "sum_over_shards"]


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


# ------------------------------------------------------------------------------------------ FSDP2 (DTensor) shards
def _dtensor_type():
    """``DTensor`` if ``torch.distributed.tensor`` is loaded (nothing can be a DTensor otherwise): no import here."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor split over processes (an FSDP2 parameter or gradient)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor) and any(pl.is_shard() for pl in t.placements)


@dataclass(frozen=True)
class ShardLayout:
    """Where a model's shards live: the device mesh and the mesh dimensions the tensors are split over (FSDP2:
    dimension 0 of a 1-D mesh; HSDP: the shard dimension of a 2-D mesh, replicas on the other)."""

    mesh: object
    shard_dims: tuple[int, ...]

    def partial_placements(self) -> list:
        from torch.distributed.tensor import Partial, Replicate

        return [Partial() if i in self.shard_dims else Replicate() for i in range(self.mesh.ndim)]


def shard_layout(params: Sequence[Tensor]) -> ShardLayout | None:
    """The :class:`ShardLayout` of ``params`` when FSDP2 shards them, ``None`` when none is sharded. ``ValueError``
    when only some are (a module outside ``fully_shard``: its gradients would not be reduced) or when they are split
    over different meshes."""
    flags = [is_sharded(p) for p in params]
    if not any(flags):
        return None
    if not all(flags):
        raise ValueError(f"{flags.count(False)} of {len(flags)} trainable parameters are not sharded by fully_shard "
                         "while the others are; apply fully_shard to the root module too, so that every gradient is "
                         "reduced across processes")
    # every fully_shard call without a mesh builds its own (equal) default mesh: meshes compare by value
    layouts = {(p.device_mesh, tuple(i for i, pl in enumerate(p.placements) if pl.is_shard())) for p in params}
    if len(layouts) > 1:
        raise ValueError("the parameters are sharded over different device meshes or mesh dimensions; GAM and SAM "
                         "need one FSDP2 mesh for all of them")
    return ShardLayout(*next(iter(layouts)))


def local_view(t: Tensor) -> Tensor:
    """This process's shard of ``t`` as a plain tensor sharing its storage, outside autograd (``t`` itself when it is
    not sharded)."""
    return local_views([t])[0]


def local_views(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`local_view` of each (``to_local`` under no_grad: about 6 us a tensor, ``detach().to_local()`` 50)."""
    with torch.no_grad():
        return [t.to_local() if is_sharded(t) else t for t in tensors]


def sharded_like(local: Tensor, param: Tensor) -> Tensor:
    """``local`` (a shard laid out like ``param``'s) as a DTensor with ``param``'s mesh, placements, global shape
    and stride (uneven shards included): no copy, no communication; ``local`` itself when ``param`` is plain."""
    if not is_sharded(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


_ACTIVE_SHARDS: contextvars.ContextVar[ShardLayout | None] = contextvars.ContextVar("hf_gam_shards", default=None)


@contextlib.contextmanager
def summing_over_shards(layout: ShardLayout | None) -> Iterator[None]:
    """Inside, norms and inner products (:mod:`hf_gam.core.functional`) of plain tensors are taken as local shards
    of ``layout``: their partial sums are added over the shards. ``None``: nothing changes."""
    token = _ACTIVE_SHARDS.set(layout)
    try:
        yield
    finally:
        _ACTIVE_SHARDS.reset(token)


def active_shards() -> ShardLayout | None:
    """The layout :func:`summing_over_shards` made active, or ``None``."""
    return _ACTIVE_SHARDS.get()


def sum_over_shards(values: Tensor, layout: ShardLayout) -> Tensor:
    """``values`` (a vector of this process's partial sums) summed over the shards of ``layout``: one collective for
    all of them (per sharded mesh dimension; replicas are not added). A plain tensor, equal on every process."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(values, layout.mesh, layout.partial_placements(), run_check=False).full_tensor()
