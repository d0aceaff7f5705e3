"""The proxy: one request in, routing's decision, the route's steps, one response out.

Every listener hands its parsed HTTP requests to `Proxy.handle`, which reads the snapshot
once, decides, and dispatches on the outcome. Forwarding runs the steps in the order of
Istio's filter chain and Envoy's router, each in its own module over one `Call`: gRPC-Web
(`grpc_web`), CORS (`cors`), fault (`fault`), the body kept for retries and mirrors
(`replay`), mirror (`mirror`), admission (`http2MaxRequests`), route timeout, attempts
(`attempts`), and the response (`respond`). A server sidecar forwards to its app within the
deadline a gRPC client sent.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from minimesh.config.labels import DETECTED, GRPC_WEB
from minimesh.dataplane.attempts import attempts
from minimesh.dataplane.call import Call, Responding
from minimesh.dataplane.cors import cors_step
from minimesh.dataplane.current import Current
from minimesh.dataplane.deadline import Deadline, Expected
from minimesh.dataplane.exchange import (
    HTTP_VERSIONS,
    Exchange,
    LazyHeaders,
    Listener,
    Observer,
    inbound_cluster_name,
    request_id,
)
from minimesh.dataplane.fault import Faults, fault_step, fires
from minimesh.dataplane.grpc import (
    DEADLINE_EXCEEDED,
    GRPC_TIMEOUT,
    format_grpc_timeout,
    grpc_route_timeout,
    grpc_timeout_ms,
    is_grpc,
)
from minimesh.dataplane.grpc_web import BAD_BASE64, GrpcWeb, decode_text
from minimesh.dataplane.http1 import READ_HIGH_WATER, Body, Request, UpstreamResponse
from minimesh.dataplane.mirror import Mirrors
from minimesh.dataplane.replay import Replay
from minimesh.dataplane.respond import Head, head_for, respond, tunnel
from minimesh.dataplane.upstream import (
    BLACK_HOLE,
    NO_ROUTE,
    PROTOCOL_ERROR,
    UPGRADE_FAILED,
    UPSTREAM_TIMEOUT,
    ClusterState,
    Dial,
    LocalReply,
    UpstreamFailure,
    Upstreams,
    speaks_http2,
)
from minimesh.registry.model import Workload
from minimesh.routing.headers import NO_REQUEST_OPS, NO_RESPONSE_OPS, PEER_ID, RequestOps
from minimesh.routing.match import decide
from minimesh.routing.pick import set_cookie
from minimesh.routing.request import RequestView
from minimesh.routing.retry import NO_RETRY, RetryDecider
from minimesh.routing.snapshot import (
    BlackHole,
    Cluster,
    DirectResponse,
    Endpoint,
    Forward,
    Mirror,
    NoRoute,
    PassThrough,
    Redirect,
    Snapshot,
)

BUFFER_LIMIT = READ_HIGH_WATER
"""Envoy's default `per_connection_buffer_limit_bytes` (1 MiB), which bounds the copy of a
request body kept for retries: a longer body goes on streaming, not retried (mirrors stream
theirs alongside, whatever its size)."""
SCOPE_HEADER = b"x-minimesh-test"
REJECTED_DETAILS = {400: "http1.codec_error", 408: "request_header_timeout", 431: "http1.headers_too_large"}
DURATION_TIMEOUT = b"downstream duration timeout"
DURATION_TIMEOUT_DETAILS = "max_duration_timeout"


class Proxy:
    """Routes and forwards requests for every listener; owns the mirrors in flight."""

    def __init__(
        self,
        current: Current[Snapshot],
        upstreams: Upstreams,
        *,
        rng: random.Random | None = None,
        observers: tuple[Observer, ...] = (),
        openers: tuple[Observer, ...] = (),
        debug_headers: bool = False,
    ) -> None:
        self.current = current
        self.upstreams = upstreams
        self.rng = rng or random.Random()
        self.faults = Faults(self.rng)
        self.mirrors = Mirrors(upstreams, self.rng)
        self._inbound_clusters: dict[tuple[str, int], Cluster] = {}
        self.observers = observers
        self.openers = openers
        """Told of each TCP connection once it is routed (`observers` are told when it closes)."""
        self.tcp_callers: dict[tuple[int, str, int], Workload] = {}
        """(local port, address, port) of each open TCP connection a sidecar made to a captured
        workload → the workload that made it: that workload's server sidecar, in this same
        daemon, knows its caller by the connection's source port, as Istio's knows it from
        the peer metadata mTLS carries."""
        self.debug_headers = debug_headers
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- the request

    async def handle(
        self,
        request: Request,
        responder: Responding,
        listener: Listener,
        peer: str,
        original: tuple[str, int] | None = None,
    ) -> None:
        """Serve one request; `original` is where a transparently captured connection was headed."""
        snapshot = self.current.get()
        raw = dict(request.headers)
        if snapshot.scoped:
            snapshot = snapshot.scoped.get(raw.get(SCOPE_HEADER, b"").decode("latin-1"), snapshot)
        target = request.target.decode("latin-1")
        authority = raw.get(b"host", b"").decode("latin-1")
        scheme = "http"
        if "://" in target[:8]:
            scheme, _, rest = target.partition("://")
            netloc, slash, tail = rest.partition("/")
            authority = netloc or authority
            target = slash + tail or "/"
        exchange = _exchange(request, listener, peer, raw, target, authority)
        exchange.original = original
        if not authority and original is not None:
            authority = exchange.authority = f"{original[0]}:{original[1]}"
        gateway = listener.kind == "gateway"
        view = RequestView(
            exchange.method, target, authority, LazyHeaders(raw), scheme,
            listener.port if gateway else original[1] if original else None,
            listener.workload, (listener.gateways or ("",))[0] if gateway else "mesh", peer,
        )  # fmt: skip
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        call = Call(request, responder, exchange, view, snapshot, loop, self.debug_headers)
        try:
            if listener.kind == "inbound":
                exchange.source = snapshot.peers.get(raw.get(PEER_ID, b""))
            if request.upgrade is not None and not _upgrade_allowed(call):
                return
            if listener.kind == "inbound" and original is not None and listener.workload is not None:
                cluster = self.inbound_cluster(listener.workload, original[1], listener.dial, snapshot)
                duration_ms = grpc_timeout_ms(raw.get(GRPC_TIMEOUT))
                serving = self._to_app(call, cluster)
                await (serving if duration_ms is None else _within_duration(call, duration_ms, serving))
                return
            outcome = decide(snapshot, view, self.rng)
            exchange.route = getattr(outcome, "route_ref", "")
            await OUTCOMES[type(outcome)](self, call, outcome)
        except asyncio.CancelledError:
            exchange.flags.append("DC")
            raise
        finally:
            exchange.status = responder.status
            exchange.bytes_sent = responder.bytes_sent
            exchange.bytes_received = request.body.received
            exchange.duration = time.monotonic() - exchange.began
            for observer in self.observers:
                observer(exchange)

    def rejected(self, listener: Listener, peer: str, status: int, sent: int) -> None:
        """A request the HTTP/1 codec refused before routing (400 or 431 `DPE`, 408 for a head
        that never finished): logged and counted as Envoy does."""
        now = time.monotonic()
        exchange = Exchange(listener, "-", "-", "", "-", "-", time.time(), now, peer)
        exchange.status = status
        exchange.bytes_sent = sent
        exchange.details = REJECTED_DETAILS.get(status, "-")
        if status in (400, 431):
            exchange.flags.append("DPE")
        for observer in self.observers:
            observer(exchange)

    # ---- outcomes other than forwarding

    async def _no_route(self, call: Call, outcome: NoRoute) -> None:
        call.reply(NO_ROUTE)

    async def _redirect(self, call: Call, outcome: Redirect) -> None:
        ops = outcome.route.reply_ops if outcome.route is not None else NO_RESPONSE_OPS
        call.reply(LocalReply(outcome.status, b"", ""), [(b"location", outcome.location.encode("latin-1"))], ops)

    async def _direct(self, call: Call, outcome: DirectResponse) -> None:
        call.reply(LocalReply(outcome.status, outcome.body, ""), ops=outcome.route.reply_ops)

    async def _black_hole(self, call: Call, outcome: BlackHole) -> None:
        call.exchange.cluster = outcome.cluster
        call.reply(BLACK_HOLE)

    async def _pass_through(self, call: Call, outcome: PassThrough) -> None:
        host, port = call.exchange.original or (outcome.host.strip("[]"), outcome.port)
        cluster = Cluster(
            name=outcome.cluster, host=host, short=host, namespace="", subset=None, port=port,
            endpoints=(Endpoint(None, host, port),),
        )  # fmt: skip
        timeout = _timeouts(call, None, None)
        await self._forward_to(call, cluster, NO_RETRY, timeout)

    def inbound_cluster(
        self, workload: Workload, port: int, dial: Dial | None, snapshot: Snapshot | None = None
    ) -> Cluster:
        """The cluster of `workload`'s app on `port`, reached through `dial` (from inside its
        namespace); its protocol (whether the app is spoken to in HTTP/2) is the port's in
        `snapshot`."""
        key = (workload.name, port)
        protocol = snapshot.inbound_protocols.get(key, DETECTED) if snapshot is not None else DETECTED
        cluster = self._inbound_clusters.get(key)
        if cluster is None or cluster.endpoints[0].workload != workload or cluster.protocol != protocol:
            service = workload.service or workload.name
            cluster = Cluster(
                name=inbound_cluster_name(workload, port), host=f"{service}.{workload.namespace}.svc.cluster.local",
                short=service, namespace=workload.namespace, subset=None, port=port,
                endpoints=(Endpoint(workload, "127.0.0.1", port, workload.labels),), protocol=protocol,
            )  # fmt: skip
            self._inbound_clusters[key] = cluster
        self.upstreams.state(cluster, dial)
        return cluster

    def forget_workload(self, workload: Workload) -> None:
        """A workload left the mesh: drop its inbound clusters and their connections."""
        keys = [key for key in self._inbound_clusters if key[0] == workload.name]
        self.upstreams.forget([inbound_cluster_name(workload, port) for _, port in keys])
        for key in keys:
            del self._inbound_clusters[key]

    # ---- forwarding

    async def _to_app(self, call: Call, cluster: Cluster) -> None:
        """A server sidecar's request, on to its app."""
        if cluster.protocol != GRPC_WEB or await _grpc_web(call):
            await self._forward_to(call, cluster, NO_RETRY, None)

    async def _forward(self, call: Call, outcome: Forward) -> None:
        """The route's steps, then forwarding. The request belongs to the route's cluster and
        service from here on, as Envoy's connection manager gives the stream its route's
        cluster before any filter runs: a CORS or fault reply is logged and counted with them."""
        route = outcome.route
        call.forward = outcome
        exchange = call.exchange
        exchange.cluster, exchange.destination_service = outcome.cluster.name, outcome.cluster.host
        if outcome.grpc_web and not await _grpc_web(call):
            return
        cors = route.cors_headers
        if cors is not None and cors_step(call, cors):
            return
        if route.fault is not None and await fault_step(call, self.faults, outcome):
            return
        timeout = _timeouts(call, route.timeout, route.retry.per_try_timeout)
        await self._forward_to(call, outcome.cluster, route.retry, timeout)

    async def _forward_to(self, call: Call, cluster: Cluster, retry: RetryDecider, timeout: float | None) -> None:
        """Keep the body for retries and mirrors (`kept_body`), copy it to the mirrors when an
        endpoint can be picked (Envoy starts its shadows once the request has a host), admit
        the request (`http2MaxRequests`), then the attempts and the response within the route
        timeout; a failure is answered as Envoy answers it."""
        exchange = call.exchange
        request = call.request
        outcome = call.forward
        exchange.cluster = cluster.name
        exchange.destination_service = cluster.host
        if outcome is not None:
            path, authority = outcome.rewritten(exchange.path, exchange.authority)
            ops = outcome.target.request_ops
            mirrors = self._firing(outcome) if outcome.route.mirrors and request.upgrade is None else ()
        else:
            path, authority, ops, mirrors = exchange.path, exchange.authority, NO_REQUEST_OPS, ()
        body, replay, retry = kept_body(call, retry, bool(mirrors))
        head = head_for(call, cluster, ops, path, authority, body)
        state = self.upstreams.state(cluster)
        if mirrors and state.can_pick(cluster, exchange.original):
            self._mirror(call, mirrors, (ops, path, authority), head, body, replay, timeout)
        try:
            state.admit(cluster.policy.connection_pool)
        except UpstreamFailure as failure:
            call.reply(failure.reply)
            if replay is not None:
                replay.close()
            return
        try:
            if timeout is None:
                switched = await self._exchange(call, cluster, state, retry, body, replay, head, None)
            else:
                async with call.deadline(timeout) as deadline:
                    switched = await self._exchange(call, cluster, state, retry, body, replay, head, deadline)
            if switched is not None:
                await tunnel(call, switched)
        except TimeoutError:
            if not call.responder.head_sent:
                call.reply(UPSTREAM_TIMEOUT)
            elif not call.responder.ended:
                exchange.flags.append("UT")
                call.responder.abort()
        except UpstreamFailure as failure:
            if failure.endpoint is not None:
                exchange.upstream_host = f"{failure.endpoint.address}:{failure.endpoint.port}"
            call.reply(failure.reply)
        finally:
            state.done()
            if replay is not None:
                replay.close()

    def _firing(self, outcome: Forward) -> tuple[Mirror, ...]:
        """The route's mirrors that copy this request (`mirrorPercentage`), drawn as routing
        decides, as Envoy picks its shadow policies with the request's headers."""
        return tuple(mirror for mirror in outcome.mirrors if fires(self.rng, mirror.percentage))

    def _mirror(
        self,
        call: Call,
        mirrors: tuple[Mirror, ...],
        target: tuple[RequestOps, str, str],
        head: Head,
        body: Body | bytes,
        replay: Replay | None,
        timeout: float | None,
    ) -> None:
        """Copy the request to each mirror within the route `timeout` (as Envoy's shadows
        have it), its `body` whole or, still arriving, fed from `replay` as it comes; `head`,
        the request's, is reused for a mirror spoken to in the same protocol, else made anew
        for the rewritten `target` (request operations, path, authority)."""
        copied_body = body if isinstance(body, bytes) else replay
        if copied_body is None:
            return
        request = call.request
        for mirror in mirrors:
            if speaks_http2(mirror.cluster, request) == (head.fields is not None):
                copied = head
            else:
                copied = head_for(call, mirror.cluster, *target, body)
            self.mirrors.copy(mirror, call.view, copied, copied_body, timeout)

    async def _exchange(
        self,
        call: Call,
        cluster: Cluster,
        state: ClusterState,
        retry: RetryDecider,
        body: Body | bytes,
        replay: Replay | None,
        head: Head,
        deadline: Deadline | None,
    ) -> UpstreamResponse | None:
        """The attempts, then the response passed on, all within the route's `deadline`, as
        Envoy's route timeout covers the whole response. A 101 to an upgrade is returned
        instead: the tunnel it opens outlives the timeout, as in Envoy."""
        response, attempt = await attempts(
            call, cluster, state, retry, self.upstreams, self.rng, head, body, replay, deadline,
        )  # fmt: skip
        if replay is not None:
            replay.settle()
        try:
            if response.status == 101:
                if call.request.upgrade is None:
                    response.conn.close()
                    raise UpstreamFailure(PROTOCOL_ERROR, call.exchange.destination)
                return response
            affinity = cluster.policy.cookie
            cookie = None if affinity is None else set_cookie(affinity, call.view)
            forward = call.forward
            await respond(call, response, forward.target.response_ops if forward else NO_RESPONSE_OPS, cookie)
            return None
        finally:
            attempt.end()

    async def close(self) -> None:
        await self.mirrors.close()
        self.upstreams.close()


