"""Front-ends: a protocol in, calls on the shared :class:`~pagedserve.core.ServerCore` out.

Front-ends arrive through the ``pagedserve_frontends`` hook and are chosen by name in ``frontends:``
(``grpc``, ``http``, ``openai``). The server builds each one over the same core, starts them, flips
them to started once the start-up models are loaded, refreshes their health, and on shutdown drains
them all before the models stop.
"""

from __future__ import annotations

import abc
import socket
from typing import ClassVar

from pagedserve.config import ServeConfig
from pagedserve.core import ServerCore


class BindError(OSError):
    """A front-end's port could not be bound; the message names the address and the key to change."""


class Frontend(abc.ABC):
    name: ClassVar[str]

    def __init__(self, config: ServeConfig, core: ServerCore) -> None:
        self.config = config
        self.core = core

    @abc.abstractmethod
    async def start(self) -> str:
        """Bind and start serving (raise :class:`BindError` when the port is taken); returns the line
        printed on stdout, e.g. ``GRPCInferenceService listening on 0.0.0.0:8001``."""

    def update_health(self) -> None:  # noqa: B027 - optional: most front-ends answer health per call
        """Called about once a second and when the server starts: mirror readiness where a protocol
        keeps health state of its own (grpc.health.v1)."""

    def begin_drain(self) -> None:  # noqa: B027 - the core's ``exiting`` flag already refuses new work
        """Shutdown starts: stop advertising readiness; requests already running go on."""

    @abc.abstractmethod
    async def stop(self, grace: float) -> None:
        """Close the port, giving running requests up to ``grace`` seconds."""


def bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound (with address reuse on, as grpcio and uvicorn bind), or None."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return f"cannot resolve the host: {error.strerror}"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as error:
                return error.strerror or str(error)
    return None


def bind_error(host: str, port: int, key: str, problem: str) -> BindError:
    address = f"{host}:{port}"
    if problem.startswith("cannot resolve"):
        return BindError(f"server.host: cannot listen on {address} ({problem})")
    return BindError(
        f"{key}: cannot listen on {address} ({problem}); "
        f"choose another port with {key}=<port> (0 picks a free one)"
    )
