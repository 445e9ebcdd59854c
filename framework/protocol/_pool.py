"""The private descriptor pool that pagedserve's generated protocol modules register into.

tritonclient's generated modules register ``grpc_service.proto`` and ``model_config.proto`` with
the same fully-qualified symbols (``inference.ModelInferRequest``, ...) in protobuf's *default*
pool. Registering ours there too would make whichever module is imported second fail with a
duplicate-symbol error (or silently alias the other's descriptors), so ``generate.py`` rewrites our
``*_pb2.py`` to add their files here instead. The two schemas are wire-identical, so messages built
from either pool parse each other's bytes.

This module must not import the generated modules: they import it.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
