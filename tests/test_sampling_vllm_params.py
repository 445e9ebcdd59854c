"""vLLM's SamplingParams beyond the basics, through the engine on tiny-llama: min_tokens against stop
strings, best_of, prompt_logprobs, logit_bias, bad_words, allowed_token_ids, truncate_prompt_tokens,
skip_special_tokens, and every new parameter's bad values named."""

from __future__ import annotations

import pytest
import torch
from pagedserve.engine.llm import LLM
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.models.tiny import ensure_tiny_llama

from .engine_helpers import assert_pool_free, engine_config

PROMPT = "The scheduler hands out"
EOS = 1


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return ensure_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module", params=[False, True], ids=["cpu", "cpu-overlap"])
def llm(request, tiny_path) -> LLM:
    llm = LLM(engine_config(tiny_path, block_size=8, num_blocks=512, device="cpu"))
    llm.engine.overlap = request.param
    return llm


@pytest.fixture(autouse=True)
def _pool_is_free_after_each_test(request):
    yield
    if "llm" in request.fixturenames:
        assert_pool_free(request.getfixturevalue("llm").engine.block_manager)


def greedy(llm: LLM, prompt: str = PROMPT, **kwargs):
    kwargs = {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True, **kwargs}
    return llm.generate([prompt], SamplingParams(**kwargs))[0]


@pytest.mark.parametrize("include", [False, True])
def test_min_tokens_holds_back_stop_strings(llm, include):
    full = greedy(llm).outputs[0]
    first_piece = llm.tokenizer.decode(full.token_ids[:1])
    stop = first_piece.strip()[:2] or first_piece
    assert greedy(llm, stop=[stop]).outputs[0].token_ids == full.token_ids[:1]  # stops at once
    out = greedy(llm, stop=[stop], min_tokens=10, include_stop_str_in_output=include).outputs[0]
    assert len(out.token_ids) > 10
    # Cut at the first stop string that ends after the 10th token, and only there.
    tenth = len(llm.tokenizer.decode(full.token_ids[:10]))
    cut = full.text.find(stop, tenth - len(stop) + 1)
    if cut == -1:
        assert out.finish_reason == "length" and out.text == full.text
    else:
        assert out.finish_reason == "stop"
        assert out.text == full.text[: cut + (len(stop) if include else 0)]


def test_best_of_returns_the_most_likely_of_its_candidates(llm):
    sampled = dict(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    candidates = llm.generate([PROMPT], SamplingParams(n=4, **sampled))[0].outputs
    best = llm.generate([PROMPT], SamplingParams(n=2, best_of=4, **sampled))[0].outputs
    ranked = sorted(candidates, key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.index for c in best] == [0, 1]
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked]
    assert [c.text for c in best] == [c.text for c in ranked]


