"""Upstream clusters at run time: keep-alive pools, circuit-breaker limits, outlier detection,
and which endpoints a server sidecar serves.

State outlives snapshots (a reload keeps ejections and open connections); the limits in
force are read from the cluster's policy at each request. Failures of the network are
translated here, once, into the `LocalReply` Envoy would give.
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TypeVar

from h2.exceptions import H2Error

from minimesh.config import model as m
from minimesh.config.labels import DETECTED, GRPC_WEB
from minimesh.dataplane.http1 import Body, Request, UpstreamClosed, UpstreamConnection, UpstreamResponse
from minimesh.dataplane.http2 import VERSION as HTTP2
from minimesh.dataplane.http2_upstream import Http2Upstream, StreamRefused, StreamResetByPeer
from minimesh.dataplane.replay import Replay
from minimesh.routing.headers import HeaderList
from minimesh.routing.pick import Balancer, balancer_for
from minimesh.routing.retry import GATEWAY_ERRORS
from minimesh.routing.snapshot import Cluster, Endpoint, Policy

Clock = Callable[[], float]
UNLIMITED = 2**32 - 1
"""What Istio programs for a connection-pool limit that is not set."""
CONNECT_TIMEOUT = 10.0
"""Istio's default `connectTimeout`."""
MAX_EJECTION_TIME = 300.0
"""Envoy's default `max_ejection_time`: an ejection never lasts longer."""
HTTP2_PROTOCOLS = frozenset({"HTTP2", "GRPC", GRPC_WEB})
"""Port protocols whose upstream speaks HTTP/2 (Istio's `Instance.IsHTTP2`)."""
UPGRADABLE = frozenset({"HTTP", DETECTED})
"""Port protocols `h2UpgradePolicy: UPGRADE` moves to HTTP/2 upstream."""
OPEN_TRIES = 3
"""New HTTP/2 connections one request may open before it gives up (`UO`): each is opened
because every other was full, and a peer that allows no stream at all must not loop."""


def speaks_http2(cluster: Cluster, request: Request) -> bool:
    """Whether a request goes to `cluster` over HTTP/2, as Istio programs its clusters: ports
    declared HTTP/2 or gRPC; `useClientProtocol` or a sniffed port (Envoy's
    USE_DOWNSTREAM_PROTOCOL) as the client spoke; `h2UpgradePolicy: UPGRADE` for HTTP. An
    upgrade (WebSocket) stays HTTP/1.1."""
    if request.upgrade is not None:
        return False
    protocol = cluster.protocol
    if protocol in HTTP2_PROTOCOLS:
        return True
    pool = cluster.policy.connection_pool
    if pool.h2_upgrade_policy == "UPGRADE" and protocol in UPGRADABLE:
        return True
    if pool.use_client_protocol or protocol == DETECTED:
        return request.version == HTTP2
    return False


# ---------------------------------------------------------------- Envoy's local replies


@dataclass(frozen=True, slots=True)
class LocalReply:
    """An answer the proxy gives itself: status, body, extra headers and the access-log flag;
    `grpc_status` is the one a gRPC request gets instead of the HTTP status's mapping."""

    status: int
    body: bytes
    flag: str
    headers: tuple[tuple[bytes, bytes], ...] = ()
    grpc_status: int | None = None


RESET_BEFORE_HEADERS = b"upstream connect error or disconnect/reset before headers. reset reason: "
NO_ROUTE = LocalReply(404, b"", "NR")
NO_HEALTHY_UPSTREAM = LocalReply(503, b"no healthy upstream", "UH")
CONNECT_FAILURE = LocalReply(503, RESET_BEFORE_HEADERS + b"connection failure", "UF")
CONNECTION_TERMINATION = LocalReply(503, RESET_BEFORE_HEADERS + b"connection termination", "UC")
OVERFLOW = LocalReply(503, RESET_BEFORE_HEADERS + b"overflow", "UO", ((b"x-envoy-overloaded", b"true"),))
UPSTREAM_TIMEOUT = LocalReply(504, b"upstream request timeout", "UT")
PROTOCOL_ERROR = LocalReply(503, RESET_BEFORE_HEADERS + b"protocol error", "UPE")
REMOTE_RESET = LocalReply(503, RESET_BEFORE_HEADERS + b"remote reset", "UR")
REFUSED_STREAM = LocalReply(503, RESET_BEFORE_HEADERS + b"remote refused stream reset", "UR")
"""An HTTP/2 upstream reset the stream (RST_STREAM), or refused it (REFUSED_STREAM, or above a
GOAWAY's last stream id): Envoy's `resetReasonToString` and `streamResetReasonToResponseFlag`."""
UPGRADE_FAILED = LocalReply(403, b"", "")
BLACK_HOLE = LocalReply(502, b"", "")


