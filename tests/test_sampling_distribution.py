"""The sampler's draws follow the distribution that Hugging Face's logits processors define, for each
transform and each pair, applied in vLLM V1's order (bias, penalties, temperature, min-p, top-k,
top-p). Many seeded draws of one row; the total-variation distance to the float64 reference must be
small and nothing outside the reference's support may be drawn. Fixed seeds make it deterministic;
applying min-p after top-p (the order before) fails the min_p+top_p case."""

from __future__ import annotations

import itertools

import pytest
import torch
from pagedserve.engine.sampler import Sampler
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

NUM_DRAWS = 6000
MAX_TV = 0.035  # the expected distance of 6000 draws over 8 tokens is about 0.012
# Chosen so every transform is active and min-p before top-p keeps fewer tokens than after it.
PROBS = torch.tensor([0.4, 0.25, 0.2, 0.08, 0.04, 0.02, 0.007, 0.003], dtype=torch.float64)
PROMPT, OUTPUT = (1, 2), (0, 0, 3)
TRANSFORMS = {
    "temperature": {"temperature": 0.7},
    "top_k": {"top_k": 3},
    "top_p": {"top_p": 0.7},
    "min_p": {"min_p": 0.3},
    "penalties": {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.3},
    "logit_bias": {"logit_bias": {5: 2.5, 0: -1.0}},
}
CASES = [(name,) for name in TRANSFORMS] + list(itertools.combinations(TRANSFORMS, 2))


def reference(params: SamplingParams) -> torch.Tensor:
    """Float64 probabilities through HF's processors (presence/frequency, which HF lacks, in torch)."""
    scores = PROBS.log()[None, :].clone()
    input_ids = torch.tensor([PROMPT + OUTPUT])
    if params.logit_bias:
        bias = {(token,): value for token, value in params.logit_bias.items()}
        scores = SequenceBiasLogitsProcessor(bias)(input_ids, scores)
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(input_ids, scores)
    counts = torch.bincount(torch.tensor(OUTPUT), minlength=len(PROBS)).double()
    scores = scores - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).double()
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.min_p:
        warpers.append(MinPLogitsWarper(params.min_p))
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    for warper in warpers:
        scores = warper(input_ids, scores)
    return scores.softmax(dim=-1)[0]


def drawn(params: SamplingParams) -> torch.Tensor:
    seq = Sequence("r", list(PROMPT), params)
    for token in OUTPUT:
        seq.append_token(token, 0.0, None)
    logits = PROBS.log().float()[None, :].repeat(NUM_DRAWS, 1)
    samples = Sampler(len(PROBS), frozenset(), seed=1234)(logits, [seq] * NUM_DRAWS)
    counts = torch.bincount(torch.tensor([s.token_id for s in samples]), minlength=len(PROBS))
    return counts.double() / NUM_DRAWS


@pytest.mark.parametrize("case", CASES, ids=["+".join(c) for c in CASES])
def test_draws_follow_the_reference_distribution(case):
    kwargs = {key: value for name in case for key, value in TRANSFORMS[name].items()}
    params = SamplingParams(**kwargs)
    expected, empirical = reference(params), drawn(params)
    assert (empirical[expected == 0] == 0).all(), (expected, empirical)
    distance = 0.5 * (expected - empirical).abs().sum().item()
    assert distance < MAX_TV, (expected, empirical)


def test_min_p_comes_before_top_p():
    """The case that tells the orders apart: min-p first leaves mass 0.85, so top-p then keeps two
    tokens; top-p first would keep three."""
    params = SamplingParams(min_p=0.3, top_p=0.7)
    assert (reference(params) > 0).sum() == 2
    assert (drawn(params) > 0).sum() == 2
