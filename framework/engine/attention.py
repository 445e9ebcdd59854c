"""The paged-attention seam: the backend contract, the per-step metadata, and backend selection.

KV cache layout (fixed; every backend reads and writes it): per layer, ``k_cache`` and ``v_cache``
each of shape ``[num_blocks, block_size, num_kv_heads, head_dim]``. Token ``t`` of a sequence lives
in slot ``block_table[t // block_size] * block_size + t % block_size``. A slot of ``-1`` in
``slot_mapping`` means "do not store" (padding rows).

The caches may hold a narrower element type than ``q``/``key``/``value`` (``cache.dtype=fp8``:
``torch.float8_e4m3fn`` or ``torch.float8_e5m2``, one byte per element, scale fixed at 1.0), so
backends convert both ways: ``store_kv`` clamps to the cache type's largest finite value
(:func:`kv_saturation_limit`) and then casts, so large values saturate instead of becoming NaN or
infinite; ``prefill`` and ``decode`` upcast what they read to ``q``'s dtype and return ``q``'s dtype.

Two per-layer options change the scores (both backends honour them):

* ``sliding_window=W``: a query at position ``p`` sees only keys at positions in ``(p - W, p]``, i.e.
  itself and the ``W - 1`` before it. This is transformers' convention for every family that has a
  window (``sliding_window_overlay`` in ``masking_utils``: ``kv_idx > q_idx - sliding_window``; used by
  Mistral, Qwen2/3 and Gemma 2/3 alike). When every layer of a model has a window, the block manager
  frees blocks that fell wholly out of it and their block-table entries become
  :data:`~pagedserve.engine.block_manager.NO_BLOCK` (-1): backends must not read positions below
  ``p - W + 1`` (and must not let garbage there reach the output).
* ``softcap=c``: scores become ``c * tanh(score / c)`` after scaling and before the mask and softmax
  (Gemma 2's ``attn_logit_softcapping``).

The runner builds one :class:`AttentionMetadata` per step and makes it current with
:func:`attention_metadata`; each model ``Attention`` layer reads it with :func:`current_metadata`.
The first ``num_decode_tokens`` rows of the batch are single-token sequences (decode); the rest are
prefill chunks. Backends never see sequences or the scheduler.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

log = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    """Tensors describing one batch, shared by every attention layer of the step."""

    slot_mapping: torch.Tensor  # [num_tokens] int32 or int64, -1 = do not store
    num_decode_tokens: int  # rows [0, num_decode_tokens) are decodes, one token per sequence
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32
    decode_context_lens: torch.Tensor  # [num_decodes] int32, tokens including the new one
    prefill_cu_seqlens_q: torch.Tensor  # [num_prefills + 1] int32, offsets into the prefill rows
    prefill_context_lens: torch.Tensor  # [num_prefills] int32, tokens including this chunk
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int32
    max_prefill_query_len: int = 0
    max_context_len: int = 0

    @property
    def num_prefills(self) -> int:
        return self.prefill_context_lens.numel()


class AttentionBackend(ABC):
    """A paged-attention implementation. Instances are stateless; the runner creates one per engine.

    ``q`` has ``Hq`` heads and the caches ``Hkv``; ``Hq`` is a multiple of ``Hkv`` (grouped-query
    attention: query head ``h`` reads KV head ``h // (Hq // Hkv)``). Repeated K/V must never be
    materialised in the cache.
    """

    name: ClassVar[str]
    preference: ClassVar[int] = 0
    """``kernel=auto`` tries backends from the highest preference down (ties by name)."""
    supports_cuda_graphs: ClassVar[bool] = True
    """``store_kv`` and ``decode`` never read device values on the host, so the runner may capture
    decode steps in CUDA graphs (launch shapes may depend only on tensor shapes)."""

    @classmethod
    @abstractmethod
    def unsupported_reason(
        cls,
        head_dim: int,
        dtype: torch.dtype,
        block_size: int,
        device: torch.device,
        kv_cache_dtype: torch.dtype,
    ) -> str | None:
        """``None`` when this backend can serve the configuration, else a short human reason.

        ``dtype`` is the model's (``q``/``key``/``value``), ``kv_cache_dtype`` the caches' element type:
        the same, or a float8 type."""

    @abstractmethod
    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write ``key``/``value`` ``[N, Hkv, D]`` into their slots; skip rows whose slot is -1."""

    @abstractmethod
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
    ) -> torch.Tensor:
        """Causal attention for query chunks ``q`` ``[T, Hq, D]``; returns ``[T, Hq, D]``.

        Query ``i`` of sequence ``b`` sits at position ``context_lens[b] - q_len_b + i`` and attends to
        positions ``<=`` its own, all read from the cache through ``block_tables[b]`` (the chunk's own
        K/V were stored before this call). See the module docstring for ``sliding_window`` and
        ``softcap``.
        """

    @abstractmethod
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
    ) -> torch.Tensor:
        """One query per sequence, ``q`` ``[B, Hq, D]``, attending to its first ``context_lens[b]``
        cached tokens (the last ``sliding_window`` of them with a window); returns ``[B, Hq, D]``."""


