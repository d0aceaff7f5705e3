"""Upstream clusters at run time: keep-alive pools, circuit-breaker limits, outlier detection.

State outlives snapshots (a reload keeps ejections and open connections); the limits in
force are read from the cluster's policy at each request. Failures of the network are
translated here, once, into the `LocalReply` Envoy would give.
"""

from __future__ import annotations

import asyncio
import collections
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from minimesh.config import model as m
from minimesh.dataplane.http1 import Body, UpstreamClosed, UpstreamConnection, UpstreamResponse
from minimesh.routing.pick import Balancer, balancer_for
from minimesh.routing.snapshot import Cluster, Endpoint, Policy

Clock = Callable[[], float]
UNLIMITED = 2**32 - 1
"""What Istio programs for a connection-pool limit that is not set."""


# ---------------------------------------------------------------- Envoy's local replies


@dataclass(frozen=True, slots=True)
class LocalReply:
    """An answer the proxy gives itself: status, body, extra headers and the access-log flag."""

    status: int
    body: bytes
    flag: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


RESET_BEFORE_HEADERS = b"upstream connect error or disconnect/reset before headers. reset reason: "
NO_ROUTE = LocalReply(404, b"", "NR")
NO_HEALTHY_UPSTREAM = LocalReply(503, b"no healthy upstream", "UH")
CONNECT_FAILURE = LocalReply(503, RESET_BEFORE_HEADERS + b"connection failure", "UF")
CONNECTION_TERMINATION = LocalReply(503, RESET_BEFORE_HEADERS + b"connection termination", "UC")
OVERFLOW = LocalReply(503, RESET_BEFORE_HEADERS + b"overflow", "UO", ((b"x-envoy-overloaded", b"true"),))
UPSTREAM_TIMEOUT = LocalReply(504, b"upstream request timeout", "UT")
RBAC_DENIED = LocalReply(403, b"RBAC: access denied", "RBAC")
BLACK_HOLE = LocalReply(502, b"", "")
PAYLOAD_TOO_LARGE = LocalReply(413, b"Payload Too Large", "")


class UpstreamFailure(Exception):
    """A request that got no upstream response; carries the reply Envoy would give."""

    def __init__(self, reply: LocalReply, endpoint: Endpoint | None = None) -> None:
        super().__init__(reply.body.decode() or reply.flag)
        self.reply = reply
        self.endpoint = endpoint


# ---------------------------------------------------------------- per-endpoint state


class HostState:
    """One endpoint of a cluster: its idle connections, load and outlier record."""

    __slots__ = (
        "address",
        "connections",
        "consecutive_5xx",
        "consecutive_gateway",
        "ejected_at",
        "ejected_until",
        "failures",
        "idle",
        "in_flight",
        "port",
        "successes",
        "times_ejected",
    )

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self.idle: list[UpstreamConnection] = []
        self.connections = 0
        self.in_flight = 0
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.times_ejected = 0
        self.ejected_at: float | None = None
        self.ejected_until: float | None = None
        self.successes = 0
        self.failures = 0

    @property
    def ejected(self) -> bool:
        return self.ejected_until is not None

    def __repr__(self) -> str:
        state = f" EJECTED x{self.times_ejected}" if self.ejected else ""
        return f"<Host {self.address}:{self.port} active={self.in_flight} conns={self.connections}{state}>"


GATEWAY_ERRORS = frozenset({502, 503, 504})


