"""The proxy: one request in, routing's decision, the route's steps, one response out.

Every listener (gateway, sidecar) hands its parsed requests to `Proxy.handle`. The
snapshot is read once per request; the steps (fault, timeout, retry, balance, breaker,
outlier, forward, mirror) run in the order Envoy's router applies them.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from minimesh.config import model as m
from minimesh.dataplane.current import Current
from minimesh.dataplane.http1 import (
    DATE,
    HOP_BY_HOP,
    Body,
    BodyTooLarge,
    HeaderList,
    Request,
    Responder,
    UpstreamClosed,
    UpstreamResponse,
)
from minimesh.dataplane.retry import NO_RETRY, RetryDecider
from minimesh.dataplane.upstream import (
    BLACK_HOLE,
    NO_HEALTHY_UPSTREAM,
    NO_ROUTE,
    PAYLOAD_TOO_LARGE,
    UPSTREAM_TIMEOUT,
    LocalReply,
    UpstreamFailure,
    Upstreams,
)
from minimesh.registry.model import Workload
from minimesh.routing.match import decide
from minimesh.routing.pick import hash_key
from minimesh.routing.request import RequestView
from minimesh.routing.snapshot import (
    BlackHole,
    Cluster,
    DirectResponse,
    Endpoint,
    Forward,
    NoRoute,
    PassThrough,
    Redirect,
    Snapshot,
)

BUFFER_LIMIT = 16 * 1024 * 1024
"""A body kept for retries or mirrors is held whole up to this size; past it, 413."""
MIRRORS_IN_FLIGHT = 64
"""Mirrored requests in flight at once; more are dropped (mirrors must never slow traffic)."""
RETRY_BACKOFF_BASE = 0.025
RETRY_BACKOFF_MAX = 0.250
"""Envoy's retry back-off: fully jittered, 25 ms base, at most 250 ms."""
FAULT_ABORT_BODY = b"fault filter abort"
REWRITTEN_REQUEST_HEADERS = frozenset(
    {b"host", b"content-length", b"x-request-id", b"x-envoy-attempt-count", b"expect", b"x-forwarded-for",
     b"x-forwarded-proto"}
)  # fmt: skip
"""Request headers the proxy writes itself; the client's copies are not passed on."""


@dataclass(frozen=True, slots=True)
class Listener:
    """Who is serving: the ingress gateway, or the sidecar of `workload`."""

    kind: str
    port: int
    gateways: tuple[str, ...] = ()
    workload: Workload | None = None

    @property
    def name(self) -> str:
        return self.workload.name if self.workload else "istio-ingressgateway"


@dataclass(slots=True)
class Exchange:
    """One request's path through the proxy: what the access log and metrics read."""

    listener: Listener
    method: str
    path: str
    authority: str
    protocol: str
    request_id: str
    started: float
    began: float
    downstream: str
    user_agent: str = ""
    forwarded_for: str = ""
    status: int = 0
    flags: list[str] = field(default_factory=list)
    route: str = ""
    cluster: str = ""
    upstream_host: str = ""
    destination: Endpoint | None = None
    destination_service: str = ""
    bytes_received: int = 0
    bytes_sent: int = 0
    attempts: int = 0
    upstream_time: float | None = None
    duration: float = 0.0

    @property
    def flag_text(self) -> str:
        return ",".join(self.flags) or "-"


Observer = Callable[[Exchange], None]


