"""Offline output tok/s of a mixture-of-experts model: our engine beside HF transformers ``generate``,
on the same random model (dummy weights) and the same prompts, greedy with EOS ignored.

On the H200: ``python -m pagedserve.benchmarks.moe --shape qwen3-30b-a3b --num-requests 256`` (or
``--shape mixtral-8x7b``). Anywhere: ``python -m pagedserve.benchmarks.moe --tiny`` runs a two-layer
Mixtral-shaped model on the CPU in seconds, to show the script works. Prints the table of
``bench`` (pagedserve.benchmarks.throughput) with the ratio of the output rates.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from pagedserve.benchmarks import hf_peers
from pagedserve.benchmarks.throughput import Row, print_rows
from pagedserve.benchmarks.workload import BenchRequest, standard_workload
from pagedserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig

_COMMON = {"hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
SHAPES: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": {
        **_COMMON,
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "dtype": "bfloat16",
    },
    "qwen3-30b-a3b": {
        **_COMMON,
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "dtype": "bfloat16",
    },
}
TINY = {
    **SHAPES["mixtral-8x7b"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "dtype": "float32",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral-8x7b")
    parser.add_argument("--tiny", action="store_true", help="a two-layer Mixtral shape, CPU-sized")
    parser.add_argument("--num-requests", type=int, default=None, help="default 256, 8 with --tiny")
    parser.add_argument("--device", default=None, help="default cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--hf-batch-size", type=int, default=64, help="static batch of the HF peer")
    parser.add_argument("--no-peer", action="store_true", help="our engine only")
    return parser.parse_args(argv)


def workload(args: argparse.Namespace, vocab_size: int) -> list[BenchRequest]:
    if args.tiny:
        return standard_workload(args.num_requests or 8, vocab_size, (16, 64), (8, 32))
    return standard_workload(args.num_requests or 256, vocab_size)


def run_engine(model_dir: Path, requests: list[BenchRequest], device: str, dtype: str) -> Row:
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.sampling_params import SamplingParams

    cache = CacheConfig(num_blocks=512) if device == "cpu" else CacheConfig()
    config = EngineConfig(
        model=str(model_dir),
        load_format="dummy",
        device=device,
        dtype=dtype,
        cache=cache,
        scheduler=SchedulerConfig(max_num_seqs=256),
    )
    llm = LLM(config)
    prompts = [r.prompt_token_ids for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    # the same prompts with short outputs first: Triton compiles for these batch shapes outside the timing
    llm.generate(prompts, [SamplingParams(max_tokens=2, ignore_eos=True) for _ in requests])
    hf_peers._sync(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    hf_peers._sync(device)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(p) for p in prompts)
    label = f"dummy weights, {dtype}, attention={llm.engine.attention_backend}"
    del llm, outputs
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return Row("pagedserve", len(requests), produced, seconds, produced + prompt_tokens, label)


def run_hf(
    hf_config: dict[str, Any], requests: list[BenchRequest], device: str, dtype: str, batch_size: int
) -> Row:
    model = hf_peers.load_hf_model(None, hf_config, device, getattr(torch, dtype))
    warm = [BenchRequest(r.prompt_token_ids, 2) for r in requests[:batch_size]]
    hf_peers.run_hf_generate(model, warm, batch_size, device)
    useful, seconds = hf_peers.run_hf_generate(model, requests, batch_size, device)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    experts = getattr(model.config, "_experts_implementation", "?")
    settings = f"generate, static batch {batch_size}, sdpa, experts={experts}"
    return Row("hf_generate", len(requests), useful, seconds, useful + prompt_tokens, settings)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    hf_config = dict(TINY if args.tiny else SHAPES[args.shape], dtype=dtype)
    requests = workload(args, hf_config["vocab_size"])
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as directory:
        model_dir = Path(directory)
        (model_dir / "config.json").write_text(json.dumps(hf_config))  # shape only: dummy weights
        rows = [run_engine(model_dir, requests, device, dtype)]
    if not args.no_peer:
        rows.append(run_hf(hf_config, requests, device, dtype, args.hf_batch_size))
    shape = "tiny mixtral" if args.tiny else args.shape
    print(f"{shape} on {device}: {len(requests)} requests")
    print_rows(rows, None)
    return rows


if __name__ == "__main__":
    main()
