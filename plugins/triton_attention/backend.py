"""``kernel=triton``: paged attention written in the Triton language.

Imports ``triton`` at module import; the plugin hook imports this module lazily. The wrappers only read
tensor shapes and strides (no device-to-host copies), so they can be captured in CUDA graphs: every launch
grid follows from static shapes, e.g. the decode split count from ``batch``, ``num_kv_heads`` and the
block table's width.

A float8 cache (``cache.dtype=fp8``): the kernels convert on store and on load (to fp16 for the products,
see ``kernels``); decode has launch parameters of its own.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import torch
import triton
from pagedserve.engine.attention import AttentionBackend, kv_saturation_limit

SUPPORTED_BLOCK_SIZES = (1, 8, 16, 32, 64, 128)
SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_CACHE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # besides a cache of the model's dtype
_LOG2E = 1.0 / math.log(2.0)


@dataclass(frozen=True)
class DecodeLaunch:
    """How the decode kernel is launched (per cache dtype)."""

    tile: int  # KV tokens per loop step (halved for fp32)
    warps: int
    stages: int
    programs_per_sm: int  # split sequences until about this many programs per multiprocessor


@dataclass(frozen=True)
class PrefillLaunch:
    """How the prefill kernel is launched (per cache dtype)."""

    rows: int  # rows of a query tile: query tokens x query heads of a KV group (halved for fp32)
    tile: int  # KV tokens per loop step (halved for fp32)
    warps: int
    stages: int


# Launch parameters. ``device_check.py`` (and ``fp8_decode_check.py`` for float8 caches) time alternatives
# on the GPU; these are the defaults they chose.
DECODE_LAUNCH = DecodeLaunch(tile=64, warps=4, stages=2, programs_per_sm=2)
# a float8 cache: half the bytes per tile, so longer tiles and more programs (fp8_decode_check.py sweep)
DECODE_FP8_LAUNCH = DecodeLaunch(tile=128, warps=4, stages=3, programs_per_sm=4)
DECODE_MIN_SPLIT_TOKENS = 256  # ...but give no split fewer tokens than this
DECODE_HEADS_FIRST = True  # grid order: the KV heads of one sequence run side by side
# prefill_sweep_check.py, on the offline workload's prompt mix: 0.86-0.88 (bf16 cache) and 0.70-0.74
# (float8 cache) of the time of the earlier shared choice, rows 128, tile 64, 8 warps, 2 stages
PREFILL_LAUNCH = PrefillLaunch(rows=64, tile=32, warps=4, stages=2)
PREFILL_FP8_LAUNCH = PrefillLaunch(rows=64, tile=64, warps=4, stages=2)
REDUCE_WARPS = 4
# float8 cache: products in fp16, not q's dtype; V converted by inline PTX (fp8_decode_check.py compares)
FP8_F16_DOTS = True
FP8_V_CVT_ASM = True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _interpreter_live() -> bool:
    """Triton's own library functions (``tl.cdiv``, ``tl.max``...) are built for the interpreter only when
    ``TRITON_INTERPRET=1`` was set before ``triton`` was first imported; our kernels need that too."""
    return type(triton.language.cdiv).__name__ == "InterpretedFunction"


_kernel_module: ModuleType | None = None


def _patch_interpreter_scalar_index() -> None:
    """Let Triton 3.6's CPU interpreter run ``range()`` over loaded scalars with numpy >= 2.4.

    The interpreter keeps scalars as 1-element arrays and converts them with ``int(array)``, which numpy 2.4
    made an error (triton-lang/triton#9171, fixed upstream after 3.6.0). Only the interpreter is touched.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_scalar_index_fix", False):
        return

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._scalar_index_fix = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


_INTERPRETER_FLOATS = {
    "fp8e4nv": torch.float8_e4m3fn,
    "fp8e5": torch.float8_e5m2,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


def _patch_interpreter_fp8_casts() -> None:
    """Make Triton 3.6's CPU interpreter convert to and from float8 as the GPU does.

    Its bit-level converter rounds ties away from zero, drops the carry when rounding overflows the
    mantissa (0.0303 becomes 0.0156 in e4m3), mishandles subnormals and reads NaN as a number
    (triton-lang/triton#8322); torch rounds to nearest even, as the hardware does. Only the interpreter is
    touched.
    """
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_fp_to_fp
    if getattr(original, "_torch_fp8", False):
        return

    def patched(self: Any, src: Any, dst_type: Any, rounding_mode: Any) -> Any:
        src_dtype = _INTERPRETER_FLOATS.get(src.dtype.scalar.name)
        dst_dtype = _INTERPRETER_FLOATS.get(dst_type.scalar.name)
        if (
            src_dtype is None
            or dst_dtype is None
            or not {src_dtype, dst_dtype} & set(FP8_CACHE_DTYPES)
            or rounding_mode == interpreter._ir.ROUNDING_MODE.RTZ  # torch only rounds to nearest even
        ):
            return original(self, src, dst_type, rounding_mode)
        raw = torch.from_numpy(np.ascontiguousarray(src.data).reshape(-1).view(np.uint8))
        out = raw.view(src_dtype).to(dst_dtype).view(torch.uint8).numpy()
        data = out.view(interpreter._get_np_dtype(dst_type)).reshape(src.data.shape)
        return interpreter.TensorHandle(data, dst_type.scalar)

    patched._torch_fp8 = True  # type: ignore[attr-defined]
    interpreter.InterpreterBuilder.create_fp_to_fp = patched


def _kernels() -> ModuleType:
    """The kernels module, built compiled or interpreted as ``TRITON_INTERPRET`` says now."""
    global _kernel_module
    want = _interpreting()
    mod = _kernel_module
    if mod is None or want != mod.INTERPRETED:
        if want:
            _patch_interpreter_scalar_index()
            _patch_interpreter_fp8_casts()
        mod = importlib.import_module(f"{__package__}.kernels")
        if want != mod.INTERPRETED:
            mod = importlib.reload(mod)
        _kernel_module = mod
    return mod


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache/v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim]; got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache need a unit stride on head_dim")
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    return block_size, num_kv_heads, head_dim


def _check_cache_dtype(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    if k_cache.dtype != q.dtype and k_cache.dtype not in FP8_CACHE_DTYPES:
        raise ValueError(f"cache dtype {k_cache.dtype} is neither q's ({q.dtype}) nor a float8 type")


def _f16_dots(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """A float8 cache with a 16-bit model: run the attention products in fp16 (see ``kernels``)."""
    return FP8_F16_DOTS and k_cache.dtype in FP8_CACHE_DTYPES and q.element_size() == 2


def _names(values: tuple[int, ...]) -> str:
    return ", ".join(map(str, values))


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _score_args(scale: float, softcap: float | None) -> tuple[float, float]:
    """``(qk_scale, cap_log2e)`` for the kernels: scores reach base 2 as ``qk * qk_scale`` or, soft-capped,
    as ``tanh(qk * scale / cap) * cap * log2(e)``."""
    if softcap is None:
        return float(scale) * _LOG2E, 0.0
    return float(scale) / softcap, float(softcap) * _LOG2E


def _check_options(sliding_window: int | None, softcap: float | None) -> None:
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")


class TritonAttentionBackend(AttentionBackend):
    """Paged attention over ``[num_blocks, block_size, num_kv_heads, head_dim]`` caches, in Triton."""

    name: ClassVar[str] = "triton"
    preference: ClassVar[int] = 100  # kernel=auto: the fast path wherever it runs (CUDA)
    supports_cuda_graphs: ClassVar[bool] = True  # launch grids follow tensor shapes only; no host reads

    # ------------------------------------------------------------------ capability check
    @classmethod
    def unsupported_reason(
        cls,
        head_dim: int,
        dtype: torch.dtype,
        block_size: int,
        device: torch.device | str,
        kv_cache_dtype: torch.dtype,
    ) -> str | None:
        """``None`` when these kernels run for this configuration, else why not."""
        if block_size not in SUPPORTED_BLOCK_SIZES:
            return f"block_size {block_size} not supported (supported: {_names(SUPPORTED_BLOCK_SIZES)})"
        if head_dim not in SUPPORTED_HEAD_DIMS:
            return f"head_dim {head_dim} not supported (supported: {_names(SUPPORTED_HEAD_DIMS)})"
        if dtype not in SUPPORTED_DTYPES:
            return f"dtype {dtype} not supported (float16, bfloat16, float32)"
        fp8_cache = kv_cache_dtype in FP8_CACHE_DTYPES
        if kv_cache_dtype != dtype and not fp8_cache:
            return f"kv_cache_dtype {kv_cache_dtype} not supported (the model's dtype or a float8 type)"
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                return "needs a CUDA device (none is available)"
            if _interpreting():
                return "TRITON_INTERPRET=1 is set: the kernels run on the CPU interpreter, not on CUDA"
            major, minor = torch.cuda.get_device_capability(dev)
            if major < 8:
                return f"needs compute capability 8.0 or newer (device has {major}.{minor})"
            if fp8_cache and (major, minor) < (8, 9):
                # float8 casts are instructions from Ada on; Triton's software casts round ties wrongly
                return f"a float8 KV cache needs compute capability 8.9 or newer (device has {major}.{minor})"
            return None
        if dev.type == "cpu" and _interpreting():
            if not _interpreter_live():
                return "TRITON_INTERPRET=1 was set after triton was imported; set it before the first import"
            return None
        return f"needs CUDA device (device is {dev.type}; TRITON_INTERPRET=1 runs the CPU interpreter)"

    # ------------------------------------------------------------------ (a) K/V store
    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write ``key``/``value`` ``[N, Hkv, D]`` at ``slot_mapping`` (int32 or int64; -1: skip the row)."""
        block_size, num_kv_heads, head_dim = _check_cache(k_cache, v_cache)
        n = key.shape[0]
        if key.shape != (n, num_kv_heads, head_dim) or value.shape != key.shape:
            raise ValueError(f"key/value must be [N, {num_kv_heads}, {head_dim}]; got {tuple(key.shape)}")
        if slot_mapping.shape[0] < n:
            raise ValueError("slot_mapping has fewer entries than tokens")
        if n == 0:
            return
        key, value = _unit_last(key), _unit_last(value)
        k = _kernels()
        k.store_kv_kernel[(n,)](
            key,
            value,
            k_cache,
            v_cache,
            slot_mapping,
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            num_kv_heads,
            BLOCK_SIZE=block_size,
            HEAD_DIM=head_dim,
            HEADS_PAD=_pow2_at_least(num_kv_heads),
            SATURATE=kv_saturation_limit(key.dtype, k_cache.dtype),
            num_warps=4,
        )

    # ------------------------------------------------------------------ (b) decode
    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
        *,
        sliding_window: int | None = None,
        softcap: float | None = None,
        out: torch.Tensor | None = None,
        num_splits: int | None = None,
    ) -> torch.Tensor:
        """One query token per sequence: ``q`` ``[B, Hq, D]`` over ``context_lens[b]`` cached tokens.

        Split-K: each sequence's KV range is cut into ``num_splits`` parts (by default enough to give the
        GPU several programs per multiprocessor), each part is one program per KV group, then a reduction
        kernel merges the parts. ``out`` (``[B, Hq, D]``) may be given, e.g. a CUDA-graph static buffer.
        """
        block_size, num_kv_heads, head_dim = _check_cache(k_cache, v_cache)
        batch, num_q_heads, qd = q.shape
        if qd != head_dim or num_q_heads % num_kv_heads:
            raise ValueError(f"q {tuple(q.shape)} does not fit a cache of {num_kv_heads} x {head_dim}")
        _check_cache_dtype(q, k_cache)
        _check_options(sliding_window, softcap)
        q = _unit_last(q)
        if out is None:
            out = torch.empty((batch, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
        if batch == 0:
            return out
        qpk = num_q_heads // num_kv_heads
        launch = DECODE_FP8_LAUNCH if k_cache.dtype in FP8_CACHE_DTYPES else DECODE_LAUNCH
        f16_dots = _f16_dots(q, k_cache)
        tile = launch.tile if q.element_size() < 4 else launch.tile // 2
        max_ctx = block_tables.shape[1] * block_size
        if sliding_window is not None:
            max_ctx = min(max_ctx, sliding_window + tile)  # the window may straddle one more tile
        if num_splits is None:
            if q.device.type == "cuda":
                want = triton.cdiv(
                    launch.programs_per_sm * _sm_count(q.device.index or 0), batch * num_kv_heads
                )
            else:
                want = 4
            num_splits = max(1, min(want, triton.cdiv(max_ctx, max(DECODE_MIN_SPLIT_TOKENS, tile))))
        num_splits = max(1, min(int(num_splits), triton.cdiv(max(max_ctx, 1), tile)))
        direct = num_splits == 1
        if direct:
            part_out = out
            part_lse = out
            p_strides = (0, 0, 0)
            l_strides = (0, 0)
        else:
            part_out = torch.empty(
                (batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
            )
            part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
            p_strides = (part_out.stride(0), part_out.stride(1), part_out.stride(2))
            l_strides = (part_lse.stride(0), part_lse.stride(1))
        k = _kernels()
        grid = (num_kv_heads, batch, num_splits) if DECODE_HEADS_FIRST else (batch, num_kv_heads, num_splits)
        window = sliding_window or 0
        k.decode_partition_kernel[grid](
            q,
            k_cache,
            v_cache,
            block_tables,
            context_lens,
            out,
            part_out,
            part_lse,
            *_score_args(scale, softcap),
            window,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            block_tables.stride(0),
            out.stride(0),
            out.stride(1),
            *p_strides,
            *l_strides,
            num_splits,
            QPK=qpk,
            BLOCK_M=max(16, _pow2_at_least(qpk)),
            HEAD_DIM=head_dim,
            TILE=tile,
            BLOCK_SIZE=block_size,
            DIRECT=direct,
            IEEE=q.dtype == torch.float32,
            UPCAST=k.INTERPRETED and q.dtype == torch.bfloat16,
            DOT_F16=f16_dots,
            V_CVT_ASM=f16_dots and FP8_V_CVT_ASM and not k.INTERPRETED,
            HEADS_FIRST=DECODE_HEADS_FIRST,
            SLIDING=sliding_window is not None,
            SOFTCAP=softcap is not None,
            num_warps=launch.warps,
            num_stages=launch.stages,
        )
        if not direct:
            k.decode_reduce_kernel[(batch, num_q_heads)](
                part_out,
                part_lse,
                context_lens,
                out,
                window,
                *p_strides,
                *l_strides,
                out.stride(0),
                out.stride(1),
                num_splits,
                TILE=tile,
                HEAD_DIM=head_dim,
                SPLITS_PAD=_pow2_at_least(num_splits),
                SLIDING=sliding_window is not None,
                num_warps=REDUCE_WARPS,
            )
        return out

    # ------------------------------------------------------------------ (c) prefill / chunked prefill
    def prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
        scale: float,
        *,
        sliding_window: int | None = None,
        softcap: float | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention for packed new tokens ``q`` ``[T, Hq, D]`` of ``B`` sequences.

        Sequence ``b`` owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``; ``context_lens[b]`` counts all its
        tokens including these (already stored in the cache), so an earlier prefix (chunked prefill or a
        prefix-cache hit) is read through ``block_tables`` like the new tokens.
        """
        block_size, num_kv_heads, head_dim = _check_cache(k_cache, v_cache)
        total, num_q_heads, qd = q.shape
        if qd != head_dim or num_q_heads % num_kv_heads:
            raise ValueError(f"q {tuple(q.shape)} does not fit a cache of {num_kv_heads} x {head_dim}")
        _check_cache_dtype(q, k_cache)
        _check_options(sliding_window, softcap)
        q = _unit_last(q)
        if out is None:
            out = torch.empty((total, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
        num_seqs = cu_seqlens_q.shape[0] - 1
        if total == 0 or num_seqs <= 0:
            return out
        qpk = num_q_heads // num_kv_heads
        qpk_pad = _pow2_at_least(qpk)
        launch = PREFILL_FP8_LAUNCH if k_cache.dtype in FP8_CACHE_DTYPES else PREFILL_LAUNCH
        shrink = 2 if head_dim > 128 or q.element_size() == 4 else 1
        rows = max(launch.rows // shrink, 16, qpk_pad)
        block_q = rows // qpk_pad
        tile = max(launch.tile // shrink, 16)
        grid = (total // block_q + num_seqs, num_kv_heads)
        k = _kernels()
        k.prefill_kernel[grid](
            q,
            k_cache,
            v_cache,
            block_tables,
            cu_seqlens_q,
            context_lens,
            out,
            *_score_args(scale, softcap),
            sliding_window or 0,
            num_seqs,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            block_tables.stride(0),
            out.stride(0),
            out.stride(1),
            QPK=qpk,
            QPK_PAD=qpk_pad,
            BLOCK_Q=block_q,
            HEAD_DIM=head_dim,
            TILE=tile,
            BLOCK_SIZE=block_size,
            IEEE=q.dtype == torch.float32,
            UPCAST=k.INTERPRETED and q.dtype == torch.bfloat16,
            DOT_F16=_f16_dots(q, k_cache),
            SLIDING=sliding_window is not None,
            SOFTCAP=softcap is not None,
            num_warps=launch.warps,
            num_stages=launch.stages,
        )
        return out
