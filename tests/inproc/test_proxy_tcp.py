"""Captured connections on a transparent listener, as a workload's sidecar serves them: where
each was headed decides its protocol; TCP is relayed (server-first too), `tcp[]` and `tls[]`
rules pick the destination per connection, REGISTRY_ONLY blocks what the registry lacks.

The listener's `SO_ORIGINAL_DST` is stood in for by `Target`; everything else is real:
asyncio servers on 127.0.0.1, real clients, real TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme

from minimesh.admin.metrics import Metrics
from minimesh.dataplane.accesslog import text_line
from minimesh.dataplane.current import Current
from minimesh.dataplane.exchange import Exchange, Listener, ListenerKind
from minimesh.dataplane.listeners import Serving
from minimesh.dataplane.proxy import Proxy
from minimesh.dataplane.tcp import IDLE_TIMEOUT
from minimesh.dataplane.upstream import Upstreams
from minimesh.registry.model import Workload
from tests.clocks import on_virtual_time
from tests.inproc.upstreams import PATIENCE, compile_yaml, refused_port

SOURCE = Workload("sleep-1", "127.0.0.9", labels=(("app", "sleep"),), service="sleep")


class LineServer:
    """A TCP server on 127.0.0.1: greets first when `greeting` is set, then answers each line
    with `prefix` + the line; on the client's EOF it answers `got N` and closes."""

    def __init__(self, prefix: bytes = b"", greeting: bytes = b"") -> None:
        self.prefix = prefix
        self.greeting = greeting
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> LineServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.greeting:
            writer.write(self.greeting)
        total = 0
        while line := await reader.readline():
            total += len(line)
            writer.write(self.prefix + line)
            await writer.drain()
        writer.write(b"got %d\n" % total)
        await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass
class Target:
    """Where the next accepted connection 'was headed' (what SO_ORIGINAL_DST would say)."""

    address: tuple[str, int] = ("127.0.0.1", 0)

    def __call__(self, sock: Any) -> tuple[str, int]:
        return self.address


@dataclass
class TcpMesh:
    proxy: Proxy
    outbound: Serving
    target: Target
    exchanges: list[Exchange] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)

    async def open(self, address: str, port: int, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A client connection to `address:port`, as captured by the sidecar."""
        self.target.address = (address, port)
        host, listening = self.outbound.address
        return await asyncio.open_connection(host, listening, **kwargs)

    async def exchange_count(self, count: int) -> None:
        """Wait until `count` connections were reported closed (they close asynchronously)."""
        async with asyncio.timeout(PATIENCE):
            while len(self.exchanges) < count:
                await asyncio.sleep(0.01)

    def reload(self, yaml_text: str, values: Mapping[str, int | str]) -> None:
        self.proxy.current.swap(compile_yaml(yaml_text, values))


@contextlib.asynccontextmanager
async def tcp_mesh(yaml_text: str, values: Mapping[str, int | str], seed: int = 7) -> AsyncIterator[TcpMesh]:
    exchanges: list[Exchange] = []
    metrics = Metrics()
    proxy = Proxy(
        Current(compile_yaml(yaml_text, values)),
        Upstreams(),
        rng=random.Random(seed),
        observers=(exchanges.append, metrics),
        openers=(metrics.opened,),
    )
    target = Target()
    outbound = Serving(
        proxy, Listener(ListenerKind.SIDECAR, 15001, workload=SOURCE), transparent=True, original_of=target
    )
    await outbound.start("127.0.0.1", 0)
    try:
        yield TcpMesh(proxy, outbound, target, exchanges, metrics)
    finally:
        await outbound.stop()
        await proxy.close()


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> bytes:
    writer.write(line)
    await writer.drain()
    async with asyncio.timeout(PATIENCE):
        return await reader.readline()


async def closed_at_once(reader: asyncio.StreamReader, within: float = PATIENCE) -> bool:
    """Did the proxy close the connection without a byte (reset or FIN)?"""
    try:
        async with asyncio.timeout(within):
            return await reader.read() == b""
    except ConnectionResetError:
        return True


def tcp_service(name: str, *members: str, port: int = 9000, protocol: str = "tcp") -> str:
    """A Service `name` with one `protocol` port, and a WorkloadEntry per member on 127.0.0.1."""
    docs = [
        f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec: {{selector: {{app: {name}}}, ports: [{{name: {protocol}, port: {port}}}]}}
"""
    ]
    docs += [
        f"""
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}-{member}}}
spec: {{address: 127.0.0.1, ports: {{{protocol}: ${member}}}, labels: {{app: {name}, version: {member}}}}}
"""
        for member in members
    ]
    return "---".join(docs)


