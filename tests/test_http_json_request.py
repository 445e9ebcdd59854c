"""An ``/infer`` JSON body is decoded without building protobuf where nothing needs it, and
RequestDecoder reads the result exactly as it reads the protobuf message it stands for: the same
arrays for good bodies, the same Triton texts for bad ones."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from pagedserve.codec import NO_OPTIONS, RequestDecoder
from pagedserve.errors import InferenceError
from pagedserve.frontends import http_tensors
from pagedserve.frontends.http_body import HttpError, parse_json
from pagedserve.frontends.http_tensors import JsonInferRequest, JsonTensor, decode_infer, json_tensor_data
from pagedserve.inference import InferenceRequest, InferenceResponse
from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.repository import spec_from_document

from .recorder import Recorder

SPEC = spec_from_document(
    "m",
    {
        "name": "m",
        "backend": "python",
        "max_batch_size": 8,
        "input": [{"name": n, "data_type": "TYPE_INT32", "dims": [4]} for n in ("A", "B")],
        "output": [{"name": n, "data_type": "TYPE_INT32", "dims": [4]} for n in ("X", "Y")],
    },
)


def _input(name: str, shape: list[int], data: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "datatype": "INT32", "shape": shape, "data": data, **extra}


BODIES = {
    "plain": {"inputs": [_input("A", [1, 4], [1, 2, 3, 4]), _input("B", [1, 4], [5, 6, 7, 8])]},
    "id and outputs": {
        "id": "r7",
        "inputs": [_input("A", [2, 4], list(range(8))), _input("B", [2, 4], [0] * 8)],
        "outputs": [{"name": "Y", "parameters": {"binary_data": True}}, {"name": "X"}],
    },
    "parameters": {
        "parameters": {"priority": 3, "custom": "x"},
        "inputs": [_input("A", [1, 4], [1] * 4, parameters={"k": 1}), _input("B", [1, 4], [2] * 4)],
    },
    "wrong shape": {"inputs": [_input("A", [1, 3], [1] * 3), _input("B", [1, 4], [2] * 4)]},
    "unknown input": {"inputs": [_input("C", [1, 4], [1] * 4)]},
    "missing input": {"inputs": [_input("A", [1, 4], [1] * 4)]},
    "repeated input": {"inputs": [_input("A", [1, 4], [1] * 4)] * 2},
    "batch mismatch": {"inputs": [_input("A", [1, 4], [1] * 4), _input("B", [2, 4], [2] * 8)]},
    "wrong datatype": {"inputs": [{**_input("A", [1, 4], [1.5] * 4), "datatype": "FP32"}]},
    "unknown output": {"inputs": [_input("A", [1, 4], [1] * 4)], "outputs": [{"name": "Z"}]},
    "repeated output": {"inputs": [_input("A", [1, 4], [1] * 4)], "outputs": [{"name": "X"}] * 2},
    "uint64 timeout": {"parameters": {"timeout": 2**63}, "inputs": []},
}


def _protobuf(message: JsonInferRequest) -> pb.ModelInferRequest:
    """The protobuf ``message`` stands for."""
    out = pb.ModelInferRequest(
        model_name=message.model_name, model_version=message.model_version, id=message.id
    )
    for key, param in message.parameters.items():
        out.parameters[key].CopyFrom(param)
    for tensor in message.inputs:
        added = out.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        for key, param in tensor.parameters.items():
            added.parameters[key].CopyFrom(param)
    for output in message.outputs:
        added_output = out.outputs.add(name=output.name)
        for key, param in output.parameters.items():
            added_output.parameters[key].CopyFrom(param)
    out.raw_input_contents.extend(_wire(raw) for raw in message.raw_input_contents)
    return out


def _wire(raw: Any) -> bytes:
    """A raw entry as protobuf carries it: JSON data arrives as an array, sent little-endian."""
    if isinstance(raw, np.ndarray):
        return raw.astype(raw.dtype.newbyteorder("<")).tobytes()
    return bytes(raw)


def _outcome(message: Any) -> Any:
    try:
        target, options = RequestDecoder(SPEC, 1).decode(message, Recorder())
    except InferenceError as error:
        return ("error", error.code, error.message)
    arrays = {name: (a.dtype, a.shape, a.tolist()) for name, a in target.inputs.items()}
    return (
        arrays,
        target.requested_outputs,
        target.id,
        target.priority,
        target.parameters,
        target.batch_size,
    )


@pytest.mark.parametrize("case", sorted(BODIES))
def test_decoded_as_its_protobuf(case: str) -> None:
    body = json.dumps(BODIES[case]).encode()
    message = decode_infer(body, None, "m", "", SPEC, 2**20).message
    assert isinstance(message, JsonInferRequest)
    expected = _outcome(_protobuf(message))
    assert _outcome(decode_infer(body, None, "m", "", SPEC, 2**20).message) == expected


def test_protobuf_only_where_parameters_remain() -> None:
    message = decode_infer(json.dumps(BODIES["parameters"]).encode(), None, "m", "", SPEC, 2**20).message
    assert isinstance(message, JsonInferRequest)
    assert isinstance(message.inputs[0], pb.ModelInferRequest.InferInputTensor)
    assert isinstance(message.inputs[1], JsonTensor)
    assert dict(message.parameters) == {
        "priority": pb.InferParameter(int64_param=3),
        "custom": pb.InferParameter(string_param="x"),
    }
    plain = decode_infer(json.dumps(BODIES["id and outputs"]).encode(), None, "m", "", SPEC, 2**20).message
    assert all(isinstance(t, JsonTensor) for t in [*plain.inputs, *plain.outputs])
    assert not plain.parameters


@pytest.mark.parametrize("field", ["id", "name", "datatype"])
def test_lone_surrogate_refused_as_protobuf_refuses_it(field: str) -> None:
    """A protobuf string field refuses what UTF-8 cannot encode; the plain objects must too."""
    document: dict[str, Any] = {"inputs": [_input("A", [1, 4], [1] * 4)]}
    target = document if field == "id" else document["inputs"][0]
    target[field] = "\ud800"
    with pytest.raises(UnicodeEncodeError):
        decode_infer(json.dumps(document).encode(), None, "m", "", SPEC, 2**20)


def test_bad_json_still_http_error() -> None:
    with pytest.raises(HttpError):
        decode_infer(b'{"inputs": [', None, "m", "", SPEC, 2**20)


@pytest.mark.parametrize(
    "text",
    [
        b'{"a": [1, -2, 3.5, "x", true, null, {"b": []}], "a": 2}',
        b"[9223372036854775807, -9223372036854775808, 18446744073709551615]",
        b"[18446744073709551616, -9223372036854775809, 123456789012345678901234567890]",
        b'{"id": "12345678901234567890"}',
        b"[NaN, Infinity, -Infinity, 1e400]",
        b'"\\ud800"',
        b"\xef\xbb\xbf{}",
        b'"\xc3\xa9\\u00e9\\n"',
        b"[" * 5000 + b"]" * 5000,
        b'{"a": 1,}',
        b"\xff",
        b"",
    ],
)
def test_parse_json_reads_what_python_json_reads(text: bytes) -> None:
    """The fast reader (orjson) is only a shortcut: every document reads as Python's ``json`` reads
    it (big integers stay integers, NaN is read), and whatever Python refuses is refused."""
    try:
        expected: Any = json.loads(text)
    except (ValueError, RecursionError):
        with pytest.raises(HttpError):
            parse_json(text)
        return
    got = parse_json(memoryview(text))
    assert repr(got) == repr(expected)  # repr: NaN != NaN, and 1 == 1.0 would hide a float


def _flattened(data: Any) -> list[Any]:
    return [leaf for item in data for leaf in _flattened(item)] if isinstance(data, list) else [data]


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("INT32", [1, 2, 3, 4]),
        ("INT32", [[1, 2], [3, 4]]),
        ("INT32", [[[1], [2]], [[3], [4]]]),
        ("INT32", [[1, 2, 3], [4]]),  # ragged: only the element count counts
        ("INT32", [[1, 2], 3, [[4]]]),
        ("INT32", [True, False, 1, 0]),
        ("INT32", [1, 2, 3, True]),  # flat, plain: packed in one pass; the bool counts as 1
        ("FP32", [2.5, True, 1, 0]),
        ("INT32", [2**31, -(2**31) - 1, 2**40, -1]),  # wraps, as a C cast does
        ("UINT8", [255, 256, 0, 1]),
        ("FP32", [1, 2.5, 1e-30, 3.4e38]),
        ("FP64", [[0.1], [2], [3.3], [1e308]]),
        ("BOOL", [True, False, [True], [[False]]]),
    ],
)
def test_json_data_is_the_flattened_elements(datatype: str, data: Any) -> None:
    """numpy reads even nesting in one pass; ragged or mixed data is flattened first: either way the
    elements, in order, cast to the datatype."""
    got = json_tensor_data("A", datatype, [1, 4], data, 2**20)
    dtype = {"INT32": np.int32, "UINT8": np.uint8, "FP32": np.float32, "FP64": np.float64, "BOOL": np.bool_}
    expected = np.array(_flattened(data)).astype(dtype[datatype])
    assert got.dtype == expected.dtype and got.shape == (4,)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2, "3", 4], "expected INT32 elements"),
        ([[1, 2], ["a", "b"]], "expected INT32 elements"),
        ([1.5, 2, 3, 4], "expected INT32 elements"),
        ([1, 2, 3, 4.5], "expected INT32 elements"),
        ([True, False, True, False], "expected INT32 elements"),  # read as BOOL
        ([1, 2, None, 4], "expected INT32 elements"),
        ([1, 2, {"x": 1}, 4], "expected INT32 elements"),
        ([2**64, 1, 2, 3], "expected INT32 elements"),
        ([[1, 2], [3]], "shape does not match true shape"),
        ([[1, 2, 3], [4, 5]], "Shape does not match true shape"),
        ([[[]]] * 4, "shape does not match true shape"),
    ],
)
def test_bad_json_data_gets_tritons_text(data: Any, message: str) -> None:
    with pytest.raises(HttpError, match=message):
        json_tensor_data("A", "INT32", [1, 4], data, 2**20)


@pytest.mark.parametrize("offset", range(0, 12))
def test_a_long_integer_across_a_scan_chunk_is_still_found(
    monkeypatch: pytest.MonkeyPatch, offset: int
) -> None:
    """The digit-run scan goes a chunk at a time; a run cut by a chunk's end is found all the same."""
    from pagedserve.frontends import http_body

    monkeypatch.setattr(http_body, "_SCAN_CHUNK", 8)
    text = b"[" + b" " * offset + b"18446744073709551616]"
    assert parse_json(text) == [18446744073709551616]


