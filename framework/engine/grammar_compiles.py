"""Structured-output grammars compile off the step loop; their requests wait here meanwhile.

Compiling a constraint against the model's vocabulary takes tens to hundreds of milliseconds for a
JSON schema at 128k tokens (the first one also reads the tokenizer: ~0.6 s). On the engine's thread
every running request would wait for it, so a client sending many distinct schemas would stall the
others. Compiles run on a small thread pool instead (xgrammar releases the GIL while it compiles:
a Python loop on another thread kept running with gaps of at most ~6 ms, the interpreter's switch
interval, during 170 ms compiles). A sequence enters the scheduler only once its grammar is ready, so
the scheduler, preemption and the running batch never see one without it; a compile that fails ends
its request alone. vLLM compiles on a thread pool too, holding the request back until it is done.

Requests with the same constraint while it compiles share its one compile (a batch of requests with
one schema is the common case: it compiles once, and each request then starts its own matcher). The
number of distinct compiles in flight is bounded: beyond :data:`MAX_QUEUED_COMPILES`, a request with a
new constraint is refused (:class:`CompileQueueFull`, UNAVAILABLE) rather than queued behind the others.
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from pagedserve.engine.sequence import Sequence
from pagedserve.engine.structured_output import GrammarBackend, SequenceGrammar, StructuredOutputsParams

log = logging.getLogger(__name__)

COMPILE_THREADS = 2
MAX_QUEUED_COMPILES = 64  # compiling or waiting for a thread, aborted ones included until they end


class CompileQueueFull(RuntimeError):
    """Too many grammars are compiling: the engine is busy, the request itself is fine."""


@dataclass
class _Compile:
    """One constraint's compile and how many requests wait for it."""

    key: Any  # the constraint's cache key
    future: Future[SequenceGrammar]
    waiters: int = 0


@dataclass
class _Compiling:
    seq: Sequence
    compile: _Compile  # shared by the requests waiting for the same constraint

    @property
    def future(self) -> Future[SequenceGrammar]:
        return self.compile.future


@dataclass
class CompileFailure:
    seq: Sequence
    message: str
    code: str  # INVALID_ARGUMENT: the constraint does not compile; INTERNAL: the compiler failed


class GrammarCompiles:
    """Sequences whose grammar is compiling, by request id, and the pool that compiles them."""

    def __init__(
        self,
        backend: GrammarBackend | None,
        max_queued: int = MAX_QUEUED_COMPILES,
        num_threads: int = COMPILE_THREADS,
    ) -> None:
        self.backend = backend
        self.max_queued = max_queued
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="pagedserve-grammar")
        self._waiting: dict[str, _Compiling] = {}
        # Futures not done yet, those of aborted requests too: a running compile still holds a thread.
        # Added on the engine thread, discarded by a done-callback on a pool thread (set operations are
        # atomic in CPython).
        self._in_flight: set[Future[SequenceGrammar]] = set()
        self._by_key: dict[Any, _Compile] = {}  # the compiles with waiters, on the engine thread only

    def __len__(self) -> int:
        return len(self._waiting)

    def submit(self, seq: Sequence, params: StructuredOutputsParams) -> None:
        """Start compiling ``seq``'s grammar; raises ``ValueError`` without a tokenizer and
        :class:`CompileQueueFull` when :attr:`max_queued` compiles are in flight."""
        if self.backend is None:
            raise ValueError("structured_outputs need a tokenizer, and this model has no tokenizer.json")
        key = params.cache_key
        shared = self._by_key.get(key)
        if shared is None:
            if len(self._in_flight) >= self.max_queued:
                raise CompileQueueFull(
                    f"Exceeds maximum queue size: {len(self._in_flight)} structured-output grammars are "
                    f"compiling for this model (at most {self.max_queued}); retry later"
                )
            future = self._pool.submit(self.backend.grammar_for, params)
            self._in_flight.add(future)
            future.add_done_callback(self._in_flight.discard)
            shared = self._by_key[key] = _Compile(key, future)
        shared.waiters += 1
        self._waiting[seq.request_id] = _Compiling(seq, shared)

    def abort(self, request_id: str) -> bool:
        """Forget ``request_id``'s compile (one not started, and no longer waited for, never runs);
        False if it is not here."""
        entry = self._waiting.pop(request_id, None)
        if entry is None:
            return False
        if self._release(entry) == 0:
            entry.future.cancel()  # a compile already running cannot be stopped: its result is dropped
        return True

    def _release(self, entry: _Compiling) -> int:
        """One waiter fewer on ``entry``'s compile; returns how many are left."""
        shared = entry.compile
        shared.waiters -= 1
        if shared.waiters == 0:
            del self._by_key[shared.key]
        return shared.waiters

    def wait(self, timeout: float) -> None:
        """Block until a compile ends or ``timeout`` seconds pass (for an engine with nothing else to run)."""
        if self._waiting:
            wait({entry.future for entry in self._waiting.values()}, timeout, FIRST_COMPLETED)

    def take_ready(self) -> list[Sequence]:
        """The sequences whose grammar has compiled, with it set."""
        ready = []
        for request_id, entry in list(self._waiting.items()):
            future = entry.future
            if future.done() and future.exception() is None:
                del self._waiting[request_id]
                self._release(entry)
                entry.seq.grammar = future.result().fresh()  # its own matcher: the future may be shared
                ready.append(entry.seq)
        return ready

    def take_failed(self) -> list[CompileFailure]:
        """The sequences whose compile raised, with the status their request ends with."""
        failed = []
        for request_id, entry in list(self._waiting.items()):
            future = entry.future
            if not future.done() or (error := future.exception()) is None:
                continue
            del self._waiting[request_id]
            self._release(entry)
            if isinstance(error, ValueError):
                failed.append(CompileFailure(entry.seq, str(error), "INVALID_ARGUMENT"))
            else:
                log.error("compiling the grammar of request %s failed", request_id, exc_info=error)
                failed.append(
                    CompileFailure(entry.seq, f"the grammar compiler failed: {error!r}", "INTERNAL")
                )
        return failed
