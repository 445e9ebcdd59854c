"""RMSNorm, computed in float32 like the reference implementation the checkpoints were trained with.

``norm(x, residual)`` first adds ``x`` to the residual stream (rounded to the activation dtype, as
the reference does) and returns ``(normed, new_residual)``; on CUDA both happen in one fused kernel.
With ``quantize_output`` (set when the next layer is a float8 linear), ``normed`` is :class:`Fp8Rows`.
"""

from __future__ import annotations

import torch
from pagedserve.models.layers import fused
from pagedserve.models.layers.quantization import FP8_ROWS, Fp8Rows, quantize
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.quantize_output = False

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | Fp8Rows | tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
        if fused.enabled(x):
            if self.quantize_output:
                q, scale = fused.rms_norm(x, self.weight, self.eps, residual, FP8_ROWS)
                out: torch.Tensor | Fp8Rows = Fp8Rows(q, scale, x.dtype)
            else:
                out = fused.rms_norm(x, self.weight, self.eps, residual)  # updates residual in place
            return out if residual is None else (out, residual)
        if residual is not None:
            x = residual = x + residual
        out = self._norm(x)
        if self.quantize_output:
            out = quantize(out)
        return out if residual is None else (out, residual)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
