"""``simple_sequence`` and ``simple_dyna_sequence``: stateless stand-ins for Triton's sequence models,
driven only by the control tensors the sequence batcher fills in; ``simple_string_dyna_sequence``:
Triton's ``dyna_sequence`` backend, an accumulator keyed by string correlation IDs."""

from __future__ import annotations

import time

import numpy as np
from pagedserve.errors import InferenceError
from pagedserve.inference import InferenceRequest, InferenceResponse
from pagedserve_plugins.python_backend import PythonModelArgs


class SequenceModel:
    """``OUTPUT = READY * (INPUT + START)``: deliberately not an accumulator (Triton's generator says
    so too), so the first request of a sequence returns INPUT + 1 and later ones return INPUT."""

    def execute(self, requests: list[InferenceRequest]) -> list[InferenceResponse]:
        responses = []
        for request in requests:
            inputs = request.inputs
            output = inputs["READY"] * (inputs["INPUT"] + inputs["START"])
            responses.append(InferenceResponse(outputs={"OUTPUT": output.astype(np.int32)}))
        return responses


class DynaSequenceModel:
    """``OUTPUT = READY * (INPUT + START + END * CORRID)``, after ``execute_delay_ms`` (a config
    parameter) so that concurrent sequences overlap in time."""

    def initialize(self, args: PythonModelArgs) -> None:
        self.delay_s = float(args.parameter("execute_delay_ms", "0") or 0) / 1000

    def execute(self, requests: list[InferenceRequest]) -> list[InferenceResponse]:
        if self.delay_s:
            time.sleep(self.delay_s)
        responses = []
        for request in requests:
            inputs = request.inputs
            corrid = inputs["CORRID"].astype(np.int64)
            output = inputs["READY"] * (inputs["INPUT"] + inputs["START"] + inputs["END"] * corrid)
            responses.append(InferenceResponse(outputs={"OUTPUT": output.astype(np.int32)}))
        return responses


# Sums of sequences that never sent END (the batcher released them when idle) are dropped, oldest
# first, beyond this many: a client cannot grow the table without bound.
_MAX_OPEN_SEQUENCES = 4096


def _int32(value: int) -> int:
    """Wrap to int32, as the C++ backend's arithmetic does."""
    return (value + 2**31) % 2**32 - 2**31


class StringDynaSequenceModel:
    """Triton's ``dyna_sequence`` backend: a running sum per sequence. START sets it to INPUT, later
    requests add INPUT, END adds the correlation ID, which must read as an integer; OUTPUT is the sum
    so far. Requests with READY false are not sequence steps and answer 0."""

    def initialize(self, args: PythonModelArgs) -> None:
        self.totals: dict[bytes, int] = {}

    def execute(self, requests: list[InferenceRequest]) -> list[InferenceResponse]:
        return [self._step(request) for request in requests]

    def _step(self, request: InferenceRequest) -> InferenceResponse:
        names = ("INPUT", "START", "END", "READY", "CORRID")
        # One row per batch element: [value, start, end, ready, corrid].
        rows = zip(*(request.inputs[name].reshape(-1) for name in names), strict=True)
        try:
            totals = [self._add(*row) for row in rows]
        except InferenceError as error:
            return InferenceResponse(error=error)
        shape = request.inputs["INPUT"].shape
        return InferenceResponse(outputs={"OUTPUT": np.array(totals, np.int32).reshape(shape)})

    def _add(self, value: int, start: int, end: int, ready: int, corrid: bytes) -> int:
        if not ready:
            return 0
        try:
            corrid_value = int(corrid)
        except ValueError:
            shown = corrid[:64].decode(errors="replace")
            raise InferenceError(f"correlation ID '{shown}' is not an integer") from None
        total = _int32(int(value) + (0 if start else self.totals.pop(corrid, 0)))
        if end:
            return _int32(total + corrid_value)
        self.totals[corrid] = total  # re-inserted: the dict runs from least to most recently used
        if len(self.totals) > _MAX_OPEN_SEQUENCES:
            del self.totals[next(iter(self.totals))]
        return total
