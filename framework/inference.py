"""Typed inference requests and responses: what the server hands to models and gets back.

Nothing here knows about protobuf: the server decodes a ``ModelInferRequest`` into an
:class:`InferenceRequest` (numpy tensors, BYTES as object arrays of ``bytes``) and encodes each
:class:`InferenceResponse` a model sends through the request's :class:`Responder`.
"""

from __future__ import annotations

import abc
import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
from pagedserve.errors import InferenceError

ParameterValue = bool | int | float | str


@dataclass
class InferenceResponse:
    """One response to a request. Decoupled models may send many; others send exactly one."""

    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    parameters: dict[str, ParameterValue] = field(default_factory=dict)
    error: InferenceError | None = None


class Responder(abc.ABC):
    """Where a model sends responses for one request. Thread-safe: models call it from worker threads."""

    @abc.abstractmethod
    def send(self, response: InferenceResponse | None, final: bool) -> None:
        """Send ``response`` (``None`` = flags only); ``final`` closes the request. Sending after final
        is an error."""

    @property
    @abc.abstractmethod
    def cancelled(self) -> bool:
        """True once the client cancelled (stream closed, deadline passed): stop work early."""

    @property
    @abc.abstractmethod
    def finished(self) -> bool:
        """True once the final response went out."""

    @property
    def unwritten(self) -> int:
        """Responses sent but not yet written to the client's stream. A model that streams pieces
        of one answer may fold its next piece into a later response while this is nonzero, so a
        stream that cannot keep up gets fewer, bigger responses instead of a growing backlog."""
        return 0

    def fail(self, error: InferenceError) -> None:
        """Finish with ``error`` unless the request already finished (e.g. a whole batch failed)."""
        if self.finished:
            return
        # RuntimeError: the model's own final response won the race; the client has its answer.
        with contextlib.suppress(RuntimeError):
            self.send(InferenceResponse(error=error), final=True)


@dataclass
class RequestTiming:
    """Monotonic nanosecond timestamps of one request's path, filled as it moves (for statistics)."""

    arrival_ns: int = field(default_factory=time.monotonic_ns)
    compute_input_ns: int = 0
    """Time spent decoding and validating the request's tensors before it was queued."""
    queued_ns: int = 0
    compute_start_ns: int = 0
    compute_end_ns: int = 0


@dataclass
class InferenceRequest:
    """A validated request for one model version."""

    model_name: str
    model_version: int
    inputs: dict[str, np.ndarray]
    requested_outputs: list[str]
    """Outputs to return, in the model's declared order when the client asked for none in particular."""
    responder: Responder
    id: str = ""
    parameters: dict[str, ParameterValue] = field(default_factory=dict)
    """Custom request parameters (reserved keys already removed)."""
    priority: int = 0
    timeout_us: int = 0
    sequence_id: int | str = 0
    sequence_start: bool = False
    sequence_end: bool = False
    batch_size: int = 1
    """Leading dimension of the inputs when the model batches (``max_batch_size > 0``); 1 otherwise."""
    timing: RequestTiming = field(default_factory=RequestTiming)
