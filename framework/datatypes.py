"""Tensor datatypes across the three spellings: protocol strings, config enums and numpy dtypes."""

from __future__ import annotations

import numpy as np
from pagedserve.protocol import model_config_pb2

# Protocol string -> (config enum name, numpy dtype). BYTES travels as object arrays of ``bytes``.
_TABLE: dict[str, tuple[str, np.dtype]] = {
    "BOOL": ("TYPE_BOOL", np.dtype(np.bool_)),
    "UINT8": ("TYPE_UINT8", np.dtype(np.uint8)),
    "UINT16": ("TYPE_UINT16", np.dtype(np.uint16)),
    "UINT32": ("TYPE_UINT32", np.dtype(np.uint32)),
    "UINT64": ("TYPE_UINT64", np.dtype(np.uint64)),
    "INT8": ("TYPE_INT8", np.dtype(np.int8)),
    "INT16": ("TYPE_INT16", np.dtype(np.int16)),
    "INT32": ("TYPE_INT32", np.dtype(np.int32)),
    "INT64": ("TYPE_INT64", np.dtype(np.int64)),
    "FP16": ("TYPE_FP16", np.dtype(np.float16)),
    "FP32": ("TYPE_FP32", np.dtype(np.float32)),
    "FP64": ("TYPE_FP64", np.dtype(np.float64)),
    "BYTES": ("TYPE_STRING", np.dtype(np.object_)),
    # numpy has no bfloat16: BF16 tensors stay as raw 16-bit words.
    "BF16": ("TYPE_BF16", np.dtype(np.uint16)),
}
_FROM_CONFIG = {config: proto for proto, (config, _) in _TABLE.items()}

PROTOCOL_TYPES = tuple(_TABLE)


def from_config(enum_name: str) -> str:
    """``TYPE_INT32`` -> ``INT32``."""
    return _FROM_CONFIG.get(enum_name, "<invalid>")


def of_tensor(tensor: model_config_pb2.ModelInput | model_config_pb2.ModelOutput) -> str:
    """Protocol datatype of a config input or output."""
    return from_config(model_config_pb2.DataType.Name(tensor.data_type))


def to_config(datatype: str) -> str:
    return _TABLE[datatype][0]


def numpy_dtype(datatype: str) -> np.dtype:
    return _TABLE[datatype][1]


def element_size(datatype: str) -> int:
    """Bytes per element of a fixed-size type (BYTES has none)."""
    if datatype == "BYTES":
        raise ValueError("BYTES elements have no fixed size")
    return _TABLE[datatype][1].itemsize


def from_numpy(dtype: np.dtype) -> str:
    if dtype == np.object_ or dtype.kind in "SU":
        return "BYTES"
    for name, (_, candidate) in _TABLE.items():
        if candidate == dtype and name != "BF16":
            return name
    raise ValueError(f"unsupported numpy dtype {dtype}")


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES wire format: each element as a 4-byte little-endian length, then its bytes."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(len(data).to_bytes(4, "little"))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(buffer: bytes | memoryview) -> list[bytes]:
    """Inverse of :func:`serialize_bytes`; raises ``ValueError`` (with the offset) on a truncated buffer."""
    view = memoryview(buffer)
    items: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise ValueError(f"expecting 4 bytes but only {len(view) - offset} bytes available")
        length = int.from_bytes(view[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(view):
            raise ValueError(
                f"expecting {length} bytes for element {len(items)} but only {len(view) - offset} available"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return items


def to_raw(array: np.ndarray, datatype: str) -> bytes | memoryview:
    """``array`` in the wire format of ``datatype``: a flat byte view of the array itself when it is
    already laid out that way (no copy: a large tensor is copied once, where the response is
    serialized), else ``bytes``. The view is only valid while the model leaves the array alone."""
    if datatype == "BYTES":
        return serialize_bytes(array)
    wire = numpy_dtype(datatype).newbyteorder("<")
    if array.dtype == wire and array.flags.c_contiguous:
        return memoryview(array.reshape(-1).view(np.uint8))
    return array.astype(wire, copy=False).tobytes(order="C")
