"""Per-layer attention settings of a Hugging Face ``config.json``: sliding windows, soft-capping, scale.

Which layers have a window follows transformers: ``layer_types`` when the file has it (transformers 5
writes it for every family that mixes layer kinds), else each family's own default, which older files
rely on: Qwen2/Qwen3 window the layers from ``max_window_layers`` on, and only with
``use_sliding_window``; Gemma 2 alternates local and global layers (even indices local); Gemma 3 makes
every ``sliding_window_pattern``-th layer global (default 6); Mistral windows every layer when
``sliding_window`` is set. Whether an architecture honours a window at all is the architecture's
choice (Llama ignores the key, as transformers does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedserve.models.hf_config import RopeConfig

SLIDING = "sliding_attention"
FULL = "full_attention"
_DEFAULT_PATTERNS = {"gemma2": 2, "gemma3_text": 6, "gemma3": 6}


@dataclass(frozen=True)
class AttentionPattern:
    sliding_window: int | None = None  # None: no layer has a window
    layer_types: tuple[str, ...] = ()  # SLIDING or FULL per layer (a window applies only if set)
    attn_logit_softcapping: float | None = None  # Gemma 2: scores = cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2/3: the same on the LM head's logits
    query_pre_attn_scalar: float | None = None  # Gemma: softmax scale query_pre_attn_scalar ** -0.5
    local_rope: RopeConfig | None = None  # Gemma 3: the sliding layers' own rotary settings
    bidirectional: bool = False  # Gemma 3 embedding models (not causal LMs)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> AttentionPattern:
        num_layers = int(hf["num_hidden_layers"])
        window = hf.get("sliding_window")
        if not hf.get("use_sliding_window", True):
            window = None  # Qwen2/3 keep the key but switch it off
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"config.json sliding_window must be a positive integer or null, got {window!r}")
        return cls(
            sliding_window=window,
            layer_types=_layer_types(hf, num_layers),
            attn_logit_softcapping=_positive(hf, "attn_logit_softcapping"),
            final_logit_softcapping=_positive(hf, "final_logit_softcapping"),
            query_pre_attn_scalar=_positive(hf, "query_pre_attn_scalar"),
            local_rope=_local_rope(hf),
            bidirectional=bool(hf.get("use_bidirectional_attention")),
        )

    def window_of(self, layer_index: int) -> int | None:
        """The sliding window of layer ``layer_index``, ``None`` for a global layer."""
        if self.sliding_window is None or self.layer_types[layer_index] != SLIDING:
            return None
        return self.sliding_window

    def is_local(self, layer_index: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer_index] == SLIDING


def _layer_types(hf: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    types = hf.get("layer_types")
    if types:
        if len(types) != num_layers or any(t not in (SLIDING, FULL) for t in types):
            raise ValueError(
                f"config.json layer_types must list {SLIDING!r} or {FULL!r} for each of the "
                f"{num_layers} layers, got {types!r}"
            )
        return tuple(types)
    if "use_sliding_window" in hf:  # Qwen2/Qwen3
        start = int(hf.get("max_window_layers", num_layers))
        return tuple(SLIDING if i >= start else FULL for i in range(num_layers))
    pattern = hf.get("sliding_window_pattern") or _DEFAULT_PATTERNS.get(hf.get("model_type", ""))
    if pattern:
        return tuple(SLIDING if (i + 1) % int(pattern) else FULL for i in range(num_layers))
    return (SLIDING,) * num_layers


def _local_rope(hf: dict[str, Any]) -> RopeConfig | None:
    from pagedserve.models.hf_config import RopeConfig  # hf_config imports this module

    params = hf.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get(SLIDING), dict):
        return RopeConfig.from_hf({**hf, "rope_parameters": params[SLIDING]})
    if hf.get("rope_local_base_freq") is not None:  # older Gemma 3 files: plain rope, its own base
        return RopeConfig.from_hf({**hf, "rope_parameters": {"rope_theta": hf["rope_local_base_freq"]}})
    return None


def _positive(hf: dict[str, Any], key: str) -> float | None:
    value = hf.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"config.json {key} must be a positive number or null, got {value!r}")
    return float(value)
