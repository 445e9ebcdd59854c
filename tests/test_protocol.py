"""The protocol bindings: up to date, wire-identical to Triton's, and able to share a process with
tritonclient (whose generated modules register the same symbols in protobuf's default pool)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent import futures

import grpc
import pytest
import tritonclient.grpc as tritonclient_grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from pagedserve import protocol
from pagedserve.protocol import generate
from pagedserve.protocol import grpc_service_pb2 as ours_svc
from pagedserve.protocol import grpc_service_pb2_grpc as ours_grpc
from pagedserve.protocol import model_config_pb2 as ours_mc
from tritonclient.grpc import model_config_pb2 as triton_mc
from tritonclient.grpc import service_pb2 as triton_svc

# --------------------------------------------------------------------------------------------
# Descriptor comparison


def _label(field) -> str:
    if field.is_repeated:
        return "repeated"
    return "required" if field.is_required else "optional"


def _field_sig(field) -> dict:
    return {
        "number": field.number,
        "type": field.type,
        "label": _label(field),
        "message_type": field.message_type.full_name if field.message_type else None,
        "enum_type": field.enum_type.full_name if field.enum_type else None,
        "oneof": field.containing_oneof.name if field.containing_oneof else None,
        "has_presence": field.has_presence,
        "json_name": field.json_name,
    }


def _compare_keys(where: str, ours, theirs, diffs: list[str]) -> list[str]:
    """Record names only one side has; return the shared ones. (upb mappings' keys() are lists.)"""
    o_keys, t_keys = set(ours.keys()), set(theirs.keys())
    for name in sorted(t_keys - o_keys):
        diffs.append(f"{where}: missing {name!r}")
    for name in sorted(o_keys - t_keys):
        diffs.append(f"{where}: extra {name!r} (not in Triton's schema)")
    return sorted(o_keys & t_keys)


def _compare_enum(ours, theirs, diffs: list[str]) -> None:
    where = f"enum {theirs.full_name}"
    if ours.full_name != theirs.full_name:
        diffs.append(f"{where}: full name is {ours.full_name}")
    o_vals = {v.name: v.number for v in ours.values}
    t_vals = {v.name: v.number for v in theirs.values}
    for name in _compare_keys(where, o_vals, t_vals, diffs):
        if o_vals[name] != t_vals[name]:
            diffs.append(f"{where}.{name}: number {o_vals[name]} != {t_vals[name]}")


def _compare_message(ours, theirs, diffs: list[str]) -> None:
    where = f"message {theirs.full_name}"
    if ours.full_name != theirs.full_name:
        diffs.append(f"{where}: full name is {ours.full_name}")
    if ours.GetOptions().map_entry != theirs.GetOptions().map_entry:
        diffs.append(f"{where}: map_entry differs")

    for name in _compare_keys(f"{where} field", ours.fields_by_name, theirs.fields_by_name, diffs):
        o_sig = _field_sig(ours.fields_by_name[name])
        t_sig = _field_sig(theirs.fields_by_name[name])
        for key in t_sig:
            if o_sig[key] != t_sig[key]:
                diffs.append(f"{where}.{name}: {key} {o_sig[key]!r} != Triton's {t_sig[key]!r}")

    o_oneofs = {o.name: sorted(f.name for f in o.fields) for o in ours.oneofs}
    t_oneofs = {o.name: sorted(f.name for f in o.fields) for o in theirs.oneofs}
    for name in _compare_keys(f"{where} oneof", o_oneofs, t_oneofs, diffs):
        if o_oneofs[name] != t_oneofs[name]:
            diffs.append(f"{where} oneof {name}: members {o_oneofs[name]} != {t_oneofs[name]}")

    # Nested types include the synthesized map-entry messages, so map key/value types are checked too.
    for name in _compare_keys(
        f"{where} nested", ours.nested_types_by_name, theirs.nested_types_by_name, diffs
    ):
        _compare_message(ours.nested_types_by_name[name], theirs.nested_types_by_name[name], diffs)
    for name in _compare_keys(f"{where} enum", ours.enum_types_by_name, theirs.enum_types_by_name, diffs):
        _compare_enum(ours.enum_types_by_name[name], theirs.enum_types_by_name[name], diffs)


def _compare_service(ours, theirs, diffs: list[str]) -> None:
    where = f"service {theirs.full_name}"
    if ours.full_name != theirs.full_name:
        diffs.append(f"{where}: full name is {ours.full_name}")
    o_methods = {m.name: m for m in ours.methods}
    t_methods = {m.name: m for m in theirs.methods}
    for name in _compare_keys(f"{where} method", o_methods, t_methods, diffs):
        o, t = o_methods[name], t_methods[name]
        for attr in ("full_name",):
            if getattr(o, attr) != getattr(t, attr):
                diffs.append(f"{where}.{name}: {attr} {getattr(o, attr)!r} != {getattr(t, attr)!r}")
        if o.input_type.full_name != t.input_type.full_name:
            diffs.append(f"{where}.{name}: input {o.input_type.full_name} != {t.input_type.full_name}")
        if o.output_type.full_name != t.output_type.full_name:
            diffs.append(f"{where}.{name}: output {o.output_type.full_name} != {t.output_type.full_name}")
        for attr in ("client_streaming", "server_streaming"):
            if getattr(o, attr) != getattr(t, attr):
                diffs.append(f"{where}.{name}: {attr} {getattr(o, attr)} != {getattr(t, attr)}")


def compare_files(ours, theirs) -> list[str]:
    """All differences that matter on the wire (or in JSON/text format) between two file descriptors."""
    diffs: list[str] = []
    where = f"file {theirs.name}"
    if ours.name != theirs.name:
        diffs.append(f"{where}: name is {ours.name}")
    if ours.package != theirs.package:
        diffs.append(f"{where}: package {ours.package!r} != {theirs.package!r}")
    o_proto, t_proto = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
    ours.CopyToProto(o_proto)
    theirs.CopyToProto(t_proto)
    if o_proto.syntax != t_proto.syntax:
        diffs.append(f"{where}: syntax {o_proto.syntax!r} != {t_proto.syntax!r}")
    if [d.name for d in ours.dependencies] != [d.name for d in theirs.dependencies]:
        diffs.append(f"{where}: dependencies differ")
    for name in _compare_keys(
        f"{where} message", ours.message_types_by_name, theirs.message_types_by_name, diffs
    ):
        _compare_message(ours.message_types_by_name[name], theirs.message_types_by_name[name], diffs)
    for name in _compare_keys(f"{where} enum", ours.enum_types_by_name, theirs.enum_types_by_name, diffs):
        _compare_enum(ours.enum_types_by_name[name], theirs.enum_types_by_name[name], diffs)
    for name in _compare_keys(f"{where} service", ours.services_by_name, theirs.services_by_name, diffs):
        _compare_service(ours.services_by_name[name], theirs.services_by_name[name], diffs)
    return diffs


# --------------------------------------------------------------------------------------------
# Generated code


def test_generated_code_is_current():
    proc = subprocess.run(
        [sys.executable, "-m", "pagedserve.protocol.generate", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_detects_stale_files(tmp_path):
    generate.write(tmp_path)
    assert generate.check(tmp_path) == []
    stale = tmp_path / "grpc_service_pb2.py"
    stale.write_text(stale.read_text() + "\n# hand edit\n")
    problems = generate.check(tmp_path)
    assert len(problems) == 1 and "grpc_service_pb2.py" in problems[0]


def test_generated_modules_use_the_private_pool():
    pool = protocol.POOL
    assert pool is not descriptor_pool.Default()
    assert ours_svc.DESCRIPTOR.pool is pool
    assert ours_mc.DESCRIPTOR.pool is pool
    assert pool.FindFileByName("model_config.proto") is ours_mc.DESCRIPTOR
    assert pool.FindMessageTypeByName("inference.ModelInferRequest") is ours_svc.ModelInferRequest.DESCRIPTOR
    assert protocol.SERVICE_NAME == "inference.GRPCInferenceService"
    # Classes belong to our package (pickling and reprs depend on it), not to tritonclient's.
    assert ours_svc.ModelInferRequest.__module__ == "pagedserve.protocol.grpc_service_pb2"
    assert ours_svc.ModelInferRequest is not triton_svc.ModelInferRequest


# --------------------------------------------------------------------------------------------
# Wire compatibility


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(ours_mc, triton_mc), (ours_svc, triton_svc)],
    ids=["model_config.proto", "grpc_service.proto"],
)
def test_descriptors_match_tritonclient(ours, theirs):
    diffs = compare_files(ours.DESCRIPTOR, theirs.DESCRIPTOR)
    assert diffs == [], "\n".join(diffs)


def test_service_has_all_twenty_rpcs():
    service = ours_svc.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert len(service.methods) == 20
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
    servicer = ours_grpc.GRPCInferenceServiceServicer
    assert all(hasattr(servicer, m.name) for m in service.methods)


def _mutated_pool(mutate) -> descriptor_pool.DescriptorPool:
    """A fresh pool holding our two files after ``mutate(file_protos)`` edited them."""
    protos = {}
    for module in (ours_mc, ours_svc):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        protos[proto.name] = proto
    mutate(protos)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(protos["model_config.proto"])
    pool.Add(protos["grpc_service.proto"])
    return pool


def _msg(proto, name):
    return next(m for m in proto.message_type if m.name == name)


def _field(message, name):
    return next(f for f in message.field if f.name == name)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda p: setattr(
                _field(_msg(p["grpc_service.proto"], "ModelInferRequest"), "raw_input_contents"), "number", 8
            ),
            "inference.ModelInferRequest.raw_input_contents: number 8 != Triton's 7",
        ),
        (
            lambda p: setattr(
                _field(_msg(p["model_config.proto"], "ModelConfig"), "max_batch_size"),
                "type",
                descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
            ),
            "inference.ModelConfig.max_batch_size: type",
        ),
        (
            lambda p: _field(_msg(p["grpc_service.proto"], "InferParameter"), "uint64_param").ClearField(
                "oneof_index"
            ),
            "inference.InferParameter.uint64_param: oneof None != Triton's 'parameter_choice'",
        ),
        (
            lambda p: setattr(
                next(m for m in p["grpc_service.proto"].service[0].method if m.name == "ModelStreamInfer"),
                "server_streaming",
                False,
            ),
            "ModelStreamInfer: server_streaming False != True",
        ),
        (
            lambda p: setattr(p["model_config.proto"].enum_type[0].value[13], "number", 15),
            "inference.DataType.TYPE_STRING: number 15 != 13",
        ),
    ],
    ids=["field-number", "field-type", "oneof", "streaming", "enum-value"],
)
def test_comparison_catches_breakage(mutate, expected):
    pool = _mutated_pool(mutate)
    diffs = compare_files(pool.FindFileByName("grpc_service.proto"), triton_svc.DESCRIPTOR)
    diffs += compare_files(pool.FindFileByName("model_config.proto"), triton_mc.DESCRIPTOR)
    assert any(expected in d for d in diffs), "\n".join(diffs) or "no differences found"


