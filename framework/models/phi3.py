"""Phi-3 (``Phi3ForCausalLM``): the Llama decoder, loaded from fused checkpoint projections.

Phi-3 checkpoints store the query, key and value projections as one ``qkv_proj`` tensor and gate/up as
one ``gate_up_proj``, which are the names of our merged linears; so nothing is renamed, and each
merged linear splits the fused tensor into its shards (``fused_shards``) so that a tensor-parallel
rank takes its own heads and features. The long-context variants use ``longrope`` rope scaling, some
with ``partial_rotary_factor``; both live in ``layers/rotary.py``.
"""

from __future__ import annotations

from typing import ClassVar

from pagedserve.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    name = "Phi3ForCausalLM"
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {}
    qkv_bias = False
