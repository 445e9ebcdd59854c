"""Gemma 2 and Gemma 3 (text) against transformers, token for token (float32 greedy, tiny random
checkpoints with random norm weights), with local windows shorter than the prompts.

Greedy picks cannot see the final logit soft-cap (``tanh`` keeps the order), so the log-probabilities
are compared as well. Gemma 3's older config layout (``rope_local_base_freq``, ``sliding_window_pattern``,
no ``layer_types``) must load to the same model as transformers 5's.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from pagedserve.engine.llm import LLM
from pagedserve.engine.sampling_params import SamplingParams

from .engine_helpers import MODEL_MODES, assert_pool_free, engine_config, hf_greedy, random_prompts
from .windowed_checkpoints import build_windowed_checkpoint

MAX_NEW = 12
LOCAL, GLOBAL = "sliding_attention", "full_attention"
GEMMA3_ROPE = {
    LOCAL: {"rope_type": "default", "rope_theta": 100.0},
    GLOBAL: {"rope_type": "default", "rope_theta": 10000.0},
}
CHECKPOINTS = {
    # layer 0 local (window 6), layer 1 global; the caps bind on a tiny random model
    "gemma2": (
        "gemma2",
        {
            "sliding_window": 6,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 1.5,
            "final_logit_softcapping": 2.0,
        },
    ),
    "gemma2-d32": (
        "gemma2",
        {
            "hidden_size": 128,
            "num_attention_heads": 4,
            "head_dim": 32,
            "sliding_window": 9,
            "query_pre_attn_scalar": 32,
            "attn_logit_softcapping": 3.0,
            "final_logit_softcapping": 5.0,
        },
    ),
    "gemma3": (
        "gemma3",
        {
            "num_hidden_layers": 3,
            "layer_types": [LOCAL, GLOBAL, LOCAL],
            "sliding_window": 5,
            "query_pre_attn_scalar": 20,
            "rope_parameters": GEMMA3_ROPE,
            "final_logit_softcapping": 3.0,
        },
    ),
    "gemma3-d64": (
        "gemma3",
        {
            "hidden_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 64,
            "num_hidden_layers": 3,
            "layer_types": [LOCAL, LOCAL, GLOBAL],
            "sliding_window": 7,
            "query_pre_attn_scalar": 64,
            "rope_parameters": GEMMA3_ROPE,
        },
    ),
}
TRITON_READY = {"gemma2-d32", "gemma3-d64"}
MODES = MODEL_MODES


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {
        name: build_windowed_checkpoint(tmp_path_factory.mktemp(name), arch, seed=len(name) + 1, **overrides)
        for name, (arch, overrides) in CHECKPOINTS.items()
    }


def _prompts(shared_prefix: bool = False) -> list[list[int]]:
    if shared_prefix:
        return random_prompts([1, 5, 16, 23], 320, seed=5, prefix=random_prompts([37], 320, seed=99)[0])
    return random_prompts([1, 7, 16, 33, 50], 320, seed=4)


_expected: dict = {}


def _check(checkpoint, prompts, mode=None, expected_from=None, **config) -> LLM:
    reference = expected_from or checkpoint
    key = (str(reference), tuple(map(tuple, prompts)))
    if key not in _expected:
        _expected[key] = hf_greedy(reference, prompts, MAX_NEW)
    mode = dict(mode or {})
    overlap = mode.pop("overlap", None)
    llm = LLM(engine_config(checkpoint, **mode, **config))
    if overlap is not None:
        llm.engine.overlap = overlap
    if llm.engine.device.type == "cuda" and checkpoint.name.startswith(tuple(TRITON_READY)):
        assert llm.engine.attention_backend == "triton"
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    assert [o.outputs[0].token_ids for o in outputs] == _expected[key]
    assert_pool_free(llm.engine.block_manager)
    return llm


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CHECKPOINTS))
@pytest.mark.parametrize("block_size", [1, 8, 16])
def test_greedy_matches_transformers(checkpoints, name, block_size, mode):
    llm = _check(checkpoints[name], _prompts(), mode, block_size=block_size)
    # local and global layers share the cache: nothing may be freed behind the window
    assert llm.engine.block_manager.sliding_window is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_prefix_cache_hits_give_the_same_tokens(checkpoints, name, mode):
    prompts = _prompts(shared_prefix=True)
    llm = _check(checkpoints[name], prompts, mode, block_size=8)
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    assert llm.engine.block_usage().hit_rate > 0.3
    _check(checkpoints[name], prompts, mode, block_size=8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["gemma2", "gemma3-d64"])
def test_chunked_prefill_gives_the_same_tokens(checkpoints, name, mode):
    _check(checkpoints[name], _prompts(), mode, block_size=16, max_num_batched_tokens=7)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_logprobs_match_transformers(checkpoints, name):
    """The first token's top log-probabilities, after the final soft-cap, equal transformers'."""
    import transformers

    prompts = _prompts()
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32).eval()
    llm = LLM(engine_config(checkpoints[name]))
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, logprobs=5))
    for prompt, output in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt])).logits[0, -1]
        expected = torch.log_softmax(logits.double(), -1)
        got = output.outputs[0].logprobs[0]
        assert len(got) >= 5
        for token, logprob in got.items():
            assert math.isclose(logprob, expected[token].item(), abs_tol=2e-4), (token, logprob)


def test_gemma3_older_config_layout_loads_the_same_model(checkpoints, tmp_path):
    """``rope_local_base_freq``, ``rope_theta`` and ``sliding_window_pattern`` instead of
    ``rope_parameters`` and ``layer_types`` (Gemma 3 files written before transformers 5)."""
    source = checkpoints["gemma3"]
    older = tmp_path / "gemma3-older"
    shutil.copytree(source, older)
    config = json.loads((older / "config.json").read_text())
    assert config["layer_types"] == [LOCAL, GLOBAL, LOCAL]
    del config["layer_types"], config["rope_parameters"]
    config |= {"rope_theta": 10000.0, "rope_local_base_freq": 100.0, "sliding_window_pattern": 2}
    (older / "config.json").write_text(json.dumps(config))
    _check(older, _prompts(), expected_from=source)


def test_gemma3_local_layers_use_their_own_rope_base(checkpoints):
    llm = LLM(engine_config(checkpoints["gemma3"]))
    layers = llm.engine.runner.model.model.layers
    local, global_ = layers[0].self_attn.rotary_emb, layers[1].self_attn.rotary_emb
    # position 1, the slowest-turning pair: base 100 turns it far more than base 10000
    assert local.cos_cache[1, -1] < global_.cos_cache[1, -1]
    assert [layer.self_attn.attn.sliding_window for layer in layers] == [5, None, 5]


def test_unsupported_activation_and_bidirectional_gemma_are_refused(checkpoints, tmp_path):
    for name, change, message in [
        ("act", {"hidden_activation": "relu"}, "hidden_activation"),
        ("bidi", {"use_bidirectional_attention": True}, "embedding model"),
    ]:
        target = tmp_path / name
        shutil.copytree(checkpoints["gemma3"], target)
        config = json.loads((target / "config.json").read_text()) | change
        (target / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            LLM(engine_config(target))


def _servable(directory, **config_changes):  # noqa: ANN001, ANN202
    """Give a checkpoint tiny-llama's tokenizer (vocab 512) so text goes in and out."""
    from pagedserve.models.tiny import ensure_tiny_llama

    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_tiny_llama() / file, directory / file)
    config = json.loads((directory / "config.json").read_text())
    config.update(bos_token_id=0, eos_token_id=1, **config_changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_served_through_tritonclient_beside_a_checkpoint_with_a_bad_window(tmp_path):
    """A Gemma 2 serves text equal to transformers' while a Mistral whose ``sliding_window`` is -8 is
    UNAVAILABLE with the reason naming the key."""
    import time

    import numpy as np
    import tritonclient.grpc as grpcclient
    from tokenizers import Tokenizer

    from .conftest import start_server

    gemma_dims = {"vocab_size": 512, "sliding_window": 4, "query_pre_attn_scalar": 24}
    good = _servable(build_windowed_checkpoint(tmp_path / "good", "gemma2", seed=4, **gemma_dims))
    bad = _servable(
        build_windowed_checkpoint(tmp_path / "bad", "mistral", seed=5, vocab_size=512), sliding_window=-8
    )
    repository = tmp_path / "repo"
    repository.mkdir()
    for name, directory in (("tiny-gemma2", good), ("bad-window", bad)):
        (repository / f"{name}.yaml").write_text(
            f"backend: llm\nmax_batch_size: 0\nparameters:\n  weights: {directory}\n"
        )
    prompt = "The scheduler hands out tokens, and the model runner turns block tables into slots"
    tokenizer = Tokenizer.from_file(str(good / "tokenizer.json"))
    expected = hf_greedy(good, [tokenizer.encode(prompt).ids], 8)[0]

    def tensor(name: str, value: object, datatype: str):  # noqa: ANN202
        t = grpcclient.InferInput(name, [1], datatype)
        t.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES" else bool))
        return t

    sampling = json.dumps({"temperature": 0, "max_tokens": 8})
    inputs = [
        tensor("text_input", prompt.encode(), "BYTES"),
        tensor("sampling_parameters", sampling.encode(), "BYTES"),
        tensor("stream", False, "BOOL"),
        tensor("exclude_input_in_output", True, "BOOL"),
    ]
    server = start_server(
        f"repository={repository}", "server.exit_on_error=false", "cache.num_blocks=64", wait_ready=False
    )
    try:
        with server.client() as client:
            deadline = time.monotonic() + 120
            while not _ready(client, "tiny-gemma2"):
                assert time.monotonic() < deadline, "tiny-gemma2 never became ready"
                time.sleep(0.5)
            text = client.infer("tiny-gemma2", inputs).as_numpy("text_output")[0].decode()
            assert text == tokenizer.decode(expected, skip_special_tokens=True)
            assert not client.is_model_ready("bad-window")
            index = {m.name: m for m in client.get_model_repository_index().models}
            assert "sliding_window must be a positive integer or null, got -8" in index["bad-window"].reason
            assert client.is_model_ready("tiny-gemma2")
    finally:
        assert server.stop() == 0


def _ready(client, name: str) -> bool:  # noqa: ANN001
    from tritonclient.utils import InferenceServerException

    try:
        return client.is_model_ready(name)
    except InferenceServerException:  # UNAVAILABLE while the start-up models load
        return False