ECHO_SPLIT = """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcp-echo}
spec:
  host: tcp-echo
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo}
spec:
  hosts: [tcp-echo]
  tcp:
  - match: [{port: 9000}]
    route:
    - {destination: {host: tcp-echo, port: {number: 9000}, subset: v1}, weight: $W1}
    - {destination: {host: tcp-echo, port: {number: 9000}, subset: v2}, weight: $W2}
"""


@pytest.fixture
async def echoes() -> AsyncIterator[dict[str, LineServer]]:
    servers = {"v1": await LineServer(b"one ").start(), "v2": await LineServer(b"two ").start()}
    yield servers
    for server in servers.values():
        await server.close()


async def test_a_server_first_protocol_outside_the_mesh_passes_through_unread() -> None:
    greeter = await LineServer(b"", greeting=b"220 hello, I speak first\n").start()
    try:
        async with tcp_mesh(tcp_service("other", "a", port=1), {"a": refused_port()}) as mesh:
            reader, writer = await mesh.open("127.0.0.1", greeter.port)
            async with asyncio.timeout(PATIENCE):
                assert await reader.readline() == b"220 hello, I speak first\n"
            assert await ask(reader, writer, b"PING\r\n") == b"PING\r\n"
            writer.close()
            await mesh.exchange_count(1)
        exchange = mesh.exchanges[0]
        assert (exchange.tcp, exchange.cluster, exchange.flag_text) == (True, "PassthroughCluster", "-")
        assert exchange.upstream_host == f"127.0.0.1:{greeter.port}"
        assert exchange.bytes_received == len(b"PING\r\n")
        assert exchange.bytes_sent == len(b"220 hello, I speak first\nPING\r\ngot 6\n")
    finally:
        await greeter.close()


async def test_tcp_traffic_shifts_by_weight_per_connection(echoes: dict[str, LineServer]) -> None:
    values: dict[str, int | str] = {"v1": echoes["v1"].port, "v2": echoes["v2"].port, "W1": 100, "W2": 0}
    text = tcp_service("tcp-echo", "v1", "v2") + ECHO_SPLIT
    async with tcp_mesh(text, values) as mesh:

        async def answers(count: int) -> list[bytes]:
            seen = []
            for _ in range(count):
                reader, writer = await mesh.open("127.0.0.1", echoes["v1"].port)
                seen.append((await ask(reader, writer, b"hi\n")).split()[0])
                writer.close()
            return seen

        assert set(await answers(10)) == {b"one"}
        mesh.reload(text, {**values, "W1": 80, "W2": 20})
        shifted = await answers(200)
        twos = shifted.count(b"two")
        assert 20 <= twos <= 60, f"80/20 split gave {twos} of 200 to v2"
        mesh.reload(text, {**values, "W1": 0, "W2": 100})
        assert set(await answers(10)) == {b"two"}
        await mesh.exchange_count(220)
    assert {e.route for e in mesh.exchanges} == {"VirtualService/default/tcp-echo#tcp[0]"}
    assert mesh.exchanges[-1].cluster == "outbound|9000|v2|tcp-echo.default.svc.cluster.local"


async def test_half_close_is_passed_on_both_ways(echoes: dict[str, LineServer]) -> None:
    values: dict[str, int | str] = {"v1": echoes["v1"].port}
    async with tcp_mesh(tcp_service("tcp-echo", "v1"), values) as mesh:
        reader, writer = await mesh.open("127.0.0.1", echoes["v1"].port)
        writer.write(b"a\nbb\n")
        writer.write_eof()
        async with asyncio.timeout(PATIENCE):
            answer = await reader.read()
        assert answer == b"one a\none bb\ngot 5\n"
        writer.close()
        await mesh.exchange_count(1)
    assert mesh.exchanges[0].route == "default"


