"""Typed engine configuration, usable as Hydra structured configs.

Every field is a plain type OmegaConf understands. Validation happens in ``__post_init__`` and raises
``ValueError`` naming the dotted key, so a bad command-line override fails before anything loads.
Derived values (number of blocks measured from memory, resolved dtype...) never go back into these
objects; the engine keeps them in its own state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

BLOCK_SIZES = [1, 8, 16, 32, 64, 128]
DTYPES = ["auto", "float32", "float16", "bfloat16"]
LOAD_FORMATS = ["auto", "safetensors", "dummy"]
KV_CACHE_DTYPES = ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
QUANTIZATIONS = [None, "fp8"]


def check_choice(key: str, value: object, choices: list) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {choices}, got {value!r}")


def default_compile_cache_dir() -> str:
    """Compiled Triton kernels kept across server starts, beside the user's other caches."""
    return str(Path.home() / ".cache" / "pagedserve" / "triton")


def check_compile_cache_dir(key: str, value: str) -> None:
    """The folder must be one we can create or write: checked without creating it, so a bad override
    fails while the config is read, before a process starts. Empty = Triton's own default."""
    if not value:
        return
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{key} must be a folder for compiled kernels, but {value!r} is a file")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={value!r} cannot be created: {str(existing)!r} is not a writable folder")


def _check_positive(key: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")


@dataclass
class CacheConfig:
    """Paged KV cache: block size, and either a fixed block count or a memory fraction."""

    block_size: int = 16
    num_blocks: int | None = None
    memory_fraction: float = 0.9
    prefix_caching: bool = True
    dtype: str = "auto"
    """KV cache element type: ``auto`` = the model's dtype; ``fp8`` (= ``fp8_e4m3``) or ``fp8_e5m2``
    store one byte per element (values scaled by 1.0, saturated at the format's largest finite value)."""

    def __post_init__(self) -> None:
        check_choice("cache.block_size", self.block_size, BLOCK_SIZES)
        check_choice("cache.dtype", self.dtype, KV_CACHE_DTYPES)
        _check_positive("cache.num_blocks", self.num_blocks)
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"cache.memory_fraction must be in (0, 1], got {self.memory_fraction!r}")


@dataclass
class SchedulerConfig:
    """Continuous-batching budgets; ``policy`` names a registered SchedulingPolicy."""

    policy: str = "fcfs"
    max_num_seqs: int = 512  # decode CUDA graphs cover batches up to this (at most 512)
    max_num_batched_tokens: int = 8192
    chunked_prefill: bool = True
    max_waiting: int = 1024
    """Requests a model accepts beyond those producing tokens (waiting for a seat, or for their prompt
    to be tokenized or prefilled); one more is refused with UNAVAILABLE, as Triton refuses a request
    over ``max_queue_size``."""

    def __post_init__(self) -> None:
        if not self.policy:
            raise ValueError("scheduler.policy must name a scheduling policy, got an empty string")
        _check_positive("scheduler.max_num_seqs", self.max_num_seqs)
        _check_positive("scheduler.max_num_batched_tokens", self.max_num_batched_tokens)
        _check_positive("scheduler.max_waiting", self.max_waiting)


@dataclass
class EngineConfig:
    """Everything one LLM engine needs. ``model`` is a Hugging Face directory or ``tiny-llama``."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = "auto"
    kernel: str = "auto"
    cuda_graphs: bool = True
    async_scheduling: bool = True
    """On CUDA, schedule and prepare step N+1 while the device runs step N (results one step later)."""
    max_model_len: int | None = None
    quantization: str | None = None
    """``fp8``: the linear layers' weights in e4m3 with per-output-feature scales, activations
    quantized per token (pagedserve.models.layers.quantization); embedding and LM head unchanged."""
    seed: int = 0
    tensor_parallel_size: int = 1
    """Ranks that split the model's heads and weights (pagedserve.engine.tensor_parallel): this process
    and ``tensor_parallel_size - 1`` worker processes, one GPU each on CUDA."""
    cpu_threads: int | None = None
    """torch's intra-op CPU threads; ``None``: automatic (pagedserve.engine.process_setup). Thread counts
    are process-wide, so whoever owns the process applies this (the engine process, ``bench``, the server
    for an engine on its thread), never :class:`LLMEngine` itself."""
    compile_cache_dir: str = field(default_factory=default_compile_cache_dir)
    """Where Triton keeps compiled kernels (``TRITON_CACHE_DIR`` in the engine's processes), so a fresh
    server reuses the last one's; ``""``: Triton's own default."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a Hugging Face model directory (or 'tiny-llama'), got ''")
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("load_format", self.load_format, LOAD_FORMATS)
        check_choice("quantization", self.quantization, QUANTIZATIONS)
        if not self.kernel:
            raise ValueError("kernel must be 'auto' or the name of an attention backend, got ''")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        _check_positive("max_model_len", self.max_model_len)
        _check_positive("cpu_threads", self.cpu_threads)
        _check_positive("engine.tensor_parallel_size", self.tensor_parallel_size)
        check_compile_cache_dir("engine.compile_cache_dir", self.compile_cache_dir)
