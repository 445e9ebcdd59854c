"""Fused elementwise kernels in the Triton language: residual add + RMSNorm, SiLU·mul, rotary, and
the per-row float8 quantization of a linear layer's input.

Each replaces a chain of PyTorch ops that would read and write the activations several times (the
float32 RMSNorm alone is about six passes) with one pass, and rounds where the PyTorch code rounds,
so results match it to the last bit in most elements. The layers call these on CUDA tensors when
``triton`` imports; everywhere else (CPU, no triton) they keep their plain PyTorch code. Nothing
here knows about the model.

``TRITON_INTERPRET=1`` set before ``triton`` is first imported runs the kernels on the CPU
interpreter (the tests do that, in a child process); :func:`enabled` then also accepts CPU tensors.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=1)
def _disabled_by_env() -> bool:
    return os.environ.get("PAGEDSERVE_FUSED", "1") == "0"


def enabled(x: torch.Tensor) -> bool:
    """Whether the fused kernels serve ``x`` (``PAGEDSERVE_FUSED=0`` turns them off, for A/B runs)."""
    if triton is None or _disabled_by_env():
        return False
    return x.is_cuda or (_interpreting() and x.device.type == "cpu")


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        residual_ptr,
        weight_ptr,
        out_ptr,
        scale_ptr,
        stride_x,
        stride_r,
        stride_o,
        n_cols,
        eps,
        qmax,
        min_scale,
        HAS_RESIDUAL: tl.constexpr,
        QUANTIZE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One row: ``s = x (+ residual)`` rounded to the input dtype (stored back to ``residual``),
        then ``weight * (s / rms(s))`` with the normalised value rounded before the weight multiply.
        ``QUANTIZE``: the result, rounded to the input dtype, is stored quantized
        (``_store_quantized_row``)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
            tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
        normed = (x32 * rstd).to(x.dtype).to(tl.float32)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if QUANTIZE:
            y = (normed * w).to(x.dtype).to(tl.float32)
            _store_quantized_row(y, out_ptr + row * stride_o + cols, scale_ptr + row, mask, qmax, min_scale)
        else:
            tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
        """``silu(gate) * up`` for one tile of one row of ``[gate | up]``, rounding like PyTorch
        (silu's result, then the product)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)

    @triton.jit
    def _rotary_kernel(
        q_ptr,
        k_ptr,
        positions_ptr,
        cos_ptr,
        sin_ptr,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        num_q_heads,
        num_k_heads,
        HALF: tl.constexpr,
        Q_HEADS: tl.constexpr,
        K_HEADS: tl.constexpr,
    ):
        """Rotate every head of one token's ``q`` and ``k`` in place ("rotate half" layout, float32)."""
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(positions_ptr + t).to(tl.int64)
        dims = tl.arange(0, HALF)
        cos = tl.load(cos_ptr + pos * HALF + dims)[None, :]
        sin = tl.load(sin_ptr + pos * HALF + dims)[None, :]

        _rotate_heads(q_ptr + t * stride_qt, stride_qh, num_q_heads, dims, cos, sin, HALF, Q_HEADS)
        _rotate_heads(k_ptr + t * stride_kt, stride_kh, num_k_heads, dims, cos, sin, HALF, K_HEADS)

    @triton.jit
    def _rotate_heads(
        token_ptr, stride_h, num_heads, dims, cos, sin, HALF: tl.constexpr, HEADS: tl.constexpr
    ):
        """Rotate one token's first ``num_heads`` heads (``HEADS``: that, rounded up to a power of 2)."""
        heads = tl.arange(0, HEADS)[:, None]
        mask = heads < num_heads
        base = token_ptr + heads * stride_h + dims[None, :]
        x1 = tl.load(base, mask=mask, other=0.0)
        x2 = tl.load(base + HALF, mask=mask, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        tl.store(base, (a * cos - b * sin).to(x1.dtype), mask=mask)
        tl.store(base + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)

    @triton.jit
    def _store_quantized_row(y, q_ptrs, scale_ptr, mask, qmax, min_scale):
        """``scale = max|y| / qmax`` (at least ``min_scale``) and ``q = y / scale`` saturated; ``y``
        is one whole row in float32, zero where masked."""
        scale = tl.maximum(tl.max(tl.abs(y), axis=0) / qmax, min_scale)
        q = tl.clamp(y / scale, -qmax, qmax)
        tl.store(q_ptrs, q.to(q_ptrs.dtype.element_ty), mask=mask)
        tl.store(scale_ptr, scale)

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr, q_ptr, scale_ptr, stride_x, stride_q, n_cols, qmax, min_scale, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        _store_quantized_row(x, q_ptr + row * stride_q + cols, scale_ptr + row, mask, qmax, min_scale)

    @triton.jit
    def _silu_and_mul_quantized_kernel(
        x_ptr, q_ptr, scale_ptr, stride_x, stride_q, n_cols, qmax, min_scale, BLOCK: tl.constexpr
    ):
        """``silu(gate) * up`` of one whole row, rounded like the plain kernel, then quantized."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
        y = (act * up.to(tl.float32)).to(gate.dtype).to(tl.float32)
        _store_quantized_row(y, q_ptr + row * stride_q + cols, scale_ptr + row, mask, qmax, min_scale)


def _row_warps(block: int) -> int:
    return max(1, min(16, block // 256))


class Quantize(NamedTuple):
    """Ask a kernel to write its rows quantized: ``q = row / scale`` in ``dtype``, one float32 scale
    per row (``max|row| / dtype's largest value``, at least ``min_scale``)."""

    dtype: torch.dtype
    min_scale: float


def _quantized_outputs(
    rows: int, cols: int, quantize: Quantize, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    # Triton 3.6's interpreter rounds float32 -> float8 without carrying into the exponent (a value
    # that rounds up to a power of two comes out halved); there the kernels write float32 and
    # PyTorch rounds. Compiled kernels round with the hardware's cvt.rn.satfinite.
    interpreted = device.type != "cuda"
    q = torch.empty((rows, cols), dtype=torch.float32 if interpreted else quantize.dtype, device=device)
    return q, torch.empty((rows, 1), dtype=torch.float32, device=device), interpreted


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    quantize: Quantize | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * rmsnorm(x + residual)``; with ``residual`` the sum is also written into it. With
    ``quantize``, the rows ``(q, scale)`` of the result instead (``x`` is 2-D then)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, cols = x2.shape
    if quantize is None:
        out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        scale, qmax, min_scale = out, 0.0, 0.0  # unused without QUANTIZE
    else:
        out, scale, interpreted = _quantized_outputs(rows, cols, quantize, x.device)
        qmax, min_scale = torch.finfo(quantize.dtype).max, quantize.min_scale
    r2 = x2 if residual is None else residual.view(-1, cols)
    block = _pow2(cols)
    if rows:
        _rms_norm_kernel[(rows,)](
            x2,
            r2,
            weight,
            out,
            scale,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            cols,
            eps,
            qmax,
            min_scale,
            HAS_RESIDUAL=residual is not None,
            QUANTIZE=quantize is not None,
            BLOCK=block,
            num_warps=_row_warps(block),
        )
    if quantize is None:
        return out.view(x.shape)
    return (out.to(quantize.dtype) if interpreted else out), scale


def silu_and_mul(
    x: torch.Tensor, quantize: Quantize | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``[T, 2I]`` → ``[T, I]``: ``silu(x[:, :I]) * x[:, I:]``; with ``quantize``, its rows ``(q, scale)``."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, cols = x.shape[0], x.shape[1] // 2
    if quantize is not None:
        return _run_quantizing(_silu_and_mul_quantized_kernel, x, rows, cols, quantize)
    out = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block = min(1024, _pow2(cols))
    _silu_and_mul_kernel[(rows, triton.cdiv(cols, block))](
        x, out, x.stride(0), out.stride(0), cols, BLOCK=block, num_warps=4
    )
    return out


def rotary_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotate ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]`` in place; ``cos``/``sin`` ``[P, D/2]`` float32."""
    tokens, num_q, head_dim = q.shape
    if tokens == 0:
        return
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary_ needs a unit stride on head_dim")
    _rotary_kernel[(tokens,)](
        q,
        k,
        positions,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        num_q,
        k.shape[1],
        HALF=head_dim // 2,
        Q_HEADS=_pow2(num_q),
        K_HEADS=_pow2(k.shape[1]),
        num_warps=4,
    )


def quantize_rows(x: torch.Tensor, quantize: Quantize) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, K]`` → ``(q [M, K], scale [M, 1])``, one pass over ``x``."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _run_quantizing(_quantize_rows_kernel, x, x.shape[0], x.shape[1], quantize)


def _run_quantizing(
    kernel: object, x: torch.Tensor, rows: int, cols: int, quantize: Quantize
) -> tuple[torch.Tensor, torch.Tensor]:
    """One program per row of ``x`` writing ``cols`` quantized values and the row's scale."""
    q, scale, interpreted = _quantized_outputs(rows, cols, quantize, x.device)
    block = _pow2(cols)
    if rows:
        kernel[(rows,)](  # type: ignore[index]
            x,
            q,
            scale,
            x.stride(0),
            q.stride(0),
            cols,
            torch.finfo(quantize.dtype).max,
            quantize.min_scale,
            BLOCK=block,
            num_warps=_row_warps(block),
        )
    return (q.to(quantize.dtype) if interpreted else q), scale
