"""``simple_sequence`` and ``simple_dyna_sequence``: stateless stand-ins for Triton's sequence models,
driven only by the control tensors the sequence batcher fills in."""

from __future__ import annotations

import time

import numpy as np
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
