"""The Hugging Face transformers peers for the throughput benchmark, on the same model and prompts.

* ``hf_generate``: static batching with ``generate`` (left-padded batches in request order, each run
  to its longest output; only each request's own output length counts as useful).
* ``hf_continuous``: transformers' continuous batching manager with a paged cache, every request with
  its own ``max_new_tokens``.
Both are greedy with EOS disabled, as our engine runs with ``ignore_eos``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from pagedserve.benchmarks.workload import BenchRequest


def load_hf_model(directory: Path | None, hf_config: dict[str, Any], device: str, dtype: torch.dtype) -> Any:
    """The checkpoint our engine loaded, or the same architecture with random weights (dummy runs)."""
    import transformers

    if directory is not None and any(directory.glob("*.safetensors")):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation="sdpa"
        )
    else:
        config = transformers.AutoConfig.for_model(**hf_config)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation="sdpa"
            )
    return model.to(device).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def run_hf_generate(
    model: Any, requests: list[BenchRequest], batch_size: int, device: str
) -> tuple[int, float]:
    from transformers import GenerationConfig

    useful = 0
    _sync(device)
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        longest = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, request in enumerate(batch):
            ids[row, longest - len(request.prompt_token_ids) :] = torch.tensor(request.prompt_token_ids)
            mask[row, longest - len(request.prompt_token_ids) :] = 1
        new_tokens = max(r.output_len for r in batch)
        config = GenerationConfig(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        useful += sum(r.output_len for r in batch)
    _sync(device)
    return useful, time.perf_counter() - start


def run_hf_continuous(
    model: Any,
    requests: list[BenchRequest],
    device: str,
    block_size: int,
    max_batch_tokens: int,
    num_blocks: int,
) -> tuple[int, float]:
    from transformers import GenerationConfig

    # No inference_mode here: the manager's worker thread updates tensors it creates in this thread,
    # which must not be inference tensors.
    generation = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=16)
    with _continuous_manager(model, generation, block_size, max_batch_tokens, num_blocks) as manager:
        _sync(device)
        start = time.perf_counter()  # after the manager's warm-up, which is set-up cost
        pending = {
            manager.add_request(r.prompt_token_ids, request_id=f"r{i}", max_new_tokens=r.output_len)
            for i, r in enumerate(requests)
        }
        useful = 0
        # Results arrive in completion order; asking for one id at a time can miss others.
        while pending:
            result = manager.get_result(timeout=600)
            if result is None:
                raise RuntimeError(
                    f"transformers continuous batching stalled with {len(pending)} requests left"
                )
            if result.request_id in pending:
                pending.discard(result.request_id)
                useful += len(result.generated_tokens)
    _sync(device)
    return useful, time.perf_counter() - start


def _continuous_manager(
    model: Any, generation: Any, block_size: int, max_batch_tokens: int, num_blocks: int
) -> Any:
    """The continuous-batching context manager across transformers 5.x: newer releases take a
    ``ContinuousBatchingConfig`` (``page_size`` or ``block_size``), older ones read the cache sizes
    from the generation config."""
    import dataclasses
    import inspect

    sizes = {"num_blocks": num_blocks, "max_batch_tokens": max_batch_tokens}
    params = inspect.signature(model.continuous_batching_context_manager).parameters
    try:
        from transformers.generation import ContinuousBatchingConfig
    except ImportError:
        ContinuousBatchingConfig = None  # noqa: N806
    if ContinuousBatchingConfig is None or "continuous_batching_config" not in params:
        for key, value in {**sizes, "block_size": block_size}.items():
            setattr(generation, key, value)
        return model.continuous_batching_context_manager(generation_config=generation)
    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    page_key = "page_size" if "page_size" in fields else "block_size"
    known = {k: v for k, v in sizes.items() if k in fields}
    batching = ContinuousBatchingConfig(**{page_key: block_size}, **known)
    return model.continuous_batching_context_manager(
        generation_config=generation, continuous_batching_config=batching
    )
