"""Protocol <-> typed objects: decode and validate a ModelInferRequest, encode responses.

All validation messages follow Triton's texts (clients and tests match on them); errors raise
:class:`InferenceError` with INVALID_ARGUMENT unless Triton uses another code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

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


class ShmInput(Protocol):
    """Where one input's bytes come from instead of the request message."""

    byte_size: int

    def read(self) -> bytes: ...


class ShmOutput(Protocol):
    """Where one output's bytes go instead of ``raw_output_contents``."""

    def write(self, data: bytes) -> None: ...


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


def _prefix(request_id: str) -> str:
    return f"[request id: {request_id or '<id_unknown>'}] "


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _parameter_value(param: pb.InferParameter) -> ParameterValue | None:
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def decode_parameters(request: pb.ModelInferRequest, target: InferenceRequest) -> RequestOptions:
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


class RequestDecoder:
    """Turns one ModelInferRequest into an InferenceRequest for ``spec`` (an already resolved version)."""

    def __init__(self, spec: ModelSpec, version: int) -> None:
        self.spec = spec
        self.version = version
        cfg = spec.config
        self.max_batch_size = cfg.max_batch_size
        self.inputs = {i.name: i for i in cfg.input}
        self.outputs = [o.name for o in cfg.output]
        # Per input: protocol datatype and dims, resolved once rather than per request.
        self._expected = {i.name: (datatypes.of_tensor(i), list(i.dims)) for i in cfg.input}

    def decode(
        self, request: pb.ModelInferRequest, responder: Responder, shm: ShmAccess | None = None
    ) -> tuple[InferenceRequest, RequestOptions]:
        """``shm`` is None when client shared memory is disabled."""
        target = InferenceRequest(
            model_name=self.spec.name,
            model_version=self.version,
            inputs={},
            requested_outputs=[],
            responder=responder,
            id=request.id,
        )
        prefix = _prefix(request.id)
        try:
            options = decode_parameters(request, target)
            self._decode_inputs(request, target, shm)
            target.requested_outputs = self._requested_outputs(request, options, shm)
        except InferenceError as error:
            if not error.message.startswith("[request id:"):
                error.message = prefix + error.message
            raise
        return target, options

    # -- inputs -----------------------------------------------------------------------------------

    def _decode_inputs(
        self, request: pb.ModelInferRequest, target: InferenceRequest, shm: ShmAccess | None
    ) -> None:
        name = self.spec.name
        raw_index = 0
        batch_sizes: set[int] = set()
        for tensor in request.inputs:
            if tensor.name in target.inputs:
                raise InferenceError(f"input '{tensor.name}' already exists in request")
            expected = self._expected.get(tensor.name)
            if expected is None:
                raise InferenceError(f"unexpected inference input '{tensor.name}' for model '{name}'")
            expected_type, dims = expected
            if tensor.datatype != expected_type:
                got = tensor.datatype if tensor.datatype in datatypes.PROTOCOL_TYPES else "<invalid>"
                raise InferenceError(
                    f"inference input '{tensor.name}' data-type is '{got}', but model '{name}' expects "
                    f"'{expected_type}'"
                )
            shape = list(tensor.shape)
            self._check_shape(tensor.name, shape, dims, batch_sizes)
            data, raw_index = self._tensor_data(request, tensor, raw_index, shm)
            target.inputs[tensor.name] = self._to_array(tensor.name, tensor.datatype, shape, data)
        if raw_index < len(request.raw_input_contents):
            raise InferenceError(
                f"unexpected number of raw_input_contents entries: {len(request.raw_input_contents)} "
                f"given but only {raw_index} inputs use them for model '{name}'"
            )
        self._check_required(target)
        if self.max_batch_size > 0 and batch_sizes:
            target.batch_size = batch_sizes.pop()

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
        request: pb.ModelInferRequest,
        tensor: pb.ModelInferRequest.InferInputTensor,
        raw_index: int,
        shm: ShmAccess | None,
    ) -> tuple[bytes | list[object], int]:
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
            raise InferenceError(
                f"input byte size mismatch for input '{tensor.name}' for model '{self.spec.name}'. "
                f"Expected {expected}, got {byte_size}"
            )

    def _typed_contents(self, tensor: pb.ModelInferRequest.InferInputTensor) -> list[object]:
        field_for = {
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
        expected = field_for.get(tensor.datatype)
        for descriptor, _ in tensor.contents.ListFields():
            if descriptor.name != expected:
                raise InferenceError(
                    f"unexpected explicit tensor data for input tensor '{tensor.name}' for model "
                    f"'{self.spec.name}' of type '{descriptor.name}', expected datatype '{tensor.datatype}'"
                )
        return list(getattr(tensor.contents, expected)) if expected else []

    def _to_array(
        self, input_name: str, datatype: str, shape: list[int], data: bytes | list[object]
    ) -> np.ndarray:
        name = self.spec.name
        count = math.prod(shape)
        if datatype == "BYTES":
            if isinstance(data, list):
                items = [bytes(x) for x in data]  # type: ignore[arg-type]
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
        if isinstance(data, list):
            if len(data) != count:
                raise InferenceError(
                    f"input byte size mismatch for input '{input_name}' for model '{name}'. Expected "
                    f"{count * dtype.itemsize}, got {len(data) * dtype.itemsize}"
                )
            return np.asarray(data).astype(dtype).reshape(shape)
        expected = count * dtype.itemsize
        if len(data) != expected:
            raise InferenceError(
                f"input byte size mismatch for input '{input_name}' for model '{name}'. Expected "
                f"{expected}, got {len(data)}"
            )
        return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)

    def _check_required(self, target: InferenceRequest) -> None:
        required = [n for n, i in self.inputs.items() if not i.optional]
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
        self, request: pb.ModelInferRequest, options: RequestOptions, shm: ShmAccess | None
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
                options.classifications[output.name] = top_k
            names.append(output.name)
        return names


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