class UpstreamFailure(Exception):
    """A request that got no upstream response; carries the reply Envoy would give."""

    def __init__(self, reply: LocalReply, endpoint: Endpoint | None = None) -> None:
        super().__init__(reply.body.decode() or reply.flag)
        self.reply = reply
        self.endpoint = endpoint


# ---------------------------------------------------------------- per-endpoint state


NONE_EJECTED: frozenset[Endpoint] = frozenset()


class HostState:
    """One endpoint of a cluster: its connections, load and outlier record.

    `waiters` are requests queued for a connection to this endpoint (the pending queue);
    each gets an idle connection handed over, or None: a connection slot to fill itself.
    `stream_waiters` are requests queued for a stream on its HTTP/2 connections, woken to try
    again when one ends or a connection goes.
    """

    __slots__ = (
        "address",
        "connections",
        "consecutive_5xx",
        "consecutive_gateway",
        "ejected_until",
        "failures",
        "idle",
        "in_flight",
        "port",
        "stream_waiters",
        "successes",
        "times_ejected",
        "waiters",
    )

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self.idle: list[UpstreamConnection] = []
        self.waiters: collections.deque[asyncio.Future[UpstreamConnection | None]] = collections.deque()
        self.stream_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.connections = 0
        self.in_flight = 0
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.times_ejected = 0
        self.ejected_until: float | None = None
        self.successes = 0
        self.failures = 0

    @property
    def ejected(self) -> bool:
        return self.ejected_until is not None

    def __repr__(self) -> str:
        state = f" EJECTED x{self.times_ejected}" if self.ejected else ""
        return (
            f"<Host {self.address}:{self.port} active={self.in_flight} conns={self.connections} "
            f"idle={len(self.idle)} waiting={len(self.waiters)}{state}>"
        )


class Attempt:
    """One try at an endpoint, as its cluster counts it: in flight on the endpoint until
    `end`, and, when it is a retry, one of the cluster's `maxRetries` until its response
    head is in or it failed (`sent`)."""

    __slots__ = ("ended", "host", "retry", "state")

    def __init__(self, state: ClusterState, host: HostState, retry: bool) -> None:
        self.state = state
        self.host = host
        self.retry = retry
        self.ended = False
        host.in_flight += 1

    def sent(self) -> None:
        if self.retry:
            self.retry = False
            self.state.retry_done()

    def end(self) -> None:
        self.sent()
        if not self.ended:
            self.ended = True
            self.host.in_flight -= 1

    def __repr__(self) -> str:
        state = (" retry" if self.retry else "") + (" ended" if self.ended else "")
        return f"<Attempt {self.host.address}:{self.host.port}{state}>"


Dial = Callable[[str, int], Awaitable[socket.socket]]
"""Makes a connected socket to an endpoint; the default dials from the daemon's own namespace."""
P = TypeVar("P", bound=asyncio.Protocol)
T = TypeVar("T")


def wake_first(queue: collections.deque[asyncio.Future[T]], value: T) -> bool:
    """Hand `value` to the first request still waiting in `queue`; False when none is."""
    while queue:
        waiter = queue.popleft()
        if not waiter.done():
            waiter.set_result(value)
            return True
    return False


async def connect(
    dial: Dial | None, host: HostState, factory: Callable[[], P], tls: ssl.SSLContext | None, server_name: str | None
) -> P:
    """A connection to `host` through `dial` (else from here), TLS when `tls` is given."""
    loop = asyncio.get_running_loop()
    server_hostname = server_name if tls else None
    if dial is not None:
        sock = await dial(host.address, host.port)
        _, protocol = await loop.create_connection(factory, sock=sock, ssl=tls, server_hostname=server_hostname)
    else:
        _, protocol = await loop.create_connection(
            factory, host.address, host.port, ssl=tls, server_hostname=server_hostname
        )
    return protocol


