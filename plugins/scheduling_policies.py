"""Built-in scheduling policies: ``fcfs``, ``priority`` and ``shortest_prompt``.

``shortest_prompt`` admits the request with the least prompt work first. Under mixed traffic a long
prompt at the head of the queue delays every short one behind it (head-of-line blocking); serving
short prompts first lowers mean time-to-first-token at the cost of fairness to long prompts. Keys are
fixed when a request is queued, so a long prompt waits only while shorter ones keep arriving.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.engine.policy import SchedulingPolicy
from pagedserve.hookspecs import hookimpl

if TYPE_CHECKING:
    from pagedserve.engine.sequence import Sequence


class FcfsPolicy(SchedulingPolicy):
    """First come, first served; preempts the latest arrival."""

    name = "fcfs"

    def key(self, seq: Sequence) -> tuple:
        return (seq.arrival,)


class PriorityPolicy(SchedulingPolicy):
    """Triton request ``priority``: a lower number is served first; ties are first come, first served."""

    name = "priority"

    def key(self, seq: Sequence) -> tuple:
        return (seq.priority, seq.arrival)


class ShortestPromptPolicy(SchedulingPolicy):
    """Fewest prompt tokens first (shortest job first for prefill); ties are first come, first served."""

    name = "shortest_prompt"

    def key(self, seq: Sequence) -> tuple:
        return (seq.num_prompt_tokens, seq.arrival)


@hookimpl
def pagedserve_scheduling_policies() -> list[type[SchedulingPolicy]]:
    return [FcfsPolicy, PriorityPolicy, ShortestPromptPolicy]
