"""KServe v2 JSON tensors (with Triton's binary tensor data extension) <-> the server's requests.

An ``/infer`` body becomes the ``ModelInferRequest`` the gRPC front-end would have received: JSON
``data`` becomes arrays in ``raw_input_contents`` (a flat list of plain numbers packed by
``array.array``, anything else read by numpy), binary inputs are
views of the body, and the parameters HTTP gives its own meaning (``binary_data_size``,
``binary_data``, ``binary_data_output``) are taken out. Everything a gRPC request is checked for
(datatypes, shapes, byte sizes, shared memory) is then checked by :mod:`pagedserve.codec` with
Triton's texts; this module only adds the checks of Triton's HTTP parser (``ParseJsonTritonIO``),
with its texts.

Only what still has parameters is built in protobuf: the rest are plain objects with the same
attributes (:class:`JsonInferRequest`, :class:`JsonTensor`) that the same
:class:`~pagedserve.codec.RequestDecoder` reads, so the checks and their texts are shared, without
paying for building a protobuf message and reading it back. The usual input (exactly ``name``,
``datatype``, ``shape``, ``data``) takes a short path that only tests the conditions under which every
check would pass, and otherwise leaves it to them. The answer is written as JSON straight
from the model's arrays (:class:`JsonResponseEncoder`), in the thread the model sends from.
"""

from __future__ import annotations

import functools
import math
from array import array as c_array
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import orjson
from pagedserve import datatypes
from pagedserve.backend import ModelSpec
from pagedserve.codec import InferRequestMessage, RequestOptions, response_tensors
from pagedserve.errors import InferenceError
from pagedserve.frontends.http_body import HttpError, dumps, parse_json
from pagedserve.inference import InferenceRequest, InferenceResponse, ParameterValue
from pagedserve.protocol import grpc_service_pb2 as pb

_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1
_LIMIT_HINT = "Set server.max_message_bytes to increase the limit."
# numpy kinds a JSON array may arrive as, per protocol datatype (ints read as floats, as C casts do).
_ACCEPTED_KINDS = {"BOOL": "b", "FP32": "iuf", "FP64": "iuf"}
_INTEGER_KINDS = "iu"
_NO_PARAMETERS: MappingProxyType[str, pb.InferParameter] = MappingProxyType({})
_NONE: dict[str, Any] = {}
"""An empty dict shared where one is only read (a request's missing ``parameters``...)."""


class JsonTensor:
    """An input or requested output without parameters, read in place of its protobuf message (a
    ``ModelInferRequest.InferInputTensor`` or ``InferRequestedOutputTensor`` with no parameters and
    no typed contents)."""

    __slots__ = ("name", "datatype", "shape")
    parameters = _NO_PARAMETERS

    def __init__(self, name: str, datatype: str = "", shape: list[int] | None = None) -> None:
        self.name = name
        self.datatype = datatype
        self.shape = shape if shape is not None else []

    def HasField(self, name: str) -> bool:  # noqa: N802 - protobuf's name, as RequestDecoder calls it
        return False


class JsonInferRequest:
    """A decoded ``/infer`` body with the attributes of the ``ModelInferRequest`` it stands for.

    Building the protobuf and reading it back cost more per request than the model ``simple``; a
    tensor with parameters left (shared memory, custom ones) is still a protobuf message, and so is
    ``parameters`` when the request has any."""

    __slots__ = ("model_name", "model_version", "id", "parameters", "inputs", "outputs", "raw_input_contents")

    def __init__(self, model_name: str, model_version: str) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.id = ""
        self.parameters: Any = _NO_PARAMETERS
        self.inputs: list[JsonTensor | pb.ModelInferRequest.InferInputTensor] = []
        self.outputs: list[JsonTensor | pb.ModelInferRequest.InferRequestedOutputTensor] = []
        # Binary data (views of the body), or JSON data as arrays of the declared datatype.
        self.raw_input_contents: list[memoryview | bytes | np.ndarray] = []


class InferCall:
    """A decoded ``/infer`` request: the protobuf message and how each output goes back."""

    __slots__ = ("binary_default", "binary_outputs", "message")

    def __init__(
        self,
        message: pb.ModelInferRequest | InferRequestMessage | JsonInferRequest,
        binary_default: bool = False,
    ) -> None:
        self.message = message
        self.binary_default = binary_default
        """``binary_data_output``: outputs not listed in the request come back as binary data."""
        self.binary_outputs: Mapping[str, bool] = _NONE
        """Per listed output: its ``binary_data`` parameter (JSON unless true)."""


