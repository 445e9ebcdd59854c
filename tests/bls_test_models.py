"""Python models for tests/test_bls.py that call other models in hostile ways (loaded by the server
from the test's repository, ``python_class: tests.bls_test_models:...``)."""

from __future__ import annotations

import asyncio

import numpy as np
import pagedserve_plugins.bls as pb_utils
from pagedserve.inference import InferenceRequest


class RecursiveBls:
    """Calls itself with N - 1 until N is 0: a call that, served, would wait for itself."""

    def initialize(self, args: object) -> None:
        self.name = args.model_name  # type: ignore[attr-defined]

    def execute(self, requests: list[InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses = []
        for request in requests:
            n = int(request.inputs["N"].reshape(-1)[0])
            if n <= 0:
                responses.append(
                    pb_utils.InferenceResponse([pb_utils.Tensor("DEPTH", np.array([0], np.int32))])
                )
                continue
            inner = pb_utils.InferenceRequest(
                model_name=self.name,
                requested_output_names=["DEPTH"],
                inputs=[pb_utils.Tensor("N", np.array([n - 1], np.int32))],
            ).exec()
            if inner.has_error():
                responses.append(pb_utils.InferenceResponse(error=inner.error()))
                continue
            depth = pb_utils.get_output_tensor_by_name(inner, "DEPTH").as_numpy() + 1
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("DEPTH", depth)]))
        return responses


class FanOutBls:
    """COUNT concurrent ``async_exec`` calls to ``simple``; TOTAL sums their OUTPUT0."""

    async def execute(self, requests: list[InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses = []
        for request in requests:
            count = int(request.inputs["COUNT"].reshape(-1)[0])
            row = np.ones((1, 16), np.int32)
            calls = [
                pb_utils.InferenceRequest(
                    model_name="simple",
                    requested_output_names=["OUTPUT0"],
                    inputs=[pb_utils.Tensor("INPUT0", row), pb_utils.Tensor("INPUT1", row)],
                ).async_exec()
                for _ in range(count)
            ]
            answers = await asyncio.gather(*calls)
            errors = [a.error().message() for a in answers if a.has_error()]
            if errors:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[0])))
                continue
            total = sum(
                int(pb_utils.get_output_tensor_by_name(a, "OUTPUT0").as_numpy().sum()) for a in answers
            )
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor("TOTAL", np.array([total], np.int64))])
            )
        return responses


class SlowCallBls:
    """Streams from ``repeat_int32`` (one response per element, DELAY_MS apart) with TIMEOUT_US; COUNT
    is how many responses came before the timeout, or the error is answered."""

    def execute(self, requests: list[InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses = []
        for request in requests:
            delay = int(request.inputs["DELAY_MS"].reshape(-1)[0])
            call = pb_utils.InferenceRequest(
                model_name="repeat_int32",
                requested_output_names=["OUT"],
                inputs=[
                    pb_utils.Tensor("IN", np.arange(3, dtype=np.int32)),
                    pb_utils.Tensor("DELAY", np.full(3, delay, np.uint32)),
                    pb_utils.Tensor("WAIT", np.array([0], np.uint32)),
                ],
                timeout=int(request.inputs["TIMEOUT_US"].reshape(-1)[0]),
            )
            count, error = 0, None
            for piece in call.exec(decoupled=True):
                if piece.has_error():
                    error = piece.error()
                    break
                count += len(piece.output_tensors()) > 0
            if error is not None:
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                responses.append(
                    pb_utils.InferenceResponse([pb_utils.Tensor("COUNT", np.array([count], np.int32))])
                )
        return responses
