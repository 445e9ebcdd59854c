"""Tensor parallelism, rank 0's side: start the workers, then announce every call on the model.

With ``engine.tensor_parallel_size=N`` the engine's process is rank 0: it keeps the scheduler, the
block manager and the sampler, and starts ``N - 1`` workers (:mod:`pagedserve.engine.tp_worker`), one
GPU each on CUDA. All ranks join one ``torch.distributed`` group (NCCL on CUDA, gloo on the CPU;
rendezvous at a TCPStore rank 0 opens on a free localhost port), build the model with their share of
the heads (key/value heads replicated when there are more ranks than them) and read only their slices
of the checkpoint.

The runner stays as it is; it talks to :class:`TensorParallelModel` and :class:`TensorParallelRunner`,
which announce each call to the workers over their sockets before making it on rank 0's shard. The
workers make the same call (:mod:`pagedserve.engine.tp_follower`) and the collectives inside the
layers meet: an all-reduce after each row-parallel layer and the embedding, and a gather of the
vocabulary-parallel logits to rank 0. The step's inputs go by broadcast (:mod:`pagedserve.engine.tp_step`);
sampled tokens never go back, because the next step's inputs carry them.

CUDA graphs are off under tensor parallelism: a replayed graph would skip the announcements the
workers wait for. Any failure during an announced call (a worker gone, a collective that failed or
timed out) breaks the group for good: :attr:`TensorParallelWorkers.broken` makes the engine report
its device as failed, so its driver fails every request and an engine process exits to be restarted
with new workers. A step never waits on a dead rank longer than ``COLLECTIVE_TIMEOUT``.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import socket
import subprocess
import sys
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
from pagedserve.engine.attention import AttentionBackend, current_metadata
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.model_runner import ModelRunner
from pagedserve.engine.sampler import Sampler
from pagedserve.engine.tp_step import pack_step
from pagedserve.engine.tp_worker import WorkerSetup
from pagedserve.log_settings import child_logging
from pagedserve.models.hf_config import ModelArchConfig
from pagedserve.models.parallel import (
    COLLECTIVE_TIMEOUT,
    broadcast_from_first,
    destroy_tensor_parallel,
    init_tensor_parallel,
)
from pagedserve.models.registry import ModelArchitecture

log = logging.getLogger(__name__)

_KEY = "engine.tensor_parallel_size"
_STOP_WAIT_S = 5.0
_DEATH_WAIT_S = 0.5


class TensorParallelError(RuntimeError):
    """The group can no longer run a step: a worker is gone or a collective failed."""


def check_tensor_parallel(arch: ModelArchConfig, size: int, device: torch.device) -> None:
    """Refuse, naming the key, a size the model or the machine cannot be split by."""
    if arch.num_heads % size:
        raise ValueError(f"{_KEY}={size} does not divide the model's {arch.num_heads} attention heads")
    kv = arch.num_kv_heads
    if (size <= kv and kv % size) or (size > kv and size % kv):
        raise ValueError(
            f"{_KEY}={size} must divide the model's {kv} key/value heads, or be a multiple of them "
            f"(each head is then replicated on {_KEY} / {kv} ranks)"
        )
    if device.type == "cuda":
        first, visible = device.index or 0, torch.cuda.device_count()
        if first + size > visible:
            raise ValueError(
                f"{_KEY}={size} needs {size} GPUs from cuda:{first} (one per rank); {visible} are visible"
            )


def rank_device(device: torch.device, rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


@dataclass
class _Worker:
    rank: int
    process: subprocess.Popen
    link: Connection

    def describe(self) -> str:
        code = self.process.poll()
        state = "is running" if code is None else f"exited with code {code}"
        return f"tensor-parallel rank {self.rank} (pid {self.process.pid}) {state}"


class TensorParallelWorkers:
    """Rank 0's handle on ranks 1..N-1."""

    def __init__(self, workers: list[_Worker], store: dist.Store) -> None:
        self._workers = workers
        self._store = store  # the rendezvous lives as long as the group
        self.broken: str | None = None
        # An engine dropped without close() must not leave the group up: the next engine built in this
        # process would shard its layers by it.
        self._finalizer = weakref.finalize(self, _shut_down, workers)

    @classmethod
    def start(
        cls,
        config: EngineConfig,
        architectures: Mapping[str, type[ModelArchitecture]],
        device: torch.device,
    ) -> TensorParallelWorkers:
        """Start the workers and join the group with them as rank 0 (they build their shards then)."""
        world = config.tensor_parallel_size
        store = dist.TCPStore(
            "127.0.0.1", 0, world, is_master=True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False
        )
        workers: list[_Worker] = []
        try:
            for rank in range(1, world):
                setup = WorkerSetup(
                    rank,
                    world,
                    store.port,
                    replace(config, device=str(rank_device(device, rank))),
                    pickle.dumps(dict(architectures)),
                    child_logging(),
                )
                workers.append(_spawn(setup))
            for worker in workers:
                _expect(worker, "joining")  # alive and about to join: not a wait for a dead rank
            if device.type == "cuda":
                torch.cuda.set_device(rank_device(device, 0))
            init_tensor_parallel(0, world, store, device)
        except BaseException:
            _stop(workers)
            raise
        log.info("tensor parallelism: %d ranks (%s), workers %s", world, dist.get_backend(), _pids(workers))
        return cls(workers, store)

    def wait_ready(self) -> None:
        """Wait until every worker has built and loaded its shard; raise a worker's load error."""
        for worker in self._workers:
            _expect(worker, "ready")

    def announce(self, kind: str, payload: object) -> None:
        if self.broken is not None:
            raise TensorParallelError(self.broken)
        for worker in self._workers:
            if worker.process.poll() is not None:
                raise self._break(worker.describe())
            try:
                worker.link.send((kind, payload))
            except OSError:
                raise self._break(worker.describe()) from None

    @contextlib.contextmanager
    def collective(self, kind: str, payload: object) -> Iterator[None]:
        """Announce a call, then make it; any failure breaks the group (the ranks may have parted
        ways inside the call, and no later collective could be trusted to meet)."""
        self.announce(kind, payload)
        try:
            yield
        except Exception as exc:
            gone = [w.describe() for w in self._workers if _has_exited(w.process, _DEATH_WAIT_S)]
            raise self._break("; ".join(gone) or f"a tensor-parallel {kind} failed: {exc!r}") from exc

    def close(self) -> None:
        self.broken = self.broken or "the engine is stopped"
        self._finalizer()

    def _break(self, reason: str) -> TensorParallelError:
        log.error("tensor parallelism broken: %s", reason)
        self.broken = reason
        return TensorParallelError(reason)