# -- requests --------------------------------------------------------------------------------------


def decode_infer(
    body: bytes, header_length: int | None, name: str, version: str, spec: ModelSpec, limit: int
) -> InferCall:
    """``header_length`` is the ``Inference-Header-Content-Length`` (None: the body is all JSON;
    0: the body is the one input's raw data, Triton's raw binary request)."""
    if header_length == 0:
        return _raw_binary_call(body, name, version, spec)
    split = len(body) if header_length is None else header_length
    document = parse_json(body if split == len(body) else memoryview(body)[:split])
    if not isinstance(document, dict):
        raise HttpError("Unable to parse 'inputs': the request JSON must be an object")
    message = JsonInferRequest(name, version)
    if "id" in document:
        message.id = _string(document["id"], "id")
    call = InferCall(message)
    call.binary_default = _parameters(document.get("parameters"), message)
    binary = memoryview(body)[split:] if split < len(body) else b""
    message.raw_input_contents = _inputs(document.get("inputs"), message, binary, name, limit)
    _outputs(document.get("outputs"), message, call)
    return call


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise HttpError(f"Unable to parse '{key}': expected a string")
    if not value.isascii():
        value.encode()  # refuses lone surrogates, as a protobuf string field does
    return value


def _uint(value: Any, key: str) -> int:
    if type(value) is not int or not 0 <= value <= _UINT64_MAX:
        raise HttpError(f"Unable to parse '{key}': expected an unsigned integer")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise HttpError(f"Unable to parse '{key}': expected a boolean")
    return value


def _parameters(params: Any, message: JsonInferRequest) -> bool:
    """Copy the request parameters into ``message`` as Triton's HTTP parser reads them; returns
    ``binary_data_output``."""
    if params is None:
        return False
    if not isinstance(params, dict):
        raise HttpError("failed to get request params.")
    binary = False
    if params:
        message.parameters = pb.ModelInferRequest().parameters
    for key, value in params.items():
        target = message.parameters[key]
        if key == "sequence_id":
            if isinstance(value, str):
                target.string_param = value
            else:
                _set_int(target, _uint(value, key))
        elif key in ("sequence_start", "sequence_end"):
            target.bool_param = _bool(value, key)
        elif key in ("priority", "timeout"):
            _set_int(target, _uint(value, key))
        elif key == "binary_data_output":
            binary = _bool(value, key)
            del message.parameters[key]
        elif key.startswith("triton_"):
            raise HttpError(
                "parameter keys starting with 'triton_' are reserved for Triton usage and should not "
                "be specified."
            )
        else:
            set_json_parameter(target, key, value)
    return binary


def _set_int(target: pb.InferParameter, value: int) -> None:
    if value > _INT64_MAX:
        target.uint64_param = value
    else:
        target.int64_param = value


def set_json_parameter(target: pb.InferParameter, key: str, value: Any) -> None:
    """A request parameter from JSON: string, integer, boolean or number, as Triton accepts."""
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, str):
        target.string_param = value
    elif type(value) is int and -(2**63) <= value <= _INT64_MAX:
        target.int64_param = value
    elif isinstance(value, (int, float)):
        target.double_param = float(value)
    else:
        raise HttpError(
            f"parameter '{key}' has invalid type. It should be either 'int', 'bool', or 'string'."
        )


def _inputs(
    inputs: Any, message: JsonInferRequest, binary: memoryview | bytes, model: str, limit: int
) -> list[memoryview | bytes | np.ndarray]:
    if not isinstance(inputs, list):
        raise HttpError("Unable to parse 'inputs': expected an array")
    raw: list[memoryview | bytes | np.ndarray] = []
    offset = 0
    for item in inputs:
        plain = _plain_input(item, limit)
        if plain is not None:
            message.inputs.append(plain[0])
            raw.append(plain[1])
            continue
        if not isinstance(item, dict):
            raise HttpError("Unable to parse 'inputs': expected an array of objects")
        params = item.get("parameters") or _NONE
        if not isinstance(params, dict):
            raise HttpError("Unable to parse 'parameters': expected an object")
        _check_input_content(item, params)
        name = _string(item.get("name"), "name")
        datatype = _string(item.get("datatype"), "datatype")
        shape = _shape(item.get("shape"), name)
        message.inputs.append(_input_tensor(name, datatype, shape, params))
        if "binary_data_size" in params:
            size = _uint(params["binary_data_size"], "binary_data_size")
            if offset + size > len(binary):
                raise HttpError(
                    f"unexpected size for input '{name}', expecting {offset + size - len(binary)} "
                    f"additional bytes for model '{model}'"
                )
            raw.append(binary[offset : offset + size])
            offset += size
        elif "shared_memory_region" not in params:
            raw.append(json_tensor_data(name, datatype, shape, item["data"], limit))
    if offset != len(binary):
        raise HttpError(f"unexpected additional input data for model '{model}'")
    return raw


