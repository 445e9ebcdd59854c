"""Shared helpers for the engine and model tests: HF reference checkpoints, configs, fake runners."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch
from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pagedserve.engine.outputs import Sample
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.scheduler import ScheduledBatch, Scheduler
from pagedserve.engine.sequence import Sequence

# Tests that need CUDA carry the ``gpu`` marker (``pytest -m gpu`` runs them all on a GPU machine) and
# skip without CUDA. ``DEVICES`` parametrizes a test over the CPU and, marked so, the GPU.
HAS_CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=gpu)]
# Engine placements for tests of a whole engine: decode CUDA graphs run with the Triton kernels.
ENGINE_MODES = [
    pytest.param({"device": "cpu"}, id="cpu"),
    pytest.param({"device": "cuda", "kernel": "triton"}, id="cuda-triton", marks=gpu),
    pytest.param({"device": "cuda", "kernel": "torch"}, id="cuda-torch", marks=gpu),
]
# Placements for token-exact model tests: overlapped scheduling on the CPU, CUDA graphs and eager on CUDA.
MODEL_MODES = [
    pytest.param({"device": "cpu"}, id="cpu"),
    pytest.param({"device": "cpu", "overlap": True}, id="cpu-overlap"),
    pytest.param({"device": "cuda"}, id="cuda-graphs", marks=gpu),
    pytest.param({"device": "cuda", "cuda_graphs": False}, id="cuda-eager", marks=gpu),
]
# head_dim 32: on a GPU, kernel=auto takes the Triton kernels for it
D32_DIMS = dict(hidden_size=128, num_attention_heads=4, head_dim=32)
TINY_DIMS = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=320,
    max_position_embeddings=512,
    initializer_range=0.1,
)


def build_hf_checkpoint(directory: Path, arch: str = "llama", seed: int = 0, **overrides: object) -> Path:
    """Save a tiny random transformers model (float32) to ``directory``; transformers is test-only."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY_DIMS, **overrides})
    model = model_cls(config).float().eval()
    model.save_pretrained(directory)
    return directory


def hf_greedy(directory: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations from transformers, one prompt at a time (no padding effects)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    eos = set(_as_list(model.generation_config.eos_token_id))
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            results.append(_cut_after_eos(out[0, len(prompt) :].tolist(), eos))
    return results


def _as_list(value: object) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [int(value)]


def _cut_after_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def engine_config(
    model: str | Path,
    *,
    block_size: int = 16,
    num_blocks: int | None = 256,
    prefix_caching: bool = True,
    cache_dtype: str = "auto",
    max_num_batched_tokens: int = 512,
    max_num_seqs: int = 64,
    policy: str = "fcfs",
    device: str = "cpu",
    dtype: str = "float32",
    cpu_threads: int | None = 1,
    **kwargs: object,
) -> EngineConfig:
    # One CPU thread, as this test process has (conftest): an engine process then sums in the same
    # order as an in-process one, whatever the machine's core count.
    return EngineConfig(
        model=str(model),
        dtype=dtype,
        device=device,
        cpu_threads=cpu_threads,
        cache=CacheConfig(
            block_size=block_size, num_blocks=num_blocks, prefix_caching=prefix_caching, dtype=cache_dtype
        ),
        scheduler=SchedulerConfig(
            policy=policy, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
        ),
        **kwargs,
    )


def random_prompts(
    lengths: list[int], vocab_size: int, seed: int = 0, prefix: list[int] | None = None
) -> list[list[int]]:
    rng = random.Random(seed)
    # Avoid low ids: they are the special/eos tokens of the HF test configs.
    return [(prefix or []) + [rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


class FakeRunner:
    """Stands in for the model: each sampled token is a deterministic function of the sequence."""

    def __init__(self, vocab_size: int = 100) -> None:
        self.vocab_size = vocab_size
        self.batches: list[ScheduledBatch] = []

    def run(self, batch: ScheduledBatch) -> list[Sample]:
        self.batches.append(batch)
        return [Sample(self.next_token(seq), -0.5) for seq, _ in batch.sample_rows]

    def next_token(self, seq: Sequence) -> int:
        return (sum(seq.token_ids) * 31 + len(seq) * 7 + seq.index) % (self.vocab_size - 10) + 10


def run_to_completion(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 10_000) -> int:
    steps = 0
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        scheduler.postprocess(batch, runner.run(batch))
        steps += 1
        assert steps < max_steps, "the scheduler made no progress"
    return steps


def assert_pool_free(pool: BlockManager) -> None:
    assert pool.is_all_free(), f"leaked blocks: {[b for b in pool.blocks if b.ref_count]}"


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def next_tokens(llm, prompts: list[list[int]], histories: list[list[int]]) -> list[int]:  # noqa: ANN001
    """The token ``llm`` (an ``LLM``) picks after each prompt followed by each prefix of its history."""
    forced = [
        prompt + history[:j]
        for prompt, history in zip(prompts, histories, strict=True)
        for j in range(len(history))
    ]
    return [o.outputs[0].token_ids[0] for o in llm.generate(forced, greedy(1))]


def teacher_forced_agreement(llm, prompts: list[list[int]], expected: list[list[int]]) -> float:  # noqa: ANN001
    """Share of positions where ``llm`` picks the reference's next token after the reference's history."""
    wanted = [token for tokens in expected for token in tokens]
    picked = next_tokens(llm, prompts, expected)
    return sum(a == b for a, b in zip(picked, wanted, strict=True)) / len(wanted)


def assert_decode_tracks_prefill(
    llm,  # noqa: ANN001 - an LLM
    prompts: list[list[int]],
    histories: list[list[int]],
    near_tie: float,
    min_agreement: float,
) -> None:
    """``llm``'s decode steps, which wrote ``histories``, picked what its prefill of the same tokens ranks
    first, or a token the prefill ranks within ``near_tie`` (log-probability) of its first; and they
    picked exactly the prefill's token at ``min_agreement`` of the positions or more.

    Not exact equality: a decode step multiplies a different number of rows than the prefill of the
    same tokens, and matmul kernels (the CPU's included) sum in an order that depends on the row count,
    so the two paths' values differ in their last bits. Where a model rounds to float8 afterwards, a
    value that lies that close to a rounding boundary moves a whole float8 step, and on a random tiny
    model, with its many near-ties, that flips a few greedy picks, at different positions on different
    CPUs. A wrong path (a scale that depends on the batch, a cache read back wrongly) moves far more."""
    forced = [
        prompt + history[:j]
        for prompt, history in zip(prompts, histories, strict=True)
        for j in range(len(history))
    ]
    # the decode's pick must be among the prefill's top few to be a near-tie at all
    outputs = llm.generate(forced, dataclasses.replace(greedy(1), logprobs=8))
    picked = [token for history in histories for token in history]
    misses = []
    for position, (output, token) in enumerate(zip(outputs, picked, strict=True)):
        completion = output.outputs[0]
        first, ranked = completion.token_ids[0], completion.logprobs[0]
        if token != first:
            misses.append((position, token, first, ranked[first] - ranked.get(token, float("-inf"))))
    far = [miss for miss in misses if miss[3] > near_tie]
    assert not far, f"decode picks far below the prefill's (position, decode, prefill, gap): {far}"
    agreement = 1 - len(misses) / len(picked)
    assert agreement >= min_agreement, f"decode agrees with prefill at {agreement:.3f}: {misses}"
