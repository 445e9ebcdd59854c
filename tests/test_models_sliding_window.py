"""Sliding-window models (Mistral, Qwen2 with ``use_sliding_window``) against transformers, token for
token (float32 greedy, tiny random checkpoints), with windows shorter than the prompts; and the KV
blocks that fall out of the window going back to the pool.

transformers masks key ``j`` for query ``i`` unless ``i - window < j <= i`` (``sliding_window_overlay``);
every test here has prompts longer than the window, so a backend that ignored or shifted the window by
one would pick other tokens.
"""

from __future__ import annotations

import pytest
from pagedserve.engine.block_manager import NO_BLOCK
from pagedserve.engine.llm import LLM
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.models.attention_config import FULL, SLIDING, AttentionPattern

from .engine_helpers import MODEL_MODES, assert_pool_free, engine_config, hf_greedy, random_prompts
from .windowed_checkpoints import build_windowed_checkpoint

MAX_NEW = 12
CHECKPOINTS = {
    "mistral-w5": ("mistral", {"sliding_window": 5}),
    "mistral-w16-d32": (
        "mistral",
        {"sliding_window": 16, "hidden_size": 128, "num_attention_heads": 4, "head_dim": 32},
    ),
    # every layer windowed: blocks behind the window are freed
    "qwen2-all-windowed": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 9, "max_window_layers": 0},
    ),
    # layer 0 global, layer 1 windowed: nothing can be freed
    "qwen2-mixed": ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
}
MODES = MODEL_MODES


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {
        name: build_windowed_checkpoint(tmp_path_factory.mktemp(name), arch, seed=len(name), **overrides)
        for name, (arch, overrides) in CHECKPOINTS.items()
    }


def _prompts(shared_prefix: bool = False) -> list[list[int]]:
    if shared_prefix:
        return random_prompts([1, 5, 16, 23], 320, seed=5, prefix=random_prompts([37], 320, seed=99)[0])
    return random_prompts([1, 7, 16, 33, 50], 320, seed=4)


_expected: dict = {}


def _check(checkpoint, prompts, mode=None, **config) -> LLM:
    key = (str(checkpoint), tuple(map(tuple, prompts)))
    if key not in _expected:
        _expected[key] = hf_greedy(checkpoint, prompts, MAX_NEW)
    mode = dict(mode or {})
    overlap = mode.pop("overlap", None)
    llm = LLM(engine_config(checkpoint, **mode, **config))
    if overlap is not None:
        llm.engine.overlap = overlap
    if llm.engine.device.type == "cuda" and checkpoint.name.startswith("mistral-w16-d32"):
        assert llm.engine.attention_backend == "triton"
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    assert [o.outputs[0].token_ids for o in outputs] == _expected[key]
    assert_pool_free(llm.engine.block_manager)
    return llm


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CHECKPOINTS))
@pytest.mark.parametrize("block_size", [1, 8, 16])
def test_greedy_matches_transformers(checkpoints, name, block_size, mode):
    _check(checkpoints[name], _prompts(), mode, block_size=block_size)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mistral-w5", "qwen2-all-windowed", "qwen2-mixed"])
