"""Tiny random transformers checkpoints of the families with sliding windows and soft-capping."""

from __future__ import annotations

from pathlib import Path

import torch

from .engine_helpers import TINY_DIMS


def build_windowed_checkpoint(directory: Path, arch: str, seed: int = 0, **overrides: object) -> Path:
    """Save a tiny random ``arch`` model (float32) to ``directory``.

    Norm weights are random too (transformers starts Gemma's at zero, which would hide a missing
    ``1 + weight``), so every per-family detail shows in the logits."""
    import transformers

    config_cls, model_cls = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    dims = {k: v for k, v in TINY_DIMS.items() if k != "initializer_range"}
    config = config_cls(**{**dims, "initializer_range": 0.1, **overrides})
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn_like(param) * 0.3 + (0.0 if "gemma" in arch else 1.0))
    model.save_pretrained(directory)
    return directory
