"""RequestDecoder's planned short paths give exactly what its full checks give: the same arrays for
good requests, the same Triton messages for bad ones (malformed shapes, sizes, hostile dimensions)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from pagedserve.codec import RequestDecoder
from pagedserve.errors import InferenceError
from pagedserve.frontends.http_tensors import JsonInferRequest, JsonTensor
from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.repository import spec_from_document

from .recorder import Recorder

BATCHED = {"max_batch_size": 8, "dims": [16]}
UNBATCHED = {"max_batch_size": 0, "dims": [2, 3]}
VARIABLE = {"max_batch_size": 4, "dims": [-1]}


def decoder(max_batch_size: int, dims: list[int], full_checks_only: bool) -> RequestDecoder:
    document = {
        "name": "m",
        "backend": "python",
        "max_batch_size": max_batch_size,
        "input": [{"name": n, "data_type": "TYPE_INT32", "dims": dims} for n in ("A", "B")],
        "output": [{"name": "OUT", "data_type": "TYPE_INT32", "dims": dims}],
    }
    result = RequestDecoder(spec_from_document("m", document), 1)
    if full_checks_only:
        result._plans = {
            name: dataclasses.replace(plan, fixed=None, wire=None) for name, plan in result._plans.items()
        }
    return result


def message(
    shapes: list[list[int]], sizes: list[int] | None = None, typed: bool = False
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id="r1")
    for name, shape in zip(("A", "B"), shapes, strict=False):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=shape)
        if typed:
            tensor.contents.int_contents.extend(range(int(np.prod(shape))))
    if not typed:
        for index, shape in enumerate(shapes):
            count = sizes[index] if sizes else int(np.prod(shape)) * 4
            request.raw_input_contents.append(np.arange(count, dtype=np.uint8).tobytes())
    return request


def outcome(config: dict[str, Any], request: pb.ModelInferRequest, full_checks_only: bool) -> Any:
    try:
        target, _ = decoder(config["max_batch_size"], config["dims"], full_checks_only).decode(
            request, Recorder()
        )
    except InferenceError as error:
        return ("error", error.code, error.message)
    return {name: (array.dtype, array.shape, array.tobytes()) for name, array in target.inputs.items()}


CASES = [
    (BATCHED, message([[1, 16], [1, 16]])),
    (BATCHED, message([[8, 16], [8, 16]])),
    (BATCHED, message([[0, 16], [0, 16]])),
    (BATCHED, message([[9, 16], [9, 16]])),  # batch over max_batch_size
    (BATCHED, message([[1, 16], [2, 16]])),  # batch sizes disagree
    (BATCHED, message([[16], [16]])),  # no batch dimension
    (BATCHED, message([[1, 15], [1, 16]])),
    (BATCHED, message([[-1, 16], [1, 16]])),
    (BATCHED, message([[1, 2**62], [1, 16]], sizes=[64, 64])),  # hostile: huge, data absent
    (BATCHED, message([[2**40, 2**40], [1, 16]], sizes=[64, 64])),  # product beyond int64
    (BATCHED, message([[1, 16], [1, 16]], sizes=[63, 64])),  # raw entry too short
    (BATCHED, message([[1, 16], [1, 16]], sizes=[64, 65])),  # raw entry too long
    (BATCHED, message([[1, 16]])),  # a required input missing
    (BATCHED, message([[1, 16], [1, 16]], typed=True)),
    (UNBATCHED, message([[2, 3], [2, 3]])),
    (UNBATCHED, message([[1, 2, 3], [2, 3]])),
    (UNBATCHED, message([[3, 2], [2, 3]])),
    (VARIABLE, message([[2, 5], [2, 5]])),
    (VARIABLE, message([[2, -5], [2, 5]])),
]


@pytest.mark.parametrize(("config", "request_message"), CASES)
def test_short_paths_match_the_full_checks(
    config: dict[str, Any], request_message: pb.ModelInferRequest
) -> None:
    assert outcome(config, request_message, False) == outcome(config, request_message, True)


def test_extra_raw_entries_are_refused() -> None:
    request = message([[1, 16], [1, 16]])
    request.raw_input_contents.append(b"\0" * 64)
    result = outcome(BATCHED, request, False)
    assert result[0] == "error"
    assert "unexpected number of raw_input_contents entries: 3 given but only 2" in result[2]


def array_message(
    shapes: list[list[int]],
    names: tuple[str, ...] = ("A", "B"),
    dtype: Any = np.int32,
    datatype: str = "INT32",
    counts: list[int] | None = None,
) -> JsonInferRequest:
    """A request whose inputs arrived as arrays already, as the HTTP front-end hands JSON data over."""
    request = JsonInferRequest("m", "")
    request.id = "r1"
    for index, (name, shape) in enumerate(zip(names, shapes, strict=False)):
        count = counts[index] if counts else int(np.prod(shape))
        request.inputs.append(JsonTensor(name, datatype, shape))
        request.raw_input_contents.append(np.arange(count).astype(dtype))
    return request


def with_parameter(request: JsonInferRequest) -> JsonInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="A", datatype="INT32", shape=request.inputs[0].shape)
    tensor.parameters["custom"].string_param = "x"
    request.inputs[0] = tensor
    return request


TAKEN = [
    (BATCHED, array_message([[1, 16], [1, 16]])),
    (BATCHED, array_message([[8, 16], [8, 16]])),
    (UNBATCHED, array_message([[2, 3], [2, 3]])),
]
ARRAY_CASES = [
    *TAKEN,
    (BATCHED, array_message([[0, 16], [0, 16]])),  # an empty batch: the full checks decide
    (BATCHED, array_message([[9, 16], [9, 16]])),
    (BATCHED, array_message([[1, 16], [2, 16]])),
    (BATCHED, array_message([[16], [16]])),
    (BATCHED, array_message([[1, 16], [1, 16]], counts=[15, 16])),
    (BATCHED, array_message([[1, 16], [1, 16]], dtype=np.int64)),
    (BATCHED, array_message([[1, 16], [1, 16]], dtype=np.float32, datatype="FP32")),
    (BATCHED, array_message([[1, 16], [1, 16]], names=("A", "A"))),
    (BATCHED, array_message([[1, 16], [1, 16]], names=("A", "C"))),
    (BATCHED, array_message([[1, 16]])),
    (BATCHED, with_parameter(array_message([[1, 16], [1, 16]]))),
    (UNBATCHED, array_message([[1, 2, 3], [2, 3]])),
    (VARIABLE, array_message([[2, 5], [2, 5]])),
]


@pytest.mark.parametrize(("config", "request_message"), ARRAY_CASES)
def test_arrays_short_path_matches_the_full_checks(config: dict[str, Any], request_message: Any) -> None:
    assert outcome(config, request_message, False) == outcome(config, request_message, True)


@pytest.mark.parametrize(("config", "request_message"), TAKEN)
def test_arrays_short_path_is_taken_for_plain_arrays(config: dict[str, Any], request_message: Any) -> None:
    short = decoder(config["max_batch_size"], config["dims"], False)._decode_arrays(
        request_message, Recorder()
    )
    assert short is not None and short.id == "r1" and short.requested_outputs == ["OUT"]
    assert short.batch_size == (request_message.inputs[0].shape[0] if config["max_batch_size"] else 1)