def _sample_request(module):
    req = module.ModelInferRequest(model_name="vllm_model", model_version="1", id="req-7")
    req.parameters["priority"].uint64_param = 3
    req.parameters["temperature"].double_param = 0.5
    req.parameters["sequence_start"].bool_param = True
    text = req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text.parameters["shared_memory_offset"].int64_param = 16
    req.inputs.add(name="ids", datatype="INT32", shape=[2]).contents.int_contents.extend([1, -2])
    req.outputs.add(name="text_output").parameters["classification"].int64_param = 2
    req.raw_input_contents.append(b"\x02\x00\x00\x00hi")
    return req


def test_messages_roundtrip_both_ways():
    ours = _sample_request(ours_svc)
    theirs = _sample_request(triton_svc)
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)

    parsed_by_triton = triton_svc.ModelInferRequest.FromString(ours.SerializeToString())
    assert parsed_by_triton == theirs
    parsed_by_us = ours_svc.ModelInferRequest.FromString(theirs.SerializeToString())
    assert parsed_by_us == ours
    assert parsed_by_us.parameters["priority"].WhichOneof("parameter_choice") == "uint64_param"

    response = triton_svc.ModelStreamInferResponse()
    response.infer_response.id = "req-7"
    response.infer_response.parameters["triton_final_response"].bool_param = True
    response.infer_response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    response.infer_response.raw_output_contents.append(b"")
    ours_resp = ours_svc.ModelStreamInferResponse.FromString(response.SerializeToString())
    assert ours_resp.infer_response.parameters["triton_final_response"].bool_param
    assert len(ours_resp.infer_response.raw_output_contents) == 1


