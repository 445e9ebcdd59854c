"""The engine as a driver sees it: add, abort and step never raise for one request's sake.

:class:`EngineCore` wraps an :class:`LLMEngine` for a loop that owns it (a thread, see
:mod:`pagedserve.engine.engine_loop`, or a child process, see :mod:`pagedserve.engine.engine_process`).
Every event, a rejected request included, comes back as a :class:`RequestOutput`, so the loop only
has to route outputs to whoever waits for them. A failed step fails the requests it was serving and
the engine goes on with the next ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pagedserve.engine.block_manager import BlockUsage
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.outputs import CompletionOutput, RequestOutput
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

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def add(self, request: EngineRequest) -> RequestOutput | None:
        """Queue ``request``; a rejected one comes back at once as a finished output with an error."""
        try:
            self.engine.check(request)
            self.engine.add(request)
        except ValueError as exc:
            return failed_output(request, str(exc))
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
        except Exception as exc:  # a failed step must not leave callers waiting forever
            log.exception("engine step failed; failing all running requests")
            outputs = self.abort_all()
            for output in outputs:
                output.error = f"engine step failed: {exc!r}"
        for output in outputs:
            if output.finished:
                self._live.discard(output.request_id)
        self.stats = self._stats()
        return outputs

    def _stats(self) -> EngineStats:
        scheduler = self.engine.scheduler
        usage = self.engine.block_usage()
        return EngineStats(len(scheduler.running), len(scheduler.waiting), usage, scheduler.num_preemptions)


def failed_output(request: EngineRequest, message: str) -> RequestOutput:
    outputs = [CompletionOutput(index=i, finish_reason="abort") for i in range(request.params.n)]
    return RequestOutput(request.request_id, request.prompt_token_ids, outputs, finished=True, error=message)
