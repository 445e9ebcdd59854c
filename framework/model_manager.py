"""Model lifecycle: load, reload, unload, readiness and version resolution.

Every public method is blocking and thread-safe; the gRPC layer calls the slow ones (load, unload)
from worker threads so the event loop keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum

import grpc
from pagedserve.backend import LoadContext, ModelBackend, ModelSpec
from pagedserve.batching import BatchingPolicy, policy_name_for
from pagedserve.codec import RequestDecoder
from pagedserve.config import BackendSettings
from pagedserve.errors import InferenceError
from pagedserve.heap import FrozenHeap
from pagedserve.in_process import InProcessClient
from pagedserve.inference import InferenceRequest
from pagedserve.model_config_check import check_model_config
from pagedserve.plugin_manager import Registry
from pagedserve.repository import ModelRepository, check_model_name
from pagedserve.statistics import ModelStats

log = logging.getLogger(__name__)

# Triton platforms that name a backend we provide.
_PLATFORM_BACKENDS = {"pytorch_libtorch": "torchscript"}


class ModelState(StrEnum):
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"


class LoadedVersion:
    """A ready model version with its batching policy, statistics, request decoder and in-flight
    request count."""

    def __init__(self, spec: ModelSpec, version: int, policy: BatchingPolicy, stats: ModelStats) -> None:
        self.loaded_at = time.time()  # OpenAI's model "created"
        self.spec = spec
        self.version = version
        self.policy = policy
        self.stats = stats
        self.decoder = RequestDecoder(spec, version)
        """Checks and decodes requests for this version (its checks are planned once, here)."""
        self._inflight = 0
        # acquire/release run twice per request: a plain lock, and a notify only when an unload waits.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._waiters = 0

    def submit(self, request: InferenceRequest) -> None:
        """Queue ``request`` with this version's batching policy. A policy that refuses it (a full
        queue...) or breaks answers the request's responder, never the caller: the request is
        admitted and counted either way."""
        request.timing.queued_ns = time.monotonic_ns()
        try:
            self.policy.submit(request)
        except InferenceError as error:
            request.responder.fail(error)
        except Exception as error:  # noqa: BLE001 - a broken policy must not take the server down
            request.responder.fail(InferenceError.internal(str(error)))

    @property
    def inflight(self) -> int:
        return self._inflight

    def acquire(self) -> None:
        with self._lock:
            self._inflight += 1

    def release(self) -> None:
        with self._lock:
            self._inflight -= 1
            if self._inflight == 0 and self._waiters:
                self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._lock:
            self._waiters += 1
            try:
                return self._idle.wait_for(lambda: self._inflight == 0, timeout)
            finally:
                self._waiters -= 1

    def close(self) -> None:
        self.policy.close()
        self.policy.model.finalize()


@dataclass
class VersionRecord:
    state: ModelState
    reason: str = ""
    loaded: LoadedVersion | None = None

    def current(self) -> tuple[ModelState, str]:
        """The state as clients see it: a READY version whose model can no longer serve (its
        engine died for good) is UNAVAILABLE with the model's reason, until it is loaded again."""
        failure = self._failure()
        if failure is not None:
            return ModelState.UNAVAILABLE, failure
        return self.state, self.reason

    @property
    def serving(self) -> bool:
        """``current()`` is READY (checked on every request, so without building its tuple)."""
        return self.state is ModelState.READY and self._failure() is None

    def _failure(self) -> str | None:
        """Why a READY version's model can no longer serve, or None."""
        if self.state is not ModelState.READY or self.loaded is None:
            return None
        return self.loaded.policy.model.failure()