async def test_registry_only_closes_unknown_tcp_and_answers_unknown_http_with_502() -> None:
    outside = await LineServer(b"", greeting=b"hello\n").start()
    text = (
        tcp_service("known", "a", port=1)
        + """
---
apiVersion: minimesh.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
"""
    )
    try:
        async with tcp_mesh(text, {"a": refused_port()}) as mesh:
            reader, writer = await mesh.open("127.0.0.1", outside.port)
            writer.write(b"\x00\x01binary\n")
            assert await closed_at_once(reader)
            writer.close()
            reader, writer = await mesh.open("127.0.0.1", outside.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n")
            async with asyncio.timeout(PATIENCE):
                status = await reader.readline()
            assert status.startswith(b"HTTP/1.1 502 "), status
            writer.close()
            await mesh.exchange_count(2)
        blocked, http = mesh.exchanges
        assert (blocked.tcp, blocked.cluster, blocked.flag_text) == (True, "BlackHoleCluster", "UH")
        assert (http.tcp, http.status, http.cluster, http.route) == (False, 502, "BlackHoleCluster", "block_all")
        assert outside.connections == 0
    finally:
        await outside.close()


async def test_a_service_entry_opens_a_tcp_port_under_registry_only() -> None:
    outside = await LineServer(b"", greeting=b"+OK ready\n").start()
    port = outside.port
    text = """
apiVersion: minimesh.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cache}
spec:
  hosts: [cache.example]
  ports: [{number: $PORT, name: tcp, protocol: TCP}]
  resolution: NONE
"""
    try:
        async with tcp_mesh(text, {"PORT": port}) as mesh:
            reader, _ = await mesh.open("127.0.0.1", port)
            async with asyncio.timeout(PATIENCE):
                assert await reader.readline() == b"+OK ready\n"
    finally:
        await outside.close()
    assert mesh.exchanges[0].cluster == f"outbound|{port}||cache.example"
    assert mesh.exchanges[0].upstream_host == f"127.0.0.1:{port}"


async def test_undeclared_ports_are_sniffed(echoes: dict[str, LineServer]) -> None:
    """HTTP/1 goes through the HTTP path by its Host; other bytes are relayed as TCP; a
    server that speaks first is reached once detection gives up waiting."""
    greeter = await LineServer(b"", greeting=b"* server first\n").start()
    values: dict[str, int | str] = {"v1": echoes["v1"].port, "g": greeter.port}
    text = tcp_service("tcp-echo", "v1", protocol="web") + "---" + tcp_service("greeter", "g", port=7, protocol="x")
    try:
        async with tcp_mesh(text, values) as mesh:
            reader, writer = await mesh.open("127.0.0.1", echoes["v1"].port)
            assert await ask(reader, writer, b"*1\r\n$4\r\nPING\r\n") == b"one *1\r\n"
            writer.close()
            reader, writer = await mesh.open("127.0.0.1", echoes["v1"].port)
            writer.write(b"GET /x HTTP/1.1\r\nHost: nowhere.invalid:9000\r\n\r\n")
            async with asyncio.timeout(PATIENCE):
                status = await reader.readline()
            writer.close()
            reader, writer = await mesh.open("127.0.0.1", greeter.port)
            async with asyncio.timeout(PATIENCE):
                assert await reader.readline() == b"* server first\n"
            writer.close()
            await mesh.exchange_count(3)
    finally:
        await greeter.close()
    assert status.startswith(b"HTTP/1.1 "), status
    kinds = sorted((e.tcp, e.cluster) for e in mesh.exchanges)
    assert [tcp for tcp, _ in kinds] == [False, True, True]


async def test_max_connections_overflows_and_refused_upstreams_fail(echoes: dict[str, LineServer]) -> None:
    values: dict[str, int | str] = {"v1": echoes["v1"].port, "gone": refused_port()}
    text = (
        tcp_service("tcp-echo", "v1")
        + "---"
        + tcp_service("gone", "gone", port=9)
        + """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcp-echo}
spec: {host: tcp-echo, trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}}
"""
    )
    async with tcp_mesh(text, values) as mesh:
        reader, writer = await mesh.open("127.0.0.1", echoes["v1"].port)
        assert await ask(reader, writer, b"first\n") == b"one first\n"
        second, _ = await mesh.open("127.0.0.1", echoes["v1"].port)
        assert await closed_at_once(second)
        writer.close()
        await mesh.exchange_count(2)
        failed, _ = await mesh.open("127.0.0.1", values["gone"])  # type: ignore[arg-type]
        assert await closed_at_once(failed)
        await mesh.exchange_count(3)
    first, refused, overflow = sorted(mesh.exchanges, key=lambda e: e.flag_text)
    assert (first.flag_text, overflow.flag_text, refused.flag_text) == ("-", "UO", "UF")
    assert echoes["v1"].connections == 1


def tls_pair(ca: trustme.CA, *names: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def test_tls_rules_route_by_sni_and_pass_tls_through_untouched() -> None:
    ca = trustme.CA()
    server_a, client = tls_pair(ca, "a.example.com")
    server_b, _ = tls_pair(ca, "b.example.com")
    a = await LineServer(b"A ").start(server_a)
    b = await LineServer(b"B ").start(server_b)
    a_port = a.port
    text = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tls-sites}
spec:
  hosts: [a.example.com, b.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {tls: $A}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: by-sni}
spec:
  hosts: [b.example.com]
  tls:
  - match: [{port: 443, sniHosts: [b.example.com]}]
    route: [{destination: {host: a.example.com, port: {number: 443}}}]
"""
    try:
        async with tcp_mesh(text, {"A": a.port}) as mesh:
            reader, writer = await mesh.open("127.0.0.1", 443, ssl=client, server_hostname="a.example.com")
            assert await ask(reader, writer, b"hello\n") == b"A hello\n"
            writer.close()
            await mesh.exchange_count(1)
            assert mesh.exchanges[0].sni == "a.example.com"
    finally:
        await a.close()
        await b.close()
    line = text_line(mesh.exchanges[0])
    assert '"- - -" 0 - - - "-"' in line
    assert f'"127.0.0.1:{a_port}" outbound|443||a.example.com' in line
    assert " a.example.com - " in line


async def test_tcp_connections_are_counted_as_istio_does(echoes: dict[str, LineServer]) -> None:
    values: dict[str, int | str] = {"v1": echoes["v1"].port}
    async with tcp_mesh(tcp_service("tcp-echo", "v1"), values) as mesh:
        for _ in range(3):
            reader, writer = await mesh.open("127.0.0.1", echoes["v1"].port)
            assert await ask(reader, writer, b"12345\n") == b"one 12345\n"
            writer.close()
        await mesh.exchange_count(3)
    text = mesh.metrics.prometheus()
    families = {
        line.split("{")[0]: line.rsplit(" ", 1)[1]
        for line in text.splitlines()
        if line.startswith("istio_tcp_") and 'destination_service="tcp-echo.default.svc.cluster.local"' in line
    }
    assert families == {
        "istio_tcp_connections_opened_total": "3",
        "istio_tcp_connections_closed_total": "3",
        "istio_tcp_received_bytes_total": str(3 * len(b"12345\n")),
        "istio_tcp_sent_bytes_total": str(3 * len(b"one 12345\ngot 6\n")),
    }
    assert 'request_protocol="tcp"' in text and 'source_workload="sleep-1"' in text


async def test_the_inbound_side_relays_a_tcp_port_to_the_app(echoes: dict[str, LineServer]) -> None:
    """A server sidecar hands a declared TCP port to the app through its dial (a socket made
    in the app's namespace in real capture; a plain loopback socket here)."""
    app = echoes["v1"]
    snapshot_text = tcp_service("tcp-echo", "v1")
    dialled: list[tuple[str, int]] = []

    async def dial(host: str, port: int) -> socket.socket:
        dialled.append((host, port))
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        return sock

    exchanges: list[Exchange] = []
    proxy = Proxy(Current(compile_yaml(snapshot_text, {"v1": app.port})), Upstreams(), observers=(exchanges.append,))
    snapshot = proxy.current.get()
    workload = next(w for w in snapshot.workloads if w.name == "tcp-echo-v1")
    target = Target(("127.0.0.1", app.port))
    inbound = Serving(
        proxy, Listener(ListenerKind.INBOUND, 15006, workload=workload, dial=dial), transparent=True, original_of=target
    )
    await inbound.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(*inbound.address)
        assert await ask(reader, writer, b"in\n") == b"one in\n"
        writer.close()
        async with asyncio.timeout(PATIENCE):
            while not exchanges:
                await asyncio.sleep(0.01)
    finally:
        await inbound.stop()
        await proxy.close()
    assert dialled == [("127.0.0.1", app.port)]
    assert exchanges[0].cluster == f"inbound|{app.port}||tcp-echo-v1.default"


@on_virtual_time
async def test_an_idle_connection_is_closed_and_an_active_one_is_not() -> None:
    """Istio's idle timeout (an hour, on virtual time: no real wait, and a slow machine cannot
    make the talking connection look idle): a connection with no byte either way for that long
    is closed; one that keeps talking stays open across several periods."""
    echo = await LineServer(b"one ").start()
    async with tcp_mesh(tcp_service("tcp-echo", "v1"), {"v1": echo.port}) as mesh:
        active_reader, active_writer = await mesh.open("127.0.0.1", echo.port)
        idle_reader, _ = await mesh.open("127.0.0.1", echo.port)
        assert await ask(active_reader, active_writer, b"0\n") == b"one 0\n"
        loop = asyncio.get_running_loop()
        began = loop.time()
        closed = asyncio.ensure_future(closed_at_once(idle_reader, IDLE_TIMEOUT + 10))
        talked = 1
        while not closed.done():
            assert await ask(active_reader, active_writer, b"%d\n" % talked) == b"one %d\n" % talked
            talked += 1
            await asyncio.sleep(IDLE_TIMEOUT / 4)
        assert closed.result()
        assert IDLE_TIMEOUT <= loop.time() - began <= IDLE_TIMEOUT * 1.25 + 1, "closed after the idle timeout"
        assert await ask(active_reader, active_writer, b"still\n") == b"one still\n"
        active_writer.close()
    await echo.close()
