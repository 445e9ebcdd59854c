"""Triton's queue policy through the stock client: ``dynamic_batching.default_queue_policy`` bounds how
many requests wait for a model, and one past the bound is refused at once with Triton's answer."""

from __future__ import annotations

import queue
import textwrap
import time
from functools import partial
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from .conftest import start_server

WAIT = 30.0  # generous bound for anything that should happen "soon"

GATE_MODEL = """
import time
from pathlib import Path

from pagedserve.inference import InferenceResponse


class Gate:
    \"\"\"Holds every execute until the test creates the file 'open' beside this model.\"\"\"

    def initialize(self, args):
        self.folder = Path(args.model_repository)

    def execute(self, requests):
        (self.folder / "entered").touch()
        while not (self.folder / "open").exists():
            time.sleep(0.005)
        return [InferenceResponse(outputs={"OUT": r.inputs["IN"]}) for r in requests]
"""

GATE_CONFIG = """
name: gate
backend: python
max_batch_size: 8
input: [{name: IN, data_type: TYPE_INT32, dims: [1]}]
output: [{name: OUT, data_type: TYPE_INT32, dims: [1]}]
dynamic_batching:
  default_queue_policy: {max_queue_size: 1}
instance_group: [{kind: KIND_CPU, count: 1}]
parameters:
  python_file: {string_value: "gate.py"}
  python_class: {string_value: "Gate"}
versions: [1]
"""


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


def _inputs(value: int) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("IN", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return [tensor]


def test_request_past_max_queue_size_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "gate.py").write_text(textwrap.dedent(GATE_MODEL))
    (tmp_path / "gate.yaml").write_text(textwrap.dedent(GATE_CONFIG))
    server = start_server(f"repository={tmp_path}")
    try:
        with server.client() as client:
            results: queue.Queue = queue.Queue()

            def answer(ident: str, result: object, error: object) -> None:
                results.put((ident, result, error))

            client.async_infer("gate", _inputs(0), partial(answer, "running"), request_id="running")
            _wait_for(tmp_path / "entered")  # the one instance is now held inside execute
            for ident, value in (("a", 1), ("b", 2)):  # one fills the queue, the other is one too many
                client.async_infer("gate", _inputs(value), partial(answer, ident), request_id=ident)
            refused, _, error = results.get(timeout=WAIT)  # arrives while the model is still held
            assert refused in ("a", "b"), refused
            assert error is not None
            assert error.status() == "StatusCode.UNAVAILABLE"
            assert error.message() == f"[request id: {refused}] Exceeds maximum queue size"

            (tmp_path / "open").touch()
            answered = {}
            for _ in range(2):
                ident, result, error = results.get(timeout=WAIT)
                answered[ident] = (result, error)
            queued = "b" if refused == "a" else "a"
            assert set(answered) == {"running", queued}
            for ident, (result, error) in answered.items():
                assert error is None, (ident, error)
                assert result.as_numpy("OUT").tolist() == [[{"running": 0, "a": 1, "b": 2}[ident]]]
            stats = client.get_inference_statistics("gate").model_stats[0].inference_stats
            assert stats.fail.count == 1
    finally:
        (tmp_path / "open").touch()  # never leave the model held: shutdown waits for it
        server.stop()
