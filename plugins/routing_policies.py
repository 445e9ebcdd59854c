"""Built-in replica routing policies: ``least_outstanding`` (the default) and ``prefix_affinity``.

``least_outstanding`` sends a request to the replica with the fewest unfinished sequences, taking
turns among ties, so idle replicas share sequential traffic evenly and a replica stuck with long
generations gets the short requests' share of nothing.

``prefix_affinity`` sends prompts that start alike to the same replica, where the prefix cache
already holds their first blocks (a shared system prompt, earlier turns of a conversation): the key
is a hash of the prompt's first full KV blocks, and rendezvous hashing maps keys to replicas, so when
a replica is away only its own keys move. Affinity yields to balance: when the preferred replica has
more than ``routing_max_imbalance`` sequences beyond the least loaded one, the least loaded wins.

The llm backend's plugin module registers these (it is their only user), so no entry point of its
own is needed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Mapping, Sequence

from pagedserve.engine.routing import ReplicaLoad, RoutingPolicy

MAX_PREFIX_BLOCKS = 1024
MAX_IMBALANCE = 2**20


class LeastOutstanding(RoutingPolicy):
    """Fewest outstanding sequences; ties go round-robin."""

    name = "least_outstanding"

    def __init__(self, block_size: int, parameters: Mapping[str, str]) -> None:
        super().__init__(block_size, parameters)
        self._last = -1

    def choose(self, prompt_token_ids: Sequence[int], replicas: Sequence[ReplicaLoad]) -> int:
        least = min(replica.outstanding for replica in replicas)
        tied = [replica.index for replica in replicas if replica.outstanding == least]
        # The first tied replica after the one chosen last: idle replicas take turns.
        self._last = next((index for index in tied if index > self._last), tied[0])
        return self._last


class PrefixAffinity(RoutingPolicy):
    """Same first blocks, same replica (while it is not overloaded); prompts shorter than one block
    go to the least loaded replica."""

    name = "prefix_affinity"

    def __init__(self, block_size: int, parameters: Mapping[str, str]) -> None:
        super().__init__(block_size, parameters)
        self.prefix_blocks = _int_parameter(parameters, "routing_prefix_blocks", 4, 1, MAX_PREFIX_BLOCKS)
        self.max_imbalance = _int_parameter(parameters, "routing_max_imbalance", 8, 0, MAX_IMBALANCE)
        self._balance = LeastOutstanding(block_size, parameters)

    def choose(self, prompt_token_ids: Sequence[int], replicas: Sequence[ReplicaLoad]) -> int:
        key = self.prefix_key(prompt_token_ids)
        if key is None:
            return self._balance.choose(prompt_token_ids, replicas)
        preferred = max(replicas, key=lambda replica: _score(key, replica.index))
        least = min(replica.outstanding for replica in replicas)
        if preferred.outstanding - least > self.max_imbalance:
            return self._balance.choose(prompt_token_ids, replicas)
        return preferred.index

    def prefix_key(self, prompt_token_ids: Sequence[int]) -> bytes | None:
        """A digest of the first ``routing_prefix_blocks`` full blocks (fewer if the prompt has fewer),
        or None for a prompt without a full block."""
        num_blocks = min(len(prompt_token_ids) // self.block_size, self.prefix_blocks)
        if num_blocks == 0:
            return None
        tokens = array("q", prompt_token_ids[: num_blocks * self.block_size])
        return hashlib.blake2b(tokens.tobytes(), digest_size=16).digest()


def _score(key: bytes, index: int) -> int:
    """Rendezvous (highest random weight) hashing: stable across processes, unlike ``hash()``."""
    return int.from_bytes(
        hashlib.blake2b(key + index.to_bytes(4, "little"), digest_size=8).digest(), "little"
    )


def _int_parameter(parameters: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    text = parameters.get(key)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"parameters.{key} must be an integer, got {text[:64]!r}") from None
    if not low <= value <= high:
        raise ValueError(f"parameters.{key} must be in [{low}, {high}], got {value}")
    return value


ROUTING_POLICIES: list[type[RoutingPolicy]] = [LeastOutstanding, PrefixAffinity]
