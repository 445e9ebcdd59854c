"""Where a model comes from: a Hugging Face directory, the embedded tiny model, or a built-in shape.

Built-in shapes (``llama3-8b``) exist for ``load_format=dummy`` runs (benchmarks) with no files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagedserve.models.hf_config import read_json
from pagedserve.models.tiny import TINY_LLAMA_NAME, ensure_tiny_llama

LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "dtype": "bfloat16",
}

PRESETS: dict[str, dict[str, Any]] = {"llama3-8b": LLAMA3_8B}


@dataclass(frozen=True)
class ModelSource:
    directory: Path | None  # None for a built-in shape with no files
    hf_config: dict[str, Any]


def resolve_model_source(model: str, load_format: str) -> ModelSource:
    if model == TINY_LLAMA_NAME:
        directory = ensure_tiny_llama()
        return ModelSource(directory, read_json(directory / "config.json"))
    directory = Path(model).expanduser()
    if (directory / "config.json").exists():
        return ModelSource(directory, read_json(directory / "config.json"))
    if load_format == "dummy" and model in PRESETS:
        return ModelSource(None, PRESETS[model])
    hint = f" or one of {sorted(PRESETS)} with load_format=dummy" if load_format == "dummy" else ""
    raise FileNotFoundError(
        f"model={model!r}: no config.json there; set model to a Hugging Face model "
        f"directory (config.json, *.safetensors, tokenizer.json){hint}"
    )
