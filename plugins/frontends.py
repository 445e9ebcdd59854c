"""Built-in front-ends: gRPC (Triton's GRPCInferenceService), HTTP (KServe v2 + Triton's extensions)
and the OpenAI-compatible API."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.hookspecs import hookimpl

if TYPE_CHECKING:
    from pagedserve.frontends import Frontend


@hookimpl
def pagedserve_frontends() -> list[type[Frontend]]:
    # Imported here so registering the plugin imports no server code.
    from pagedserve.frontends.grpc import GrpcFrontend
    from pagedserve.frontends.http import HttpFrontend
    from pagedserve.frontends.openai import OpenAIFrontend

    return [GrpcFrontend, HttpFrontend, OpenAIFrontend]
