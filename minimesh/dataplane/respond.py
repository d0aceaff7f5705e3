"""The wire ends of forwarding: the request head sent upstream (rewritten path and Host,
header operations, Envoy's own headers, framing), as HTTP/1.1 bytes or HTTP/2 fields, and
the upstream's response passed back (header operations, CORS, affinity cookie, streaming,
trailers, a gRPC response's messages counted, a gRPC-Web client's answered as gRPC-Web), or
a tunnel after a 101.
"""

from __future__ import annotations

from collections.abc import Awaitable

from hpack import NeverIndexedHeaderTuple

from minimesh.dataplane.call import Call
from minimesh.dataplane.deadline import Deadline, Expected
from minimesh.dataplane.grpc import MessageCounter, grpc_status_header, grpc_status_of, is_grpc
from minimesh.dataplane.grpc_web import MESSAGE_LIMIT, Frames, GrpcWeb, is_grpc_response
from minimesh.dataplane.http1 import (
    DATE,
    Body,
    Request,
    Responder,
    UpstreamClosed,
    UpstreamConnection,
    UpstreamResponse,
    first_header,
)
from minimesh.dataplane.http2 import VERSION as HTTP2
from minimesh.dataplane.replay import Replay
from minimesh.dataplane.upstream import Upstreams, speaks_http2
from minimesh.routing.headers import PEER_ID, HeaderList, RequestOps, ResponseOps
from minimesh.routing.snapshot import Cluster, Endpoint

WHOLE_LIMIT = 1 << 16
"""A response body already complete and no longer than this goes out with its head in one write."""
BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
"""Methods whose empty body is still framed with `content-length: 0`, as Envoy does."""
CHUNKED = b"transfer-encoding: chunked\r\n\r\n"
NO_BODY = b"\r\n"
AUTHORITY_AT = 4
AUTHORITY_FIELD = 3
"""Where the authority sits in a request head's parts and fields (a mirror swaps in HOST-shadow)."""
LATE_RESET_FLAGS = {"connection_termination": "UC", "remote_reset": "UR"}
"""The access-log flag of an upstream gone after the response head went out, by Envoy's reset
reason (its router's `streamResetReasonToResponseFlag`)."""


class Head:
    """The request head every attempt sends, in its upstream's protocol: HTTP/1.1 `parts` and
    `framing`, or HTTP/2 `fields` (`speaks_http2`). Each attempt adds its count, the time it
    is told it has (`expected`), and, to an endpoint behind a server sidecar, the peer id of
    the proxy sending it (`caller`). (A plain class: made per request.)"""

    __slots__ = ("caller", "expected", "fields", "framing", "head_request", "parts")

    def __init__(
        self,
        parts: list[bytes],
        framing: bytes,
        fields: HeaderList | None,
        head_request: bool,
        expected: Expected | None,
        caller: bytes | None,
    ) -> None:
        self.parts = parts
        self.framing = framing
        self.fields = fields
        self.head_request = head_request
        self.expected = expected
        self.caller = caller

    def send(
        self,
        upstreams: Upstreams,
        cluster: Cluster,
        endpoint: Endpoint,
        body: Body | bytes,
        attempt: int,
        replay: Replay | None = None,
        deadline: Deadline | None = None,
    ) -> Awaitable[UpstreamResponse]:
        """Send it to `endpoint` as try number `attempt` (0: a mirror's copy, no count), a
        retry told what is left of the route's `deadline`; `replay` gives `body` again should
        a reused HTTP/1.1 connection prove closed."""
        expected = self.expected
        elapsed = deadline.elapsed_ms() if expected is not None and deadline is not None and attempt > 1 else 0
        caller = self.caller
        if caller is not None and not upstreams.has_sidecar(endpoint):
            caller = None
        fields = self.fields
        if fields is not None:
            if attempt or expected is not None or caller is not None:
                fields = [*fields]
                if attempt:
                    fields.append((b"x-envoy-attempt-count", b"%d" % attempt))
                if expected is not None:
                    fields += expected.fields(elapsed)
                if caller is not None:
                    fields.append((PEER_ID, caller))
            return upstreams.send_h2(cluster, endpoint, fields, body)
        per_try = b"x-envoy-attempt-count: %d\r\n" % attempt if attempt else b""
        if expected is not None:
            per_try += expected.lines(elapsed)
        if caller is not None:
            per_try += b"%b: %b\r\n" % (PEER_ID, caller)
        head = b"".join([*self.parts, per_try, self.framing])
        return upstreams.send(
            cluster,
            endpoint,
            head,
            body,
            head_request=self.head_request,
            chunked=self.framing == CHUNKED,
            replay=replay,
        )

    def shadow(self) -> Head:
        """The head of a mirror's copy: the authority becomes `HOST-shadow`, as Envoy's."""
        if self.fields is not None:
            fields = list(self.fields)
            fields[AUTHORITY_FIELD] = (b":authority", _shadow(fields[AUTHORITY_FIELD][1]))
            return Head([], b"", fields, self.head_request, self.expected, self.caller)
        parts = list(self.parts)
        parts[AUTHORITY_AT] = _shadow(parts[AUTHORITY_AT])
        return Head(parts, self.framing, None, self.head_request, self.expected, self.caller)

    def __repr__(self) -> str:
        return f"<Head {'HTTP/2' if self.fields is not None else 'HTTP/1.1'}>"


