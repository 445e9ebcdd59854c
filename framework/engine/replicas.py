"""Data-parallel replicas: one router in front of several independent engine processes.

Each replica is a whole engine (:class:`EngineProcess`: its own process, device, KV cache and
scheduler); replicas share nothing. :class:`ReplicaSet` offers the engine loop's interface
(``make_request``, ``submit``, ``abort``, ``stats``...), so the LLM backend's model cannot tell one
engine from several. A :class:`RoutingPolicy` picks each request's replica among those that take
work now; the set remembers the choice until the request's final output, so an abort reaches the
right engine and each replica's outstanding count is exact (not sampled from stale statistics).

A replica whose process dies fails its own requests in flight (UNAVAILABLE, as a lone engine does)
and restarts; meanwhile new requests go to the others, and it rejoins when its new process is ready.
One that stays down (it died too often) leaves the model serving on the rest: the model fails
(:meth:`failure`) only once every replica is down.

What this module does not know: where replicas run (the caller builds each engine's configuration)
and how metrics are exported.
"""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pagedserve.engine.block_manager import BlockUsage
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.engine_core import EngineStats, failed_output
from pagedserve.engine.engine_loop import OutputCallback, call
from pagedserve.engine.engine_process import EngineProcess
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.registries import EngineRegistries
from pagedserve.engine.request import EngineRequest
from pagedserve.engine.routing import ReplicaLoad, RoutingPolicy
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.models.tokenizer import Tokenizer
from pagedserve.replica_metrics import ReplicaState

log = logging.getLogger(__name__)


@dataclass
class _Replica:
    engine: EngineProcess
    outstanding: int = 0  # sequences sent and not finished
    routed: int = 0  # requests sent since start

    @property
    def serving(self) -> bool:
        return self.engine.failure() is None and not self.engine.restarting


class ReplicaSet:
    def __init__(self, engines: list[EngineProcess], policy: RoutingPolicy) -> None:
        if not engines:
            raise ValueError("a replica set needs at least one engine")
        self._replicas = [_Replica(engine) for engine in engines]
        self._policy = policy
        self._owner: dict[str, int] = {}  # request id -> replica index, until its final output
        self._lock = threading.Lock()

    @classmethod
    def spawn(
        cls, configs: list[EngineConfig], registries: EngineRegistries | None, policy: RoutingPolicy
    ) -> ReplicaSet:
        """Start one engine process per configuration, all at once (each waits for its own model
        load); if any cannot start, the others are stopped and its error names the replica."""
        with ThreadPoolExecutor(len(configs), thread_name_prefix="pagedserve-replica-start") as pool:
            futures = [pool.submit(EngineProcess, config, registries) for config in configs]
        engines, errors = [], []
        for index, future in enumerate(futures):
            try:
                engines.append(future.result())
            except Exception as error:  # noqa: BLE001 - reported below, after the cleanup
                errors.append(f"replica {index} ({configs[index].device}): {error}")
        if errors:
            for engine in engines:
                engine.stop(5)
            raise RuntimeError("; ".join(errors))
        return cls(engines, policy)

    @property
    def num_replicas(self) -> int:
        return len(self._replicas)

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._replicas[0].engine.tokenizer

    @property
    def restarts(self) -> int:
        return sum(replica.engine.restarts for replica in self._replicas)

    def failure(self) -> str | None:
        """Why the model can no longer serve: only once every replica has given up."""
        reasons = [replica.engine.failure() for replica in self._replicas]
        if not all(reasons):
            return None
        return "every replica is down: " + "; ".join(f"replica {i}: {r}" for i, r in enumerate(reasons))

    def start(self) -> None:
        for replica in self._replicas:
            replica.engine.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop every engine; their requests still running end with ``finish_reason="abort"``."""
        with ThreadPoolExecutor(len(self._replicas), thread_name_prefix="pagedserve-replica-stop") as pool:
            for replica in self._replicas:
                pool.submit(replica.engine.stop, timeout)

    # ---- requests ------------------------------------------------------------------------------------

    def make_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
    ) -> EngineRequest:
        """Tokenize and validate against a serving replica's limits (every replica runs the same model
        under the same configuration)."""
        replica = next((r for r in self._replicas if r.serving), self._replicas[0])
        return replica.engine.make_request(request_id, prompt, params, priority)

    def submit(self, request: EngineRequest, callback: OutputCallback) -> None:
        request_id, num_seqs = request.request_id, request.params.num_seqs
        with self._lock:
            if request_id in self._owner:
                duplicate = True
            else:
                duplicate = False
                index = self._choose(request.prompt_token_ids)
                replica = self._replicas[index]
                replica.outstanding += num_seqs
                replica.routed += 1
                self._owner[request_id] = index
        if duplicate:
            message = f"request id {request_id!r} is already in use"
            call(callback, failed_output(request, message, "INVALID_ARGUMENT"))
            return
        replica.engine.submit(request, functools.partial(self._on_output, index, num_seqs, callback))

    def abort(self, request_id: str) -> None:
        with self._lock:
            index = self._owner.get(request_id)
        if index is not None:
            self._replicas[index].engine.abort(request_id)

    def _on_output(self, index: int, num_seqs: int, callback: OutputCallback, output: RequestOutput) -> None:
        if output.finished:
            with self._lock:
                if self._owner.pop(output.request_id, None) is not None:
                    self._replicas[index].outstanding -= num_seqs
        callback(output)

    def _choose(self, prompt_token_ids: list[int]) -> int:
        """The policy picks among serving replicas. With none serving, the least loaded restarting one
        takes the request (it waits for the new process, as with a lone engine); with all given up,
        replica 0 answers it with its reason."""
        serving = [self._load(i) for i, r in enumerate(self._replicas) if r.serving]
        if serving:
            return self._policy.choose(prompt_token_ids, serving)
        waiting = [self._load(i) for i, r in enumerate(self._replicas) if r.engine.failure() is None]
        return min(waiting, key=lambda load: load.outstanding).index if waiting else 0

    def _load(self, index: int) -> ReplicaLoad:
        return ReplicaLoad(index, self._replicas[index].outstanding)

    # ---- statistics ------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """The sum over replicas (KV-cache usage: used blocks over all replicas' blocks)."""
        parts = [replica.engine.stats() for replica in self._replicas]
        usages = [part.usage for part in parts]
        usage = BlockUsage(
            *(sum(getattr(u, name) for u in usages) for name in BlockUsage.__dataclass_fields__)
        )
        return EngineStats(
            num_running=sum(part.num_running for part in parts),
            num_waiting=sum(part.num_waiting for part in parts),
            usage=usage,
            num_preemptions=sum(part.num_preemptions for part in parts),
        )

    def replica_states(self) -> list[ReplicaState]:
        states = []
        with self._lock:
            loads = [(replica.routed, replica.outstanding) for replica in self._replicas]
        for index, (replica, (routed, outstanding)) in enumerate(zip(self._replicas, loads, strict=True)):
            stats = replica.engine.stats()
            states.append(
                ReplicaState(
                    index=index,
                    up=replica.serving,
                    routed=routed,
                    outstanding=outstanding,
                    num_running=stats.num_running,
                    num_waiting=stats.num_waiting,
                    kv_cache_usage=stats.usage.usage,
                    restarts=replica.engine.restarts,
                )
            )
        return states
