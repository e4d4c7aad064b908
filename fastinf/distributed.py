"""Scale-out helpers over ``torch.distributed`` (any backend; tested with gloo on CPU).

When a process group is initialised (e.g. under ``torchrun``), fastinf splits work across ranks:

* ``EKFAC.fit``: batches are split strided (batch i goes to rank ``i % world``); covariance sums,
  token counts, Λ sums and example counts are all-reduced, so every rank ends with the same factors.
* ``GradientStore.build``: shard i is computed and written by rank ``i % world``; every rank records
  its finished shards in its own ``manifest.rank<r>.json`` and rank 0 merges them into
  ``manifest.json`` after a barrier.
* ``pairwise_scores`` / ``top_influences``: the train side (shards of a store, contiguous ranges of
  a dataset) is split across ranks and the results are gathered: **every rank returns the same,
  complete result**.

Without an initialised process group every helper is the single-process identity.
"""
from __future__ import annotations

from typing import Any, List

import torch


def enabled() -> bool:
    """True when ``torch.distributed`` is initialised with more than one rank."""
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if enabled() else 0


def world() -> int:
    return torch.distributed.get_world_size() if enabled() else 1


def barrier() -> None:
    if enabled():
        torch.distributed.barrier()


def _comm_device(x: torch.Tensor) -> torch.device:
    """gloo reduces CPU tensors only; nccl needs CUDA ones."""
    backend = torch.distributed.get_backend()
    return torch.device("cpu") if backend == "gloo" else x.device


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """In-place sum of ``x`` over ranks (identity without a process group)."""
    if not enabled():
        return x
    dev = _comm_device(x)
    y = x.to(dev)
    torch.distributed.all_reduce(y)
    if y is not x:
        x.copy_(y)
    return x


def all_reduce_int(v: int) -> int:
    if not enabled():
        return int(v)
    t = torch.tensor([int(v)], dtype=torch.int64)
    torch.distributed.all_reduce(t)
    return int(t.item())


def all_gather_object(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without a process group)."""
    if not enabled():
        return [obj]
    out: List[Any] = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


def mine(i: int) -> bool:
    """Whether work item ``i`` (a batch, a shard) belongs to this rank (strided split)."""
    return i % world() == rank()
