"""Rotary position embedding (GPT-NeoX "rotate half" layout) with ``default``, ``linear`` and
``llama3`` frequency scaling."""

from __future__ import annotations

import math

import torch
from pagedserve.models.hf_config import RopeConfig
from pagedserve.models.layers import fused
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inverse_frequencies(rope: RopeConfig, rotary_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.type == "default":
        return inv_freq
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    raise NotImplementedError(f"rope type {rope.type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept, and the band in
    # between is interpolated, so local word order is unchanged while the context grows.
    if rope.original_max_position_embeddings is None:
        raise ValueError("rope type llama3 needs original_max_position_embeddings in the config")
    old_len = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / rope.low_freq_factor, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    interpolated = (1 - smooth) * scaled / rope.factor + smooth * scaled
    in_band = (wavelen >= old_len / rope.high_freq_factor) & (wavelen <= old_len / rope.low_freq_factor)
    return torch.where(in_band, interpolated, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, rope: RopeConfig) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(rope, head_dim)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)  # [max_position, head_dim/2]
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` ``[T, Hq, D]``, ``k`` ``[T, Hkv, D]`` rotated by their token positions ``[T]``.

        On CUDA ``q`` and ``k`` are rotated in place (one fused kernel) and returned.
        """
        half = self.cos_cache.shape[1]
        if fused.enabled(q) and half & (half - 1) == 0 and q.stride(-1) == 1 and k.stride(-1) == 1:
            fused.rotary_(positions, q, k, self.cos_cache, self.sin_cache)
            return q, k
        cos = self.cos_cache[positions][:, None, :]
        sin = self.sin_cache[positions][:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
