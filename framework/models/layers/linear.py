"""Linear layers split Megatron-style across tensor-parallel ranks (world size 1 today).

Column-parallel layers split the output features (each rank computes a slice); row-parallel layers
split the input features and sum the partial products with an all-reduce. Each parameter carries a
``weight_loader`` that copies this rank's slice of a full checkpoint tensor into it; merged layers
(QKV, gate/up) take a ``shard_id`` saying which checkpoint tensor is being loaded, and
:meth:`ParallelLinear.output_slot` says where its output rows go. After loading,
:meth:`ParallelLinear.quantize_fp8_` may turn the weight into float8 (see ``quantization``); a layer
built for a float8 checkpoint (``quantization.building_for``) has e4m3 weights and the checkpoint's
scales from the start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pagedserve.models.layers.quantization import (
    FP8,
    checkpoint_being_built,
    fp8_block_linear,
    fp8_linear,
    quantize_rows,
)
from pagedserve.models.parallel import (
    all_reduce,
    divide,
    kv_head_rank,
    kv_heads_per_rank,
    tp_rank,
    tp_world_size,
)
from torch import nn


class ParallelLinear(nn.Module):
    splits_input = False  # row-parallel: each rank holds a slice of the input features

    def __init__(self, out_features: int, in_features: int, bias: bool) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_world_size()
        checkpoint = checkpoint_being_built()
        dtype = None if checkpoint is None else FP8
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        self.block_size = None if checkpoint is None else checkpoint.block_size
        self.weight_scale: torch.Tensor | None
        if checkpoint is None:
            self.register_buffer("weight_scale", None)  # set by quantize_fp8_
        else:
            self.weight_scale = nn.Parameter(torch.empty(self._scale_shape()), requires_grad=False)
            self.weight_scale.weight_loader = self.weight_loader
        # block-scaled weights: each block of input features' scale of each output feature [K/bk, N]
        self.column_scales: torch.Tensor | None
        self.register_buffer("column_scales", None, persistent=False)

    def _scale_shape(self) -> tuple[int, int]:
        out_features, in_features = self.weight.shape
        if self.block_size is None:
            return 1, out_features
        block_n, block_k = self.block_size
        return -(-out_features // block_n), -(-in_features // block_k)

    def output_slot(self, shard_id: object) -> tuple[int, int]:
        """Offset and size, in this rank's output rows, of the checkpoint tensor ``shard_id``."""
        return 0, self.weight.shape[0]

    def fused_shards(self) -> list[tuple[object, int]]:
        """A merged layer's shards and their full sizes, in the order a fused checkpoint tensor
        (Phi-3's ``qkv_proj``, ``gate_up_proj``) stacks them; empty for a plain layer."""
        return []

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None and self.fused_shards():
            self._load_fused(param, loaded)
            return
        offset, size = self.output_slot(shard_id)
        if param is self.weight_scale:
            self._load_scale(loaded, offset, size, shard_id)
        elif param is self.weight and param.dtype == FP8 and loaded.dtype != FP8:
            self._load_unquantized(loaded, offset, size, shard_id)
        else:
            param.data.narrow(0, offset, size).copy_(self._this_rank(loaded, size, shard_id))

    def _load_fused(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Split a fused checkpoint tensor into its shards, so each rank takes its slice of each."""
        total = sum(full for _, full in self.fused_shards())
        if param is not self.weight_scale and loaded.shape[0] != total:
            raise ValueError(f"a fused tensor of {loaded.shape[0]} rows for shards of {total} rows")
        start = 0
        for shard_id, full in self.fused_shards():
            if param is self.weight_scale and loaded.numel() == 1:
                piece = loaded  # one scale for the fused tensor: each shard's too
            elif param is self.weight_scale and self.block_size is not None:
                block_n = self.block_size[0]
                if start % block_n:
                    raise ValueError(f"a shard starts at row {start}, inside a {block_n}-row scale block")
                piece = loaded.narrow(0, start // block_n, -(-full // block_n))
            else:
                piece = loaded.narrow(0, start, full)
            self.weight_loader(param, piece, shard_id)
            start += full

    def output_part(self, shard_id: object) -> tuple[int, int]:
        """Which part of checkpoint tensor ``shard_id``'s output rows this rank holds, and of how many
        equal parts (a key/value head replicated over several ranks is one part for all of them)."""
        return self.tp_rank, self.tp_size

    def _this_rank(self, loaded: torch.Tensor, rows: int, shard_id: object = None) -> torch.Tensor:
        """This rank's part of a full checkpoint tensor whose ``rows`` output rows go to this rank."""
        if not self.splits_input:
            return loaded.narrow(0, self.output_part(shard_id)[0] * rows, rows)
        if loaded.dim() == 1:  # a bias (added once, after the reduction) or per-row scales
            return loaded
        cols = self.weight.shape[1]
        return loaded.narrow(1, self.tp_rank * cols, cols)

    def _load_scale(self, loaded: torch.Tensor, offset: int, size: int, shard_id: object) -> None:
        loaded = loaded.float()
        if self.block_size is not None:
            self._load_block_scales(loaded, offset, size, shard_id)
        elif loaded.numel() == 1:  # one scale per tensor: the same for each of its rows
            self.weight_scale.data.view(-1).narrow(0, offset, size).fill_(loaded.item())
        elif loaded.numel() == size * (1 if self.splits_input else self.output_part(shard_id)[1]):
            rows = self._this_rank(loaded.reshape(-1), size, shard_id)  # one per output feature
            self.weight_scale.data.view(-1).narrow(0, offset, size).copy_(rows)
        else:
            raise ValueError(
                f"{loaded.numel()} scales for {size} output features: expected one per tensor or one "
                f"per output feature"
            )

    def _load_block_scales(self, loaded: torch.Tensor, offset: int, size: int, shard_id: object) -> None:
        block_n = self.block_size[0]
        if offset % block_n or loaded.dim() != 2:
            raise ValueError(
                f"block scales of shape {list(loaded.shape)} at output row {offset} do not fit "
                f"weight_block_size {list(self.block_size)} (each merged tensor must start on a block)"
            )
        blocks = -(-size // block_n)
        if self.splits_input:
            cols = self.weight_scale.shape[1]
            part = loaded.narrow(1, self.tp_rank * cols, cols)
        else:
            part = loaded.narrow(0, self.output_part(shard_id)[0] * blocks, blocks)
        self.weight_scale.data.narrow(0, offset // block_n, blocks).copy_(part)

    def _load_unquantized(self, loaded: torch.Tensor, offset: int, size: int, shard_id: object) -> None:
        """A layer the checkpoint left in full precision (its ``ignore`` list): quantized per row."""
        if self.block_size is not None:
            raise ValueError("a full-precision weight in a block-scaled float8 checkpoint is not supported")
        weight, scale = quantize_rows(self._this_rank(loaded, size, shard_id).float())
        self.weight.data.narrow(0, offset, size).copy_(weight)
        self.weight_scale.data.view(-1).narrow(0, offset, size).copy_(scale.view(-1))

    def quantize_fp8_(self) -> None:
        """Replace the loaded weight by e4m3 with one scale per output feature (this rank's rows).
        A layer loaded from a float8 checkpoint keeps its weight and scales."""
        if self.weight.dtype == FP8:
            if self.block_size is not None:
                block_n = self.block_size[0]
                expanded = self.weight_scale.repeat_interleave(block_n, dim=0)[: self.weight.shape[0]]
                self.column_scales = expanded.t().contiguous()
            return
        weight, scale = quantize_rows(self.weight.data)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = scale.view(1, -1)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight_scale is None:
            return F.linear(x, self.weight, bias)
        if self.block_size is not None:
            return fp8_block_linear(x, self.weight, self.column_scales, self.block_size[1], bias)
        return fp8_linear(x, self.weight, self.weight_scale, bias)


class ColumnParallelLinear(ParallelLinear):
    """``y = x W^T + b`` with W's rows (output features) split across ranks; output stays split."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(divide(out_features, tp_world_size(), "output features"), in_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (e.g. gate and up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def output_slot(self, shard_id: object) -> tuple[int, int]:
        assert isinstance(shard_id, int), "merged layers load one shard at a time"
        local = [divide(s, self.tp_size, "merged output features") for s in self.out_sizes]
        return sum(local[:shard_id]), local[shard_id]

    def fused_shards(self) -> list[tuple[object, int]]:
        return list(enumerate(self.out_sizes))


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matmul; heads are split across ranks."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        world = tp_world_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, world, "attention heads")
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, world)
        self.total_kv_heads = num_kv_heads
        # Each rank's rows are its query heads and its (possibly replicated) key/value heads.
        rows = (self.num_heads + 2 * self.num_kv_heads) * world * head_dim
        super().__init__(hidden_size, rows, bias)

    def output_slot(self, shard_id: object) -> tuple[int, int]:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        return {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard_id]

    def output_part(self, shard_id: object) -> tuple[int, int]:
        if shard_id not in ("k", "v"):
            return super().output_part(shard_id)
        parts = self.total_kv_heads // self.num_kv_heads
        return kv_head_rank(self.total_kv_heads, self.tp_size, self.tp_rank), parts

    def fused_shards(self) -> list[tuple[object, int]]:
        q_size = self.num_heads * self.tp_size * self.head_dim
        kv_size = self.total_kv_heads * self.head_dim
        return [("q", q_size), ("k", kv_size), ("v", kv_size)]


class RowParallelLinear(ParallelLinear):
    """``y = x W^T + b`` with W's columns (input features) split; partial sums are all-reduced."""

    splits_input = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(out_features, divide(in_features, tp_world_size(), "input features"), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(self._matmul(x, None))
        return y if self.bias is None else y + self.bias
