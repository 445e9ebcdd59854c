"""Tensor-parallel process-group helpers. With no process group (today) the world size is 1.

Layers ask for their rank and world size here and call the collectives below, so adding tensor
parallelism means initialising ``torch.distributed``, not rewriting layers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def tp_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def tp_world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_world_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    world = tp_world_size()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator
