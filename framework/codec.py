"""Protocol <-> typed objects: decode and validate a ModelInferRequest, encode responses.

All validation messages follow Triton's texts (clients and tests match on them); errors raise
:class:`InferenceError` with INVALID_ARGUMENT unless Triton uses another code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pagedserve import datatypes
from pagedserve.backend import ModelSpec
from pagedserve.errors import InferenceError
from pagedserve.inference import InferenceRequest, InferenceResponse, ParameterValue, Responder
from pagedserve.protocol import grpc_service_pb2 as pb

ALLOWED_TRITON_KEYS = ("triton_enable_empty_final_response",)
_INT64_MAX = 2**63 - 1

_SHM_DISABLED = (
    "Client shared memory is disabled. Start the server with 'server.allow_client_shm=true' to enable."
)


# -- large messages -------------------------------------------------------------------------------
#
# upb copies a bytes field into its arena when it parses a message, into a new ``bytes`` each time
# the field is read, and into the arena again when one is set; one 60 MiB tensor echoed through
# ModelInfer was alive five times at once. From LARGE_MESSAGE_BYTES on, tensors bypass protobuf: a
# request's raw_input_contents are cut out of the received bytes before protobuf parses the rest
# (the input arrays view those bytes), and a response is serialized with its raw_output_contents
# copied once, straight from the output arrays.

LARGE_MESSAGE_BYTES = 64 * 2**10
# Bounds the walk over top-level fields done in Python; a message with more goes to protobuf whole.
_MAX_SPLIT_FIELDS = 4096
_RAW_INPUT_FIELD = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
_RAW_OUTPUT_FIELD = pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number
_LENGTH_DELIMITED = 2


class InferRequestMessage:
    """A ModelInferRequest whose ``raw_input_contents`` are views of the received message, not
    protobuf copies; every other attribute reads through to the parsed ``message``."""

    __slots__ = ("message", "raw_input_contents")

    def __init__(self, message: pb.ModelInferRequest, raw_input_contents: list[memoryview]) -> None:
        self.message = message
        self.raw_input_contents = raw_input_contents

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


InferRequestLike = pb.ModelInferRequest | InferRequestMessage


class InferResponseMessage:
    """A ModelInferResponse serialized when it is made, its tensors copied straight from the model's
    arrays. Attributes read through to ``message``, which has everything but the tensors (its
    ``raw_output_contents`` is empty); changing it afterwards does not change what is sent."""

    __slots__ = ("message", "serialized")

    def __init__(self, message: pb.ModelInferResponse, raw_outputs: Sequence[bytes | memoryview]) -> None:
        self.message = message
        parts: list[bytes | memoryview] = [message.SerializeToString()]
        for data in raw_outputs:
            parts.append(_key_and_length(_RAW_OUTPUT_FIELD, len(data)))
            parts.append(data)
        # Made here, in the sending thread, so a model may reuse its arrays once send() returns.
        self.serialized = b"".join(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)

    def SerializeToString(self) -> bytes:  # noqa: N802 - protobuf's name: gRPC's serializer calls it
        return self.serialized


def stream_response(response: pb.ModelInferResponse | InferResponseMessage) -> pb.ModelStreamInferResponse:
    """``response`` as the ``infer_response`` of a ModelStreamInferResponse (its tensors copied once)."""
    out = pb.ModelStreamInferResponse()
    if isinstance(response, InferResponseMessage):
        out.infer_response.MergeFromString(response.serialized)
    else:
        out.infer_response.CopyFrom(response)
    return out


def parse_infer_request(data: bytes) -> InferRequestLike:
    """The request deserializer of ModelInfer and ModelStreamInfer; raises protobuf's DecodeError
    on a malformed message, as ``ModelInferRequest.FromString`` does."""
    if len(data) >= LARGE_MESSAGE_BYTES:
        split = _split_field(data, _RAW_INPUT_FIELD)
        if split is not None and split[1]:
            rest, raw = split
            return InferRequestMessage(pb.ModelInferRequest.FromString(rest), raw)
    return pb.ModelInferRequest.FromString(data)


class _Unusual(Exception):
    """Wire content the split leaves to protobuf (malformed, groups, too many fields)."""


def _split_field(data: bytes, number: int) -> tuple[bytes, list[memoryview]] | None:
    """``data`` without its top-level length-delimited fields ``number``, and their payloads (views
    of ``data``) in order; None when protobuf should parse ``data`` whole instead."""
    view = memoryview(data)
    end = len(view)
    kept: list[memoryview] = []  # runs of other fields, in order: protobuf reads them as before
    payloads: list[memoryview] = []
    run_start = pos = 0
    try:
        for _ in range(_MAX_SPLIT_FIELDS):
            if pos == end:
                kept.append(view[run_start:end])
                return b"".join(kept), payloads
            field_start = pos
            key, pos = _read_varint(view, pos)
            wire_type = key & 7
            if wire_type == 0:
                _, pos = _read_varint(view, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == _LENGTH_DELIMITED:
                length, pos = _read_varint(view, pos)
                if key >> 3 == number and pos + length <= end:
                    kept.append(view[run_start:field_start])
                    payloads.append(view[pos : pos + length])
                    run_start = pos = pos + length
                    continue
                pos += length
            else:
                raise _Unusual
            if pos > end:
                raise _Unusual
    except _Unusual:
        return None
    return None


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(view) and shift < 64:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _Unusual


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key_and_length(number: int, length: int) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(length)


class ShmInput(Protocol):
    """Where one input's bytes come from instead of the request message."""

    byte_size: int

    def read(self) -> bytes: ...


class ShmOutput(Protocol):
    """Where one output's bytes go instead of ``raw_output_contents``."""

    def write(self, data: bytes | memoryview) -> None: ...


class ShmAccess(Protocol):
    """One request's view of the registered shared-memory regions (see ``shared_memory.RegionLease``);
    lookups check the region and range, raising InferenceError with Triton's messages."""

    def input(self, name: str, offset: int, byte_size: int) -> ShmInput: ...

    def output(self, output: str, name: str, offset: int, byte_size: int) -> ShmOutput: ...


@dataclass
class RequestOptions:
    """Request-level parameters that steer the server rather than the model."""

    enable_empty_final_response: bool = False
    shm_outputs: dict[str, ShmOutput] = field(default_factory=dict)
    """Requested outputs the client wants written into its shared memory, by output name."""
    classifications: dict[str, int] = field(default_factory=dict)
    """Requested outputs to return as their top-k classes (``classification`` parameter), by name."""


NO_OPTIONS = RequestOptions()
"""The options of a request that sets none (shared: never changed in place)."""


def _prefix(request_id: str) -> str:
    return f"[request id: {request_id or '<id_unknown>'}] "


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _parameter_value(param: pb.InferParameter) -> ParameterValue | None:
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def decode_parameters(request: InferRequestLike, target: InferenceRequest) -> RequestOptions:
    options = RequestOptions()
    for key, param in request.parameters.items():
        kind = param.WhichOneof("parameter_choice")
        if key == "sequence_id":
            if kind not in ("int64_param", "string_param"):
                raise InferenceError(
                    "invalid value type for 'sequence_id' parameter, expected int64_param or string_param."
                )
            target.sequence_id = _parameter_value(param)  # type: ignore[assignment]
        elif key in ("sequence_start", "sequence_end", "triton_enable_empty_final_response"):
            if kind != "bool_param":
                raise InferenceError(f"invalid value type for '{key}' parameter, expected bool_param.")
            if key == "sequence_start":
                target.sequence_start = param.bool_param
            elif key == "sequence_end":
                target.sequence_end = param.bool_param
            else:
                options.enable_empty_final_response = param.bool_param
        elif key == "priority":
            if kind not in ("int64_param", "uint64_param"):
                raise InferenceError(
                    "invalid value type for 'priority' parameter, expected int64_param or uint64_param."
                )
            value = int(_parameter_value(param))  # type: ignore[arg-type]
            if value < 0:
                raise InferenceError("invalid value for 'priority', expected value >= 0.")
            target.priority = value
        elif key == "timeout":
            if kind != "int64_param":
                raise InferenceError("invalid value type for 'timeout' parameter, expected int64_param.")
            if param.int64_param < 0:
                raise InferenceError("invalid value for 'timeout', expected value >= 0.")
            target.timeout_us = param.int64_param
        elif key.startswith("triton_"):
            raise InferenceError(
                "parameter keys starting with 'triton_' are reserved for Triton usage. Only the following "
                "keys starting with 'triton_' are allowed: " + ", ".join(ALLOWED_TRITON_KEYS)
            )
        else:
            if kind not in ("int64_param", "bool_param", "string_param", "double_param"):
                raise InferenceError(
                    f"invalid value type for '{key}' parameter, expected int64_param, bool_param, or "
                    "string_param."
                )
            target.parameters[key] = _parameter_value(param)  # type: ignore[assignment]
    return options


