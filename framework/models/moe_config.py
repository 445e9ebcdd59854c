"""The mixture-of-experts keys of a Hugging Face ``config.json`` (Mixtral, Qwen2-MoE, Qwen3-MoE), typed.

Only what the checkpoint says: how a key's absence is read (Mixtral always renormalises its top-k
weights, Qwen only with ``norm_topk_prob``) is the architecture's business, so absent keys stay None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    norm_topk_prob: bool | None = None
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> MoeConfig | None:
        """None for a dense model. Mixtral writes ``num_local_experts``, Qwen2-MoE ``num_experts``, and
        transformers 5 saves Qwen3-MoE with either."""
        num_experts = hf.get("num_local_experts") or hf.get("num_experts")
        if not num_experts:
            return None
        norm = hf.get("norm_topk_prob")
        config = cls(
            num_experts=int(num_experts),
            top_k=int(hf.get("num_experts_per_tok", 2)),
            intermediate_size=int(hf.get("moe_intermediate_size") or hf["intermediate_size"]),
            norm_topk_prob=None if norm is None else bool(norm),
            shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
            decoder_sparse_step=int(hf.get("decoder_sparse_step") or 1),
            mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()),
        )
        config.check()
        return config

    def check(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.top_k}) must be between 1 and the number of experts "
                f"({self.num_experts})"
            )
        if self.intermediate_size < 1 or self.shared_expert_intermediate_size < 0:
            raise ValueError("expert intermediate sizes must be positive")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be at least 1, got {self.decoder_sparse_step}")

    def is_sparse_layer(self, index: int) -> bool:
        return index not in self.mlp_only_layers and (index + 1) % self.decoder_sparse_step == 0