class Proxy:
    """Routes and forwards requests for every listener; owns the mirrors in flight."""

    def __init__(
        self,
        current: Current[Snapshot],
        upstreams: Upstreams,
        *,
        rng: random.Random | None = None,
        observers: tuple[Observer, ...] = (),
        debug_headers: bool = False,
    ) -> None:
        self.current = current
        self.upstreams = upstreams
        self.rng = rng or random.Random()
        self.observers = observers
        self.debug_headers = debug_headers
        self.mirrors: set[asyncio.Task[None]] = set()

    # ---- the request

    async def handle(self, request: Request, responder: Responder, listener: Listener, peer: str) -> None:
        snapshot = self.current.get()
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers}
        target = request.target.decode("latin-1")
        authority = headers.get("host", "")
        scheme = "http"
        if "://" in target[:8]:
            scheme, _, rest = target.partition("://")
            netloc, slash, tail = rest.partition("/")
            authority = netloc or authority
            target = slash + tail or "/"
        request_id = headers.get("x-request-id") or str(uuid.uuid4())
        exchange = Exchange(
            listener=listener,
            method=request.method.decode(),
            path=target,
            authority=authority,
            protocol=f"HTTP/{request.version.decode()}",
            request_id=request_id,
            started=time.time(),
            began=time.monotonic(),
            downstream=peer,
            user_agent=headers.get("user-agent", ""),
            forwarded_for=headers.get("x-forwarded-for", ""),
        )
        view = RequestView(
            method=exchange.method,
            path=target,
            authority=authority,
            headers=headers,
            scheme=scheme,
            port=listener.port if listener.kind == "gateway" else None,
            source=listener.workload,
            gateway=listener.gateways[0] if listener.kind == "gateway" and listener.gateways else "mesh",
            source_address=peer.rpartition(":")[0],
        )
        try:
            outcome = decide(snapshot, view, self.rng)
            exchange.route = getattr(outcome, "route_ref", "")
            await OUTCOMES[type(outcome)](self, outcome, request, responder, exchange, view, snapshot)
        finally:
            exchange.status = responder.status
            exchange.bytes_sent = responder.bytes_sent
            exchange.bytes_received = request.body.received
            exchange.duration = time.monotonic() - exchange.began
            for observer in self.observers:
                observer(exchange)

    def reply(
        self, responder: Responder, exchange: Exchange, reply: LocalReply, extra: HeaderList | None = None
    ) -> None:
        if reply.flag:
            exchange.flags.append(reply.flag)
        headers = [*reply.headers, *(extra or [])]
        if self.debug_headers and exchange.route:
            headers.append((b"x-minimesh-route", exchange.route.encode()))
        responder.reply(reply.status, reply.body, headers)

    # ---- outcomes other than forwarding

    async def _no_route(self, outcome: NoRoute, request: Request, responder: Responder, exchange: Exchange,
                        view: RequestView, snapshot: Snapshot) -> None:  # fmt: skip
        self.reply(responder, exchange, NO_ROUTE)

    async def _redirect(self, outcome: Redirect, request: Request, responder: Responder, exchange: Exchange,
                        view: RequestView, snapshot: Snapshot) -> None:  # fmt: skip
        reply = LocalReply(outcome.status, b"", "")
        self.reply(responder, exchange, reply, [(b"location", outcome.location.encode("latin-1"))])

    async def _direct(self, outcome: DirectResponse, request: Request, responder: Responder, exchange: Exchange,
                      view: RequestView, snapshot: Snapshot) -> None:  # fmt: skip
        self.reply(responder, exchange, LocalReply(outcome.status, outcome.body, ""))

    async def _black_hole(self, outcome: BlackHole, request: Request, responder: Responder, exchange: Exchange,
                          view: RequestView, snapshot: Snapshot) -> None:  # fmt: skip
        exchange.cluster = outcome.cluster
        self.reply(responder, exchange, BLACK_HOLE)

    async def _pass_through(self, outcome: PassThrough, request: Request, responder: Responder,
                            exchange: Exchange, view: RequestView, snapshot: Snapshot) -> None:  # fmt: skip
        host = outcome.host.strip("[]")
        cluster = Cluster(
            name=outcome.cluster, host=host, short=host, namespace="", subset=None, port=outcome.port,
            endpoints=(Endpoint(None, host, outcome.port),),
        )  # fmt: skip
        await self._forward_to(cluster, None, request, responder, exchange, view, NO_RETRY, None)

    # ---- forwarding

    async def _forward(self, outcome: Forward, request: Request, responder: Responder, exchange: Exchange,
                       view: RequestView, snapshot: Snapshot) -> None:  # fmt: skip
        fault = outcome.fault
        if fault is not None:
            if fault.delay is not None and self._roll(fault.delay.percentage):
                exchange.flags.append("DI")
                await asyncio.sleep(fault.delay.fixed_delay)
            if fault.abort is not None and self._roll(fault.abort.percentage):
                exchange.cluster = outcome.cluster.name
                self.reply(responder, exchange, LocalReply(fault.abort.http_status, FAULT_ABORT_BODY, "FI"))
                return
        cors = outcome.cors
        if cors is not None and _preflight(view):
            self._preflight_reply(cors, view, responder, exchange)
            return
        retry = NO_RETRY if fault is not None else RetryDecider.of(outcome.retries)
        timeout = None if fault is not None else outcome.timeout
        await self._forward_to(outcome.cluster, outcome, request, responder, exchange, view, retry, timeout)

    async def _forward_to(
        self,
        cluster: Cluster,
        outcome: Forward | None,
        request: Request,
        responder: Responder,
        exchange: Exchange,
        view: RequestView,
        retry: RetryDecider,
        timeout: float | None,
    ) -> None:
        exchange.cluster = cluster.name
        exchange.destination_service = cluster.host
        mirrors = outcome.mirrors if outcome is not None else ()
        body: Body | bytes = request.body
        if retry.attempts or mirrors:
            try:
                body = await request.body.read_all(BUFFER_LIMIT)
            except BodyTooLarge:
                self.reply(responder, exchange, PAYLOAD_TOO_LARGE)
                return
        path, authority = outcome.rewritten(exchange.path, exchange.authority) if outcome else (
            exchange.path, exchange.authority
        )  # fmt: skip
        head_parts = self._request_head(request, exchange, outcome, path, authority)
        for mirror in mirrors:
            if self._roll(mirror.percentage) and isinstance(body, bytes):
                self._mirror(mirror.cluster, request, head_parts, authority, body)
        state = self.upstreams.state(cluster)
        try:
            state.admit(cluster.policy.connection_pool)
        except UpstreamFailure as failure:
            self.reply(responder, exchange, failure.reply)
            return
        try:
            async with asyncio.timeout(timeout):
                response = await self._attempts(cluster, retry, request, body, head_parts, exchange, view)
        except TimeoutError:
            self.reply(responder, exchange, UPSTREAM_TIMEOUT)
            return
        except UpstreamFailure as failure:
            if failure.endpoint is not None:
                exchange.upstream_host = f"{failure.endpoint.address}:{failure.endpoint.port}"
            self.reply(responder, exchange, failure.reply)
            return
        finally:
            state.done()
        await self._respond(response, responder, exchange, outcome, view)

    def _request_head(
        self, request: Request, exchange: Exchange, outcome: Forward | None, path: str, authority: str
    ) -> list[bytes]:
        """The request line and headers sent upstream, less the attempt count and framing."""
        ops = outcome.request_headers if outcome is not None else m.HeaderOperations()
        drop = HOP_BY_HOP | REWRITTEN_REQUEST_HEADERS
        drop |= {name.encode() for name, _ in ops.set} | {name.encode() for name in ops.remove}
        parts = [request.method, b" ", path.encode("latin-1"), b" HTTP/1.1\r\nhost: ", authority.encode("latin-1"),
                 b"\r\nx-request-id: ", exchange.request_id.encode(), b"\r\n"]  # fmt: skip
        for name, value in request.headers:
            if name not in drop:
                parts += [name, b": ", value, b"\r\n"]
        for text_name, text_value in (*ops.set, *ops.add):
            parts += [text_name.encode(), b": ", text_value.encode("latin-1"), b"\r\n"]
        forwarded = exchange.forwarded_for
        if exchange.listener.kind == "gateway":
            forwarded = f"{forwarded}, {exchange.downstream.rpartition(':')[0]}".lstrip(", ")
        if forwarded:
            parts += [b"x-forwarded-for: ", forwarded.encode("latin-1"), b"\r\n"]
        parts.append(b"x-forwarded-proto: http\r\n")
        return parts

    async def _attempts(
        self,
        cluster: Cluster,
        decider: RetryDecider,
        request: Request,
        body: Body | bytes,
        head_parts: list[bytes],
        exchange: Exchange,
        view: RequestView,
    ) -> UpstreamResponse:
        """Attempts within the retry policy; the response to return, or the last failure."""
        attempts = 1 + decider.attempts
        state = self.upstreams.state(cluster)
        tried: list[Endpoint] = []
        last: UpstreamResponse | UpstreamFailure | None = None
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                if not state.admit_retry(cluster.policy.connection_pool):
                    break
                state.retry_done()
                ceiling = min(RETRY_BACKOFF_MAX, RETRY_BACKOFF_BASE * (2 ** (attempt - 1) - 1))
                await asyncio.sleep(self.rng.uniform(0, ceiling))
            endpoint = self._pick(cluster, view, tried)
            if endpoint is None:
                raise UpstreamFailure(NO_HEALTHY_UPSTREAM)
            tried.append(endpoint)
            exchange.attempts = attempt
            exchange.destination = endpoint
            exchange.upstream_host = f"{endpoint.address}:{endpoint.port}"
            head = b"".join([*head_parts, *_framing(body, request, attempt)])
            host = state.host(endpoint)
            host.in_flight += 1
            sent = time.monotonic()
            try:
                async with asyncio.timeout(decider.per_try_timeout):
                    response = await self.upstreams.send(
                        cluster, endpoint, head, body, head_request=request.method == b"HEAD"
                    )
            except TimeoutError:
                state.record(cluster, endpoint, 504)
                last = UpstreamFailure(UPSTREAM_TIMEOUT, endpoint)
                if not decider.retries_failure("UT"):
                    raise last from None
                continue
            except UpstreamFailure as failure:
                failure.endpoint = endpoint
                state.record(cluster, endpoint, 503)
                last = failure
                if not decider.retries_failure(failure.reply.flag) or not isinstance(body, bytes):
                    raise
                continue
            finally:
                host.in_flight -= 1
            exchange.upstream_time = time.monotonic() - sent
            state.record(cluster, endpoint, response.status)
            if attempt < attempts and decider.retries_status(response.status) and isinstance(body, bytes):
                last = response
                response.conn.close()
                continue
            return response
        if isinstance(last, UpstreamResponse):
            exchange.flags.append("URX")
            return last
        if last is not None:
            exchange.flags.append("URX")
            raise last
        raise UpstreamFailure(NO_HEALTHY_UPSTREAM)

    def _pick(self, cluster: Cluster, view: RequestView, tried: list[Endpoint]) -> Endpoint | None:
        state = self.upstreams.state(cluster)
        ejected = state.ejected(cluster)
        balancer = state.balancer(cluster, self.rng)
        consistent = cluster.policy.load_balancer.consistent_hash
        key = hash_key(consistent, view) if consistent is not None else None
        exclude = ejected | frozenset(tried) if len(tried) < len(cluster.endpoints) - len(ejected) else ejected
        return balancer.pick(key=key, exclude=exclude)

    async def _respond(
        self, response: UpstreamResponse, responder: Responder, exchange: Exchange, outcome: Forward | None,
        view: RequestView,
    ) -> None:  # fmt: skip
        ops = outcome.response_headers if outcome is not None else m.HeaderOperations()
        drop = {name.encode() for name, _ in ops.set} | {name.encode() for name in ops.remove} | {b"server"}
        headers = [(name, value) for name, value in response.headers if name not in drop]
        headers += [(name.encode(), value.encode("latin-1")) for name, value in (*ops.set, *ops.add)]
        if response.header(b"date") is None:
            headers.append((b"date", DATE.get()))
        headers.append((b"server", b"istio-envoy"))
        if exchange.upstream_time is not None:
            headers.append((b"x-envoy-upstream-service-time", str(int(exchange.upstream_time * 1000)).encode()))
        if outcome is not None and outcome.cors is not None:
            headers += _cors_headers(outcome.cors, view)
        if self.debug_headers and exchange.route:
            headers.append((b"x-minimesh-route", exchange.route.encode()))
        responder.send_head(response.status, headers, response.length, reason_phrase=response.reason)
        responder.set_producer(response.conn.transport)
        body = response.body
        try:
            while True:
                chunk = await body.read()
                if not chunk:
                    break
                responder.send(chunk)
                await responder.drain()
        except UpstreamClosed:
            exchange.flags.append("UPE")
            responder.abort()
            return
        finally:
            responder.set_producer(None)
        responder.end()

    # ---- helpers

    def _roll(self, percentage: float | None) -> bool:
        """Does a percentage-gated action fire? No percentage means never (Istio's default)."""
        if percentage is None:
            return False
        return percentage >= 100.0 or self.rng.random() * 100.0 < percentage

    def _mirror(self, cluster: Cluster, request: Request, head_parts: list[bytes], authority: str, body: bytes) -> None:
        if len(self.mirrors) >= MIRRORS_IN_FLIGHT or not cluster.endpoints:
            return
        shadow = authority.partition(":")
        shadow_host = f"{shadow[0]}-shadow{shadow[1]}{shadow[2]}".encode("latin-1")
        parts = list(head_parts)
        parts[4] = shadow_host
        head = b"".join([*parts, b"content-length: ", str(len(body)).encode(), b"\r\n\r\n"])
        endpoint = cluster.endpoints[self.rng.randrange(len(cluster.endpoints))]
        task = asyncio.get_running_loop().create_task(self._send_mirror(cluster, endpoint, head, body))
        self.mirrors.add(task)
        task.add_done_callback(self.mirrors.discard)

    async def _send_mirror(self, cluster: Cluster, endpoint: Endpoint, head: bytes, body: bytes) -> None:
        try:
            async with asyncio.timeout(30):
                response = await self.upstreams.send(cluster, endpoint, head, body)
                while await response.body.read():
                    pass
        except (UpstreamFailure, UpstreamClosed, TimeoutError):
            return

    def _preflight_reply(self, cors: m.CorsPolicy, view: RequestView, responder: Responder, exchange: Exchange) -> None:
        headers = _cors_headers(cors, view)
        if headers:
            if cors.allow_methods:
                headers.append((b"access-control-allow-methods", ",".join(cors.allow_methods).encode()))
            if cors.allow_headers:
                headers.append((b"access-control-allow-headers", ",".join(cors.allow_headers).encode()))
            if cors.max_age is not None:
                headers.append((b"access-control-max-age", str(int(cors.max_age)).encode()))
        self.reply(responder, exchange, LocalReply(200, b"", ""), headers)

    async def close(self) -> None:
        for task in list(self.mirrors):
            task.cancel()
        await asyncio.gather(*self.mirrors, return_exceptions=True)
        self.upstreams.close()


