"""The subset of a Hugging Face ``config.json`` the architectures need, as typed values.

Both rope layouts are accepted: transformers 5 writes ``rope_parameters`` (with ``rope_theta`` and
``rope_type`` inside), older files write ``rope_theta`` plus an optional ``rope_scaling`` dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagedserve.models.attention_config import AttentionPattern
from pagedserve.models.moe_config import MoeConfig


@dataclass(frozen=True)
class RopeConfig:
    """Rotary settings as transformers standardises them (``rope_parameters`` plus the top-level keys
    it folds in); ``rotary.inverse_frequencies`` turns them into frequencies."""

    theta: float = 10000.0
    type: str = "default"
    factor: float | None = 1.0  # None: yarn/longrope derive it from the two context lengths
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int = 2048
    partial_rotary_factor: float = 1.0
    attention_factor: float | None = None  # yarn/longrope: None means the paper's default
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    # The longest sequence the engine runs (its max_model_len); longrope picks its factor set by it.
    # None: max_position_embeddings.
    context_len: int | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> RopeConfig:
        params = _rope_params(hf)
        rope_type = params.get("rope_type") or params.get("type") or "default"
        if rope_type == "su" or (rope_type == "yarn" and hf.get("model_type") == "phi3"):
            rope_type = "longrope"  # Phi-3's older names, which transformers maps the same way
        max_pos = int(hf.get("max_position_embeddings", 2048))
        # Phi-3 keeps it at the top level, which transformers lets win
        original = hf.get("original_max_position_embeddings") or params.get(
            "original_max_position_embeddings"
        )
        if original is None and rope_type in ("llama3", "yarn", "longrope"):
            original = max_pos  # transformers' default for the scaled types
        return cls(
            theta=float(params.get("rope_theta", 10000.0)),
            type=rope_type,
            factor=_float_or_none(params.get("factor", None if rope_type in ("yarn", "longrope") else 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=None if original is None else int(original),
            max_position_embeddings=max_pos,
            partial_rotary_factor=float(
                params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0
            ),
            attention_factor=_float_or_none(params.get("attention_factor")),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=_float_or_none(params.get("mscale")),
            mscale_all_dim=_float_or_none(params.get("mscale_all_dim")),
            truncate=bool(params.get("truncate", True)),
            short_factor=tuple(float(f) for f in params.get("short_factor") or ()),
            long_factor=tuple(float(f) for f in params.get("long_factor") or ()),
        )


def _rope_params(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling`` pair."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" not in params and params:
        # Per-layer-type form: {"full_attention": {...}, "sliding_attention": {...}}.
        params = params.get("full_attention") or next(iter(params.values()))
    if not isinstance(params, dict):
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


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
    moe: MoeConfig | None = None  # sparse mixture-of-experts layers (Mixtral, Qwen MoE)
    attention: AttentionPattern = field(default_factory=AttentionPattern)  # windows, soft-capping

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
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act", "silu"),  # Gemma: the former
            dtype=hf.get("dtype") or hf.get("torch_dtype"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(as_id_list(eos)),
            rope=RopeConfig.from_hf(hf),
            moe=MoeConfig.from_hf(hf),
            attention=AttentionPattern.from_hf(hf),
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
