"""The engine as a driver sees it: add, abort and step never raise for one request's sake.

:class:`EngineCore` wraps an :class:`LLMEngine` for a loop that owns it (a thread, see
:mod:`pagedserve.engine.engine_loop`, or a child process, see :mod:`pagedserve.engine.engine_process`).
Every event, a rejected request included, comes back as a :class:`RequestOutput`, so the loop only
has to route outputs to whoever waits for them.

Requests are validated before they reach a step, but if a step still raises, the engine runs each
request that was in it alone: one whose step raises again is ended with the error (INTERNAL), the
others go on, having only recomputed their KV cache. After a device error nothing can run in this
process any more: every request fails and :attr:`EngineCore.broken` tells the driver (an engine
process then exits, and its parent starts a new one; an engine thread refuses what comes next and
reports the failure, so the model shows UNAVAILABLE until it is loaded again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pagedserve.engine.block_manager import BlockUsage
from pagedserve.engine.grammar_compiles import CompileQueueFull
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.request import EngineRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """What the metrics endpoint reads about a running engine."""

    num_running: int
    num_waiting: int
    usage: BlockUsage
    num_preemptions: int


class EngineCore:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._live: set[str] = set()
        self.stats = self._stats()
        self.broken = False
        self.broken_reason: str | None = None

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def add(self, request: EngineRequest) -> RequestOutput | None:
        """Queue ``request``; a rejected one comes back at once as a finished output with an error."""
        try:
            self.engine.check(request)
            self.engine.add(request)
        except ValueError as exc:
            return failed_output(request, str(exc))
        except CompileQueueFull as exc:  # busy, not wrong: the client may retry
            return failed_output(request, str(exc), "UNAVAILABLE")
        self._live.add(request.request_id)
        self.stats = self._stats()
        return None

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a live request; its final output, or ``None`` if it already finished."""
        if request_id not in self._live:
            return None
        self._live.discard(request_id)
        output = self.engine.abort_request(request_id)
        self.stats = self._stats()
        return output

    def abort_all(self) -> list[RequestOutput]:
        return [output for rid in list(self._live) if (output := self.abort(rid)) is not None]

    def step(self) -> list[RequestOutput]:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - one request's failure must not end the others
            if self.engine.device_failed():
                log.exception("engine step failed and the device with it; failing every request")
                self.broken = True
                self.broken_reason = self._broken_reason(exc)
                return self._fail_all(self.broken_reason, "UNAVAILABLE" if self._rank_lost() else "INTERNAL")
            log.exception("engine step failed; running its requests one at a time to find the cause")
            try:
                outputs = self._isolate_failure()
            except Exception as error:  # noqa: BLE001 - no cause found: callers must not wait forever
                log.exception("the engine cannot recover from the failed step; failing every request")
                self.broken = self.engine.device_failed()
                outputs = self._fail_all(f"engine step failed: {error!r}")
        for output in outputs:
            if output.finished:
                self._live.discard(output.request_id)
        self.stats = self._stats()
        return outputs

    def _rank_lost(self) -> bool:
        workers = getattr(self.engine, "workers", None)
        return workers is not None and workers.broken is not None

    def _broken_reason(self, exc: Exception) -> str:
        if self._rank_lost():
            # Not the device's fault and not the request's: a worker process is gone; the engine
            # process restarts with new ones (UNAVAILABLE, as for any engine restart).
            return f"a tensor-parallel rank failed: {self.engine.workers.broken}"
        return f"the engine's device failed: {exc!r}"

    def _fail_all(self, message: str, code: str = "INTERNAL") -> list[RequestOutput]:
        outputs = self.abort_all()
        for output in outputs:
            output.error, output.error_code = message, code
        self.stats = self._stats()
        return outputs

    def _isolate_failure(self) -> list[RequestOutput]:
        outputs = []
        for request_id in self.engine.requeue_running():
            try:
                outputs += self.engine.step_alone(request_id)
            except Exception as exc:  # noqa: BLE001 - this request is the cause: it alone fails
                if self.engine.device_failed():
                    raise  # sticky: every later probe would fail too, whatever its request
                log.exception("request %s makes the engine step fail; ending it", request_id)
                output = self.abort(request_id)
                if output is not None:
                    output.error = f"the engine failed while serving this request: {exc!r}"
                    output.error_code = "INTERNAL"
                    outputs.append(output)
        return outputs

    def _stats(self) -> EngineStats:
        scheduler = self.engine.scheduler
        usage = self.engine.block_usage()
        num_waiting = len(scheduler.waiting) + len(self.engine.compiles)  # compiling: waiting too
        return EngineStats(len(scheduler.running), num_waiting, usage, scheduler.num_preemptions)


def failed_output(request: EngineRequest, message: str, code: str = "INVALID_ARGUMENT") -> RequestOutput:
    """The final output of a refused request: it produced nothing (not even ``n`` empty completions,
    whatever ``n`` it asked for)."""
    return RequestOutput(request.request_id, request.prompt_token_ids, [], True, message, code)
