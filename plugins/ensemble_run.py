"""One ensemble request in flight: tensors flow between steps, each step runs once its inputs are in.

Every consumer (a step, or the ensemble's outputs) has a slot per input with a queue of values. A
value produced (an ensemble input, or an output in a step's response) is queued in the slot of each
consumer mapped to it. A consumer fires when every slot has a value, queued or used before, and at
least one has a new one; it takes the new values and reuses the last ones of the others. So a chain
runs once per request, a join waits for all its branches, and each response of a decoupled step
drives the steps behind it (a stream through a one-shot tensor reuses that tensor). Firing the
outputs sends one ensemble response; the request finishes when no step is running.

Arrays move between steps as they are: nothing is serialized inside the ensemble.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from pagedserve.errors import InferenceError
from pagedserve.in_process import Caller, CallOptions, InProcessClient, InProcessResponder, chain_of
from pagedserve.inference import InferenceRequest, InferenceResponse
from pagedserve_plugins.ensemble_plan import OUTPUT, EnsemblePlan, Step

_ABSENT = object()
"""The value of an optional ensemble input the request left out: consumers fire without it."""
_UNSET = object()


@dataclass
class _Slot:
    queued: deque[object] = field(default_factory=deque)
    last: object = _UNSET

    @property
    def ready(self) -> bool:
        return bool(self.queued) or self.last is not _UNSET

    def take(self) -> object:
        if self.queued:
            self.last = self.queued.popleft()
        return self.last


@dataclass
class _Consumer:
    slots: dict[str, _Slot]

    @property
    def can_fire(self) -> bool:
        slots = self.slots.values()
        return bool(self.slots) and all(s.ready for s in slots) and any(s.queued for s in slots)

    def take(self) -> dict[str, np.ndarray]:
        taken = {name: slot.take() for name, slot in self.slots.items()}
        return {name: value for name, value in taken.items() if value is not _ABSENT}  # type: ignore[misc]


class EnsembleRun:
    def __init__(self, plan: EnsemblePlan, request: InferenceRequest, client: InProcessClient) -> None:
        self.plan = plan
        self.request = request
        self.client = client
        self.steps = [_Consumer({name: _Slot() for name in step.input_map}) for step in plan.steps]
        self.outputs = _Consumer({name: _Slot() for name in request.requested_outputs})
        self.caller = Caller(chain=chain_of(request), parent=request.responder)
        self.options = CallOptions(
            request_id=request.id,
            parameters=request.parameters,
            priority=request.priority,
            timeout_us=request.timeout_us,
            sequence_id=request.sequence_id,
            sequence_start=request.sequence_start,
            sequence_end=request.sequence_end,
        )
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._outbox: deque[tuple[InferenceResponse | None, bool]] = deque()
        self._running = 0
        self._responded = False
        self._done = False
        self._calls: list[InProcessResponder] = []

    def start(self) -> None:
        with self._lock:
            for name in self.plan.inputs:
                self._produce(name, self.request.inputs.get(name, _ABSENT))
            ready = self._advance()
        self._run(ready)

    # -- under the lock ---------------------------------------------------------------------------

    def _produce(self, tensor: str, value: object) -> None:
        for consumer, slot in self.plan.consumers.get(tensor, ()):
            target = self.outputs if consumer == OUTPUT else self.steps[consumer]
            if slot in target.slots:
                target.slots[slot].queued.append(value)

    def _advance(self) -> list[tuple[Step, dict[str, np.ndarray]]]:
        """Steps to start now; responses to send go to the outbox, the final one last."""
        ready = []
        for step, consumer in zip(self.plan.steps, self.steps, strict=True):
            while consumer.can_fire:
                ready.append((step, consumer.take()))
                self._running += 1
        while self.outputs.can_fire:
            self._outbox.append((InferenceResponse(outputs=self.outputs.take()), False))
            self._responded = True
        if self._running == 0 and not self._done:
            self._done = True
            self._outbox.append(self._final())
        return ready

    def _final(self) -> tuple[InferenceResponse | None, bool]:
        if self._outbox and self._outbox[-1][0] is not None:
            return self._outbox.pop()[0], True
        if not self._responded and not self.plan.decoupled:
            missing = [name for name, slot in self.outputs.slots.items() if not slot.ready]
            error = InferenceError.internal(
                f"ensemble '{self.plan.name}' finished without producing output(s) {missing}"
            )
            return InferenceResponse(error=error), True
        return None, True

    def _fail(self, error: InferenceError) -> None:
        self._done = True
        self._outbox.clear()
        self._outbox.append((InferenceResponse(error=error), True))

    # -- outside the lock -------------------------------------------------------------------------

    def _run(self, ready: list[tuple[Step, dict[str, np.ndarray]]]) -> None:
        for step, inputs in ready:
            self._start_step(step, inputs)
        self._send()

    def _start_step(self, step: Step, inputs: dict[str, np.ndarray]) -> None:
        def on_response(response: InferenceResponse | None, final: bool) -> None:
            self._on_response(step, response, final)

        try:
            call = self.client.start(
                step.model_name,
                inputs,
                on_response,
                model_version=step.model_version,
                requested_outputs=list(step.output_map),
                options=self.options,
                caller=self.caller,
            )
        except InferenceError as error:
            self._on_response(step, InferenceResponse(error=error), True)
            return
        with self._lock:
            self._calls.append(call)
            if self._done:
                call.cancel()

    def _on_response(self, step: Step, response: InferenceResponse | None, final: bool) -> None:
        with self._lock:
            if final:
                self._running -= 1
            if self._done:
                return
            if response is not None and response.error is not None:
                self._fail(response.error)
                calls, ready = list(self._calls), []
            else:
                if response is not None:
                    for model_output, tensor in step.output_map.items():
                        if model_output in response.outputs:
                            self._produce(tensor, response.outputs[model_output])
                calls, ready = [], self._advance()
        for call in calls:
            call.cancel()  # the others' results can no longer matter
        self._run(ready)

    def _send(self) -> None:
        """Send what the outbox holds, in order, from one thread at a time."""
        with self._send_lock:
            while True:
                with self._lock:
                    if not self._outbox:
                        return
                    response, final = self._outbox.popleft()
                self.request.responder.send(response, final)
