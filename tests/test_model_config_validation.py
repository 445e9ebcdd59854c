"""A model config is validated completely at load: a broken one is refused (INVALID_ARGUMENT, and
UNAVAILABLE in the index) with a reason naming the field, instead of loading READY and failing later."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

from .conftest import REPO, ServerProcess, repository_manager, start_server

SIMPLE = yaml.safe_load((REPO / "conf" / "models" / "simple.yaml").read_text())
SEQUENCE = yaml.safe_load((REPO / "conf" / "models" / "simple_sequence.yaml").read_text())


def _edit(base: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    document = copy.deepcopy(base)
    change(document)
    return document


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change that sets ``a.b[0].c`` (dots and list indexes) to ``value``; None deletes it."""

    def change(document: dict[str, Any]) -> None:
        keys: list[str | int] = [
            int(k) if k.isdigit() else k for k in path.replace("[", ".").replace("]", "").split(".")
        ]
        target: Any = document
        for key in keys[:-1]:
            target = target[key]
        if value is None:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value

    return change


# name: (base config, change, what the error and the index reason must say)
BROKEN = {
    "no_data_type": (SIMPLE, _set("input[0].data_type", None), "input[0] 'INPUT0': data_type must be set"),
    "unknown_data_type": (
        SIMPLE,
        _set("input[0].data_type", 99),
        "input[0].data_type: 99 is not a known value",
    ),
    "no_dims": (SIMPLE, _set("output[1].dims", None), "output[1] 'OUTPUT1': dims must be set"),
    "zero_dim": (SIMPLE, _set("input[1].dims", [0]), "input[1] 'INPUT1': dims: each dimension must be"),
    "below_wildcard_dim": (SIMPLE, _set("input[0].dims", [-2]), "dims: each dimension must be an integer"),
    "huge_dim": (SIMPLE, _set("input[0].dims", [2**40]), "dims: each dimension must be an integer"),
    "empty_name": (SIMPLE, _set("output[0].name", ""), "output[0].name must be set"),
    "control_char_name": (SIMPLE, _set("input[0].name", "IN\nPUT"), "must not contain control characters"),
    "duplicate_input": (
        SIMPLE,
        _set("input[1].name", "INPUT0"),
        "input[1]: the name 'INPUT0' is used by two",
    ),
    "negative_batch": (SIMPLE, _set("max_batch_size", -1), "max_batch_size must be >= 0"),
    "unknown_kind": (
        SIMPLE,
        _set("instance_group[0].kind", 7),
        "instance_group[0].kind: 7 is not a known value",
    ),
    "many_instances": (SIMPLE, _set("instance_group[0].count", 3000), "instance_group[0].count is 3000"),
    "negative_count": (SIMPLE, _set("instance_group[0].count", -2), "instance_group[0].count must be >= 1"),
    "cpu_with_gpus": (SIMPLE, _set("instance_group[0].gpus", [0]), "kind KIND_CPU must not list gpus"),
    "preferred_too_big": (
        SIMPLE,
        _set("dynamic_batching.preferred_batch_size", [4, 16]),
        "dynamic_batching.preferred_batch_size: 16 exceeds max_batch_size 8",
    ),
    "many_priority_levels": (
        SIMPLE,
        _set("dynamic_batching.priority_levels", 100_000),
        "dynamic_batching.priority_levels is 100000; the limit is 1024",
    ),
    "endless_delay": (
        SIMPLE,
        _set("dynamic_batching.max_queue_delay_microseconds", 2**63),
        "dynamic_batching.max_queue_delay_microseconds is 9223372036854775808",
    ),
    "endless_idle": (
        SEQUENCE,
        _set("sequence_batching.max_sequence_idle_microseconds", 10**15),
        "sequence_batching.max_sequence_idle_microseconds is 1000000000000000",
    ),
    "two_start_controls": (
        SEQUENCE,
        _set("sequence_batching.control_input[1].control[0].kind", "CONTROL_SEQUENCE_START"),
        "control_input[1] 'READY': CONTROL_SEQUENCE_START is given by two control inputs",
    ),
}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("validation") / "models"
    path.mkdir()
    (path / "simple.yaml").write_text(yaml.safe_dump(SIMPLE))
    for index in range(5):  # more models than an unknown-model error lists
        (path / f"spare_{index}.yaml").write_text(yaml.safe_dump({**SIMPLE, "name": f"spare_{index}"}))
    for name, (base, change, _) in BROKEN.items():
        document = _edit(base, change)
        document["name"] = name
        (path / f"{name}.yaml").write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="module")
