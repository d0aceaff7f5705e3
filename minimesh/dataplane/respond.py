"""The wire ends of forwarding: the request head sent upstream (rewritten path and Host,
header operations, Envoy's own headers, framing) and the upstream's response passed back
(header operations, CORS, affinity cookie, streaming, a gRPC response's messages counted),
or a tunnel after a 101.
"""

from __future__ import annotations

from minimesh.dataplane.call import Call
from minimesh.dataplane.grpc import MessageCounter, grpc_status_header, is_grpc
from minimesh.dataplane.http1 import DATE, Body, Request, Responder, UpstreamClosed, UpstreamResponse
from minimesh.routing.headers import HeaderList, RequestOps, ResponseOps

WHOLE_LIMIT = 1 << 16
"""A response body already complete and no longer than this goes out with its head in one write."""
BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
"""Methods whose empty body is still framed with `content-length: 0`, as Envoy does."""
CHUNKED = b"transfer-encoding: chunked\r\n\r\n"
NO_BODY = b"\r\n"
AUTHORITY_AT = 4
"""Where the authority sits in a request head's parts (a mirror swaps in HOST-shadow)."""


def request_head(call: Call, ops: RequestOps, path: str, authority: str) -> list[bytes]:
    """The request line and headers sent upstream, less the attempt count and framing.

    The gateway is the edge (Istio's `use_remote_address`): it appends the client to
    x-forwarded-for and says `x-forwarded-proto: http`; a sidecar keeps what it got."""
    request = call.request
    exchange = call.exchange
    drop = ops.drop
    parts = [request.method, b" ", path.encode("latin-1"), b" HTTP/1.1\r\nhost: ", authority.encode("latin-1"),
             b"\r\nx-request-id: ", exchange.request_id.encode(), b"\r\n"]  # fmt: skip
    for name, value in request.headers:
        if name not in drop:
            parts += (name, b": ", value, b"\r\n")
    parts += ops.lines
    if request.upgrade is not None:
        parts += [b"connection: upgrade\r\nupgrade: ", request.upgrade, b"\r\n"]
    forwarded = exchange.forwarded_for
    proto = b"http"
    if exchange.listener.kind == "gateway":
        forwarded = f"{forwarded}, {exchange.downstream.rpartition(':')[0]}".lstrip(", ")
    else:
        proto = request.header(b"x-forwarded-proto") or proto
    if forwarded:
        parts += [b"x-forwarded-for: ", forwarded.encode("latin-1"), b"\r\n"]
    parts += [b"x-forwarded-proto: ", proto, b"\r\n"]
    return parts


def framing(body: Body | bytes, request: Request) -> bytes:
    """How the request body is framed upstream: its length when known, else chunked."""
    if isinstance(body, bytes):
        if body or request.method in BODY_METHODS:
            return b"content-length: %d\r\n\r\n" % len(body)
        return NO_BODY
    length = request.header(b"content-length")
    if length is not None and length.isdigit():
        return b"content-length: %b\r\n\r\n" % length
    return CHUNKED


async def respond(call: Call, response: UpstreamResponse, ops: ResponseOps, cookie: bytes | None) -> None:
    """Pass the upstream's response on; `cookie` is an affinity `Set-Cookie` to add, which
    the route's response header operations may drop as Envoy's would."""
    exchange = call.exchange
    responder = call.responder
    drop = ops.drop
    headers: HeaderList = [(name, value) for name, value in response.headers if name not in drop]
    if cookie is not None and b"set-cookie" not in drop:
        headers.append((b"set-cookie", cookie))
    headers += ops.add
    if response.header(b"date") is None:
        headers.append((b"date", DATE.get()))
    headers.append((b"server", b"istio-envoy"))
    if exchange.upstream_time is not None:
        headers.append((b"x-envoy-upstream-service-time", b"%d" % int(exchange.upstream_time * 1000)))
    headers += call.cors
    messages = None
    if exchange.grpc:
        exchange.grpc_status = grpc_status_header(response.header(b"grpc-status"))
        if response.status == 200 and is_grpc(response.header(b"content-type")):
            messages = exchange.response_messages = MessageCounter()
    if call.debug_headers and exchange.route:
        headers.append((b"x-minimesh-route", exchange.route.encode()))
    body = response.body
    if body.complete and body.error is None and body.buffered <= WHOLE_LIMIT:
        whole = body.take()
        if messages is not None:
            messages.feed(whole)
        responder.send_whole(response.status, headers, response.length, whole, reason_phrase=response.reason)
        if responder.blocked:
            await responder.drain()
        return
    responder.send_head(response.status, headers, response.length, reason_phrase=response.reason)
    responder.set_producer(response.conn.transport)
    try:
        while True:
            chunk = await body.read()
            if not chunk:
                break
            if messages is not None:
                messages.feed(chunk)
            responder.send(chunk)
            await responder.drain()
    except UpstreamClosed:
        exchange.flags.append("UC")
        responder.abort()
        return
    finally:
        responder.set_producer(None)
        if not body.complete:
            response.conn.close()
    responder.end()


async def tunnel(call: Call, response: UpstreamResponse) -> None:
    """The upstream switched protocols (WebSocket, as Istio allows by default): its 101
    goes back, then bytes pass both ways until either side closes. Only an HTTP/1.1
    request asks to upgrade, so only its responder is ever switched."""
    responder = call.responder
    assert isinstance(responder, Responder), "only HTTP/1.1 switches protocols"
    switched = responder.switch(response.headers, response.conn)
    try:
        await switched.done
    finally:
        switched.close()
