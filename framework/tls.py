"""``server.tls`` turned into what the listeners take: gRPC server credentials and, for ``/metrics``, an
:class:`ssl.SSLContext`. The PEM files are read once, at start."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
from pagedserve.config import TlsConfig


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    root = Path(tls.root_ca).read_bytes() if tls.root_ca else None
    pair = (Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())
    return grpc.ssl_server_credentials(
        [pair], root_certificates=root, require_client_auth=tls.require_client_cert
    )


def tls_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The metrics port's TLS, the same certificate and client-certificate rule as gRPC's."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    if tls.root_ca:
        context.load_verify_locations(tls.root_ca)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return context
