"""Triton-compatible protocol bindings (``inference.GRPCInferenceService``).

The ``*_pb2*`` modules here are generated from ``proto/`` by ``python -m pagedserve.protocol.generate``
and registered in the private descriptor pool :data:`POOL` rather than protobuf's default pool, so
they can coexist with tritonclient in one process. Anything that looks descriptors up by name (the
gRPC reflection service, ``json_format`` with ``Any``, ``message_factory``) must be given
:data:`POOL` explicitly.

Attributes are resolved lazily so that ``python -m pagedserve.protocol.generate`` still runs when
the generated modules are missing or broken.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from google.protobuf.descriptor_pool import DescriptorPool
    from pagedserve.protocol import grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2

    POOL: DescriptorPool
    SERVICE_NAME: str

__all__ = ["POOL", "SERVICE_NAME", "grpc_service_pb2", "grpc_service_pb2_grpc", "model_config_pb2"]

_SUBMODULES = ("grpc_service_pb2", "grpc_service_pb2_grpc", "model_config_pb2")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "POOL":
        # Importing grpc_service_pb2 adds model_config.proto (its dependency) and then
        # grpc_service.proto, so the pool is complete before anyone looks symbols up in it.
        importlib.import_module(f"{__name__}.grpc_service_pb2")
        from pagedserve.protocol._pool import POOL

        return POOL
    if name == "SERVICE_NAME":
        pb2 = importlib.import_module(f"{__name__}.grpc_service_pb2")
        return pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
