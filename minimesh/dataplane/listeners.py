"""Listening sockets: the ingress gateway, the explicit (HTTP_PROXY) sidecars, and the
transparent listeners of captured workloads.

A connection is accepted, classified and handed to one handler: HTTP/1 (`Downstream`) or
HTTP/2 (`Http2Downstream`), both feeding `Proxy.handle`, or TCP (`TcpProxy`). A transparent
listener classifies each connection by where it was headed, and by its first bytes on a port
of undeclared protocol; the others serve HTTP only, either version, told apart by the HTTP/2
preface (`Preface`). Stopping a listener closes its socket and every connection.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Generator
from typing import Any

from minimesh.dataplane.capture.netns import original_destination
from minimesh.dataplane.exchange import Listener, ListenerKind
from minimesh.dataplane.http1 import DEFAULT_LIMITS, ConnectionLimits, Downstream, Request, Responder
from minimesh.dataplane.http2 import Http2Downstream, Stream
from minimesh.dataplane.proxy import Proxy
from minimesh.dataplane.sniff import DETECTION_TIMEOUT, h2_preface, server_name, sniff
from minimesh.dataplane.tcp import TcpProxy
from minimesh.routing.connection import Handling, inbound_plan, plan

METHOD_NOT_ALLOWED_FOR_CONNECT = b"CONNECT is not supported by the minimesh sidecar; send plain HTTP via HTTP_PROXY"


class _Done:
    """An awaitable that is already done (a request answered without the proxy)."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        yield from ()


DONE = _Done()


Original = Callable[[Any], tuple[str, int]]
"""Where a captured connection was headed, read from its socket (`SO_ORIGINAL_DST`)."""


class Serving:
    """One listening socket and the connections it accepted. A `transparent` one receives
    connections redirected by capture rules, reads where each was headed (`original_of`)
    and serves it in that destination's protocol."""

    def __init__(
        self,
        proxy: Proxy,
        listener: Listener,
        limits: ConnectionLimits = DEFAULT_LIMITS,
        *,
        transparent: bool = False,
        original_of: Original = original_destination,
    ) -> None:
        self.proxy = proxy
        self.listener = listener
        self.limits = limits
        self.transparent = transparent
        self.original_of = original_of
        self.connections: set[Downstream | Http2Downstream | Accepted] = set()
        self.tcp = TcpProxy(proxy, lambda: self.listener)
        self.server: asyncio.Server | None = None

    def _protocol(self) -> Preface | Accepted:
        if self.transparent:
            accepted = Accepted(self)
            self.connections.add(accepted)
            return accepted
        return Preface(self, self._downstream(), None)

    def _downstream(self) -> Downstream:
        connection = Downstream(self._handle, self.connections.discard, self.limits, self._rejected)
        self.connections.add(connection)
        return connection

    def handling(self, original: tuple[str, int]) -> Handling:
        """How a connection headed to `original` is served, by the snapshot in force."""
        snapshot = self.proxy.current.get()
        workload = self.listener.workload
        if self.listener.kind is ListenerKind.INBOUND and workload is not None:
            return inbound_plan(snapshot, workload, original[1])
        return plan(snapshot, *original).handling

    def to_http(self, transport: asyncio.BaseTransport, original: tuple[str, int], early: bytes) -> None:
        """Serve the connection as HTTP from here on, `early` being its first bytes: HTTP/2
        if it opens with the preface, else HTTP/1."""
        downstream = self._downstream()
        downstream.extra["original"] = original
        preface = Preface(self, downstream, original)
        transport.set_protocol(preface)
        preface.connection_made(transport)
        if early:
            preface.data_received(early)

    def to_http2(self, transport: asyncio.BaseTransport, original: tuple[str, int] | None, early: bytes) -> None:
        """Serve the connection as HTTP/2 from here on, `early` being its first bytes (the preface)."""
        connection = Http2Downstream(self._handle2, self.connections.discard, self.limits)
        connection.extra["original"] = original
        self.connections.add(connection)
        transport.set_protocol(connection)
        connection.connection_made(transport)
        connection.data_received(early)

    def to_tcp(
        self, transport: asyncio.BaseTransport, original: tuple[str, int], early: bytes, sni: str | None
    ) -> None:
        """Proxy the connection's bytes from here on."""
        peer = transport.get_extra_info("peername")
        text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ":0"
        self.tcp.relay(transport, text, original, early, sni)

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

    def _handle2(self, request: Request, stream: Stream) -> Awaitable[None]:
        """The proxy's handling of one HTTP/2 stream."""
        if request.method == b"CONNECT":
            stream.reply(405, METHOD_NOT_ALLOWED_FOR_CONNECT)
            return DONE
        return self.proxy.handle(request, stream, self.listener, stream.peer, stream.connection.extra["original"])

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
        self.tcp.close()
        if self.server is not None:
            await self.server.wait_closed()

    def __repr__(self) -> str:
        where = f"{self.address[0]}:{self.address[1]}" if self.server and self.server.sockets else "stopped"
        connections = len(self.connections) + len(self.tcp.relays)
        return f"<Serving {self.listener.kind} {self.listener.name} on {where} connections={connections}>"