def classify(array: np.ndarray, top_k: int, batched: bool) -> np.ndarray:
    """Triton's classification output: per batch row, the ``top_k`` largest elements as BYTES
    ``"<value>:<index>"`` (shape ``[batch, k]``, or ``[k]`` for a model without a batch dimension)."""
    rows = array.reshape(array.shape[0], -1) if batched and array.ndim else array.reshape(1, -1)
    k = min(top_k, rows.shape[1])
    out = np.empty((rows.shape[0], k), dtype=np.object_)
    for r, row in enumerate(rows):
        for c, index in enumerate(np.argsort(-row.astype(np.float64), kind="stable")[:k]):
            value = row[index]
            text = f"{float(value):f}" if np.issubdtype(row.dtype, np.floating) else str(int(value))
            out[r, c] = f"{text}:{index}".encode()
    return out if batched and array.ndim else out[0]


def _shm_access(shm: ShmAccess | None) -> ShmAccess:
    if shm is None:
        raise InferenceError.unimplemented(_SHM_DISABLED)
    return shm


def encode_response(
    spec: ModelSpec,
    request: InferenceRequest,
    response: InferenceResponse | None,
    options: RequestOptions | None = None,
) -> pb.ModelInferResponse:
    """One ModelInferResponse; every output gets exactly one raw_output_contents entry, aligned (left
    empty for outputs written into the client's shared memory)."""
    options = options or RequestOptions()
    message = pb.ModelInferResponse(
        model_name=spec.name, model_version=str(request.model_version), id=request.id
    )
    if response is None:
        return message
    declared = spec.output_datatypes
    wanted = set(request.requested_outputs)
    for name, value in response.outputs.items():
        if name not in wanted:
            continue
        array = np.asarray(value)
        datatype = declared.get(name) or datatypes.from_numpy(array.dtype)
        if name in options.classifications:
            array = classify(array, options.classifications[name], spec.config.max_batch_size > 0)
            datatype = "BYTES"
        message.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        raw = datatypes.to_raw(array, datatype)
        target = options.shm_outputs.get(name)
        if target is not None:
            target.write(raw)
            raw = b""
        message.raw_output_contents.append(raw)
    for key, value in response.parameters.items():
        set_parameter(message.parameters[key], value)
    return message


def set_parameter(param: pb.InferParameter, value: ParameterValue) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)