def test_model_config_roundtrip_both_ways():
    from google.protobuf import json_format, text_format

    pbtxt = textwrap.dedent(
        """
        name: "simple_dyna_sequence"
        max_batch_size: 8
        sequence_batching {
          max_sequence_idle_microseconds: 10000000
          oldest { max_candidate_sequences: 1024 max_queue_delay_microseconds: 10000 }
          control_input [
            { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
            { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
          ]
        }
        input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] optional: true } ]
        instance_group [ { count: 2 kind: KIND_CPU } ]
        parameters { key: "execute_delay_ms" value { string_value: "3" } }
        model_transaction_policy { decoupled: true }
        """
    )
    ours = text_format.Parse(pbtxt, ours_mc.ModelConfig())
    theirs = text_format.Parse(pbtxt, triton_mc.ModelConfig())
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    assert triton_mc.ModelConfig.FromString(ours.SerializeToString()) == theirs
    assert json_format.MessageToDict(ours) == json_format.MessageToDict(theirs)
    assert ours.WhichOneof("scheduling_choice") == "sequence_batching"


# --------------------------------------------------------------------------------------------
# Coexistence in one process, in both import orders (needs fresh interpreters)

_COEXIST_SCRIPT = """
import sys
if sys.argv[1] == "triton-first":
    import tritonclient.grpc
    from pagedserve.protocol import grpc_service_pb2 as ours
else:
    from pagedserve.protocol import grpc_service_pb2 as ours
    import tritonclient.grpc
from google.protobuf import descriptor_pool
from tritonclient.grpc import service_pb2 as theirs
assert theirs.DESCRIPTOR.pool is descriptor_pool.Default()
assert ours.DESCRIPTOR.pool is not descriptor_pool.Default()
default_file = descriptor_pool.Default().FindFileContainingSymbol("inference.ModelInferRequest")
assert default_file is theirs.DESCRIPTOR, default_file
req = ours.ModelInferRequest(model_name="m", id="1", raw_input_contents=[b"x"])
req.parameters["k"].string_param = "v"
back = theirs.ModelInferRequest.FromString(req.SerializeToString())
assert back.parameters["k"].string_param == "v" and back.raw_input_contents == [b"x"]
assert ours.ModelInferRequest.FromString(back.SerializeToString()) == req
print("OK")
"""


