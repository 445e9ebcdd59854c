"""Sparse mixture of experts: a router picks ``top_k`` of ``E`` SwiGLU experts for each token, and the
token's output is the sum of those experts' outputs, each times its routing weight.

The experts' weights are stacked, ``w13`` ``[E, 2I, H]`` (each expert's gate rows, then its up rows)
and ``w2`` ``[E, H, I]``, so that one grouped GEMM serves every expert. On CUDA the experts run as the
Triton grouped GEMM of :mod:`~pagedserve.models.layers.fused_moe_triton`; elsewhere as
:func:`fused_experts_reference`. Routing is plain torch on every device, so both paths pick the same
experts. Checkpoints store one tensor per expert; :func:`expert_checkpoint_mapping` names them as shards
of ``w13``/``w2`` for the loader. Nothing here knows about a particular architecture.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pagedserve.models.parallel import all_reduce, divide, tp_rank, tp_world_size
from torch import nn

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T, E]`` logits → float32 weights ``[T, k]`` and expert ids ``[T, k]``, as transformers routes:
    a float32 softmax over all ``E`` experts, the ``k`` largest probabilities (``torch.topk``, so ties
    go the way transformers' do), then, with ``renormalize``, divided by their sum."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts_reference(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """``x`` ``[T, H]`` through experts ``ids`` ``[T, k]``, summed with ``weights`` ``[T, k]`` → ``[T, H]``.

    The ``T·k`` (token, expert) pairs are grouped by expert and each expert that has pairs runs one
    matmul over all of them. The weighted sum follows transformers: products in the promoted dtype of
    outputs and weights, summed over the ``k`` slots, rounded to ``x``'s dtype once."""
    num_tokens, top_k = ids.shape
    if num_tokens == 0:
        return x.new_zeros(0, w2.shape[1])
    flat_ids = ids.flatten()
    order = torch.argsort(flat_ids, stable=True)  # pair indices (token * k + slot), grouped by expert
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    out = x.new_empty(num_tokens * top_k, w2.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        gate, up = F.linear(x[pairs // top_k], w13[expert]).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        out[pairs] = F.linear(hidden, w2[expert])
        start += count
    weighted = out.view(num_tokens, top_k, -1) * weights.unsqueeze(-1)
    return weighted.sum(dim=1).to(x.dtype)


@functools.cache
def _triton_experts() -> ExpertsFn | None:
    try:
        from pagedserve.models.layers.fused_moe_triton import fused_experts
    except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
        return None
    return fused_experts


def fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """The Triton grouped GEMM on CUDA (no host sync, so decode steps can be CUDA graphs), else torch."""
    triton_fn = _triton_experts() if x.is_cuda else None
    return (triton_fn or fused_experts_reference)(x, w13, w2, weights, ids)


class GateLinear(nn.Module):
    """``x W^T`` in the model's dtype, the same on every rank: a router or a shared-expert gate. Small,
    and its outputs choose experts, so ``quantization=fp8`` leaves it alone (as vLLM does)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class ExpertGateUp(nn.Module):
    """Every expert's gate and up projections, ``weight`` ``[E, 2I, H]``; ranks split ``I``.
    Shard ``2e`` is expert ``e``'s gate matrix ``[I, H]``, shard ``2e + 1`` its up matrix."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.tp_rank = tp_rank()
        self.local_size = divide(intermediate_size, tp_world_size(), "expert intermediate size")
        self.weight = nn.Parameter(
            torch.empty(num_experts, 2 * self.local_size, hidden_size), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if not isinstance(shard_id, int):
            raise TypeError("expert weights load one expert's matrix at a time")
        expert, part = divmod(shard_id, 2)
        size = self.local_size
        param.data[expert].narrow(0, part * size, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class ExpertDown(nn.Module):
    """Every expert's down projection, ``weight`` ``[E, H, I]``; ranks split ``I`` (the sum over ranks
    is the MoE layer's all-reduce). Shard ``e`` is expert ``e``'s matrix ``[H, I]``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.tp_rank = tp_rank()
        self.local_size = divide(intermediate_size, tp_world_size(), "expert intermediate size")
        self.weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, self.local_size), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if not isinstance(shard_id, int):
            raise TypeError("expert weights load one expert's matrix at a time")
        size = self.local_size
        param.data[shard_id].copy_(loaded.narrow(1, self.tp_rank * size, size))


class SparseMoe(nn.Module):
    """Router + stacked SwiGLU experts. ``round_weights``: the routing weights are rounded to the
    activation dtype before they scale the experts' outputs (Qwen MoE does; Mixtral keeps float32)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        renormalize: bool,
        round_weights: bool,
    ) -> None:
        super().__init__()
        self.top_k, self.renormalize, self.round_weights = top_k, renormalize, round_weights
        self.gate = GateLinear(hidden_size, num_experts)
        self.w13 = ExpertGateUp(num_experts, hidden_size, intermediate_size)
        self.w2 = ExpertDown(num_experts, hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[T, H]`` → ``[T, H]``."""
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        if self.round_weights:
            weights = weights.to(x.dtype)
        return all_reduce(fused_experts(x, self.w13.weight, self.w2.weight, weights, ids))


def expert_checkpoint_mapping(
    num_experts: int, gate: str, up: str, down: str
) -> dict[str, tuple[str, str | int]]:
    """Checkpoint module names of each expert (``experts.3.gate_proj``) → ``w13``/``w2`` and the shard id
    their weight loaders take. Experts come first: the loader takes the first name that matches, and
    the dense ``gate_proj`` → ``gate_up_proj`` entry would also match ``experts.3.gate_proj``."""
    mapping: dict[str, tuple[str, str | int]] = {}
    for e in range(num_experts):
        mapping[f"experts.{e}.{gate}"] = ("w13", 2 * e)
        mapping[f"experts.{e}.{up}"] = ("w13", 2 * e + 1)
        mapping[f"experts.{e}.{down}"] = ("w2", e)
    return mapping
