"""Listening sockets: the ingress gateway and the explicit (HTTP_PROXY) sidecars.

Each listener is an asyncio server whose connections are `Downstream` protocols feeding
`Proxy.handle`; stopping a listener closes its socket and every open connection.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Generator

from minimesh.dataplane.capture.netns import original_destination
from minimesh.dataplane.http1 import DEFAULT_LIMITS, ConnectionLimits, Downstream, Request, Responder
from minimesh.dataplane.proxy import Listener, Proxy

METHOD_NOT_ALLOWED_FOR_CONNECT = b"CONNECT is not supported by the minimesh sidecar; send plain HTTP via HTTP_PROXY"


class _Done:
    """An awaitable that is already done (a request answered without the proxy)."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        yield from ()


DONE = _Done()


class Serving:
    """One listening socket and the connections it accepted. A `transparent` one receives
    connections redirected by capture rules and reads where each was headed."""

    def __init__(
        self, proxy: Proxy, listener: Listener, limits: ConnectionLimits = DEFAULT_LIMITS, *, transparent: bool = False
    ) -> None:
        self.proxy = proxy
        self.listener = listener
        self.limits = limits
        self.transparent = transparent
        self.connections: set[Downstream] = set()
        self.server: asyncio.Server | None = None

    def _protocol(self) -> Downstream:
        connection = Downstream(self._handle, self.connections.discard, self.limits, self._rejected)
        self.connections.add(connection)
        return connection

    def _handle(self, request: Request, responder: Responder) -> Awaitable[None]:
        """The proxy's handling of one request (a plain function returning it: one coroutine less)."""
        if request.method == b"CONNECT":
            responder.reply(405, METHOD_NOT_ALLOWED_FOR_CONNECT)
            return DONE
        original = None
        if self.transparent:
            connection = responder.connection
            original = connection.extra.get("original")
            if original is None:
                original = connection.extra["original"] = original_destination(connection.socket())
        return self.proxy.handle(request, responder, self.listener, responder.peer, original)

    def _rejected(self, connection: Downstream, status: int, sent: int) -> None:
        self.proxy.rejected(self.listener, connection.peer_text, status, sent)

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        if sock is not None:
            self.server = await loop.create_server(self._protocol, sock=sock, backlog=1024)
        else:
            self.server = await loop.create_server(self._protocol, host, port, reuse_address=True, backlog=1024)

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None and self.server.sockets
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for connection in list(self.connections):
            connection.close()
        if self.server is not None:
            await self.server.wait_closed()

    def __repr__(self) -> str:
        where = f"{self.address[0]}:{self.address[1]}" if self.server and self.server.sockets else "stopped"
        return f"<Serving {self.listener.kind} {self.listener.name} on {where} connections={len(self.connections)}>"
