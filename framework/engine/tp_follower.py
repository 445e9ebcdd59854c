"""A tensor-parallel worker's life: join the group, build and load its shard, then follow rank 0.

Rank 0 announces each call before it makes it (:mod:`pagedserve.engine.tensor_parallel`); the worker
makes the same call on its shard so that the collectives inside the layers meet:

* ``runner``: allocate the KV cache for this rank's heads (a :class:`ModelRunner` of the same sizes);
* ``copy``: the step's copy-on-write block copies;
* ``forward``: receive the step's inputs (:mod:`pagedserve.engine.tp_step`) and run the model;
* ``logits``: receive the hidden rows rank 0 samples from and run the LM head (rank 0 gathers);
* ``stop``.

Any error ends the process: rank 0 sees its socket close, fails the step and stops the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
from pagedserve.engine.attention import AttentionBackend, attention_metadata
from pagedserve.engine.model_runner import ModelRunner
from pagedserve.engine.model_setup import ModelSetup, build_shard
from pagedserve.engine.sampler import Sampler
from pagedserve.engine.tp_step import StepHeader, unpack_step
from pagedserve.engine.tp_worker import WorkerSetup
from pagedserve.models.parallel import (
    COLLECTIVE_TIMEOUT,
    broadcast_from_first,
    init_tensor_parallel,
)
from pagedserve.models.registry import ModelArchitecture

log = logging.getLogger(__name__)


def follow(setup: WorkerSetup, architectures: Mapping[str, type[ModelArchitecture]], link: Connection) -> int:
    """The worker's whole run; its exit status."""
    device = torch.device(setup.config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore(
        "127.0.0.1", setup.store_port, setup.world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT
    )
    link.send(("joining", None))
    init_tensor_parallel(setup.rank, setup.world_size, store, device)
    try:
        shard = build_shard(setup.config, architectures)
    except Exception as exc:  # noqa: BLE001 - rank 0 reports it as the load error
        log.exception("tensor-parallel rank %d could not build its shard", setup.rank)
        link.send(("failed", str(exc) or type(exc).__name__))
        return 1
    link.send(("ready", None))
    try:
        Follower(shard, link).run()
    except EOFError:
        return 0  # rank 0 went away: nothing is left to follow
    except Exception:
        log.exception("tensor-parallel rank %d failed", setup.rank)
        return 1  # no destroy_process_group: after a failed collective it may wait; exiting is enough
    return 0


class Follower:
    def __init__(self, shard: ModelSetup, link: Connection) -> None:
        self.setup = shard
        self.model = shard.model
        self.link = link
        self.runner: ModelRunner | None = None

    def run(self) -> None:
        handlers = {
            "runner": self.build_runner,
            "copy": self.copy,
            "forward": self.forward,
            "logits": self.logits,
        }
        while True:
            kind, payload = self.link.recv()
            if kind == "stop":
                return
            handlers[kind](payload)

    def build_runner(self, spec: tuple[type[AttentionBackend], dict[str, Any]]) -> None:
        backend_cls, sizes = spec
        self.runner = None  # free the previous cache (the profiling run's) first
        for layer in self.model.attention_layers():
            layer.k_cache = layer.v_cache = torch.empty(0)
        if self.setup.device.type == "cuda":
            torch.cuda.empty_cache()
        sampler = Sampler(self.setup.arch.vocab_size, frozenset(), 0)  # never samples: rank 0 does
        self.runner = ModelRunner(
            self.model, backend_cls(), sampler, device=self.setup.device, cuda_graphs=False, **sizes
        )

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        assert self.runner is not None, "rank 0 copies blocks only after it allocated the cache"
        self.runner.copy_blocks(pairs)

    @torch.inference_mode()
    def forward(self, header: StepHeader) -> None:
        flat = broadcast_from_first(torch.empty(header.numel, dtype=torch.int32, device=self.setup.device))
        input_ids, positions, metadata = unpack_step(header, flat)
        with attention_metadata(metadata):
            self.model(input_ids, positions)

    @torch.inference_mode()
    def logits(self, spec: tuple[tuple[int, ...], torch.dtype]) -> None:
        shape, dtype = spec
        hidden = torch.empty(shape, dtype=dtype, device=self.setup.device)
        self.model.compute_logits(broadcast_from_first(hidden))