class NoAttentionBackendError(RuntimeError):
    pass


def select_attention_backend(
    backends: Mapping[str, type[AttentionBackend]],
    kernel: str,
    *,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int,
    device: torch.device,
    kv_cache_dtype: torch.dtype,
) -> type[AttentionBackend]:
    """Resolve ``kernel`` (a backend name or ``auto``) to a backend class that supports the model.

    ``auto`` takes the most preferred backend (``AttentionBackend.preference``) with no objection and
    logs why each more preferred one was passed over. Failing that, the error lists every
    candidate's reason so the user can see what to change.
    """
    if kernel != "auto" and kernel not in backends:
        raise NoAttentionBackendError(
            f"kernel={kernel!r} is not a registered attention backend; registered: {sorted(backends)}"
        )
    if kernel == "auto":
        candidates = sorted(backends.items(), key=lambda item: (-item[1].preference, item[0]))
    else:
        candidates = [(kernel, backends[kernel])]
    setup = (
        f"head_dim={head_dim}, dtype={dtype}, kv_cache_dtype={kv_cache_dtype}, "
        f"block_size={block_size}, device={device}"
    )
    reasons = []
    for name, backend in candidates:
        reason = backend.unsupported_reason(head_dim, dtype, block_size, device, kv_cache_dtype)
        if reason is None:
            for passed_over in reasons:
                log.info("kernel=auto passed over attention backend %s (%s)", passed_over, setup)
            return backend
        reasons.append(f"{name}: {reason}")
    raise NoAttentionBackendError(
        f"no attention backend for kernel={kernel!r} can serve {setup}: "
        + ("; ".join(reasons) or "no backends are registered")
    )


def kv_saturation_limit(dtype: torch.dtype, kv_cache_dtype: torch.dtype) -> float | None:
    """The bound ``store_kv`` clamps ``dtype`` values to before casting them to ``kv_cache_dtype``;
    ``None`` when the cache type's range already covers every finite input."""
    limit = torch.finfo(kv_cache_dtype).max
    return limit if limit < torch.finfo(dtype).max else None


_current: contextvars.ContextVar[AttentionMetadata | None] = contextvars.ContextVar(
    "pagedserve_attention_metadata", default=None
)


@contextlib.contextmanager
def attention_metadata(metadata: AttentionMetadata) -> Iterator[None]:
    """Make ``metadata`` current for the model forward inside the ``with`` block."""
    token = _current.set(metadata)
    try:
        yield
    finally:
        _current.reset(token)


def current_metadata() -> AttentionMetadata:
    metadata = _current.get()
    if metadata is None:
        raise RuntimeError("attention layers ran outside a model step (no AttentionMetadata is set)")
    return metadata
