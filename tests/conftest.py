"""Shared fixtures. API tests drive a real ``serve`` process over gRPC with the stock tritonclient:
the server runs as a subprocess, so its protobuf descriptors never meet tritonclient's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pagedserve.model_manager import ModelManager

REPO = Path(__file__).resolve().parent.parent

# The black-box API tests drive the server with the stock tritonclient. A GPU machine that only has
# torch and triton still runs the kernel and engine tests (`pytest -m gpu`) without them.
try:
    import tritonclient.grpc  # noqa: F401
except ImportError:
    collect_ignore = [
        "test_bad_input.py",
        "test_cuda_shared_memory.py",
        "test_llm_api.py",
        "test_llm_limits.py",
        "test_log_settings.py",
        "test_metrics.py",
        "test_model_control.py",
        "test_plugins.py",
        "test_protocol.py",
        "test_server_api.py",
        "test_shared_memory.py",
        "test_tracing.py",
    ]


def pytest_configure(config: pytest.Config) -> None:
    # Tests that run the engine in this process: under ``pytest -n 2`` on two cores, torch's default
    # of one OpenMP thread per core puts two spinning thread pools (and the servers other tests start)
    # on two cores, and a loaded machine then runs them 10-60x slower. One thread each, unless the
    # caller chose a count with OMP_NUM_THREADS.
    if "OMP_NUM_THREADS" in os.environ:
        return
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


STOCK_MODELS = [
    "simple",
    "simple_int8",
    "simple_identity",
    "simple_string",
    "repeat_int32",
    "simple_sequence",
    "simple_dyna_sequence",
    "simple_string_dyna_sequence",
    "identity_fp32",
]
_LISTENING = re.compile(r"listening on [^:]+:(\d+)")


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def http_url(self) -> str:
        """``host:port`` of the ``http`` front-end (started with ``frontends=[...,http]``)."""
        return f"127.0.0.1:{self.port_of('HTTPService')}"

    def port_of(self, service: str, timeout: float = 30.0) -> int:
        """The port a front-end printed (``OpenAI API``, ``HTTPService``...), waiting for its line."""
        pattern = re.compile(rf"pagedserve: {re.escape(service)} listening on [^:]+:(\d+)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = pattern.search(line)
                if match:
                    return int(match.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{service} did not start:\n" + self.output)

    def client(self):  # noqa: ANN201 - tritonclient is imported lazily
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.url)

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def repository_manager() -> ModelManager:
    """A model manager over ``conf/models`` with the built-in plugins, no server: load what you need."""
    from pagedserve.config import BackendSettings
    from pagedserve.model_manager import ModelManager
    from pagedserve.plugin_manager import PluginHost
    from pagedserve.repository import ModelRepository

    registries = PluginHost().registries()
    return ModelManager(
        ModelRepository(REPO / "conf" / "models"),
        registries.model_backends,
        registries.batching_policies,
        BackendSettings(registries=registries),
    )


def start_server(*overrides: str, ready_timeout: float = 120.0, wait_ready: bool = True) -> ServerProcess:
    """Start ``serve`` on a free port; wait until it is live (and ready unless told not to)."""
    command = [
        sys.executable,
        "-m",
        "pagedserve",
        "server.host=127.0.0.1",
        "server.grpc_port=0",
        "server.http_port=0",
        "server.openai_port=0",
        "server.metrics_port=0",
        *overrides,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env
    )
    lines: list[str] = []
    port_found = threading.Event()
    port_box: list[int] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            match = _LISTENING.search(line)
            if match and not port_box:
                port_box.append(int(match.group(1)))
                port_found.set()
        port_found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not port_found.wait(ready_timeout) or not port_box:
        process.kill()
        raise RuntimeError("server did not start:\n" + "".join(lines))
    server = ServerProcess(process, port_box[0], lines)
    if wait_ready:
        _wait_ready(server, ready_timeout)
    return server


def _wait_ready(server: ServerProcess, timeout: float) -> None:
    client = server.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError("server exited:\n" + server.output)
        try:
            if client.is_server_ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError("server never became ready:\n" + server.output)


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """A server with the stock example models (strict readiness: all of them loaded)."""
    process = start_server("model=[" + ",".join(STOCK_MODELS) + "]")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def url(server: ServerProcess) -> str:
    return server.url


@pytest.fixture
def client(server: ServerProcess):  # noqa: ANN201
    with server.client() as c:
        yield c


def statistics_after_execution(client, model: str, executions: int, timeout: float = 10.0):  # noqa: ANN001, ANN201
    """``model``'s statistics once its execution count reaches ``executions``.

    A response can reach the client before the server's worker records the execution that produced
    it (the count is taken when the model's ``execute`` returns), so a test that reads the statistics
    right after a response polls for the count; after ``timeout`` it returns what it last read."""
    deadline = time.monotonic() + timeout
    while True:
        stats = client.get_inference_statistics(model).model_stats[0]
        if stats.execution_count >= executions or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)
