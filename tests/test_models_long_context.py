"""Long-context rope types and Phi-3 against transformers ``generate``, greedy, token for token
(float32, tiny random models): Llama with yarn, dynamic, linear and llama3 scaling, Qwen2 with yarn,
Phi-3 with longrope (fused qkv/gate_up checkpoint tensors, partial rotary).

Phi-3's longrope, at the switch: transformers rotates with the short factors while the sequence fits
in ``original_max_position_embeddings`` (64 here) and, at the first step past it, drops its KV cache
and recomputes the whole sequence with the long factors. The engine fixes one factor set for its
context instead (``max_model_len``; see layers/rotary.py), so it matches transformers for sequences
that stay within the window when ``max_model_len`` does too, for prompts longer than the window,
and for every token after the switch.
"""

from __future__ import annotations

import pytest
from pagedserve.engine.llm import LLM
from pagedserve.engine.sampling_params import SamplingParams

from .engine_helpers import assert_pool_free, build_hf_checkpoint, engine_config, hf_greedy, random_prompts

MAX_NEW = 12
ORIGINAL = 64  # original_max_position_embeddings of the scaled configs
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
LONGROPE = {
    "type": "longrope",  # the older rope_scaling layout, as Phi-3 checkpoints ship it
    "short_factor": [1.0, 1.02, 1.1, 1.3],
    "long_factor": [1.5, 3.0, 9.0, 30.0],
}
CHECKPOINTS = {
    "llama-yarn": ("llama", {"rope_parameters": YARN}),
    "llama-dynamic": ("llama", {"rope_scaling": {"type": "dynamic", "factor": 4.0}, "rope_theta": 500.0}),
    "llama-linear": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 3.0}},
    ),
    "qwen2-yarn": (
        "qwen2",
        {"rope_scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16}},
    ),
    "phi3-longrope": (
        "phi3",
        {
            "max_position_embeddings": 256,
            "original_max_position_embeddings": ORIGINAL,
            "partial_rotary_factor": 0.5,  # 8 of 16 dimensions rotated: 4 factors
            "rope_scaling": LONGROPE,
            "rope_theta": 500.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {
        name: build_hf_checkpoint(tmp_path_factory.mktemp(name), arch, seed=len(name), **overrides)
        for name, (arch, overrides) in CHECKPOINTS.items()
    }


def _generate(checkpoint, prompts, **config) -> list[list[int]]:
    llm = LLM(engine_config(checkpoint, **config))
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    assert_pool_free(llm.engine.block_manager)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("name", ["llama-yarn", "llama-dynamic", "llama-linear", "qwen2-yarn"])
def test_scaled_rope_greedy_matches_transformers(checkpoints, name, block_size):
    # past yarn's original window (32 / 16) and within max_position_embeddings (512), where
    # transformers' dynamic NTK leaves the base unchanged
    prompts = random_prompts([1, 7, 33, 50, 120], 320, seed=4)
    want = hf_greedy(checkpoints[name], prompts, MAX_NEW)
    assert _generate(checkpoints[name], prompts, block_size=block_size) == want


def test_chunked_prefill_with_yarn(checkpoints):
    prompts = random_prompts([40, 90], 320, seed=6)
    want = hf_greedy(checkpoints["llama-yarn"], prompts, MAX_NEW)
    assert _generate(checkpoints["llama-yarn"], prompts, max_num_batched_tokens=7) == want


def test_phi3_within_the_original_window_uses_the_short_factors(checkpoints):
    # prompt + generation <= 64: transformers never switches; neither does a 64-token engine
    prompts = random_prompts([1, 7, 16, 33, 52], 320, seed=4)
    want = hf_greedy(checkpoints["phi3-longrope"], prompts, MAX_NEW)
    assert _generate(checkpoints["phi3-longrope"], prompts, max_model_len=ORIGINAL) == want


@pytest.mark.parametrize("block_size", [1, 16])
def test_phi3_prompts_past_the_original_window_use_the_long_factors(checkpoints, block_size):
    prompts = random_prompts([65, 80, 130], 320, seed=5)
    want = hf_greedy(checkpoints["phi3-longrope"], prompts, MAX_NEW)
    assert _generate(checkpoints["phi3-longrope"], prompts, block_size=block_size) == want


def test_phi3_after_the_switch_matches_transformers_recompute(checkpoints):
    """A 60-token prompt: transformers picks its first 5 tokens with the short factors (positions up
    to 63), then recomputes everything with the long ones. Given those 5 tokens, the engine (whose
    256-token context takes the long factors throughout) picks what transformers picks after."""
    checkpoint = checkpoints["phi3-longrope"]
    prompt = random_prompts([60], 320, seed=8)[0]
    want = hf_greedy(checkpoint, [prompt], MAX_NEW)[0]
    assert len(want) == MAX_NEW  # no early eos, so the switch happens
    got = _generate(checkpoint, [prompt + want[:5]])[0]
    assert got[: MAX_NEW - 5] == want[5:]


def test_phi3_fused_tensors_load_into_the_merged_linears(checkpoints):
    from safetensors import safe_open

    with safe_open(str(checkpoints["phi3-longrope"] / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(".q_proj." in n or ".gate_proj." in n for n in names)
