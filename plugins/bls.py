"""Business logic scripting (BLS): Triton's ``pb_utils`` names for a python model calling other models.

``import pagedserve_plugins.bls as pb_utils`` in a python model, then, as in Triton's Python backend::

    request = pb_utils.InferenceRequest(
        model_name="simple", requested_output_names=["OUTPUT0"], inputs=[pb_utils.Tensor("INPUT0", x), ...]
    )
    response = request.exec()                      # blocking; or: await request.async_exec()
    if response.has_error():
        raise pb_utils.TritonModelException(response.error().message())
    out = pb_utils.get_output_tensor_by_name(response, "OUTPUT0").as_numpy()
    for piece in request.exec(decoupled=True): ... # each response of a decoupled model, as it comes

A failed call (unknown model, bad inputs, the model's own error, ``timeout`` in microseconds passed)
is an error response, never an exception. Calls go through the model manager's in-process client
(:mod:`pagedserve.in_process`), so they count in the called model's statistics, and carry the
caller chain: a model calling itself, directly or through others, gets an error response instead of
waiting for itself. The python backend sets the caller while ``execute`` runs (a ``ContextVar``,
which ``asyncio`` tasks inherit); a thread a model starts itself should run its calls in
``contextvars.copy_context()``, else they count as the loaded model's first call.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from pagedserve.errors import InferenceError
from pagedserve.in_process import Caller, CallOptions, InferenceCall, InProcessClient, ModelKey
from pagedserve.inference import InferenceRequest as ServedRequest
from pagedserve.inference import InferenceResponse as ServedResponse
from pagedserve.inference import ParameterValue

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2


class TritonModelException(Exception):
    """Raise it from ``execute`` to fail the requests of the batch with its message."""


class TritonError:
    """An error as a BLS response carries it: ``message()`` and ``code()``."""

    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r})"


_CODES = {
    grpc.StatusCode.INTERNAL: TritonError.INTERNAL,
    grpc.StatusCode.NOT_FOUND: TritonError.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: TritonError.INVALID_ARG,
    grpc.StatusCode.UNAVAILABLE: TritonError.UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED: TritonError.UNSUPPORTED,
    grpc.StatusCode.ALREADY_EXISTS: TritonError.ALREADY_EXISTS,
    grpc.StatusCode.CANCELLED: TritonError.CANCELLED,
}
_STATUSES = {code: status for status, code in _CODES.items()}


class Tensor:
    """A named numpy array (``BYTES``: an object array of ``bytes``)."""

    def __init__(self, name: str, data: np.ndarray) -> None:
        self._name = name
        self._data = np.asarray(data)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._data

    def shape(self) -> tuple[int, ...]:
        return self._data.shape


class InferenceResponse:
    """A response: output tensors, or an error. Also what ``execute`` may return for a request."""

    def __init__(
        self,
        output_tensors: Sequence[Tensor] | None = None,
        error: TritonError | None = None,
        parameters: Mapping[str, ParameterValue] | str | None = None,
    ) -> None:
        self._outputs = list(output_tensors or [])
        self._error = error
        self._parameters = _parameters(parameters)

    def output_tensors(self) -> list[Tensor]:
        return list(self._outputs)

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return json.dumps(self._parameters)

    @classmethod
    def from_served(cls, response: ServedResponse) -> InferenceResponse:
        if response.error is not None:
            code = _CODES.get(response.error.code, TritonError.UNKNOWN)
            return cls(error=TritonError(response.error.message, code))
        tensors = [Tensor(name, value) for name, value in response.outputs.items()]
        return cls(output_tensors=tensors, parameters=response.parameters)

    def to_served(self) -> ServedResponse:
        """As the python backend sends it."""
        if self._error is not None:
            status = _STATUSES.get(self._error.code(), grpc.StatusCode.INTERNAL)
            return ServedResponse(error=InferenceError(self._error.message(), status))
        outputs = {tensor.name(): tensor.as_numpy() for tensor in self._outputs}
        return ServedResponse(outputs=outputs, parameters=dict(self._parameters))


def _parameters(parameters: Mapping[str, ParameterValue] | str | None) -> dict[str, ParameterValue]:
    if parameters is None:
        return {}
    if isinstance(parameters, str):
        parameters = json.loads(parameters)
    if not isinstance(parameters, Mapping) or not all(
        isinstance(value, bool | int | float | str) for value in parameters.values()
    ):
        raise TritonModelException("parameters must map names to bool, int, float or str values")
    return dict(parameters)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)


def get_input_tensor_by_name(request: ServedRequest, name: str) -> Tensor | None:
    """An input of a request ``execute`` received, as a :class:`Tensor` (to pass on in a BLS call)."""
    value = request.inputs.get(name)
    return None if value is None else Tensor(name, value)


@dataclass(frozen=True)
class BlsCaller:
    """Where BLS calls made now go, and the caller chain they extend."""

    client: InProcessClient
    chain: tuple[ModelKey, ...] = ()


_current: contextvars.ContextVar[BlsCaller | None] = contextvars.ContextVar(
    "pagedserve_bls_caller", default=None
)
current_caller = _current
"""For a hot path that sets the caller itself (the python backend, per batch); else ``calling_as``."""
_fallback: BlsCaller | None = None


@contextlib.contextmanager
def calling_as(caller: BlsCaller) -> Iterator[None]:
    """BLS calls inside the block come from ``caller`` (the python backend wraps ``execute``)."""
    token = _current.set(caller)
    try:
        yield
    finally:
        _current.reset(token)


def use_client(client: InProcessClient) -> None:
    """The client for calls outside any ``execute`` (threads a model started on its own)."""
    global _fallback
    _fallback = BlsCaller(client)


class InferenceRequest:
    """A request to another loaded model (Triton's BLS ``pb_utils.InferenceRequest``)."""

    def __init__(
        self,
        model_name: str,
        requested_output_names: Sequence[str],
        inputs: Sequence[Tensor],
        request_id: str = "",
        correlation_id: int | str = 0,
        model_version: int = -1,
        flags: int = 0,
        timeout: int = 0,
        parameters: Mapping[str, ParameterValue] | str | None = None,
        **_ignored: Any,  # preferred_memory, trace: no meaning in one process
    ) -> None:
        for tensor in inputs:
            if not isinstance(tensor, Tensor):
                raise TypeError(f"BLS inputs must be pb_utils.Tensor objects, got {type(tensor).__name__}")
        self.model_name = model_name
        self.requested_output_names = list(requested_output_names)
        self.inputs = list(inputs)
        self.model_version = model_version
        self.timeout = timeout
        """Microseconds; 0 waits as long as the model takes."""
        self.options = CallOptions(
            request_id=request_id,
            parameters=_parameters(parameters),
            timeout_us=timeout,
            sequence_id=correlation_id,
            sequence_start=bool(flags & TRITONSERVER_REQUEST_FLAG_SEQUENCE_START),
            sequence_end=bool(flags & TRITONSERVER_REQUEST_FLAG_SEQUENCE_END),
        )

    def exec(self, decoupled: bool = False) -> InferenceResponse | Iterator[InferenceResponse]:
        """Run and wait: one response, or with ``decoupled`` an iterator of them as they come (the
        last may be empty: the final flag alone)."""
        call = self._start()
        if decoupled:
            return (InferenceResponse.from_served(r) for r in call.responses(self._timeout_s))
        return InferenceResponse.from_served(call.result(self._timeout_s))

    async def async_exec(self, decoupled: bool = False) -> InferenceResponse | list[InferenceResponse]:
        """:meth:`exec` for ``async def execute``; with ``decoupled``, every response once the last
        has come (``asyncio.gather`` several calls to run them side by side)."""
        call = self._start()
        if decoupled:
            return [InferenceResponse.from_served(r) async for r in call.aresponses(self._timeout_s)]
        return InferenceResponse.from_served(await call.aresult(self._timeout_s))

    @property
    def _timeout_s(self) -> float | None:
        return self.timeout / 1e6 if self.timeout > 0 else None

    def _start(self) -> InferenceCall:
        caller = _current.get() or _fallback
        inputs = {tensor.name(): tensor.as_numpy() for tensor in self.inputs}
        problem = None
        if caller is None:
            problem = InferenceError.unavailable("BLS calls need a loaded python model to make them")
        elif len(inputs) != len(self.inputs):
            duplicate = next(
                t.name() for t in self.inputs if [u.name() for u in self.inputs].count(t.name()) > 1
            )
            problem = InferenceError(f"input '{duplicate}' already exists in request")
        if problem is not None or caller is None:
            call = InferenceCall()
            call.put(ServedResponse(error=problem), True)
            return call
        return caller.client.call(
            self.model_name,
            inputs,
            model_version=self.model_version,
            requested_outputs=self.requested_output_names,
            options=self.options,
            caller=Caller(chain=caller.chain),
        )