# The typed ``contents`` field each datatype is sent in, and that field's element type.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_CONTENTS_DTYPE = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}


@dataclass(frozen=True, slots=True)
class _InputPlan:
    """What one declared input needs checked, resolved once per version rather than per request."""

    datatype: str
    dims: list[int]
    fixed: list[int] | None
    """``dims`` when no dimension is variable and no shape within the batch limit can overflow: then
    a request's shape is right exactly when it equals this (after its batch dimension)."""
    wire: np.dtype | None
    """The little-endian dtype raw bytes are read as (None for BYTES)."""
    native: bool
    """``wire`` is the model's dtype already (no byte swap)."""
    dtype: np.dtype | None
    """The model's dtype (None for BYTES)."""

    @classmethod
    def of(cls, tensor: Any, max_batch_size: int) -> _InputPlan:
        datatype = datatypes.of_tensor(tensor)
        dims = list(tensor.dims)
        bounded = math.prod(dims) * max(max_batch_size, 1) <= _INT64_MAX
        fixed = dims if bounded and all(d >= 0 for d in dims) else None
        if datatype == "BYTES":
            return cls(datatype, dims, fixed, None, False, None)
        dtype = datatypes.numpy_dtype(datatype)
        wire = dtype.newbyteorder("<")
        return cls(datatype, dims, fixed, wire, wire == dtype, dtype)


