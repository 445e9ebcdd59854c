"""The plugin host: built-ins load through entry points, a third-party plugin is found and used."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from pagedserve.plugin_manager import PluginHost, Registry

from .conftest import REPO, start_server

BUILT_INS = {"python_backend", "torchscript_backend", "batching", "torch_attention", "scheduling_policies"}

THIRD_PARTY = """
from pagedserve.backend import Model, ModelBackend
from pagedserve.hookspecs import hookimpl
from pagedserve.inference import InferenceResponse


class Doubler(Model):
    def execute(self, requests):
        for request in requests:
            outputs = {"OUT": request.inputs["IN"] * 2}
            request.responder.send(InferenceResponse(outputs=outputs), final=True)


class DoublerBackend(ModelBackend):
    name = "doubler"

    def load(self, spec, context):
        return Doubler()


@hookimpl
def pagedserve_model_backends():
    return [DoublerBackend]
"""

MODEL = """
backend: doubler
max_batch_size: 0
input: [{name: IN, data_type: TYPE_FP32, dims: [-1]}]
output: [{name: OUT, data_type: TYPE_FP32, dims: [-1]}]
"""


@pytest.fixture
def third_party(tmp_path: Path) -> Path:
    """A tiny installed-looking distribution: a module plus dist-info with our entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "doubler_plugin.py").write_text(textwrap.dedent(THIRD_PARTY))
    info = site / "doubler_plugin-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: doubler-plugin\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[pagedserve.plugins]\ndoubler = doubler_plugin\n")
    repository = tmp_path / "models"
    repository.mkdir()
    (repository / "doubler.yaml").write_text(MODEL)
    return tmp_path


def test_built_ins_register_through_entry_points() -> None:
    host = PluginHost()
    assert {p.name for p in host.plugins} >= BUILT_INS
    registries = host.registries()
    assert {"python", "torchscript"} <= set(registries.model_backends.names())
    assert {"direct", "dynamic", "sequence"} <= set(registries.batching_policies.names())


def test_blocked_plugin_is_not_loaded() -> None:
    host = PluginHost(disable=["torchscript_backend"])
    assert "torchscript" not in host.registries().model_backends


def test_registry_rejects_duplicates_and_names_alternatives() -> None:
    class A:
        name = "a"

    registry: Registry[type] = Registry("thing")
    registry.add(A, "p1")
    with pytest.raises(ValueError, match="already provided by plugin 'p1'"):
        registry.add(A, "p2")
    with pytest.raises(KeyError, match="available: a"):
        registry.get("b")


def test_info_lists_third_party_plugin_with_version(third_party: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(third_party / "site"), COLUMNS="250")
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve", "--info"], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "doubler" in output and "1.2.3" in output and "python_backend" in output


def test_third_party_backend_serves_requests(third_party: Path) -> None:
    import tritonclient.grpc as grpcclient

    os.environ["PYTHONPATH"] = str(third_party / "site")
    try:
        server = start_server(f"repository={third_party / 'models'}")
    finally:
        del os.environ["PYTHONPATH"]
    try:
        with server.client() as client:
            data = np.array([1.5, -2.0, 4.0], dtype=np.float32)
            tensor = grpcclient.InferInput("IN", [3], "FP32")
            tensor.set_data_from_numpy(data)
            result = client.infer("doubler", [tensor])
            np.testing.assert_array_equal(result.as_numpy("OUT"), data * 2)
    finally:
        server.stop()
