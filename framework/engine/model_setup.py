"""Start-up decisions for one engine: device, dtypes, context length, model weights, KV cache size.

Everything here runs once; the results live in :class:`ModelSetup`, never written back into the
config. With ``tensor_parallel_size > 1`` :func:`build_model` first starts the worker ranks
(:mod:`pagedserve.engine.tensor_parallel`), and every rank builds its shard with :func:`build_shard`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch
from pagedserve.engine.config import CacheConfig, EngineConfig
from pagedserve.models.hf_config import ModelArchConfig
from pagedserve.models.layers.quantization import Fp8Checkpoint, building_for
from pagedserve.models.loader import init_dummy_weights, load_weights
from pagedserve.models.parallel import kv_heads_per_rank, tp_world_size
from pagedserve.models.presets import resolve_model_source
from pagedserve.models.registry import ModelArchitecture, resolve_architecture

if TYPE_CHECKING:
    from pagedserve.engine.tensor_parallel import TensorParallelWorkers

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_KV_CACHE_DTYPES = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


@dataclass
class ModelSetup:
    model: ModelArchitecture
    arch: ModelArchConfig
    directory: Path | None
    device: torch.device
    dtype: torch.dtype
    kv_cache_dtype: torch.dtype
    max_model_len: int
    workers: TensorParallelWorkers | None = None  # rank 0's, under tensor parallelism


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, arch: ModelArchConfig, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # half precision matmuls are slow or missing on many CPUs
    if arch.dtype in ("float16", "bfloat16"):
        return _DTYPES[arch.dtype]
    return torch.bfloat16


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """``cache.dtype``: ``auto`` keeps the model's dtype, the fp8 names store one byte per element."""
    return model_dtype if name == "auto" else _KV_CACHE_DTYPES[name]


def resolve_max_model_len(requested: int | None, arch: ModelArchConfig) -> int:
    if requested is None:
        return arch.max_position_embeddings
    if requested > arch.max_position_embeddings:
        raise ValueError(
            f"max_model_len={requested} exceeds the model's max_position_embeddings "
            f"({arch.max_position_embeddings})"
        )
    return requested


def build_model(config: EngineConfig, architectures: Mapping[str, type[ModelArchitecture]]) -> ModelSetup:
    """The engine's model: one shard, or under tensor parallelism rank 0's, its workers started."""
    if config.tensor_parallel_size == 1:
        return build_shard(config, architectures)
    from pagedserve.engine.tensor_parallel import (
        TensorParallelModel,
        TensorParallelWorkers,
        check_tensor_parallel,
    )

    source = resolve_model_source(config.model, config.load_format)
    device = resolve_device(config.device)
    check_tensor_parallel(ModelArchConfig.from_hf(source.hf_config), config.tensor_parallel_size, device)
    workers = TensorParallelWorkers.start(config, architectures, device)
    try:
        try:
            setup = build_shard(replace(config, device=str(device)), architectures)
        except ValueError as exc:  # a size a layer cannot split (intermediate size, experts...)
            raise ValueError(f"engine.tensor_parallel_size={config.tensor_parallel_size}: {exc}") from None
        workers.wait_ready()
    except BaseException:
        workers.close()
        raise
    return replace(setup, model=TensorParallelModel(setup.model, workers).eval(), workers=workers)


def build_shard(config: EngineConfig, architectures: Mapping[str, type[ModelArchitecture]]) -> ModelSetup:
    """This rank's model, with its share of the weights (all of them without tensor parallelism)."""
    source = resolve_model_source(config.model, config.load_format)
    arch = ModelArchConfig.from_hf(source.hf_config)
    model_cls = resolve_architecture(architectures, arch)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, arch, device)
    kv_cache_dtype = resolve_kv_cache_dtype(config.cache.dtype, dtype)
    max_model_len = resolve_max_model_len(config.max_model_len, arch)
    # longrope picks its factor set for the context the engine serves (layers/rotary.py)
    arch = replace(arch, rope=replace(arch.rope, context_len=max_model_len))
    fp8_checkpoint = None if config.load_format == "dummy" else Fp8Checkpoint.from_hf(source.hf_config)
    with building_for(fp8_checkpoint):  # float8 checkpoints: e4m3 linears from the start
        model = _instantiate(model_cls, arch, device, dtype)
    if config.load_format == "dummy":
        init_dummy_weights(model, config.seed)
    else:
        load_weights(model, source.directory, checkpoint=fp8_checkpoint)
    if config.quantization == "fp8" or fp8_checkpoint is not None:
        check_fp8_matmuls(device)
        model.quantize_fp8_()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the bf16 weights' blocks, so the KV cache can take them
    return ModelSetup(model.eval(), arch, source.directory, device, dtype, kv_cache_dtype, max_model_len)


def check_fp8_matmuls(device: torch.device) -> None:
    """``quantization=fp8`` multiplies float8 operands: CPUs do it in software, GPUs need sm_89+."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"quantization=fp8 needs float8 matmuls (compute capability 8.9 or newer); {name} has "
            f"{capability[0]}.{capability[1]}: leave engine.quantization unset on this GPU"
        )


def _instantiate(
    model_cls: type[ModelArchitecture], arch: ModelArchConfig, device: torch.device, dtype: torch.dtype
) -> ModelArchitecture:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_cls(arch)
    finally:
        torch.set_default_dtype(previous)


def kv_bytes_per_block(arch: ModelArchConfig, block_size: int, kv_cache_dtype: torch.dtype) -> int:
    """One rank's bytes: its share of the key/value heads (under tensor parallelism)."""
    kv_heads = kv_heads_per_rank(arch.num_kv_heads, tp_world_size())
    return 2 * arch.num_layers * block_size * kv_heads * arch.head_dim * kv_cache_dtype.itemsize


def cpu_num_blocks(cache: CacheConfig, setup: ModelSetup, max_tokens_in_flight: int) -> int:
    """Blocks from a fraction of free RAM, capped at what ``max_num_seqs`` full contexts could use."""
    # the ranks' caches all come out of this machine's RAM
    per_block = kv_bytes_per_block(setup.arch, cache.block_size, setup.kv_cache_dtype) * tp_world_size()
    by_memory = int(psutil.virtual_memory().available * cache.memory_fraction) // per_block
    by_demand = -(-max_tokens_in_flight // cache.block_size)
    return max(1, min(by_memory, by_demand))


def cuda_num_blocks(cache: CacheConfig, setup: ModelSetup, peak_activation_bytes: int) -> int:
    """Blocks from ``memory_fraction`` of the GPU after weights and the profiled activation peak."""
    free, total = torch.cuda.mem_get_info(setup.device)
    budget = total * cache.memory_fraction - (total - free) - peak_activation_bytes
    num_blocks = int(budget) // kv_bytes_per_block(setup.arch, cache.block_size, setup.kv_cache_dtype)
    if num_blocks < 1:
        raise RuntimeError(
            f"no GPU memory is left for the KV cache (cache.memory_fraction="
            f"{cache.memory_fraction}); raise it, or lower scheduler.max_num_batched_tokens"
        )
    return num_blocks