class RequestDecoder:
    """Turns one ModelInferRequest into an InferenceRequest for ``spec`` (an already resolved version).

    The common request (raw tensors of fixed shapes, no parameters) takes short paths planned here
    once per version; anything else falls through to the full checks, which word every error."""

    def __init__(self, spec: ModelSpec, version: int) -> None:
        self.spec = spec
        self.version = version
        cfg = spec.config
        self.max_batch_size = cfg.max_batch_size
        self.inputs = {i.name: i for i in cfg.input}
        self.outputs = [o.name for o in cfg.output]
        self._plans = {i.name: _InputPlan.of(i, cfg.max_batch_size) for i in cfg.input}
        # (datatype, dims) per input: what in_process.py checks numpy inputs against.
        self._expected = {name: (plan.datatype, plan.dims) for name, plan in self._plans.items()}
        self._required = tuple(i.name for i in cfg.input if not i.optional)
        self._required_set = frozenset(self._required)
        self._output_types = spec.output_datatypes

    def decode(
        self, request: InferRequestLike, responder: Responder, shm: ShmAccess | None = None
    ) -> tuple[InferenceRequest, RequestOptions]:
        """``shm`` is None when client shared memory is disabled."""
        if not request.parameters and not request.outputs:
            plain = self._decode_arrays(request, responder)
            if plain is not None:
                return plain, NO_OPTIONS
        target = InferenceRequest(
            model_name=self.spec.name,
            model_version=self.version,
            inputs={},
            requested_outputs=[],
            responder=responder,
            id=request.id,
        )
        try:
            options = decode_parameters(request, target)
            self._decode_inputs(request, target, shm)
            target.requested_outputs = self._requested_outputs(request, options, shm)
        except InferenceError as error:
            if not error.message.startswith("[request id:"):
                error.message = _prefix(request.id) + error.message
            raise
        finally:
            if isinstance(request, InferRequestMessage):
                # The input arrays hold what they use. gRPC keeps a stream's last request until the
                # next arrives; without its views, that pins no tensor after the request is done.
                request.raw_input_contents = []
        return target, options

    def _decode_arrays(self, request: InferRequestLike, responder: Responder) -> InferenceRequest | None:
        """The request, when its inputs are what the model declares and arrived as arrays of its
        types already (the HTTP front-end's JSON data) and it asks for nothing else: every check of
        :meth:`decode` would pass, so here they are only conditions. None leaves the request, and the
        wording of its errors, to the full decode."""
        raw = request.raw_input_contents
        if len(raw) != len(request.inputs):
            return None
        inputs: dict[str, np.ndarray] = {}
        batch_sizes: set[int] = set()
        for tensor, array in zip(request.inputs, raw, strict=True):
            plan = self._plans.get(tensor.name)
            if (
                type(array) is not np.ndarray
                or plan is None
                or tensor.name in inputs
                or tensor.datatype != plan.datatype
                or array.dtype != plan.dtype
                or not _plain_tensor(tensor)
            ):
                return None
            shape = list(tensor.shape)
            if not self._plain_shape(plan, shape, batch_sizes) or array.size != math.prod(shape):
                return None
            inputs[tensor.name] = array.reshape(shape)
        if not self._required_set <= inputs.keys():
            return None
        target = InferenceRequest(
            model_name=self.spec.name,
            model_version=self.version,
            inputs=inputs,
            requested_outputs=list(self.outputs),
            responder=responder,
            id=request.id,
        )
        if self.max_batch_size > 0 and batch_sizes:
            target.batch_size = batch_sizes.pop()
        return target

    # -- inputs -----------------------------------------------------------------------------------

    def _decode_inputs(
        self, request: InferRequestLike, target: InferenceRequest, shm: ShmAccess | None
    ) -> None:
        name = self.spec.name
        raw_index = 0
        raw = request.raw_input_contents
        batch_sizes: set[int] = set()
        for tensor in request.inputs:
            if tensor.name in target.inputs:
                raise InferenceError(f"input '{tensor.name}' already exists in request")
            plan = self._plans.get(tensor.name)
            if plan is None:
                raise InferenceError(f"unexpected inference input '{tensor.name}' for model '{name}'")
            if tensor.datatype != plan.datatype:
                got = tensor.datatype if tensor.datatype in datatypes.PROTOCOL_TYPES else "<invalid>"
                raise InferenceError(
                    f"inference input '{tensor.name}' data-type is '{got}', but model '{name}' expects "
                    f"'{plan.datatype}'"
                )
            shape = list(tensor.shape)
            if not self._plain_shape(plan, shape, batch_sizes):
                self._check_shape(tensor.name, shape, plan.dims, batch_sizes)
            if raw_index < len(raw) and plan.wire is not None and _plain_tensor(tensor):
                array = self._raw_array(tensor.name, plan, shape, raw[raw_index])
                raw_index += 1
            else:
                data, raw_index = self._tensor_data(request, tensor, raw_index, shm)
                array = self._to_array(tensor.name, tensor.datatype, shape, data)
            target.inputs[tensor.name] = array
        if raw_index < len(raw):
            raise InferenceError(
                f"unexpected number of raw_input_contents entries: {len(request.raw_input_contents)} "
                f"given but only {raw_index} inputs use them for model '{name}'"
            )
        self._check_required(target)
        if self.max_batch_size > 0 and batch_sizes:
            target.batch_size = batch_sizes.pop()

    def _plain_shape(self, plan: _InputPlan, shape: list[int], batch_sizes: set[int]) -> bool:
        """True when ``shape`` passes every check of :meth:`_check_shape` (and its batch size is
        noted); False leaves the verdict to it."""
        if plan.fixed is None:
            return False
        if self.max_batch_size <= 0:
            return shape == plan.fixed
        if not shape or not 0 <= shape[0] <= self.max_batch_size or shape[1:] != plan.fixed:
            return False
        if batch_sizes and shape[0] not in batch_sizes:
            return False
        batch_sizes.add(shape[0])
        return True

    def _raw_array(
        self, input_name: str, plan: _InputPlan, shape: list[int], data: bytes | memoryview
    ) -> np.ndarray:
        """A fixed-size input from its raw bytes (what :meth:`_to_array` does for them, in short)."""
        assert plan.wire is not None
        if type(data) is np.ndarray:  # the elements already (the HTTP front-end's JSON data)
            if data.dtype == plan.dtype and data.size == math.prod(shape):
                return data.reshape(shape)
            return self._to_array(input_name, plan.datatype, shape, data)
        expected = math.prod(shape) * plan.wire.itemsize
        if len(data) != expected:
            raise _byte_size_mismatch(input_name, self.spec.name, expected, len(data))
        array = np.frombuffer(data, dtype=plan.wire)
        if not plan.native:
            array = array.astype(plan.wire.newbyteorder("="))
        return array.reshape(shape)

    def _check_shape(self, input_name: str, shape: list[int], dims: list[int], batch_sizes: set[int]) -> None:
        name = self.spec.name
        if any(d < 0 for d in shape):
            raise InferenceError(
                f"All input dimensions should be specified for input '{input_name}' for model '{name}', "
                f"got {_fmt_shape(shape)}"
            )
        if math.prod(shape) > _INT64_MAX:
            raise InferenceError(f"input '{input_name}' shape {_fmt_shape(shape)} is too large")
        body = shape
        if self.max_batch_size > 0:
            if not shape:
                raise InferenceError(
                    f"input '{input_name}' has no shape but model requires batch dimension for '{name}'"
                )
            batch = shape[0]
            if batch > self.max_batch_size:
                raise InferenceError(
                    f"inference request batch-size must be <= {self.max_batch_size} for '{name}'"
                )
            if batch_sizes and batch not in batch_sizes:
                raise InferenceError(
                    f"input '{input_name}' batch size does not match other inputs for '{name}'"
                )
            batch_sizes.add(batch)
            body = shape[1:]
        if len(body) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, body, strict=False)):
            expected = ([-1] if self.max_batch_size > 0 else []) + dims
            note = (
                " NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension "
                "to be prepended to each input shape. If you want to specify the full shape including the "
                "batch dim in your input dims config, try setting max_batch_size to zero. See the model "
                "configuration docs for more info on max_batch_size."
                if self.max_batch_size > 0
                else ""
            )
            raise InferenceError(
                f"unexpected shape for input '{input_name}' for model '{name}'. Expected "
                f"{_fmt_shape(expected)}, got {_fmt_shape(shape)}.{note}"
            )

    def _tensor_data(
        self,
        request: InferRequestLike,
        tensor: pb.ModelInferRequest.InferInputTensor,
        raw_index: int,
        shm: ShmAccess | None,
    ) -> tuple[bytes | memoryview | np.ndarray | list[bytes], int]:
        name = self.spec.name
        placement = shm_parameters(tensor)
        has_contents = tensor.HasField("contents") and tensor.contents.ByteSize() > 0
        if placement is not None:
            if has_contents:
                raise InferenceError(
                    f"unexpected 'content' provided when using shared memory for input tensor "
                    f"'{tensor.name}' for model '{name}'"
                )
            source = _shm_access(shm).input(*placement)
            self._check_shm_size(tensor, source.byte_size)
            return source.read(), raw_index
        if has_contents:
            if request.raw_input_contents:
                raise InferenceError(
                    f"contents field must not be specified when using raw_input_contents for "
                    f"'{tensor.name}' for model '{name}'"
                )
            return self._typed_contents(tensor), raw_index
        if raw_index < len(request.raw_input_contents):
            return request.raw_input_contents[raw_index], raw_index + 1
        if math.prod(tensor.shape) == 0 and not request.raw_input_contents:
            return b"", raw_index
        raise InferenceError(
            f"unable to find data for input tensor '{tensor.name}' for model '{name}' in request."
        )

    def _check_shm_size(self, tensor: pb.ModelInferRequest.InferInputTensor, byte_size: int) -> None:
        """Refuse a wrong byte size before copying: the range may be far larger than the tensor."""
        if tensor.datatype == "BYTES":
            return  # variable-sized elements; _to_array counts them after the copy
        expected = math.prod(tensor.shape) * datatypes.element_size(tensor.datatype)
        if byte_size != expected:
            raise _byte_size_mismatch(tensor.name, self.spec.name, expected, byte_size)

    def _typed_contents(self, tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray | list[bytes]:
        expected = _CONTENTS_FIELD.get(tensor.datatype)
        for descriptor, _ in tensor.contents.ListFields():
            if descriptor.name != expected:
                raise InferenceError(
                    f"unexpected explicit tensor data for input tensor '{tensor.name}' for model "
                    f"'{self.spec.name}' of type '{descriptor.name}', expected datatype '{tensor.datatype}'"
                )
        if expected is None:
            return np.empty(0, dtype=datatypes.numpy_dtype(tensor.datatype))
        values = getattr(tensor.contents, expected)
        if expected == "bytes_contents":
            return list(values)
        # One element at a time: list() first made a Python object of each, 11x the message's size.
        return np.fromiter(values, dtype=_CONTENTS_DTYPE[expected], count=len(values))

    def _to_array(
        self,
        input_name: str,
        datatype: str,
        shape: list[int],
        data: bytes | memoryview | np.ndarray | list[bytes],
    ) -> np.ndarray:
        name = self.spec.name
        count = math.prod(shape)
        if datatype == "BYTES":
            if isinstance(data, list):
                items = data
            else:
                try:
                    items = datatypes.deserialize_bytes(data)
                except ValueError as error:
                    raise InferenceError(
                        f"incomplete string length indicator for inference input '{input_name}' for model "
                        f"'{name}', {error}. Please make sure the string length indicator is in one chunk."
                    ) from None
            if len(items) < count:
                raise InferenceError(
                    f"expected {count} string elements for inference input '{input_name}' for model "
                    f"'{name}', got {len(items)}"
                )
            if len(items) > count:
                raise InferenceError(
                    f"unexpected number of string elements {len(items)} for inference input '{input_name}' "
                    f"for model '{name}', expecting {count}"
                )
            array = np.empty(count, dtype=np.object_)
            array[:] = items
            return array.reshape(shape)
        dtype = datatypes.numpy_dtype(datatype)
        if isinstance(data, np.ndarray):
            if len(data) != count:
                size = dtype.itemsize
                raise _byte_size_mismatch(input_name, name, count * size, len(data) * size)
            return data.astype(dtype, copy=False).reshape(shape)  # narrower types wrap, as C casts do
        expected = count * dtype.itemsize
        if len(data) != expected:
            raise _byte_size_mismatch(input_name, name, expected, len(data))
        return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)

    def _check_required(self, target: InferenceRequest) -> None:
        if target.inputs.keys() >= self._required_set:
            return
        required = list(self._required)
        missing = [n for n in required if n not in target.inputs]
        if not missing:
            return
        got = list(target.inputs)
        has_optional = len(required) < len(self.inputs)
        expected = (
            f"expected number of inputs between {len(required)} and {len(self.inputs)}"
            if has_optional
            else f"expected {len(required)} inputs"
        )
        raise InferenceError(
            f"{expected} but got {len(got)} inputs for model '{self.spec.name}'. Got input(s) {got}, but "
            f"missing required input(s) {missing}. Please provide all required input(s)."
        )

    # -- outputs ----------------------------------------------------------------------------------

    def _requested_outputs(
        self, request: InferRequestLike, options: RequestOptions, shm: ShmAccess | None
    ) -> list[str]:
        if not request.outputs:
            return list(self.outputs)
        names: list[str] = []
        for output in request.outputs:
            if output.name in names:
                raise InferenceError(f"output '{output.name}' already exists in request")
            if output.name not in self.outputs:
                raise InferenceError(
                    f"unexpected inference output '{output.name}' for model '{self.spec.name}'"
                )
            placement = shm_parameters(output)
            top_k = _classification(output)
            if placement is not None and top_k:
                raise InferenceError("output can't set both 'shared_memory_region' and 'classification'")
            if placement is not None:
                options.shm_outputs[output.name] = _shm_access(shm).output(output.name, *placement)
            if top_k:
                # Refused before the model runs; Triton finds out only when it encodes the output.
                _check_classifiable(self._output_types[output.name])
                options.classifications[output.name] = top_k
            names.append(output.name)
        return names


