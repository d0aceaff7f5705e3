"""`Call`: one HTTP request on its way through the proxy's steps (CORS, fault, mirror,
attempts, respond), carrying what each step reads and what the steps before it decided;
and the local reply any step may answer with, as Envoy words it.
"""

from __future__ import annotations

import asyncio

from minimesh.dataplane.deadline import Deadline
from minimesh.dataplane.exchange import Exchange
from minimesh.dataplane.http1 import Request, Responder
from minimesh.dataplane.upstream import LocalReply
from minimesh.routing.headers import NO_RESPONSE_OPS, HeaderList, ResponseOps
from minimesh.routing.request import RequestView
from minimesh.routing.snapshot import Forward, Snapshot


class Call:
    """One request through the steps. Made per request, so a plain class (see `Exchange`).

    `forward` is routing's decision (None for a server sidecar handing the request to its
    app); `cors` holds the CORS headers the response will carry; `loop` hands deadlines
    their loop without asking for it."""

    __slots__ = ("cors", "debug_headers", "exchange", "forward", "loop", "request", "responder", "snapshot", "view")

    def __init__(
        self,
        request: Request,
        responder: Responder,
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
        self.cors: HeaderList = []

    def deadline(self, delay: float) -> Deadline:
        return Deadline(self.loop, delay)

    def reply(self, reply: LocalReply, extra: HeaderList | None = None, ops: ResponseOps = NO_RESPONSE_OPS) -> None:
        """Answer locally; `ops` are the response header operations of the rule that made the
        reply (a redirect's or direct response's own `headers.response`)."""
        exchange = self.exchange
        if reply.flag:
            exchange.flags.append(reply.flag)
        headers = [*reply.headers, *(extra or ()), *self.cors]
        if ops is not NO_RESPONSE_OPS:
            headers = [header for header in headers if header[0] not in ops.drop]
            headers += ops.add
        if self.debug_headers and exchange.route:
            headers.append((b"x-minimesh-route", exchange.route.encode()))
        self.responder.reply(reply.status, reply.body, headers)

    def __repr__(self) -> str:
        return (
            f"<Call {self.exchange.method} {self.exchange.authority}{self.exchange.path} route={self.exchange.route}>"
        )
