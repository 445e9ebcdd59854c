"""The model-architecture contract and lookup by Hugging Face ``architectures[0]``.

Architectures arrive through the ``pagedserve_model_architectures`` hook; each class's ``name`` is the
string Hugging Face writes in ``config.json`` (e.g. ``LlamaForCausalLM``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from pagedserve.models.hf_config import ModelArchConfig
from pagedserve.models.layers.attention import Attention
from pagedserve.models.layers.linear import ParallelLinear
from torch import nn


class ModelArchitecture(nn.Module):
    """A causal LM over a flat batch of tokens.

    ``forward(input_ids [T], positions [T]) -> hidden [T, H]`` and ``compute_logits(hidden [N, H]) ->
    [N, vocab]``. ``packed_modules_mapping`` maps a checkpoint module name onto the merged module
    that holds it and the shard id passed to its ``weight_loader`` (``"q_proj": ("qkv_proj", "q")``).
    """

    name: ClassVar[str]
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {}

    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def kv_sliding_window(self) -> int | None:
        """The window every attention layer keeps (the widest), or ``None`` when a layer attends to
        the whole context: only then may KV blocks behind the window be freed."""
        windows = [layer.sliding_window for layer in self.attention_layers()]
        if not windows or None in windows:
            return None
        return max(w for w in windows if w is not None)

    def quantize_fp8_(self) -> None:
        """``quantization=fp8``: float8 weights in every linear layer, after the weights load.
        Architectures may also let the layers feeding those linears write float8 rows directly."""
        for module in self.modules():
            if isinstance(module, ParallelLinear):
                module.quantize_fp8_()


def resolve_architecture(
    registry: Mapping[str, type[ModelArchitecture]],
    config: ModelArchConfig,
) -> type[ModelArchitecture]:
    try:
        return registry[config.architecture]
    except KeyError:
        raise ValueError(
            f"model architecture {config.architecture!r} is not supported; registered "
            f"architectures: {sorted(registry)}"
        ) from None