class ClusterState:
    """Run-time state of one cluster: limits are the policy's, counters are live."""

    def __init__(self, name: str, clock: Clock = time.monotonic) -> None:
        self.name = name
        self.clock = clock
        self.hosts: dict[tuple[str, int], HostState] = {}
        self.connections = 0
        self.requests = 0
        self.pending = 0
        self.retries = 0
        self.overflows = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._balancer: Balancer | None = None
        self._balanced: tuple[tuple[Endpoint, ...], Policy] | None = None

    def balancer(self, cluster: Cluster, rng: random.Random) -> Balancer:
        """The cluster's load balancer, kept while its endpoints and policy stay the same
        (round-robin position and the hash ring survive a reload that does not touch them)."""
        basis = (cluster.endpoints, cluster.policy)
        if self._balancer is None or self._balanced != basis:
            self._balancer = balancer_for(cluster.policy, cluster.endpoints, rng, self.active)
            self._balanced = basis
        return self._balancer

    def host(self, endpoint: Endpoint) -> HostState:
        key = (endpoint.address, endpoint.port)
        state = self.hosts.get(key)
        if state is None:
            state = self.hosts[key] = HostState(endpoint.address, endpoint.port)
        return state

    def active(self, endpoint: Endpoint) -> int:
        state = self.hosts.get((endpoint.address, endpoint.port))
        return state.in_flight if state else 0

    # ---- outlier detection

    def ejected(self, cluster: Cluster) -> frozenset[Endpoint]:
        """The endpoints ejected now; expired ejections end here (Envoy does it each interval)."""
        if cluster.policy.outlier_detection is None:
            return frozenset()
        now = self.clock()
        out = []
        for endpoint in cluster.endpoints:
            state = self.hosts.get((endpoint.address, endpoint.port))
            if state is None or state.ejected_until is None:
                continue
            if now >= state.ejected_until:
                state.ejected_until = None
                state.ejected_at = None
                state.consecutive_5xx = state.consecutive_gateway = 0
                continue
            out.append(endpoint)
        return frozenset(out)

    def record(self, cluster: Cluster, endpoint: Endpoint, status: int) -> None:
        """An attempt's result for outlier detection: an HTTP status, or 503 for a local failure."""
        state = self.host(endpoint)
        failed = status >= 500
        if failed:
            state.failures += 1
        else:
            state.successes += 1
        detection = cluster.policy.outlier_detection
        if detection is None:
            return
        state.consecutive_5xx = state.consecutive_5xx + 1 if failed else 0
        state.consecutive_gateway = state.consecutive_gateway + 1 if status in GATEWAY_ERRORS else 0
        tripped = (detection.consecutive_5xx_errors and state.consecutive_5xx >= detection.consecutive_5xx_errors) or (
            detection.consecutive_gateway_errors and state.consecutive_gateway >= detection.consecutive_gateway_errors
        )
        if tripped and not state.ejected:
            self._eject(cluster, state, detection)

    def _eject(self, cluster: Cluster, state: HostState, detection: m.OutlierDetection) -> None:
        total = max(len(cluster.endpoints), 1)
        ejected = len(self.ejected(cluster))
        if ejected > 0 and 100.0 * (ejected + 1) / total > detection.max_ejection_percent:
            return
        state.times_ejected += 1
        now = self.clock()
        state.ejected_at = now
        state.ejected_until = now + detection.base_ejection_time * state.times_ejected
        state.consecutive_5xx = state.consecutive_gateway = 0

    # ---- circuit breaking

    def admit(self, pool: m.ConnectionPool) -> None:
        """Count a request against `http2MaxRequests`, or raise overflow (503 UO)."""
        if self.requests >= (pool.http2_max_requests or UNLIMITED):
            self.overflows += 1
            raise UpstreamFailure(OVERFLOW)
        self.requests += 1

    def done(self) -> None:
        self.requests -= 1

    def admit_retry(self, pool: m.ConnectionPool) -> bool:
        if self.retries >= (pool.max_retries or UNLIMITED):
            self.overflows += 1
            return False
        self.retries += 1
        return True

    def retry_done(self) -> None:
        self.retries -= 1

    async def connection(
        self, cluster: Cluster, endpoint: Endpoint, tls: ssl.SSLContext | None, server_name: str | None
    ) -> UpstreamConnection:
        """An idle keep-alive connection to `endpoint`, a new one within `maxConnections`, or
        a wait in the pending queue (bounded by `http1MaxPendingRequests`)."""
        pool = cluster.policy.connection_pool
        state = self.host(endpoint)
        while True:
            while state.idle:
                conn = state.idle.pop()
                if conn.idle:
                    return conn
            if self.connections < (pool.max_connections or UNLIMITED):
                return await self._open(state, pool, tls, server_name)
            if self.pending >= (pool.http1_max_pending_requests or UNLIMITED):
                self.overflows += 1
                raise UpstreamFailure(OVERFLOW, endpoint)
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self.pending += 1
            try:
                await waiter
            finally:
                self.pending -= 1

    async def _open(
        self, state: HostState, pool: m.ConnectionPool, tls: ssl.SSLContext | None, server_name: str | None
    ) -> UpstreamConnection:
        self.connections += 1
        state.connections += 1
        loop = asyncio.get_running_loop()

        def on_idle(conn: UpstreamConnection) -> None:
            limit = pool.max_requests_per_connection or 0
            if limit and conn.requests >= limit:
                conn.close()
            else:
                state.idle.append(conn)
                self._wake()

        def on_lost(conn: UpstreamConnection) -> None:
            if conn in state.idle:
                state.idle.remove(conn)
            self._closed(state)

        try:
            connect = loop.create_connection(
                lambda: UpstreamConnection(on_idle, on_lost),
                state.address,
                state.port,
                ssl=tls,
                server_hostname=server_name if tls else None,
            )
            _, protocol = await asyncio.wait_for(connect, pool.connect_timeout or 10.0)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            self._closed(state)
            raise UpstreamFailure(CONNECT_FAILURE) from exc
        return protocol

    def _closed(self, state: HostState) -> None:
        self.connections -= 1
        state.connections -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for state in self.hosts.values():
            for conn in state.idle:
                conn.close()
            state.idle.clear()

    def __repr__(self) -> str:
        ejected = sum(1 for h in self.hosts.values() if h.ejected)
        return (
            f"<ClusterState {self.name} hosts={len(self.hosts)} conns={self.connections} "
            f"active={self.requests} pending={self.pending} ejected={ejected}>"
        )


class Upstreams:
    """Every cluster's state, by cluster name; the one place requests leave the proxy."""

    def __init__(self, clock: Clock = time.monotonic, tls: Callable[[Cluster], ssl.SSLContext | None] | None = None):
        self.clock = clock
        self.clusters: dict[str, ClusterState] = {}
        self._tls = tls

    def state(self, cluster: Cluster) -> ClusterState:
        state = self.clusters.get(cluster.name)
        if state is None:
            state = self.clusters[cluster.name] = ClusterState(cluster.name, self.clock)
        return state

    async def send(
        self, cluster: Cluster, endpoint: Endpoint, head: bytes, body: Body | bytes, *, head_request: bool = False
    ) -> UpstreamResponse:
        """One attempt to `endpoint`; the response once its head is in, or UpstreamFailure."""
        state = self.state(cluster)
        tls = self._tls(cluster) if self._tls else None
        reused_once = False
        while True:
            conn = await state.connection(cluster, endpoint, tls, cluster.host)
            fresh = conn.requests == 0
            try:
                return await conn.exchange(head, body, head_request=head_request)
            except UpstreamClosed as exc:
                conn.close()
                if not fresh and exc.sent_nothing and isinstance(body, bytes) and not reused_once:
                    reused_once = True
                    continue
                raise UpstreamFailure(CONNECTION_TERMINATION, endpoint) from exc
            except (OSError, ssl.SSLError) as exc:
                conn.close()
                raise UpstreamFailure(CONNECTION_TERMINATION, endpoint) from exc

    def close(self) -> None:
        for state in self.clusters.values():
            state.close()