_PLAIN_INPUT = frozenset(("name", "datatype", "shape", "data"))


def _plain_input(item: Any, limit: int) -> tuple[JsonTensor, np.ndarray] | None:
    """The usual input (exactly these keys, ASCII strings, a flat list of plain numbers of the right
    count) with its packed data, when every check below would pass for it; None sends the input
    through them, and their texts."""
    if type(item) is not dict or item.keys() != _PLAIN_INPUT:
        return None
    name, datatype, shape = item["name"], item["datatype"], item["shape"]
    if type(name) is not str or type(datatype) is not str or type(shape) is not list or not name.isascii():
        return None
    for d in shape:
        if type(d) is not int or d < 0:
            return None
    packed = _packed(datatype, shape, item["data"], limit)  # refuses a count that does not match
    return None if packed is None else (JsonTensor(name, datatype, shape), packed)


def _input_tensor(
    name: str, datatype: str, shape: list[int], params: dict[str, Any]
) -> JsonTensor | pb.ModelInferRequest.InferInputTensor:
    if not params or params.keys() == {"binary_data_size"}:
        return JsonTensor(name, datatype, shape)
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    for key, value in params.items():
        if key != "binary_data_size":
            set_json_parameter(tensor.parameters[key], key, value)
    return tensor


def _check_input_content(item: dict[str, Any], params: dict[str, Any]) -> None:
    if not params and "data" in item:
        return  # the usual JSON input
    has = [
        ("'data'", "data" in item),
        ("'binary_data_size'", "binary_data_size" in params),
        ("'shared_memory_region'", "shared_memory_region" in params),
    ]
    given = [label for label, present in has if present]
    if len(given) == 1:
        return
    message = (
        "Input must set only one of the following fields: 'data', 'binary_data_size' in 'parameters', "
        "'shared_memory_region' in 'parameters'. But"
    )
    raise HttpError(message + (" no field is set" if not given else " set " + " ".join(given)))


def _shape(shape: Any, name: str) -> list[int]:
    if type(shape) is not list:
        raise HttpError("Unable to parse 'shape': expected an array of unsigned integers")
    largest = 0
    for d in shape:  # a loop, not any(): shapes are short and this runs for every input
        if type(d) is not int or d < 0:
            raise HttpError("Unable to parse 'shape': expected an array of unsigned integers")
        if d > largest:
            largest = d
    if largest > _INT64_MAX or math.prod(shape) > _INT64_MAX:
        raise HttpError(
            f"invalid shape for input '{name}': shape {_shape_text(shape)} causes total element count "
            f"to exceed maximum size of {_INT64_MAX}"
        )
    return shape


