"""The one exception type that crosses layers, carrying a gRPC status code and Triton's message text."""

from __future__ import annotations

import grpc


class InferenceError(Exception):
    """A failure the client should see, with the status code Triton would use."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    @classmethod
    def not_found(cls, message: str) -> InferenceError:
        return cls(message, grpc.StatusCode.NOT_FOUND)

    @classmethod
    def unavailable(cls, message: str) -> InferenceError:
        return cls(message, grpc.StatusCode.UNAVAILABLE)

    @classmethod
    def internal(cls, message: str) -> InferenceError:
        return cls(message, grpc.StatusCode.INTERNAL)

    @classmethod
    def cancelled(cls, message: str) -> InferenceError:
        return cls(message, grpc.StatusCode.CANCELLED)

    @classmethod
    def unimplemented(cls, message: str) -> InferenceError:
        return cls(message, grpc.StatusCode.UNIMPLEMENTED)

    @property
    def failure_reason(self) -> str:
        """How Triton's failure metric files this error: the scheduler refused it (REJECTED), the
        client went away (CANCELED), the model failed (BACKEND), or anything else (OTHER)."""
        return _FAILURE_REASONS.get(self.code, "OTHER")

    def __str__(self) -> str:
        return self.message


_FAILURE_REASONS = {
    grpc.StatusCode.UNAVAILABLE: "REJECTED",
    grpc.StatusCode.CANCELLED: "CANCELED",
    grpc.StatusCode.INTERNAL: "BACKEND",
    grpc.StatusCode.UNKNOWN: "BACKEND",
}
