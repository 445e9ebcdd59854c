"""Gated activations over a merged ``[gate | up]`` projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pagedserve.models.layers import fused
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.enabled(x):
            return fused.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