def _shadow(authority: bytes) -> bytes:
    host, colon, port = authority.partition(b":")
    return host + b"-shadow" + colon + port


def head_for(call: Call, cluster: Cluster, ops: RequestOps, path: str, authority: str, body: Body | bytes) -> Head:
    """The request head for `cluster`, in the protocol it is sent in."""
    request = call.request
    caller = call.exchange.listener.caller_id
    if speaks_http2(cluster, request):
        return Head([], b"", request_fields(call, ops, path, authority, body), False, call.expected, caller)
    head = request_head(call, ops, path, authority)
    return Head(head, framing(body, request), None, request.method == b"HEAD", call.expected, caller)


def request_head(call: Call, ops: RequestOps, path: str, authority: str) -> list[bytes]:
    """The HTTP/1.1 request line and headers sent upstream, less the attempt count and framing."""
    request = call.request
    drop = ops.drop
    parts = [request.method, b" ", path.encode("latin-1"), b" HTTP/1.1\r\nhost: ", authority.encode("latin-1"),
             b"\r\nx-request-id: ", call.exchange.request_id.encode(), b"\r\n"]  # fmt: skip
    for name, value in request.headers:
        if name not in drop:
            parts += (name, b": ", value, b"\r\n")
    parts += ops.lines
    if request.upgrade is not None:
        parts += [b"connection: upgrade\r\nupgrade: ", request.upgrade, b"\r\n"]
    forwarded, proto = forwarding(call)
    if forwarded:
        parts += [b"x-forwarded-for: ", forwarded, b"\r\n"]
    parts += [b"x-forwarded-proto: ", proto, b"\r\n"]
    return parts


def request_fields(call: Call, ops: RequestOps, path: str, authority: str, body: Body | bytes) -> HeaderList:
    """The HTTP/2 request head sent upstream, less the attempt count: the pseudo-headers
    (`:authority` from the Host), then what `request_head` writes, connection-specific
    headers dropped but `te: trailers` kept (as Envoy's codec does), and the body's length
    when known. The request id, new on every request, is never indexed: kept out of the
    HPACK table, it leaves room for the headers that repeat, which then cost a byte each."""
    request = call.request
    drop = ops.drop
    fields = [
        (b":method", request.method),
        (b":scheme", b"http"),
        (b":path", path.encode("latin-1")),
        (b":authority", authority.encode("latin-1")),
        NeverIndexedHeaderTuple(b"x-request-id", call.exchange.request_id.encode()),
    ]
    for name, value in request.headers:
        if name not in drop:
            fields.append((name, value))
        elif name == b"te" and value.lower() == b"trailers":
            fields.append((b"te", b"trailers"))
    fields += ops.fields
    forwarded, proto = forwarding(call)
    if forwarded:
        fields.append((b"x-forwarded-for", forwarded))
    fields.append((b"x-forwarded-proto", proto))
    length = content_length(body, request)
    if length is not None:
        fields.append((b"content-length", length))
    return fields


