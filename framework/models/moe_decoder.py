"""The decoder shared by the sparse mixture-of-experts architectures (Mixtral, Qwen2-MoE, Qwen3-MoE).

Llama's attention block and norms, with a feed-forward module each architecture chooses per layer (a
:class:`~pagedserve.models.layers.moe.SparseMoe`, or a dense MLP for Qwen's dense layers), kept under
the checkpoint's own module name (``block_sparse_moe`` for Mixtral, ``mlp`` for Qwen).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from pagedserve.models.hf_config import ModelArchConfig
from pagedserve.models.layers.embedding import ParallelLMHead
from pagedserve.models.layers.moe import expert_checkpoint_mapping
from pagedserve.models.layers.quantization import checkpoint_being_built
from pagedserve.models.llama import DecoderLayer, DecoderStack, LlamaForCausalLM
from pagedserve.models.moe_config import MoeConfig
from pagedserve.models.registry import ModelArchitecture
from torch import nn

FeedForwardFactory = Callable[[ModelArchConfig, MoeConfig, int], nn.Module]
_NO_FP8 = "not supported yet: the float8 matmuls cover dense linears, not the stacked experts"


class MoeDecoderModel(DecoderStack):
    def __init__(
        self,
        config: ModelArchConfig,
        moe: MoeConfig,
        qkv_bias: bool,
        qk_norm: bool,
        windows: list[int | None],
        ffn_name: str,
        make_ffn: FeedForwardFactory,
    ) -> None:
        def make_layer(i: int) -> nn.Module:
            return DecoderLayer(config, qkv_bias, qk_norm, windows[i], make_ffn(config, moe, i), ffn_name)

        super().__init__(config, make_layer)


class MoeForCausalLM(ModelArchitecture):
    """A decoder whose feed-forward layers are (mostly) sparse mixtures of experts.

    Subclasses name the feed-forward module (``ffn_name``), build it per layer (``make_ffn``) and say
    what each expert's three matrices are called in the checkpoint (``expert_names``: gate, up, down).
    Sliding windows are the layers' own from ``config.json`` (``window_of``), as transformers reads them.
    """

    ffn_name: ClassVar[str] = "mlp"
    expert_names: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    qkv_bias: ClassVar[bool] = False
    qk_norm: ClassVar[bool] = False

    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__(config)
        if config.moe is None:
            raise ValueError(f"{self.name}: config.json names no experts (num_experts / num_local_experts)")
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
        if checkpoint_being_built() is not None:  # before a single weight is read
            raise ValueError(f"{self.name}: float8 checkpoints of mixture-of-experts models are {_NO_FP8}")
        # Per instance: the experts' names depend on how many there are. Experts first (see
        # expert_checkpoint_mapping), then Llama's merged q/k/v and gate/up.
        experts = expert_checkpoint_mapping(config.moe.num_experts, *self.expert_names)
        self.packed_modules_mapping = experts | LlamaForCausalLM.packed_modules_mapping
        windows = [self.window_of(config, i) for i in range(config.num_layers)]
        self.model = MoeDecoderModel(
            config, config.moe, self.qkv_bias, self.qk_norm, windows, self.ffn_name, self.make_ffn
        )
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def make_ffn(config: ModelArchConfig, moe: MoeConfig, index: int) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def window_of(config: ModelArchConfig, index: int) -> int | None:
        return config.attention.window_of(index)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def quantize_fp8_(self) -> None:
        # Quantizing only the attention linears would leave the experts, nearly all the weights, in
        # 16 bits while the user believes the model is float8: refuse instead.
        raise ValueError(f"{self.name}: quantization=fp8 is {_NO_FP8}; leave engine.quantization unset")
