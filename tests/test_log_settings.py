"""LogSettings through the stock tritonclient: Triton's defaults, keys and texts, and the settings
applied live to the server's log file (levels, verbosity, ISO8601 lines)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, start_server

DEFAULTS = {
    "log_file": {"string_param": ""},
    "log_info": {"bool_param": True},
    "log_warning": {"bool_param": True},
    "log_error": {"bool_param": True},
    "log_verbose_level": {"uint32_param": 0},
    "log_format": {"string_param": "default"},
}


def settings_response(**changes: dict) -> object:
    from tritonclient.grpc import service_pb2

    response = service_pb2.LogSettingsResponse()
    json_format.ParseDict({"settings": {**DEFAULTS, **changes}}, response)
    return response


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs") / "server.log"


@pytest.fixture(scope="module")
def logged(log_file: Path) -> Iterator[ServerProcess]:
    process = start_server("model=[simple]", f"logging.file={log_file}")
    yield process
    process.stop()


@pytest.fixture
def lclient(logged: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with logged.client() as client:
        yield client
        client.update_log_settings(
            {
                "log_info": True,
                "log_warning": True,
                "log_error": True,
                "log_verbose_level": 0,
                "log_format": "default",
            }
        )


def test_defaults(client: grpcclient.InferenceServerClient) -> None:
    assert client.get_log_settings() == settings_response()


def test_sequential_updates(lclient: grpcclient.InferenceServerClient, log_file: Path) -> None:
    file = {"log_file": {"string_param": str(log_file)}}
    assert lclient.get_log_settings() == settings_response(**file)
    expected = dict(file)
    for key, value, field in [
        ("log_info", False, "bool_param"),
        ("log_warning", False, "bool_param"),
        ("log_error", False, "bool_param"),
        ("log_verbose_level", 2, "uint32_param"),
        ("log_format", "ISO8601", "string_param"),
    ]:
        expected[key] = {field: value}
        assert lclient.update_log_settings({key: value}) == settings_response(**expected)
    assert lclient.get_log_settings() == settings_response(**expected)


def test_log_file_is_read_only(lclient: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        lclient.update_log_settings({"log_file": "elsewhere.log"})
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"
    assert info.value.message() == "log file location can not be updated through network protocol"


@pytest.mark.parametrize(
    ("key", "field", "value", "message"),
    [
        ("log_info", "string_param", "yes", "expect boolean for 'log_info'"),
        ("log_error", "uint32_param", 1, "expect boolean for 'log_error'"),
        ("log_verbose_level", "bool_param", True, "expect int32 for 'log_verbose_level'"),
        ("log_format", "uint32_param", 1, "expect string for 'log_format'"),
        ("log_format", "string_param", "json", "invalid argument for log_format, got: json"),
    ],
)
def test_type_and_value_errors(
    logged: ServerProcess,
    lclient: grpcclient.InferenceServerClient,
    key: str,
    field: str,
    value: object,
    message: str,
) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.LogSettingsRequest()
    setattr(request.settings[key], field, value)
    if key != "log_info":
        request.settings["log_info"].bool_param = False  # valid, but must not apply either
    with grpc.insecure_channel(logged.url) as channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).LogSettings(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == message
    assert lclient.get_log_settings().settings["log_info"].bool_param, "a rejected update changes nothing"


def _new_lines(log_file: Path, start: int) -> list[str]:
    return log_file.read_text().splitlines()[start:]


def test_settings_apply_live(lclient: grpcclient.InferenceServerClient, log_file: Path) -> None:
    start = len(log_file.read_text().splitlines())
    lclient.update_log_settings({"log_verbose_level": 1})  # the update itself logs at verbose level 1
    lclient.update_log_settings({"log_verbose_level": 0})  # ... and this one no longer shows
    lines = _new_lines(log_file, start)
    assert len([line for line in lines if "log settings now" in line]) == 1
    assert re.match(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} D pagedserve\.log_settings\] log settings now", lines[-1]
    )

    lclient.update_log_settings({"log_format": "ISO8601", "log_verbose_level": 1})
    line = _new_lines(log_file, start)[-1]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ D pagedserve\.log_settings\] log settings now", line), (
        line
    )


def test_shutdown_line_follows_info_switch(tmp_path: Path) -> None:
    for info, expect_line in ((True, True), (False, False)):
        path = tmp_path / f"info-{info}.log"
        process = start_server("model=[simple]", f"logging.file={path}", "logging.format=ISO8601")
        with process.client() as client:
            client.update_log_settings({"log_info": info})
        assert process.stop() == 0
        lines = [line for line in path.read_text().splitlines() if "shutting down" in line]
        assert bool(lines) is expect_line
        if lines:
            assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ I pagedserve\] shutting down", lines[0])


_ISO8601 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_engine_process_lines_follow_the_log_format() -> None:
    process = start_server("model=tiny-llama", "logging.format=ISO8601")
    assert process.stop() == 0
    engine_lines = [line for line in process.lines if "(engine)" in line]
    assert engine_lines, process.output  # at least its CPU threads line
    for line in engine_lines:
        assert re.match(_ISO8601 + r" [DIWE] [\w.]+\] \(engine\) ", line), line


def test_child_logging_follows_the_servers_file_format_and_switches(tmp_path: Path) -> None:
    from pagedserve.log_settings import ChildLogging, LogSettings

    loggers = [logging.getLogger(name) for name in ("", "pagedserve", "pagedserve_plugins")]
    saved = [(logger.handlers[:], logger.level) for logger in loggers]
    path = tmp_path / "server.log"
    settings = LogSettings(str(path), info=False, warning=True, error=True, verbose_level=0, format="ISO8601")
    try:
        ChildLogging(logging.INFO, settings).install(tag="(engine) ")
        logging.getLogger("pagedserve.test").info("switched off")
        logging.getLogger("pagedserve.test").warning("hello")
    finally:
        for handler in logging.getLogger().handlers:
            handler.close()
        for logger, (handlers, level) in zip(loggers, saved, strict=True):
            logger.handlers[:], logger.level = handlers, level
    assert re.fullmatch(_ISO8601 + r" W pagedserve\.test\] \(engine\) hello\n", path.read_text())
