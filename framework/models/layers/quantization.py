"""Float8 weights for the linear layers (``engine.quantization=fp8``), quantized when the model loads.

Each weight row (output feature) gets its own scale, ``max|row| / 448``, and is stored in e4m3: half
the bytes of bf16, so decode steps read half the weights, and Hopper's float8 tensor cores do twice
the bf16 multiply rate. Activations are quantized the same way per token (per row of the input) just
before each matmul, so one outlier token does not flatten the others' resolution and a token's result
does not depend on what else is in the batch (up to the matmul's summation order, which varies with
the row count in the last bits). ``torch._scaled_mm`` multiplies the float8 operands and
applies both scales in its epilogue. The embedding and the LM head keep the model dtype, as vLLM's
``fp8`` quantization does: the head is one matmul per sampled token and its logits pick the tokens.

A layer whose output only feeds quantized linears (the norms before q/k/v and gate/up, SiLU·mul
before down) can write :class:`Fp8Rows` itself, in the same kernel, instead of a bf16 tensor that a
separate pass would read back to quantize.

Checkpoints published in float8 (:class:`Fp8Checkpoint`) load straight into this path: the linears are
built with e4m3 weights and the checkpoint's scales (one per tensor or per output feature become one
per output feature; ``weight_block_size`` keeps one per block, see :func:`fp8_block_linear`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from pagedserve.models.layers import fused

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# Floor for a row's scale: an all-zero row (padding) then quantizes to zeros instead of 0/0.
MIN_SCALE = 1e-12
FP8_ROWS = fused.Quantize(FP8, MIN_SCALE)


class Fp8Rows(NamedTuple):
    """A ``[M, K]`` activation of ``dtype`` already quantized: ``q * scale`` row by row."""

    q: torch.Tensor  # [M, K] e4m3
    scale: torch.Tensor  # [M, 1] float32
    dtype: torch.dtype  # the activation's own dtype, which the matmul writes


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, K]`` → e4m3 ``[M, K]`` and float32 scales ``[M, 1]`` with ``x ≈ q * scale`` row by row."""
    if fused.enabled(x):
        return fused.quantize_rows(x, FP8_ROWS)
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize(x: torch.Tensor) -> Fp8Rows:
    return Fp8Rows(*quantize_rows(x), x.dtype)


