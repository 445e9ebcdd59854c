"""The runner's packed step inputs: what one copy sends must be all the model reads.

On CUDA the inputs live in a pinned host buffer and reach the device in one copy of its used
prefix. Here the same path runs on CPU with a separate "device" buffer poisoned beforehand, so an
input that is read but never sent shows up as wrong tokens.
"""

from __future__ import annotations

import pytest
import torch
from pagedserve.engine.llm import LLM
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.step_inputs import StepBuffers
from pagedserve.models.tiny import ensure_tiny_llama

from .engine_helpers import assert_pool_free, engine_config


def _separate_device_buffer(buffers: StepBuffers) -> None:
    buffers.device_buffer = torch.full_like(buffers.hosts[0], -7)


@pytest.mark.parametrize("overlap", [False, True])
def test_one_copy_carries_every_input(tmp_path, overlap):
    path = ensure_tiny_llama(tmp_path / "tiny")
    prompts = [[5 + (i * 13 + j * 7) % 400 for j in range(3 + 9 * i)] for i in range(9)]
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    config = engine_config(path, block_size=8, max_num_batched_tokens=48, max_num_seqs=6)
    expected = [o.outputs[0].token_ids for o in LLM(config).generate(prompts, params)]
    llm = LLM(config)
    _separate_device_buffer(llm.engine.runner.buffers)
    llm.engine.overlap = overlap
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == expected
    assert_pool_free(llm.engine.block_manager)


def test_sections_do_not_overlap():
    buffers = StepBuffers(
        max_num_tokens=10, max_num_seqs=3, max_blocks_per_seq=4, block_size=8, device=torch.device("cpu")
    )
    ends = sorted((offset, offset + buffers.sizes[name]) for name, offset in buffers.offsets.items())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ends, ends[1:], strict=False))
    assert ends[-1][1] == buffers.block_tables_offset
    assert buffers.size == buffers.block_tables_offset + 3 * 4
