"""Explicit model control: load, reload with a config override, unload (in-flight requests finish);
management is contained: no load request reaches code or files outside the model repository."""

from __future__ import annotations

import json
import os
import queue
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

from .conftest import REPO, ServerProcess, start_server
from .test_server_api import simple_inputs


@pytest.fixture(scope="module")
def explicit_server() -> Iterator[ServerProcess]:
    server = start_server("model_control_mode=explicit", "model=[simple]")
    yield server
    server.stop()


@pytest.fixture
def client(explicit_server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with explicit_server.client() as c:
        yield c


def test_only_named_models_load(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_model_ready("simple")
    assert not client.is_model_ready("simple_identity")
    states = {m.name: m.state for m in client.get_model_repository_index().models}
    assert states["simple"] == "READY" and states["simple_identity"] == ""


def test_load_override_and_reload(client: grpcclient.InferenceServerClient) -> None:
    client.load_model("simple", config='{"max_batch_size": 16}')
    assert client.get_model_config("simple").config.max_batch_size == 16
    client.infer("simple", simple_inputs(batch=12))
    client.load_model("simple", config='{"max_batch_size": 8}')
    assert client.get_model_config("simple").config.max_batch_size == 8


@pytest.mark.parametrize(
    ("name", "config", "code", "message"),
    [
        (
            "wrong_model_name",
            None,
            "StatusCode.INTERNAL",
            "failed to load 'wrong_model_name', failed to poll from model repository",
        ),
        (
            "../simple",
            None,
            "StatusCode.INVALID_ARGUMENT",
            "model name must not contain path traversal characters",
        ),
        (
            "a/../b",
            None,
            "StatusCode.INVALID_ARGUMENT",
            "model name must not contain path traversal characters",
        ),
        (
            "  ",
            None,
            "StatusCode.INVALID_ARGUMENT",
            "Model name cannot be empty. Please enter a valid name to deploy.",
        ),
        ("simple", '{"max_batch_size": "lots"}', "StatusCode.INVALID_ARGUMENT", "failed to load 'simple'"),
        ("simple", "not json", "StatusCode.INVALID_ARGUMENT", "failed to load 'simple'"),
    ],
)
def test_bad_loads(
    client: grpcclient.InferenceServerClient, name: str, config: str | None, code: str, message: str
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.load_model(name, config=config)
    assert info.value.status() == code
    assert message in info.value.message()
    assert client.is_model_ready("simple")  # a failed reload keeps the serving version


def test_unload_waits_for_in_flight_requests(client: grpcclient.InferenceServerClient) -> None:
    client.load_model("repeat_int32")
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    values = np.arange(5, dtype=np.int32)
    inputs = [
        grpcclient.InferInput("IN", [5], "INT32"),
        grpcclient.InferInput("DELAY", [5], "UINT32"),
        grpcclient.InferInput("WAIT", [1], "UINT32"),
    ]
    inputs[0].set_data_from_numpy(values)
    inputs[1].set_data_from_numpy(np.full(5, 100, dtype=np.uint32))
    inputs[2].set_data_from_numpy(np.array([0], dtype=np.uint32))
    client.async_stream_infer("repeat_int32", inputs, request_id="long")
    first = results.get(timeout=10)
    assert first[1] is None
    client.unload_model("repeat_int32")  # returns once the request above has finished
    client.stop_stream()
    received = [first] + [results.get_nowait() for _ in range(results.qsize())]
    assert [r.as_numpy("OUT")[0] for r, e in received if e is None] == list(values)
    assert not client.is_model_ready("repeat_int32")
    index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    assert index[("repeat_int32", "1")].state == "UNAVAILABLE"
    assert index[("repeat_int32", "1")].reason == "unloaded"
    with pytest.raises(InferenceServerException, match="has no available versions"):
        client.get_model_metadata("repeat_int32")


def _wait_for(condition, timeout: float = 20.0) -> None:  # noqa: ANN001
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_poll_mode_follows_the_repository(tmp_path) -> None:  # noqa: ANN001
    import shutil

    from .conftest import REPO

    repository = tmp_path / "models"
    repository.mkdir()
    shutil.copy(REPO / "conf" / "models" / "simple.yaml", repository)
    server = start_server(f"repository={repository}", "model_control_mode=poll", "poll_interval_s=0.2")
    try:
        with server.client() as client:
            assert client.is_model_ready("simple") and not client.is_model_ready("simple_identity")
            shutil.copy(REPO / "conf" / "models" / "simple_identity.yaml", repository)
            _wait_for(lambda: client.is_model_ready("simple_identity"))
            path = repository / "simple.yaml"
            path.write_text(path.read_text().replace("max_batch_size: 8", "max_batch_size: 4"))
            _wait_for(lambda: client.get_model_config("simple").config.max_batch_size == 4)
            path.unlink()
            _wait_for(lambda: not client.is_model_ready("simple"))
            with pytest.raises(InferenceServerException, match="explicit model load / unload is not allowed"):
                client.load_model("simple")
    finally:
        server.stop()


def test_sigterm_drains_and_exits_cleanly() -> None:
    server = start_server("model=simple")
    with server.client() as client:
        client.infer("simple", simple_inputs())
    assert server.stop() == 0
    assert "shutting down" in server.output


# -- management is contained ------------------------------------------------------------------------

EVIL = """
import pathlib

pathlib.Path(__file__).with_name("RAN").write_text("imported")


class Model:
    def execute(self, requests):
        return []
"""


@pytest.fixture(scope="module")
def contained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """A repository beside a folder it must never reach: outside/evil.py records being imported."""
    root = tmp_path_factory.mktemp("contained")
    outside, repository = root / "outside", root / "models"
    outside.mkdir()
    repository.mkdir()
    (outside / "evil.py").write_text(EVIL)
    simple = yaml.safe_load((REPO / "conf" / "models" / "simple.yaml").read_text())
    for name in ("simple", "simple_b"):
        (repository / f"{name}.yaml").write_text(yaml.safe_dump({**simple, "name": name}))
    (repository / "code").mkdir()
    (repository / "code" / "add_sub.py").write_text(
        "from pagedserve_plugins.examples.simple import AddSubModel\n"
    )
    (repository / "link.py").symlink_to(outside / "evil.py")
    python_files = {
        "inside": "code/add_sub.py",
        "escape": "../outside/evil.py",
        "absolute": str(outside / "evil.py"),
        "symlink": "link.py",
    }
    for name, python_file in python_files.items():
        class_name = "AddSubModel" if name == "inside" else "Model"
        document = {
            **simple,
            "name": name,
            "parameters": {"python_file": python_file, "python_class": class_name},
        }
        (repository / f"{name}.yaml").write_text(yaml.safe_dump(document))
    torch_escape = {
        "name": "torch_escape",
        "backend": "torchscript",
        "default_model_filename": "../outside/model.pt",
        "max_batch_size": 0,
        "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [1]}],
        "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [1]}],
    }
    (repository / "torch_escape.yaml").write_text(yaml.safe_dump(torch_escape))
    (outside / "model.pt").write_text("not a model, but outside the repository either way")
    server = start_server(
        "model_control_mode=explicit", f"repository={repository}", "model=[simple,simple_b]"
    )
    yield server, root
    server.stop()


@pytest.fixture
def contained_client(contained: tuple[ServerProcess, Path]) -> Iterator[grpcclient.InferenceServerClient]:
    with contained[0].client() as c:
        yield c


def _refused(client: grpcclient.InferenceServerClient, name: str, config: str | None = None) -> str:
    with pytest.raises(InferenceServerException) as info:
        client.load_model(name, config=config)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    return info.value.message()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"parameters": {"python_file": "<evil>", "python_class": "Model"}}, "parameters.python_file"),
        (
            {"parameters": {"python_file": "../outside/evil.py", "python_class": "Model"}},
            "parameters.python_file",
        ),
        # any installed module could be imported this way; even a harmless one may not be named
        (
            {"parameters": {"python_class": "pagedserve_plugins.examples.identity:IdentityModel"}},
            "python_class",
        ),
        ({"default_model_filename": "/etc/passwd"}, "default_model_filename"),
        ({"parameters": {"weights": "/"}}, "parameters.weights"),
        ({"parameters": {"preset": "llama3-8b"}}, "parameters.preset"),
        ({"backend": "torchscript"}, "backend"),  # another plugin's code
        ({"platform": "pytorch_libtorch"}, "platform"),
        ({"parameters": {"data_file": {"string_value": "/etc/passwd"}}}, "parameters.data_file"),
        ({"parameters": {"data_file": "~root/.ssh"}}, "parameters.data_file"),
    ],
)
def test_an_override_cannot_choose_code_or_files(
    contained: tuple[ServerProcess, Path],
    contained_client: grpcclient.InferenceServerClient,
    override: dict,
    field: str,
) -> None:
    root = contained[1]
    text = json.dumps(override).replace("<evil>", str(root / "outside" / "evil.py"))
    message = _refused(contained_client, "simple", text)
    assert "config override may not" in message and field in message
    assert not (root / "outside" / "RAN").exists()
    assert contained_client.is_model_ready("simple")
    config = contained_client.get_model_config("simple").config
    assert config.parameters["python_class"].string_value.endswith(":AddSubModel")
    assert "weights" not in config.parameters and not config.default_model_filename


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ('{"instance_group": [{"kind": "KIND_CPU", "count": 3000}]}', "instance_group[0].count is 3000"),
        ('{"versions": [1, 2, 3]}', "'versions' is not a ModelConfig field"),
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 32 levels"),
        ('{"a":' * 40 + "1" + "}" * 40, "nested deeper than 32 levels"),
        (json.dumps({"parameters": {"x": "a" * (2 << 20)}}), "bytes; the limit is 1048576"),
        ('{"max_batch_size": 1e400}', "max_batch_size"),
        ('{"input": [{"name": {"x": 1}}]}', "input"),
        ('"just a string"', "must be a JSON object"),
    ],
)
def test_an_override_is_bounded(
    contained_client: grpcclient.InferenceServerClient, config: str, expected: str
) -> None:
    message = _refused(contained_client, "simple", config)
    assert message.startswith("failed to load 'simple': ") and expected in message
    assert not re.search(r"\w+Error\b", message)  # no Python exception name
    assert contained_client.is_model_ready("simple")
    assert len(contained_client.get_model_config("simple").config.instance_group) == 1