NEAR_PLAIN = [
    _input("A", [1, 4], [1, 2, 3, 4]),
    _input("A", [1, 4], [[1, 2], [3, 4]]),
    _input("A", [1, 4], [True, 2, 3, 4]),
    _input("A", [1, 4], [1, 2, 3, True]),
    _input("A", [1, 4], [1, 2, 3]),
    _input("A", [1, 4], [1, 2, 3, 4, 5]),
    _input("A", [1, -4], [1, 2, 3, 4]),
    _input("A", [1, 4.0], [1, 2, 3, 4]),
    _input("A", [1, 4], [1, 2, 3, 2**40]),
    _input("A", [1, 4], [1, 2, 3, 2**70]),
    _input("A", [1, 4], [1, 2, 3, 4.5]),
    _input("A", [1, 4], [1, 2, 3, "4"]),
    _input("A", [1, 4], []),
    _input("Ä", [1, 4], [1, 2, 3, 4]),
    _input("A", [1, 4], [1, 2, 3, 4], parameters={}),
    _input("A", [1, 4], [1, 2, 3, 4], parameters={"binary_data_size": 16}),
    {**_input("A", [1, 4], [1, 2, 3, 4]), "datatype": "FP16"},
    {**_input("A", [1, 4], [1, 2, 3, 4]), "datatype": "BYTES"},
    {**_input("A", [1, 4], [1, 2, 3, 4]), "datatype": "int32"},
    {**_input("A", [1, 4], [1, 2, 3, 4]), "name": 7},
    {"name": "A", "datatype": "INT32", "shape": [1, 4]},
    [1, 2, 3, 4],
]


