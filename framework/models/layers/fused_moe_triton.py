"""A sparse MoE layer's experts as one Triton grouped GEMM per projection (CUDA; the CPU never imports it,
except the tests, which run it on Triton's interpreter).

The ``T·k`` (token, expert) pairs are sorted by expert and each expert's run is padded to a multiple of
``BLOCK_M`` (:func:`align_pairs_to_blocks`), so every tile of ``BLOCK_M`` sorted rows belongs to one
expert: a program loads that expert's weight tiles and multiplies them with up to ``BLOCK_M`` gathered
token rows. Padding rows name a pair past the last one and are masked off. Every shape is static (the
padded length is its worst case; programs past the real end return at once) and nothing is read back
to the host, so decode steps that run this can be captured as CUDA graphs.

Two launches, gate/up then down, with SiLU·mul between them; the down launch scales each pair's row by
its routing weight, and the ``k`` rows of a token are summed in torch afterwards, as the reference does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from pagedserve.models.layers.activation import SiluAndMul


@dataclass(frozen=True)
class GemmLaunch:
    block_m: int  # sorted pairs per tile; each expert's run is padded to a multiple of it
    block_n: int
    block_k: int
    warps: int
    stages: int


# Untuned first choices (no GPU was at hand): small tiles in M for decode-sized batches, where most
# experts get a pair or two, larger ones for prefills.
SMALL_LAUNCH = GemmLaunch(block_m=16, block_n=64, block_k=64, warps=4, stages=3)
LARGE_LAUNCH = GemmLaunch(block_m=64, block_n=64, block_k=64, warps=4, stages=3)
SMALL_MAX_PAIRS_PER_EXPERT = 16
_SILU_AND_MUL = SiluAndMul()  # stateless; the fused kernel of layers.fused


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@dataclass(frozen=True)
class PairBlocks:
    """The pairs sorted by expert and padded per expert to whole blocks of ``block_m``."""

    sorted_pairs: torch.Tensor  # [P] int32 pair index (token * k + slot); num_pairs marks padding
    block_experts: torch.Tensor  # [P / block_m] int32 the expert of each block
    num_padded: torch.Tensor  # [1] int64 rows in use; the blocks beyond it are idle


def align_pairs_to_blocks(ids: torch.Tensor, num_experts: int, block_m: int) -> PairBlocks:
    """``ids`` ``[T, k]`` → :class:`PairBlocks`, with tensor ops of static shapes only (no host sync)."""
    flat = ids.flatten().long()
    num_pairs = flat.numel()
    capacity = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    # a pair's rank in its expert's run, then its row in the padded layout
    rank = torch.arange(num_pairs, device=ids.device) - (counts.cumsum(0) - counts)[experts]
    rows = padded_end[experts] - padded[experts] + rank
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int32, device=ids.device)
    sorted_pairs[rows] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=ids.device)
    block_experts = torch.searchsorted(padded_end, block_starts, right=True)
    block_experts = block_experts.clamp_(max=num_experts - 1).to(torch.int32)
    return PairBlocks(sorted_pairs, block_experts, padded_end[-1:])


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    weights_ptr,
    sorted_pairs_ptr,
    block_experts_ptr,
    num_padded_ptr,
    num_pairs,
    N,
    stride_am,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    K: tl.constexpr,  # a model dimension: one compilation each for H and I
    A_ROWS_PER_PAIR: tl.constexpr,
    MUL_WEIGHTS: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``C[p] = A[p // A_ROWS_PER_PAIR] @ B[expert(p)]^T`` (times ``weights[p]`` with ``MUL_WEIGHTS``) for
    the ``BLOCK_M`` sorted pairs of this program's block and ``BLOCK_N`` of the ``N`` output columns.
    ``A_ROWS_PER_PAIR`` is ``k`` when ``A`` holds tokens (gate/up) and 1 when it holds pairs (down)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + offs_m)
    valid = pairs < num_pairs
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = (pairs // A_ROWS_PER_PAIR).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter multiplies 16-bit floats wrongly; their products are exact in fp32
            a, b = a.to(tl.float32), b.to(tl.float32)
        if IEEE:  # noqa: SIM108 - float32 operands: full-precision products, not TF32
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHTS:
        acc = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    blocks: PairBlocks,
    num_pairs: int,
    a_rows_per_pair: int,
    launch: GemmLaunch,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[num_pairs, N]``: each pair's row of ``a`` times its expert's ``b`` ``[E, N, K]`` transposed."""
    n, k = b.shape[1], b.shape[2]
    c = a.new_empty(num_pairs, n)
    if a.stride(-1) != 1:
        a = a.contiguous()
    grid = (blocks.sorted_pairs.numel() // launch.block_m, triton.cdiv(n, launch.block_n))
    _grouped_gemm_kernel[grid](
        a,
        b,
        c,
        c if weights is None else weights,  # any pointer; unread without MUL_WEIGHTS
        blocks.sorted_pairs,
        blocks.block_experts,
        blocks.num_padded,
        num_pairs,
        n,
        a.stride(0),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        c.stride(0),
        K=k,
        A_ROWS_PER_PAIR=a_rows_per_pair,
        MUL_WEIGHTS=weights is not None,
        IEEE=a.dtype == torch.float32 or _interpreting(),
        UPCAST=_interpreting(),
        BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n,
        BLOCK_K=launch.block_k,
        num_warps=launch.warps,
        num_stages=launch.stages,
    )
    return c


def choose_launch(num_pairs: int, num_experts: int) -> GemmLaunch:
    small = num_pairs <= SMALL_MAX_PAIRS_PER_EXPERT * num_experts
    return SMALL_LAUNCH if small else LARGE_LAUNCH


def fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Same contract as :func:`~pagedserve.models.layers.moe.fused_experts_reference`."""
    num_tokens, top_k = ids.shape
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return x.new_zeros(num_tokens, w2.shape[1])
    launch = choose_launch(num_pairs, w13.shape[0])
    blocks = align_pairs_to_blocks(ids, w13.shape[0], launch.block_m)
    gate_up = grouped_gemm(x, w13, blocks, num_pairs, top_k, launch)  # [T·k, 2I]
    hidden = _SILU_AND_MUL(gate_up)  # [T·k, I]
    flat_weights = weights.flatten().contiguous()
    out = grouped_gemm(hidden, w2, blocks, num_pairs, 1, launch, flat_weights)  # [T·k, H], weighted
    return out.view(num_tokens, top_k, -1).sum(dim=1)
