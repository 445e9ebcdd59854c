"""A checkpoint tensor that reads from its safetensors file only the part a rank keeps.

Weight loaders take this rank's part of a full tensor with ``narrow`` (see ``layers/linear.py``). Here
``narrow`` only narrows a window; the bytes are read (safetensors' ``get_slice``) when the tensor is
first used as a tensor, so each tensor-parallel rank reads its slices and never the whole tensor.
Any other use (``copy_``, ``float()``, ``reshape``...) reads the window and goes on as a tensor.
"""

from __future__ import annotations

from typing import Any

import torch

# safetensors' dtype names (``get_dtype``)
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointSlice:
    def __init__(self, source: Any, window: tuple[slice, ...] | None = None) -> None:
        """``source``: a safetensors ``get_slice`` handle; ``window``: one slice per dimension."""
        self._source = source
        full = tuple(source.get_shape())
        self._window = window if window is not None else tuple(slice(0, n) for n in full)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(w.stop - w.start for w in self._window)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self._window)

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def dtype(self) -> torch.dtype:
        dtype = _DTYPES.get(self._source.get_dtype())
        return dtype if dtype is not None else self.materialize().dtype

    def narrow(self, dim: int, start: int, length: int) -> CheckpointSlice:
        dim = dim % self.dim()
        size = self.shape[dim]
        if start < 0 or length < 0 or start + length > size:
            raise RuntimeError(f"narrow({dim}, {start}, {length}) is outside a dimension of size {size}")
        base = self._window[dim].start
        window = list(self._window)
        window[dim] = slice(base + start, base + start + length)
        return CheckpointSlice(self._source, tuple(window))

    def materialize(self) -> torch.Tensor:
        return self._source[self._window] if self._window else self._source[...]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.materialize(), name)

    def __repr__(self) -> str:
        return f"CheckpointSlice(shape={list(self.shape)})"

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return func(*_materialized(args), **_materialized(kwargs or {}))


def _materialized(value: Any) -> Any:
    if isinstance(value, CheckpointSlice):
        return value.materialize()
    if isinstance(value, (list, tuple)):
        return type(value)(_materialized(v) for v in value)
    if isinstance(value, dict):
        return {k: _materialized(v) for k, v in value.items()}
    return value
