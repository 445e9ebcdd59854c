"""Prometheus families of a data-parallel LLM model's replicas, labelled ``replica``.

The model-level families (``vllm:num_requests_waiting``...) stay the sums over a model's replicas;
these add one sample per replica beside them. A model offers its replicas through
:class:`ReplicaMetricsSource`; one that runs a single engine offers none. Nothing here knows about
engines or processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from pagedserve.model_manager import LoadedVersion

log = logging.getLogger(__name__)

LABELS = ["model", "version", "replica"]


@dataclass(frozen=True)
class ReplicaState:
    """One replica at scrape time."""

    index: int
    up: bool
    """Takes new requests (not restarting, not given up)."""
    routed: int
    """Requests sent to it since the model loaded."""
    outstanding: int
    """Sequences sent to it and not finished yet (what ``least_outstanding`` compares)."""
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    restarts: int


@runtime_checkable
class ReplicaMetricsSource(Protocol):
    def replica_metrics(self) -> list[ReplicaState]: ...


_GAUGES: list[tuple[str, str, Callable[[ReplicaState], float]]] = [
    ("pagedserve:replica_up", "1 while the replica takes new requests", lambda r: float(r.up)),
    (
        "pagedserve:replica_outstanding_sequences",
        "Sequences routed to the replica and not finished",
        lambda r: r.outstanding,
    ),
    (
        "pagedserve:replica_num_requests_running",
        "Requests the replica's engine runs now",
        lambda r: r.num_running,
    ),
    (
        "pagedserve:replica_num_requests_waiting",
        "Requests queued in the replica's engine",
        lambda r: r.num_waiting,
    ),
    (
        "pagedserve:replica_kv_cache_usage_perc",
        "Fraction of the replica's KV-cache blocks in use",
        lambda r: r.kv_cache_usage,
    ),
]
_COUNTERS: list[tuple[str, str, Callable[[ReplicaState], float]]] = [
    ("pagedserve:replica_requests_routed_total", "Requests routed to the replica", lambda r: r.routed),
    (
        "pagedserve:replica_engine_restarts_total",
        "Times the replica's engine process died and was restarted",
        lambda r: r.restarts,
    ),
]


def replica_families(versions: list[LoadedVersion]) -> Iterator[Metric]:
    rows = []
    for version in versions:
        model = version.policy.model
        if isinstance(model, ReplicaMetricsSource):
            try:
                states = model.replica_metrics()
            except Exception:  # noqa: BLE001 - a model mid-shutdown must not break the scrape
                log.debug("replica metrics of %s unavailable", version.spec.name, exc_info=True)
                continue
            rows += [([version.spec.name, str(version.version), str(s.index)], s) for s in states]
    if not rows:
        return
    for name, documentation, read in _GAUGES:
        gauge = GaugeMetricFamily(name, documentation, labels=LABELS)
        for labels, state in rows:
            gauge.add_metric(labels, float(read(state)))
        yield gauge
    for name, documentation, read in _COUNTERS:
        counter = Metric(name, documentation, "counter")
        for labels, state in rows:
            counter.add_sample(name, dict(zip(LABELS, labels, strict=True)), float(read(state)))
        yield counter
