"""Triton's generate extension: a flat JSON request in, flat JSON responses out.

A request's keys (and the keys of its ``parameters`` object) that name a model input become that
input, shaped from the model's metadata; the others become request parameters, which the LLM
backend reads as sampling parameters (``{"text_input": "...", "parameters": {"stream": false,
"temperature": 0}}``). A response lists ``id``, ``model_name``, ``model_version``, the response
parameters and every output by name, single-element outputs unwrapped, keys sorted as Triton's
``std::map`` sorts them.
"""

from __future__ import annotations

import math
from typing import Any

from pagedserve import datatypes
from pagedserve.codec import InferResponseMessage
from pagedserve.frontends.http_body import HttpError, dumps
from pagedserve.frontends.http_tensors import (
    json_data,
    json_tensor_bytes,
    response_parameters,
    set_json_parameter,
)
from pagedserve.protocol import grpc_service_pb2 as pb

_NESTED = "parameters"
_LIMIT_HINT = "Set server.max_message_bytes to increase the limit."


def decode_generate(
    document: Any, name: str, version: str, metadata: pb.ModelMetadataResponse, limit: int
) -> pb.ModelInferRequest:
    if not isinstance(document, dict):
        raise HttpError("failed to parse the generate JSON buffer: expected an object")
    inputs = {tensor.name: tensor for tensor in metadata.inputs}
    message = pb.ModelInferRequest(model_name=name, model_version=version)
    if "id" in document:
        if not isinstance(document["id"], str):
            raise HttpError("Unable to parse 'id': expected a string")
        message.id = document["id"]
    budget = [0, limit]  # bytes of input data so far, and the most allowed
    for key, value in document.items():
        if key == "id":
            continue  # the request id, not a parameter the model would have to know
        if key == _NESTED:
            _nested(value, inputs, message, budget)
        else:
            _map(key, value, inputs, message, budget)
    return message


def _nested(value: Any, inputs: dict[str, Any], message: pb.ModelInferRequest, budget: list[int]) -> None:
    if _NESTED in inputs:
        raise HttpError(f"Keyword '{_NESTED}' for nested schema also given as input tensor name")
    if not isinstance(value, dict):
        raise HttpError(f"Expected JSON object for keyword: '{_NESTED}'")
    for key, item in value.items():
        try:
            _map(key, item, inputs, message, budget)
        except HttpError as error:
            error.message = f"Converting keyword: '{_NESTED}': {error.message}"
            raise


def _map(
    key: str, value: Any, inputs: dict[str, Any], message: pb.ModelInferRequest, budget: list[int]
) -> None:
    """One key: the input it names (shape filled from metadata), or else a request parameter."""
    tensor = inputs.get(key)
    if tensor is None:
        set_json_parameter(message.parameters[key], key, value)
        return
    elements = value if isinstance(value, list) else [value]
    size = _byte_size(key, tensor.datatype, elements)
    used, limit = budget
    if used + size > limit:
        raise HttpError(
            f"request size of {used} bytes with input '{key}' of size {size} bytes exceeds the maximum "
            f"allowed input size of {limit}. " + _LIMIT_HINT
        )
    budget[0] += size
    if size == 0:
        message.inputs.add(name=key, datatype=tensor.datatype)
        message.raw_input_contents.append(b"")
        return
    shape = _fill_shape(key, list(tensor.shape), len(elements))
    raw = json_tensor_bytes(key, tensor.datatype, [len(elements)], elements, limit)
    message.inputs.add(name=key, datatype=tensor.datatype, shape=shape)
    message.raw_input_contents.append(raw)


def _byte_size(key: str, datatype: str, elements: list[Any]) -> int:
    if datatype == "BYTES":
        if not all(isinstance(item, str) for item in elements):
            raise HttpError("Unable to parse JSON bytes array: expected strings")
        return sum(len(item.encode()) + 4 for item in elements)
    if datatype not in datatypes.PROTOCOL_TYPES:
        raise HttpError(f"input '{key}' has unsupported datatype {datatype}")
    return len(elements) * datatypes.element_size(datatype)


def _fill_shape(key: str, shape: list[int], count: int) -> list[int]:
    """Triton's two passes: fixed dimensions divide the element count, then the innermost variable
    dimension takes what is left and the other variable ones become 1."""
    for dim in reversed(shape):
        if dim != -1:
            if dim <= 0 or count % dim:
                raise _unshapeable(key)
            count //= dim
    for i in reversed(range(len(shape))):
        if shape[i] == -1:
            shape[i], count = count, 1
    if count != 1 or math.prod(shape) < 0:
        raise _unshapeable(key)
    return shape


def _unshapeable(key: str) -> HttpError:
    return HttpError(f"The schema can not convert input '{key}' to tensor with proper shape")


def encode_generate_response(response: pb.ModelInferResponse | InferResponseMessage) -> bytes:
    if isinstance(response, InferResponseMessage):
        response = pb.ModelInferResponse.FromString(response.serialized)
    fields: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        fields["id"] = response.id
    fields.update(response_parameters(response))
    for index, output in enumerate(response.outputs):
        raw = response.raw_output_contents[index] if index < len(response.raw_output_contents) else b""
        values = json_data(output.datatype, raw)
        fields[output.name] = values[0] if len(values) == 1 else values
    return dumps(dict(sorted(fields.items())))
