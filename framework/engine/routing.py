"""The routing-policy seam: which replica of a data-parallel LLM model takes a request.

A policy only chooses; :class:`pagedserve.engine.replicas.ReplicaSet` keeps the mechanism (which
replicas can take work now, the outstanding counts, where each request went). Built-in policies
live in ``pagedserve_plugins.routing_policies`` and arrive through the ``pagedserve_routing_policies``
hook; a model's ``parameters.routing_policy`` picks one by ``name``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica as a policy sees it when a request arrives."""

    index: int
    outstanding: int
    """Sequences (``n`` per request) sent to this replica and not finished yet."""


class RoutingPolicy(ABC):
    """Chooses a replica for each request. Called under the replica set's lock, one request at a time,
    so a policy may keep state without locking; it must be quick (it holds up every submit)."""

    name: ClassVar[str]

    def __init__(self, block_size: int, parameters: Mapping[str, str]) -> None:
        """``block_size``: the KV cache's tokens per block; ``parameters``: the model config's
        parameters, from which a policy reads its own options (a ``ValueError`` naming the key for a
        bad one fails the load)."""
        self.block_size = block_size

    @abstractmethod
    def choose(self, prompt_token_ids: Sequence[int], replicas: Sequence[ReplicaLoad]) -> int:
        """The ``index`` of one of ``replicas`` (never empty: only those that can take work now)."""