def _exchange(
    request: Request,
    listener: Listener,
    peer: str,
    raw: dict[bytes, bytes],
    target: str,
    authority: str,
) -> Exchange:
    """The record of a request just in (`raw`: its headers, the last of a repeated name); a
    gRPC one has its messages counted as they arrive, as Envoy's `grpc_stats` filter does."""
    exchange = Exchange(
        listener,
        request.method.decode(),
        target,
        authority,
        HTTP_VERSIONS.get(request.version) or f"HTTP/{request.version.decode()}",
        raw.get(b"x-request-id", b"").decode("latin-1") or request_id(),
        time.time(),
        time.monotonic(),
        peer,
        raw.get(b"user-agent", b"").decode("latin-1"),
        raw.get(b"x-forwarded-for", b"").decode("latin-1"),
    )
    if is_grpc(raw.get(b"content-type")):
        exchange.grpc = True
        exchange.request_messages = request.body.count_messages()
    return exchange


def kept_body(call: Call, retry: RetryDecider, mirrored: bool) -> tuple[Body | bytes, Replay | None, RetryDecider]:
    """The request body as the attempts send it, and the policy they follow. Kept for retries
    and mirrors only: one already whole within BUFFER_LIMIT as bytes (the common case, no
    copy made); one still arriving as a `Replay` (forwarded as it comes, a copy recorded, the
    mirrors fed alongside); one already whole past the limit is streamed with retries
    abandoned, as Envoy does, through a `Replay` when mirrors need it."""
    request = call.request
    source = request.body
    if not request.has_body:
        return b"", None, retry
    if not (retry.attempts or mirrored):
        return source, None, retry
    if not source.complete:
        return source, Replay(source, BUFFER_LIMIT, call.loop), retry
    if source.error is None and source.buffered <= BUFFER_LIMIT:
        return source.take(), None, retry
    return source, Replay(source, BUFFER_LIMIT, call.loop) if mirrored else None, NO_RETRY


