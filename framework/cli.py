"""The ``serve`` console script: plugins → config store → Hydra compose → typed config → server."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pagedserve.config import BackendSettings, BenchConfig, ModelControlMode, ServeConfig, register_configs
from pagedserve.console import console, model_table, plugin_table, setup_logging
from pagedserve.core import ServerCore
from pagedserve.errors import InferenceError
from pagedserve.frontends import BindError, Frontend
from pagedserve.help import help_text
from pagedserve.log_settings import LogController
from pagedserve.metrics import MetricsServer
from pagedserve.model_manager import ModelManager
from pagedserve.plugin_manager import PluginHost, Registries, RegistryError
from pagedserve.repository import ModelRepository
from pagedserve.tls import tls_context
from pagedserve.tracing import Tracer, TraceSettings

log = logging.getLogger("pagedserve")

# Exit codes (docs/architecture.md): the command line or configuration is wrong; it is valid but the
# server could not start or a start-up model failed to load.
EXIT_CONFIG = 2
EXIT_FAILED = 1

# Set by serve() before Hydra runs the app; Hydra's decorator leaves no other way to pass it in.
_host: PluginHost | None = None
# Set once Hydra has composed a configuration and calls the app: a later exit is not a config error.
_app_started = False


def _prepare() -> PluginHost:
    global _host
    _host = PluginHost()
    store = ConfigStore.instance()
    register_configs(store)
    _host.hook.pagedserve_add_config(config_store=store)
    return _host


def serve() -> None:
    """Entry point. ``serve --info`` lists plugins, ``serve --help`` explains the command line;
    everything else is a Hydra command line."""
    host = _prepare()
    args = sys.argv[1:]
    if "--info" in args:
        console.print(plugin_table(host, host.registries()))
        return
    if "--help" in args or "-h" in args:
        print(help_text(), end="")
        return
    _run_hydra(_hydra_main)


def _run_hydra(main: Any) -> None:
    """Hydra exits 1 for a command line it cannot compose (unknown key, unknown group option); those
    are configuration errors, which exit 2 like the values our schema refuses."""
    global _app_started
    _app_started = False
    try:
        main()
    except SystemExit as done:
        if done.code == 1 and not _app_started:
            sys.exit(EXIT_CONFIG)
        raise


def bench() -> None:
    """The offline throughput benchmark, a Hydra app over the same config (conf/bench.yaml)."""
    # The engine runs in this process: OpenMP must not spin-wait beside the other threads (see
    # pagedserve.engine.process_setup); it reads this once, when the plugins first load torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _prepare()
    _run_hydra(_bench_main)


def _typed(cfg: DictConfig, kind: type) -> Any:
    try:
        config = OmegaConf.to_object(cfg)
    except (ValueError, OmegaConfBaseException) as error:
        console.print(f"[red]invalid configuration:[/] {error}")
        sys.exit(EXIT_CONFIG)
    assert isinstance(config, kind)
    return config


@hydra.main(version_base=None, config_path="pkg://pagedserve.conf", config_name="bench")
def _bench_main(cfg: DictConfig) -> float:
    """One benchmark run (one job of ``bench -m``); returns the sweep objective (Optuna maximises it)."""
    global _app_started
    _app_started = True
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from pagedserve.benchmarks import sweep
    from pagedserve.benchmarks.throughput import print_rows, run_bench, save_rows, sweep_rows

    config = _typed(cfg, BenchConfig)
    setup_logging()
    assert _host is not None
    for name in config.plugins.disable:
        _host.pm.set_blocked(name)
    rows = run_bench(config, _host.registries())
    print_rows(rows, config.bench.limit_output_tokens_per_s)
    hydra_config = HydraConfig.get()
    output_dir = Path(hydra_config.runtime.output_dir)
    save_rows(rows, output_dir)
    objective = sweep.objective(rows[0].output_tps, rows[0].ttft_p99_ms, config.bench.ttft_p99_bound_ms)
    if hydra_config.mode == RunMode.MULTIRUN:
        settings = sweep.job_settings(hydra_config.overrides.task)
        sweep.save_job(output_dir, hydra_config.job.num, settings, sweep_rows(rows), objective)
    # A sweep composes the next job's command line after this one: its errors are config errors.
    _app_started = False
    return objective


@hydra.main(version_base=None, config_path="pkg://pagedserve.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    global _app_started
    _app_started = True
    config = _typed(cfg, ServeConfig)
    assert _host is not None
    code = run(config, _host)
    if code:
        sys.exit(code)  # returning instead on success lets a multirun go on to its next job


def run(config: ServeConfig, host: PluginHost) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    setup_logging()
    logs = LogController(config.logging)
    logs.install()
    for name in config.plugins.disable:
        host.pm.set_blocked(name)
    registries = host.registries()
    try:
        tracer = _tracer(config, registries)
    except RegistryError as error:
        console.print(f"[red]invalid configuration:[/] tracing.mode: {error}")
        return EXIT_CONFIG
    repository = ModelRepository(config.repository_path())
    if not repository.path.is_dir():
        console.print(f"[red]invalid configuration:[/] repository '{repository.path}' is not a directory")
        return EXIT_CONFIG
    problem = _unreadable_tls_file(config)
    if problem:
        console.print(f"[red]invalid configuration:[/] {problem}")
        return EXIT_CONFIG
    manager = ModelManager(
        repository,
        registries.model_backends,
        registries.batching_policies,
        BackendSettings.from_config(config, registries),
    )
    try:
        frontends = [registries.frontends.get(name) for name in config.frontends]
    except RegistryError as error:
        console.print(f"[red]invalid configuration:[/] frontends: {error}")
        return EXIT_CONFIG
    return asyncio.run(_serve(config, ServerCore(config, manager, tracer, logs), frontends))


def _unreadable_tls_file(config: ServeConfig) -> str | None:
    tls = config.server.tls
    for key in ("cert", "key", "root_ca"):
        path = getattr(tls, key)
        if path and not Path(path).is_file():
            return f"server.tls.{key}: '{path}' is not a readable file"
    return None


def _tracer(config: ServeConfig, registries: Registries) -> Tracer:
    exporter = registries.trace_exporters.get(config.tracing.mode)
    return Tracer(TraceSettings(config.tracing), exporter(config.tracing))


async def _serve(config: ServeConfig, core: ServerCore, kinds: list[type[Frontend]]) -> int:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(config.server.workers, thread_name_prefix="pagedserve"))
    stop = _StopSignals(loop)
    try:
        if config.check:
            return await _check(config, core.manager, stop)
        frontends: list[Frontend] = []
        try:
            for kind in kinds:
                frontend = kind(config, core)
                # One machine-readable line per front-end on stdout: scripts and tests read ports here.
                print(f"pagedserve: {await frontend.start()}", flush=True)
                frontends.append(frontend)
        except BindError as error:
            console.print(f"[red]cannot start:[/] {error}")
            await _stop_frontends(frontends, 0)
            return EXIT_FAILED
        metrics = _start_metrics(config, core.manager)
        try:
            return await _serve_until_stopped(config, core, frontends, stop)
        finally:
            if metrics is not None:
                metrics.stop()
    finally:
        stop.remove()
        core.tracer.close()  # the exporter writes what it still holds


async def _stop_frontends(frontends: list[Frontend], grace: float) -> None:
    await asyncio.gather(*(frontend.stop(grace) for frontend in frontends))


class _StopSignals:
    """SIGINT/SIGTERM: the first starts the drain, a second one exits at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._received, sig)

        self.loading = False

    def _received(self, sig: signal.Signals) -> None:
        if self.loading:
            # Nothing is served yet, so there is nothing to drain; a model load cannot be cut short.
            console.print(f"{sig.name} while loading the start-up models: exiting now")
            os._exit(EXIT_FAILED)
        if self.event.is_set():
            console.print(f"{sig.name} again: exiting now, abandoning in-flight requests")
            # The engine processes see their command pipes close and exit too.
            os._exit(EXIT_FAILED)
        self.event.set()

    def remove(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.remove_signal_handler(sig)


async def _check(config: ServeConfig, manager: ModelManager, stop: _StopSignals) -> int:
    """``check=true``: load the start-up models, print the table, exit; no port is opened."""
    failed = await _load_startup_models(config, manager, stop)
    console.print(model_table(manager.index()))
    ready = len(manager.index(ready_only=True))
    await asyncio.get_running_loop().run_in_executor(None, manager.shutdown, 0.0)
    if failed:
        _report_failures(failed)
        return EXIT_FAILED
    print(f"pagedserve: check passed: {ready} model version(s) READY", flush=True)
    return 0


def _report_failures(failed: list[str]) -> None:
    for error in failed:
        console.print(f"[red]{error}[/]")  # the model manager's messages name the model


def _start_metrics(config: ServeConfig, manager: ModelManager) -> MetricsServer | None:
    host, port = config.server.host, config.server.metrics_port
    if port < 0:
        return None
    try:
        metrics = MetricsServer(manager, host, port, tls_context(config.server.tls))
    except OSError as error:
        # Metrics are an add-on: a taken port must not keep the inference service down.
        log.warning(
            "metrics: cannot listen on %s:%d (%s); serving without /metrics (server.metrics_port)",
            host,
            port,
            error.strerror or error,
        )
        return None
    metrics.start()
    print(f"pagedserve: metrics listening on {host}:{metrics.port}", flush=True)
    return metrics


async def _serve_until_stopped(
    config: ServeConfig, core: ServerCore, frontends: list[Frontend], stop: _StopSignals
) -> int:
    manager = core.manager
    failed = await _load_startup_models(config, manager, stop)
    console.print(model_table(manager.index()))
    if failed:
        _report_failures(failed)
        if config.server.exit_on_error:
            console.print(
                "exiting: a start-up model failed to load (server.exit_on_error=false serves the rest)"
            )
            core.exiting = True
            await _stop_frontends(frontends, 0)
            core.shm.close()
            manager.shutdown(0.0)
            return EXIT_FAILED
    manager.heap.freeze()  # what start-up built stays for good: no full collection walks it again
    core.started = True
    _update_health(frontends)
    background = [asyncio.create_task(_refresh_health(frontends))]
    if config.model_control_mode == ModelControlMode.poll:
        background.append(asyncio.create_task(_poll(config, manager)))
    await stop.event.wait()
    for task in background:
        task.cancel()
    await _drain(config, core, frontends)
    return 0


async def _drain(config: ServeConfig, core: ServerCore, frontends: list[Frontend]) -> None:
    """Refuse new work at once, let running requests finish for up to ``server.exit_timeout_s``."""
    core.exiting = True  # ServerReady false and new inference UNAVAILABLE on every front-end
    for frontend in frontends:
        frontend.begin_drain()
    manager = core.manager
    timeout = config.server.exit_timeout_s
    busy = [v for v in manager.ready_versions() if v.inflight]
    if busy:
        counts = ", ".join(f"{v.spec.name} ({v.inflight})" for v in busy)
        log.info(
            "shutting down: waiting up to %.0fs (server.exit_timeout_s) for in-flight requests of %s; "
            "signal again to exit now",
            timeout,
            counts,
        )
    else:
        log.info("shutting down: no requests in flight")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for version in busy:
        remaining = max(0.0, deadline - loop.time())
        if not await loop.run_in_executor(None, version.wait_idle, remaining):
            log.warning(
                "shutting down: '%s' still has %d request(s) after %.0fs; the port closing cancels them",
                version.spec.name,
                version.inflight,
                timeout,
            )
    await _stop_frontends(frontends, 1.0)  # ends idle streams and whatever outlived the timeout
    core.shm.close()
    await loop.run_in_executor(None, manager.shutdown, 0.0)


def _startup_names(config: ServeConfig, manager: ModelManager) -> list[str]:
    """The models to load at start: those named, else (but in explicit mode) every autoload one."""
    named = config.startup_models()
    if named is not None:
        return named
    if config.model_control_mode == ModelControlMode.explicit:
        return []
    return manager.repository.autoload_names()


async def _load_startup_models(config: ServeConfig, manager: ModelManager, stop: _StopSignals) -> list[str]:
    names = _startup_names(config, manager)
    loop = asyncio.get_running_loop()
    failed: list[str] = []  # the model manager's messages, which name the model

    async def load(name: str) -> None:
        try:
            await loop.run_in_executor(None, manager.load, name)
        except InferenceError as error:
            failed.append(error.message.strip())

    stop.loading = True
    try:
        with console.status(f"loading {len(names)} model(s): {', '.join(names)}"):
            await asyncio.gather(*(load(name) for name in names))
    finally:
        stop.loading = False
    return sorted(failed)


def _update_health(frontends: list[Frontend]) -> None:
    for frontend in frontends:
        frontend.update_health()


async def _refresh_health(frontends: list[Frontend]) -> None:
    while True:
        _update_health(frontends)
        await asyncio.sleep(1.0)


async def _poll(config: ServeConfig, manager: ModelManager) -> None:
    """poll mode: reload models whose YAML changed, load new ones, unload removed ones."""
    loop = asyncio.get_running_loop()
    seen = _mtimes(manager)
    while True:
        await asyncio.sleep(config.poll_interval_s)
        current = _mtimes(manager)
        added_or_changed = [name for name, mtime in current.items() if seen.get(name) != mtime]
        for name in added_or_changed:
            try:
                await loop.run_in_executor(None, manager.load, name)
            except InferenceError as error:
                log.error("poll: failed to load '%s': %s", name, error)
        for name in seen.keys() - current.keys():
            await loop.run_in_executor(None, manager.unload, name)
        seen = current


def _mtimes(manager: ModelManager) -> dict[str, float]:
    path = manager.repository.path
    return {name: (path / f"{name}.yaml").stat().st_mtime for name in manager.repository.autoload_names()}
