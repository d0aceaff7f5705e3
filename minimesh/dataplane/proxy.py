"""The proxy: one request in, routing's decision, the route's steps, one response out.

Every listener (gateway, sidecar) hands its parsed requests to `Proxy.handle`. The
snapshot is read once per request; the steps run in the order of Istio's filter chain and
Envoy's router: CORS, fault, body buffering (for retries and mirrors), mirror, admission
(`http2MaxRequests`), route timeout, then attempts (pick an endpoint, per-try timeout,
send, retry decision with back-off, outlier record), and the response streamed back.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar

from minimesh.config import model as m
from minimesh.dataplane.current import Current
from minimesh.dataplane.fault import Faults, fires
from minimesh.dataplane.http1 import (
    DATE,
    HOP_BY_HOP,
    READ_HIGH_WATER,
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
    PROTOCOL_ERROR,
    UPGRADE_FAILED,
    UPSTREAM_TIMEOUT,
    ClusterState,
    Dial,
    LocalReply,
    UpstreamFailure,
    Upstreams,
)
from minimesh.registry.model import Workload
from minimesh.routing.match import decide
from minimesh.routing.pick import hash_key, set_cookie
from minimesh.routing.request import RequestView
from minimesh.routing.snapshot import (
    NO_OPERATIONS,
    BlackHole,
    Cluster,
    DirectResponse,
    Endpoint,
    Forward,
    Mirror,
    NoRoute,
    PassThrough,
    Redirect,
    RetryPolicy,
    Route,
    Snapshot,
)

BUFFER_LIMIT = READ_HIGH_WATER
"""Envoy's default `per_connection_buffer_limit_bytes` (1 MiB), which bounds the copy of a
request body kept for retries and mirrors: a longer body is streamed with both abandoned.
At most what a connection buffers before it stops reading, so waiting for it never stalls."""
MIRRORS_IN_FLIGHT = 64
"""Mirrored requests in flight at once; more are dropped (mirrors must never slow traffic)."""
MIRROR_TIMEOUT = 30.0
RETRY_BACKOFF_BASE = 0.025
RETRY_BACKOFF_MAX = 0.250
"""Envoy's retry back-off: fully jittered, 25 ms base, at most 250 ms."""
FAULT_ABORT_BODY = b"fault filter abort"
SCOPE_HEADER = b"x-minimesh-test"
BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
"""Methods whose empty body is still framed with `content-length: 0`, as Envoy does."""
REWRITTEN_REQUEST_HEADERS = frozenset(
    {b"host", b"content-length", b"x-request-id", b"x-envoy-attempt-count", b"expect", b"x-forwarded-for",
     b"x-forwarded-proto"}
)  # fmt: skip
"""Request headers the proxy writes itself; the client's copies are not passed on."""
FLAG_ORDER = (
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR", "RBAC",
)  # fmt: skip
"""Envoy's access-log flags in the order `%RESPONSE_FLAGS%` prints them."""
FLAG_RANK = {flag: rank for rank, flag in enumerate(FLAG_ORDER)}
WHOLE_LIMIT = 1 << 16
"""A response body already complete and no longer than this goes out with its head in one write."""
AUTHORITY_AT = 4
"""Where the authority sits in a request head's parts (a mirror swaps in HOST-shadow)."""


@dataclass(frozen=True, slots=True)
class Listener:
    """Who is serving, on `address:port`: the ingress gateway (`gateway`), the outbound side
    of `workload`'s sidecar (`sidecar`), or its inbound side (`inbound`), which hands requests
    to the app through `dial` (a socket made inside the app's network namespace)."""

    kind: str
    port: int
    gateways: tuple[str, ...] = ()
    workload: Workload | None = None
    address: str = ""
    dial: Dial | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.workload.name if self.workload else "istio-ingressgateway"


def inbound_cluster_name(workload: Workload, port: int) -> str:
    """Envoy's inbound cluster name, with the workload (one daemon serves every sidecar)."""
    return f"inbound|{port}||{workload.name}.{workload.namespace}"