@pytest.mark.parametrize("order", ["triton-first", "ours-first"])
def test_coexists_with_tritonclient(order):
    proc = subprocess.run(
        [sys.executable, "-c", _COEXIST_SCRIPT, order], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# The private pool works for server reflection, and tritonclient can call the generated service


class _Servicer(ours_grpc.GRPCInferenceServiceServicer):
    def ServerLive(self, request, context):
        return ours_svc.ServerLiveResponse(live=True)

    def ModelInfer(self, request, context):
        response = ours_svc.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.outputs.add(name="OUT", datatype="INT32", shape=[1])
        response.raw_output_contents.append((7).to_bytes(4, "little"))
        return response


@pytest.fixture
def server():
    from grpc_reflection.v1alpha import reflection

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ours_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(), srv)
    reflection.enable_server_reflection(
        [protocol.SERVICE_NAME, reflection.SERVICE_NAME], srv, pool=protocol.POOL
    )
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        srv.stop(None)


def test_reflection_serves_private_pool(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert protocol.SERVICE_NAME in db.get_services()
        remote = descriptor_pool.DescriptorPool(db)
        service = remote.FindServiceByName(protocol.SERVICE_NAME)
        assert len(service.methods) == 20
        diffs = compare_files(service.file, triton_svc.DESCRIPTOR)
        diffs += compare_files(remote.FindFileByName("model_config.proto"), triton_mc.DESCRIPTOR)
        assert diffs == [], "\n".join(diffs)


def test_tritonclient_talks_to_generated_service(server):
    import numpy as np

    client = tritonclient_grpc.InferenceServerClient(server)
    try:
        assert client.is_server_live()
        inp = tritonclient_grpc.InferInput("IN", [1], "INT32")
        inp.set_data_from_numpy(np.array([1], dtype=np.int32))
        result = client.infer("m", [inp], request_id="abc")
        assert result.get_response().id == "abc"
        assert result.as_numpy("OUT").tolist() == [7]
    finally:
        client.close()
