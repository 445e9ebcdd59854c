"""Tensor-parallel process-group helpers. Without a process group the world size is 1.

Layers ask for their rank and world size here and call the collectives below, so the same layer code
runs unsharded (world size 1) and as one rank of ``engine.tensor_parallel_size`` (see
:mod:`pagedserve.engine.tensor_parallel`, which joins the group before the model is built).
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = timedelta(seconds=120)
"""How long a rank waits in one collective for the others. A rank that dies closes its sockets and
the others fail at once (gloo); this bound is for a rank that hangs, so a step never waits forever."""


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def tp_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def tp_world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def init_tensor_parallel(rank: int, world_size: int, store: dist.Store, device: torch.device) -> None:
    """Join the group: NCCL between GPUs (one per rank), gloo on the CPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )


def destroy_tensor_parallel() -> None:
    if _initialized():
        dist.destroy_process_group()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_world_size() > 1:
        dist.all_reduce(x)
    return x


def broadcast_from_first(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``x`` on every rank (in place)."""
    if tp_world_size() > 1:
        dist.broadcast(x, src=0)
    return x


def gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """The ranks' ``x`` joined along the last dimension, on rank 0 only (the sampler runs there);
    the other ranks get their own part back, which they do not use."""
    world = tp_world_size()
    if world == 1:
        return x
    x = x.contiguous()
    if tp_rank() != 0:
        dist.gather(x, None, dst=0)
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def kv_heads_per_rank(num_kv_heads: int, world_size: int) -> int:
    """Key/value heads each rank holds: a share of them, or one replicated head when there are more
    ranks than heads (as vLLM does; the ranks then split the query heads of each KV head)."""
    if world_size <= num_kv_heads:
        return divide(num_kv_heads, world_size, "key/value heads")
    if world_size % num_kv_heads:
        raise ValueError(
            f"the tensor-parallel size {world_size} is larger than the key/value heads ({num_kv_heads}) "
            f"and not a multiple of them, so the heads cannot be replicated evenly"
        )
    return 1


def kv_head_rank(num_kv_heads: int, world_size: int, rank: int) -> int:
    """Which share of the checkpoint's key/value heads ``rank`` holds (its index in units of
    :func:`kv_heads_per_rank`)."""
    if world_size <= num_kv_heads:
        return rank
    return rank // (world_size // num_kv_heads)