class KeepAlive:
    """The HTTP/1.1 connections of one cluster, by endpoint, one exchange at a time each: a
    request takes the endpoint's idle keep-alive connection, else opens one within
    `maxConnections`, else waits in the endpoint's pending queue (`http1MaxPendingRequests`);
    a connection that finishes an exchange goes to the first waiter, else back to idle. The
    counts are the cluster's (`ClusterState`), shared with its HTTP/2 connections."""

    __slots__ = ("state",)

    def __init__(self, state: ClusterState) -> None:
        self.state = state

    async def connection(
        self, cluster: Cluster, endpoint: Endpoint, tls: ssl.SSLContext | None, server_name: str | None
    ) -> UpstreamConnection:
        """An idle keep-alive connection to `endpoint`, a new one within `maxConnections`
        (`may_open`), or a wait in the pending queue (bounded by `http1MaxPendingRequests`,
        else 503 UO)."""
        pool = cluster.policy.connection_pool
        state = self.state
        host = state.host(endpoint)
        conn = self.idle_connection(host)
        if conn is not None:
            return conn
        if state.may_open(host, pool):
            return await self._open(host, pool, tls, server_name)
        handed = await state.queue(host.waiters, pool, endpoint, lambda conn: self._handed_back(host, pool, conn))
        if handed is None:
            return await self._open(host, pool, tls, server_name, slot_reserved=True)
        return handed

    def idle_connection(self, host: HostState) -> UpstreamConnection | None:
        """A keep-alive connection of `host` that is open and idle (the most recently used), if any."""
        idle = host.idle
        while idle:
            conn = idle.pop()
            if conn.idle:
                return conn
        return None

    def _handed_back(self, host: HostState, pool: m.ConnectionPool, conn: UpstreamConnection | None) -> None:
        """A waiter was cancelled after it was handed a connection or a slot: pass it on."""
        if conn is not None:
            self._release(host, pool, conn)
        else:
            self.state.connections -= 1
            self._slot_freed(host)

    async def _open(
        self,
        host: HostState,
        pool: m.ConnectionPool,
        tls: ssl.SSLContext | None,
        server_name: str | None,
        *,
        slot_reserved: bool = False,
    ) -> UpstreamConnection:
        state = self.state
        if not slot_reserved:
            state.connections += 1
        host.connections += 1

        def protocol_factory() -> UpstreamConnection:
            return UpstreamConnection(lambda conn: self._release(host, pool, conn), lambda conn: self._lost(host, conn))

        try:
            async with asyncio.timeout(pool.connect_timeout or CONNECT_TIMEOUT):
                return await connect(state.dial, host, protocol_factory, tls, server_name)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            self.closed(host)
            raise UpstreamFailure(CONNECT_FAILURE) from exc
        except asyncio.CancelledError:
            self.closed(host)
            raise

    def _release(self, host: HostState, pool: m.ConnectionPool, conn: UpstreamConnection) -> None:
        """A connection finished an exchange: the first waiter for its endpoint gets it, else it
        waits idle; past `maxRequestsPerConnection` it is closed instead (its slot freed)."""
        limit = pool.max_requests_per_connection or 0
        if limit and conn.requests >= limit:
            conn.close()
            return
        if not wake_first(host.waiters, conn):
            host.idle.append(conn)

    def _lost(self, host: HostState, conn: UpstreamConnection) -> None:
        if conn in host.idle:
            host.idle.remove(conn)
        self.closed(host)

    def closed(self, host: HostState) -> None:
        """A connection to `host` (HTTP/1.1 or HTTP/2) is gone: its slot is free."""
        self.state.connections -= 1
        host.connections -= 1
        self._slot_freed(host)

    def _slot_freed(self, host: HostState) -> None:
        """A connection slot is free: a waiter (this endpoint's first, else any) takes it over,
        so nothing that arrives meanwhile can push the cluster past `maxConnections`."""
        state = self.state
        for waiting in (host, *state.hosts.values()):
            if wake_first(waiting.waiters, None):
                state.connections += 1
                return

    def close(self) -> None:
        for host in self.state.hosts.values():
            for conn in list(host.idle):
                conn.close()
            host.idle.clear()


