"""The ``sequence`` batching policy: Triton's sequence batcher for stateful models.

Requests with the same correlation id (``sequence_id``) go to the same slot in order; the control
inputs the config declares (START, READY, END, CORRID) are filled in before ``execute``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pagedserve import datatypes
from pagedserve.backend import Model, ModelSpec, enum_name, instance_count
from pagedserve.batching import BatchingPolicy
from pagedserve.errors import InferenceError
from pagedserve.hookspecs import hookimpl
from pagedserve.inference import InferenceRequest
from pagedserve.statistics import ModelStats
from pagedserve_plugins.batching import NS_PER_US, Take, WorkerPolicy

if TYPE_CHECKING:
    from pagedserve.protocol import model_config_pb2

log = logging.getLogger(__name__)

# Triton releases a sequence slot after one idle second when the config leaves the field at 0.
_DEFAULT_SEQUENCE_IDLE_US = 1_000_000


@dataclass(frozen=True)
class _Control:
    """One control tensor of ``sequence_batching.control_input``."""

    input_name: str
    kind: str  # CONTROL_SEQUENCE_START / READY / END / CORRID
    dtype: np.dtype
    values: tuple[object, object] = (0, 1)
    """(false, true) values for START/READY/END."""


def _false_true(control: model_config_pb2.ModelSequenceBatching.Control) -> tuple[np.dtype, list[object]]:
    """The dtype and (false, true) values of a START/READY/END control, whichever list is set."""
    if control.fp32_false_true:
        return np.dtype(np.float32), list(control.fp32_false_true)
    if control.bool_false_true:
        return np.dtype(np.bool_), list(control.bool_false_true)
    return np.dtype(np.int32), list(control.int32_false_true)


@dataclass
class _Sequence:
    correlation_id: int | str
    pending: deque[InferenceRequest] = field(default_factory=deque)
    instance: int | None = None
    running: bool = False
    last_active_ns: int = 0


class SequencePolicy(WorkerPolicy):
    """Triton's sequence batcher: all requests of a correlation ID run in order on one instance, with
    the configured control tensors filled in; batches mix requests of different sequences."""

    name: ClassVar[str] = "sequence"

    def __init__(self, model: Model, spec: ModelSpec, stats: ModelStats) -> None:
        super().__init__(model, spec, stats)
        config = spec.config.sequence_batching
        self._controls = [control for ci in config.control_input for control in self._parse_control(ci)]
        idle_us = config.max_sequence_idle_microseconds or _DEFAULT_SEQUENCE_IDLE_US
        self._idle_ns = idle_us * NS_PER_US
        self._batch_limit = max(spec.config.max_batch_size, 1)
        instances = instance_count(spec)
        # Concurrent sequences per instance: one per batch slot, or the oldest strategy's candidates.
        candidates = config.oldest.max_candidate_sequences if config.HasField("oldest") else 0
        self._capacity = -(-candidates // instances) if candidates > 0 else self._batch_limit
        self._load = [0] * instances
        self._sequences: dict[int | str, _Sequence] = {}
        self._backlog: deque[_Sequence] = deque()
        self._open: set[int | str] = set()
        self._start()

    @staticmethod
    def _parse_control(control_input: model_config_pb2.ModelSequenceBatching.ControlInput) -> list[_Control]:
        parsed = []
        name = control_input.name
        for control in control_input.control:
            kind = enum_name(control, "kind")
            if kind == "CONTROL_SEQUENCE_CORRID":
                type_name = enum_name(control, "data_type")
                if type_name not in ("TYPE_UINT64", "TYPE_INT64", "TYPE_UINT32", "TYPE_INT32", "TYPE_STRING"):
                    raise ValueError(
                        f"control input '{name}': CORRID data_type must be an integer type or "
                        f"TYPE_STRING, got {type_name}"
                    )
                parsed.append(_Control(name, kind, datatypes.numpy_dtype(datatypes.from_config(type_name))))
                continue
            dtype, values = _false_true(control)
            if len(values) != 2:
                raise ValueError(
                    f"control input '{name}' ({kind}) needs exactly two false/true values "
                    "(int32_false_true, fp32_false_true or bool_false_true)"
                )
            parsed.append(_Control(name, kind, dtype, (values[0], values[1])))
        return parsed

    # -- submit side ------------------------------------------------------------------------------

    def _enqueue(self, request: InferenceRequest, now_ns: int) -> None:
        cid = request.sequence_id
        if cid == 0 or cid == "":
            raise InferenceError(
                f"inference request to model '{self.spec.name}' must specify a non-zero or non-empty "
                "correlation ID"
            )
        if request.batch_size > 1:
            # A sequence's state lives in one batch slot, so one request is one step of one sequence.
            raise InferenceError(
                f"inference request to model '{self.spec.name}' must specify batch-size 1 due to "
                "requirements of sequence batcher"
            )
        self._check_corrid_type(cid)
        if not request.sequence_start and cid not in self._open:
            raise InferenceError(
                f"inference request for sequence {cid} to model '{self.spec.name}' must specify the START "
                "flag on the first request of the sequence"
            )
        if request.sequence_start and cid in self._open:
            log.warning("%s: sequence %s restarted before its END request", self.spec.name, cid)
        if request.sequence_start:
            self._open.add(cid)
        if request.sequence_end:
            self._open.discard(cid)
        sequence = self._sequences.get(cid)
        if sequence is None:
            sequence = self._sequences[cid] = _Sequence(cid)
            self._assign(sequence)
        sequence.pending.append(request)
        sequence.last_active_ns = now_ns

    def _check_corrid_type(self, cid: int | str) -> None:
        for control in self._controls:
            if (
                control.kind == "CONTROL_SEQUENCE_CORRID"
                and control.dtype != np.object_
                and isinstance(cid, str)
            ):
                raise InferenceError(
                    f"inference request to model '{self.spec.name}' must specify an integer correlation ID "
                    f"(control input '{control.input_name}' is numeric), got '{cid}'"
                )

    def _assign(self, sequence: _Sequence) -> None:
        free = [i for i, load in enumerate(self._load) if load < self._capacity]
        if not free:
            self._backlog.append(sequence)
            return
        instance = min(free, key=lambda i: self._load[i])
        self._load[instance] += 1
        sequence.instance = instance

    def _release(self, sequence: _Sequence) -> None:
        del self._sequences[sequence.correlation_id]
        assert sequence.instance is not None
        self._load[sequence.instance] -= 1
        while self._backlog and self._load[sequence.instance] < self._capacity:
            waiting = self._backlog.popleft()
            self._load[sequence.instance] += 1
            waiting.instance = sequence.instance

    # -- worker side ------------------------------------------------------------------------------

    def _take(self, instance: int, now_ns: int) -> Take:
        self._release_idle(now_ns)
        ready = [
            s for s in self._sequences.values() if s.instance == instance and s.pending and not s.running
        ]
        ready.sort(key=lambda s: s.pending[0].timing.queued_ns)
        batch: list[InferenceRequest] = []
        total = 0
        for sequence in ready:
            size = sequence.pending[0].batch_size
            if batch and total + size > self._batch_limit:
                break
            sequence.running = True
            batch.append(sequence.pending.popleft())
            total += size
        if batch:
            return Take(batch=batch)
        busy = any(s.pending or s.running for s in self._sequences.values())
        return Take(wake_at_ns=self._next_idle_ns(), done=self._closing and not busy)

    def _idle(self, sequence: _Sequence) -> bool:
        return sequence.instance is not None and not sequence.pending and not sequence.running

    def _release_idle(self, now_ns: int) -> None:
        for sequence in list(self._sequences.values()):
            if self._idle(sequence) and now_ns - sequence.last_active_ns >= self._idle_ns:
                log.info("%s: releasing idle sequence %s", self.spec.name, sequence.correlation_id)
                self._open.discard(sequence.correlation_id)
                self._release(sequence)

    def _next_idle_ns(self) -> int | None:
        times = [s.last_active_ns + self._idle_ns for s in self._sequences.values() if self._idle(s)]
        return min(times, default=None)

    def _finished(self, instance: int, batch: list[InferenceRequest]) -> None:
        now = time.monotonic_ns()
        for request in batch:
            sequence = self._sequences.get(request.sequence_id)
            if sequence is None:
                continue
            sequence.running = False
            sequence.last_active_ns = now
            if request.sequence_end and not sequence.pending:
                self._release(sequence)

    def _prepare(self, batch: list[InferenceRequest]) -> None:
        for request in batch:
            request.inputs.update(self.control_tensors(request))

    def control_tensors(self, request: InferenceRequest) -> dict[str, np.ndarray]:
        """The configured control inputs for one request, shaped ``[batch, 1]`` (``[1]`` without
        batching). READY is always true: only real requests are sent to the model, never padding."""
        shape = (request.batch_size, 1) if self.spec.config.max_batch_size > 0 else (1,)
        tensors = {}
        for control in self._controls:
            if control.kind == "CONTROL_SEQUENCE_CORRID":
                cid = request.sequence_id
                value: object = str(cid).encode() if control.dtype == np.object_ else int(cid)
            else:
                flag = {
                    "CONTROL_SEQUENCE_START": request.sequence_start,
                    "CONTROL_SEQUENCE_END": request.sequence_end,
                    "CONTROL_SEQUENCE_READY": True,
                }[control.kind]
                value = control.values[int(flag)]
            array = np.empty(shape, dtype=control.dtype)
            array.fill(value)  # type: ignore[arg-type]
            tensors[control.input_name] = array
        return tensors


@hookimpl
def pagedserve_batching_policies() -> list[type[BatchingPolicy]]:
    return [SequencePolicy]
