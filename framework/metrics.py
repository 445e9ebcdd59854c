"""Prometheus metrics on ``server.metrics_port`` (``/metrics``), with Triton's and vLLM's names.

Nothing is counted per request for Prometheus: a custom collector reads the per-version
:class:`~pagedserve.statistics.ModelStats` snapshots (the same numbers ModelStatistics returns), the
GPUs and the CPU when it is scraped. LLM models add engine metrics by offering
``engine_metrics() -> EngineMetricsSnapshot`` (see :class:`EngineMetricsSource`); they record their
latencies with :class:`LLMMetrics`. As in Triton's vLLM backend, the ``vllm:*`` families appear only
for models whose config sets the ``REPORT_CUSTOM_METRICS`` parameter to ``true``. Nothing here knows
about gRPC or protobuf.
"""

from __future__ import annotations

import logging
import re
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from pagedserve.replica_metrics import replica_families
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pagedserve.backend import ModelSpec
    from pagedserve.model_manager import LoadedVersion, ModelManager

log = logging.getLogger(__name__)

# vLLM's bucket boundaries (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
N_BUCKETS = (1, 2, 5, 10, 20)
# Token-count buckets run 1, 2, 5, 10, ... up to the model's context; this bound stands in for a
# context length the engine decides itself.
DEFAULT_MAX_MODEL_LEN = 131072
REPORT_PARAMETER = "REPORT_CUSTOM_METRICS"

# prometheus_client writes every counter family as ``<name>_total`` in HELP/TYPE lines; Triton's
# counters have no such suffix, so their HELP/TYPE lines are put back to the sample names.
_TRITON_COUNTER_HEADER = re.compile(r"^(# (?:HELP|TYPE) nv_[A-Za-z0-9_]*?)_total\b", re.MULTILINE)


# -- LLM engine metrics -----------------------------------------------------------------------------


