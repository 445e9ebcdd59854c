"""Llama-family decoder (Llama 2/3/3.1, Qwen2, Qwen3) in one parameterised implementation.

The variants differ only in a few switches: Qwen2 adds a bias to the q/k/v projections, Qwen3
normalises each query and key head (RMSNorm over ``head_dim``) before the rotary embedding, and both
honour ``use_sliding_window`` (Mistral, in ``mistral.py``, windows every layer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from pagedserve.models.hf_config import ModelArchConfig, RopeConfig
from pagedserve.models.layers.activation import SiluAndMul
from pagedserve.models.layers.attention import Attention
from pagedserve.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedserve.models.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedserve.models.layers.norm import RMSNorm
from pagedserve.models.layers.quantization import Fp8Rows
from pagedserve.models.layers.rotary import RotaryEmbedding
from pagedserve.models.registry import ModelArchitecture
from torch import nn


class DecoderAttention(nn.Module):
    """Self-attention of the Llama family; Gemma's differs only in the options after ``*``: its own
    rope (local layers), scale (``query_pre_attn_scalar``), logit soft-cap and RMSNorm."""

    def __init__(
        self,
        config: ModelArchConfig,
        qkv_bias: bool,
        qk_norm: bool,
        sliding_window: int | None = None,
        *,
        rope: RopeConfig | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        norm: type[nn.Module] = RMSNorm,
    ) -> None:
        super().__init__()
        hd = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, hd, config.num_heads, config.num_kv_heads, bias=qkv_bias
        )
        self.num_heads, self.num_kv_heads, self.head_dim = (
            self.qkv_proj.num_heads,
            self.qkv_proj.num_kv_heads,
            hd,
        )
        self.o_proj = RowParallelLinear(config.num_heads * hd, config.hidden_size, bias=config.attention_bias)
        self.rotary_emb = RotaryEmbedding(hd, config.max_position_embeddings, rope or config.rope)
        self.attn = Attention(
            self.num_heads,
            hd,
            self.num_kv_heads,
            scale=hd**-0.5 if scale is None else scale,
            sliding_window=sliding_window,
            softcap=softcap,
        )
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = norm(hd, config.rms_norm_eps)
            self.k_norm = norm(hd, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor | Fp8Rows) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        num_tokens = qkv.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)
        return self.o_proj(out.reshape(num_tokens, q_size))


class GatedMLP(nn.Module):
    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [inter, inter], bias=config.mlp_bias
        )
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Attention and a feed-forward block, each after an RMSNorm on the residual stream. The block is
    Llama's gated MLP unless one is given (a mixture of experts), under the checkpoint's name for it."""

    def __init__(
        self,
        config: ModelArchConfig,
        qkv_bias: bool,
        qk_norm: bool,
        sliding_window: int | None = None,
        ffn: nn.Module | None = None,
        ffn_name: str = "mlp",
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config, qkv_bias, qk_norm, sliding_window)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_name = ffn_name
        self.add_module(ffn_name, ffn if ffn is not None else GatedMLP(config))

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` is the previous layer's output, not yet added to the ``residual`` stream."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return getattr(self, self.ffn_name)(x), residual

    def write_fp8_rows_(self) -> None:
        """Once the linears are float8: the two norms and SiLU·mul, which feed only linears, write
        float8 rows themselves."""
        for producer in (self.input_layernorm, self.post_attention_layernorm, self.mlp.act):
            producer.quantize_output = True


class DecoderStack(nn.Module):
    """Embedding, decoder layers, final norm: what every decoder-only family here shares."""

    def __init__(self, config: ModelArchConfig, make_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(make_layer(i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        x, _ = self.norm(x, residual)
        return x


class DecoderModel(DecoderStack):
    def __init__(
        self, config: ModelArchConfig, qkv_bias: bool, qk_norm: bool, windowed: bool = False
    ) -> None:
        def make_layer(i: int) -> nn.Module:
            window = config.attention.window_of(i) if windowed else None
            return DecoderLayer(config, qkv_bias, qk_norm, window)

        super().__init__(config, make_layer)


class LlamaForCausalLM(ModelArchitecture):
    name = "LlamaForCausalLM"
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    qkv_bias: ClassVar[bool | None] = None  # None: follow config.attention_bias
    qk_norm: ClassVar[bool] = False
    windowed: ClassVar[bool] = False  # honour config.json's sliding window (transformers' Llama ignores it)

    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__(config)
        qkv_bias = config.attention_bias if self.qkv_bias is None else self.qkv_bias
        self.model = DecoderModel(config, qkv_bias, self.qk_norm, self.windowed)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def quantize_fp8_(self) -> None:
        super().quantize_fp8_()  # every linear; the embedding and the LM head keep the model dtype
        for layer in self.model.layers:
            layer.write_fp8_rows_()


class Qwen2ForCausalLM(LlamaForCausalLM):
    name = "Qwen2ForCausalLM"
    qkv_bias = True
    windowed = True  # use_sliding_window: layers from max_window_layers on


class Qwen3ForCausalLM(LlamaForCausalLM):
    name = "Qwen3ForCausalLM"
    qk_norm = True
    windowed = True