def _plain_tensor(tensor: pb.ModelInferRequest.InferInputTensor) -> bool:
    """No parameters (so no shared memory) and no typed contents: its data is the next raw entry."""
    return not tensor.parameters and not tensor.HasField("contents")


def shm_parameters(
    tensor: pb.ModelInferRequest.InferInputTensor | pb.ModelInferRequest.InferRequestedOutputTensor,
) -> tuple[str, int, int] | None:
    """``(region, offset, byte_size)`` from a tensor's shared-memory parameters, or None without them."""
    params = tensor.parameters
    region: str | None = None
    if "shared_memory_region" in params:
        if params["shared_memory_region"].WhichOneof("parameter_choice") != "string_param":
            raise InferenceError(
                f"invalid value type for 'shared_memory_region' parameter for tensor '{tensor.name}', "
                "expected string_param."
            )
        region = params["shared_memory_region"].string_param
    offset = _shm_int(tensor, "shared_memory_offset", region is not None)
    byte_size = _shm_int(tensor, "shared_memory_byte_size", region is not None)
    if region is None:
        return None
    if byte_size is None:
        raise InferenceError(
            "'shared_memory_byte_size' must be specified along with 'shared_memory_region' parameter "
            f"for tensor '{tensor.name}'"
        )
    return region, offset or 0, byte_size


