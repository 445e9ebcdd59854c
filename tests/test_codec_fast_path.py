"""RequestDecoder's planned short paths give exactly what its full checks give: the same arrays for
good requests, the same Triton messages for bad ones (malformed shapes, sizes, hostile dimensions)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from pagedserve.codec import RequestDecoder
from pagedserve.errors import InferenceError
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
