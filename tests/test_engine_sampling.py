"""Sampling through the whole engine on tiny-llama: seeds, n, stops, max_tokens, logprobs, penalties."""

from __future__ import annotations

import pytest
import torch
from pagedserve.engine.llm import LLM
from pagedserve.engine.sampler import Sampler
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence
from pagedserve.models.tiny import ensure_tiny_llama

from .engine_helpers import assert_pool_free, engine_config, gpu

PROMPTS = [
    "The scheduler hands out",
    "Prefix caching lets many requests",
    "Hello",
    "café 東京 and numbers 1 2 3",
]


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(("cpu", False), id="cpu"),
        pytest.param(("cpu", True), id="cpu-overlap"),
        pytest.param(("cuda", True), id="cuda", marks=gpu),
    ],
)
def llm(request, tmp_path_factory) -> LLM:
    """Every engine-level test runs on plain CPU steps, on CPU with step N+1 scheduled and launched
    before step N's samples are processed (what ``async_scheduling`` does on CUDA), and on a GPU."""
    device, overlap = request.param
    path = ensure_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    llm = LLM(engine_config(path, block_size=8, num_blocks=512, device=device))
    llm.engine.overlap = overlap
    return llm


@pytest.fixture(autouse=True)
def _pool_is_free_after_each_test(request):
    yield
    if "llm" in request.fixturenames:
        assert_pool_free(request.getfixturevalue("llm").engine.block_manager)


def texts(outputs) -> list[str]:
    return [o.outputs[0].text for o in outputs]


def test_seeded_sampling_does_not_depend_on_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=24)
    alone = llm.generate([PROMPTS[0]], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=n) for n in (5, 30, 12)]
    crowd = llm.generate(PROMPTS[1:] + [PROMPTS[0]], others + [seeded])[-1].outputs[0].token_ids
    assert alone == crowd
    different = llm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=24))
    assert different[0].outputs[0].token_ids != alone


def test_max_tokens_is_exact(llm):
    for n in (1, 5, 17):
        out = llm.generate(PROMPTS, SamplingParams(temperature=0.7, max_tokens=n, ignore_eos=True))
        assert all(len(o.outputs[0].token_ids) == n and o.outputs[0].finish_reason == "length" for o in out)


def test_n_sequences_share_the_prompt_and_differ(llm):
    out = llm.generate([PROMPTS[1]], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=10))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4
    again = llm.generate([PROMPTS[1]], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=10))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def _greedy(llm, prompt: str, **kwargs):
    return llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, **kwargs))[
        0
    ]


def _token_texts(llm, prompt: str, token_ids: list[int]) -> list[str]:
    tok = llm.tokenizer
    prompt_ids = tok.encode(prompt)
    pieces, previous = [], tok.decode(prompt_ids)
    for i in range(1, len(token_ids) + 1):
        text = tok.decode(prompt_ids + token_ids[:i])
        pieces.append(text[len(previous) :])
        previous = text
    return pieces


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(llm, include):
    full = _greedy(llm, PROMPTS[0]).outputs[0]
    pieces = _token_texts(llm, PROMPTS[0], full.token_ids)
    # A stop string made of the end of token 5 and the start of token 6.
    i = next(
        i
        for i in range(4, len(pieces) - 1)
        if pieces[i] and pieces[i + 1] and "\ufffd" not in pieces[i] + pieces[i + 1]
    )
    stop = pieces[i][-1] + pieces[i + 1][:1]
    out = _greedy(llm, PROMPTS[0], stop=[stop], include_stop_str_in_output=include).outputs[0]
    cut = full.text.index(stop)
    assert out.finish_reason == "stop"
    assert out.text == full.text[: cut + (len(stop) if include else 0)]


def test_streamed_deltas_add_up_to_the_text(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0.9, seed=5, max_tokens=30, stop=["ox", "e s"])
    engine.add_request("stream", PROMPTS[3], params)
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            deltas.append(output.outputs[0].text_delta)
            assert output.outputs[0].text == "".join(deltas)
            final = output
    assert final.finished and final.outputs[0].text == "".join(deltas)


