"""Running an ASGI app (the ``http`` and ``openai`` front-ends) with uvicorn inside the server's loop.

uvicorn owns HTTP parsing, keep-alive, TLS and connection draining; the front-ends only build a
starlette app over the core. The port is bound here, before uvicorn runs, so a taken port is a
:class:`~pagedserve.frontends.BindError` naming the key instead of uvicorn's ``sys.exit``, and port 0
reports the port it got.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from typing import Any, ClassVar

import uvicorn
from pagedserve.config import TlsConfig
from pagedserve.frontends import Frontend, bind_error, bind_problem


class _EmbeddedServer(uvicorn.Server):
    """uvicorn that leaves signals alone: the server's own handlers start the drain for every
    front-end at once (uvicorn would install its own and re-raise the signal when it stops)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AsgiFrontend(Frontend):
    port_key: ClassVar[str]
    """The ``server`` key holding this front-end's port, e.g. ``http_port``."""
    service: ClassVar[str]
    """What the start-up line calls it, e.g. ``HTTPService``."""

    _server: _EmbeddedServer | None = None
    _task: asyncio.Task[None] | None = None
    port = 0

    @abc.abstractmethod
    def app(self) -> Any:
        """The ASGI application to serve."""

    async def start(self) -> str:
        server = self.config.server
        sock = _listen(server.host, getattr(server, self.port_key), f"server.{self.port_key}")
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app(),
            log_config=None,
            log_level="warning",  # our own start-up line says where it listens
            access_log=False,
            lifespan="off",
            ws="none",
            server_header=False,
            # No route reads the client's address or scheme, so uvicorn's rewriting of them from a
            # trusted proxy's X-Forwarded-* headers (a middleware scanning every request's headers)
            # is skipped.
            proxy_headers=False,
            **_tls_options(server.tls),
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError(f"{self.service} stopped while starting")
            await asyncio.sleep(0.01)
        return f"{self.service} listening on {server.host}:{self.port}"

    async def stop(self, grace: float) -> None:
        if self._server is None or self._task is None:
            return
        # uvicorn stops accepting, then gives open connections this long to finish their responses.
        self._server.config.timeout_graceful_shutdown = max(grace, 0.01)
        self._server.should_exit = True
        await self._task


def _listen(host: str, port: int, key: str) -> socket.socket:
    problem = bind_problem(host, port)
    if problem is not None:
        raise bind_error(host, port, key, problem)
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise bind_error(host, port, key, error.strerror or str(error)) from error
    sock.set_inheritable(False)
    return sock


def _tls_options(tls: TlsConfig) -> dict[str, Any]:
    """The same certificate and client-certificate rule as the gRPC and metrics ports."""
    if not tls.enabled:
        return {}
    return {
        "ssl_certfile": tls.cert,
        "ssl_keyfile": tls.key,
        "ssl_ca_certs": tls.root_ca or None,
        "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE,
    }
