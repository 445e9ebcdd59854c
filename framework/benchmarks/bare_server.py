"""The peer for the gRPC overhead benchmark: a bare grpcio server answering ModelInfer with a canned
``simple`` response (INT32 [1,16] add/sub of the benchmark's fixed inputs), nothing else."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
import numpy as np
from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.protocol import grpc_service_pb2_grpc as pb_grpc


class CannedServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        response = pb.ModelInferResponse(model_name="simple", model_version="1")
        for name, value in (("OUTPUT0", a + 1), ("OUTPUT1", a - 1)):
            response.outputs.add(name=name, datatype="INT32", shape=[1, 16])
            response.raw_output_contents.append(value.tobytes())
        self.response = response

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return self.response


async def main(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(CannedServicer(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"bare server listening on 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