def _timeouts(call: Call, route_timeout: float | None, per_try_timeout: float | None) -> float | None:
    """The timeout of a request forwarded on an outbound route: the route's, and a gRPC
    request's `grpc-timeout` within it (Istio gives each route `max_grpc_timeout`, the
    passthrough route too). The time its upstream requests are told they have
    (`call.expected`) replaces what the client said of it."""
    request = call.request
    grpc = call.exchange.grpc
    timeout = grpc_route_timeout(route_timeout, request.header(GRPC_TIMEOUT)) if grpc else route_timeout
    expected = call.expected = Expected.of(timeout, per_try_timeout, grpc)
    if expected is not None:
        names = expected.names
        request.headers = [header for header in request.headers if header[0] not in names]
    return timeout


async def _grpc_web(call: Call) -> bool:
    """At a listener with Envoy's `grpc_web` filter (`Forward.grpc_web`, or a server sidecar's
    `grpc-web` port), a gRPC-Web request goes on as gRPC from here, as the filter (ahead of
    CORS and faults in Istio's chain) passes it on: its headers made gRPC's, a `-text` body
    decoded whole (gRPC-Web has no client streaming), the messages of the body as gRPC
    counted (`grpc_stats` follows the filter). False when it was answered instead:
    400 for a body that is not base64, nothing for a client gone."""
    request = call.request
    grpc_web = GrpcWeb.of(request.header(b"content-type"), request.header(b"accept"))
    if grpc_web is None:
        return True
    call.grpc_web = grpc_web
    exchange = call.exchange
    exchange.grpc = True
    request.headers = grpc_web.upstream_headers(request.headers)
    if not grpc_web.text_request:
        exchange.request_messages = request.body.count_messages()
        return True
    source = request.body
    chunks = []
    try:
        while chunk := await source.read():
            chunks.append(chunk)
    except ConnectionResetError:
        exchange.flags.append("DC")
        return False
    decoded, details = decode_text(b"".join(chunks))
    if decoded is None:
        exchange.details = details
        call.reply(LocalReply(400, BAD_BASE64, ""))
        return False
    body = request.body = Body(loop=call.loop)
    exchange.request_messages = body.count_messages()
    body.feed(decoded)
    body.finish()
    body.received = source.received
    return True