def _wake(host: HostState) -> None:
    """A stream ended or a connection went: the first request waiting for a stream on `host` tries again."""
    wake_first(host.stream_waiters, None)


class Multiplexed:
    """The HTTP/2 connections of one cluster, by endpoint: a request takes a stream on one
    with a free slot (within the upstream's SETTINGS_MAX_CONCURRENT_STREAMS and the pool's
    `maxConcurrentStreams`), else a new connection within `maxConnections` (one per endpoint
    always, as Envoy allows), else it waits in the endpoint's pending queue until a stream
    ends or a connection goes (`http1MaxPendingRequests`, which Istio applies to HTTP/2 too;
    past it, `UO`). A connection still connecting takes requests up to the pool's limit, so
    a burst shares one. They count in the cluster's and the endpoint's connections like
    HTTP/1.1 ones."""

    __slots__ = ("by_host", "state")

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.by_host: dict[tuple[str, int], list[Http2Upstream]] = {}

    async def connection(
        self, cluster: Cluster, endpoint: Endpoint, tls: ssl.SSLContext | None, server_name: str | None
    ) -> Http2Upstream:
        """A connection to `endpoint` that takes a new stream now; UpstreamFailure when none
        can be had (connect failure `UF`, overflow `UO`, closed before its SETTINGS `UC`)."""
        pool = cluster.policy.connection_pool
        state = self.state
        host = state.host(endpoint)
        conns = self.by_host.setdefault((host.address, host.port), [])
        limit = pool.max_concurrent_streams or UNLIMITED
        tries = 0
        while tries < OPEN_TRIES:
            for conn in conns:
                if conn.takes(limit):
                    return conn
            joining = next((c for c in conns if not c.ready.done() and len(c.streams) + c.waiting < limit), None)
            if joining is None and not state.may_open(host, pool):
                await state.queue(host.stream_waiters, pool, endpoint, lambda _: _wake(host))
                continue
            tries += 1
            conn = joining or self._open(host, pool, conns, tls, server_name)
            conn.waiting += 1
            try:
                await asyncio.shield(conn.ready)
            except UpstreamClosed as closed:
                raise UpstreamFailure(CONNECTION_TERMINATION, endpoint) from closed
            except (OSError, ssl.SSLError, TimeoutError) as failed:  # its own name: mypyc types one name once
                raise UpstreamFailure(CONNECT_FAILURE, endpoint) from failed
            finally:
                conn.waiting -= 1
            if conn.takes(limit):
                return conn
        state.overflows += 1
        raise UpstreamFailure(OVERFLOW, endpoint)

    def _open(
        self,
        host: HostState,
        pool: m.ConnectionPool,
        conns: list[Http2Upstream],
        tls: ssl.SSLContext | None,
        server_name: str | None,
    ) -> Http2Upstream:
        """Start a new connection to `host` (its SETTINGS awaited within `connectTimeout`)."""
        state = self.state
        state.connections += 1
        host.connections += 1

        def lost(conn: Http2Upstream) -> None:
            if conn in conns:
                conns.remove(conn)
                state.h1.closed(host)
                _wake(host)

        conn = Http2Upstream(lost, pool.max_requests_per_connection or 0, lambda: _wake(host))
        conns.append(conn)
        conn.opening = asyncio.get_running_loop().create_task(self._connect(conn, host, pool, tls, server_name))
        return conn

    async def _connect(
        self,
        conn: Http2Upstream,
        host: HostState,
        pool: m.ConnectionPool,
        tls: ssl.SSLContext | None,
        server_name: str | None,
    ) -> None:
        try:
            async with asyncio.timeout(pool.connect_timeout or CONNECT_TIMEOUT):
                await connect(self.state.dial, host, lambda: conn, tls, server_name)
                await asyncio.shield(conn.ready)
        except (TimeoutError, OSError, ssl.SSLError, UpstreamClosed) as exc:
            if not conn.ready.done():
                conn.ready.set_exception(exc)
            conn.close()
            conn.lost()

    def close(self) -> None:
        for conns in self.by_host.values():
            for conn in list(conns):
                conn.close()


