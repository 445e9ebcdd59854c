"""Rotary position embedding (GPT-NeoX "rotate half" layout) with the frequency scalings of Hugging
Face configs: ``default``, ``linear``, ``llama3``, ``dynamic`` (NTK), ``yarn`` and ``longrope``.

The frequencies are computed as transformers' ``modeling_rope_utils`` computes them, in the same
float32 operations, so a model matches transformers token for token. Two types depend on the sequence
length there, and a paged engine must fix them once instead, because the keys of every cached block
were rotated when they were written and a prefix-cache block is shared by sequences of any length:

* ``dynamic`` computes its NTK base for the length the rotary cache covers (the model's
  ``max_position_embeddings``), as vLLM computes it for one fixed length. transformers scales only
  once a sequence grows past ``max_position_embeddings`` (below it, the base is unchanged), so within
  the model's context the two agree exactly; beyond it (which ``max_model_len`` does not allow today)
  transformers recomputes the base at every step from the current length and keeps earlier keys
  rotated with earlier bases.
* ``longrope`` takes the long factors for every position when the engine's context (``max_model_len``)
  is longer than ``original_max_position_embeddings``, and the short ones otherwise, as vLLM does.
  transformers uses the short factors while the whole sequence fits in the original window and,
  at the first step past it, drops its KV cache and recomputes everything with the long factors; so
  the two agree exactly for sequences that stay within the window when ``max_model_len`` does too,
  and for prompts longer than the window otherwise.

``partial_rotary_factor`` rotates only the first ``int(head_dim * factor)`` dimensions of each head.
"""

from __future__ import annotations

import math

import torch
from pagedserve.models.hf_config import RopeConfig
from pagedserve.models.layers import fused
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")


def rotary_dim(rope: RopeConfig, head_dim: int) -> int:
    return int(head_dim * rope.partial_rotary_factor)


def inverse_frequencies(rope: RopeConfig, dim: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """The ``dim / 2`` inverse frequencies and the factor cos and sin are multiplied by (yarn's and
    longrope's attention factor, 1 otherwise). ``seq_len`` is the length ``dynamic`` and ``longrope``
    scale for (default: ``max_position_embeddings``)."""
    seq_len = rope.max_position_embeddings if seq_len is None else seq_len
    if rope.type == "default":
        return _base_frequencies(rope.theta, dim), 1.0
    if rope.type == "linear":
        return _base_frequencies(rope.theta, dim) / rope.factor, 1.0
    if rope.type == "llama3":
        return _llama3_scaled(_base_frequencies(rope.theta, dim), rope), 1.0
    if rope.type == "dynamic":
        return _dynamic_ntk(rope, dim, seq_len), 1.0
    if rope.type == "yarn":
        return _yarn(rope, dim)
    if rope.type == "longrope":
        return _longrope(rope, dim, seq_len)
    raise ValueError(f"rope type {rope.type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}")


def _base_frequencies(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept, and the band in
    # between is interpolated, so local word order is unchanged while the context grows.
    old_len = _original_len(rope)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / rope.low_freq_factor, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    interpolated = (1 - smooth) * scaled / rope.factor + smooth * scaled
    in_band = (wavelen >= old_len / rope.high_freq_factor) & (wavelen <= old_len / rope.low_freq_factor)
    return torch.where(in_band, interpolated, scaled)


def _dynamic_ntk(rope: RopeConfig, dim: int, seq_len: int) -> torch.Tensor:
    # NTK-aware: raise the base so the lowest frequency spans `seq_len`; the identity up to
    # max_position_embeddings.
    max_pos = rope.max_position_embeddings
    seq_len = max(seq_len, max_pos)
    base = rope.theta * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
    return _base_frequencies(base, dim)


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    # Frequencies that turn fewer than beta_slow times over the original context are interpolated
    # (divided by factor), those that turn more than beta_fast times are kept, with a linear ramp
    # between; the attention factor restores the logits' temperature at long range.
    original = _original_len(rope)
    factor = rope.factor if rope.factor is not None else rope.max_position_embeddings / original
    low, high = _yarn_correction_range(rope, dim, original)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    if low == high:
        high += 0.001  # the ramp below must not divide by zero
    keep = 1 - ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq, _yarn_attention_factor(rope, factor)


def _yarn_correction_range(rope: RopeConfig, dim: int, original: int) -> tuple[float, float]:
    def dimension(rotations: float) -> float:  # the dimension whose frequency turns `rotations` times
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = dimension(rope.beta_fast), dimension(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn_attention_factor(rope: RopeConfig, factor: float) -> float:
    if rope.attention_factor is not None:
        return rope.attention_factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
    return mscale(factor)


def _longrope(rope: RopeConfig, dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
    original = _original_len(rope)
    factors = rope.long_factor if seq_len > original else rope.short_factor
    if len(rope.short_factor) != dim // 2 or len(rope.long_factor) != dim // 2:
        raise ValueError(
            f"rope type longrope needs short_factor and long_factor of {dim // 2} values (rotary "
            f"dimensions / 2); the config has {len(rope.short_factor)} and {len(rope.long_factor)}"
        )
    factor = rope.factor if rope.factor is not None else rope.max_position_embeddings / original
    attention_factor = rope.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * rope.theta**shape), attention_factor


def _original_len(rope: RopeConfig) -> int:
    if rope.original_max_position_embeddings is None:
        raise ValueError(f"rope type {rope.type} needs original_max_position_embeddings in the config")
    return rope.original_max_position_embeddings


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, rope: RopeConfig) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim(rope, head_dim)
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= head_dim:
            raise ValueError(f"partial_rotary_factor {rope.partial_rotary_factor} leaves an odd rotary size")
        # dynamic: one NTK base for the whole cache; longrope: one factor set for the engine's context
        seq_len = max_position if rope.type == "dynamic" else rope.context_len
        inv_freq, attention_factor = inverse_frequencies(rope, self.rotary_dim, seq_len)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        # [max_position, rotary_dim/2]; scaled as transformers scales cos and sin
        self.register_buffer("cos_cache", freqs.cos() * attention_factor, persistent=False)
        self.register_buffer("sin_cache", freqs.sin() * attention_factor, persistent=False)

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` ``[T, Hq, D]``, ``k`` ``[T, Hkv, D]`` rotated by their token positions ``[T]``.

        On CUDA ``q`` and ``k`` are rotated in place (one fused kernel) and returned.
        """
        half, rd = self.cos_cache.shape[1], self.rotary_dim
        if fused.enabled(q) and half & (half - 1) == 0 and q.stride(-1) == 1 and k.stride(-1) == 1:
            fused.rotary_(positions, q[..., :rd], k[..., :rd], self.cos_cache, self.sin_cache)
            return q, k
        cos = self.cos_cache[positions][:, None, :]
        sin = self.sin_cache[positions][:, None, :]
        if rd == q.shape[-1]:
            return _rotate(q, cos, sin), _rotate(k, cos, sin)
        return _rotate_part(q, rd, cos, sin), _rotate_part(k, rd, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _rotate_part(x: torch.Tensor, rd: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.cat((_rotate(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)