async def _within_duration(call: Call, duration_ms: int, serving: Coroutine[Any, Any, None]) -> None:
    """`serving` a server sidecar's request whose `grpc-timeout` says how long its client
    waits (`duration_ms`, 0 included), held to that as a whole, as Istio's inbound route has
    Envoy's connection manager do (`max_stream_duration` with `grpc_timeout_header_max: 0`):
    a gRPC request's header is rewritten as Envoy writes it (`10S` goes on as `10000m`);
    past the time, Envoy's `downstream duration timeout` (DEADLINE_EXCEEDED to a gRPC
    client), or a reset once the response has begun; the app's stream is reset either way."""
    request = call.request
    if call.exchange.grpc:
        written = format_grpc_timeout(duration_ms)
        request.headers = [(name, written if name == GRPC_TIMEOUT else value) for name, value in request.headers]
    try:
        async with call.deadline(duration_ms / 1000):
            await serving
    except TimeoutError:
        call.exchange.details = DURATION_TIMEOUT_DETAILS
        responder = call.responder
        if not responder.head_sent:
            status = 504 if request.body.complete else 408
            call.reply(LocalReply(status, DURATION_TIMEOUT, "", grpc_status=DEADLINE_EXCEEDED))
        elif not responder.ended:
            responder.abort()


def _upgrade_allowed(call: Call) -> bool:
    """Istio's listeners upgrade to WebSocket only: `h2c` is dropped (the request goes on as
    plain HTTP/1.1), any other protocol is refused with 403 `upgrade_failed`."""
    request = call.request
    wanted = (request.upgrade or b"").lower()
    if wanted == b"websocket":
        return True
    if wanted == b"h2c":
        request.upgrade = None
        request.headers = [(name, value) for name, value in request.headers if name != b"http2-settings"]
        return True
    call.exchange.details = "upgrade_failed"
    call.reply(UPGRADE_FAILED)
    return False


OUTCOMES: dict[type, Callable[..., Awaitable[None]]] = {
    NoRoute: Proxy._no_route,
    Redirect: Proxy._redirect,
    DirectResponse: Proxy._direct,
    BlackHole: Proxy._black_hole,
    PassThrough: Proxy._pass_through,
    Forward: Proxy._forward,
}
"""Each kind of routing outcome and the method that carries it out."""
