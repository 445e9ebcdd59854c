"""``repeat_int32``: a decoupled model that answers one request with one response per input element
(or, configured non-decoupled, a model that answers a one-element request once)."""

from __future__ import annotations

import threading
import time

import numpy as np
from pagedserve.errors import InferenceError
from pagedserve.inference import InferenceRequest, InferenceResponse
from pagedserve_plugins.python_backend import PythonModelArgs


class RepeatModel:
    """For each element ``i`` of IN: wait DELAY[i] ms, then send ``OUT=[IN[i]]``, ``IDX=[i]``. The
    request is released no earlier than WAIT ms after it started, with a flags-only final response.

    Each request runs on its own thread so that responses of requests in one batch interleave, as in
    Triton's repeat backend; ``execute`` returns at once. A non-decoupled config gets one response per
    request from ``execute`` itself, which needs IN to hold exactly one element."""

    def initialize(self, args: PythonModelArgs) -> None:
        self.name = args.model_name
        self.decoupled = args.model_config.model_transaction_policy.decoupled
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def execute(self, requests: list[InferenceRequest]) -> list[InferenceResponse] | None:
        if not self.decoupled:
            return [self._single(request) for request in requests]
        for request in requests:
            thread = threading.Thread(
                target=self._serve, args=(request,), name=f"{self.name}-repeat", daemon=True
            )
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _serve(self, request: InferenceRequest) -> None:
        try:
            self._repeat(request)
        except Exception as error:  # noqa: BLE001 - the request must always finish
            request.responder.send(InferenceResponse(error=InferenceError.internal(str(error))), final=True)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _repeat(self, request: InferenceRequest) -> None:
        started = time.monotonic()
        error = _shape_error(request)
        if error is not None:
            request.responder.send(InferenceResponse(error=error), final=True)
            return
        values, delays = request.inputs["IN"].reshape(-1), request.inputs["DELAY"].reshape(-1)
        for index, (value, delay_ms) in enumerate(zip(values, delays, strict=True)):
            time.sleep(int(delay_ms) / 1000)
            if request.responder.cancelled:
                break
            request.responder.send(InferenceResponse(outputs=_outputs(value, index)), final=False)
        _wait_until_released(request, started)
        request.responder.send(None, final=True)

    def _single(self, request: InferenceRequest) -> InferenceResponse:
        started = time.monotonic()
        error = _shape_error(request)
        if error is None and request.inputs["IN"].size != 1:
            error = InferenceError(
                f"model '{self.name}' is not decoupled, so it sends exactly one response: IN must hold "
                f"one element, got {_dims(request.inputs['IN'])}"
            )
        if error is not None:
            return InferenceResponse(error=error)
        time.sleep(int(request.inputs["DELAY"].reshape(-1)[0]) / 1000)
        _wait_until_released(request, started)
        return InferenceResponse(outputs=_outputs(request.inputs["IN"].reshape(-1)[0], 0))

    def finalize(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()


def _shape_error(request: InferenceRequest) -> InferenceError | None:
    values, delays = request.inputs["IN"], request.inputs["DELAY"]
    if delays.shape == values.shape:
        return None
    return InferenceError(f"expected IN and DELAY shape to match, got {_dims(values)} and {_dims(delays)}")


def _wait_until_released(request: InferenceRequest, started: float) -> None:
    """The request is released no earlier than WAIT ms after it started (unless cancelled)."""
    wait = request.inputs["WAIT"].reshape(-1)
    remaining = (int(wait[0]) if wait.size else 0) / 1000 - (time.monotonic() - started)
    if remaining > 0 and not request.responder.cancelled:
        time.sleep(remaining)


def _outputs(value: object, index: int) -> dict[str, np.ndarray]:
    return {"OUT": np.array([value], dtype=np.int32), "IDX": np.array([index], dtype=np.uint32)}


def _dims(array: np.ndarray) -> str:
    return "[" + ",".join(str(d) for d in array.shape) + "]"
