"""The scheduling-policy seam: which waiting request goes first, and who is preempted.

A policy only orders sequences; the scheduler keeps the mechanism (budgets, blocks, chunking,
preemption). Built-in policies live in ``pagedserve_plugins.scheduling_policies`` and arrive through
the ``pagedserve_scheduling_policies`` hook; ``scheduler.policy`` picks one by ``name``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from pagedserve.engine.sequence import Sequence


class SchedulingPolicy(ABC):
    """Orders sequences. Smaller keys are admitted first; the largest running key is preempted first.

    ``key`` must depend only on the sequence (not on time or other sequences), because the scheduler
    keeps its waiting queue sorted by it and only computes a key when a sequence enters the queue.
    """

    name: ClassVar[str]

    @abstractmethod
    def key(self, seq: Sequence) -> tuple:
        """Sort key of a sequence; ties should fall back to ``seq.arrival`` (first come, first served)."""

    def select_victim(self, running: list[Sequence]) -> Sequence:
        """The running sequence to preempt when blocks run out: by default the one admitted last."""
        return max(running, key=self.key)
