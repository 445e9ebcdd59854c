"""Float8 weights for the linear layers (``engine.quantization=fp8``), quantized when the model loads.

Each weight row (output feature) gets its own scale, ``max|row| / 448``, and is stored in e4m3: half
the bytes of bf16, so decode steps read half the weights, and Hopper's float8 tensor cores do twice
the bf16 multiply rate. Activations are quantized the same way per token (per row of the input) just
before each matmul, so one outlier token does not flatten the others' resolution and a token's result
does not depend on what else is in the batch (up to the matmul's summation order, which varies with
the row count in the last bits). ``torch._scaled_mm`` multiplies the float8 operands and
applies both scales in its epilogue. The embedding and the LM head keep the model dtype, as vLLM's
``fp8`` quantization does: the head is one matmul per sampled token and its logits pick the tokens.

A layer whose output only feeds quantized linears (the norms before q/k/v and gate/up, SiLU·mul
before down) can write :class:`Fp8Rows` itself, in the same kernel, instead of a bf16 tensor that a
separate pass would read back to quantize.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pagedserve.models.layers import fused

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# Floor for a row's scale: an all-zero row (padding) then quantizes to zeros instead of 0/0.
MIN_SCALE = 1e-12
FP8_ROWS = fused.Quantize(FP8, MIN_SCALE)


class Fp8Rows(NamedTuple):
    """A ``[M, K]`` activation of ``dtype`` already quantized: ``q * scale`` row by row."""

    q: torch.Tensor  # [M, K] e4m3
    scale: torch.Tensor  # [M, 1] float32
    dtype: torch.dtype  # the activation's own dtype, which the matmul writes


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, K]`` → e4m3 ``[M, K]`` and float32 scales ``[M, 1]`` with ``x ≈ q * scale`` row by row."""
    if fused.enabled(x):
        return fused.quantize_rows(x, FP8_ROWS)
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize(x: torch.Tensor) -> Fp8Rows:
    return Fp8Rows(*quantize_rows(x), x.dtype)


def fp8_linear(
    x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x W^T + b`` with ``W`` in e4m3 (``[N, K]``, scales ``[1, N]``) and ``x`` quantized per token."""
    rows = x if isinstance(x, Fp8Rows) else quantize(x.reshape(-1, x.shape[-1]))
    # On CUDA, row-wise scaled float8 matmuls write bfloat16 only; the CPU kernel writes any dtype.
    out_dtype = torch.bfloat16 if rows.q.is_cuda else rows.dtype
    if rows.q.shape[0] == 0:
        y = torch.empty((0, weight.shape[0]), dtype=rows.dtype, device=rows.q.device)
    else:
        y = torch._scaled_mm(
            rows.q, weight.t(), scale_a=rows.scale, scale_b=weight_scale, out_dtype=out_dtype
        ).to(rows.dtype)
    if bias is not None:
        y = y + bias
    return y if isinstance(x, Fp8Rows) else y.reshape(*x.shape[:-1], weight.shape[0])
