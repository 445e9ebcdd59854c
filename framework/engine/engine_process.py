"""Runs an :class:`LLMEngine` in a child process, behind :class:`EngineLoop`'s interface.

Why a process: the engine's step loop is host work between device launches. On a thread of the
server it waits for the GIL behind the event loop and the response encoding (a thread that gives
the GIL up in every torch call waits again each time it wants it back), which cost the GPU serving
benchmark half its throughput. vLLM's engine core runs in its own process for the same reason.

The parent tokenizes (:meth:`make_request`), sends requests down one pipe and receives, once per
step, the outputs of that step as deltas (new token ids, new text, new logprobs) on another. A
receiver thread rebuilds full :class:`RequestOutput` values and calls each request's callback on
it, so callers cannot tell this class from :class:`EngineLoop`: :meth:`make_request` checks requests
against the engine's limits (sent by the child when it is ready), so one the engine could never serve
is refused before anything is built for it; only a duplicate id fails through its callback.

The child exits when told to stop or when its parent goes away (the command pipe closes). If it dies
on its own, every request in flight fails (UNAVAILABLE, naming the exit code) and a new child starts;
requests submitted meanwhile wait for it.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.engine_core import EngineCore, EngineStats, failed_output
from pagedserve.engine.engine_loop import OutputCallback, call
from pagedserve.engine.outputs import RequestOutput, new_completions
from pagedserve.engine.process_setup import engine_process_main
from pagedserve.engine.registries import EngineRegistries
from pagedserve.engine.request import EngineRequest, build_request
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.scheduler import RequestLimits
from pagedserve.heap import FrozenHeap
from pagedserve.log_settings import child_logging
from pagedserve.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# One completion's news in a step: index, new token ids, text delta, cumulative logprob,
# new logprobs (None when not asked for), finish reason.
_CompletionDelta = tuple[int, list[int], str, float, "list[dict[int, float]] | None", "str | None"]
# request id, finished, error (message and status name), completions, prompt log-probabilities
# (once, when computed)
_PromptLogprobsDelta = list[dict[int, float] | None] | None
_Delta = tuple[str, bool, "tuple[str, str] | None", list[_CompletionDelta], _PromptLogprobsDelta]


# More deaths than this within the window and the engine stays down (the model shows UNAVAILABLE).
_MAX_RESTARTS_IN_WINDOW = 3
_RESTART_WINDOW_S = 60.0


class EngineStartError(RuntimeError):
    """The child could not build its engine; the message is the child's error."""


@dataclass(frozen=True)
class _Ready:
    directory: str | None
    stats: EngineStats
    limits: RequestLimits


# ---------------------------------------------------------------------------------------------- parent


@dataclass
class _Pending:
    callback: OutputCallback
    output: RequestOutput  # everything received so far


@dataclass
class _Child:
    process: BaseProcess
    commands: Connection  # parent -> child
    outputs: Connection  # child -> parent