def test_stop_token_ids(llm):
    full = _greedy(llm, PROMPTS[2]).outputs[0].token_ids
    stop_id = full[3]
    out = _greedy(llm, PROMPTS[2], stop_token_ids=[stop_id]).outputs[0]
    assert out.token_ids == full[: full.index(stop_id) + 1] and out.finish_reason == "stop"


def test_logprobs_and_cumulative_logprob(llm):
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=6, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 6
    for token_id, top in zip(out.token_ids, out.logprobs, strict=True):
        assert token_id in top and len(top) == 3
        assert top[token_id] == max(top.values())  # greedy picks the most likely token
    assert out.cumulative_logprob == pytest.approx(
        sum(t[i] for i, t in zip(out.token_ids, out.logprobs, strict=True))
    )


def test_truncation_to_a_single_token_is_greedy(llm):
    greedy = texts(llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12)))
    for params in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        assert (
            texts(llm.generate(PROMPTS, SamplingParams(temperature=1.5, max_tokens=12, **params))) == greedy
        )


def test_abort_frees_blocks_and_reports(llm):
    engine = llm.engine
    engine.add_request("x", PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    output = engine.abort_request("x")
    assert output.finished and output.outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()


def test_bad_requests_fail_at_add_time(llm):
    with pytest.raises(ValueError, match="model context"):
        llm.engine.add_request("long", [5] * 5000)
    llm.engine.add_request("dup", PROMPTS[0])
    with pytest.raises(ValueError, match="already in use"):
        llm.engine.add_request("dup", PROMPTS[0])
    llm.engine.abort_request("dup")


# ---- sampler units -----------------------------------------------------------------------------------


def _seq(params: SamplingParams, prompt=(1, 2), output=()) -> Sequence:
    seq = Sequence("r", list(prompt), params)
    for t in output:
        seq.append_token(t, 0.0, None)
    return seq


def test_min_tokens_masks_eos():
    sampler = Sampler(5, frozenset({4}), seed=0)
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0, 9.0]])
    assert sampler(logits.clone(), [_seq(SamplingParams(temperature=0, min_tokens=1))])[0].token_id == 1
    assert (
        sampler(logits.clone(), [_seq(SamplingParams(temperature=0, min_tokens=1), output=[3])])[0].token_id
        == 4
    )


def test_penalties_push_away_from_seen_tokens():
    sampler = Sampler(4, frozenset(), seed=0)
    logits = torch.tensor([[2.0, 1.9, 0.0, 0.0]])
    seen = dict(prompt=(0,), output=(0, 0))
    assert sampler(logits.clone(), [_seq(SamplingParams(temperature=0), **seen)])[0].token_id == 0
    for params in (dict(repetition_penalty=1.2), dict(presence_penalty=0.2), dict(frequency_penalty=0.1)):
        assert (
            sampler(logits.clone(), [_seq(SamplingParams(temperature=0, **params), **seen)])[0].token_id == 1
        )


def test_sampling_follows_the_distribution():
    sampler = Sampler(3, frozenset(), seed=0)
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    seqs = [_seq(SamplingParams(temperature=1.0)) for _ in range(4000)]
    counts = torch.bincount(torch.tensor([s.token_id for s in sampler(logits, seqs)]), minlength=3)
    torch.testing.assert_close(counts / 4000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_penalties_and_stop_tokens_through_the_engine(llm):
    """A penalised sequence sees every earlier token even when steps overlap (a huge repetition
    penalty means greedy never repeats a prompt or output token), and a sequence that stops on a
    token while the next step is being scheduled leaves cleanly."""
    full = _greedy(llm, PROMPTS[2]).outputs[0].token_ids
    params = SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=1e6, stop_token_ids=[full[2]]
    )
    outs = llm.generate(PROMPTS, params)
    for out in outs:
        tokens = out.outputs[0].token_ids
        stopped = tokens[-1] == full[2]
        assert out.outputs[0].finish_reason == ("stop" if stopped else "length")
        assert full[2] not in tokens[:-1]
        seen = set(out.prompt_token_ids)
        for token in tokens:
            assert token not in seen
            seen.add(token)
