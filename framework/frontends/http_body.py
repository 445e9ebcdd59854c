"""HTTP plumbing of the ``http`` front-end: errors as Triton writes them, bounded request bodies.

Knows nothing about models or tensors. A body is read chunk by chunk and refused as soon as it (or
what it inflates to) passes ``server.max_message_bytes``, so neither a huge upload nor a zip bomb
is ever held in memory; Triton's ``--http-max-input-size`` does the same job.
"""

from __future__ import annotations

import hmac
import json
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
import orjson
from pagedserve.config import ServerConfig
from pagedserve.errors import InferenceError
from starlette.responses import Response

Receive = Callable[[], Awaitable[dict[str, Any]]]

# Triton's HttpCodeFromError: what has no HTTP counterpart is a bad request.
_STATUS_OF_CODE = {
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}
_LIMIT_HINT = "Set server.max_message_bytes to increase the limit."


class HttpError(Exception):
    """A failure answered as ``{"error": message}`` with ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    @classmethod
    def of(cls, error: InferenceError) -> HttpError:
        return cls(error.message, status_of(error))


class BodyTooLarge(HttpError):
    """The body (or what it inflates to) passed the limit: Triton answers 400, OpenAI's API 413."""


class ClientGone(Exception):
    """The client closed the connection before its request was complete."""


def status_of(error: InferenceError) -> int:
    return _STATUS_OF_CODE.get(error.code, 400)


def error_response(message: str, status: int = 400, headers: Mapping[str, str] | None = None) -> Response:
    return Response(error_json(message), status, headers=headers, media_type="application/json")


def error_json(message: str) -> bytes:
    return dumps({"error": message})


def json_response(content: Any) -> Response:
    return Response(dumps(content), media_type="application/json")


def dumps(document: Any, finite: bool = False) -> bytes:
    """``document`` as compact JSON. ``finite``: it holds no NaN or infinity, so orjson may write it
    (several times faster; it would write those as null, where Python's writer keeps ``NaN``, which
    tritonclient reads back)."""
    if finite:
        return orjson.dumps(document)
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


# 19 digits in a row may be an integer past 64 bits, which orjson would read as a float. Found by
# mapping digits to "0" and the rest to " " (bytes.translate: several times faster than a regex),
# a megabyte at a time so that a large body is not copied whole.
_DIGITS = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
_LONG_RUN = b"0" * 19
_SCAN_CHUNK = 2**20


def _has_long_digit_run(data: bytes | memoryview) -> bool:
    if type(data) is bytes and len(data) <= _SCAN_CHUNK:  # the usual body: no copy, no loop
        return _LONG_RUN in data.translate(_DIGITS)
    view = memoryview(data)
    for start in range(0, len(view), _SCAN_CHUNK):
        # each chunk reaches 18 bytes into the next, so a run across the cut is still whole in one
        if _LONG_RUN in bytes(view[start : start + _SCAN_CHUNK + 18]).translate(_DIGITS):
            return True
    return False


def parse_json(data: bytes | memoryview, what: str = "request") -> Any:
    """The JSON document in ``data``; a 400 for malformed or too deeply nested JSON.

    orjson reads it when it can (several times faster); what it refuses or might read differently
    (NaN, integers past 64 bits, a byte-order mark, lone surrogates) goes to Python's reader, whose
    reading and messages are the reference."""
    if not _has_long_digit_run(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(bytes(data))
    except RecursionError:
        raise HttpError(f"failed to parse the {what} JSON buffer: nesting too deep") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise HttpError(f"failed to parse the {what} JSON buffer: {error}") from None


async def read_body(
    receive: Receive, headers: Mapping[str, str], limit: int, compressed_ok: bool = True
) -> bytes:
    """The request body, inflated when ``Content-Encoding`` is gzip or deflate, at most ``limit``
    bytes either way (checked while reading: a larger body is never held whole)."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(_too_large(int(declared), limit))
    inflater = _inflater(headers.get("content-encoding", ""), compressed_ok)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if inflater is not None and chunk:
            chunk = _inflate(inflater, chunk, limit - size, limit)
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(_too_large(size, limit))
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if inflater is not None and not inflater.eof:
        raise HttpError("failed to decompress the request body: the compressed data is truncated")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(size: int, limit: int) -> str:
    return (
        f"request body of {size} bytes exceeds the maximum allowed input size of {limit} bytes. "
        + _LIMIT_HINT
    )


def _inflater(encoding: str, compressed_ok: bool) -> Any:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if not compressed_ok:
        raise HttpError("Unsupported content-encoding, only 'identity' is supported.")
    if encoding not in ("gzip", "deflate"):
        raise HttpError("Unsupported compression type", 501)
    return zlib.decompressobj(wbits=47)  # 15 | 32: zlib or gzip header, detected as Triton does


def _inflate(inflater: Any, chunk: bytes, room: int, limit: int) -> bytes:
    """Inflate ``chunk`` without producing more than ``room`` bytes (+1 to notice the overflow)."""
    try:
        out = inflater.decompress(chunk, max(room, 0) + 1)
    except zlib.error as error:
        raise HttpError(f"failed to decompress the request body: {error}") from None
    if len(out) > room or inflater.unconsumed_tail:
        raise BodyTooLarge(
            f"Decompressed data size exceeds the maximum allowed value of {limit} bytes. " + _LIMIT_HINT
        )
    return out


def restricted_groups(server: ServerConfig) -> dict[str, tuple[str, str]]:
    """``server.restricted_protocols`` as HTTP applies them (Triton's ``--http-restricted-api``):
    group -> (header, value), the key itself being the header (gRPC prefixes it)."""
    return {
        group: (entry.key, entry.value) for entry in server.restricted_protocols for group in entry.protocols
    }


def restriction_refusal(
    restricted: Mapping[str, tuple[str, str]], group: str, headers: Mapping[str, str]
) -> str | None:
    """Why a request of ``group`` with these headers is refused (403), or None if it may go on."""
    required = restricted.get(group)
    if required is None:
        return None
    header, value = required
    sent = headers.get(header.lower())
    if sent is not None and hmac.compare_digest(sent.encode(), value.encode()):
        return None
    return f"This API is restricted, expecting header '{header}'"
