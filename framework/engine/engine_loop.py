"""Runs an :class:`LLMEngine` on its own thread so callers (e.g. an asyncio gRPC server) never block.

Callers build requests on their own thread with :meth:`EngineLoop.make_request` (tokenization and
validation happen there), then :meth:`submit` them with a callback. The engine thread calls the
callback with every :class:`RequestOutput` of that request, the last one having ``finished=True``.
Callbacks run on the engine thread and must be quick (e.g. ``loop.call_soon_threadsafe``).
:meth:`submit` and :meth:`abort` are thread-safe; nothing else touches the engine from outside.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from pagedserve.engine.block_manager import BlockUsage
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.outputs import CompletionOutput, RequestOutput
from pagedserve.engine.request import EngineRequest
from pagedserve.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

OutputCallback = Callable[[RequestOutput], None]


class EngineLoop:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: deque[tuple[str, object]] = deque()
        self._wakeup = threading.Condition()
        self._callbacks: dict[str, OutputCallback] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.last_usage: BlockUsage = engine.block_usage()

    # ---- caller side (any thread) ----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pagedserve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread; requests still running end with ``finish_reason="abort"``."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def make_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
    ) -> EngineRequest:
        return self.engine.make_request(request_id, prompt, params, priority)

    def submit(self, request: EngineRequest, callback: OutputCallback) -> None:
        self._send("add", (request, callback))

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def _send(self, kind: str, payload: object) -> None:
        with self._wakeup:
            if self._stopping:
                raise RuntimeError("the engine loop is stopped")
            self._commands.append((kind, payload))
            self._wakeup.notify()

    # ---- engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while self._wait_for_work():
            self._apply_commands()
            if self.engine.has_unfinished_requests():
                self._step()
        self._apply_commands()
        for request_id in list(self._callbacks):
            self._abort(request_id)

    def _wait_for_work(self) -> bool:
        with self._wakeup:
            while not (self._stopping or self._commands or self.engine.has_unfinished_requests()):
                self._wakeup.wait()
            return not self._stopping

    def _apply_commands(self) -> None:
        while True:
            with self._wakeup:
                if not self._commands:
                    return
                kind, payload = self._commands.popleft()
            if kind == "add":
                self._add(*payload)
            else:
                self._abort(payload)

    def _add(self, request: EngineRequest, callback: OutputCallback) -> None:
        if request.request_id in self._callbacks:
            self._deliver(callback, _failed(request, f"request id {request.request_id!r} is already in use"))
            return
        try:
            self.engine.add(request)
        except ValueError as exc:
            self._deliver(callback, _failed(request, str(exc)))
            return
        self._callbacks[request.request_id] = callback

    def _abort(self, request_id: str) -> None:
        output = self.engine.abort_request(request_id)
        callback = self._callbacks.pop(request_id, None)
        if output is not None and callback is not None:
            self._deliver(callback, output)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a failed step must not leave callers waiting forever
            log.exception("engine step failed; failing all running requests")
            self._fail_all(f"engine step failed: {exc!r}")
            return
        self.last_usage = self.engine.block_usage()
        for output in outputs:
            callback = self._callbacks.get(output.request_id)
            if output.finished:
                self._callbacks.pop(output.request_id, None)
            if callback is not None:
                self._deliver(callback, output)

    def _fail_all(self, message: str) -> None:
        for request_id in list(self._callbacks):
            output = self.engine.abort_request(request_id)
            callback = self._callbacks.pop(request_id)
            if output is not None:
                output.error = message
                self._deliver(callback, output)

    @staticmethod
    def _deliver(callback: OutputCallback, output: RequestOutput) -> None:
        try:
            callback(output)
        except Exception:
            log.exception("output callback for request %s raised", output.request_id)


def _failed(request: EngineRequest, message: str) -> RequestOutput:
    outputs = [CompletionOutput(index=i, finish_reason="abort") for i in range(request.params.n)]
    return RequestOutput(request.request_id, request.prompt_token_ids, outputs, finished=True, error=message)