def buckets_1_2_5(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... while <= ``limit`` (vLLM's buckets for token counts)."""
    bounds, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > limit:
                return tuple(bounds)
            bounds.append(mantissa * scale)
        scale *= 10


def reports_custom_metrics(spec: ModelSpec) -> bool:
    """The model's config asks for the ``vllm:*`` metrics (Triton's vLLM backend: off unless set)."""
    return (spec.parameter(REPORT_PARAMETER) or "").strip().lower() == "true"


@dataclass(frozen=True)
class HistogramSnapshot:
    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    """Observations <= each bound, then the total count (the ``+Inf`` bucket)."""
    total: float

    @property
    def count(self) -> int:
        return self.cumulative[-1]


class Histogram:
    """A thread-safe fixed-bucket histogram (observations are recorded by model threads)."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._total = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float, times: int = 1) -> None:
        """Record ``value`` as ``times`` observations."""
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        with self._lock:
            self._counts[index] += times
            self._total += value * times

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts, total = list(self._counts), self._total
        running, cumulative = 0, []
        for count in counts:
            running += count
            cumulative.append(running)
        return HistogramSnapshot(self.bounds, tuple(cumulative), total)


@dataclass(frozen=True)
class EngineState:
    """What the engine shows at scrape time."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    """Fraction of KV blocks in use, 0..1."""
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int
    engine_restarts: int = 0
    """Engine processes that died and were started again (0 for an engine on a server thread)."""


@dataclass(frozen=True)
class EngineMetricsSnapshot:
    state: EngineState
    prompt_tokens: int
    generation_tokens: int
    time_to_first_token: HistogramSnapshot
    time_per_output_token: HistogramSnapshot
    inter_token_latency: HistogramSnapshot
    e2e_request_latency: HistogramSnapshot
    request_prompt_tokens: HistogramSnapshot
    request_generation_tokens: HistogramSnapshot
    request_params_n: HistogramSnapshot
    request_params_max_tokens: HistogramSnapshot


@runtime_checkable
class EngineMetricsSource(Protocol):
    """A model with an LLM engine; the collector calls this on every scrape."""

    def engine_metrics(self) -> EngineMetricsSnapshot: ...


@dataclass
class RequestTimer:
    """Per-request state of :class:`LLMMetrics` (created when the request reaches the engine)."""

    start: float = field(default_factory=time.monotonic)
    n: int = 1
    """The request's sampling parameters ``n`` and ``max_tokens`` (observed when it finishes)."""
    max_tokens: int = 16
    first_token: float | None = None
    last_token: float | None = None
    num_generated: int = 0


class LLMMetrics:
    """Token counters and latency histograms of one LLM model, fed from its output thread."""

    def __init__(self, max_model_len: int | None = None) -> None:
        token_buckets = buckets_1_2_5(max_model_len or DEFAULT_MAX_MODEL_LEN)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(TPOT_BUCKETS)
        """Every gap between output tokens: vllm:time_per_output_token_seconds (Triton's vLLM backend
        observes each one) and vllm:inter_token_latency_seconds (vLLM's newer name)."""
        self.e2e = Histogram(E2E_BUCKETS)
        self.prompt_tokens = Histogram(token_buckets)
        self.generation_tokens = Histogram(token_buckets)
        self.params_n = Histogram(N_BUCKETS)
        self.params_max_tokens = Histogram(token_buckets)
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._lock = threading.Lock()

    def start(self) -> RequestTimer:
        return RequestTimer()

    def on_output(
        self, timer: RequestTimer, num_new_tokens: int, num_prompt_tokens: int, finished: bool
    ) -> None:
        """Record one engine output of a request (``num_new_tokens`` generated since the last one).

        Outputs of several steps may arrive joined (a lagging consumer's deltas are merged), so
        every token after the first counts as one inter-token latency: a joined delta's gap is
        shared among its tokens, and tokens that came with the first one count as zero gaps. The
        count is then always ``generated - 1`` per request, however the outputs were batched.
        """
        now = time.monotonic()
        if num_new_tokens:
            if timer.first_token is None:
                timer.first_token = now
                self.ttft.observe(now - timer.start)
                if num_new_tokens > 1:
                    self.itl.observe(0.0, num_new_tokens - 1)
            elif timer.last_token is not None:
                self.itl.observe((now - timer.last_token) / num_new_tokens, num_new_tokens)
            timer.last_token = now
            timer.num_generated += num_new_tokens
        if finished:
            self._finish(timer, num_prompt_tokens, now)

    def _finish(self, timer: RequestTimer, num_prompt_tokens: int, now: float) -> None:
        self.e2e.observe(now - timer.start)
        self.prompt_tokens.observe(num_prompt_tokens)
        self.generation_tokens.observe(timer.num_generated)
        self.params_n.observe(timer.n)
        self.params_max_tokens.observe(timer.max_tokens)
        with self._lock:
            self._prompt_tokens += num_prompt_tokens
            self._generation_tokens += timer.num_generated

    def snapshot(self, state: EngineState) -> EngineMetricsSnapshot:
        with self._lock:
            prompt, generation = self._prompt_tokens, self._generation_tokens
        itl = self.itl.snapshot()
        return EngineMetricsSnapshot(
            state,
            prompt,
            generation,
            self.ttft.snapshot(),
            itl,
            itl,
            self.e2e.snapshot(),
            self.prompt_tokens.snapshot(),
            self.generation_tokens.snapshot(),
            self.params_n.snapshot(),
            self.params_max_tokens.snapshot(),
        )


# -- the collector ------------------------------------------------------------------------------------

_LABELS = ["model", "version"]
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")

# Triton's counters: (name, help, how to read it from a ModelStats snapshot).
_TRITON_COUNTERS: list[tuple[str, str, Callable[[Any], float]]] = [
    (
        "nv_inference_request_success",
        "Requests answered without error (a batched request counts once)",
        lambda s: s.success.count,
    ),
    (
        "nv_inference_count",
        "Batch elements inferred: a request of batch size 8 adds 8",
        lambda s: s.inference_count,
    ),
    (
        "nv_inference_exec_count",
        "Model execute calls; one dynamic batch of many requests adds 1",
        lambda s: s.execution_count,
    ),
    (
        "nv_inference_request_duration_us",
        "Total microseconds from arrival to final response, successful requests",
        lambda s: s.success.ns // 1000,
    ),
    (
        "nv_inference_queue_duration_us",
        "Total microseconds requests waited in the batching queue",
        lambda s: s.queue.ns // 1000,
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Total microseconds spent decoding and validating input tensors",
        lambda s: s.compute_input.ns // 1000,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Total microseconds spent in model execution",
        lambda s: s.compute_infer.ns // 1000,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Total microseconds spent encoding output tensors",
        lambda s: s.compute_output.ns // 1000,
    ),
]


def _counter(name: str, documentation: str) -> Metric:
    return Metric(name, documentation, "counter")


class ServerCollector(Collector):
    """Builds every metric family from live state when Prometheus scrapes."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        versions = self.manager.ready_versions()
        yield from self._triton_metrics(versions)
        yield from _engine_metrics(versions)
        yield from replica_families(versions)
        yield from _gpu_metrics()
        yield from _cpu_metrics()

    def _triton_metrics(self, versions: list[LoadedVersion]) -> Iterator[Metric]:
        snapshots = [(_labels(v), v.stats.snapshot()) for v in versions]
        for name, documentation, read in _TRITON_COUNTERS:
            family = _counter(name, documentation)
            for labels, snap in snapshots:
                family.add_sample(name, labels, float(read(snap)))
            yield family
        failures = _counter("nv_inference_request_failure", "Requests that ended in an error")
        for labels, snap in snapshots:
            for reason in FAILURE_REASONS:
                count = snap.fail_reasons.get(reason, 0)
                failures.add_sample("nv_inference_request_failure", {**labels, "reason": reason}, count)
        yield failures
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count",
            "Requests accepted by the model but not yet answered",
            labels=_LABELS,
        )
        for version in versions:
            pending.add_metric(_label_values(version), version.inflight)
        yield pending


def _labels(version: LoadedVersion) -> dict[str, str]:
    return {"model": version.spec.name, "version": str(version.version)}


def _label_values(version: LoadedVersion) -> list[str]:
    return [version.spec.name, str(version.version)]


def _engine_metrics(versions: list[LoadedVersion]) -> Iterator[Metric]:
    rows: list[tuple[list[str], EngineMetricsSnapshot, bool]] = []
    for version in versions:
        model = version.policy.model
        if isinstance(model, EngineMetricsSource):
            try:
                snapshot = model.engine_metrics()
            except Exception:  # noqa: BLE001 - a model mid-shutdown must not break the scrape
                log.debug("engine metrics of %s unavailable", version.spec.name, exc_info=True)
                continue
            rows.append((_label_values(version), snapshot, reports_custom_metrics(version.spec)))
    if not rows:
        return
    reporting = [(labels, snap) for labels, snap, reports in rows if reports]
    if reporting:
        yield from _vllm_gauges(reporting)
        yield from _vllm_counters(reporting)
        yield from _vllm_histograms(reporting)
    # Ours, not the vLLM backend's: an operator needs it whatever the model's config says.
    restarts = _counter(
        "pagedserve:engine_restarts_total",
        "LLM engine processes that died and were restarted (their in-flight requests failed)",
    )
    for labels, snap, _ in rows:
        restarts.add_sample(
            "pagedserve:engine_restarts_total", _label_dict(labels), float(snap.state.engine_restarts)
        )
    yield restarts


_EngineRows = list[tuple[list[str], EngineMetricsSnapshot]]

_VLLM_GAUGES: list[tuple[str, str, Callable[[EngineMetricsSnapshot], float]]] = [
    ("vllm:num_requests_running", "LLM requests the engine is running now", lambda s: s.state.num_running),
    ("vllm:num_requests_waiting", "LLM requests queued for the engine", lambda s: s.state.num_waiting),
    (
        "vllm:kv_cache_usage_perc",
        "Fraction of KV-cache blocks in use (1.0 = all)",
        lambda s: s.state.kv_cache_usage,
    ),
    (
        "vllm:gpu_prefix_cache_hit_rate",
        "Share of looked-up prompt tokens served from the prefix cache",
        lambda s: _ratio(s.state.prefix_hit_tokens, s.state.prefix_queried_tokens),
    ),
]
_VLLM_COUNTERS: list[tuple[str, str, Callable[[EngineMetricsSnapshot], float]]] = [
    ("vllm:prompt_tokens_total", "Prompt tokens prefilled", lambda s: s.prompt_tokens),
    ("vllm:generation_tokens_total", "Output tokens generated", lambda s: s.generation_tokens),
    (
        "vllm:num_preemptions_total",
        "Requests preempted (and later recomputed) for lack of KV blocks",
        lambda s: s.state.num_preemptions,
    ),
    (
        "vllm:prefix_cache_queries_total",
        "Prompt tokens looked up in the prefix cache",
        lambda s: s.state.prefix_queried_tokens,
    ),
    (
        "vllm:prefix_cache_hits_total",
        "Prompt tokens found in the prefix cache",
        lambda s: s.state.prefix_hit_tokens,
    ),
]
# (name, help, EngineMetricsSnapshot attribute)
_VLLM_HISTOGRAMS = [
    (
        "vllm:time_to_first_token_seconds",
        "Seconds from arrival to the first output token",
        "time_to_first_token",
    ),
    (
        "vllm:time_per_output_token_seconds",
        "Seconds per output token after the first, one observation per token",
        "time_per_output_token",
    ),
    (
        "vllm:inter_token_latency_seconds",
        "Seconds between consecutive output tokens",
        "inter_token_latency",
    ),
    (
        "vllm:e2e_request_latency_seconds",
        "Seconds from arrival to the final response",
        "e2e_request_latency",
    ),
    ("vllm:request_prompt_tokens", "Prompt tokens of each finished request", "request_prompt_tokens"),
    (
        "vllm:request_generation_tokens",
        "Output tokens of each finished request (all n choices)",
        "request_generation_tokens",
    ),
    ("vllm:request_params_n", "The n sampling parameter of each finished request", "request_params_n"),
    (
        "vllm:request_params_max_tokens",
        "The max_tokens sampling parameter of each finished request",
        "request_params_max_tokens",
    ),
]


def _vllm_gauges(rows: _EngineRows) -> Iterator[Metric]:
    for name, documentation, read in _VLLM_GAUGES:
        gauge = GaugeMetricFamily(name, documentation, labels=_LABELS)
        for labels, snap in rows:
            gauge.add_metric(labels, float(read(snap)))
        yield gauge


def _vllm_counters(rows: _EngineRows) -> Iterator[Metric]:
    for name, documentation, read in _VLLM_COUNTERS:
        counter = _counter(name, documentation)
        for labels, snap in rows:
            counter.add_sample(name, _label_dict(labels), float(read(snap)))
        yield counter


def _vllm_histograms(rows: _EngineRows) -> Iterator[Metric]:
    for name, documentation, attribute in _VLLM_HISTOGRAMS:
        family = HistogramMetricFamily(name, documentation, labels=_LABELS)
        for labels, snap in rows:
            histogram: HistogramSnapshot = getattr(snap, attribute)
            buckets = [(_bound(b), c) for b, c in zip(histogram.bounds, histogram.cumulative, strict=False)]
            buckets.append(("+Inf", histogram.count))
            family.add_metric(labels, buckets, histogram.total)
        yield family


def _label_dict(labels: list[str]) -> dict[str, str]:
    return dict(zip(_LABELS, labels, strict=True))


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _bound(value: float) -> str:
    return repr(float(value))


def _gpu_metrics() -> Iterator[Metric]:
    """Triton's GPU gauges, through torch (NVML for utilisation and used memory); none without CUDA."""
    torch = sys.modules.get("torch")  # only if already loaded: a scrape never imports torch
    if torch is None or not torch.cuda.is_available():
        return
    utilization = GaugeMetricFamily(
        "nv_gpu_utilization", "Fraction of time the GPU was busy (0 to 1)", labels=["gpu_uuid"]
    )
    total = GaugeMetricFamily("nv_gpu_memory_total_bytes", "Memory of the GPU, bytes", labels=["gpu_uuid"])
    used = GaugeMetricFamily(
        "nv_gpu_memory_used_bytes", "Memory in use on the GPU, bytes", labels=["gpu_uuid"]
    )
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        uuid = f"GPU-{properties.uuid}"
        total.add_metric([uuid], float(properties.total_memory))
        try:
            used.add_metric([uuid], float(torch.cuda.device_memory_used(index)))
            utilization.add_metric([uuid], torch.cuda.utilization(index) / 100.0)
        except Exception:  # noqa: BLE001 - NVML (pynvml) missing or not permitted
            log.debug("NVML readings unavailable for GPU %d", index, exc_info=True)
    yield from (utilization, total, used)


def _cpu_metrics() -> Iterator[Metric]:
    import psutil

    memory = psutil.virtual_memory()
    utilization = GaugeMetricFamily("nv_cpu_utilization", "Fraction of CPU time in use across cores (0 to 1)")
    utilization.add_metric([], psutil.cpu_percent(interval=None) / 100.0)
    total = GaugeMetricFamily("nv_cpu_memory_total_bytes", "Host memory, bytes")
    total.add_metric([], float(memory.total))
    used = GaugeMetricFamily("nv_cpu_memory_used_bytes", "Host memory in use, bytes")
    used.add_metric([], float(memory.total - memory.available))
    yield from (utilization, total, used)


# -- the HTTP endpoint --------------------------------------------------------------------------------


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition, with Triton's counter names in HELP/TYPE lines."""
    text = generate_latest(registry).decode("utf-8")
    return _TRITON_COUNTER_HEADER.sub(r"\1", text).encode("utf-8")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not worth a log line each."""


class MetricsServer:
    """``GET /metrics`` on its own daemon thread (scrapes never touch the event loop)."""

    def __init__(
        self, manager: ModelManager, host: str, port: int, tls: ssl.SSLContext | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ServerCollector(manager))
        self._server = make_server(host, port, self._app, ThreadingWSGIServer, handler_class=_QuietHandler)
        if tls is not None:
            # The handshake runs on each connection's own thread, not in accept().
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port: int = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="pagedserve-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO") not in ("/metrics", "/metrics/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found; metrics are at /metrics\n"]
        body = render(self.registry)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
        return [body]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
