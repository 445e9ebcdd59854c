"""Decode steps as CUDA graphs: one captured forward pass per padded batch size.

A decode-only batch of ``B`` sequences runs the graph of the smallest captured size ``>= B``; the
padded rows store nothing (slot -1) and read no cache (context length 0), and their outputs are
dropped. The graphs read the runner's persistent input buffers (:class:`StepBuffers`), so a step
only refills those and replays. Batches with a prefill chunk, or larger than the largest size, run
eagerly. Graphs are captured largest first into one shared memory pool.
"""

from __future__ import annotations

import bisect

import torch
from pagedserve.engine.attention import attention_metadata
from pagedserve.engine.step_inputs import StepBuffers
from pagedserve.models.registry import ModelArchitecture

MAX_GRAPH_BATCH = 512


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to ``min(max_num_seqs, 512)`` (and that bound itself)."""
    top = min(max_num_seqs, MAX_GRAPH_BATCH)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


class DecodeGraphs:
    def __init__(self, model: ModelArchitecture, buffers: StepBuffers, sizes: list[int]) -> None:
        self.model = model
        self.buffers = buffers
        self.sizes = sorted(sizes)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def size_for(self, num_seqs: int) -> int | None:
        """The captured size to run ``num_seqs`` decodes with, or ``None`` (run eagerly)."""
        index = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[index] if index < len(self.sizes) else None

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):
            self.buffers.fill_dummy_decode(size)
            metadata = self.buffers.decode_metadata(size)
            input_ids = self.buffers.device_view("input_ids", size)
            positions = self.buffers.device_view("positions", size)
            with attention_metadata(metadata):
                self.model(input_ids, positions)  # compiles kernels for this size outside the graph
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self.model(input_ids, positions)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def replay(self, size: int) -> torch.Tensor:
        self.graphs[size].replay()
        return self.outputs[size]