class EngineProcess:
    def __init__(self, config: EngineConfig, registries: EngineRegistries | None = None) -> None:
        """Start the child and wait until its engine is built (raises :class:`EngineStartError`)."""
        self._config, self._registries = config, registries
        self._child, ready = self._spawn()
        self.tokenizer = Tokenizer.from_dir(Path(ready.directory)) if ready.directory else None
        self._stats = ready.stats
        self._limits = ready.limits
        self.restarts = 0
        self._failure: str | None = None  # set when the engine is gone for good (not by stop())
        self._deaths: list[float] = []  # when children died, within the restart window
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()  # guards _pending, _closed and _backlog
        # Sends get their own lock: a send that blocks on a full pipe must never keep the receiver
        # from draining the child's outputs (the child reads commands only between steps).
        self._send_lock = threading.Lock()
        self._closed: str | None = None  # why requests can no longer be served
        self._backlog: list[tuple[str, object]] | None = None  # commands held while a child restarts
        self._receiver = threading.Thread(target=self._receive, name="pagedserve-engine-outputs", daemon=True)

    def _spawn(self) -> tuple[_Child, _Ready]:
        context = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA state
        child_commands, commands = context.Pipe(duplex=False)
        outputs, child_outputs = context.Pipe(duplex=False)
        # The child starts in process_setup, which sets OpenMP's environment before torch loads.
        process = context.Process(
            target=engine_process_main,
            args=(
                self._config,
                pickle.dumps(self._registries),
                child_commands,
                child_outputs,
                child_logging(),
            ),
            name="pagedserve-engine",
            daemon=True,  # ended with the server, never left holding the GPU
        )
        process.start()
        child_commands.close()  # the child's ends: closing ours lets either side see the other go
        child_outputs.close()
        child = _Child(process, commands, outputs)
        ready = _wait_ready(child)
        log.info("LLM engine process %d is ready", process.pid)
        return child, ready

    @property
    def pid(self) -> int | None:
        return self._child.process.pid

    def stats(self) -> EngineStats:
        """As of the child's last step."""
        return self._stats

    def failure(self) -> str | None:
        """Why no request can be served any more, once a dead child could not be restarted."""
        return self._failure

    @property
    def restarting(self) -> bool:
        """A child died and its successor is not ready yet: what is submitted now waits for it (a
        replica set sends new requests elsewhere meanwhile)."""
        with self._lock:
            return self._backlog is not None

    def start(self) -> None:
        if self._receiver.ident is None:
            self._receiver.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the child; requests still running end with ``finish_reason="abort"``."""
        with self._lock:
            running, self._closed = self._closed is None, self._closed or "the engine is stopped"
        if running:
            self._send("stop", None)
        if self._receiver.ident is not None:
            self._receiver.join(timeout)
        process = self._child.process
        process.join(timeout)
        if process.is_alive():
            process.terminate()
            process.join(5)
        self._fail(self._take_pending(), "the engine is stopped")

    def make_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
    ) -> EngineRequest:
        """Tokenize and validate; raises ``ValueError`` for a request the engine could never serve
        (``n`` is checked first: nothing per choice, not even the prompt's tokens, exists before)."""
        params = params or SamplingParams()
        self._limits.check_params(params)
        request = build_request(
            self.tokenizer, request_id, prompt, params, priority, self._limits.max_model_len
        )
        self._limits.check(len(request.prompt_token_ids), params)
        return request

    def submit(self, request: EngineRequest, callback: OutputCallback) -> None:
        with self._lock:
            rejection, code = self._closed, "UNAVAILABLE"
            if rejection is None and request.request_id in self._pending:
                rejection, code = f"request id {request.request_id!r} is already in use", "INVALID_ARGUMENT"
            if rejection is None:
                self._pending[request.request_id] = _Pending(callback, _empty_output(request))
        if rejection is None and not self._send("add", request):
            with self._lock:
                mine = self._pending.pop(request.request_id, None) is not None
            if not mine:
                return  # the receiver saw the child die first and has failed it already
            rejection = "the engine process is gone"
        if rejection is not None:
            call(callback, failed_output(request, rejection, code))

    def abort(self, request_id: str) -> None:
        with self._lock:
            live = self._closed is None and request_id in self._pending
        if live:
            self._send("abort", request_id)

    def _send(self, kind: str, payload: object) -> bool:
        with self._lock:
            if self._backlog is not None:  # a new child is starting: it gets this when it is ready
                self._backlog.append((kind, payload))
                return True
        with self._send_lock:
            try:
                self._child.commands.send((kind, payload))
            except OSError:
                return False  # the child is gone; the receiver fails what was in flight
        return True

    # ---- receiver thread ---------------------------------------------------------------------------

    def _receive(self) -> None:
        while True:
            self._receive_from(self._child)
            child = self._child
            child.process.join(5)
            with self._lock:
                # At exit multiprocessing ends its daemonic children: that is no reason to restart.
                if self._closed is not None or not threading.main_thread().is_alive():
                    break
                in_flight, self._pending, self._backlog = self._pending, {}, []
            code = child.process.exitcode
            self._fail(in_flight, f"the engine process exited unexpectedly (exit code {code}); retry")
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < _RESTART_WINDOW_S] + [now]
            if len(self._deaths) > _MAX_RESTARTS_IN_WINDOW:
                # A child that dies at every start (or a request that kills each new one) would
                # otherwise reload the model in a loop for ever.
                self._give_up(
                    f"the engine process died {len(self._deaths)} times within {_RESTART_WINDOW_S:.0f} s "
                    f"(last exit code {code}); load the model again"
                )
                break
            log.error("the LLM engine process exited unexpectedly (exit code %s); restarting it", code)
            if not self._restart():
                break
        self._fail(self._take_pending(), self._closed or "the engine is stopped")

    def _receive_from(self, child: _Child) -> None:
        """Deliver the child's outputs until it stops or dies."""
        while True:
            try:
                kind, payload = child.outputs.recv()
            except (EOFError, OSError):
                return
            if kind == "stopped":
                return
            deltas, self._stats = payload
            for delta in deltas:
                self._deliver(delta)

    def _give_up(self, reason: str) -> None:
        """No more restarts: every request from now on fails with ``reason``, and so does the model."""
        log.error("LLM engine: %s", reason)
        with self._lock:
            self._closed = self._failure = reason
            self._backlog = None

    def _restart(self) -> bool:
        """Start a new child and send it what waited meanwhile; False if it could not start."""
        try:
            child, ready = self._spawn()
        except Exception as exc:  # noqa: BLE001 - EngineStartError, or EMFILE/ENOMEM/pickling: never hang
            self._give_up(f"the engine process died and could not restart: {exc}")
            return False
        with self._send_lock, self._lock:
            self._child, self._stats, self._limits = child, ready.stats, ready.limits
            self.restarts += 1
            backlog, self._backlog = self._backlog or [], None
            try:
                for command in backlog:
                    child.commands.send(command)
            except OSError:
                pass  # the new child died too: the next round fails what it was sent
        return True

    def _deliver(self, delta: _Delta) -> None:
        request_id, finished, error, completions, prompt_logprobs = delta
        with self._lock:
            pending = self._pending.pop(request_id, None) if finished else self._pending.get(request_id)
        if pending is None:
            return
        output = pending.output
        for index, token_ids, text_delta, cumulative_logprob, logprobs, finish_reason in completions:
            completion = output.outputs[index]
            completion.token_ids.extend(token_ids)
            completion.text += text_delta
            completion.text_delta = text_delta
            completion.num_new_tokens = len(token_ids)
            completion.cumulative_logprob = cumulative_logprob
            if logprobs is not None and completion.logprobs is not None:
                completion.logprobs.extend(logprobs)
            completion.finish_reason = finish_reason
        snapshot = [c.copy() for c in output.outputs]
        message, code = error or (None, "INVALID_ARGUMENT")
        call(
            pending.callback,
            RequestOutput(
                request_id, output.prompt_token_ids, snapshot, finished, message, code, prompt_logprobs
            ),
        )

    def _take_pending(self) -> dict[str, _Pending]:
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    @staticmethod
    def _fail(pending: dict[str, _Pending], message: str) -> None:
        """End ``pending`` requests with ``message`` (UNAVAILABLE: the engine, not the request, failed)."""
        for request_id, item in pending.items():
            output = item.output
            for completion in output.outputs:
                completion.text_delta, completion.num_new_tokens = "", 0
                completion.finish_reason = completion.finish_reason or "abort"
            final = RequestOutput(
                request_id, output.prompt_token_ids, output.outputs, True, message, "UNAVAILABLE"
            )
            call(item.callback, final)


