"""``repeat_int32``: a decoupled model that answers one request with one response per input element."""

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
    Triton's repeat backend; ``execute`` returns at once."""

    def initialize(self, args: PythonModelArgs) -> None:
        self.name = args.model_name
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def execute(self, requests: list[InferenceRequest]) -> None:
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
        values = request.inputs["IN"].reshape(-1)
        delays = request.inputs["DELAY"]
        wait_ms = int(request.inputs["WAIT"].reshape(-1)[0]) if request.inputs["WAIT"].size else 0
        if delays.shape != request.inputs["IN"].shape:
            error = InferenceError(
                f"expected IN and DELAY shape to match, got {_dims(request.inputs['IN'])} and {_dims(delays)}"
            )
            request.responder.send(InferenceResponse(error=error), final=True)
            return
        for index, (value, delay_ms) in enumerate(zip(values, delays.reshape(-1), strict=True)):
            time.sleep(int(delay_ms) / 1000)
            if request.responder.cancelled:
                break
            outputs = {"OUT": np.array([value], dtype=np.int32), "IDX": np.array([index], dtype=np.uint32)}
            request.responder.send(InferenceResponse(outputs=outputs), final=False)
        remaining = wait_ms / 1000 - (time.monotonic() - started)
        if remaining > 0 and not request.responder.cancelled:
            time.sleep(remaining)
        request.responder.send(None, final=True)

    def finalize(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()


def _dims(array: np.ndarray) -> str:
    return "[" + ",".join(str(d) for d in array.shape) + "]"
