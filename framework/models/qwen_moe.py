"""Qwen2-MoE and Qwen3-MoE: Qwen2/Qwen3 attention with sparse mixtures of SwiGLU experts.

Layer ``i`` is sparse when ``(i + 1) % decoder_sparse_step == 0`` and ``i`` is not in
``mlp_only_layers``; the others keep a dense MLP of ``intermediate_size``. The router renormalises its
top-k weights only with ``norm_topk_prob`` and rounds them to the activation dtype. Qwen2-MoE adds a
shared expert to every sparse layer, scaled per token by ``sigmoid(shared_expert_gate(x))``. With
``use_sliding_window``, Qwen2-MoE windows the layers its ``layer_types`` say, Qwen3-MoE every layer.
"""

from __future__ import annotations

import dataclasses

import torch
from pagedserve.models.hf_config import ModelArchConfig
from pagedserve.models.layers.moe import GateLinear, SparseMoe
from pagedserve.models.llama import GatedMLP
from pagedserve.models.moe_config import MoeConfig
from pagedserve.models.moe_decoder import MoeForCausalLM
from torch import nn


def dense_mlp(config: ModelArchConfig, intermediate_size: int) -> GatedMLP:
    return GatedMLP(dataclasses.replace(config, intermediate_size=intermediate_size))


def qwen_experts(config: ModelArchConfig, moe: MoeConfig) -> SparseMoe:
    return SparseMoe(
        config.hidden_size,
        moe.intermediate_size,
        moe.num_experts,
        moe.top_k,
        renormalize=bool(moe.norm_topk_prob),
        round_weights=True,
    )


class SharedExpertMoe(SparseMoe):
    """Qwen2-MoE's sparse layer: routed experts plus one always-on expert behind a sigmoid gate."""

    def __init__(self, config: ModelArchConfig, moe: MoeConfig) -> None:
        super().__init__(
            config.hidden_size,
            moe.intermediate_size,
            moe.num_experts,
            moe.top_k,
            renormalize=bool(moe.norm_topk_prob),
            round_weights=True,
        )
        self.shared_expert = dense_mlp(config, moe.shared_expert_intermediate_size)
        self.shared_expert_gate = GateLinear(config.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().forward(x) + shared


class Qwen3MoeForCausalLM(MoeForCausalLM):
    name = "Qwen3MoeForCausalLM"
    qk_norm = True

    @staticmethod
    def make_ffn(config: ModelArchConfig, moe: MoeConfig, index: int) -> nn.Module:
        if not moe.is_sparse_layer(index):
            return dense_mlp(config, config.intermediate_size)
        return qwen_experts(config, moe)

    @staticmethod
    def window_of(config: ModelArchConfig, index: int) -> int | None:
        # transformers' Qwen3-MoE windows every layer when use_sliding_window is set; it reads neither
        # layer_types nor max_window_layers (the pattern has already dropped the window when unset)
        return config.attention.sliding_window


class Qwen2MoeForCausalLM(MoeForCausalLM):
    name = "Qwen2MoeForCausalLM"
    qkv_bias = True  # transformers' qkv_bias, True in every published Qwen2-MoE

    @staticmethod
    def make_ffn(config: ModelArchConfig, moe: MoeConfig, index: int) -> nn.Module:
        if not moe.is_sparse_layer(index):
            return dense_mlp(config, config.intermediate_size)
        if moe.shared_expert_intermediate_size == 0:
            return qwen_experts(config, moe)
        return SharedExpertMoe(config, moe)
