"""Offline API: ``LLM(config).generate(prompts, sampling_params)`` runs the engine to completion."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.registries import EngineRegistries
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.models.tokenizer import Tokenizer


class LLM:
    def __init__(self, config: EngineConfig, registries: EngineRegistries | None = None) -> None:
        self.engine = LLMEngine(config, registries)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Sequence[str | list[int]] | str,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priorities: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Final outputs in prompt order. One ``SamplingParams`` applies to all prompts, or give one each."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params = _per_prompt(sampling_params or SamplingParams(), len(prompts))
        priorities = list(priorities) if priorities is not None else [0] * len(prompts)
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        for request_id, prompt, p, priority in zip(ids, prompts, params, priorities, strict=True):
            self.engine.add_request(request_id, prompt, p, priority)
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[request_id] for request_id in ids]


def _per_prompt(params: SamplingParams | Sequence[SamplingParams], count: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling parameter sets for {count} prompts")
    return list(params)
