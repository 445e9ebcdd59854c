"""Greedy decoding must match transformers ``generate`` token for token (float32, tiny random models).

Each check runs on CPU (plain steps, and with overlapped steps), and, marked ``gpu``, on CUDA with
decode CUDA graphs and without them. On the GPU ``kernel=auto`` takes the Triton backend where it
supports the head size (the ``-d32``/``-d64`` checkpoints) and the torch reference elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from pagedserve.engine.llm import LLM
from pagedserve.engine.sampling_params import SamplingParams

from .engine_helpers import (
    MODEL_MODES,
    assert_pool_free,
    build_hf_checkpoint,
    engine_config,
    hf_greedy,
    random_prompts,
)

MAX_NEW = 12
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

CHECKPOINTS = {
    "llama-gqa": ("llama", {}),
    "llama-tied-llama3-rope": ("llama", {"tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE}),
    "llama-odd-heads": (
        "llama",
        {
            "hidden_size": 60,
            "num_attention_heads": 5,
            "num_key_value_heads": 5,
            "head_dim": 12,
            "attention_bias": True,
        },
    ),
    "qwen2-bias": (
        "qwen2",
        {"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 8, "hidden_size": 48},
    ),
    "qwen3-qk-norm": (
        "qwen3",
        {"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 16, "tie_word_embeddings": True},
    ),
    # Head sizes the Triton kernels serve, so GPU runs cover them (and CUDA graphs) too.
    "llama-gqa-d32": ("llama", {"hidden_size": 128, "num_attention_heads": 4, "head_dim": 32}),
    "qwen3-d64": (
        "qwen3",
        {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64},
    ),
}
TRITON_READY = {"llama-gqa-d32", "qwen3-d64"}
MODES = MODEL_MODES


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}
    for name, (arch, overrides) in CHECKPOINTS.items():
        made[name] = build_hf_checkpoint(tmp_path_factory.mktemp(name), arch, seed=len(name), **overrides)
    return made


def _prompts(shared_prefix: bool) -> list[list[int]]:
    if shared_prefix:
        prefix = random_prompts([37], 320, seed=99)[0]
        return random_prompts([1, 5, 16, 23], 320, seed=5, prefix=prefix)
    return random_prompts([1, 7, 16, 33, 50], 320, seed=4)


def _check(checkpoint, prompts, expected_cache: dict, mode: dict | None = None, **config) -> LLM:
    key = (str(checkpoint), tuple(map(tuple, prompts)))
    if key not in expected_cache:
        expected_cache[key] = hf_greedy(checkpoint, prompts, MAX_NEW)
    mode = dict(mode or {})
    overlap = mode.pop("overlap", None)
    llm = LLM(engine_config(checkpoint, **mode, **config))
    if overlap is not None:
        llm.engine.overlap = overlap
    if llm.engine.device.type == "cuda" and any(checkpoint.name.startswith(n) for n in TRITON_READY):
        assert llm.engine.attention_backend == "triton"
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    got = [o.outputs[0].token_ids for o in outputs]
    assert got == expected_cache[key]
    assert_pool_free(llm.engine.block_manager)
    return llm


_expected: dict = {}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CHECKPOINTS))
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_greedy_matches_transformers(checkpoints, name, block_size, mode):
    _check(checkpoints[name], _prompts(shared_prefix=False), _expected, mode, block_size=block_size)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["llama-gqa", "qwen3-qk-norm", "llama-gqa-d32"])
def test_prefix_cache_hits_give_the_same_tokens(checkpoints, name, mode):
    prompts = _prompts(shared_prefix=True)
    llm = _check(checkpoints[name], prompts, _expected, mode, block_size=8)
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))  # warm cache, second pass
    assert llm.engine.block_usage().hit_rate > 0.3
    _check(checkpoints[name], prompts, _expected, mode, block_size=8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["llama-tied-llama3-rope", "qwen2-bias", "qwen3-d64"])
def test_chunked_prefill_gives_the_same_tokens(checkpoints, name, mode):
    llm = _check(
        checkpoints[name],
        _prompts(shared_prefix=False),
        _expected,
        mode,
        block_size=16,
        max_num_batched_tokens=7,
    )
    assert llm.engine.block_manager.usage().num_queried_tokens > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["llama-gqa", "llama-odd-heads", "llama-gqa-d32"])
def test_preemption_gives_the_same_tokens(checkpoints, name, mode):
    prompts = _prompts(shared_prefix=False)
    llm = _check(checkpoints[name], prompts, _expected, mode, block_size=8, num_blocks=9)
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("mode", MODES)
def test_same_prompts_in_one_batch_and_repeated(checkpoints, mode):
    prompt = _prompts(shared_prefix=False)[3]
    _check(checkpoints["llama-gqa"], [prompt, prompt, prompt], _expected, mode, block_size=16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_do_not_change_greedy_output(checkpoints, dtype):
    """A decode batch that needs padding (37 sequences run in the 48 graph) gives the tokens of eager
    steps: exactly in float32; in bfloat16 at least 80% of the sequences are identical (the padded
    batch may take other matmul kernels, which round differently, and a random tiny model has
    near-ties)."""
    prompts = random_prompts([3 + (7 * i) % 60 for i in range(37)], 320, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    results = {}
    for graphs in (True, False):
        llm = LLM(engine_config(checkpoints["llama-gqa-d32"], device="cuda", dtype=dtype, cuda_graphs=graphs))
        results[graphs] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert (llm.engine.runner.num_graph_steps > 0) == graphs
        assert_pool_free(llm.engine.block_manager)
    if dtype == "float32":
        assert results[True] == results[False]
    else:
        same = sum(x == y for x, y in zip(results[True], results[False], strict=True))
        assert same >= 0.8 * len(prompts), f"{same} of {len(prompts)} sequences identical"
