"""RMSNorm, computed in float32 like the reference implementation the checkpoints were trained with.

``norm(x, residual)`` first adds ``x`` to the residual stream (rounded to the activation dtype, as
the reference does) and returns ``(normed, new_residual)``; on CUDA both happen in one fused kernel.
"""

from __future__ import annotations

import torch
from pagedserve.models.layers import fused
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if fused.enabled(x):
            out = fused.rms_norm(x, self.weight, self.eps, residual)  # updates residual in place
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
