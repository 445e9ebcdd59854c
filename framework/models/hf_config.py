"""The subset of a Hugging Face ``config.json`` the architectures need, as typed values.

Both rope layouts are accepted: transformers 5 writes ``rope_parameters`` (with ``rope_theta`` and
``rope_type`` inside), older files write ``rope_theta`` plus an optional ``rope_scaling`` dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> RopeConfig:
        params = hf.get("rope_parameters")
        if isinstance(params, dict) and "rope_theta" not in params and params:
            # Per-layer-type form: {"full_attention": {...}, "sliding_attention": {...}}.
            params = params.get("full_attention") or next(iter(params.values()))
        if not isinstance(params, dict):
            params = dict(hf.get("rope_scaling") or {})
            params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type") or params.get("type") or "default"
        return cls(
            theta=float(params.get("rope_theta", 10000.0)),
            type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=params.get("original_max_position_embeddings"),
        )


@dataclass(frozen=True)
class ModelArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope: RopeConfig = field(default_factory=RopeConfig)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelArchConfig:
        architectures = hf.get("architectures") or []
        if not architectures:
            raise ValueError("config.json has no 'architectures' entry, so the model class is unknown")
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        return cls(
            architecture=architectures[0],
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            hidden_act=hf.get("hidden_act", "silu"),
            dtype=hf.get("dtype") or hf.get("torch_dtype"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(as_id_list(eos)),
            rope=RopeConfig.from_hf(hf),
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelArchConfig:
        return cls.from_hf(read_json(model_dir / "config.json"))


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