class Exchange:
    """One request's (or one TCP connection's) path through the proxy: what the access log
    and metrics read.
    (A plain class: made per request, and a compiled `__init__` is ten times a dataclass's.)"""

    __slots__ = (
        "attempts", "authority", "began", "bytes_received", "bytes_sent", "cluster", "destination",
        "destination_service", "details", "downstream", "duration", "flags", "forwarded_for", "listener", "method",
        "original", "path", "protocol", "request_id", "route", "sni", "started", "status", "tcp", "upstream_host",
        "upstream_time", "user_agent",
    )  # fmt: skip

    def __init__(
        self,
        listener: Listener,
        method: str,
        path: str,
        authority: str,
        protocol: str,
        request_id: str,
        started: float,
        began: float,
        downstream: str,
        user_agent: str = "",
        forwarded_for: str = "",
    ) -> None:
        self.listener = listener
        self.method = method
        self.path = path
        self.authority = authority
        self.protocol = protocol
        self.request_id = request_id
        self.started = started
        self.began = began
        self.downstream = downstream
        self.user_agent = user_agent
        self.forwarded_for = forwarded_for
        self.status = 0
        self.flags: list[str] = []
        self.route = ""
        self.cluster = ""
        self.upstream_host = ""
        self.destination: Endpoint | None = None
        self.destination_service = ""
        self.bytes_received = 0
        self.bytes_sent = 0
        self.attempts = 0
        self.upstream_time: float | None = None
        self.duration = 0.0
        self.original: tuple[str, int] | None = None
        self.details = ""
        """Envoy's %RESPONSE_CODE_DETAILS% when the flags do not imply it."""
        self.tcp = False
        """A connection proxied as bytes (tcp_proxy), not an HTTP request: `bytes_received`
        went upstream, `bytes_sent` came back, and there is no status."""
        self.sni = ""
        """The server name a TLS connection offered (%REQUESTED_SERVER_NAME%)."""

    @property
    def flag_text(self) -> str:
        """`%RESPONSE_FLAGS%`: the flags in Envoy's order, `-` when none."""
        if not self.flags:
            return "-"
        return ",".join(sorted(dict.fromkeys(self.flags), key=lambda flag: FLAG_RANK.get(flag, len(FLAG_RANK))))


Observer = Callable[[Exchange], None]

ENTERED, EXPIRING, EXPIRED, EXITED = range(4)


