"""`Call`: one HTTP request on its way through the proxy's steps (CORS, fault, mirror,
attempts, respond), carrying what each step reads and what the steps before it decided;
the local reply any step may answer with, as Envoy words it (trailers-only to a gRPC
request); and `Responding`, what the steps need of a response writer, whichever codec
(HTTP/1.1 or HTTP/2) frames it.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from minimesh.dataplane.deadline import Deadline, Expected
from minimesh.dataplane.exchange import Exchange
from minimesh.dataplane.grpc import grpc_status_of, trailers_only
from minimesh.dataplane.grpc_web import GrpcWeb
from minimesh.dataplane.http1 import Request, local_reply_headers
from minimesh.dataplane.http2 import VERSION as HTTP2
from minimesh.dataplane.upstream import LocalReply
from minimesh.routing.headers import NO_RESPONSE_OPS, HeaderList, ResponseOps
from minimesh.routing.request import RequestView
from minimesh.routing.snapshot import Forward, Snapshot


class Responding(Protocol):
    """Writes one response downstream: `http1.Responder` frames it as HTTP/1.1,
    `http2.Stream` as one HTTP/2 stream. `status`, `bytes_sent` and `head_sent` are what the
    access log reads; `blocked` says the client reads slower than `send` writes."""

    status: int
    bytes_sent: int
    head_sent: bool

    @property
    def ended(self) -> bool: ...

    @property
    def blocked(self) -> bool: ...

    def send_head(
        self, status: int, headers: HeaderList, length: int | None, *, reason_phrase: bytes = b""
    ) -> None: ...

    def send_whole(
        self, status: int, headers: HeaderList, length: int | None, body: bytes, *, reason_phrase: bytes = b""
    ) -> None: ...

    def send(self, data: bytes) -> None: ...

    def end(self, trailers: HeaderList | None = None) -> None:
        """End the response; `trailers` go out where the protocol carries them (HTTP/2)."""

    def abort(self) -> None: ...

    def reply(self, status: int, body: bytes = b"", headers: HeaderList | None = None) -> None: ...

    async def drain(self) -> None: ...

    def set_producer(self, producer: asyncio.BaseTransport | None) -> None: ...


class Call:
    """One request through the steps. Made per request, so a plain class (see `Exchange`).

    `forward` is routing's decision (None for a server sidecar handing the request to its
    app); `expected` the time its upstream requests are told they have; `cors` holds the
    CORS headers the response will carry; `grpc_web` translates a gRPC-Web request sent to
    a `grpc-web` port; `loop` hands deadlines their loop without asking for it."""

    __slots__ = (
        "cors", "debug_headers", "exchange", "expected", "forward", "grpc_web", "loop", "request", "responder",
        "snapshot", "view",
    )  # fmt: skip

    def __init__(
        self,
        request: Request,
        responder: Responding,
        exchange: Exchange,
        view: RequestView,
        snapshot: Snapshot,
        loop: asyncio.AbstractEventLoop,
        debug_headers: bool,
    ) -> None:
        self.request = request
        self.responder = responder
        self.exchange = exchange
        self.view = view
        self.snapshot = snapshot
        self.loop = loop
        self.debug_headers = debug_headers
        self.forward: Forward | None = None
        self.expected: Expected | None = None
        self.cors: HeaderList = []
        self.grpc_web: GrpcWeb | None = None

    def deadline(self, delay: float) -> Deadline:
        return Deadline(self.loop, delay)

    def reply(self, reply: LocalReply, extra: HeaderList | None = None, ops: ResponseOps = NO_RESPONSE_OPS) -> None:
        """Answer locally; `ops` are the response header operations of the rule that made the
        reply (a redirect's or direct response's own `headers.response`). A gRPC request gets
        Envoy's trailers-only response: HTTP 200, the status as `grpc-status`, the body text
        as `grpc-message` (over HTTP/1.1, `content-length: 0` frames it, as Envoy's codec does).
        A gRPC-Web one is not gRPC to Envoy's local replies, which judge the request as the
        client sent it: it keeps its HTTP status (200 for a fault's `grpcStatus`, which it
        ignores), and the `grpc_web` filter maps that status to its `grpc-status`."""
        exchange = self.exchange
        if reply.flag:
            exchange.flags.append(reply.flag)
        headers = [*reply.headers, *(extra or ()), *self.cors]
        if ops is not NO_RESPONSE_OPS:
            headers = [header for header in headers if header[0] not in ops.drop]
            headers += ops.add
        if self.debug_headers and exchange.route:
            headers.append((b"x-minimesh-route", exchange.route.encode()))
        if not exchange.grpc:
            self.responder.reply(reply.status, reply.body, headers)
            return
        length = None if self.request.version == HTTP2 else 0
        if self.grpc_web is not None:
            code = exchange.grpc_status = grpc_status_of(reply.status)
            headers = local_reply_headers(b"", self.grpc_web.reply_headers(code, reply.body, headers))
            self.responder.send_whole(reply.status, headers, length, b"")
            return
        code = exchange.grpc_status = (
            reply.grpc_status if reply.grpc_status is not None else grpc_status_of(reply.status)
        )
        headers = local_reply_headers(b"", trailers_only(code, reply.body, headers))
        self.responder.send_whole(200, headers, length, b"")

    def __repr__(self) -> str:
        return (
            f"<Call {self.exchange.method} {self.exchange.authority}{self.exchange.path} route={self.exchange.route}>"
        )