def forwarding(call: Call) -> tuple[bytes, bytes]:
    """x-forwarded-for and x-forwarded-proto as sent upstream. The gateway is the edge (Istio's
    `use_remote_address`): it appends the client to x-forwarded-for and says `http`; a
    sidecar keeps what it got."""
    exchange = call.exchange
    forwarded = exchange.forwarded_for
    proto = b"http"
    if exchange.listener.kind == "gateway":
        forwarded = f"{forwarded}, {exchange.downstream.rpartition(':')[0]}".lstrip(", ")
    else:
        proto = call.request.header(b"x-forwarded-proto") or proto
    return forwarded.encode("latin-1"), proto


def content_length(body: Body | bytes, request: Request) -> bytes | None:
    """The request body's length as sent upstream, when known (an empty body of a method
    that carries one still says 0, as Envoy does)."""
    if isinstance(body, bytes):
        return b"%d" % len(body) if body or request.method in BODY_METHODS else None
    length = request.header(b"content-length")
    return length if length is not None and length.isdigit() else None


def framing(body: Body | bytes, request: Request) -> bytes:
    """How the request body is framed upstream over HTTP/1.1: its length when known, else
    chunked (nothing for no body)."""
    length = content_length(body, request)
    if length is not None:
        return b"content-length: %b\r\n\r\n" % length
    return NO_BODY if isinstance(body, bytes) else CHUNKED


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
    if call.debug_headers and exchange.route:
        headers.append((b"x-minimesh-route", exchange.route.encode()))
    if call.grpc_web is not None:
        await _respond_grpc_web(call, response, headers, call.grpc_web)
        return
    messages = None
    if exchange.grpc:
        exchange.grpc_status = grpc_status_header(response.header(b"grpc-status"))
        if response.status == 200 and is_grpc(response.header(b"content-type")):
            messages = exchange.response_messages = MessageCounter()
    body = response.body
    if body.complete and body.error is None and body.buffered <= WHOLE_LIMIT and response.trailers is None:
        whole = body.take()
        if messages is not None:
            messages.feed(whole)
        responder.send_whole(response.status, headers, response.length, whole, reason_phrase=response.reason)
        if responder.blocked:
            await responder.drain()
        return
    responder.send_head(response.status, headers, response.length, reason_phrase=response.reason)
    if await _relay(call, response, messages, None):
        _end(call, response)


async def _relay(
    call: Call, response: UpstreamResponse, messages: MessageCounter | None, frames: Frames | None
) -> bool:
    """Pass the response body on as it comes, its gRPC `messages` counted and, for a gRPC-Web
    client that asked for text, its `frames` re-encoded; False when the upstream went away
    before its end, the client's response then cut short as Envoy's is."""
    responder = call.responder
    body = response.body
    responder.set_producer(response.conn.transport)
    try:
        while True:
            chunk = await body.read()
            if not chunk:
                break
            if messages is not None:
                messages.feed(chunk)
            if frames is not None:
                chunk = frames.feed(chunk)
            responder.send(chunk)
            await responder.drain()
    except UpstreamClosed as error:
        _cut_short(call, error)
        return False
    finally:
        responder.set_producer(None)
        if not body.complete:
            response.conn.close()
    return True


