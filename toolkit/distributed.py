"""What fitting and measuring need from ``torch.distributed``: who am I, which batches
are mine, and summing statistics over all processes.

Every statistic of the toolkit is a sum over samples, so running on several processes
(GPUs, machines) is: each process sums over its share of the batches, then the sums are
all-reduced. Launch with ``torchrun``; :func:`process_group` then starts the group (the
``toolkit`` command uses it), or call ``torch.distributed.init_process_group`` yourself.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import Tensor


@contextmanager
def process_group(device: torch.device):
    """Set up ``torch.distributed`` when the process was started by ``torchrun``.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in every process. Then
    the process group is initialised (NCCL when ``device`` is a GPU, else Gloo), a GPU
    process uses GPU number ``LOCAL_RANK``, and the group is destroyed at the end (unless
    it was initialised before). Without ``torchrun`` nothing is set up.

    Yields
    ------
    rank : int
    world : int
    device : torch.device
        ``device``, or this process's GPU.
    """
    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        yield 0, 1, device
        return
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        if owner:
            dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` when torch.distributed is initialised, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded(data) -> bool:
    """Whether ``data`` is a DataLoader whose sampler already gives each rank its share."""
    from torch.utils.data.distributed import DistributedSampler

    return isinstance(getattr(data, "sampler", None), DistributedSampler)


def own_batches(data: Iterable, rank: int, world: int, sharded: bool | None = None
                ) -> Iterator[tuple[int, object]]:
    """Yield ``(index, batch)`` of this rank's batches.

    With several ranks and data that is not sharded by a DistributedSampler (``sharded``
    defaults to :func:`is_sharded` of ``data``), batches are dealt round-robin: rank r
    takes batches r, r + world, r + 2 world, ...
    """
    deal = world > 1 and not (is_sharded(data) if sharded is None else sharded)
    for i, batch in enumerate(data):
        if not deal or i % world == rank:
            yield i, batch


def check_all_ranks_have_data(has_data: bool, device: torch.device) -> None:
    """Raise on every rank, instead of hanging in the all-reduce, if any rank got no batch."""
    import torch.distributed as dist

    flag = torch.tensor([1 if has_data else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if not int(flag):
        raise ValueError("a process got no batches: use fewer processes or more data "
                         "(every process needs at least one batch)")


def sum_over_ranks(tensors: Iterable[Tensor]) -> None:
    """All-reduce (sum) each tensor in place over all ranks."""
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_from_rank_0(t: Tensor) -> Tensor:
    """``t`` as rank 0 has it, on every rank (in place)."""
    import torch.distributed as dist

    dist.broadcast(t, src=0)
    return t