def _shm_int(
    tensor: pb.ModelInferRequest.InferInputTensor | pb.ModelInferRequest.InferRequestedOutputTensor,
    key: str,
    has_region: bool,
) -> int | None:
    if key not in tensor.parameters:
        return None
    if not has_region:
        raise InferenceError(
            f"'{key}' can not be specified without 'shared_memory_region' parameter for tensor "
            f"'{tensor.name}'"
        )
    param = tensor.parameters[key]
    if param.WhichOneof("parameter_choice") != "int64_param":
        raise InferenceError(
            f"invalid value type for '{key}' parameter for tensor '{tensor.name}', expected int64_param."
        )
    return param.int64_param


def _classification(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> int:
    """The requested top-k of a ``classification`` output parameter; 0 without one."""
    if "classification" not in output.parameters:
        return 0
    param = output.parameters["classification"]
    if param.WhichOneof("parameter_choice") != "int64_param":
        raise InferenceError("invalid value type for 'classification' parameter, expected int64_param")
    if param.int64_param <= 0:
        raise InferenceError("invalid value for 'classification' parameter, expected >= 0")
    return param.int64_param


# Triton's TopkClassifications: integer and FP32/FP64 outputs only, at most this many elements per
# batch entry (a full sort of more is the client's way to make the server slow).
_CLASSIFIABLE = frozenset(
    ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64")
)
MAX_CLASSIFICATION_ELEMENTS = 1_000_000


def _byte_size_mismatch(input_name: str, model: str, expected: int, got: int) -> InferenceError:
    return InferenceError(
        f"input byte size mismatch for input '{input_name}' for model '{model}'. "
        f"Expected {expected}, got {got}"
    )


def _check_classifiable(datatype: str) -> None:
    if datatype not in _CLASSIFIABLE:
        raise InferenceError(f"class result not available for output due to unsupported type '{datatype}'")


def classify(array: np.ndarray, top_k: int, batched: bool, datatype: str) -> np.ndarray:
    """Triton's classification output: per batch entry, the ``top_k`` largest elements of the output
    (of protocol ``datatype``) as BYTES ``"<value>:<index>"`` (shape ``[batch, k]``, or ``[k]`` for a
    model without a batch dimension)."""
    _check_classifiable(datatype)
    array = array.astype(datatypes.numpy_dtype(datatype), copy=False)
    batched = batched and array.ndim > 0
    # Explicit sizes: -1 cannot be inferred for an empty batch.
    rows = array.reshape(array.shape[0], math.prod(array.shape[1:])) if batched else array.reshape(1, -1)
    if rows.shape[1] > MAX_CLASSIFICATION_ELEMENTS:
        raise InferenceError("classification output tensor too large")
    k = min(top_k, rows.shape[1])
    floating = datatype in ("FP32", "FP64")
    out = np.empty((rows.shape[0], k), dtype=np.object_)
    for r, row in enumerate(rows):
        for c, index in enumerate(np.argsort(-row.astype(np.float64), kind="stable")[:k]):
            value = row[index]
            text = f"{float(value):f}" if floating else str(int(value))
            out[r, c] = f"{text}:{index}".encode()
    return out if batched else out[0]


def _shm_access(shm: ShmAccess | None) -> ShmAccess:
    if shm is None:
        raise InferenceError.unimplemented(_SHM_DISABLED)
    return shm


ResponseEncoder = Callable[[ModelSpec, InferenceRequest, InferenceResponse, RequestOptions], Any]
"""Turns a model's response into what a front-end sends (a ModelInferResponse for gRPC); called in
the thread the model sends from."""


def response_tensors(
    spec: ModelSpec, request: InferenceRequest, response: InferenceResponse, options: RequestOptions
) -> Iterator[tuple[str, str, np.ndarray, ShmOutput | None]]:
    """Each requested output the model produced, in its order: ``(name, datatype, array, target)``,
    classification applied, ``target`` the client's shared-memory region when it asked for one."""
    declared = spec.output_datatypes
    wanted = request.requested_outputs
    for name, value in response.outputs.items():
        if name not in wanted:
            continue
        array = np.asarray(value)
        datatype = declared.get(name) or datatypes.from_numpy(array.dtype)
        if options.classifications and name in options.classifications:
            batched = spec.config.max_batch_size > 0
            array = classify(array, options.classifications[name], batched, datatype)
            datatype = "BYTES"
        target = options.shm_outputs.get(name) if options.shm_outputs else None
        yield name, datatype, array, target


def encode_response(
    spec: ModelSpec,
    request: InferenceRequest,
    response: InferenceResponse,
    options: RequestOptions,
) -> pb.ModelInferResponse | InferResponseMessage:
    """The gRPC front-ends' :data:`ResponseEncoder`: one ModelInferResponse; every output gets exactly
    one raw_output_contents entry, aligned (left empty for outputs written into the client's shared
    memory). From LARGE_MESSAGE_BYTES of tensors on, it comes serialized already
    (InferResponseMessage): the tensors never enter protobuf."""
    outputs: list[dict[str, Any]] = []
    raw_outputs: list[bytes | memoryview] = []
    for name, datatype, array, target in response_tensors(spec, request, response, options):
        # Dicts, and the whole message in one constructor call: protobuf builds the submessages
        # in C instead of one ``outputs.add`` round trip each.
        outputs.append({"name": name, "datatype": datatype, "shape": array.shape})
        raw = datatypes.to_raw(array, datatype)
        if target is not None:
            target.write(raw)
            raw = b""
        raw_outputs.append(raw)
    large = sum(len(raw) for raw in raw_outputs) >= LARGE_MESSAGE_BYTES
    message = pb.ModelInferResponse(
        model_name=spec.name,
        model_version=str(request.model_version),
        id=request.id,
        outputs=outputs,
        raw_output_contents=() if large else [bytes(raw) for raw in raw_outputs],
    )
    for key, value in response.parameters.items():
        set_parameter(message.parameters[key], value)
    return InferResponseMessage(message, raw_outputs) if large else message


def set_parameter(param: pb.InferParameter, value: ParameterValue) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)