class ClusterState:
    """Run-time state of one cluster: limits are the policy's, counters are live. It counts
    for the circuit breakers, picks endpoints and ejects outliers; its connections are pooled
    by `h1` (HTTP/1.1, `KeepAlive`) and `h2` (HTTP/2, `Multiplexed`)."""

    def __init__(self, name: str, clock: Clock = time.monotonic, dial: Dial | None = None) -> None:
        self.name = name
        self.clock = clock
        self.dial = dial
        self.hosts: dict[tuple[str, int], HostState] = {}
        self.connections = 0
        self.requests = 0
        self.pending = 0
        self.retries = 0
        self.overflows = 0
        self._balancer: Balancer | None = None
        self._balanced: tuple[tuple[Endpoint, ...], Policy] | None = None
        self._balanced_for: Cluster | None = None
        self.h1 = KeepAlive(self)
        self.h2 = Multiplexed(self)

    def balancer(self, cluster: Cluster, rng: random.Random) -> Balancer:
        """The cluster's load balancer, kept while its endpoints and policy stay the same
        (round-robin position and the hash ring survive a reload that does not touch them)."""
        if self._balancer is not None and self._balanced_for is cluster:
            return self._balancer
        basis = (cluster.endpoints, cluster.policy)
        if self._balancer is None or self._balanced != basis:
            self._balancer = balancer_for(cluster.policy, cluster.endpoints, rng, self.active)
            self._balanced = basis
        self._balanced_for = cluster
        return self._balancer

    def host(self, endpoint: Endpoint) -> HostState:
        key = (endpoint.address, endpoint.port)
        state = self.hosts.get(key)
        if state is None:
            state = self.hosts[key] = HostState(endpoint.address, endpoint.port)
        return state

    def pick(
        self,
        cluster: Cluster,
        rng: random.Random,
        key: str | None,
        tried: Collection[Endpoint] = (),
        original: tuple[str, int] | None = None,
    ) -> Endpoint | None:
        """The endpoint a request or connection goes to: where it was headed for a cluster of
        `original_destination`; else the load balancer's pick (`key` for consistent hashing)
        among the endpoints not ejected, avoiding the ones already `tried` while others remain
        (Istio's `previous_hosts` retry predicate)."""
        if cluster.original_destination and original is not None:
            return Endpoint(None, *original)
        exclude = self.ejected(cluster)
        if tried:
            avoid = exclude.union(tried)
            if len(avoid) < len(cluster.endpoints):
                exclude = avoid
        return self.balancer(cluster, rng).pick(key=key, exclude=exclude)

    def can_pick(self, cluster: Cluster, original: tuple[str, int] | None) -> bool:
        """Whether `pick` has an endpoint to give a first try: the original destination, or
        an endpoint not ejected."""
        if cluster.original_destination and original is not None:
            return True
        return len(self.ejected(cluster)) < len(cluster.endpoints)

    def attempt(self, endpoint: Endpoint, *, retry: bool = False) -> Attempt:
        """Start a try at `endpoint` (a `retry` already admitted by `admit_retry`)."""
        return Attempt(self, self.host(endpoint), retry)

    def active(self, endpoint: Endpoint) -> int:
        state = self.hosts.get((endpoint.address, endpoint.port))
        return state.in_flight if state else 0

    # ---- outlier detection

    def ejected(self, cluster: Cluster) -> frozenset[Endpoint]:
        """The endpoints ejected now; expired ejections end here (Envoy does it each interval)."""
        if cluster.policy.outlier_detection is None:
            return NONE_EJECTED
        now = self.clock()
        out = []
        for endpoint in cluster.endpoints:
            state = self.hosts.get((endpoint.address, endpoint.port))
            if state is None or state.ejected_until is None:
                continue
            if now >= state.ejected_until:
                state.ejected_until = None
                state.consecutive_5xx = state.consecutive_gateway = 0
                continue
            out.append(endpoint)
        return frozenset(out) if out else NONE_EJECTED

    def record(self, cluster: Cluster, endpoint: Endpoint, status: int) -> None:
        """An attempt's result for outlier detection: an HTTP status, 503 for a local failure
        (connect failure, reset, overflow) and 504 for a timeout, as Envoy maps them.

        As in Envoy, a streak that reaches its threshold triggers one ejection attempt and
        starts over, whether or not `maxEjectionPercent` lets the ejection happen."""
        state = self.host(endpoint)
        failed = status >= 500
        if failed:
            state.failures += 1
        else:
            state.successes += 1
        detection = cluster.policy.outlier_detection
        if detection is None:
            return
        if not failed:
            state.consecutive_5xx = state.consecutive_gateway = 0
            return
        state.consecutive_gateway = state.consecutive_gateway + 1 if status in GATEWAY_ERRORS else 0
        state.consecutive_5xx += 1
        tripped = False
        if detection.consecutive_gateway_errors and state.consecutive_gateway >= detection.consecutive_gateway_errors:
            state.consecutive_gateway = 0
            tripped = True
        if detection.consecutive_5xx_errors and state.consecutive_5xx >= detection.consecutive_5xx_errors:
            state.consecutive_5xx = 0
            tripped = True
        if tripped and not state.ejected:
            self._eject(cluster, state, detection)

    def _eject(self, cluster: Cluster, state: HostState, detection: m.OutlierDetection) -> None:
        """Eject within `maxEjectionPercent`, but always allow one host (Istio's setting)."""
        total = max(len(cluster.endpoints), 1)
        ejected = len(self.ejected(cluster))
        if ejected > 0 and 100.0 * (ejected + 1) / total > detection.max_ejection_percent:
            return
        state.times_ejected += 1
        state.ejected_until = self.clock() + min(detection.base_ejection_time * state.times_ejected, MAX_EJECTION_TIME)

    # ---- circuit breaking

    def may_open(self, host: HostState, pool: m.ConnectionPool) -> bool:
        """Whether a new connection to `host` is within `maxConnections`. As in Envoy, an
        endpoint with no connection at all may always open one, so one busy endpoint never
        starves another."""
        return self.connections < (pool.max_connections or UNLIMITED) or host.connections == 0

    async def queue(
        self,
        waiters: collections.deque[asyncio.Future[T]],
        pool: m.ConnectionPool,
        endpoint: Endpoint,
        pass_on: Callable[[T], None],
    ) -> T:
        """Wait in `waiters`, one of the cluster's pending queues (together bounded by
        `http1MaxPendingRequests`, which Istio applies to HTTP/2 too; past it 503 `UO`), for
        what a `wake_first` hands over. Woken and then cancelled, it gives that to `pass_on`."""
        if self.pending >= (pool.http1_max_pending_requests or UNLIMITED):
            self.overflows += 1
            raise UpstreamFailure(OVERFLOW, endpoint)
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        self.pending += 1
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                pass_on(waiter.result())
            elif waiter in waiters:
                waiters.remove(waiter)
            raise
        finally:
            self.pending -= 1

    def admit(self, pool: m.ConnectionPool) -> None:
        """Count a request against `http2MaxRequests`, or raise overflow (503 UO)."""
        if self.requests >= (pool.http2_max_requests or UNLIMITED):
            self.overflows += 1
            raise UpstreamFailure(OVERFLOW)
        self.requests += 1

    def done(self) -> None:
        self.requests -= 1

    def admit_retry(self, pool: m.ConnectionPool) -> bool:
        """Count one retry in flight against `maxRetries` (released by `retry_done` when that
        attempt ends); False when the cluster already has as many retries outstanding."""
        if self.retries >= (pool.max_retries or UNLIMITED):
            self.overflows += 1
            return False
        self.retries += 1
        return True

    def retry_done(self) -> None:
        self.retries -= 1

    def close(self) -> None:
        self.h1.close()
        self.h2.close()

    def __repr__(self) -> str:
        ejected = sum(1 for h in self.hosts.values() if h.ejected)
        return (
            f"<ClusterState {self.name} hosts={len(self.hosts)} conns={self.connections} "
            f"active={self.requests} pending={self.pending} retries={self.retries} ejected={ejected}>"
        )