def _wait_ready(child: _Child) -> _Ready:
    try:
        kind, payload = child.outputs.recv()
    except EOFError:
        child.process.join(5)
        raise EngineStartError(
            f"the engine process exited while starting (exit code {child.process.exitcode})"
        ) from None
    if kind != "ready":
        child.process.join(5)
        raise EngineStartError(payload)
    return payload


def _empty_output(request: EngineRequest) -> RequestOutput:
    completions = new_completions(request.params.n, request.params.logprobs is not None)
    return RequestOutput(request.request_id, request.prompt_token_ids, completions)


# ---------------------------------------------------------------------------------------------- child


def child_main(
    config: EngineConfig, registries: EngineRegistries | None, commands: Connection, outputs: Connection
) -> None:
    """The child's work, once :func:`engine_process_main` has set up its threads and logging."""
    from pagedserve.engine.llm_engine import LLMEngine

    try:
        try:
            engine = LLMEngine(config, registries)
        except Exception as exc:  # noqa: BLE001 - the parent reports it as the load error
            log.exception("the engine could not start")
            outputs.send(("failed", str(exc) or type(exc).__name__))
            return
        core = EngineCore(engine)
        # What loading built lives as long as this process: no full collection walks it again.
        FrozenHeap().freeze()
        directory = str(engine.directory) if engine.directory else None
        outputs.send(("ready", _Ready(directory, core.stats, engine.scheduler.limits)))
    except BrokenPipeError:
        return  # the parent went away while we loaded (a Ctrl-C at start-up): nobody to tell
    sender = _Sender(outputs)
    try:
        _serve(core, commands, sender)
    except EOFError:
        pass  # the parent went away: nobody is left to answer
    finally:
        sender.close()


