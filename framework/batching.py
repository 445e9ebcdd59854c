"""Batching policies: how queued requests for one model version become ``Model.execute`` calls.

The policy is picked from the model config: ``sequence_batching`` → ``sequence``,
``dynamic_batching`` → ``dynamic``, otherwise ``direct``; a model may name another registered policy
with the ``batching_policy`` entry of its ``parameters``.
"""

from __future__ import annotations

import abc
from typing import ClassVar

from pagedserve.backend import Model, ModelSpec
from pagedserve.inference import InferenceRequest
from pagedserve.statistics import ModelStats


class BatchingPolicy(abc.ABC):
    """Owns the queue and the worker threads of one loaded model version."""

    name: ClassVar[str]

    def __init__(self, model: Model, spec: ModelSpec, stats: ModelStats) -> None:
        self.model = model
        self.spec = spec
        self.stats = stats

    @abc.abstractmethod
    def submit(self, request: InferenceRequest) -> None:
        """Queue a request; thread-safe and non-blocking. Raise ``InferenceError`` to reject it
        (queue full, sequence without START...)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop accepting, let queued and running requests finish, then join the workers."""


def policy_name_for(spec: ModelSpec) -> str:
    explicit = spec.parameter("batching_policy")
    if explicit:
        return explicit
    if spec.config.HasField("sequence_batching"):
        return "sequence"
    if spec.config.HasField("dynamic_batching"):
        return "dynamic"
    return "direct"