class Upstreams:
    """Every cluster's state, by cluster name, and the endpoints a server sidecar serves; the
    one place requests leave the proxy."""

    def __init__(self, clock: Clock = time.monotonic, tls: Callable[[Cluster], ssl.SSLContext | None] | None = None):
        self.clock = clock
        self.clusters: dict[str, ClusterState] = {}
        self._tls = tls
        self.sidecars: frozenset[str] = frozenset()
        """The addresses of the endpoints a server sidecar of this daemon serves now (captured
        containers, as the capture manager last set them)."""

    def has_sidecar(self, endpoint: Endpoint) -> bool:
        """Is `endpoint` behind a server sidecar of this daemon? Only such an endpoint is told
        its caller (HTTP's peer id, a TCP connection's entry in `Proxy.tcp_callers`)."""
        return endpoint.address in self.sidecars

    def state(self, cluster: Cluster, dial: Dial | None = None) -> ClusterState:
        """The state of `cluster`; `dial` (for a new one) says how its connections are made."""
        state = self.clusters.get(cluster.name)
        if state is None:
            state = self.clusters[cluster.name] = ClusterState(cluster.name, self.clock, dial)
        return state

    def forget(self, names: Iterable[str]) -> None:
        """Drop these clusters' states and close their idle connections (a workload that left)."""
        for name in names:
            state = self.clusters.pop(name, None)
            if state is not None:
                state.close()

    async def send(
        self,
        cluster: Cluster,
        endpoint: Endpoint,
        head: bytes,
        body: Body | bytes,
        *,
        head_request: bool = False,
        chunked: bool = True,
        replay: Replay | None = None,
    ) -> UpstreamResponse:
        """One attempt to `endpoint`; the response once its head is in, or UpstreamFailure.

        A reused keep-alive connection the upstream had already closed is retried once on a
        fresh one when nothing was sent yet that cannot be sent again (a streamed body can
        while its `replay` still holds a copy); an attempt cancelled (timeout, client gone)
        closes its connection, as Envoy resets the stream."""
        state = self.state(cluster)
        reused_once = False
        while True:
            conn = state.h1.idle_connection(state.host(endpoint)) or await state.h1.connection(
                cluster, endpoint, self._tls(cluster) if self._tls else None, cluster.host
            )
            fresh = conn.requests == 0
            try:
                return await conn.exchange(head, body, head_request=head_request, chunked=chunked)
            except UpstreamClosed as exc:
                conn.close()
                again = isinstance(body, bytes) or (replay is not None and not replay.overflowed)
                if not fresh and exc.sent_nothing and again and not reused_once:
                    reused_once = True
                    if replay is not None:
                        body = replay.body()
                    continue
                raise UpstreamFailure(CONNECTION_TERMINATION, endpoint) from exc
            except (OSError, ssl.SSLError) as exc:
                conn.close()
                raise UpstreamFailure(CONNECTION_TERMINATION, endpoint) from exc
            except asyncio.CancelledError:
                conn.close()
                raise

    async def send_h2(
        self, cluster: Cluster, endpoint: Endpoint, fields: HeaderList, body: Body | bytes
    ) -> UpstreamResponse:
        """One attempt to `endpoint` over HTTP/2 (`fields` the request head): the response once
        its head is in, or UpstreamFailure: `UR` for a stream the upstream reset or refused,
        `UC` for a connection lost under it, `UPE` for a head HTTP/2 cannot carry."""
        state = self.state(cluster)
        conn = await state.h2.connection(cluster, endpoint, self._tls(cluster) if self._tls else None, cluster.host)
        try:
            return await conn.exchange(fields, body)
        except StreamRefused as refused:  # a name per clause: mypyc types one name once
            raise UpstreamFailure(REFUSED_STREAM, endpoint) from refused
        except StreamResetByPeer as reset:
            raise UpstreamFailure(REMOTE_RESET, endpoint) from reset
        except (UpstreamClosed, OSError) as lost:
            raise UpstreamFailure(CONNECTION_TERMINATION, endpoint) from lost
        except H2Error as error:
            raise UpstreamFailure(PROTOCOL_ERROR, endpoint) from error

    def close(self) -> None:
        for state in self.clusters.values():
            state.close()