def test_prefix_cache_hits_give_the_same_tokens(checkpoints, name, mode):
    prompts = _prompts(shared_prefix=True)
    llm = _check(checkpoints[name], prompts, mode, block_size=8)
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))  # second pass: cached
    assert llm.engine.block_usage().hit_rate > 0.3
    _check(checkpoints[name], prompts, mode, block_size=8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mistral-w5", "qwen2-all-windowed", "mistral-w16-d32"])
def test_chunked_prefill_gives_the_same_tokens(checkpoints, name, mode):
    _check(checkpoints[name], _prompts(), mode, block_size=8, max_num_batched_tokens=7)


@pytest.mark.parametrize("mode", MODES)
def test_preemption_gives_the_same_tokens(checkpoints, mode):
    llm = _check(checkpoints["qwen2-mixed"], _prompts(), mode, block_size=8, num_blocks=9)
    assert llm.engine.scheduler.num_preemptions > 0


def _max_blocks_held(llm: LLM, prompt: list[int], max_tokens: int) -> int:
    """Run one request step by step; the most blocks its sequence held at once."""
    engine = llm.engine
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    most = 0
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            most = max(most, sum(block != NO_BLOCK for block in seq.block_table))
    assert_pool_free(engine.block_manager)
    return most


@pytest.mark.parametrize("block_size", [1, 8])
def test_blocks_behind_the_window_are_freed(checkpoints, block_size):
    """Every layer windowed (9 tokens): a 60-token prompt plus 40 generated, prefilled in chunks of 8,
    never holds more than the window and one chunk; the same run without freeing would hold 100 tokens.
    With one global layer (``qwen2-mixed``) every block stays."""
    prompt = random_prompts([60], 320, seed=8)[0]
    config = dict(block_size=block_size, max_num_batched_tokens=8, num_blocks=200)
    windowed = LLM(engine_config(checkpoints["qwen2-all-windowed"], **config))
    assert windowed.engine.block_manager.sliding_window == 9
    held = _max_blocks_held(windowed, prompt, 40)
    # the window's 8 earlier tokens and a chunk of 8, each possibly straddling one more block
    assert held <= -(-(8 + 8) // block_size) + 2
    mixed = LLM(engine_config(checkpoints["qwen2-mixed"], **config))
    assert mixed.engine.block_manager.sliding_window is None
    assert _max_blocks_held(mixed, prompt, 40) == -(-98 // block_size)  # the last token has no KV


def test_use_sliding_window_false_keeps_full_attention(tmp_path):
    """Qwen2 configs ship ``sliding_window`` with ``use_sliding_window: false``: the window is off."""
    checkpoint = build_windowed_checkpoint(tmp_path, "qwen2", seed=3, sliding_window=4, max_window_layers=0)
    llm = _check(checkpoint, _prompts())
    assert all(layer.sliding_window is None for layer in llm.engine.runner.model.attention_layers())


# ---------------------------------------------------------------------------------------------- config
def _hf(**keys: object) -> dict:
    return {"num_hidden_layers": 4, **keys}


@pytest.mark.parametrize(
    ("keys", "types", "windows"),
    [
        (_hf(model_type="mistral", sliding_window=7), (SLIDING,) * 4, (7, 7, 7, 7)),
        (_hf(model_type="mistral", sliding_window=None), (SLIDING,) * 4, (None,) * 4),
        (
            _hf(model_type="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=2),
            (FULL, FULL, SLIDING, SLIDING),
            (None, None, 5, 5),
        ),
        (_hf(model_type="qwen2", use_sliding_window=False, sliding_window=5), (FULL,) * 4, (None,) * 4),
        (_hf(model_type="gemma2", sliding_window=3), (SLIDING, FULL, SLIDING, FULL), (3, None, 3, None)),
        (
            _hf(model_type="gemma3_text", sliding_window=3, sliding_window_pattern=3),
            (SLIDING, SLIDING, FULL, SLIDING),
            (3, 3, None, 3),
        ),
        (
            _hf(sliding_window=3, layer_types=[FULL, SLIDING, FULL, SLIDING]),
            (FULL, SLIDING, FULL, SLIDING),
            (None, 3, None, 3),
        ),
    ],
)
def test_which_layers_have_a_window(keys, types, windows):
    pattern = AttentionPattern.from_hf(keys)
    assert pattern.layer_types == types
    assert tuple(pattern.window_of(i) for i in range(4)) == windows


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (_hf(sliding_window=0), "sliding_window"),
        (_hf(sliding_window=-4), "sliding_window"),
        (_hf(sliding_window=2.5), "sliding_window"),
        (_hf(sliding_window="4096"), "sliding_window"),
        (_hf(sliding_window=True), "sliding_window"),
        (_hf(sliding_window=4, layer_types=[SLIDING] * 3), "layer_types"),
        (_hf(sliding_window=4, layer_types=["chunked_attention"] * 4), "layer_types"),
        (_hf(attn_logit_softcapping=0), "attn_logit_softcapping"),
        (_hf(final_logit_softcapping=-30.0), "final_logit_softcapping"),
        (_hf(query_pre_attn_scalar="big"), "query_pre_attn_scalar"),
    ],
)
def test_bad_attention_settings_are_refused(keys, message):
    with pytest.raises(ValueError, match=message):
        AttentionPattern.from_hf(keys)


def test_a_bad_window_in_config_json_fails_the_load_with_its_name(tmp_path):
    import json

    checkpoint = build_windowed_checkpoint(tmp_path, "mistral", seed=1, sliding_window=4)
    config = json.loads((checkpoint / "config.json").read_text())
    config["sliding_window"] = -1
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
        LLM(engine_config(checkpoint))
