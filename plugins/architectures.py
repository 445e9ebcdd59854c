"""Built-in model architectures: Llama (2/3/3.1), Qwen2 and Qwen3, Mistral, Gemma 2 and 3, and the
mixtures of experts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.hookspecs import hookimpl

if TYPE_CHECKING:
    from pagedserve.models.registry import ModelArchitecture


@hookimpl
def pagedserve_model_architectures() -> list[type[ModelArchitecture]]:
    # Imported here so registering the plugin does not import the model code.
    from pagedserve.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
    from pagedserve.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
    from pagedserve.models.mistral import MistralForCausalLM
    from pagedserve.models.mixtral import MixtralForCausalLM
    from pagedserve.models.phi3 import Phi3ForCausalLM
    from pagedserve.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

    return [
        LlamaForCausalLM,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
        MistralForCausalLM,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        MixtralForCausalLM,
        Qwen2MoeForCausalLM,
        Qwen3MoeForCausalLM,
        Phi3ForCausalLM,
    ]
