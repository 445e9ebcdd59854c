"""The LLM engine: paged KV cache, continuous batching, sampling.

Entry points: :class:`pagedserve.engine.llm_engine.LLMEngine` (step by step),
:class:`pagedserve.engine.llm.LLM` (offline ``generate``) and
:class:`pagedserve.engine.engine_loop.EngineLoop` (the engine on its own thread). Submodules are not
imported here, so reading the config schema does not import torch.
"""
