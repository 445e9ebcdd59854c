"""What a newcomer's first mistakes get from ``serve``: one clear line and a documented exit code
(0 stopped cleanly, 1 could not start, 2 invalid configuration), never a traceback."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, start_server
from .test_security import start_repeat

SIMPLE = (REPO / "conf" / "models" / "simple.yaml").read_text()


def _serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pagedserve", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


def test_help_is_pagedserves_own() -> None:
    result = _serve("--help")
    assert result.returncode == 0
    text = result.stdout
    assert "powered by Hydra" not in text
    assert "models:" not in text  # conf/models is the model repository, not a config group
    assert "scheduler: fcfs, priority, shortest_prompt" in text
    assert "engine.load_format=dummy" in text and "exit codes" in text
    assert "grpc_port: 8001" in text  # the keys with their defaults


def test_a_taken_port_is_one_line_naming_the_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve("model=simple", "server.host=127.0.0.1", f"server.grpc_port={port}")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in result.stderr
    assert "server.grpc_port" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2


def test_check_opens_no_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve(
            "check=true",
            "model=simple",
            "server.host=127.0.0.1",
            f"server.grpc_port={port}",
            f"server.metrics_port={port}",
        )
    assert result.returncode == 0, result.stderr
    assert "check passed" in result.stdout


def _repository(tmp_path: Path, **files: str) -> Path:
    (tmp_path / "simple.yaml").write_text(SIMPLE)
    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("input: [\n", "broken"),  # YAML syntax error
        ("max_batch_size: 0\ninput: []\noutput: []\n", "backend"),  # no backend
    ],
)
def test_a_broken_autoloaded_model_fails_the_start(tmp_path: Path, text: str, reason: str) -> None:
    repository = _repository(tmp_path, broken=text)
    check = _serve(f"repository={repository}", "check=true")
    assert check.returncode == 1, check.stdout + check.stderr
    assert "failed to load 'broken'" in check.stderr and reason in check.stderr
    # Triton's --exit-on-error: serving refuses to start too, unless told to serve the rest
    result = _serve(
        f"repository={repository}",
        "server.host=127.0.0.1",
        "server.grpc_port=0",
        "server.metrics_port=-1",
        "frontends=[grpc]",
    )
    assert result.returncode == 1 and "server.exit_on_error=false" in result.stderr


def test_exit_on_error_false_serves_the_models_that_loaded(tmp_path: Path) -> None:
    repository = _repository(tmp_path, broken="input: [\n")
    server = start_server(f"repository={repository}", "server.exit_on_error=false", wait_ready=False)
    try:
        with server.client() as client:
            deadline = time.monotonic() + 60
            while True:  # ModelReady answers UNAVAILABLE until the start-up loads are over
                try:
                    ready = client.is_model_ready("simple")
                    break
                except Exception:  # noqa: BLE001
                    assert time.monotonic() < deadline, server.output
                    time.sleep(0.1)
            assert ready
            assert not client.is_model_ready("broken")
            assert not client.is_server_ready()  # strict readiness: one model is UNAVAILABLE
    finally:
        assert server.stop() == 0


def test_unknown_model_names_the_repository_and_its_models() -> None:
    result = _serve("check=true", "model=doesnotexist")
    assert result.returncode == 1
    assert "doesnotexist" in result.stderr and str(REPO / "conf" / "models") in result.stderr
    assert "simple" in result.stderr


def test_second_signal_exits_at_once() -> None:
    """A request that does not finish holds the drain for server.exit_timeout_s; the first signal
    says what shutdown waits for, a second one exits now."""
    server = start_server("model=repeat_int32", "server.exit_timeout_s=600")
    try:
        with server.client() as client:
            start_repeat(client, [0, 600_000])  # answers, then waits ten minutes
            server.process.send_signal(signal.SIGTERM)
            _wait_for_line(server, "server.exit_timeout_s")
            assert "repeat_int32 (1)" in server.output
            assert not client.is_server_ready()  # draining: not ready at once
            server.process.send_signal(signal.SIGINT)
            assert server.process.wait(30) == 1
            assert "exiting now" in server.output
    finally:
        server.stop()
    assert "Traceback" not in server.output


def _wait_for_line(server, text: str, timeout: float = 60) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while text not in server.output:
        assert time.monotonic() < deadline, server.output
        assert server.process.poll() is None, server.output
        time.sleep(0.05)


def test_idle_stream_at_shutdown_leaves_no_traceback() -> None:
    server = start_server("model=simple")
    with server.client() as client:
        client.start_stream(callback=lambda result, error: None)
        time.sleep(0.2)  # not a timing assertion: the stream merely has to be open
        assert server.stop() == 0
        client.stop_stream()
    assert "Traceback" not in server.output and "CancelledError" not in server.output
