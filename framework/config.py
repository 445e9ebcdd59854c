"""The typed configuration: dataclass schemas registered in Hydra's ConfigStore.

``serve`` composes ``conf/config.yaml`` over :class:`ServeConfig`, then converts it once with
``OmegaConf.to_object``; from there on only these dataclasses travel. Field validation raises
``ValueError`` naming the dotted key and the allowed values.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING
from pagedserve import __version__
from pagedserve.engine.config import (
    DTYPES,
    LOAD_FORMATS,
    QUANTIZATIONS,
    CacheConfig,
    SchedulerConfig,
    check_choice,
    check_compile_cache_dir,
    default_compile_cache_dir,
)

# Triton's extension names (ServerMetadata.extensions), the ones our server implements.
EXTENSIONS = [
    "classification",
    "sequence",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "model_configuration",
    "system_shared_memory",
    "cuda_shared_memory",
    "binary_tensor_data",
    "parameters",
    "statistics",
    "trace",
    "logging",
]


class ModelControlMode(Enum):
    none = "none"
    explicit = "explicit"
    poll = "poll"


# Triton's restricted-protocol groups (``--grpc-restricted-protocol``), in Triton's order.
PROTOCOL_GROUPS = [
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
]


@dataclass
class RestrictedProtocol:
    """Protocol groups a call may use only with header ``triton-grpc-protocol-<key>: <value>``."""

    protocols: list[str] = field(default_factory=list)
    """Any of :data:`PROTOCOL_GROUPS`."""
    key: str = ""
    value: str = ""


@dataclass
class TlsConfig:
    """TLS on the gRPC and metrics ports (Triton's ``--grpc-use-ssl*`` flags); off while ``cert`` is empty."""

    cert: str = ""
    """PEM server certificate (chain)."""
    key: str = ""
    """PEM private key of ``cert``."""
    root_ca: str = ""
    """PEM root certificate(s) that client certificates must chain to (mutual TLS)."""
    require_client_cert: bool = False
    """Mutual TLS: refuse clients without a certificate signed by ``root_ca``."""

    @property
    def enabled(self) -> bool:
        return bool(self.cert)

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("server.tls.cert and server.tls.key must be given together")
        if self.require_client_cert and not (self.enabled and self.root_ca):
            raise ValueError("server.tls.require_client_cert needs server.tls.cert, key and root_ca")
        if self.root_ca and not self.enabled:
            raise ValueError("server.tls.root_ca needs server.tls.cert and server.tls.key")


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    """Address the gRPC and metrics ports bind; the default is every interface."""
    grpc_port: int = 8001
    """0 picks a free port (printed at start)."""
    http_port: int = 8000
    """The ``http`` front-end's port (KServe v2 REST); 0 picks a free port (printed at start)."""
    openai_port: int = 9000
    """The ``openai`` front-end's port (Triton's OpenAI front-end uses 9000); 0 picks a free port."""
    max_message_bytes: int = 64 * 2**20
    """Largest request/response message. Triton allows INT32_MAX; a few requests that large at once
    exhaust a small host's memory, so the default is Triton's HTTP input limit, 64 MiB."""
    name: str = "triton"
    """ServerMetadata.name; Triton's clients check for "triton"."""
    version: str = __version__
    extensions: list[str] = field(default_factory=lambda: list(EXTENSIONS))
    strict_readiness: bool = True
    """ServerReady is false while any loaded model version is not READY."""
    exit_on_error: bool = True
    """A model that fails to load at start fails the start (Triton's ``--exit-on-error``); false serves
    the models that loaded and reports the others UNAVAILABLE."""
    workers: int = 16
    """Threads for blocking work (model loads, executes of direct-policy models)."""
    metrics_port: int = 8002
    """Prometheus ``/metrics`` port; 0 picks a free port (printed at start), -1 turns metrics off."""
    allow_client_shm: bool = False
    """Allow clients to register system/CUDA shared-memory regions (Triton's ``--allow-client-shm``)."""
    max_shm_regions: int = 4096
    """Most shared-memory regions (system and CUDA together) registered at once; one more is
    RESOURCE_EXHAUSTED."""
    exit_timeout_s: float = 30.0
    """How long shutdown waits for in-flight requests (Triton's ``--exit-timeout-secs``)."""
    restricted_protocols: list[RestrictedProtocol] = field(default_factory=list)
    """Triton's ``--grpc-restricted-protocol``: each entry names protocol groups and the header
    key/value their calls must carry; a group may appear in one entry only."""
    tls: TlsConfig = field(default_factory=TlsConfig)

    def __post_init__(self) -> None:
        for key in ("grpc_port", "http_port", "openai_port"):
            port = getattr(self, key)
            if not 0 <= port <= 65535:
                raise ValueError(f"server.{key} must be in [0, 65535], got {port}")
        if self.max_message_bytes <= 0 or self.max_message_bytes > 2**31 - 1:
            raise ValueError(
                f"server.max_message_bytes must be in [1, {2**31 - 1}], got {self.max_message_bytes}"
            )
        if self.workers < 1:
            raise ValueError(f"server.workers must be >= 1, got {self.workers}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"server.metrics_port must be in [-1, 65535], got {self.metrics_port}")
        if self.max_shm_regions < 1:
            raise ValueError(f"server.max_shm_regions must be >= 1, got {self.max_shm_regions}")
        if self.exit_timeout_s < 0:
            raise ValueError(f"server.exit_timeout_s must be >= 0, got {self.exit_timeout_s}")
        self._check_restricted_protocols()

    def _check_restricted_protocols(self) -> None:
        seen: set[str] = set()
        for i, entry in enumerate(self.restricted_protocols):
            key = f"server.restricted_protocols[{i}]"
            if not entry.protocols:
                raise ValueError(f"{key}.protocols must name at least one of {PROTOCOL_GROUPS}")
            for protocol in entry.protocols:
                if protocol not in PROTOCOL_GROUPS:
                    raise ValueError(
                        f"{key}.protocols: unknown restricted protocol '{protocol}'; one of {PROTOCOL_GROUPS}"
                    )
                if protocol in seen:
                    raise ValueError(
                        f"{key}.protocols: restricted protocol '{protocol}' can not be specified in "
                        "multiple config groups"
                    )
                seen.add(protocol)
            # gRPC metadata keys are lowercase ASCII; anything else could never match a header.
            if not entry.key or not all(c.islower() or c.isdigit() or c in "-_." for c in entry.key):
                raise ValueError(f"{key}.key must be non-empty lowercase letters, digits, '-', '_' or '.'")
            if not entry.value:
                raise ValueError(f"{key}.value must not be empty")


TRACE_LEVELS = ["OFF", "TIMESTAMPS", "TENSORS"]


@dataclass
class OpenTelemetryConfig:
    """Options of the ``opentelemetry`` trace exporter (Triton's ``--trace-config opentelemetry,...``)."""

    url: str = "localhost:4317"
    """OTLP/gRPC collector endpoint."""
    resource: list[str] = field(default_factory=lambda: ["service.name=pagedserve"])
    """``key=value`` resource attributes."""
    bsp_max_queue_size: int = 2048
    bsp_schedule_delay: int = 5000
    """Milliseconds between two exports of the batch span processor."""
    bsp_max_export_batch_size: int = 512

    def __post_init__(self) -> None:
        for item in self.resource:
            if "=" not in item:
                raise ValueError(f"tracing.opentelemetry.resource entries must be key=value, got {item!r}")
        if not 0 < self.bsp_max_export_batch_size <= self.bsp_max_queue_size:
            raise ValueError(
                "tracing.opentelemetry.bsp_max_export_batch_size must be in [1, bsp_max_queue_size], got "
                f"{self.bsp_max_export_batch_size}"
            )


@dataclass
class TracingConfig:
    """Start-up trace settings; TraceSetting changes all but ``file`` and ``mode`` at run time, and
    clearing a setting over the network returns it to the value given here."""

    mode: str = "triton"
    """The trace exporter plugin: ``triton`` (JSON file) or ``opentelemetry`` (OTLP)."""
    file: str = ""
    """Where the ``triton`` exporter writes (``<file>.<n>`` when ``log_frequency`` > 0)."""
    level: list[str] = field(default_factory=lambda: ["OFF"])
    """``OFF``, or any of ``TIMESTAMPS`` and ``TENSORS``."""
    rate: int = 1000
    """Trace one request in every ``rate``."""
    count: int = -1
    """How many traces to collect; -1 = no limit."""
    log_frequency: int = 0
    """Write the file every N traces (0: when the server stops)."""
    opentelemetry: OpenTelemetryConfig = field(default_factory=OpenTelemetryConfig)

    def __post_init__(self) -> None:
        levels = list(self.level)
        if any(level not in TRACE_LEVELS for level in levels) or not levels:
            raise ValueError(f"tracing.level entries must be in {TRACE_LEVELS}, got {levels}")
        if "OFF" in levels and len(levels) > 1:
            raise ValueError(f"tracing.level 'OFF' must be given alone, got {levels}")
        if self.rate < 0:
            raise ValueError(f"tracing.rate must be >= 0, got {self.rate}")
        if self.count < -1:
            raise ValueError(f"tracing.count must be >= -1, got {self.count}")
        if self.log_frequency < 0:
            raise ValueError(f"tracing.log_frequency must be >= 0, got {self.log_frequency}")


class LogFormat(Enum):
    default = "default"
    ISO8601 = "ISO8601"


@dataclass
class LoggingConfig:
    """Start-up log settings (Triton's ``--log-*`` flags); LogSettings changes all but ``file``."""

    file: str = ""
    """Write log lines to this file instead of the console."""
    info: bool = True
    warning: bool = True
    error: bool = True
    verbose_level: int = 0
    """0 = no verbose lines; N shows verbose messages of level <= N (DEBUG and below)."""
    format: LogFormat = LogFormat.default

    def __post_init__(self) -> None:
        if self.verbose_level < 0:
            raise ValueError(f"logging.verbose_level must be >= 0, got {self.verbose_level}")


@dataclass
class PluginsConfig:
    disable: list[str] = field(default_factory=list)
    """Plugin (entry-point) names not to load."""


@dataclass
class EngineSettings:
    """LLM engine options shared by every LLM model of the server."""

    device: str = "auto"
    dtype: str = "auto"
    load_format: str = "auto"
    """``auto`` reads the weights; ``dummy`` runs the architecture with random weights."""
    weights: str | None = None
    """A Hugging Face directory for LLM models whose YAML leaves ``parameters.weights`` empty
    (``llama3``); a model YAML that names its weights keeps them."""
    seed: int = 0
    max_model_len: int | None = None
    quantization: str | None = None
    """``fp8``: float8 weights for the linear layers (see pagedserve.engine.config.EngineConfig)."""
    separate_process: bool = True
    """Run each LLM engine in its own process, as vLLM's engine core does: its step loop then never
    waits for the GIL behind request handling and response streaming. ``false`` runs it on a thread
    of the server process."""
    max_prompt_bytes: int = 2**20
    """Largest ``text_input`` an LLM model accepts (INVALID_ARGUMENT above it), checked before it is
    tokenized: 1 MiB holds a 128k-token context at 8 bytes a token."""
    cpu_threads: int | None = None
    """torch's intra-op CPU threads for each engine (and in ``bench``). ``null``: the physical cores
    this process may run on, less one for the server's own work, at least 1. The engine process's
    OpenMP threads sleep while they wait instead of spinning, so they never take a core the server or
    another process needs. With ``separate_process=false`` it sets the whole server process's threads.
    Several LLM models each get this many: share the cores with an explicit number."""
    tensor_parallel_size: int = 1
    """Split each LLM engine over this many ranks (heads, weights and KV cache; vLLM's
    ``tensor_parallel_size``): one GPU per rank on CUDA, gloo between processes on the CPU."""
    compile_cache_dir: str = field(default_factory=default_compile_cache_dir)
    """Folder where Triton keeps the kernels it compiles, so the next server on this machine loads them
    instead of compiling again (the engine's processes get it as ``TRITON_CACHE_DIR``). Default
    ``~/.cache/pagedserve/triton``; ``""`` leaves Triton's own default (``~/.triton/cache``)."""

    def __post_init__(self) -> None:
        check_choice("engine.dtype", self.dtype, DTYPES)
        check_choice("engine.load_format", self.load_format, LOAD_FORMATS)
        check_choice("engine.quantization", self.quantization, QUANTIZATIONS)
        if self.max_prompt_bytes < 1:
            raise ValueError(
                f"engine.max_prompt_bytes must be a positive integer, got {self.max_prompt_bytes!r}"
            )
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(
                f"engine.cpu_threads must be a positive integer (or null: automatic), got {self.cpu_threads}"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"engine.tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size}"
            )
        check_compile_cache_dir("engine.compile_cache_dir", self.compile_cache_dir)


@dataclass
class ServeConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    frontends: list[str] = field(default_factory=lambda: ["grpc", "http", "openai"])
    """Protocol front-ends to serve, by name (the ``pagedserve_frontends`` hook): ``grpc``, ``http``,
    ``openai``; all share the same models, statistics and metrics."""
    model_control_mode: ModelControlMode = ModelControlMode.none
    repository: str | None = None
    """Folder of model YAMLs; default: the shipped conf/models."""
    model: Any = None
    """Name or list of names to load at start; unset loads every model (with autoload) except in
    explicit mode, where nothing else loads."""
    poll_interval_s: float = 15.0
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    scheduler: SchedulerConfig = MISSING
    cache: CacheConfig = field(default_factory=CacheConfig)
    kernel: str = "auto"
    cuda_graphs: bool = True
    engine: EngineSettings = field(default_factory=EngineSettings)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    check: bool = False
    """Load the start-up models, print the table and exit (non-zero if one failed): validates a
    configuration, and lets ``serve -m`` sweeps finish."""

    def __post_init__(self) -> None:
        if not self.frontends:
            raise ValueError("frontends must name at least one front-end (grpc, http, openai)")
        if len(set(self.frontends)) != len(self.frontends):
            raise ValueError(f"frontends names a front-end twice: {self.frontends}")
        if self.poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {self.poll_interval_s}")
        models = self.startup_models()
        if models is not None and not all(isinstance(m, str) and m for m in models):
            raise ValueError(f"model must be a model name or a list of names, got {self.model!r}")

    def startup_models(self) -> list[str] | None:
        """Names to load at start; None means "every model with autoload"."""
        if self.model is None:
            return None
        if isinstance(self.model, str):
            return [m for m in self.model.split(",") if m]
        return list(self.model)

    def repository_path(self) -> Path:
        if self.repository:
            return Path(self.repository).expanduser().resolve()
        return Path(str(importlib.resources.files("pagedserve.conf") / "models"))


@dataclass
class BenchSettings:
    """The offline throughput benchmark (``bench``); see pagedserve.benchmarks.workload."""

    num_requests: int = 512
    prompt_len: list[int] = field(default_factory=lambda: [64, 1024])
    output_len: list[int] = field(default_factory=lambda: [16, 512])
    seed: int = 0
    peers: list[str] = field(default_factory=lambda: ["hf_generate", "hf_continuous"])
    """HF transformers peers run in the same process after our engine: hf_generate, hf_continuous."""
    hf_batch_size: int = 64
    hf_block_size: int = 64
    hf_num_blocks: int = 1024
    hf_max_batch_tokens: int = 2048
    limit_output_tokens_per_s: float | None = None
    """The physical limit for this workload on this machine, to report a ratio against."""
    ttft_p99_bound_ms: float | None = None
    """A sweep's constraint: runs whose TTFT p99 exceeds it get a penalised objective
    (pagedserve.benchmarks.sweep.objective)."""

    def __post_init__(self) -> None:
        if self.ttft_p99_bound_ms is not None and not self.ttft_p99_bound_ms > 0:
            raise ValueError(f"bench.ttft_p99_bound_ms must be > 0, got {self.ttft_p99_bound_ms}")
        for key in ("prompt_len", "output_len"):
            low_high = getattr(self, key)
            if len(low_high) != 2 or not 1 <= low_high[0] <= low_high[1]:
                raise ValueError(f"bench.{key} must be [low, high] with 1 <= low <= high, got {low_high}")
        if self.num_requests < 1:
            raise ValueError(f"bench.num_requests must be >= 1, got {self.num_requests}")


@dataclass
class BenchConfig(ServeConfig):
    bench: BenchSettings = field(default_factory=BenchSettings)


@dataclass(frozen=True)
class BackendSettings:
    """What model backends get from the server config (narrow, typed; never the whole config)."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kernel: str = "auto"
    cuda_graphs: bool = True
    engine: EngineSettings = field(default_factory=EngineSettings)
    registries: Any = None
    """The plugin registries (attention backends, scheduling policies, architectures)."""

    @classmethod
    def from_config(cls, config: ServeConfig, registries: Any = None) -> BackendSettings:
        return cls(
            config.cache, config.scheduler, config.kernel, config.cuda_graphs, config.engine, registries
        )


def register_configs(store: ConfigStore) -> None:
    store.store(name="serve_schema", node=ServeConfig)
    store.store(name="bench_schema", node=BenchConfig)
    store.store(group="scheduler", name="base_scheduler", node=SchedulerConfig)