class Deadline:
    """`asyncio.timeout(delay)` for the request path, with the same semantics (when due, cancel
    the task; out of the block that cancellation comes as TimeoutError), but handed the loop
    rather than asking for it and for the task: on Python 3.11 each ask is a `getpid()`."""

    __slots__ = ("_cancelling", "_handle", "_loop", "_state", "_task", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._loop = loop
        self.when = loop.time() + delay
        self._state = ENTERED
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.Handle | None = None
        self._cancelling = 0

    def expired(self) -> bool:
        return self._state in (EXPIRING, EXPIRED)

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task(self._loop)
        if task is None:
            raise RuntimeError("a Deadline works inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        loop = self._loop
        if self.when <= loop.time():
            self._handle = loop.call_soon(self._expire)
        else:
            self._handle = loop.call_at(self.when, self._expire)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._state == EXPIRING:
            self._state = EXPIRED
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
                raise TimeoutError from error
        elif self._state == ENTERED:
            self._state = EXITED

    def _expire(self) -> None:
        assert self._task is not None
        self._task.cancel()
        self._state = EXPIRING
        self._handle = None

    def __repr__(self) -> str:
        state = ("entered", "expiring", "expired", "exited")[self._state]
        return f"<Deadline when={self.when:.3f} {state}>"


PROTOCOLS = {b"1.1": "HTTP/1.1", b"1.0": "HTTP/1.0"}
UUID4_KEEP = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
UUID4_MARK = (4 << 76) | (0x8000 << 48)
"""A version 4 UUID: 122 random bits, the version nibble 4 and the RFC 4122 variant bits."""
_ID_BITS = random.Random()
"""The request ids' own generator (seeded from the OS), apart from the proxy's rng so a seeded
run draws the same splits whatever the ids; cheaper than `uuid.uuid4`'s `os.urandom` per request."""


def request_id(bits: Callable[[int], int] = _ID_BITS.getrandbits) -> str:
    """A fresh `x-request-id`: a random UUID4 in its canonical text form, as Envoy makes them."""
    text = "%032x" % (bits(128) & UUID4_KEEP | UUID4_MARK)
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


class LazyHeaders(Mapping[str, str]):
    """A request's headers as routing reads them (names lower-case, text latin-1, the last of a
    repeated name), decoded only when something reads them: most requests never do."""

    __slots__ = ("_decoded", "_raw")

    def __init__(self, raw: dict[bytes, bytes]) -> None:
        self._raw = raw
        self._decoded: dict[str, str] | None = None

    def _text(self) -> dict[str, str]:
        decoded = self._decoded
        if decoded is None:
            decoded = self._decoded = {n.decode("latin-1"): v.decode("latin-1") for n, v in self._raw.items()}
        return decoded

    def __getitem__(self, name: str) -> str:
        return self._text()[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self._text().get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._text()

    def __iter__(self) -> Iterator[str]:
        return iter(self._text())

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"<LazyHeaders {self._text()!r}>"


K = TypeVar("K")
V = TypeVar("V")


class _ByIdentity(Generic[K, V]):
    """Values derived once from snapshot objects, looked up by identity (no hashing of the
    frozen config on the hot path); bounded, so old snapshots' entries do not pile up."""

    __slots__ = ("_build", "_entries")

    def __init__(self, build: Callable[[K], V]) -> None:
        self._build = build
        self._entries: dict[int, tuple[K, V]] = {}

    def get(self, key: K) -> V:
        entry = self._entries.get(id(key))
        if entry is not None and entry[0] is key:
            return entry[1]
        if len(self._entries) >= 4096:
            self._entries.clear()
        value = self._build(key)
        self._entries[id(key)] = (key, value)
        return value


@dataclass(frozen=True, slots=True)
class _RequestOps:
    """A route's request header operations, ready to apply: names to drop, lines to add."""

    drop: frozenset[bytes]
    lines: tuple[bytes, ...]

    @classmethod
    def of(cls, ops: m.HeaderOperations) -> _RequestOps:
        drop = (
            HOP_BY_HOP | REWRITTEN_REQUEST_HEADERS | {n.encode() for n, _ in ops.set} | {n.encode() for n in ops.remove}
        )
        lines = tuple(b"%b: %b\r\n" % (n.encode(), v.encode("latin-1")) for n, v in (*ops.set, *ops.add))
        return cls(frozenset(drop), lines)


@dataclass(frozen=True, slots=True)
class _ResponseOps:
    """A route's response header operations, ready to apply."""

    drop: frozenset[bytes]
    add: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def of(cls, ops: m.HeaderOperations) -> _ResponseOps:
        drop = {b"server"} | {n.encode() for n, _ in ops.set} | {n.encode() for n in ops.remove}
        return cls(frozenset(drop), tuple((n.encode(), v.encode("latin-1")) for n, v in (*ops.set, *ops.add)))


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
        self._inbound_clusters: dict[tuple[str, int], Cluster] = {}
        self.scoped: Mapping[str, Snapshot] = {}
        """Snapshots of scoped overlays: a request with `x-minimesh-test: SCOPE` is served by one."""
        self.observers = observers
        self.openers = openers
        """Told of each TCP connection once it is routed (`observers` are told when it closes)."""
        self.debug_headers = debug_headers
        self.mirrors: set[asyncio.Task[None]] = set()
        self._deciders: _ByIdentity[RetryPolicy, RetryDecider] = _ByIdentity(RetryDecider.of)
        self._request_ops: _ByIdentity[m.HeaderOperations, _RequestOps] = _ByIdentity(_RequestOps.of)
        self._response_ops: _ByIdentity[m.HeaderOperations, _ResponseOps] = _ByIdentity(_ResponseOps.of)
        self._loop: asyncio.AbstractEventLoop | None = None

    def _deadline(self, delay: float) -> Deadline:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return Deadline(loop, delay)

    # ---- the request

    async def handle(
        self,
        request: Request,
        responder: Responder,
        listener: Listener,
        peer: str,
        original: tuple[str, int] | None = None,
    ) -> None:
        """Serve one request; `original` is where a transparently captured connection was headed."""
        snapshot = self.current.get()
        raw = dict(request.headers)
        if self.scoped:
            snapshot = self.scoped.get(raw.get(SCOPE_HEADER, b"").decode("latin-1"), snapshot)
        target = request.target.decode("latin-1")
        authority = raw.get(b"host", b"").decode("latin-1")
        scheme = "http"
        if "://" in target[:8]:
            scheme, _, rest = target.partition("://")
            netloc, slash, tail = rest.partition("/")
            authority = netloc or authority
            target = slash + tail or "/"
        exchange = Exchange(
            listener,
            request.method.decode(),
            target,
            authority,
            PROTOCOLS.get(request.version) or f"HTTP/{request.version.decode()}",
            raw.get(b"x-request-id", b"").decode("latin-1") or request_id(),
            time.time(),
            time.monotonic(),
            peer,
            raw.get(b"user-agent", b"").decode("latin-1"),
            raw.get(b"x-forwarded-for", b"").decode("latin-1"),
        )
        exchange.original = original
        if not authority and original is not None:
            authority = exchange.authority = f"{original[0]}:{original[1]}"
        gateway = listener.kind == "gateway"
        view = RequestView(
            exchange.method,
            target,
            authority,
            LazyHeaders(raw),
            scheme,
            listener.port if gateway else original[1] if original else None,
            listener.workload,
            (listener.gateways or ("",))[0] if gateway else "mesh",
            peer,
        )
        try:
            if request.upgrade is not None and not self._upgrade_allowed(request, responder, exchange):
                return
            if listener.kind == "inbound" and original is not None and listener.workload is not None:
                await self._inbound(listener.workload, listener.dial, original[1], request, responder, exchange, view)
                return
            outcome = decide(snapshot, view, self.rng)
            exchange.route = getattr(outcome, "route_ref", "")
            await OUTCOMES[type(outcome)](self, outcome, request, responder, exchange, view, snapshot)
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

    def _upgrade_allowed(self, request: Request, responder: Responder, exchange: Exchange) -> bool:
        """Istio's listeners upgrade to WebSocket only: `h2c` is dropped (the request goes on as
        plain HTTP/1.1), any other protocol is refused with 403 `upgrade_failed`."""
        wanted = (request.upgrade or b"").lower()
        if wanted == b"websocket":
            return True
        if wanted == b"h2c":
            request.upgrade = None
            request.headers = [(name, value) for name, value in request.headers if name != b"http2-settings"]
            return True
        exchange.details = "upgrade_failed"
        self.reply(responder, exchange, UPGRADE_FAILED)
        return False

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

    def reply(
        self,
        responder: Responder,
        exchange: Exchange,
        reply: LocalReply,
        extra: HeaderList | None = None,
        route: Route | None = None,
    ) -> None:
        """A local reply; `route` is the rule that made it, whose response headers apply."""
        if reply.flag:
            exchange.flags.append(reply.flag)
        headers = [*reply.headers, *(extra or ())]
        if route is not None:
            ops = self._response_ops.get(route.response_headers)
            headers = [header for header in headers if header[0] not in ops.drop]
            headers += ops.add
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
        self.reply(responder, exchange, reply, [(b"location", outcome.location.encode("latin-1"))], outcome.route)

    async def _direct(self, outcome: DirectResponse, request: Request, responder: Responder, exchange: Exchange,
                      view: RequestView, snapshot: Snapshot) -> None:  # fmt: skip
        self.reply(responder, exchange, LocalReply(outcome.status, outcome.body, ""), route=outcome.route)

    async def _black_hole(self, outcome: BlackHole, request: Request, responder: Responder, exchange: Exchange,
                          view: RequestView, snapshot: Snapshot) -> None:  # fmt: skip
        exchange.cluster = outcome.cluster
        self.reply(responder, exchange, BLACK_HOLE)

    async def _pass_through(self, outcome: PassThrough, request: Request, responder: Responder,
                            exchange: Exchange, view: RequestView, snapshot: Snapshot) -> None:  # fmt: skip
        host, port = exchange.original or (outcome.host.strip("[]"), outcome.port)
        cluster = Cluster(
            name=outcome.cluster, host=host, short=host, namespace="", subset=None, port=port,
            endpoints=(Endpoint(None, host, port),),
        )  # fmt: skip
        await self._forward_to(cluster, None, request, responder, exchange, view, NO_RETRY, None, [])

    async def _inbound(
        self,
        workload: Workload,
        dial: Dial | None,
        port: int,
        request: Request,
        responder: Responder,
        exchange: Exchange,
        view: RequestView,
    ) -> None:
        """The server side of a sidecar: hand the request to the app on 127.0.0.1 in its namespace."""
        cluster = self.inbound_cluster(workload, port, dial)
        await self._forward_to(cluster, None, request, responder, exchange, view, NO_RETRY, None, [])

    def inbound_cluster(self, workload: Workload, port: int, dial: Dial | None) -> Cluster:
        """The cluster of `workload`'s app on `port`, reached through `dial` (from inside its namespace)."""
        key = (workload.name, port)
        cluster = self._inbound_clusters.get(key)
        if cluster is None or cluster.endpoints[0].workload != workload:
            service = workload.service or workload.name
            cluster = Cluster(
                name=inbound_cluster_name(workload, port), host=f"{service}.{workload.namespace}.svc.cluster.local",
                short=service, namespace=workload.namespace, subset=None, port=port,
                endpoints=(Endpoint(workload, "127.0.0.1", port, workload.labels),),
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

    async def _forward(self, outcome: Forward, request: Request, responder: Responder, exchange: Exchange,
                       view: RequestView, snapshot: Snapshot) -> None:  # fmt: skip
        route = outcome.route
        cors = route.cors
        cors_headers = _cors_headers(cors, view) if cors is not None else []
        if cors is not None and _preflight(view) and (cors_headers or cors.unmatched_preflights == "IGNORE"):
            self._preflight_reply(cors, cors_headers, responder, exchange)
            return
        if route.fault is not None:
            injection = self.faults.decide(route)
            if injection.delay is not None:
                exchange.flags.append("DI")
                await asyncio.sleep(injection.delay)
            if injection.abort is not None:
                exchange.cluster = outcome.cluster.name
                abort = LocalReply(injection.abort, FAULT_ABORT_BODY, "FI")
                self.reply(responder, exchange, abort, cors_headers)
                return
        retry = NO_RETRY if route.retries is None else self._deciders.get(route.retries)
        await self._forward_to(
            outcome.cluster, outcome, request, responder, exchange, view, retry, route.timeout, cors_headers
        )

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
        cors_headers: HeaderList,
    ) -> None:
        exchange.cluster = cluster.name
        exchange.destination_service = cluster.host
        mirrors = outcome.mirrors if outcome is not None and outcome.route.mirrors and request.upgrade is None else ()
        body: Body | bytes = request.body
        if not request.has_body:
            body = b""
        elif retry.attempts or mirrors:
            try:
                body = await request.body.read_all(BUFFER_LIMIT)
            except BodyTooLarge:
                retry, mirrors = NO_RETRY, ()
        path, authority = outcome.rewritten(exchange.path, exchange.authority) if outcome else (
            exchange.path, exchange.authority
        )  # fmt: skip
        ops = self._request_ops.get(outcome.request_headers if outcome is not None else NO_OPERATIONS)
        head_parts = self._request_head(request, exchange, ops, path, authority)
        if isinstance(body, bytes):
            for mirror in mirrors:
                if fires(self.rng, mirror.percentage):
                    self._mirror(mirror, view, head_parts, body)
        state = self.upstreams.state(cluster)
        try:
            state.admit(cluster.policy.connection_pool)
        except UpstreamFailure as failure:
            self.reply(responder, exchange, failure.reply, cors_headers)
            return
        try:
            if timeout is None:
                switched = await self._exchange(cluster, state, retry, request, body, head_parts, exchange, view,
                                                None, responder, outcome, cors_headers)  # fmt: skip
            else:
                async with self._deadline(timeout) as deadline:
                    switched = await self._exchange(cluster, state, retry, request, body, head_parts, exchange,
                                                    view, deadline, responder, outcome, cors_headers)  # fmt: skip
            if switched is not None:
                await self._tunnel(switched, responder)
        except TimeoutError:
            if not responder.head_sent:
                self.reply(responder, exchange, UPSTREAM_TIMEOUT, cors_headers)
            elif not responder.ended:
                exchange.flags.append("UT")
                responder.abort()
        except UpstreamFailure as failure:
            if failure.endpoint is not None:
                exchange.upstream_host = f"{failure.endpoint.address}:{failure.endpoint.port}"
            self.reply(responder, exchange, failure.reply, cors_headers)
        finally:
            state.done()

    async def _exchange(
        self,
        cluster: Cluster,
        state: ClusterState,
        retry: RetryDecider,
        request: Request,
        body: Body | bytes,
        head_parts: list[bytes],
        exchange: Exchange,
        view: RequestView,
        deadline: Deadline | None,
        responder: Responder,
        outcome: Forward | None,
        cors_headers: HeaderList,
    ) -> UpstreamResponse | None:
        """The attempts, then the response passed on, all within the route's `deadline`, as
        Envoy's route timeout covers the whole response. A 101 to an upgrade is returned
        instead: the tunnel it opens outlives the timeout, as in Envoy."""
        response, endpoint = await self._attempts(cluster, state, retry, request, body, head_parts, exchange, view,
                                                  deadline)  # fmt: skip
        host = state.host(endpoint)
        try:
            if response.status == 101:
                if request.upgrade is None:
                    response.conn.close()
                    raise UpstreamFailure(PROTOCOL_ERROR, endpoint)
                return response
            affinity = cluster.policy.cookie
            cookie = None if affinity is None else set_cookie(affinity, view)
            await self._respond(response, responder, exchange, outcome, cors_headers, cookie)
            return None
        finally:
            host.in_flight -= 1

    def _request_head(
        self, request: Request, exchange: Exchange, ops: _RequestOps, path: str, authority: str
    ) -> list[bytes]:
        """The request line and headers sent upstream, less the attempt count and framing.

        The gateway is the edge (Istio's `use_remote_address`): it appends the client to
        x-forwarded-for and says `x-forwarded-proto: http`; a sidecar keeps what it got."""
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

    async def _attempts(
        self,
        cluster: Cluster,
        state: ClusterState,
        decider: RetryDecider,
        request: Request,
        body: Body | bytes,
        head_parts: list[bytes],
        exchange: Exchange,
        view: RequestView,
        deadline: Deadline | None,
    ) -> tuple[UpstreamResponse, Endpoint]:
        """Attempts within the retry policy: the response to pass on and its endpoint, or the
        failure to answer with. Exhausted retries add `URX`; a retry refused by `maxRetries`
        adds `UO`. The endpoint stays counted in flight until the caller has the body through."""
        pool = cluster.policy.connection_pool
        head_request = request.method == b"HEAD"
        framing = _framing(body, request)
        chunked = framing == CHUNKED
        tried: list[Endpoint] = []
        attempt = 0
        retrying = False
        while True:
            attempt += 1
            endpoint = self._pick(cluster, state, view, tried)
            if endpoint is None:
                if retrying:
                    state.retry_done()
                raise UpstreamFailure(NO_HEALTHY_UPSTREAM)
            if decider.attempts:
                tried.append(endpoint)
            exchange.attempts = attempt
            exchange.destination = endpoint
            exchange.upstream_host = f"{endpoint.address}:{endpoint.port}"
            head = b"".join([*head_parts, b"x-envoy-attempt-count: %d\r\n" % attempt, *framing])
            host = state.host(endpoint)
            host.in_flight += 1
            sent = time.monotonic()
            failure: UpstreamFailure | None = None
            try:
                if decider.per_try_timeout is None:
                    response = await self.upstreams.send(cluster, endpoint, head, body, head_request=head_request,
                                                         chunked=chunked)  # fmt: skip
                else:
                    async with self._deadline(decider.per_try_timeout):
                        response = await self.upstreams.send(cluster, endpoint, head, body, head_request=head_request,
                                                             chunked=chunked)  # fmt: skip
            except TimeoutError:
                failure = UpstreamFailure(UPSTREAM_TIMEOUT, endpoint)
            except UpstreamFailure as raised:
                raised.endpoint = endpoint
                failure = raised
            except asyncio.CancelledError:
                host.in_flight -= 1
                if deadline is not None and deadline.expired():
                    state.record(cluster, endpoint, 504)
                raise
            finally:
                if retrying:
                    state.retry_done()
                    retrying = False
            if failure is not None:
                host.in_flight -= 1
                state.record(cluster, endpoint, 504 if failure.reply is UPSTREAM_TIMEOUT else 503)
                if not decider.retries_failure(failure.reply.flag) or self._no_retry(
                    attempt, decider, state, pool, exchange
                ):
                    raise failure
            else:
                exchange.upstream_time = time.monotonic() - sent
                state.record(cluster, endpoint, response.status)
                if not decider.retries_status(response.status) or self._no_retry(
                    attempt, decider, state, pool, exchange
                ):
                    return response, endpoint
                host.in_flight -= 1
                response.conn.close()
            retrying = True
            ceiling = min(RETRY_BACKOFF_MAX, RETRY_BACKOFF_BASE * (2**attempt - 1))
            try:
                await asyncio.sleep(self.rng.uniform(0, ceiling))
            except asyncio.CancelledError:
                state.retry_done()
                raise

    @staticmethod
    def _no_retry(
        attempt: int, decider: RetryDecider, state: ClusterState, pool: m.ConnectionPool, exchange: Exchange
    ) -> bool:
        """Whether a retriable attempt ends the retries: they are used up (`URX`), or
        `maxRetries` is reached across the cluster (`UO`); else one retry is counted in."""
        if attempt > decider.attempts:
            exchange.flags.append("URX")
            return True
        if not state.admit_retry(pool):
            exchange.flags.append("UO")
            return True
        return False

    def _pick(self, cluster: Cluster, state: ClusterState, view: RequestView, tried: list[Endpoint]) -> Endpoint | None:
        """An endpoint that is not ejected, avoiding the ones already tried while others
        remain (Istio's `previous_hosts` retry predicate)."""
        ejected = state.ejected(cluster)
        balancer = state.balancer(cluster, self.rng)
        consistent = cluster.policy.load_balancer.consistent_hash
        key = hash_key(consistent, view) if consistent is not None else None
        exclude: frozenset[Endpoint] = ejected
        if tried:
            avoid = ejected.union(tried)
            if len(avoid) < len(cluster.endpoints):
                exclude = avoid
        return balancer.pick(key=key, exclude=exclude)

    async def _tunnel(self, response: UpstreamResponse, responder: Responder) -> None:
        """The upstream switched protocols (WebSocket, as Istio allows by default): its 101
        goes back, then bytes pass both ways until either side closes."""
        tunnel = responder.switch(response.headers, response.conn)
        try:
            await tunnel.done
        finally:
            tunnel.close()

    async def _respond(
        self,
        response: UpstreamResponse,
        responder: Responder,
        exchange: Exchange,
        outcome: Forward | None,
        cors_headers: HeaderList,
        cookie: bytes | None,
    ) -> None:
        """Pass the upstream's response on; `cookie` is an affinity `Set-Cookie` to add, which
        the route's response header operations may drop as Envoy's would."""
        ops = self._response_ops.get(outcome.response_headers if outcome is not None else NO_OPERATIONS)
        drop = ops.drop
        headers = [(name, value) for name, value in response.headers if name not in drop]
        if cookie is not None and b"set-cookie" not in drop:
            headers.append((b"set-cookie", cookie))
        headers += ops.add
        if response.header(b"date") is None:
            headers.append((b"date", DATE.get()))
        headers.append((b"server", b"istio-envoy"))
        if exchange.upstream_time is not None:
            headers.append((b"x-envoy-upstream-service-time", b"%d" % int(exchange.upstream_time * 1000)))
        headers += cors_headers
        if self.debug_headers and exchange.route:
            headers.append((b"x-minimesh-route", exchange.route.encode()))
        body = response.body
        if body.complete and body.error is None and body.buffered <= WHOLE_LIMIT:
            responder.send_whole(response.status, headers, response.length, body.take(), reason_phrase=response.reason)
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

    # ---- mirrors and CORS

    def _mirror(self, mirror: Mirror, view: RequestView, head_parts: list[bytes], body: bytes) -> None:
        """Send a copy to the mirror's cluster with Host `HOST-shadow`, in the background; its
        response is read and dropped, and it never holds up the request it copies."""
        cluster = mirror.cluster
        if len(self.mirrors) >= MIRRORS_IN_FLIGHT or not cluster.endpoints:
            return
        state = self.upstreams.state(cluster)
        endpoint = self._pick(cluster, state, view, [])
        if endpoint is None:
            return
        host, colon, port = head_parts[AUTHORITY_AT].partition(b":")
        parts = list(head_parts)
        parts[AUTHORITY_AT] = host + b"-shadow" + colon + port
        head = b"".join([*parts, b"content-length: %d\r\n\r\n" % len(body)])
        task = asyncio.get_running_loop().create_task(self._send_mirror(cluster, endpoint, head, body))
        self.mirrors.add(task)
        task.add_done_callback(self.mirrors.discard)

    async def _send_mirror(self, cluster: Cluster, endpoint: Endpoint, head: bytes, body: bytes) -> None:
        try:
            async with asyncio.timeout(MIRROR_TIMEOUT):
                response = await self.upstreams.send(cluster, endpoint, head, body)
                while await response.body.read():
                    pass
        except (UpstreamFailure, UpstreamClosed, TimeoutError):
            return

    def _preflight_reply(
        self, cors: m.CorsPolicy, cors_headers: HeaderList, responder: Responder, exchange: Exchange
    ) -> None:
        """Envoy's CORS filter answers a preflight itself: 200 with the allowed methods and
        headers and the max age (expose headers are for the actual request)."""
        headers = [h for h in cors_headers if h[0] != b"access-control-expose-headers"]
        if headers:
            if cors.allow_methods:
                headers.append((b"access-control-allow-methods", ",".join(cors.allow_methods).encode()))
            if cors.allow_headers:
                headers.append((b"access-control-allow-headers", ",".join(cors.allow_headers).encode()))
            if cors.max_age is not None:
                headers.append((b"access-control-max-age", b"%d" % int(cors.max_age)))
        self.reply(responder, exchange, LocalReply(200, b"", ""), headers)

    async def close(self) -> None:
        for task in list(self.mirrors):
            task.cancel()
        await asyncio.gather(*self.mirrors, return_exceptions=True)
        self.upstreams.close()


CHUNKED = (b"transfer-encoding: chunked\r\n\r\n",)
REJECTED_DETAILS = {400: "http1.codec_error", 408: "request_header_timeout", 431: "http1.headers_too_large"}
NO_BODY = (b"\r\n",)


def _framing(body: Body | bytes, request: Request) -> tuple[bytes, ...]:
    """How the request body is framed upstream: its length when known, else chunked."""
    if isinstance(body, bytes):
        if body or request.method in BODY_METHODS:
            return (b"content-length: %d\r\n\r\n" % len(body),)
        return NO_BODY
    length = request.header(b"content-length")
    if length is not None and length.isdigit():
        return (b"content-length: %b\r\n\r\n" % length,)
    return CHUNKED


def _preflight(view: RequestView) -> bool:
    return view.method == "OPTIONS" and "origin" in view.headers and "access-control-request-method" in view.headers


def _cors_headers(cors: m.CorsPolicy, view: RequestView) -> HeaderList:
    """The CORS headers Envoy adds to a response when the request's Origin is allowed."""
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
