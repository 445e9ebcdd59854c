"""The ``python`` backend: loading user classes by module or by file, and the execute contract."""

from __future__ import annotations

import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from pagedserve.backend import LoadContext, ModelSpec
from pagedserve.config import BackendSettings
from pagedserve.errors import InferenceError
from pagedserve.inference import InferenceRequest
from pagedserve.repository import spec_from_document
from pagedserve.statistics import ModelStats
from pagedserve_plugins import python_backend
from pagedserve_plugins.batching import DirectPolicy
from pagedserve_plugins.python_backend import PythonBackend, PythonModel, PythonModelArgs

from tests.recorder import Recorder

USER_MODULE = """
import numpy as np
from pagedserve.errors import InferenceError
from pagedserve.inference import InferenceResponse

LOG = []


class Doubler:
    def initialize(self, args):
        self.args = args
        LOG.append(("initialize", args.instance_index))

    def execute(self, requests):
        responses = []
        for request in requests:
            if request.parameters.get("fail"):
                responses.append(InferenceResponse(error=InferenceError("asked to fail")))
                continue
            x = request.inputs["X"]
            responses.append(InferenceResponse(outputs={"Y": x * 2, "Z": x + 1}))
        if requests and requests[0].parameters.get("short"):
            return responses[:-1]
        if requests and requests[0].parameters.get("missing"):
            return [InferenceResponse(outputs={"Z": requests[0].inputs["X"]})]
        if requests and requests[0].parameters.get("as_lists"):
            return [InferenceResponse(outputs={"Y": [[5, 6]], "Z": [[7, 8]]})]
        return responses

    def finalize(self):
        LOG.append(("finalize", self.args.instance_index))


class Streamer:
    def execute(self, requests):
        for request in requests:
            for i in range(3):
                request.responder.send(InferenceResponse(outputs={"Y": np.array([i])}), final=False)
            request.responder.send(None, final=True)
        if requests and requests[0].parameters.get("return_list"):
            return []
        return None


class NotAModel:
    pass
"""


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "user_models.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def make_spec(folder: Path, parameters: dict[str, str], **config: Any) -> ModelSpec:
    document = {
        "name": "m",
        "backend": "python",
        "max_batch_size": 4,
        "input": [{"name": "X", "data_type": "TYPE_INT32", "dims": [2]}],
        "output": [
            {"name": "Y", "data_type": "TYPE_INT32", "dims": [2]},
            {"name": "Z", "data_type": "TYPE_INT32", "dims": [2]},
        ],
        "parameters": parameters,
        **config,
    }
    return spec_from_document("m", document, folder / "m.yaml")


def load(spec: ModelSpec, version: int = 1) -> PythonModel:
    PythonBackend.auto_complete(spec.config)
    model = PythonBackend().load(spec, LoadContext(version=version, settings=BackendSettings()))
    assert isinstance(model, PythonModel)
    return model


def request(outputs: tuple[str, ...] = ("Y", "Z"), **parameters: Any) -> tuple[InferenceRequest, Recorder]:
    recorder = Recorder()
    req = InferenceRequest(
        model_name="m",
        model_version=1,
        inputs={"X": np.array([[1, 2]], np.int32)},
        requested_outputs=list(outputs),
        responder=recorder,
        parameters=parameters,
    )
    return req, recorder


def test_hook_provides_the_python_backend() -> None:
    assert python_backend.pagedserve_model_backends() == [PythonBackend]
    assert PythonBackend.name == "python"


def test_load_by_module_and_execute(folder: Path) -> None:
    model = load(make_spec(folder, {"python_class": "user_models:Doubler"}))
    req, recorder = request()
    model.execute([req])
    outputs = recorder.final().outputs
    assert outputs["Y"].tolist() == [[2, 4]]
    assert outputs["Z"].tolist() == [[2, 3]]


def test_load_by_file_relative_to_the_yaml(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "model.py").write_text(textwrap.dedent(USER_MODULE))
    model = load(make_spec(tmp_path, {"python_file": "code/model.py", "python_class": "Doubler"}), version=3)
    args: PythonModelArgs = model.instances[0].args
    assert (args.model_name, args.model_version, args.model_repository) == ("m", 3, tmp_path)
    assert args.model_config.max_batch_size == 4
    req, recorder = request()
    model.execute([req])
    assert recorder.final().outputs["Y"].tolist() == [[2, 4]]