@dataclass
class ModelEntry:
    spec: ModelSpec | None = None
    override_json: str | None = None
    """The config override the running versions were loaded with, and the YAML's mtime then."""
    override_yaml_mtime_ns: int | None = None
    versions: dict[int, VersionRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str = ""
    state: str = ""
    reason: str = ""


class ModelManager:
    def __init__(
        self,
        repository: ModelRepository,
        backends: Registry[type[ModelBackend]],
        policies: Registry[type[BatchingPolicy]],
        settings: BackendSettings,
    ) -> None:
        self.repository = repository
        self.backends = backends
        self.policies = policies
        self.settings = settings
        self._entries: dict[str, ModelEntry] = {}
        self._lock = threading.RLock()
        # One load/unload at a time per model; different models load in parallel.
        self._model_locks: dict[str, threading.Lock] = {}
        self.client = InProcessClient(self)
        """What loaded models use to call each other (ensembles, BLS)."""
        self.heap = FrozenHeap()
        """Frozen by the server once its start-up models are loaded; kept so across loads."""

    # -- lifecycle --------------------------------------------------------------------------------

    def _model_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._model_locks.setdefault(name, threading.Lock())

    def load(self, name: str, override_json: str | None = None) -> None:
        """Load (or reload) every version the policy selects; raise InferenceError on failure."""
        check_model_name(name)
        with self._model_lock(name):
            entry = self._entries.setdefault(name, ModelEntry())
            if override_json is None:
                override_json = self._kept_override(name, entry)
            try:
                spec = self._read_spec(name, override_json)
            except InferenceError:
                raise
            except Exception as error:  # noqa: BLE001 - any parse problem becomes the model's reason
                self._mark_failed(entry, str(error))
                raise InferenceError(f"failed to load '{name}': {error}") from None
            if entry.spec is not None and entry.spec == spec and self._all_ready(entry):
                return
            new_versions = self._load_versions(spec)
            old = entry.versions
            entry.spec, entry.versions = spec, new_versions
            entry.override_json = override_json
            entry.override_yaml_mtime_ns = self.repository.mtime_ns(name) if override_json else None
            self._retire(name, {v: r for v, r in old.items() if r.loaded is not None})
            failed = [(v, r.reason) for v, r in sorted(new_versions.items()) if r.state != ModelState.READY]
        self.heap.after_load()
        if failed:
            detail = "".join(f"version {v} is at UNAVAILABLE state: {reason};\n" for v, reason in failed)
            raise InferenceError(f"load failed for model '{name}': {detail}")

    def _kept_override(self, name: str, entry: ModelEntry) -> str | None:
        """Triton's rule for a load without a config: while versions loaded with an override still
        run and the YAML has not changed since, the override stays (the load is a no-op); after an
        unload, or once the YAML changed, the YAML alone counts."""
        if entry.override_json is None or not any(r.loaded for r in entry.versions.values()):
            return None
        if self.repository.mtime_ns(name) != entry.override_yaml_mtime_ns:
            return None
        return entry.override_json

    def _read_spec(self, name: str, override_json: str | None) -> ModelSpec:
        spec = self.repository.read(name, override_json)
        # Checked before the backend sees it (auto_complete may turn enums into names) and after,
        # with what the backend filled in.
        check_model_config(spec.config)
        backend = self._backend_for(spec)
        backend.auto_complete(spec.config)
        check_model_config(spec.config)
        return spec

    def _backend_for(self, spec: ModelSpec) -> type[ModelBackend]:
        name = spec.config.backend or _PLATFORM_BACKENDS.get(spec.config.platform, spec.config.platform)
        if not name:
            raise ValueError(
                f"model '{spec.name}' names no 'backend'; available: {', '.join(self.backends.names())}"
            )
        return self.backends.get(name)

    def _load_versions(self, spec: ModelSpec) -> dict[int, VersionRecord]:
        records: dict[int, VersionRecord] = {}
        for version in spec.versions:
            try:
                records[version] = VersionRecord(ModelState.READY, "", self._load_version(spec, version))
            except Exception as error:  # noqa: BLE001 - the text is the version's UNAVAILABLE reason
                log.error("failed to load '%s' version %d: %s", spec.name, version, error)
                records[version] = VersionRecord(ModelState.UNAVAILABLE, str(error) or type(error).__name__)
        return records

    def _load_version(self, spec: ModelSpec, version: int) -> LoadedVersion:
        backend = self._backend_for(spec)()
        model = backend.load(spec, LoadContext(version=version, settings=self.settings, client=self.client))
        stats = ModelStats()
        try:
            policy = self.policies.get(policy_name_for(spec))(model, spec, stats)
        except Exception:
            model.finalize()
            raise
        return LoadedVersion(spec, version, policy, stats)

    def _mark_failed(self, entry: ModelEntry, reason: str) -> None:
        """A config that cannot be read leaves versions that still run alone; otherwise it is the
        model's state (Triton's index shows it UNAVAILABLE with the reason)."""
        if not any(r.loaded for r in entry.versions.values()):
            entry.versions = {0: VersionRecord(ModelState.UNAVAILABLE, reason)}

    def unload(self, name: str, timeout: float | None = None) -> None:
        """Stop accepting requests, let in-flight ones finish, then release the model."""
        check_model_name(name)
        with self._model_lock(name):
            entry = self._entries.get(name)
            if entry is None:
                return
            loaded = {v: r for v, r in entry.versions.items() if r.loaded is not None}
            for record in loaded.values():
                record.state = ModelState.UNLOADING
            self._retire(name, loaded, wait=True, timeout=timeout)
            for record in entry.versions.values():
                record.state, record.reason, record.loaded = ModelState.UNAVAILABLE, "unloaded", None
            entry.override_json = entry.override_yaml_mtime_ns = None  # the next load reads the YAML

    def _retire(
        self, name: str, records: dict[int, VersionRecord], wait: bool = False, timeout: float | None = None
    ) -> None:
        """Close replaced or unloaded versions once idle (in the background unless ``wait``)."""

        def close_all() -> None:
            for version, record in records.items():
                loaded, record.loaded = record.loaded, None  # nothing here keeps the model alive
                assert loaded is not None
                if not loaded.wait_idle(timeout):
                    log.warning("'%s' version %d closed with requests still in flight", name, version)
                loaded.close()
                del loaded
            if records:
                self.heap.after_close()

        if wait:
            close_all()
        elif records:
            threading.Thread(target=close_all, name=f"retire-{name}", daemon=True).start()

    def shutdown(self, timeout: float | None = None) -> None:
        for name in list(self._entries):
            self.unload(name, timeout)

    # -- lookup -----------------------------------------------------------------------------------

    @contextmanager
    def use(self, name: str, version: str = "") -> Iterator[LoadedVersion]:
        """Resolve and hold a version for one request (unload waits for it)."""
        loaded = self.acquire(name, version)
        try:
            yield loaded
        finally:
            loaded.release()

    def acquire(self, name: str, version: str = "") -> LoadedVersion:
        with self._lock:
            loaded = self.resolve(name, version)
            loaded.acquire()
            return loaded

    def resolve(self, name: str, version: str = "") -> LoadedVersion:
        """Triton's lookup rules and messages: latest READY version, or the one asked for."""
        number = parse_version(version) if version else None
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.spec is None:
                if name in self._entries:
                    raise InferenceError.not_found(
                        f"Request for unknown model: '{name}' has no available versions"
                    )
                raise InferenceError.not_found(f"Request for unknown model: '{name}' is not found")
            if number is None:
                versions = entry.versions
                # the usual model has one version: no sort per request
                for record in versions.values() if len(versions) == 1 else _newest_first(versions):
                    if record.serving:
                        return record.loaded  # type: ignore[return-value]
                raise InferenceError.not_found(
                    f"Request for unknown model: '{name}' has no available versions"
                )
            record = entry.versions.get(number)
            if record is None:
                raise InferenceError.not_found(
                    f"Request for unknown model: '{name}' version {number} is not found"
                )
            if not record.serving or record.loaded is None:
                raise InferenceError.unavailable(
                    f"Request for unknown model: '{name}' version {number} is not at ready state"
                )
            return record.loaded

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
        except InferenceError as error:
            if error.code == grpc.StatusCode.INVALID_ARGUMENT:
                raise
            return False
        return True

    def ready_versions(self, name: str = "") -> list[LoadedVersion]:
        with self._lock:
            entries = [self._entries.get(name)] if name else list(self._entries.values())
            return [
                r.loaded
                for e in entries
                if e is not None
                for _, r in sorted(e.versions.items())
                if r.state == ModelState.READY and r.loaded is not None
            ]

    def spec(self, name: str) -> ModelSpec | None:
        with self._lock:
            entry = self._entries.get(name)
            return entry.spec if entry else None

    def all_ready(self) -> bool:
        """Strict readiness: every version the server knows is READY (unloaded ones excepted)."""
        with self._lock:
            records = [r for e in self._entries.values() for r in e.versions.values()]
            return all(r.serving or r.reason == "unloaded" for r in records)

    def _all_ready(self, entry: ModelEntry) -> bool:
        return bool(entry.versions) and all(r.serving for r in entry.versions.values())

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        with self._lock:
            rows: list[IndexEntry] = []
            for name in sorted(set(self.repository.names()) | set(self._entries)):
                entry = self._entries.get(name)
                if entry is None or not entry.versions:
                    if not ready_only:
                        rows.append(IndexEntry(name))
                    continue
                for version, record in sorted(entry.versions.items()):
                    state, reason = record.current()
                    if ready_only and state != ModelState.READY:
                        continue
                    rows.append(IndexEntry(name, str(version) if version else "", state.value, reason))
            return rows


def _newest_first(versions: dict[int, VersionRecord]) -> list[VersionRecord]:
    return [versions[number] for number in sorted(versions, reverse=True)]


def parse_version(version: str) -> int | None:
    if not version:
        return None
    try:
        number = int(version)
    except ValueError:
        raise InferenceError(
            f"failed to get model version from specified version string '{version}' (details: invalid "
            "literal), version should be an integral value > 0"
        ) from None
    if number <= 0:
        raise InferenceError(
            f"invalid model version specified '{version}' , version should be an integral value > 0"
        )
    return number
