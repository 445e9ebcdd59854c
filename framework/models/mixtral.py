"""Mixtral: Mistral's attention with a sparse mixture of SwiGLU experts in every layer.

The router takes the top 2 of 8 experts (``num_experts_per_tok`` of ``num_local_experts``) and always
renormalises their softmax weights to sum to 1; the weights stay float32 until the experts' outputs
are summed. Checkpoints name each expert's matrices ``w1`` (gate), ``w3`` (up) and ``w2`` (down) under
``block_sparse_moe``. A ``sliding_window`` in config.json windows every layer, as in Mistral.
"""

from __future__ import annotations

from pagedserve.models.hf_config import ModelArchConfig
from pagedserve.models.layers.moe import SparseMoe
from pagedserve.models.moe_config import MoeConfig
from pagedserve.models.moe_decoder import MoeForCausalLM
from torch import nn


class MixtralForCausalLM(MoeForCausalLM):
    name = "MixtralForCausalLM"
    ffn_name = "block_sparse_moe"
    expert_names = ("w1", "w3", "w2")

    @staticmethod
    def make_ffn(config: ModelArchConfig, moe: MoeConfig, index: int) -> nn.Module:
        return SparseMoe(
            config.hidden_size,
            moe.intermediate_size,
            moe.num_experts,
            moe.top_k,
            renormalize=True,
            round_weights=False,
        )
