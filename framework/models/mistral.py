"""Mistral: the Llama decoder with a sliding window on every layer (``sliding_window`` in config.json;
Mistral 7B v0.1 has 4096, later versions null, which means full attention)."""

from __future__ import annotations

from pagedserve.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    name = "MistralForCausalLM"
    windowed = True
