"""Gated activations over a merged ``[gate | up]`` projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pagedserve.models.layers import fused
from pagedserve.models.layers.quantization import FP8_ROWS, Fp8Rows, quantize
from torch import nn


class SiluAndMul(nn.Module):
    """``silu(gate) * up``; with ``quantize_output`` (a float8 linear follows) as :class:`Fp8Rows`."""

    def __init__(self) -> None:
        super().__init__()
        self.quantize_output = False

    def forward(self, x: torch.Tensor) -> torch.Tensor | Fp8Rows:
        if fused.enabled(x):
            if self.quantize_output:
                return Fp8Rows(*fused.silu_and_mul(x, FP8_ROWS), x.dtype)
            return fused.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        out = F.silu(gate) * up
        return quantize(out) if self.quantize_output else out