def test_one_object_per_instance_and_finalize(folder: Path) -> None:
    spec = make_spec(
        folder,
        {"python_class": "user_models:Doubler"},
        instance_group=[{"kind": "KIND_CPU", "count": 2}, {"kind": "KIND_GPU", "count": 1}],
    )
    model = load(spec)
    assert [i.args.instance_index for i in model.instances] == [0, 1, 2]
    assert [i.args.instance_kind for i in model.instances] == ["KIND_CPU", "KIND_CPU", "KIND_GPU"]
    log = sys.modules[type(model.instances[0]).__module__].LOG
    log.clear()
    model.finalize()
    assert log == [("finalize", 0), ("finalize", 1), ("finalize", 2)]


def test_each_worker_thread_keeps_its_instance(folder: Path) -> None:
    spec = make_spec(folder, {"python_class": "user_models:Doubler"}, instance_group=[{"count": 2}])
    model = load(spec)
    used: list[int] = []

    def run() -> None:
        for _ in range(2):
            used.append(id(model._instance()))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
        thread.join()
    assert used[0] == used[1] and used[2] == used[3] and used[0] != used[2]


def test_requested_outputs_only(folder: Path) -> None:
    model = load(make_spec(folder, {"python_class": "user_models:Doubler"}))
    req, recorder = request(outputs=("Z",))
    model.execute([req])
    assert list(recorder.final().outputs) == ["Z"]


def test_per_request_error_response(folder: Path) -> None:
    model = load(make_spec(folder, {"python_class": "user_models:Doubler"}))
    good, good_rec = request()
    bad, bad_rec = request(fail=True)
    model.execute([good, bad])
    assert good_rec.final().error is None
    assert bad_rec.final().error is not None and bad_rec.final().error.message == "asked to fail"


def test_outputs_given_as_lists_arrive_as_arrays(folder: Path) -> None:
    model = load(make_spec(folder, {"python_class": "user_models:Doubler"}))
    req, recorder = request(as_lists=True)
    model.execute([req])
    outputs = recorder.final().outputs
    assert all(type(value) is np.ndarray for value in outputs.values())
    assert outputs["Y"].tolist() == [[5, 6]] and outputs["Z"].tolist() == [[7, 8]]


def test_missing_requested_output_is_an_error(folder: Path) -> None:
    model = load(make_spec(folder, {"python_class": "user_models:Doubler"}))
    req, recorder = request(missing=True)
    model.execute([req])
    error = recorder.final().error
    assert error is not None and error.code == grpc.StatusCode.INTERNAL and "'Y'" in error.message


def test_wrong_number_of_responses_fails_the_batch_without_hanging(folder: Path) -> None:
    spec = make_spec(folder, {"python_class": "user_models:Doubler"})
    model = load(spec)
    with pytest.raises(InferenceError, match="returned 1 responses for 2 requests"):
        model.execute([request(short=True)[0], request()[0]])
    policy = DirectPolicy(model, spec, ModelStats())  # through a policy every request is answered
    try:
        req, recorder = request(short=True)
        policy.submit(req)
        error = recorder.final().error
        assert error is not None and error.code == grpc.StatusCode.INTERNAL
    finally:
        policy.close()


def test_decoupled_model_answers_through_the_responder(folder: Path) -> None:
    spec = make_spec(
        folder, {"python_class": "user_models:Streamer"}, model_transaction_policy={"decoupled": True}
    )
    model = load(spec)
    req, recorder = request()
    model.execute([req])
    assert [final for _, final in recorder.sent] == [False, False, False, True]
    assert recorder.sent[-1][0] is None


def test_decoupled_model_must_return_none(folder: Path) -> None:
    spec = make_spec(
        folder, {"python_class": "user_models:Streamer"}, model_transaction_policy={"decoupled": True}
    )
    with pytest.raises(InferenceError, match="must return None"):
        load(spec).execute([request(return_list=True)[0]])


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"python_class": "user_models"}, "package.module:ClassName"),
        ({"python_class": "user_models:Missing"}, "has no class 'Missing'"),
        ({"python_class": "user_models:NotAModel"}, "no execute"),
        ({"python_file": "nope.py", "python_class": "X"}, "does not exist"),
    ],
)
def test_bad_class_references(folder: Path, parameters: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load(make_spec(folder, parameters))


def test_python_class_is_required(folder: Path) -> None:
    with pytest.raises(ValueError, match="python_class"):
        PythonBackend.auto_complete(make_spec(folder, {}).config)
