"""Gemma 2 and Gemma 3 (text-only) decoders.

What sets them apart from Llama, as transformers computes it:

* RMSNorm scales by ``1 + weight`` (weights are stored as offsets from 1), in float32;
* the embedding output is multiplied by ``sqrt(hidden_size)``, rounded to the model dtype first;
* each layer normalises the attention and the MLP outputs again (``post_attention_layernorm``,
  ``post_feedforward_layernorm``) before adding them to the residual stream, and the MLP input has
  its own norm (``pre_feedforward_layernorm``);
* the MLP is GeGLU: ``gelu_tanh(gate) * up``;
* the softmax scale is ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5``;
* local (sliding-window) and global layers alternate (``AttentionPattern.layer_types``); every layer
  keeps its own KV cache, so with a global layer in the model no block can be freed;
* Gemma 2 soft-caps the attention scores and the final logits (``cap * tanh(x / cap)``); Gemma 3
  drops the attention cap (transformers' Gemma 3 never passes it to the attention), keeps the final
  one if configured, normalises each query and key head, and gives local layers their own rotary base
  (``rope_local_base_freq``, or ``rope_parameters["sliding_attention"]``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pagedserve.models.hf_config import ModelArchConfig
from pagedserve.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedserve.models.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from pagedserve.models.llama import DecoderAttention, LlamaForCausalLM
from pagedserve.models.registry import ModelArchitecture
from torch import nn

_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")


class GemmaRMSNorm(nn.Module):
    """``x / rms(x) * (1 + weight)``, all in float32, then back to ``x``'s dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class GemmaAttention(DecoderAttention):
    def __init__(self, config: ModelArchConfig, layer_index: int, qk_norm: bool, softcap: bool) -> None:
        pattern = config.attention
        local = pattern.is_local(layer_index)
        super().__init__(
            config,
            qkv_bias=config.attention_bias,
            qk_norm=qk_norm,
            sliding_window=pattern.window_of(layer_index),
            rope=pattern.local_rope if local and pattern.local_rope is not None else None,
            scale=(pattern.query_pre_attn_scalar or config.head_dim) ** -0.5,
            softcap=pattern.attn_logit_softcapping if softcap else None,
            norm=GemmaRMSNorm,
        )


class GeGLU(nn.Module):
    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        if config.hidden_act not in _GELU_TANH:
            raise ValueError(f"hidden_activation {config.hidden_act!r} is not supported (only {_GELU_TANH})")
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=False)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelArchConfig, layer_index: int, qk_norm: bool, softcap: bool) -> None:
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.self_attn = GemmaAttention(config, layer_index, qk_norm, softcap)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.mlp = GeGLU(config)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x)))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, config: ModelArchConfig, qk_norm: bool, softcap: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # transformers rounds the scale to the model dtype before multiplying (bf16: 48.0 for 2304)
        self.register_buffer("normalizer", torch.tensor(config.hidden_size**0.5), persistent=False)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, i, qk_norm, softcap) for i in range(config.num_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.normalizer.to(self.embed_tokens.weight.dtype)
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x)


class Gemma2ForCausalLM(ModelArchitecture):
    name = "Gemma2ForCausalLM"
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping  # the same fused projections
    qk_norm: ClassVar[bool] = False
    attention_softcap: ClassVar[bool] = True

    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__(config)
        if config.attention.bidirectional:
            raise ValueError(
                f"{self.name} with use_bidirectional_attention is an embedding model, not a causal LM"
            )
        self.model = GemmaModel(config, self.qk_norm, self.attention_softcap)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_softcap = config.attention.final_logit_softcapping

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    name = "Gemma3ForCausalLM"
    qk_norm = True
    attention_softcap = False
