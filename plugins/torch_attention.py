"""The reference ``torch`` attention backend: plain PyTorch, any device, any block size.

K/V are gathered through the block table into a contiguous view per sequence, then attention is a
grouped matmul in float32 (query heads are folded as ``[Hkv, group]`` so K/V are never repeated).
Unused cache slots (past the context, or before a sliding window) are zeroed in the gathered copy, so
whatever they hold (even NaN) cannot leak into the result. A float8 cache is read back as ``q``'s
dtype. Every optimised backend is tested against this one.
"""

from __future__ import annotations

import torch
from pagedserve.engine.attention import AttentionBackend, kv_saturation_limit
from pagedserve.hookspecs import hookimpl


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    preference = -100  # the reference: ``kernel=auto`` takes it only when nothing faster fits
    supports_cuda_graphs = False  # reads context lengths on the host

    @classmethod
    def unsupported_reason(
        cls,
        head_dim: int,
        dtype: torch.dtype,
        block_size: int,
        device: torch.device,
        kv_cache_dtype: torch.dtype,
    ) -> str | None:
        for name, value in (("dtype", dtype), ("kv_cache_dtype", kv_cache_dtype)):
            if not value.is_floating_point:
                return f"{name} {value} is not a floating-point type"
        return None

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        # index_put_ rather than index_copy_: the latter has no float8 kernel on the CPU
        k_cache.view(-1, *k_cache.shape[2:]).index_put_((slots,), _to_cache(key[keep], k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_put_((slots,), _to_cache(value[keep], v_cache.dtype))

    def prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
        scale: float,
        *,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        starts, lens = cu_seqlens_q.tolist(), context_lens.tolist()
        for b, context_len in enumerate(lens):
            begin, end = starts[b], starts[b + 1]
            query_pos = torch.arange(context_len - (end - begin), context_len, device=q.device)
            first = 0 if sliding_window is None else max(0, int(query_pos[0]) - sliding_window + 1)
            first_keys = torch.full((1,), first, device=q.device)
            k, v = _gather(
                k_cache, v_cache, block_tables[b : b + 1], context_lens[b : b + 1], first_keys, q.dtype
            )
            key_pos = torch.arange(k.shape[1], device=q.device)[None, :]
            visible = key_pos <= query_pos[:, None]
            if sliding_window is not None:
                visible &= key_pos > query_pos[:, None] - sliding_window
            out[begin:end] = _attend(q[begin:end][None], k, v, visible[None], scale, softcap)[0]
        return out

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
        *,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        first_keys = torch.zeros_like(context_lens)
        if sliding_window is not None:
            first_keys = (context_lens - sliding_window).clamp_min(0)
        k, v = _gather(k_cache, v_cache, block_tables, context_lens, first_keys, q.dtype)
        visible = _valid_positions(context_lens, k.shape[1], sliding_window)  # [B, L]
        return _attend(q[:, None], k, v, visible[:, None, :], scale, softcap)[:, 0]


def _to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    limit = kv_saturation_limit(x.dtype, dtype)
    return (x if limit is None else x.clamp(-limit, limit)).to(dtype)


def _valid_positions(context_lens: torch.Tensor, length: int, window: int | None = None) -> torch.Tensor:
    """``[B, length]``: which cached positions the newest token of each sequence may read."""
    positions = torch.arange(length, device=context_lens.device)[None, :]
    valid = positions < context_lens[:, None]
    if window is not None:
        valid &= positions >= context_lens[:, None] - window
    return valid


def _gather(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    first_keys: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of each sequence as ``[B, L, Hkv, D]`` in ``dtype``, ``L`` covering the longest context.

    Positions before ``first_keys[b]`` (out of the sequence's window) are zero, like those past its
    context: their blocks may be freed (block-table entry -1) and reused by others. Blocks that no row
    needs are not even read."""
    block_size = k_cache.shape[1]
    num_blocks = -(-int(context_lens.max()) // block_size)
    skip = int(first_keys.min()) // block_size
    table = block_tables[:, skip:num_blocks].long()
    batch = table.shape[0]
    shape = (batch, num_blocks * block_size, *k_cache.shape[2:])
    k = torch.zeros(shape, dtype=dtype, device=k_cache.device)
    v = torch.zeros(shape, dtype=dtype, device=v_cache.device)
    # a freed block's entry is -1: read block 0 instead, the mask below zeroes it
    table = table.clamp_min(0)
    k[:, skip * block_size :] = k_cache[table].to(dtype).reshape(batch, -1, *k_cache.shape[2:])
    v[:, skip * block_size :] = v_cache[table].to(dtype).reshape(batch, -1, *v_cache.shape[2:])
    positions = torch.arange(k.shape[1], device=k.device)[None, :]
    invalid = (positions >= context_lens[:, None]) | (positions < first_keys[:, None])
    invalid = invalid[:, :, None, None]
    return k.masked_fill(invalid, 0.0), v.masked_fill(invalid, 0.0)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """q ``[B, S, Hq, D]``, k/v ``[B, L, Hkv, D]``, visible ``[B, S, L]`` → ``[B, S, Hq, D]``."""
    batch, num_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    qg = q.float().view(batch, num_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    kt = k.float().permute(0, 2, 3, 1)  # [B, Hkv, D, L]
    scores = (qg @ kt[:, :, None]) * scale  # [B, Hkv, G, S, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = probs @ v.float().permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, G, S, D]
    return out.permute(0, 3, 1, 2, 4).reshape(batch, num_q, num_heads, head_dim).to(q.dtype)


@hookimpl
def pagedserve_attention_backends() -> list[type[AttentionBackend]]:
    return [TorchAttentionBackend]