def _cut_short(call: Call, error: UpstreamClosed) -> None:
    """The upstream went away after its response head: the client's response is reset, with
    Envoy's flag and details."""
    call.exchange.flags.append(LATE_RESET_FLAGS[error.reason])
    call.exchange.details = f"upstream_reset_after_response_started{{{error.reason}}}"
    call.responder.abort()


def _end(call: Call, response: UpstreamResponse) -> None:
    """End the response. Its trailers go on to an HTTP/2 client (an HTTP/1.1 one gets none:
    Envoy's HTTP/1 codec drops them by default), and a `grpc-status` among them is the call's."""
    responder = call.responder
    trailers = response.trailers
    if trailers is None:
        responder.end()
        return
    if call.exchange.grpc:
        _trailer_status(call, trailers)
    responder.end(trailers)


def _trailer_status(call: Call, trailers: HeaderList) -> None:
    """A `grpc-status` among the trailers is the call's."""
    status = grpc_status_header(first_header(trailers, b"grpc-status"))
    if status is not None:
        call.exchange.grpc_status = status


async def _respond_grpc_web(call: Call, response: UpstreamResponse, headers: HeaderList, grpc_web: GrpcWeb) -> None:
    """The upstream's response to a gRPC-Web client, as Envoy's `grpc_web` filter gives it,
    always with gRPC-Web's content-type: a gRPC one with its frames passed on (base64 for a
    text client) and its trailers as the last frame; any other with a body told in
    `grpc-status` (its HTTP status mapped) and `grpc-message` (the body's start), with no body;
    one of headers alone (trailers-only) as it came."""
    exchange = call.exchange
    responder = call.responder
    body = response.body
    length = None if call.request.version == HTTP2 else 0
    content_type = response.header(b"content-type")
    exchange.grpc_status = grpc_status_header(response.header(b"grpc-status"))
    if body.complete and body.received == 0 and response.trailers is None:
        headers = grpc_web.grpc_headers(headers)
        responder.send_whole(response.status, headers, length, b"", reason_phrase=response.reason)
        return
    if not is_grpc_response(response.status, content_type):
        text = await _message_of(call, response)
        if text is None:
            return
        exchange.grpc_status = grpc_status_of(response.status)
        headers = grpc_web.reply_headers(exchange.grpc_status, text, headers)
        responder.send_whole(response.status, headers, length, b"", reason_phrase=response.reason)
        return
    headers = grpc_web.grpc_headers(headers)
    messages = exchange.response_messages = MessageCounter() if is_grpc(content_type) else None
    responder.send_head(response.status, headers, None, reason_phrase=response.reason)
    if not await _relay(call, response, messages, grpc_web.encoder()):
        return
    if response.trailers:
        _trailer_status(call, response.trailers)
        responder.send(grpc_web.trailer_frame(response.trailers))
    responder.end()


async def _message_of(call: Call, response: UpstreamResponse) -> bytes | None:
    """The first MESSAGE_LIMIT bytes of a response body read to its end; None when the
    upstream went away first (the client's response is then reset, as for any)."""
    body = response.body
    kept = b""
    try:
        while chunk := await body.read():
            if len(kept) < MESSAGE_LIMIT:
                kept += chunk[: MESSAGE_LIMIT - len(kept)]
    except UpstreamClosed as error:
        _cut_short(call, error)
        return None
    finally:
        if not body.complete:
            response.conn.close()
    return kept


async def tunnel(call: Call, response: UpstreamResponse) -> None:
    """The upstream switched protocols (WebSocket, as Istio allows by default): its 101
    goes back, then bytes pass both ways until either side closes. Only an HTTP/1.1
    request asks to upgrade, so only its responder is ever switched."""
    responder = call.responder
    upstream = response.conn
    assert isinstance(responder, Responder), "only HTTP/1.1 switches protocols"
    assert isinstance(upstream, UpstreamConnection), "only an HTTP/1.1 upstream switches protocols"
    switched = responder.switch(response.headers, upstream)
    try:
        await switched.done
    finally:
        switched.close()