def _framing(body: Body | bytes, request: Request, attempt: int) -> list[bytes]:
    count = b"x-envoy-attempt-count: %d\r\n" % attempt
    if isinstance(body, bytes):
        if body or request.method in (b"POST", b"PUT", b"PATCH"):
            return [count, b"content-length: %d\r\n\r\n" % len(body)]
        return [count, b"\r\n"]
    if body.complete and body.buffered == 0:
        return [count, b"\r\n"]
    return [count, b"transfer-encoding: chunked\r\n\r\n"]


def _preflight(view: RequestView) -> bool:
    return view.method == "OPTIONS" and "origin" in view.headers and "access-control-request-method" in view.headers


def _cors_headers(cors: m.CorsPolicy, view: RequestView) -> HeaderList:
    origin = view.headers.get("origin")
    if origin is None or not any(match.matches(origin) for match in cors.allow_origins):
        return []
    headers: HeaderList = [(b"access-control-allow-origin", origin.encode("latin-1"))]
    if cors.allow_credentials:
        headers.append((b"access-control-allow-credentials", b"true"))
    if cors.expose_headers:
        headers.append((b"access-control-expose-headers", ",".join(cors.expose_headers).encode()))
    return headers


OUTCOMES: dict[type, Callable[..., Awaitable[None]]] = {
    NoRoute: Proxy._no_route,
    Redirect: Proxy._redirect,
    DirectResponse: Proxy._direct,
    BlackHole: Proxy._black_hole,
    PassThrough: Proxy._pass_through,
    Forward: Proxy._forward,
}
"""Each kind of routing outcome and the method that carries it out."""
