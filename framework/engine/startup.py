"""Where an engine's start-up time goes, phase by phase, for the log line and the engine's owner.

A fresh server's first minute is weights, the KV cache, kernel warm-up (today the one long prefill
that measures activation memory on CUDA, which also compiles that shape's kernels) and CUDA graph
capture; timing each tells which one a change made faster. Phases that do not run (all but the
weights on the CPU) stay at 0.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

PHASES = ("weights", "kv_cache", "warmup", "cuda_graphs")
_LABELS = {
    "weights": "weights",
    "kv_cache": "KV cache",
    "warmup": "kernel warm-up",
    "cuda_graphs": "CUDA graphs",
}


@dataclass(frozen=True)
class StartupPhases:
    """Seconds per phase, and the whole start-up (which also holds the small steps between them)."""

    weights: float = 0.0
    kv_cache: float = 0.0
    warmup: float = 0.0
    cuda_graphs: float = 0.0
    total: float = 0.0

    def describe(self) -> str:
        parts = [f"{_LABELS[name]} {getattr(self, name):.2f} s" for name in PHASES]
        return f"start-up: {', '.join(parts)}, total {self.total:.2f} s"


@dataclass
class StartupClock:
    _start: float = field(default_factory=time.perf_counter)
    _spent: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._spent[name] = self._spent.get(name, 0.0) + time.perf_counter() - start

    def finish(self) -> StartupPhases:
        return StartupPhases(**self._spent, total=time.perf_counter() - self._start)
