"""A Responder for unit tests: records what a model or policy sends, in order."""

from __future__ import annotations

import threading

from pagedserve.errors import InferenceError
from pagedserve.inference import InferenceResponse, Responder

WAIT = 10.0


class Recorder(Responder):
    def __init__(self) -> None:
        self.sent: list[tuple[InferenceResponse | None, bool]] = []
        self.done = threading.Event()
        self.is_cancelled = False

    @property
    def cancelled(self) -> bool:
        return self.is_cancelled

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    def send(self, response: InferenceResponse | None, final: bool) -> None:
        if self.done.is_set():
            raise RuntimeError("response after final")
        self.sent.append((response, final))
        if final:
            self.done.set()

    def final(self) -> InferenceResponse:
        assert self.done.wait(WAIT), "no final response"
        response = self.sent[-1][0]
        assert response is not None
        return response

    def error(self) -> InferenceError:
        error = self.final().error
        assert error is not None, "expected an error response"
        return error
