"""The standard offline workload shared by every throughput benchmark.

512 requests; for each, in this order, draw the prompt length (uniform in [64, 1024]), the output
length (uniform in [16, 512]) and the prompt's token ids (uniform in [1000, 100000]) from
``random.Random(0)``. Smaller vocabularies clamp the id range into the vocabulary; fewer requests
take the first N of the same stream, so a scaled-down run is a prefix of the full one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def standard_workload(
    num_requests: int = 512,
    vocab_size: int = 128256,
    prompt_len: tuple[int, int] = (64, 1024),
    output_len: tuple[int, int] = (16, 512),
    seed: int = 0,
) -> list[BenchRequest]:
    rng = random.Random(seed)
    high = min(100000, vocab_size - 1)
    low = min(1000, high // 2)
    requests = []
    for _ in range(num_requests):
        n_prompt = rng.randint(*prompt_len)
        n_output = rng.randint(*output_len)
        requests.append(BenchRequest([rng.randint(low, high) for _ in range(n_prompt)], n_output))
    return requests
