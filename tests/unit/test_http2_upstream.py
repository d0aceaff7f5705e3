"""Which upstream protocol a request is sent in (Istio's cluster protocol options), and the
request head as HTTP/2 carries it upstream (pseudo-headers, connection-specific headers
dropped but `te: trailers` kept), beside the HTTP/1.1 bytes it is rendered to otherwise."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from minimesh.config import model as m
from minimesh.config.labels import DETECTED
from minimesh.dataplane.call import Call, Responding
from minimesh.dataplane.exchange import Exchange, Listener, ListenerKind
from minimesh.dataplane.http1 import Body, Request
from minimesh.dataplane.respond import head_for
from minimesh.dataplane.upstream import speaks_http2
from minimesh.routing.compile import compile_snapshot
from minimesh.routing.headers import NO_REQUEST_OPS, RequestOps
from minimesh.routing.request import RequestView
from minimesh.routing.snapshot import Cluster, Policy
from tests.unit.test_routing_compile import load_mesh


def cluster(protocol: str, **pool: Any) -> Cluster:
    policy = Policy(connection_pool=m.ConnectionPool(**pool))
    return Cluster("c", "web.default.svc.cluster.local", "web", "default", None, 80, (), policy, protocol)


def request(
    version: bytes = b"1.1", method: bytes = b"GET", headers: list[tuple[bytes, bytes]] | None = None
) -> Request:
    body = Body()
    body.finish()
    return Request(method, b"/x", headers or [], body, version)


PROTOCOLS = {
    "grpc port, HTTP/1.1 client": ("GRPC", {}, b"1.1", True),
    "http2 port": ("HTTP2", {}, b"1.1", True),
    "grpc-web port (Istio's IsHTTP2)": ("GRPC-WEB", {}, b"1.1", True),
    "http port, HTTP/2 client": ("HTTP", {}, b"2", False),
    "sniffed port follows the client (2)": (DETECTED, {}, b"2", True),
    "sniffed port follows the client (1.1)": (DETECTED, {}, b"1.1", False),
    "h2UpgradePolicy UPGRADE on http": ("HTTP", {"h2_upgrade_policy": "UPGRADE"}, b"1.1", True),
    "h2UpgradePolicy DO_NOT_UPGRADE": ("HTTP", {"h2_upgrade_policy": "DO_NOT_UPGRADE"}, b"1.1", False),
    "useClientProtocol, HTTP/2 client": ("HTTP", {"use_client_protocol": True}, b"2", True),
    "useClientProtocol, HTTP/1.1 client": ("HTTP", {"use_client_protocol": True}, b"1.1", False),
}


@pytest.mark.parametrize(("protocol", "pool", "version", "h2"), PROTOCOLS.values(), ids=PROTOCOLS.keys())
def test_the_upstream_protocol_of_each_port_and_policy(
    protocol: str, pool: dict[str, Any], version: bytes, h2: bool
) -> None:
    assert speaks_http2(cluster(protocol, **pool), request(version)) is h2


def test_an_upgrade_stays_http1_even_to_an_http2_port() -> None:
    websocket = request()
    websocket.upgrade = b"websocket"
    assert not speaks_http2(cluster("GRPC"), websocket)


SNAPSHOT = compile_snapshot(load_mesh(""), ())


def call(req: Request, kind: str = "sidecar", forwarded: str = "") -> Call:
    exchange = Exchange(
        Listener(ListenerKind(kind), 80), "GET", "/x", "", "HTTP/1.1", "rid", 0.0, 0.0, "10.0.0.9:5555", "", forwarded
    )
    loop = asyncio.new_event_loop()
    loop.close()
    return Call(req, cast(Responding, None), exchange, RequestView("GET", "/x", "", {}), SNAPSHOT, loop, False)


def test_the_http2_head_has_pseudo_headers_first_and_no_connection_headers() -> None:
    headers = [(b"host", b"old"), (b"connection", b"keep-alive"), (b"te", b"trailers"), (b"keep-alive", b"5"),
               (b"upgrade", b"h2c"), (b"x-app", b"1"), (b"x-gone", b"1"), (b"content-length", b"3")]  # fmt: skip
    ops = RequestOps.of(m.HeaderOperations(set=(("X-Set", "v"),), remove=("x-gone",)))
    head = head_for(
        call(request(b"1.1", b"POST", headers), "gateway", "1.1.1.1"), cluster("GRPC"), ops, "/y", "web:80", b"abc"
    )
    assert head.fields == [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/y"), (b":authority", b"web:80"),
        (b"x-request-id", b"rid"), (b"te", b"trailers"), (b"x-app", b"1"), (b"x-set", b"v"),
        (b"x-forwarded-for", b"1.1.1.1, 10.0.0.9"), (b"x-forwarded-proto", b"http"), (b"content-length", b"3"),
    ]  # fmt: skip
    shadow = head.shadow()
    assert shadow.fields is not None and shadow.fields[3] == (b":authority", b"web-shadow:80")
    assert head.fields[3] == (b":authority", b"web:80"), "the original is untouched"


def test_te_other_than_trailers_is_dropped_and_an_unknown_length_is_left_out() -> None:
    streamed = Body()
    req = request(b"2", b"POST", [(b"te", b"gzip")])
    req.body = streamed
    head = head_for(call(req), cluster("HTTP2"), NO_REQUEST_OPS, "/x", "web", streamed)
    assert head.fields is not None
    assert [name for name, _ in head.fields] == [b":method", b":scheme", b":path", b":authority", b"x-request-id",
                                                 b"x-forwarded-proto"]  # fmt: skip


def test_the_http1_head_is_rendered_as_before() -> None:
    req = request(b"1.1", b"GET", [(b"host", b"old"), (b"x-app", b"1")])
    head = head_for(call(req), cluster("HTTP"), NO_REQUEST_OPS, "/x", "web:80", b"")
    assert head.fields is None
    assert b"".join([*head.parts, head.framing]) == (
        b"GET /x HTTP/1.1\r\nhost: web:80\r\nx-request-id: rid\r\nx-app: 1\r\nx-forwarded-proto: http\r\n\r\n"
    )
    assert b"".join(head.shadow().parts).startswith(b"GET /x HTTP/1.1\r\nhost: web-shadow:80\r\n")