def fp8_linear(
    x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x W^T + b`` with ``W`` in e4m3 (``[N, K]``, scales ``[1, N]``) and ``x`` quantized per token."""
    rows = x if isinstance(x, Fp8Rows) else quantize(x.reshape(-1, x.shape[-1]))
    # On CUDA, row-wise scaled float8 matmuls write bfloat16 only; the CPU kernel writes any dtype.
    out_dtype = torch.bfloat16 if rows.q.is_cuda else rows.dtype
    if rows.q.shape[0] == 0:
        y = torch.empty((0, weight.shape[0]), dtype=rows.dtype, device=rows.q.device)
    else:
        y = torch._scaled_mm(
            rows.q, weight.t(), scale_a=rows.scale, scale_b=weight_scale, out_dtype=out_dtype
        ).to(rows.dtype)
    if bias is not None:
        y = y + bias
    return y if isinstance(x, Fp8Rows) else y.reshape(*x.shape[:-1], weight.shape[0])


def fp8_block_linear(
    x: torch.Tensor | Fp8Rows,
    weight: torch.Tensor,
    column_scales: torch.Tensor,
    block_k: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x W^T + b`` with ``W`` in e4m3 scaled per ``[block_n, block_k]`` block: one row-scaled float8
    matmul per block of input features (``column_scales`` ``[K / block_k, N]``: each block's scale of
    each output feature), summed in float32. ``x`` is quantized per token over all its features."""
    rows = x if isinstance(x, Fp8Rows) else quantize(x.reshape(-1, x.shape[-1]))
    out_dtype = torch.bfloat16 if rows.q.is_cuda else torch.float32
    y = torch.zeros((rows.q.shape[0], weight.shape[0]), dtype=torch.float32, device=rows.q.device)
    for j, start in enumerate(range(0, weight.shape[1], block_k) if rows.q.shape[0] else ()):
        end = min(start + block_k, weight.shape[1])
        y += torch._scaled_mm(
            rows.q[:, start:end],
            weight[:, start:end].t(),
            scale_a=rows.scale,
            scale_b=column_scales[j : j + 1],
            out_dtype=out_dtype,
        )
    y = y.to(rows.dtype)
    if bias is not None:
        y = y + bias
    return y if isinstance(x, Fp8Rows) else y.reshape(*x.shape[:-1], weight.shape[0])


@dataclass(frozen=True)
class Fp8Checkpoint:
    """How a checkpoint's ``quantization_config`` stores float8 linear weights.

    ``quant_method: fp8`` (transformers' fine-grained FP8, DeepSeek-V3 / Qwen3-FP8 style):
    ``*.weight`` e4m3 and ``*.weight_scale_inv``, the factor the weight is multiplied by (one per
    tensor, or one per ``weight_block_size`` block). ``quant_method: compressed-tensors`` with
    ``format: float-quantized`` (llm-compressor): ``*.weight`` e4m3 and ``*.weight_scale`` per tensor,
    per output channel or per block. Static activation scales (``input_scale``,
    ``activation_scale``) are read and not used: activations are quantized per token, as
    transformers' compressed-tensors layer does, which is never coarser than one scale per tensor.
    """

    method: str
    block_size: tuple[int, int] | None = None  # [output, input] features per weight scale

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Fp8Checkpoint | None:
        config = hf.get("quantization_config")
        if config is None:
            return None
        method = config.get("quant_method")
        if method == "fp8":
            return cls._from_fp8(config)
        if method == "compressed-tensors":
            return cls._from_compressed_tensors(config)
        raise ValueError(
            f"quantization_config.quant_method={method!r} is not supported; supported: 'fp8' and "
            f"'compressed-tensors' with float8 weights"
        )

    @classmethod
    def _from_fp8(cls, config: dict[str, Any]) -> Fp8Checkpoint:
        _expect(config, "fmt", ("e4m3",), default="e4m3")
        _expect(config, "scale_fmt", ("float",), default="float")
        _expect(config, "activation_scheme", ("dynamic", "static"), default="dynamic")
        return cls("fp8", _block_size(config.get("weight_block_size"), "weight_block_size"))

    @classmethod
    def _from_compressed_tensors(cls, config: dict[str, Any]) -> Fp8Checkpoint:
        _expect(config, "format", ("float-quantized", "naive-quantized"), default="float-quantized")
        if config.get("kv_cache_scheme"):
            raise ValueError("quantization_config.kv_cache_scheme (float8 KV-cache scales) is not supported")
        block_sizes = set()
        for name, group in (config.get("config_groups") or {}).items():
            key = f"config_groups.{name}"
            weights = group.get("weights") or {}
            _expect(weights, "type", ("float",), key=f"{key}.weights")
            _expect(weights, "num_bits", (8,), key=f"{key}.weights")
            _expect(weights, "strategy", ("tensor", "channel", "block"), key=f"{key}.weights")
            _expect(weights, "dynamic", (False,), default=False, key=f"{key}.weights")
            _expect(weights, "symmetric", (True,), default=True, key=f"{key}.weights")
            activations = group.get("input_activations")
            if activations:
                _expect(activations, "type", ("float",), key=f"{key}.input_activations")
                _expect(activations, "num_bits", (8,), key=f"{key}.input_activations")
            is_block = weights["strategy"] == "block"
            block_sizes.add(
                _block_size(weights.get("block_structure"), f"{key}.weights.block_structure", is_block)
            )
        if not block_sizes:
            raise ValueError("quantization_config.config_groups is empty: no float8 weights are described")
        if len(block_sizes) > 1:
            raise ValueError("quantization_config.config_groups mix block-wise and per-channel scales")
        return cls("compressed-tensors", block_sizes.pop())

    @property
    def scale_suffixes(self) -> tuple[str, ...]:
        """Checkpoint names of a weight's scale, loaded into the layer's ``weight_scale``."""
        return (".weight_scale_inv", ".weight_scale") if self.method == "fp8" else (".weight_scale",)


ACTIVATION_SCALE_SUFFIXES = (".input_scale", ".activation_scale")


def _expect(
    config: dict[str, Any],
    name: str,
    supported: tuple[object, ...],
    default: object = None,
    key: str | None = None,
) -> None:
    value = config.get(name, default)
    if value not in supported:
        where = f"quantization_config.{key + '.' if key else ''}{name}"
        raise ValueError(f"{where}={value!r} is not supported; supported: {list(supported)}")


def _block_size(value: Any, key: str, required: bool = False) -> tuple[int, int] | None:
    if value is None and not required:
        return None
    if not (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and v > 0 for v in value)
    ):
        raise ValueError(f"quantization_config.{key}={value!r} must be two positive integers [n, k]")
    if value[1] % 16:
        raise ValueError(f"quantization_config.{key}={list(value)}: the input block must be a multiple of 16")
    return value[0], value[1]


# The checkpoint format the linears being constructed load (set around the model's construction).
_building: ContextVar[Fp8Checkpoint | None] = ContextVar("fp8_checkpoint", default=None)


@contextmanager
def building_for(checkpoint: Fp8Checkpoint | None) -> Iterator[None]:
    """Linears constructed inside take e4m3 weights and ``checkpoint``'s scales, so a float8
    checkpoint never has a full-precision copy of its weights, not even an empty one."""
    token = _building.set(checkpoint)
    try:
        yield
    finally:
        _building.reset(token)


def checkpoint_being_built() -> Fp8Checkpoint | None:
    return _building.get()
