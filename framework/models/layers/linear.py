"""Linear layers split Megatron-style across tensor-parallel ranks (world size 1 today).

Column-parallel layers split the output features (each rank computes a slice); row-parallel layers
split the input features and sum the partial products with an all-reduce. Each parameter carries a
``weight_loader`` that copies this rank's slice of a full checkpoint tensor into it; merged layers
(QKV, gate/up) take a ``shard_id`` saying which checkpoint tensor is being loaded. After loading,
:meth:`ParallelLinear.quantize_fp8_` may turn the weight into float8 (see ``quantization``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pagedserve.models.layers.quantization import fp8_linear, quantize_rows
from pagedserve.models.parallel import all_reduce, divide, tp_rank, tp_world_size
from torch import nn


class ParallelLinear(nn.Module):
    def __init__(self, out_features: int, in_features: int, bias: bool) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_world_size()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        self.weight_scale: torch.Tensor | None
        self.register_buffer("weight_scale", None)  # set by quantize_fp8_

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        param.data.copy_(loaded)

    def quantize_fp8_(self) -> None:
        """Replace the loaded weight by e4m3 with one scale per output feature (this rank's rows)."""
        weight, scale = quantize_rows(self.weight.data)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = scale.view(1, -1)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight_scale is None:
            return F.linear(x, self.weight, bias)
        return fp8_linear(x, self.weight, self.weight_scale, bias)


class ColumnParallelLinear(ParallelLinear):
    """``y = x W^T + b`` with W's rows (output features) split across ranks; output stays split."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(divide(out_features, tp_world_size(), "output features"), in_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (e.g. gate and up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int), "merged layers load one shard at a time"
        local = [divide(s, self.tp_size, "merged output features") for s in self.out_sizes]
        offset, size = sum(local[:shard_id]), local[shard_id]
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matmul; heads are split across ranks."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        world = tp_world_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, world, "attention heads")
        self.num_kv_heads = divide(num_kv_heads, world, "key/value heads")
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard_id]
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class RowParallelLinear(ParallelLinear):
    """``y = x W^T + b`` with W's columns (input features) split; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(out_features, divide(in_features, tp_world_size(), "input features"), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduction
            param.data.copy_(loaded)
            return
        size = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(self._matmul(x, None))
        return y if self.bias is None else y + self.bias