def _read(body: bytes) -> Any:
    try:
        message = decode_infer(body, None, "m", "", SPEC, 2**20).message
    except HttpError as error:
        return ("error", error.status, error.message)
    tensors = [(t.name, t.datatype, list(t.shape), type(t).__name__) for t in message.inputs]
    raws = [(getattr(r, "dtype", None), _wire(r)) for r in message.raw_input_contents]
    return tensors, raws


@pytest.mark.parametrize("item", NEAR_PLAIN)
def test_plain_input_shortcut_reads_as_the_full_checks(item: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    body = json.dumps({"inputs": [item, _input("B", [1, 4], [5, 6, 7, 8])]}).encode()
    short = _read(body)
    monkeypatch.setattr(http_tensors, "_plain_input", lambda item, limit: None)
    assert _read(body) == short


ANSWER_SPEC = spec_from_document(
    "m",
    {
        "name": "m",
        "backend": "python",
        "max_batch_size": 0,
        "input": [{"name": "A", "data_type": "TYPE_INT32", "dims": [-1]}],
        "output": [
            {"name": name, "data_type": f"TYPE_{datatype}", "dims": [-1]}
            for name, datatype in [
                ("I", "INT32"),
                ("B", "BOOL"),
                ("U", "UINT64"),
                ("S", "INT8"),
                ("F", "FP32"),
                ('q"uote\\', "INT16"),
            ]
        ],
    },
)
PLAIN_ANSWERS = {
    "int32 2-D": {"I": np.array([[1, -2], [3, 2**31 - 1]], dtype=np.int32)},
    "bool, uint64, int8": {
        "B": np.array([True, False]),
        "U": np.array([2**64 - 1, 0], dtype=np.uint64),
        "S": np.array([-128, 127], dtype=np.int8),
    },
    "empty and 0-d": {"I": np.zeros((0, 3), dtype=np.int32), "S": np.array(5, dtype=np.int8)},
    "not contiguous": {"I": np.arange(6, dtype=np.int32).reshape(2, 3).T},
    "escaped name": {'q"uote\\': np.array([1, 2], dtype=np.int16)},
    "an output not asked for": {"I": np.array([1], dtype=np.int32), "U": np.array([7], dtype=np.uint64)},
}
OTHER_ANSWERS = {
    "another dtype than declared": {"I": np.array([1, 2], dtype=np.int64)},
    "floats": {"F": np.array([0.1, 1e30], dtype=np.float32)},
    "a list": {"I": [1, 2]},
}


def _encode(outputs: dict[str, Any], request_id: str = "", binary: bool = False) -> tuple[bytes, bool]:
    """The answer's JSON, and whether the short path wrote it."""
    message = JsonInferRequest("m", "1")
    call = http_tensors.InferCall(message, binary_default=binary)
    wanted = [name for name in outputs if name != "U"] if "I" in outputs and "U" in outputs else list(outputs)
    request = InferenceRequest("m", 3, {}, wanted, Recorder(), id=request_id)
    response = InferenceResponse(outputs=outputs)
    short = http_tensors._plain_answer(ANSWER_SPEC, request, response, NO_OPTIONS, call)
    body = http_tensors.JsonResponseEncoder(call)(ANSWER_SPEC, request, response, NO_OPTIONS)
    return b"".join(body.parts), short is not None


@pytest.mark.parametrize("case", sorted(PLAIN_ANSWERS) + sorted(OTHER_ANSWERS))
@pytest.mark.parametrize("request_id", ["", "r1"])
def test_plain_answer_writes_the_general_paths_bytes(
    case: str, request_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    outputs = {**PLAIN_ANSWERS, **OTHER_ANSWERS}[case]
    written, short = _encode(outputs, request_id)
    assert short == (case in PLAIN_ANSWERS and not request_id)
    monkeypatch.setattr(http_tensors, "_plain_answer", lambda *args: None)
    assert _encode(outputs, request_id)[0] == written
    json.loads(written)


def test_binary_outputs_are_left_to_the_general_path() -> None:
    assert not _encode(PLAIN_ANSWERS["int32 2-D"], binary=True)[1]
