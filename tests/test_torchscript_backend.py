"""The ``torchscript`` backend with tiny scripted modules saved to a temporary model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from pagedserve.backend import LoadContext, ModelSpec
from pagedserve.config import BackendSettings
from pagedserve.inference import InferenceRequest
from pagedserve.repository import spec_from_document
from pagedserve_plugins import torchscript_backend
from pagedserve_plugins.torchscript_backend import TorchScriptBackend, TorchScriptModel

from tests.recorder import Recorder

# Saving the fixtures uses torch.jit.script, deprecated in recent torch but still what Triton serves.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class AddSubWithBatch(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The third output reveals how many rows the forward call saw (requests are concatenated).
        rows = torch.full((a.shape[0], 1), a.shape[0], dtype=torch.int64)
        return a + b, a - b, rows


class Cast(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32)


class Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def tensor(name: str, data_type: str, dims: list[int]) -> dict[str, Any]:
    return {"name": name, "data_type": data_type, "dims": dims}


ADD_SUB_CONFIG: dict[str, Any] = {
    "backend": "torchscript",
    "max_batch_size": 8,
    "input": [tensor("A", "TYPE_FP32", [2]), tensor("B", "TYPE_FP32", [2])],
    "output": [
        tensor("SUM", "TYPE_FP32", [2]),
        tensor("DIFF", "TYPE_FP32", [2]),
        tensor("ROWS", "TYPE_INT64", [1]),
    ],
}


def save(module: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(module).save(str(path))


def make_spec(folder: Path, **config: Any) -> ModelSpec:
    return spec_from_document("ts", {"name": "ts", **config}, folder / "ts.yaml")


def load(spec: ModelSpec, version: int = 1) -> TorchScriptModel:
    TorchScriptBackend.auto_complete(spec.config)
    model = TorchScriptBackend().load(spec, LoadContext(version=version, settings=BackendSettings()))
    assert isinstance(model, TorchScriptModel)
    return model


def request(
    inputs: dict[str, np.ndarray], outputs: list[str], batch_size: int = 1
) -> tuple[InferenceRequest, Recorder]:
    recorder = Recorder()
    return (
        InferenceRequest(
            model_name="ts",
            model_version=1,
            inputs=inputs,
            requested_outputs=outputs,
            responder=recorder,
            batch_size=batch_size,
        ),
        recorder,
    )


def test_hook_provides_the_backend() -> None:
    assert torchscript_backend.pagedserve_model_backends() == [TorchScriptBackend]


def test_batch_is_concatenated_and_split(tmp_path: Path) -> None:
    save(AddSubWithBatch(), tmp_path / "model.pt")
    model = load(make_spec(tmp_path, **ADD_SUB_CONFIG))
    a1 = np.array([[1, 2]], np.float32)
    a2 = np.array([[3, 4], [5, 6]], np.float32)
    ones = np.ones((1, 2), np.float32)
    first = request({"A": a1, "B": ones}, ["SUM", "DIFF", "ROWS"])
    second = request({"A": a2, "B": np.ones((2, 2), np.float32)}, ["DIFF", "ROWS"], batch_size=2)
    model.execute([first[0], second[0]])
    out1, out2 = first[1].final().outputs, second[1].final().outputs
    assert out1["SUM"].tolist() == [[2, 3]] and out1["DIFF"].tolist() == [[0, 1]]
    assert out2["DIFF"].tolist() == [[2, 3], [4, 5]] and "SUM" not in out2
    assert out1["ROWS"].tolist() == [[3]] and out2["ROWS"].tolist() == [[3], [3]]  # one forward call


def test_different_shapes_run_separately(tmp_path: Path) -> None:
    save(Identity(), tmp_path / "model.pt")
    config = {"backend": "torchscript", "max_batch_size": 4, "input": [tensor("X", "TYPE_INT32", [-1])]}
    config["output"] = [tensor("Y", "TYPE_INT32", [-1])]
    model = load(make_spec(tmp_path, **config))
    short = request({"X": np.array([[1]], np.int32)}, ["Y"])
    long = request({"X": np.array([[1, 2, 3]], np.int32)}, ["Y"])
    model.execute([short[0], long[0]])
    assert short[1].final().outputs["Y"].tolist() == [[1]]
    assert long[1].final().outputs["Y"].tolist() == [[1, 2, 3]]


def test_versioned_file_and_no_batching(tmp_path: Path) -> None:
    save(Cast(), tmp_path / "2" / "cast.pt")
    config = {
        "platform": "pytorch_libtorch",
        "default_model_filename": "cast.pt",
        "max_batch_size": 0,
        "input": [tensor("X", "TYPE_INT16", [3])],
        "output": [tensor("Y", "TYPE_FP32", [3])],
    }
    model = load(make_spec(tmp_path, **config), version=2)
    req, recorder = request({"X": np.array([1, 2, 3], np.int16)}, ["Y"])
    model.execute([req])
    assert recorder.final().outputs["Y"].dtype == np.float32
    assert recorder.final().outputs["Y"].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("data_type", "array"),
    [
        ("TYPE_BOOL", np.array([[True, False]])),
        ("TYPE_INT8", np.array([[-3, 4]], np.int8)),
        ("TYPE_UINT8", np.array([[200, 4]], np.uint8)),
        ("TYPE_INT64", np.array([[2**40, -1]], np.int64)),
        ("TYPE_FP16", np.array([[0.5, -2]], np.float16)),
        ("TYPE_FP64", np.array([[0.1, 1e300]], np.float64)),
        ("TYPE_BF16", np.array([[0x3F80, 0xC000]], np.uint16)),  # 1.0 and -2.0 as bfloat16 words
    ],
)
def test_dtypes_round_trip(tmp_path: Path, data_type: str, array: np.ndarray) -> None:
    save(Identity(), tmp_path / "model.pt")
    config = {
        "backend": "torchscript",
        "max_batch_size": 2,
        "input": [tensor("X", data_type, [2])],
        "output": [tensor("Y", data_type, [2])],
    }
    model = load(make_spec(tmp_path, **config))
    req, recorder = request({"X": array}, ["Y"])
    model.execute([req])
    out = recorder.final().outputs["Y"]
    assert out.dtype == array.dtype and out.tolist() == array.tolist()


def test_bytes_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    config = {"backend": "torchscript", "input": [tensor("X", "TYPE_STRING", [1])], "output": []}
    with pytest.raises(ValueError, match="does not support TYPE_STRING for input 'X'"):
        load(make_spec(tmp_path, **config))


def test_missing_file_names_the_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TorchScript file not found"):
        load(make_spec(tmp_path, **ADD_SUB_CONFIG))


def test_output_mismatches_become_error_responses(tmp_path: Path) -> None:
    save(Cast(), tmp_path / "model.pt")
    config = {
        "backend": "torchscript",
        "max_batch_size": 2,
        "input": [tensor("X", "TYPE_INT32", [1])],
        "output": [tensor("Y", "TYPE_FP16", [1]), tensor("Z", "TYPE_FP16", [1])],
    }
    model = load(make_spec(tmp_path, **config))
    req, recorder = request({"X": np.array([[1]], np.int32)}, ["Y"])
    model.execute([req])
    error = recorder.final().error
    assert error is not None and error.code == grpc.StatusCode.INTERNAL and "2 output" in error.message
    config["output"] = [tensor("Y", "TYPE_FP16", [1])]
    model = load(make_spec(tmp_path, **config))
    req, recorder = request({"X": np.array([[1]], np.int32)}, ["Y"])
    model.execute([req])
    assert "config declares TYPE_FP16" in recorder.final().error.message  # type: ignore[union-attr]


def test_cpu_instances_stay_on_the_cpu(tmp_path: Path) -> None:
    save(AddSubWithBatch(), tmp_path / "model.pt")
    model = load(make_spec(tmp_path, instance_group=[{"kind": "KIND_CPU"}], **ADD_SUB_CONFIG))
    assert model.device.type == "cpu"
    assert model.memory_bytes() == {}  # no parameters


@pytest.mark.gpu
def test_gpu_instance_runs_on_cuda(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    save(AddSubWithBatch(), tmp_path / "model.pt")
    model = load(make_spec(tmp_path, instance_group=[{"kind": "KIND_GPU"}], **ADD_SUB_CONFIG))
    assert model.device.type == "cuda"
    req, recorder = request({"A": np.ones((1, 2), np.float32), "B": np.ones((1, 2), np.float32)}, ["SUM"])
    model.execute([req])
    assert recorder.final().outputs["SUM"].tolist() == [[2, 2]]
