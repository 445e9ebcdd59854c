"""Runs one scheduled batch on the device: block copies, inputs, forward, sampling.

:meth:`ModelRunner.launch` only queues device work and returns a :class:`StepHandle`;
:meth:`ModelRunner.collect` waits for that step's sampled tokens (one small copy to pinned host
memory per step). Between the two the engine is free to schedule and prepare the next step. The
sampled ids also stay on the device, where the next step reads the inputs that are still pending
on the host. Only the last position of each sequence that samples this step goes through the LM
head. Decode-only batches replay a captured CUDA graph when one fits (:mod:`cuda_graphs`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from pagedserve.engine.attention import AttentionBackend, attention_metadata
from pagedserve.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from pagedserve.engine.outputs import Sample
from pagedserve.engine.sampler import Sampler, SamplerOutput
from pagedserve.engine.scheduler import ScheduledBatch
from pagedserve.engine.sequence import Sequence
from pagedserve.engine.step_inputs import StepBuffers, StepInputs
from pagedserve.models.registry import ModelArchitecture

log = logging.getLogger(__name__)


@dataclass
class StepHandle:
    """A launched step: where its samples will land on the host, and when they are there."""

    seqs: list[Sequence]
    host: torch.Tensor | None = None  # [B, 2] float64 (pinned on CUDA)
    top: tuple[torch.Tensor, torch.Tensor] | None = None
    ready: torch.cuda.Event | None = None
    used_graph: bool = False


class ModelRunner:
    def __init__(
        self,
        model: ModelArchitecture,
        backend: AttentionBackend,
        sampler: Sampler,
        *,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        kv_cache_dtype: torch.dtype,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        cuda_graphs: bool = False,
    ) -> None:
        self.model = model
        self.sampler = sampler
        self.block_size = block_size
        self.device = device
        layers = model.attention_layers()
        first = layers[0]
        shape = (len(layers), num_blocks, block_size, first.num_kv_heads, first.head_dim)
        self.k_caches = torch.empty(shape, dtype=kv_cache_dtype, device=device)
        self.v_caches = torch.empty(shape, dtype=kv_cache_dtype, device=device)
        for i, layer in enumerate(layers):
            layer.backend, layer.k_cache, layer.v_cache = backend, self.k_caches[i], self.v_caches[i]
        self.buffers = StepBuffers(
            max_num_tokens=max(max_num_batched_tokens, max_num_seqs),
            max_num_seqs=max_num_seqs,
            max_blocks_per_seq=-(-max_model_len // block_size),
            block_size=block_size,
            device=device,
        )
        self.on_cuda = device.type == "cuda"
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.on_cuda and backend.supports_cuda_graphs:
            self.graphs = DecodeGraphs(model, self.buffers, graph_batch_sizes(max_num_seqs))
        elif cuda_graphs and self.on_cuda:
            log.info("CUDA graphs off: attention backend %s cannot be captured", backend.name)
        # The previous step's samples, still on the device: the next inputs of its sequences.
        self._pending_rows: dict[Sequence, int] = {}
        self._pending_ids: torch.Tensor | None = None
        self._hosts = [self._host_samples(max_num_seqs) for _ in range(2)]
        self._turn = 0
        self.num_graph_steps = 0
        self.num_eager_steps = 0

    def capture_graphs(self) -> None:
        if self.graphs is None:
            return
        start = time.perf_counter()
        self.graphs.capture()
        log.info(
            "captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s",
            len(self.graphs.sizes),
            self.graphs.sizes[0],
            self.graphs.sizes[-1],
            time.perf_counter() - start,
        )

    # ---- one step --------------------------------------------------------------------------------

    def run(self, batch: ScheduledBatch) -> list[Sample]:
        """Launch and wait (tests, profiling)."""
        return self.collect(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> StepHandle:
        self.copy_blocks(batch.block_copies)
        graph_size = self._graph_size(batch)
        step = self.buffers.prepare(batch, self._pending_rows, self._pending_ids, graph_size)
        hidden = self._forward(step, graph_size)
        self._record_prompt_logprobs(batch, step, hidden)
        seqs = [seq for seq, _ in batch.sample_rows]
        if not seqs:
            self._pending_rows, self._pending_ids = {}, None
            return StepHandle([])
        if step.sample_rows is None:
            hidden = hidden[: step.num_samples]
        else:
            hidden = hidden.index_select(0, step.sample_rows)
        out = self.sampler.sample(self.model.compute_logits(hidden), seqs)
        self._pending_rows = {seq: i for i, seq in enumerate(seqs)}
        self._pending_ids = out.token_ids
        return self._send_to_host(out, seqs, used_graph=graph_size is not None)

    def collect(self, handle: StepHandle) -> list[Sample]:
        """Wait for a launched step's samples; they arrive in ``batch.sample_rows`` order."""
        if not handle.seqs:
            return []
        if handle.ready is not None:
            handle.ready.synchronize()
        top = None
        if handle.top is not None:
            top = (handle.top[0].tolist(), handle.top[1].tolist())
        return self.sampler.to_samples(handle.host, top, handle.seqs)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs]).to(self.device, non_blocking=True)
        dst = torch.tensor([d for _, d in pairs]).to(self.device, non_blocking=True)
        self.k_caches[:, dst] = self.k_caches[:, src]
        self.v_caches[:, dst] = self.v_caches[:, src]

    # ---- internals -------------------------------------------------------------------------------

    def _graph_size(self, batch: ScheduledBatch) -> int | None:
        if self.graphs is None or any(n != 1 for n in batch.num_new_tokens):
            return None
        return self.graphs.size_for(len(batch.seqs))

    def _forward(self, step: StepInputs, graph_size: int | None) -> torch.Tensor:
        if graph_size is not None:
            assert self.graphs is not None
            self.num_graph_steps += 1
            return self.graphs.replay(graph_size)
        self.num_eager_steps += 1
        with attention_metadata(step.metadata):
            return self.model(step.input_ids, step.positions)

    def _record_prompt_logprobs(self, batch: ScheduledBatch, step: StepInputs, hidden: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens this step computes, for sequences that asked. It
        waits for the device: a rare request's cost, paid only by steps that carry one."""
        for i, seq in enumerate(batch.seqs):
            k = seq.params.prompt_logprobs
            start, num_new = batch.start_positions[i], batch.num_new_tokens[i]
            # Position p predicts token p + 1; record each prompt token once (not again after a
            # preemption recomputes it).
            first = max(start, len(seq.prompt_logprobs) - 1)
            end = min(start + num_new, seq.num_prompt_tokens - 1)
            if k is None or first >= end:
                continue
            if not seq.prompt_logprobs:
                seq.prompt_logprobs.append(None)  # nothing predicts the first prompt token
            first_row = step.last_rows[i] - (num_new - 1)
            rows = hidden[first_row + first - start : first_row + end - start]
            targets = torch.tensor(seq.token_ids[first + 1 : end + 1], device=hidden.device)
            seq.prompt_logprobs += self.sampler.prompt_logprobs(self.model.compute_logits(rows), targets, k)

    def _host_samples(self, rows: int) -> torch.Tensor:
        return torch.empty((rows, 2), dtype=torch.float64, pin_memory=self.on_cuda)

    def _send_to_host(self, out: SamplerOutput, seqs: list[Sequence], used_graph: bool) -> StepHandle:
        if not self.on_cuda:
            top = None if out.top_ids is None else (out.top_ids, out.top_logprobs)
            return StepHandle(seqs, out.packed, top, None, used_graph)
        self._turn ^= 1  # two host buffers: the engine may still read the other step's
        count = out.packed.shape[0]
        if count > self._hosts[self._turn].shape[0]:
            self._hosts[self._turn] = self._host_samples(count)
        host = self._hosts[self._turn][:count]
        host.copy_(out.packed, non_blocking=True)
        top = None
        if out.top_ids is not None:
            top = (out.top_ids.to("cpu", non_blocking=True), out.top_logprobs.to("cpu", non_blocking=True))
        ready = torch.cuda.Event()
        ready.record()
        return StepHandle(seqs, host, top, ready, used_graph)
