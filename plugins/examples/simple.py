"""``simple``, ``simple_int8`` and ``simple_string``: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""

from __future__ import annotations

import numpy as np
from pagedserve.errors import InferenceError
from pagedserve.inference import InferenceRequest, InferenceResponse


class AddSubModel:
    """Element-wise sum and difference in the inputs' own integer type (int8 wraps around, as the
    original models' arithmetic does)."""

    def execute(self, requests: list[InferenceRequest]) -> list[InferenceResponse]:
        # Inputs are arrays (never numpy scalars) of one declared type, so a ufunc's result has that
        # type too and wraps without a warning: no cast and no np.errstate (it cost a fifth of this
        # model's execute).
        responses = []
        for request in requests:
            a, b = request.inputs["INPUT0"], request.inputs["INPUT1"]
            responses.append(InferenceResponse(outputs={"OUTPUT0": a + b, "OUTPUT1": a - b}))
        return responses


class StringAddSubModel:
    """Like :class:`AddSubModel`, but every element is a decimal integer written as a string."""

    def execute(self, requests: list[InferenceRequest]) -> list[InferenceResponse]:
        return [self._one(request) for request in requests]

    def _one(self, request: InferenceRequest) -> InferenceResponse:
        try:
            a = _integers(request.inputs["INPUT0"], "INPUT0")
            b = _integers(request.inputs["INPUT1"], "INPUT1")
        except InferenceError as error:
            return InferenceResponse(error=error)
        return InferenceResponse(outputs={"OUTPUT0": _strings(a + b), "OUTPUT1": _strings(a - b)})


def _integers(array: np.ndarray, name: str) -> np.ndarray:
    try:
        return np.vectorize(lambda item: int(item), otypes=[np.int64])(array)
    except (ValueError, OverflowError) as error:  # not a number, or beyond int64
        raise InferenceError(
            f"input '{name}' must hold decimal integer strings within int64: {error}"
        ) from None


def _strings(array: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda value: str(value).encode(), otypes=[np.object_])(array)
