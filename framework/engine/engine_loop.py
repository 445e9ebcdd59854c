"""Runs an :class:`LLMEngine` on its own thread so callers (e.g. an asyncio gRPC server) never block.

Callers build requests on their own thread with :meth:`EngineLoop.make_request` (tokenization and
validation happen there), then :meth:`submit` them with a callback. The engine thread calls the
callback with every :class:`RequestOutput` of that request, the last one having ``finished=True``.
Callbacks run on the engine thread and must be quick (e.g. ``loop.call_soon_threadsafe``).
:meth:`submit` and :meth:`abort` are thread-safe; nothing else touches the engine from outside.
:class:`pagedserve.engine.engine_process.EngineProcess` offers the same interface with the engine in
a child process.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from pagedserve.engine.engine_core import EngineCore, EngineStats, failed_output
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.request import EngineRequest
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_DEVICE_FAILED = "the engine's device failed (a CUDA error is fatal to the process); load the model again"

OutputCallback = Callable[[RequestOutput], None]


class OutputRouter:
    """Request id -> callback, dropped with the request's final output. Callback errors are logged,
    never raised into the loop that delivers."""

    def __init__(self) -> None:
        self._callbacks: dict[str, OutputCallback] = {}

    def register(self, request_id: str, callback: OutputCallback) -> None:
        self._callbacks[request_id] = callback

    def deliver(self, output: RequestOutput) -> None:
        if output.finished:
            callback = self._callbacks.pop(output.request_id, None)
        else:
            callback = self._callbacks.get(output.request_id)
        if callback is not None:
            call(callback, output)


def call(callback: OutputCallback, output: RequestOutput) -> None:
    try:
        callback(output)
    except Exception:
        log.exception("output callback for request %s raised", output.request_id)


class EngineLoop:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._core = EngineCore(engine)
        self._commands: deque[tuple[str, object]] = deque()
        self._wakeup = threading.Condition()
        self._router = OutputRouter()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def stats(self) -> EngineStats:
        """As of the last step (read from any thread)."""
        return self._core.stats

    restarts = 0
    """An engine on a thread is never restarted (:class:`EngineProcess` counts its restarts)."""

    def failure(self) -> str | None:
        # A failed step fails only its culprits; a failed device takes this whole process's CUDA
        # context with it, and a thread cannot be restarted with a new one: load the model again.
        if not self._core.broken:
            return None
        reason = self._core.broken_reason
        return f"{reason}; load the model again" if reason and "tensor-parallel" in reason else _DEVICE_FAILED

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
            if self._core.has_work():
                for output in self._core.step():
                    self._router.deliver(output)
        self._apply_commands()
        for output in self._core.abort_all():
            self._router.deliver(output)

    def _wait_for_work(self) -> bool:
        with self._wakeup:
            while not (self._stopping or self._commands or self._core.has_work()):
                self._wakeup.wait()
            return not self._stopping

    def _apply_commands(self) -> None:
        while True:
            with self._wakeup:
                if not self._commands:
                    return
                kind, payload = self._commands.popleft()
            if kind == "add":
                request, callback = payload  # type: ignore[misc]
                self._add(request, callback)
            else:
                output = self._core.abort(payload)  # type: ignore[arg-type]
                if output is not None:
                    self._router.deliver(output)

    def _add(self, request: EngineRequest, callback: OutputCallback) -> None:
        if self._core.broken:
            call(callback, failed_output(request, _DEVICE_FAILED, "UNAVAILABLE"))
            return
        rejected = self._core.add(request)
        if rejected is not None:
            call(callback, rejected)  # not routed: a duplicate id must not end the live request
        else:
            self._router.register(request.request_id, callback)
