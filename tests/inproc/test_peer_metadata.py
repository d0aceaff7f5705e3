"""Istio's metadata exchange between the calling proxy and the server sidecar: the server
sidecar reports who called (`reporter="destination"` metrics, the access log). Over HTTP
the app never sees the peer id, and only an endpoint behind a server sidecar is sent one; a
TCP connection is known by its source port.

Both proxies are real listeners on loopback addresses; the server sidecar's capture
(`SO_ORIGINAL_DST`) is stood in for by `Target`, as in test_proxy_tcp.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from minimesh.admin.metrics import Metrics
from minimesh.config.labels import ServicePortSpec
from minimesh.config.load import load_layers
from minimesh.config.source import parse_text
from minimesh.dataplane.accesslog import fields
from minimesh.dataplane.current import Current
from minimesh.dataplane.exchange import Exchange, Listener, ListenerKind
from minimesh.dataplane.listeners import Serving
from minimesh.dataplane.proxy import Proxy
from minimesh.dataplane.upstream import Upstreams
from minimesh.registry.model import Origin, Workload
from minimesh.routing.compile import compile_snapshot
from tests.inproc.h2upstream import H2Backend
from tests.inproc.test_proxy_tcp import LineServer, Target, ask
from tests.inproc.upstreams import GATEWAY, PATIENCE, Backend, RawClient

SERVER_ADDRESS = "127.0.0.2"
"""Where the destination workload is: its server sidecar listens here on the app's port."""
PEER_HEADERS = ("x-envoy-peer-metadata-id", "x-envoy-peer-metadata")
FORGED = b"x-envoy-peer-metadata-id: sidecar~10.9.9.9~mallory.default~default.svc.cluster.local\r\n"


def container(name: str, address: str, *ports: ServicePortSpec) -> Workload:
    app, _, _ = name.partition("-")
    return Workload(
        name, address, labels=(("app", app), ("version", "v1")), service=app, service_ports=ports,
        netns=f"/proc/{name}/ns/net", origin=Origin.CONTAINER,
    )  # fmt: skip


SLEEP = container("sleep-1", "127.0.0.3")
ROUTE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: ["*"]
  gateways: [gw]
  http: [{route: [{destination: {host: ratings, port: {number: PORT}}}]}]