def explicit_server(repository: Path) -> Iterator[ServerProcess]:
    server = start_server("model_control_mode=explicit", f"repository={repository}", "model=[simple]")
    yield server
    server.stop()


@pytest.fixture
def client(explicit_server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with explicit_server.client() as c:
        yield c


def _index(client: grpcclient.InferenceServerClient) -> dict[str, Any]:
    return {m.name: m for m in client.get_model_repository_index().models}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_config_is_refused_naming_the_field(
    client: grpcclient.InferenceServerClient, name: str
) -> None:
    expected = BROKEN[name][2]
    with pytest.raises(InferenceServerException) as info:
        client.load_model(name)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"failed to load '{name}'" in info.value.message()
    assert expected in info.value.message()
    assert not client.is_model_ready(name)
    row = _index(client)[name]
    assert row.state == "UNAVAILABLE" and expected in row.reason


def test_a_broken_override_is_refused_and_the_model_keeps_serving(
    client: grpcclient.InferenceServerClient,
) -> None:
    inputs = [{"name": "INPUT0", "dims": [16]}, {"name": "INPUT1", "data_type": "TYPE_INT32", "dims": [16]}]
    override = json.dumps({"input": inputs})
    with pytest.raises(InferenceServerException) as info:
        client.load_model("simple", config=override)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input[0] 'INPUT0': data_type must be set" in info.value.message()
    assert client.is_model_ready("simple")
    assert client.get_model_config("simple").config.input[0].data_type != 0


def test_an_unknown_model_names_the_repository_and_what_it_holds(
    client: grpcclient.InferenceServerClient, repository: Path
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.load_model("doesnotexist")
    message = info.value.message()
    assert info.value.status() == "StatusCode.INTERNAL"  # Triton's code; its words come first
    assert message.startswith("failed to load 'doesnotexist', failed to poll from model repository")
    assert str(repository) in message
    names = sorted(p.stem for p in repository.glob("*.yaml"))
    assert len(names) > 20  # the list is bounded
    assert ", ".join(names[:20]) in message and f"and {len(names) - 20} more" in message


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("x" * 10_000, "model name is longer than 250 bytes"),
        ("simple\x00", "model name must not contain control characters"),
        ("simple\n", "model name must not contain control characters"),
    ],
)
def test_hostile_model_names(client: grpcclient.InferenceServerClient, name: str, expected: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.load_model(name)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message() == expected


def test_poll_mode_refuses_a_broken_new_model(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    repository.mkdir()
    (repository / "simple.yaml").write_text(yaml.safe_dump(SIMPLE))
    server = start_server(f"repository={repository}", "model_control_mode=poll", "poll_interval_s=0.2")
    try:
        with server.client() as client:
            broken = _edit(SIMPLE, _set("input[0].data_type", None))
            broken["name"] = "broken"
            (repository / "broken.yaml").write_text(yaml.safe_dump(broken))
            deadline = time.monotonic() + 20
            while _index(client).get("broken") is None or not _index(client)["broken"].state:
                assert time.monotonic() < deadline, "the poll never tried the new model"
                time.sleep(0.1)
            row = _index(client)["broken"]
            assert row.state == "UNAVAILABLE"
            assert "input[0] 'INPUT0': data_type must be set" in row.reason
            assert client.is_model_ready("simple")
    finally:
        server.stop()


def test_a_model_that_can_no_longer_serve_is_unavailable_with_its_reason(monkeypatch) -> None:  # noqa: ANN001
    """An LLM whose engine died and could not restart: READY no more, in the index, readiness and
    lookups, until it is loaded again."""
    manager = repository_manager()
    manager.load("simple")
    try:
        model = manager.resolve("simple").policy.model
        assert manager.is_ready("simple") and manager.all_ready()
        monkeypatch.setattr(model, "failure", lambda: "the engine process died and could not restart")
        assert not manager.is_ready("simple") and not manager.all_ready()
        [row] = [row for row in manager.index() if row.name == "simple"]
        assert (row.state, row.reason) == ("UNAVAILABLE", "the engine process died and could not restart")
        manager.load("simple")  # a plain load replaces the broken version
        assert manager.is_ready("simple")
    finally:
        manager.shutdown(5)