class Preface(asyncio.Protocol):
    """An HTTP connection until its first bytes tell which version it speaks: the HTTP/2
    preface (prior knowledge, as gRPC clients send) hands it to `Http2Downstream`, anything
    else to the HTTP/1 `Downstream` made for it at once, so its idle timeout runs from the
    accept. Only the first bytes pass through here: the HTTP/1 path costs nothing more."""

    def __init__(self, serving: Serving, downstream: Downstream, original: tuple[str, int] | None) -> None:
        self.serving = serving
        self.downstream = downstream
        self.original = original
        self.transport: asyncio.BaseTransport | None = None
        self.early = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.downstream.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        early = self.early + data
        verdict = h2_preface(early)
        if verdict is None:
            self.early = early
            return
        transport = self.transport
        assert transport is not None
        if verdict:
            self.downstream.connection_lost(None)  # the HTTP/1 codec lets go of the connection
            self.serving.to_http2(transport, self.original, early)
        else:
            transport.set_protocol(self.downstream)
            self.downstream.data_received(early)

    def pause_writing(self) -> None:
        self.downstream.pause_writing()

    def resume_writing(self) -> None:
        self.downstream.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.downstream.connection_lost(exc)

    def __repr__(self) -> str:
        return f"<Preface {self.downstream.peer_text} read={len(self.early)}>"


class Accepted(asyncio.Protocol):
    """A captured connection before its handler is known. Where it was headed decides at
    once for a declared protocol (a server-first protocol is never kept waiting); on a port
    of undeclared protocol its first bytes decide, and after DETECTION_TIMEOUT with none it
    is TCP. A TLS port is read up to the ClientHello's SNI."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self.transport: asyncio.BaseTransport | None = None
        self.original = ("", 0)
        self.handling: Handling = "detect"
        self.early = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        serving = self.serving
        try:
            self.original = serving.original_of(transport.get_extra_info("socket"))
        except OSError:
            transport.close()
            return
        self.handling = serving.handling(self.original)
        if self.handling == "http":
            self._hand_over(serving.to_http, b"")
        elif self.handling in ("tcp", "passthrough"):
            self._to_tcp(None)
        else:
            self.timer = asyncio.get_running_loop().call_later(DETECTION_TIMEOUT, self._to_tcp, None)

    def data_received(self, data: bytes) -> None:
        self.early += data
        early = self.early
        if self.handling == "tls":
            self._tls()
            return
        found = sniff(early)
        if found is None:
            return
        if found == "http1":
            self._hand_over(self.serving.to_http, early)
        elif found == "http2":
            self._hand_over(self.serving.to_http2, early)
        elif found == "tls":
            self.handling = "tls"
            self._tls()
        else:
            self._to_tcp(None)

    def _tls(self) -> None:
        name = server_name(self.early) if sniff(self.early) == "tls" else None
        if name is not False:
            self._to_tcp(name)

    def _to_tcp(self, sni: str | None) -> None:
        serving = self.serving
        self._hand_over(lambda transport, original, early: serving.to_tcp(transport, original, early, sni), self.early)

    def _hand_over(self, to: Callable[[asyncio.BaseTransport, tuple[str, int], bytes], None], early: bytes) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.serving.connections.discard(self)
        if self.transport is not None and not self.transport.is_closing():
            to(self.transport, self.original, early)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.serving.connections.discard(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def __repr__(self) -> str:
        return f"<Accepted to {self.original[0]}:{self.original[1]} {self.handling} read={len(self.early)}>"
