"""Config validation, SamplingParams JSON coercion (as Triton's vLLM backend), incremental detokenization."""

from __future__ import annotations

import pytest
from pagedserve.config import EngineSettings
from pagedserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.models.tiny import ensure_tiny_llama
from pagedserve.models.tokenizer import Tokenizer


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: CacheConfig(block_size=7),
            r"cache.block_size must be one of \[1, 8, 16, 32, 64, 128\], got 7",
        ),
        (lambda: CacheConfig(num_blocks=0), "cache.num_blocks must be a positive integer"),
        (lambda: CacheConfig(memory_fraction=1.5), "cache.memory_fraction"),
        (lambda: SchedulerConfig(max_num_seqs=0), "scheduler.max_num_seqs"),
        (lambda: SchedulerConfig(policy=""), "scheduler.policy"),
        (lambda: EngineConfig(model="m", dtype="float64"), "dtype must be one of"),
        (lambda: EngineConfig(model="m", load_format="pickle"), "load_format must be one of"),
        (lambda: EngineConfig(model="m", device="tpu"), "device must be"),
        (lambda: EngineConfig(model=""), "model must name"),
    ],
)
def test_config_errors_name_the_key(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_structured_config_round_trip():
    from omegaconf import OmegaConf

    node = OmegaConf.merge(OmegaConf.structured(EngineConfig), {"model": "x", "cache": {"block_size": 32}})
    config = OmegaConf.to_object(node)
    assert isinstance(config, EngineConfig) and config.cache.block_size == 32


def test_json_values_are_coerced_like_the_vllm_backend():
    params = SamplingParams.from_json_dict(
        {
            "temperature": "0.1",
            "max_tokens": "100",
            "top_p": 0.5,
            "top_k": "5",
            "ignore_eos": "true",
            "stop": "###",
            "stop_token_ids": "[3, 4]",
            "seed": "7",
            "logprobs": 2,
            "n": 2.0,
        }
    )
    assert (params.temperature, params.max_tokens, params.top_k, params.ignore_eos) == (0.1, 100, 5, True)
    assert params.stop == ["###"] and params.stop_token_ids == [3, 4] and params.seed == 7 and params.n == 2
    assert SamplingParams.from_json('{"stop": ["a", "[END]"]}').stop == ["a", "[END]"]
    assert SamplingParams.from_json_dict({"stop": "[END]"}).stop == ["[END]"]
    assert SamplingParams.from_json("").max_tokens == 16


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"temprature": 1}, "unknown sampling parameter 'temprature'"),
        ({"max_tokens": "many"}, "max_tokens has a bad value"),
        ({"ignore_eos": "maybe"}, "ignore_eos has a bad value"),
        ({"top_p": 0}, "top_p must be in"),
        ({"max_tokens": 1.5}, "max_tokens has a bad value"),
    ],
)
def test_bad_sampling_parameters_are_named(data, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_json_dict(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # Each of these passed validation and then raised inside a step, failing its neighbours.
        ({"seed": 2**64}, r"seed must be null or in \[-9223372036854775808, 18446744073709551615\]"),
        ({"seed": -(2**63) - 1}, "seed must be null or in"),
        ({"seed": 1e300}, "seed must be null or in"),
        ({"stop_token_ids": [-1000000], "min_tokens": 1}, r"stop_token_ids must be token ids in \[0, "),
        ({"logprobs": 10**9}, r"logprobs must be null or in \[0, 20\]"),
        ({"best_of": 1, "n": 2}, "best_of must be null or >= n"),
        ({"temperature": "inf"}, "temperature must be finite"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty must be finite"),
    ],
)
def test_out_of_range_sampling_parameters_name_the_allowed_range(data, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_json_dict(data)


def test_nested_or_huge_sampling_json_is_a_short_value_error():
    deep = '{"stop": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(ValueError, match="nest too deeply"):  # was a RecursionError: INTERNAL
        SamplingParams.from_json(deep)
    with pytest.raises(ValueError, match="n has a bad value") as error:
        SamplingParams.from_json_dict({"n": "9" * 100_000})
    assert len(str(error.value)) < 500  # the message does not echo what the client sent


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SchedulerConfig(max_waiting=0), "scheduler.max_waiting must be a positive integer"),
        (lambda: EngineSettings(max_prompt_bytes=0), "engine.max_prompt_bytes must be a positive integer"),
    ],
)
def test_admission_limits_name_their_key(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(ensure_tiny_llama(tmp_path_factory.mktemp("tok") / "tiny"))


@pytest.mark.parametrize("text", ["café 東京 👋 done", "plain words only", "½—über"])
def test_incremental_text_never_holds_a_broken_character(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters really are split across tokens
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hi"), SamplingParams())
    deltas = [detok.update([t], finished=i == len(ids) - 1)[0] for i, t in enumerate(ids)]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_holds_back_text_until_resolved(tokenizer):
    text = "alpha beta gamma"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [0], SamplingParams(stop=["a g"]))
    released, stopped = "", False
    for t in ids:
        delta, stopped = detok.update([t], finished=False)
        released += delta
        if stopped:
            break
    assert stopped and released == "alpha bet"