def _shape_text(shape: list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def json_tensor_data(name: str, datatype: str, shape: list[int], data: Any, limit: int) -> np.ndarray | bytes:
    """A JSON ``data`` array (any nesting; only the element count must match): a flat array of the
    datatype's numpy type, or, for BYTES, the elements in the wire format."""
    packed = _packed(datatype, shape, data, limit)
    if packed is not None:
        return packed
    if datatype in ("FP16", "BF16"):
        raise HttpError(
            f"receiving {datatype} data via JSON is not supported. Please use the binary data format "
            f"for input {name}"
        )
    if datatype not in datatypes.PROTOCOL_TYPES:
        raise HttpError(f"invalid datatype for input {name}")
    count = math.prod(shape)
    if count == 0:
        return b""
    dtype = datatypes.numpy_dtype(datatype)
    if datatype != "BYTES" and count * dtype.itemsize > limit:
        raise HttpError(
            f"JSON input '{name}' has a byte_size ({count * dtype.itemsize} bytes) that "
            f"exceeds the maximum allowed value of {limit} bytes. " + _LIMIT_HINT
        )
    if not isinstance(data, list):
        raise HttpError("Unable to parse 'data': expected an array")
    # numpy reads flat or evenly nested numbers in one pass; anything else (ragged, mixed, strings)
    # is flattened here first, which also counts the elements.
    array = None if datatype == "BYTES" else _numbers(data)
    flat = _flatten(data) if array is None else None
    given = array.size if array is not None else len(flat)
    if given > count:
        raise HttpError("Unable to parse 'data': Shape does not match true shape of 'data' field")
    if given < count:
        raise HttpError("Failed to parse 'data' field: shape does not match true shape")
    if datatype == "BYTES":
        if not all(isinstance(item, str) for item in flat):
            raise HttpError("Unable to parse 'data': expected an array of strings for BYTES")
        return _serialize_strings(flat)
    if array is None:
        try:
            array = np.array(flat)
        except (ValueError, OverflowError):
            array = np.array([], dtype=np.object_)
    if array.dtype.kind not in _ACCEPTED_KINDS.get(datatype, _INTEGER_KINDS):
        raise HttpError(f"Unable to parse 'data': expected {datatype} elements for input '{name}'")
    return array.reshape(-1).astype(dtype)  # narrower types wrap, as C casts do


def _packed(datatype: str, shape: list[int], data: Any, limit: int) -> np.ndarray | None:
    """The usual JSON data, a flat list of the right count of plain numbers in range, packed by
    ``array.array`` (one C pass that also refuses other element types); None for anything else,
    which the general path reads and words the errors of. Half the cost of numpy's discovery,
    reshape and cast, in a cheap model's request."""
    typecode = _TYPECODES.get(datatype)
    # A leading bool goes the general way: numpy reads an all-bool list as BOOL, which is refused.
    if typecode is None or type(data) is not list or not data or type(data[0]) is bool:
        return None
    try:
        packed = c_array(typecode, data)
    except (TypeError, OverflowError):  # nested, strings, out of range (the general path wraps)
        return None
    if len(packed) != math.prod(shape) or len(packed) * packed.itemsize > limit:
        return None
    return np.frombuffer(packed, datatypes.numpy_dtype(datatype))


def _typecodes() -> dict[str, str]:
    """Protocol datatype -> the ``array`` typecode with its numpy type's kind and size."""
    codes = {}
    for datatype in datatypes.PROTOCOL_TYPES:
        if datatype in ("BOOL", "BYTES", "FP16", "BF16"):
            continue
        dtype = datatypes.numpy_dtype(datatype)
        for code in "bBhHiIlLqQfd":
            if np.dtype(code) == dtype:
                codes[datatype] = code
                break
    return codes


_TYPECODES = _typecodes()


def json_tensor_bytes(name: str, datatype: str, shape: list[int], data: Any, limit: int) -> bytes:
    """:func:`json_tensor_data` in the wire format (for a protobuf ``raw_input_contents`` entry)."""
    data = json_tensor_data(name, datatype, shape, data, limit)
    if isinstance(data, bytes):
        return data
    return data.astype(datatypes.numpy_dtype(datatype).newbyteorder("<")).tobytes()


def _numbers(data: list[Any]) -> np.ndarray | None:
    """``data`` as numpy reads it when that is a plain numeric array; None otherwise."""
    try:
        array = np.array(data)
    except (ValueError, OverflowError):  # ragged nesting, huge integers
        return None
    return array if array.dtype.kind in "biuf" else None


def _flatten(data: list[Any]) -> list[Any]:
    """The leaves of nested lists, in order, without recursion (json.loads bounds the depth)."""
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    stack: list[Iterable[Any]] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _serialize_strings(items: list[str]) -> bytes:
    parts: list[bytes] = []
    for item in items:
        data = item.encode()
        parts.append(len(data).to_bytes(4, "little"))
        parts.append(data)
    return b"".join(parts)


def _outputs(outputs: Any, message: JsonInferRequest, call: InferCall) -> None:
    if outputs is None:
        return
    if not isinstance(outputs, list):
        raise HttpError("Unable to parse 'outputs': expected an array")
    call.binary_outputs = {}
    for item in outputs:
        if not isinstance(item, dict):
            raise HttpError("Unable to parse 'outputs': expected an array of objects")
        name = _string(item.get("name"), "name")
        params = item.get("parameters") or _NONE
        if not isinstance(params, dict):
            raise HttpError("Unable to parse 'parameters': expected an object")
        binary = _bool(params["binary_data"], "binary_data") if "binary_data" in params else False
        if "shared_memory_region" in params:
            if "classification" in params:
                raise HttpError("Output can't set both 'shared_memory_region' and 'classification'")
            if binary:
                raise HttpError("Output can't set both 'shared_memory_region' and 'binary_data'")
        if "classification" in params:
            _uint(params["classification"], "classification")
        message.outputs.append(_output_tensor(name, params))
        call.binary_outputs[name] = binary


def _output_tensor(
    name: str, params: dict[str, Any]
) -> JsonTensor | pb.ModelInferRequest.InferRequestedOutputTensor:
    if not params or params.keys() == {"binary_data"}:
        return JsonTensor(name)
    tensor = pb.ModelInferRequest.InferRequestedOutputTensor(name=name)
    for key, value in params.items():
        if key != "binary_data":
            set_json_parameter(tensor.parameters[key], key, value)
    return tensor


def _raw_binary_call(body: bytes, name: str, version: str, spec: ModelSpec) -> InferCall:
    """Triton's raw binary request: the body is the data of the model's only input, batch 1."""
    config = spec.config
    if len(config.input) != 1:
        raise HttpError(
            f"raw binary request requires model '{name}' to have exactly one input, it has "
            f"{len(config.input)}"
        )
    model_input = config.input[0]
    datatype = datatypes.of_tensor(model_input)
    shape = _raw_shape(list(model_input.dims), datatype, len(body), name)
    if config.max_batch_size > 0:
        shape = [1, *shape]
    message = pb.ModelInferRequest(model_name=name, model_version=version)
    message.inputs.add(name=model_input.name, datatype=datatype, shape=shape)
    return InferCall(InferRequestMessage(message, [memoryview(body)]), binary_default=True)


def _raw_shape(dims: list[int], datatype: str, size: int, name: str) -> list[int]:
    if datatype == "BYTES":
        if dims != [1]:
            raise HttpError(f"raw binary request of BYTES data requires model '{name}' input shape [1]")
        return dims
    element = datatypes.element_size(datatype)
    variable = [i for i, d in enumerate(dims) if d < 0]
    fixed = math.prod(d for d in dims if d >= 0) * element
    if len(variable) > 1:
        raise HttpError(f"raw binary request requires at most one variable-size dimension in model '{name}'")
    if variable:
        if fixed == 0 or size % fixed:
            raise HttpError(
                f"raw binary request of {size} bytes does not fit the input shape of model '{name}'"
            )
        dims[variable[0]] = size // fixed
    return dims


# -- responses -------------------------------------------------------------------------------------


class HttpBody:
    """An encoded ``/infer`` answer: the body's parts, and the JSON header's length when binary
    data follows it (``Inference-Header-Content-Length``)."""

    __slots__ = ("parts", "header_length")

    def __init__(self, parts: list[bytes], header_length: int | None) -> None:
        self.parts = parts
        self.header_length = header_length


class JsonResponseEncoder:
    """The ``/infer`` route's :data:`~pagedserve.codec.ResponseEncoder`: the answer's JSON (and binary
    outputs) straight from the model's arrays, in the thread the model sends from."""

    __slots__ = ("call",)

    def __init__(self, call: InferCall) -> None:
        self.call = call

    def __call__(
        self, spec: ModelSpec, request: InferenceRequest, response: InferenceResponse, options: RequestOptions
    ) -> HttpBody:
        plain = _plain_answer(spec, request, response, options, self.call)
        if plain is not None:
            return HttpBody([plain], None)
        document: dict[str, Any] = {}
        if request.id:
            document["id"] = request.id
        document["model_name"] = spec.name
        document["model_version"] = str(request.model_version)
        if response.parameters:
            document["parameters"] = {key: _parameter(value) for key, value in response.parameters.items()}
        outputs: list[dict[str, Any]] = []
        binary: list[bytes] = []
        finite = True  # no NaN or infinity written as JSON: the faster writer may write it all
        call = self.call
        for name, datatype, array, target in response_tensors(spec, request, response, options):
            entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
            if target is not None:
                target.write(datatypes.to_raw(array, datatype))  # the data is in the client's region
            elif call.binary_outputs.get(name, call.binary_default):
                raw = datatypes.to_raw(array, datatype)
                entry["parameters"] = {"binary_data_size": len(raw)}
                if raw:
                    binary.append(bytes(raw))  # a copy: the model may reuse its arrays once sent
            else:
                entry["data"] = _array_json(datatype, array)
                if finite and array.dtype.kind == "f":
                    finite = bool(np.isfinite(array).all())
            outputs.append(entry)
        document["outputs"] = outputs
        if response.parameters and not all(
            math.isfinite(v) for v in document["parameters"].values() if type(v) is float
        ):
            finite = False
        header = dumps(document, finite)
        return HttpBody([header, *binary], len(header) if binary else None)


def _plain_answer(
    spec: ModelSpec,
    request: InferenceRequest,
    response: InferenceResponse,
    options: RequestOptions,
    call: InferCall,
) -> bytes | None:
    """The usual answer (integer or boolean outputs of the declared types, all as JSON, nothing else
    asked) joined from cached pieces and orjson's own writing of each array: the bytes the general
    path writes, without its dicts and lists (tested byte for byte). None for any other answer."""
    if (
        request.id
        or response.parameters
        or options.shm_outputs
        or options.classifications
        or call.binary_default
        or call.binary_outputs
    ):
        return None
    declared = spec.output_datatypes
    wanted = request.requested_outputs
    parts = [_answer_head(spec.name, request.model_version)]
    for name, value in response.outputs.items():
        if name not in wanted:
            continue
        datatype = declared.get(name)
        if (
            type(value) is not np.ndarray
            or value.dtype.kind not in "biu"  # floats: orjson and Python's writer differ in digits
            or datatype is None
            or value.dtype != datatypes.numpy_dtype(datatype)
        ):
            return None
        if len(parts) > 1:
            parts.append(b",")
        parts += (_output_head(name, datatype), orjson.dumps(value.shape), b',"data":')
        parts += (orjson.dumps(value.ravel(), option=orjson.OPT_SERIALIZE_NUMPY), b"}")
    parts.append(b"]}")
    return b"".join(parts)


@functools.lru_cache(maxsize=1024)
def _answer_head(model: str, version: int) -> bytes:
    return orjson.dumps({"model_name": model, "model_version": str(version)})[:-1] + b',"outputs":['


@functools.lru_cache(maxsize=1024)
def _output_head(name: str, datatype: str) -> bytes:
    return orjson.dumps({"name": name, "datatype": datatype})[:-1] + b',"shape":'


def empty_response(request: pb.ModelInferRequest | InferRequestMessage | JsonInferRequest) -> HttpBody:
    """The answer of a model that sent only a flags-only final: names, no outputs."""
    document: dict[str, Any] = {"id": request.id} if request.id else {}
    document.update(model_name=request.model_name, model_version=request.model_version, outputs=[])
    return HttpBody([dumps(document)], None)


def _parameter(value: ParameterValue) -> Any:
    """A response parameter as JSON, with the types a protobuf ``InferParameter`` would give it."""
    return value if isinstance(value, (bool, int, float)) else str(value)


def _array_json(datatype: str, array: np.ndarray) -> list[Any]:
    """One output's elements as a flat JSON array, as Triton's ``WriteDataToJson``."""
    if datatype == "BYTES":
        return json_data(datatype, datatypes.to_raw(array, datatype))
    if datatype in ("FP16", "BF16"):
        raise InferenceError(
            f"sending {datatype} data via JSON is not supported. Please use the binary data format for output"
        )
    dtype = datatypes.numpy_dtype(datatype)
    return (array if array.dtype == dtype else array.astype(dtype)).ravel().tolist()


def response_parameters(message: pb.ModelInferResponse) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, param in message.parameters.items():
        kind = param.WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(param, kind)
    return out


def json_data(datatype: str, raw: bytes | memoryview) -> list[Any]:
    """One output's elements as a flat JSON array, as Triton's ``WriteDataToJson``."""
    if datatype in ("FP16", "BF16"):
        raise HttpError(
            f"sending {datatype} data via JSON is not supported. Please use the binary data format for output"
        )
    if datatype == "BYTES":
        return [item.decode("utf-8", errors="replace") for item in datatypes.deserialize_bytes(raw)]
    return np.frombuffer(raw, dtype=datatypes.numpy_dtype(datatype).newbyteorder("<")).tolist()
