"""The model-side attention layer: stores this step's K/V and calls the selected backend.

The runner assigns ``backend``, ``k_cache`` and ``v_cache`` after it allocates the KV cache; the
per-step batch layout comes from the current :class:`~pagedserve.engine.attention.AttentionMetadata`.
"""

from __future__ import annotations

import torch
from pagedserve.engine.attention import AttentionBackend, AttentionMetadata, current_metadata
from torch import nn


class Attention(nn.Module):
    """One layer's paged attention. ``sliding_window`` and ``softcap`` are this layer's own (Gemma mixes
    windowed and global layers); their meaning is in :mod:`pagedserve.engine.attention`."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        scale: float,
        *,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("sliding_window", sliding_window), ("softcap", softcap)):
            if value is not None and value <= 0:
                raise ValueError(f"attention {name} must be positive or unset, got {value}")
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.backend: AttentionBackend | None = None
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` ``[T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` → ``[T, Hq, D]``."""
        backend, md = self.backend, current_metadata()
        if backend is None:
            raise RuntimeError("no attention backend was attached to the model (runner not set up)")
        backend.store_kv(k, v, self.k_cache, self.v_cache, md.slot_mapping)
        num_decode = md.num_decode_tokens
        if md.num_prefills == 0:
            return self._decode(q, md)
        if num_decode == 0:
            return self._prefill(q, md)
        out = torch.empty_like(q)
        out[:num_decode] = self._decode(q[:num_decode], md)
        out[num_decode:] = self._prefill(q[num_decode:], md)
        return out

    def _decode(self, q: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        return self.backend.decode(
            q,
            self.k_cache,
            self.v_cache,
            md.decode_block_tables,
            md.decode_context_lens,
            self.scale,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
        )

    def _prefill(self, q: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        return self.backend.prefill(
            q,
            self.k_cache,
            self.v_cache,
            md.prefill_cu_seqlens_q,
            md.prefill_context_lens,
            md.prefill_block_tables,
            self.scale,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
        )
