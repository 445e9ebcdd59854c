"""The ``serve`` console script: plugins → config store → Hydra compose → typed config → server."""

from __future__ import annotations

import asyncio
import logging
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
from pagedserve.errors import InferenceError
from pagedserve.log_settings import LogController
from pagedserve.metrics import MetricsServer
from pagedserve.model_manager import ModelManager
from pagedserve.plugin_manager import PluginHost, Registries, RegistryError
from pagedserve.repository import ModelRepository
from pagedserve.server import GrpcServer
from pagedserve.tracing import Tracer, TraceSettings

log = logging.getLogger("pagedserve")

# Set by serve() before Hydra runs the app; Hydra's decorator leaves no other way to pass it in.
_host: PluginHost | None = None


def _prepare() -> PluginHost:
    global _host
    _host = PluginHost()
    store = ConfigStore.instance()
    register_configs(store)
    _host.hook.pagedserve_add_config(config_store=store)
    return _host


def serve() -> None:
    """Entry point. ``serve --info`` lists plugins; everything else is a Hydra command line."""
    host = _prepare()
    if "--info" in sys.argv[1:]:
        console.print(plugin_table(host, host.registries()))
        return
    _hydra_main()


def bench() -> None:
    """The offline throughput benchmark, a Hydra app over the same config (conf/bench.yaml)."""
    _prepare()
    _bench_main()


def _typed(cfg: DictConfig, kind: type) -> Any:
    try:
        config = OmegaConf.to_object(cfg)
    except (ValueError, OmegaConfBaseException) as error:
        console.print(f"[red]invalid configuration:[/] {error}")
        sys.exit(2)
    assert isinstance(config, kind)
    return config


@hydra.main(version_base=None, config_path="pkg://pagedserve.conf", config_name="bench")
def _bench_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from pagedserve.benchmarks.throughput import print_rows, run_bench, save_rows

    config = _typed(cfg, BenchConfig)
    setup_logging()
    assert _host is not None
    for name in config.plugins.disable:
        _host.pm.set_blocked(name)
    rows = run_bench(config, _host.registries())
    print_rows(rows, config.bench.limit_output_tokens_per_s)
    runtime = HydraConfig.get().runtime
    save_rows(rows, Path(runtime.output_dir))


@hydra.main(version_base=None, config_path="pkg://pagedserve.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
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
        return 2
    repository = ModelRepository(config.repository_path())
    if not repository.path.is_dir():
        console.print(f"[red]repository[/] '{repository.path}' is not a directory")
        return 2
    manager = ModelManager(
        repository,
        registries.model_backends,
        registries.batching_policies,
        BackendSettings.from_config(config, registries),
    )
    return asyncio.run(_serve(config, manager, tracer, logs))


def _tracer(config: ServeConfig, registries: Registries) -> Tracer:
    exporter = registries.trace_exporters.get(config.tracing.mode)
    return Tracer(TraceSettings(config.tracing), exporter(config.tracing))


async def _serve(config: ServeConfig, manager: ModelManager, tracer: Tracer, logs: LogController) -> int:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(config.server.workers, thread_name_prefix="pagedserve"))
    server = GrpcServer(config, manager, tracer, logs)
    await server.start()
    # One machine-readable line on stdout: scripts and tests read the bound port from it.
    print(f"pagedserve: GRPCInferenceService listening on {config.server.host}:{server.port}", flush=True)
    metrics = _start_metrics(config, manager)
    try:
        return await _serve_until_stopped(config, manager, server)
    finally:
        if metrics is not None:
            metrics.stop()
        tracer.close()  # the exporter writes what it still holds


def _start_metrics(config: ServeConfig, manager: ModelManager) -> MetricsServer | None:
    host, port = config.server.host, config.server.metrics_port
    if port < 0:
        return None
    try:
        metrics = MetricsServer(manager, host, port)
    except OSError as error:
        # Metrics are an add-on: a taken port must not keep the inference service down.
        log.warning("metrics: cannot listen on %s:%d (%s); serving without /metrics", host, port, error)
        return None
    metrics.start()
    print(f"pagedserve: metrics listening on {host}:{metrics.port}", flush=True)
    return metrics


async def _serve_until_stopped(config: ServeConfig, manager: ModelManager, server: GrpcServer) -> int:
    loop = asyncio.get_running_loop()
    failed = await _load_startup_models(config, manager)
    console.print(model_table(manager.index()))
    if failed:
        for name, error in failed:
            console.print(f"[red]failed to load '{name}':[/] {error}")
        await server.stop(0)
        manager.shutdown()
        return 1
    server.mark_started()
    if config.check:
        await server.stop(0)
        manager.shutdown()
        return 0
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    background = [asyncio.create_task(_refresh_health(server))]
    if config.model_control_mode == ModelControlMode.poll:
        background.append(asyncio.create_task(_poll(config, manager)))
    await stop.wait()
    log.info("shutting down: waiting up to %.0fs for in-flight requests", config.server.exit_timeout_s)
    for task in background:
        task.cancel()
    await loop.run_in_executor(None, manager.shutdown, config.server.exit_timeout_s)
    await server.stop(1.0)
    return 0


def _startup_names(config: ServeConfig, manager: ModelManager) -> tuple[list[str], bool]:
    """The models to load, and whether the user named them (then any failure stops the start)."""
    named = config.startup_models()
    if named is not None:
        return named, True
    if config.model_control_mode == ModelControlMode.explicit:
        return [], False
    return manager.repository.autoload_names(), False


async def _load_startup_models(config: ServeConfig, manager: ModelManager) -> list[tuple[str, str]]:
    names, explicit = _startup_names(config, manager)
    loop = asyncio.get_running_loop()
    failed: list[tuple[str, str]] = []

    async def load(name: str) -> None:
        try:
            await loop.run_in_executor(None, manager.load, name)
        except InferenceError as error:
            if explicit:
                failed.append((name, error.message.strip()))

    with console.status(f"loading {len(names)} model(s): {', '.join(names)}"):
        await asyncio.gather(*(load(name) for name in names))
    return failed


async def _refresh_health(server: GrpcServer) -> None:
    while True:
        server.update_health()
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
