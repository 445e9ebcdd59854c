"""Decode steps as CUDA graphs: one captured forward pass per padded batch size.

A decode-only batch of ``B`` sequences runs the graph of the smallest captured size ``>= B``, unless
a larger captured size replays measurably faster: cuBLAS picks its tiles per shape, and on an H200
some batch sizes (e.g. 448 rows) take longer than 512 (``decode_gemm_check.py``), so each graph is
timed once after capture. The padded rows store nothing (slot -1) and read no cache (context length
0), and their outputs are dropped. The graphs read the runner's persistent input buffers
(:class:`StepBuffers`), so a step only refills those and replays. Batches with a prefill chunk, or
larger than the largest size, run eagerly. Graphs are captured largest first into one shared memory
pool.
"""

from __future__ import annotations

import bisect

import torch
from pagedserve.engine.attention import attention_metadata
from pagedserve.engine.step_inputs import StepBuffers
from pagedserve.models.registry import ModelArchitecture

MAX_GRAPH_BATCH = 512
FASTER_BY = 0.03  # a larger graph must replay this much faster to take a smaller graph's batches
TIMING_REPLAYS = 3


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to ``min(max_num_seqs, 512)`` (and that bound itself)."""
    top = min(max_num_seqs, MAX_GRAPH_BATCH)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


def fastest_at_or_above(times: list[float], faster_by: float = FASTER_BY) -> list[int]:
    """For graphs in ascending size with replay ``times``: the index of the graph each one's batches
    should run on, the graph itself or a larger one that is faster by more than ``faster_by``."""
    route = list(range(len(times)))
    for i in range(len(times) - 2, -1, -1):
        best = route[i + 1]
        if times[best] < times[i] * (1.0 - faster_by):
            route[i] = best
    return route


class DecodeGraphs:
    def __init__(self, model: ModelArchitecture, buffers: StepBuffers, sizes: list[int]) -> None:
        self.model = model
        self.buffers = buffers
        self.sizes = sorted(sizes)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.route = list(range(len(self.sizes)))  # see fastest_at_or_above; set by capture()

    def size_for(self, num_seqs: int) -> int | None:
        """The captured size to run ``num_seqs`` decodes with, or ``None`` (run eagerly)."""
        index = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[self.route[index]] if index < len(self.sizes) else None

    def rerouted(self) -> dict[int, int]:
        """Captured sizes whose batches run on a larger, faster graph: size -> the graph's size."""
        return {self.sizes[i]: self.sizes[j] for i, j in enumerate(self.route) if i != j}

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
        self.route = fastest_at_or_above([self._replay_ms(size) for size in self.sizes], FASTER_BY)

    def _replay_ms(self, size: int) -> float:
        self.buffers.fill_dummy_decode(size)
        self.graphs[size].replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(TIMING_REPLAYS):
            self.graphs[size].replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / TIMING_REPLAYS

    def replay(self, size: int) -> torch.Tensor:
        self.graphs[size].replay()
        return self.outputs[size]