def test_an_override_may_tune_a_model(contained_client: grpcclient.InferenceServerClient) -> None:
    """A client may send back the config it read with a field changed: the code parameters it carries
    are the repository's own, so they pass."""
    config = contained_client.get_model_config("simple", as_json=True)["config"]
    config["max_batch_size"] = 4
    config["instance_group"] = [{"kind": "KIND_CPU", "count": 2}]
    contained_client.load_model("simple", config=json.dumps(config))
    assert contained_client.get_model_config("simple").config.max_batch_size == 4
    contained_client.load_model("simple", config='{"parameters": {"note": {"string_value": "tuned"}}}')
    parameters = contained_client.get_model_config("simple").config.parameters
    assert parameters["note"].string_value == "tuned"
    assert parameters["python_class"].string_value.endswith(":AddSubModel")  # kept from the YAML
    contained_client.unload_model("simple")
    contained_client.load_model("simple")


def test_an_override_lasts_for_its_load_only(
    contained: tuple[ServerProcess, Path], contained_client: grpcclient.InferenceServerClient
) -> None:
    def batch() -> int:
        return contained_client.get_model_config("simple_b").config.max_batch_size

    contained_client.load_model("simple_b", config='{"max_batch_size": 16}')
    assert batch() == 16
    contained_client.load_model("simple_b")  # Triton: unchanged files, the running override stays
    assert batch() == 16
    yaml_file = contained[1] / "models" / "simple_b.yaml"
    stat = yaml_file.stat()
    os.utime(yaml_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    contained_client.load_model("simple_b")  # the YAML changed since: it wins
    assert batch() == 8
    contained_client.load_model("simple_b", config='{"max_batch_size": 16}')
    contained_client.unload_model("simple_b")
    contained_client.load_model("simple_b")  # after an unload, only the YAML counts
    assert batch() == 8


@pytest.mark.parametrize("name", ["escape", "absolute", "symlink", "torch_escape"])
def test_model_files_stay_inside_the_repository(
    contained: tuple[ServerProcess, Path], contained_client: grpcclient.InferenceServerClient, name: str
) -> None:
    message = _refused(contained_client, name)
    assert "is outside the model repository" in message
    assert not (contained[1] / "outside" / "RAN").exists()
    index = {m.name: m for m in contained_client.get_model_repository_index().models}
    assert index[name].state == "UNAVAILABLE" and "is outside the model repository" in index[name].reason


def test_a_model_file_inside_the_repository_loads(contained_client: grpcclient.InferenceServerClient) -> None:
    contained_client.load_model("inside")
    result = contained_client.infer("inside", simple_inputs())
    assert result.as_numpy("OUTPUT0").tolist() == [list(range(1, 17))]