class TensorParallelModel(ModelArchitecture):
    """The model as rank 0 sees it: rank 0's shard, each call announced to the workers first."""

    name = "tensor-parallel"

    def __init__(self, shard: ModelArchitecture, workers: TensorParallelWorkers) -> None:
        super().__init__(shard.config)
        self.shard = shard
        self.workers = workers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        header, flat = pack_step(input_ids, positions, current_metadata())
        with self.workers.collective("forward", header):
            broadcast_from_first(flat)
            return self.shard(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.contiguous()
        with self.workers.collective("logits", (tuple(hidden.shape), hidden.dtype)):
            broadcast_from_first(hidden)
            return self.shard.compute_logits(hidden)


class TensorParallelRunner(ModelRunner):
    """A :class:`ModelRunner` whose workers allocate the same KV cache and copy the same blocks."""

    def __init__(
        self, model: TensorParallelModel, backend: AttentionBackend, sampler: Sampler, **sizes: Any
    ) -> None:
        if sizes.pop("cuda_graphs", False) and sizes["device"].type == "cuda":
            log.info("CUDA graphs off: under tensor parallelism the workers follow each eager step")
        self.workers = model.workers
        spec = {key: value for key, value in sizes.items() if key != "device"}
        self.workers.announce("runner", (type(backend), spec))
        super().__init__(model, backend, sampler, cuda_graphs=False, **sizes)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            with self.workers.collective("copy", pairs):
                super().copy_blocks(pairs)


def _spawn(setup: WorkerSetup) -> _Worker:
    ours, theirs = socket.socketpair()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.engine.tp_worker", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
        )
    finally:
        theirs.close()  # the worker's end: closing ours lets either side see the other go
    worker = _Worker(setup.rank, process, Connection(ours.detach()))
    worker.link.send(setup)
    return worker


def _expect(worker: _Worker, kind: str) -> None:
    try:
        got, payload = worker.link.recv()
    except (EOFError, OSError):
        worker.process.wait(_STOP_WAIT_S)
        raise TensorParallelError(f"{worker.describe()} while starting") from None
    if got == "failed":
        raise ValueError(payload)
    if got != kind:
        raise TensorParallelError(f"tensor-parallel rank {worker.rank} sent {got!r}, expected {kind!r}")


def _stop(workers: list[_Worker]) -> None:
    """Tell each worker to stop, then make sure it has (also at exit and on garbage collection)."""
    for worker in workers:
        with contextlib.suppress(OSError):
            worker.link.send(("stop", None))
        worker.link.close()
    for worker in workers:
        try:
            worker.process.wait(_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()


def _shut_down(workers: list[_Worker]) -> None:
    _stop(workers)
    destroy_tensor_parallel()


def _has_exited(process: subprocess.Popen, timeout: float) -> bool:
    """A rank whose sockets closed may take a moment to show as exited: name it when it does."""
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _pids(workers: list[_Worker]) -> str:
    return ", ".join(str(w.process.pid) for w in workers)