def _serve(core: EngineCore, commands: Connection, sender: _Sender) -> None:
    while True:
        results: list[RequestOutput] = []
        stopping = _apply_commands(core, commands, results, block=not core.has_work())
        if stopping:
            break
        if core.has_work():
            results += core.step()
        if results:
            sender.put([_encode(o) for o in results], core.stats)
        if core.broken:
            break  # its device failed: the parent starts a new process, with a new CUDA context
    sender.put([_encode(o) for o in core.abort_all()], core.stats)
    sender.put_stopped()


class _Sender:
    """Writes the engine's outputs to the parent on its own thread, so a step never waits for a
    parent that is slow to read: what piles up meanwhile goes out as one message, each request's
    deltas joined. Encoding stays on the step loop: moved here (to merge ``RequestOutput`` values with
    ``outputs.merge_by_request`` instead) it cost the H200 serving benchmark ~20% through GIL contention."""

    def __init__(self, outputs: Connection) -> None:
        self._outputs = outputs
        self._queue: queue.SimpleQueue[tuple[list[_Delta], EngineStats] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pagedserve-engine-sender", daemon=True)
        self._thread.start()

    def put(self, deltas: list[_Delta], stats: EngineStats) -> None:
        self._queue.put((deltas, stats))

    def put_stopped(self) -> None:
        self._queue.put(None)

    def close(self) -> None:
        self._thread.join(30)

    def _run(self) -> None:
        try:
            while True:
                batch = [self._queue.get()]
                while not self._queue.empty():
                    batch.append(self._queue.get())
                items = [item for item in batch if item is not None]
                if items:
                    deltas = _join_deltas([delta for ds, _ in items for delta in ds])
                    self._outputs.send(("outputs", (deltas, items[-1][1])))
                if len(items) < len(batch):
                    self._outputs.send(("stopped", None))
                    return
        except OSError:
            pass  # the parent went away


def _join_deltas(deltas: list[_Delta]) -> list[_Delta]:
    """One delta per request, in order of first appearance, each the concatenation of its parts."""
    joined: dict[str, _Delta] = {}
    for delta in deltas:
        earlier = joined.get(delta[0])
        joined[delta[0]] = delta if earlier is None else _join(earlier, delta)
    return list(joined.values())


def _join(earlier: _Delta, later: _Delta) -> _Delta:
    request_id, finished, error, completions, prompt_logprobs = later
    by_index = {c[0]: c for c in earlier[3]}
    merged = []
    for index, ids, text, cumulative, logprobs, reason in completions:
        before = by_index.pop(index, None)
        if before is not None:
            ids = before[1] + ids
            text = before[2] + text
            if logprobs is not None and before[4] is not None:
                logprobs = before[4] + logprobs
        merged.append((index, ids, text, cumulative, logprobs, reason))
    merged.extend(by_index.values())  # completions only the earlier delta mentioned
    return request_id, finished, error or earlier[2], merged, prompt_logprobs or earlier[4]


def _apply_commands(
    core: EngineCore, commands: Connection, results: list[RequestOutput], block: bool
) -> bool:
    """Apply every queued command (waiting for one when ``block``); True once told to stop."""
    if block:
        commands.poll(None)
    while commands.poll(0):
        kind, payload = commands.recv()  # EOFError when the parent has gone
        if kind == "stop":
            return True
        output: Any = core.add(payload) if kind == "add" else core.abort(payload)
        if output is not None:
            results.append(output)
    return False


def _encode(output: RequestOutput) -> _Delta:
    completions = []
    for c in output.outputs:
        new = c.num_new_tokens
        token_ids = c.token_ids[len(c.token_ids) - new :]
        logprobs = None if c.logprobs is None else c.logprobs[len(c.logprobs) - new :]
        completions.append(
            (c.index, token_ids, c.text_delta, c.cumulative_logprob, logprobs, c.finish_reason)
        )
    error = None if output.error is None else (output.error, output.error_code)
    return output.request_id, output.finished, error, completions, output.prompt_logprobs
