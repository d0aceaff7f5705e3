"""TCP proxying, as Envoy's tcp_proxy: a connection's bytes pass both ways untouched to the
cluster routing chose (or to where it was headed), with back-pressure each way, half-close
passed on, Istio's idle timeout, `maxConnections`, `connectTimeout` and outlier records.

One `Relay` per connection; it is logged and counted like a request, in Envoy's TCP form.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

from minimesh.config.names import MESH
from minimesh.dataplane.exchange import Exchange, Listener, ListenerKind
from minimesh.dataplane.proxy import Proxy
from minimesh.dataplane.upstream import CONNECT_TIMEOUT, UNLIMITED, ClusterState
from minimesh.registry.model import Workload
from minimesh.routing.connection import decide_connection, service_at
from minimesh.routing.snapshot import BlackHole, Cluster, Connect, ConnectionFacts, Endpoint, PassThrough

IDLE_TIMEOUT = 3600.0
"""Istio's default idle timeout of a TCP connection (one hour without a byte either way)."""
PASSTHROUGH = "PassthroughCluster"
BLACK_HOLE = "BlackHoleCluster"


class Pipe(asyncio.Protocol):
    """One side of a relayed connection: what it receives is written to the other side;
    while the other side cannot keep up, this side stops reading."""

    __slots__ = ("eof", "relay", "transport", "upstream")

    def __init__(self, relay: Relay, *, upstream: bool) -> None:
        self.relay = relay
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.eof = False

    @property
    def other(self) -> Pipe | None:
        return self.relay.down if self.upstream else self.relay.up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's subclasses

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        relay.activity += 1
        if self.upstream:
            relay.exchange.bytes_sent += len(data)
        else:
            relay.exchange.bytes_received += len(data)
        other = self.other
        if other is None or other.transport is None:
            relay.early += data
            self.pause()
            return
        other.transport.write(data)

    def eof_received(self) -> bool:
        """Half-close: the other side's write end closes too; both ended, the relay closes."""
        self.eof = True
        other = self.other
        if other is None:
            return True
        if other.transport is not None and other.transport.can_write_eof():
            other.transport.write_eof()
        if other.eof:
            self.relay.close()
        return True

    def pause_writing(self) -> None:
        other = self.other
        if other is not None:
            other.pause()

    def resume_writing(self) -> None:
        other = self.other
        if other is not None:
            other.resume()

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Relay:
    """One proxied connection: its downstream pipe, the upstream pipe once connected, the
    exchange the access log and metrics read, and the task that connects it."""

    __slots__ = (
        "activity", "caller_key", "closed", "done", "down", "early", "exchange", "on_close", "task", "timer", "up",
    )  # fmt: skip

    def __init__(self, exchange: Exchange, on_close: Callable[[Relay], None]) -> None:
        self.exchange = exchange
        self.on_close = on_close
        self.down = Pipe(self, upstream=False)
        self.up: Pipe | None = None
        self.early = b""
        self.activity = 0
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.done: asyncio.Future[None] | None = None
        """Set once connected; the connecting task then waits on it, owning the upstream slot."""
        self.caller_key: tuple[int, str, int] | None = None
        """Its key in `Proxy.tcp_callers` while it is open, for a connection to a captured workload."""

    def close(self) -> None:
        """Either side ended, the connection idled out, or the listener stops: close both
        (what is already written still goes out) and report the connection once."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if self.done is not None:
            self.done.set_result(None)
        elif self.task is not None and not self.task.done():
            self.task.cancel()
        self.down.close()
        if self.up is not None:
            self.up.close()
        self.on_close(self)

    def __repr__(self) -> str:
        ex = self.exchange
        where = f"{ex.downstream} → {ex.upstream_host or '?'} {ex.cluster or '-'}"
        return f"<Relay {where} in={ex.bytes_received} out={ex.bytes_sent}>"


class TcpProxy:
    """Relays the TCP connections of one listener; reports each as an `Exchange` (`tcp`)
    to the proxy's observers when it closes, and to its openers when it is routed."""

    def __init__(self, proxy: Proxy, listener: Callable[[], Listener]) -> None:
        self.proxy = proxy
        self.listener = listener
        self.relays: set[Relay] = set()

    def relay(
        self,
        transport: asyncio.BaseTransport,
        peer: str,
        original: tuple[str, int],
        early: bytes = b"",
        sni: str | None = None,
    ) -> Relay:
        """Take over `transport` (a connection to `original`, `early` already read from it)."""
        listener = self.listener()
        now = time.time()
        exchange = Exchange(listener, "-", "-", "", "-", "-", now, time.monotonic(), peer)
        exchange.tcp = True
        exchange.original = original
        exchange.sni = sni or ""
        relay = Relay(exchange, self._closed)
        relay.early = early
        transport.set_protocol(relay.down)
        relay.down.connection_made(transport)
        relay.down.pause()
        self.relays.add(relay)
        relay.task = asyncio.get_running_loop().create_task(self._connect(relay, listener, original, sni))
        return relay

    async def _connect(self, relay: Relay, listener: Listener, original: tuple[str, int], sni: str | None) -> None:
        exchange = relay.exchange
        address, port = original
        if listener.kind is ListenerKind.INBOUND and listener.workload is not None:
            source_port = exchange.downstream.rpartition(":")[2]
            if source_port.isdigit():
                exchange.source = self.proxy.tcp_callers.get((int(source_port), address, port))
            cluster = self.proxy.inbound_cluster(listener.workload, port, listener.dial)
            await self._to_cluster(relay, cluster, original)
            return
        snapshot = self.proxy.current.get()
        source = listener.workload
        reached = service_at(snapshot, address, port, sni)
        service, service_port = reached if reached is not None else (None, port)
        labels, namespace = (source.label_map, source.namespace) if source is not None else (None, None)
        facts = ConnectionFacts(address, service_port, sni, MESH, labels, namespace)
        outcome = decide_connection(snapshot, service, facts, self.proxy.rng)
        if isinstance(outcome, BlackHole):
            exchange.cluster = BLACK_HOLE
            exchange.flags.append("UH")
            self._opened(exchange)
            relay.close()
            return
        if isinstance(outcome, PassThrough):
            exchange.cluster = PASSTHROUGH
            await self._dial(relay, None, Endpoint(None, address, port), CONNECT_TIMEOUT, None)
            return
        assert isinstance(outcome, Connect)
        exchange.route = outcome.route_ref
        await self._to_cluster(relay, outcome.cluster, original)

    async def _to_cluster(self, relay: Relay, cluster: Cluster, original: tuple[str, int]) -> None:
        """Within `maxConnections`, to an endpoint the load balancer picks among those not
        ejected (`original` itself for a ServiceEntry of resolution NONE or DNS)."""
        exchange = relay.exchange
        exchange.cluster = cluster.name
        exchange.destination_service = cluster.host
        state = self.proxy.upstreams.state(cluster)
        pool = cluster.policy.connection_pool
        if state.connections >= (pool.max_connections or UNLIMITED):
            state.overflows += 1
            exchange.flags.append("UO")
            self._opened(exchange)
            relay.close()
            return
        consistent = cluster.policy.load_balancer.consistent_hash
        source_ip = consistent is not None and consistent.use_source_ip
        key = exchange.downstream.rpartition(":")[0] if source_ip else None
        endpoint = state.pick(cluster, self.proxy.rng, key, original=original)
        if endpoint is None:
            exchange.flags.append("UH")
            self._opened(exchange)
            relay.close()
            return
        await self._dial(relay, cluster, endpoint, pool.connect_timeout or CONNECT_TIMEOUT, state)

    async def _dial(
        self,
        relay: Relay,
        cluster: Cluster | None,
        endpoint: Endpoint,
        timeout: float,
        state: ClusterState | None,
    ) -> None:
        """Connect to `endpoint`, then let bytes flow; a failure closes the client (`UF`)."""
        exchange = relay.exchange
        exchange.destination = endpoint
        exchange.upstream_host = f"{endpoint.address}:{endpoint.port}"
        self._opened(exchange)
        host = state.host(endpoint) if state is not None else None
        if state is not None and host is not None:
            state.connections += 1
            host.connections += 1
            host.in_flight += 1
        loop = asyncio.get_running_loop()
        pipe = Pipe(relay, upstream=True)
        dial = state.dial if state is not None else None
        try:
            try:
                async with asyncio.timeout(timeout):
                    if dial is not None:
                        sock = await dial(endpoint.address, endpoint.port)
                        await loop.create_connection(lambda: pipe, sock=sock)
                    elif exchange.source is not None and self.proxy.upstreams.has_sidecar(endpoint):
                        sock = await self._from_caller(relay, exchange.source, endpoint)
                        await loop.create_connection(lambda: pipe, sock=sock)
                    else:
                        await loop.create_connection(lambda: pipe, endpoint.address, endpoint.port)
            except (TimeoutError, OSError):
                exchange.flags.append("UF")
                if state is not None and cluster is not None:
                    state.record(cluster, endpoint, 503)
                relay.close()
                return
            if state is not None and cluster is not None:
                state.record(cluster, endpoint, 200)
            relay.up = pipe
            if relay.closed:
                pipe.close()
                return
            assert pipe.transport is not None
            if relay.early:
                pipe.transport.write(relay.early)
                relay.early = b""
            if relay.down.eof and pipe.transport.can_write_eof():
                pipe.transport.write_eof()
            relay.down.resume()
            relay.timer = loop.call_later(IDLE_TIMEOUT, self._idle, relay, relay.activity)
            relay.done = loop.create_future()
            await relay.done
        finally:
            if state is not None and host is not None:
                state.connections -= 1
                host.connections -= 1
                host.in_flight -= 1

    async def _from_caller(self, relay: Relay, caller: Workload, endpoint: Endpoint) -> socket.socket:
        """A socket connected to `endpoint`, named in `Proxy.tcp_callers` as `caller`'s before it
        connects, so the server sidecar that accepts it finds the entry there."""
        family = socket.AF_INET6 if ":" in endpoint.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind(("", 0))
            relay.caller_key = (sock.getsockname()[1], endpoint.address, endpoint.port)
            self.proxy.tcp_callers[relay.caller_key] = caller
            await asyncio.get_running_loop().sock_connect(sock, (endpoint.address, endpoint.port))
        except BaseException:
            sock.close()
            raise
        return sock

    def _idle(self, relay: Relay, seen: int) -> None:
        """No byte either way for IDLE_TIMEOUT: the connection is closed, as Envoy's idle timeout does."""
        if relay.activity == seen:
            relay.close()
            return
        relay.timer = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self._idle, relay, relay.activity)

    def _opened(self, exchange: Exchange) -> None:
        for opened in self.proxy.openers:
            opened(exchange)

    def _closed(self, relay: Relay) -> None:
        self.relays.discard(relay)
        if relay.caller_key is not None:
            self.proxy.tcp_callers.pop(relay.caller_key, None)
        exchange = relay.exchange
        exchange.duration = time.monotonic() - exchange.began
        for observer in self.proxy.observers:
            observer(exchange)

    def close(self) -> None:
        for relay in list(self.relays):
            relay.close()