def test_prompt_logprobs_match_transformers(llm, tiny_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    for _ in range(2):  # the second time the prompt's blocks are in the prefix cache
        out = greedy(llm, "café 東京 and numbers 1 2 3 four", max_tokens=2, prompt_logprobs=3)
        ids = out.prompt_token_ids
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        entries = out.prompt_logprobs
        assert len(entries) == len(ids) and entries[0] is None
        for position, entry in enumerate(entries[1:], start=1):
            assert ids[position] in entry and 3 <= len(entry) <= 4
            for token, logprob in entry.items():
                assert logprob == pytest.approx(expected[position - 1, token].item(), abs=1e-4)


def test_prompt_logprobs_with_chunked_prefill(tiny_path):
    config = engine_config(tiny_path, block_size=8, num_blocks=512, device="cpu")
    config.scheduler.max_num_batched_tokens = 8  # the prompt takes several steps
    llm = LLM(config)
    prompt = "Prefix caching lets many requests that share a system prompt reuse blocks"
    out = greedy(llm, prompt, max_tokens=2, prompt_logprobs=0)
    assert len(out.prompt_token_ids) > 8
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert all(len(entry) == 1 for entry in out.prompt_logprobs[1:])


def test_logit_bias_forces_and_bans(llm):
    full = greedy(llm).outputs[0].token_ids
    forced = greedy(llm, logit_bias={42: 100.0}).outputs[0].token_ids
    assert set(forced) == {42}
    banned = greedy(llm, logit_bias={full[0]: -100.0}).outputs[0].token_ids
    assert full[0] not in banned


def test_allowed_token_ids_limit_every_draw(llm):
    allowed = [5, 17, 99, 300]
    out = llm.generate(
        [PROMPT], SamplingParams(temperature=1.5, seed=3, max_tokens=30, allowed_token_ids=allowed)
    )
    assert set(out[0].outputs[0].token_ids) <= set(allowed)


def test_bad_words_never_appear(llm):
    full = greedy(llm).outputs[0]
    word = llm.tokenizer.decode(full.token_ids[2:4]).strip()
    out = greedy(llm, bad_words=[word]).outputs[0]
    assert out.token_ids != full.token_ids
    sequences = SamplingParams(bad_words=[word]).with_tokenizer(llm.tokenizer).bad_words_token_ids
    for ids in sequences:
        assert all(out.token_ids[i : i + len(ids)] != ids for i in range(len(out.token_ids)))


def test_truncate_prompt_tokens_keeps_the_end(llm):
    ids = llm.tokenizer.encode(PROMPT)
    out = greedy(llm, truncate_prompt_tokens=3, max_tokens=2)
    assert out.prompt_token_ids == ids[-3:]
    out = greedy(llm, [7] * 5000, truncate_prompt_tokens=-1, max_tokens=1)
    assert len(out.prompt_token_ids) == llm.engine.max_model_len - 1


def test_skip_special_tokens(llm):
    forced_eos = dict(logit_bias={EOS: 100.0}, max_tokens=2)
    assert greedy(llm, **forced_eos).outputs[0].text == ""
    assert greedy(llm, skip_special_tokens=False, **forced_eos).outputs[0].text == "<|end_of_text|>" * 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"logprobs": -1},
            r"logprobs must be null or in \[0, 20\] \(-1, the whole vocabulary, is not served\)",
        ),
        ({"prompt_logprobs": -1}, r"prompt_logprobs must be null or in \[0, 20\]"),
        ({"prompt_logprobs": 21}, "prompt_logprobs must be"),
        ({"best_of": 0}, "best_of must be null or >= n"),
        ({"best_of": "many"}, "best_of has a bad value"),
        ({"logit_bias": {"5": 101}}, r"logit_bias must be null or an object .* in \[-100, 100\]"),
        ({"logit_bias": {"x": 1}}, "logit_bias has a bad value"),
        ({"logit_bias": [1, 2]}, "logit_bias has a bad value"),
        ({"logit_bias": {"-3": 1}}, "logit_bias must be"),
        ({"logit_bias": {"5": "nan"}}, "logit_bias has a bad value"),
        ({"allowed_token_ids": []}, "allowed_token_ids must be null or a non-empty list"),
        ({"allowed_token_ids": list(range(2**18 + 1))}, "allowed_token_ids must be"),
        ({"allowed_token_ids": ["a"]}, "allowed_token_ids has a bad value"),
        ({"bad_words": [""]}, "bad_words must be at most 1024 non-empty strings"),
        ({"bad_words": ["w"] * 1025}, "bad_words must be at most 1024"),
        ({"bad_words": [3]}, "bad_words has a bad value"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be null, -1"),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens must be"),
        ({"spaces_between_special_tokens": "perhaps"}, "spaces_between_special_tokens has a bad value"),
        ({"skip_special_tokens": []}, "skip_special_tokens has a bad value"),
        ({"guided_decoding": {"regex": "a"}, "structured_outputs": {"regex": "b"}}, "name the same thing"),
    ],
)
def test_bad_values_name_the_parameter(data, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_json_dict(data)


def test_json_coercion_of_the_new_parameters():
    params = SamplingParams.from_json_dict(
        {
            "logit_bias": '{"5": "1.5", "7": -2}',
            "allowed_token_ids": "[1, 2]",
            "bad_words": "nope",
            "best_of": "3",
            "prompt_logprobs": "0",
            "truncate_prompt_tokens": 4,
            "spaces_between_special_tokens": "false",
        }
    )
    assert params.logit_bias == {5: 1.5, 7: -2.0} and params.allowed_token_ids == [1, 2]
    assert (params.bad_words, params.best_of, params.prompt_logprobs) == (["nope"], 3, 0)
    assert params.truncate_prompt_tokens == 4 and params.spaces_between_special_tokens is False


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (dict(logit_bias={600: 1.0}), r"logit_bias has token id 600, outside the vocabulary \[0, 512\)"),
        (dict(allowed_token_ids=[3, 512]), r"allowed_token_ids has token id 512, outside the vocabulary"),
        (dict(best_of=100), r"best_of must be in \[1, 8\]"),
    ],
)
def test_engine_limits_name_the_parameter(tiny_path, params, message):
    config = engine_config(tiny_path, block_size=8, num_blocks=64, device="cpu")
    config.scheduler.max_num_seqs = 8
    llm = LLM(config)
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request("bad", PROMPT, SamplingParams(**params))
    assert not llm.engine.has_unfinished_requests()