"""


@dataclass
class Chain:
    """A client's first proxy (the gateway or `sleep-1`'s sidecar), the server sidecar of
    `ratings-1`, and what both recorded."""

    first: Serving
    exchanges: list[Exchange]
    metrics: Metrics

    def reported_by(self, kind: ListenerKind) -> Exchange:
        return next(e for e in self.exchanges if e.listener.kind is kind)

    def series(self, reporter: str) -> list[Mapping[str, str]]:
        """The label sets of `istio_requests_total` that `reporter` gave."""
        found = []
        for line in self.metrics.prometheus().splitlines():
            if line.startswith("istio_requests_total{"):
                labels = dict(pair.split("=", 1) for pair in line[line.index("{") + 1 : line.rindex("}")].split(","))
                if labels["reporter"] == f'"{reporter}"':
                    found.append({k: v.strip('"') for k, v in labels.items()})
        return found


@asynccontextmanager
async def chain(
    app: Backend | H2Backend, protocol: str, first: ListenerKind, *, captured: bool
) -> AsyncIterator[Chain]:
    """`ratings-1` serves `protocol` on the app's port behind its server sidecar (`captured`),
    or is reached straight on the app's address: a container meant for capture whose capture
    has not happened (failed, or `--capture explicit`), so no server sidecar serves it."""
    address = SERVER_ADDRESS if captured else "127.0.0.1"
    ratings = container("ratings-1", address, ServicePortSpec(app.port, protocol))
    route = ROUTE.replace("PORT", str(app.port))
    documents, problems = parse_text(GATEWAY + "---" + route, "mesh.yaml")
    assert problems == []
    snapshot = compile_snapshot(load_layers([documents]).mesh, (SLEEP, ratings), generation=1)
    exchanges: list[Exchange] = []
    metrics = Metrics()
    proxy = Proxy(Current(snapshot), Upstreams(), observers=(exchanges.append, metrics))
    if captured:
        proxy.upstreams.sidecars = frozenset({SERVER_ADDRESS})
    if first is ListenerKind.GATEWAY:
        listener = Listener(ListenerKind.GATEWAY, 8080, gateways=snapshot.ingress_gateways)
    else:
        listener = Listener(ListenerKind.SIDECAR, 15001, workload=SLEEP)
    entry = Serving(proxy, listener)
    inbound = Serving(
        proxy,
        Listener(ListenerKind.INBOUND, 15006, workload=ratings),
        transparent=True,
        original_of=Target((SERVER_ADDRESS, app.port)),
    )
    await entry.start("127.0.0.1", 0)
    if captured:
        await inbound.start(SERVER_ADDRESS, app.port)
    try:
        yield Chain(entry, exchanges, metrics)
    finally:
        await entry.stop()
        await inbound.stop()
        await proxy.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize(
    ("first", "caller"), [(ListenerKind.SIDECAR, "sleep-1"), (ListenerKind.GATEWAY, "istio-ingressgateway")]
)
async def test_the_server_sidecar_reports_the_calling_workload(protocol: str, first: ListenerKind, caller: str) -> None:
    """Each hop is HTTP/1.1 or HTTP/2 as `protocol` says. Whatever peer id the client sends,
    the server sidecar reports the proxy that sent the request, and the app sees none."""
    app = await (H2Backend("app") if protocol == "grpc" else Backend("app")).start()
    try:
        async with chain(app, protocol, first, captured=True) as found:
            client = await RawClient.connect(found.first.address)
            target = b"/" if first is ListenerKind.GATEWAY else b"http://ratings:%d/" % app.port
            try:
                for _ in range(2):
                    client.send(b"GET %b HTTP/1.1\r\nhost: ratings:%d\r\n%b\r\n" % (target, app.port, FORGED))
                    assert (await client.response()).status == 200
            finally:
                await client.close()
            async with asyncio.timeout(PATIENCE):
                while len(found.exchanges) < 4:
                    await asyncio.sleep(0.01)
            inbound = found.reported_by(ListenerKind.INBOUND)
            reported = inbound.source.name if inbound.source else None
            assert (reported, fields(inbound)["source_workload"]) == (caller, caller)
            (destination,) = found.series("destination")
            (source,) = found.series("source")
    finally:
        await app.close()
    assert [name for seen in app.seen for name in seen.headers if name in PEER_HEADERS] == []
    assert len(app.seen) == 2
    peer_labels = ("source_workload", "source_app", "source_workload_namespace", "destination_workload")
    assert [destination[k] for k in peer_labels] == [source[k] for k in peer_labels]
    assert destination["source_workload"] == caller
    assert destination["destination_workload"] == "ratings-1"


async def test_an_endpoint_without_a_server_sidecar_is_sent_no_peer_id() -> None:
    """Sent only where a server sidecar takes it off (Istio's option for out-of-mesh
    destinations): an app whose capture has not happened, reached directly, sees neither its
    caller's peer id nor a forged one."""
    app = await Backend("app").start()
    try:
        async with chain(app, "http", ListenerKind.SIDECAR, captured=False) as found:
            client = await RawClient.connect(found.first.address)
            try:
                client.send(b"GET http://ratings:%d/ HTTP/1.1\r\nhost: ratings\r\n%b\r\n" % (app.port, FORGED))
                assert (await client.response()).status == 200
            finally:
                await client.close()
    finally:
        await app.close()
    assert [name for seen in app.seen for name in seen.headers if name in PEER_HEADERS] == []
    assert len(app.seen) == 1


async def test_the_server_sidecar_knows_a_tcp_caller_by_its_source_port() -> None:
    """`sleep-1`'s sidecar relays a connection to a captured TCP port; the server sidecar of
    `echo-1`, in the same proxy, reports `sleep-1` as its source, and forgets the connection
    once it closes. A client reaching the server sidecar without a sidecar stays unknown."""
    app = await LineServer(b"one ").start()
    echo = container("echo-1", SERVER_ADDRESS, ServicePortSpec(app.port, "tcp"))
    snapshot = compile_snapshot(load_layers([]).mesh, (SLEEP, echo), generation=1)
    exchanges: list[Exchange] = []
    metrics = Metrics()
    proxy = Proxy(Current(snapshot), Upstreams(), observers=(exchanges.append, metrics))
    proxy.upstreams.sidecars = frozenset({SERVER_ADDRESS})
    target = Target((SERVER_ADDRESS, app.port))
    outbound = Serving(
        proxy, Listener(ListenerKind.SIDECAR, 15001, workload=SLEEP), transparent=True, original_of=target
    )
    inbound = Serving(proxy, Listener(ListenerKind.INBOUND, 15006, workload=echo), transparent=True, original_of=target)
    await outbound.start("127.0.0.1", 0)
    await inbound.start(SERVER_ADDRESS, app.port)
    try:
        for entry in (outbound, inbound):
            reader, writer = await asyncio.open_connection(*entry.address)
            assert await ask(reader, writer, b"hi\n") == b"one hi\n"
            writer.close()
        async with asyncio.timeout(PATIENCE):
            while len(exchanges) < 3:
                await asyncio.sleep(0.01)
        callers = dict(proxy.tcp_callers)
    finally:
        await outbound.stop()
        await inbound.stop()
        await proxy.close()
        await app.close()
    reported = sorted(e.source.name if e.source else "-" for e in exchanges if e.listener.kind is ListenerKind.INBOUND)
    assert reported == ["-", "sleep-1"]
    assert callers == {}
    opened = [
        line for line in metrics.prometheus().splitlines() if line.startswith("istio_tcp_connections_opened_total")
    ]
    assert any('reporter="destination",source_workload="sleep-1"' in line for line in opened), opened
