"""HTTP/2 clients (h2c with prior knowledge, as gRPC clients connect) through the gateway and
the sidecars, to HTTP/1.1 upstreams, as in Envoy: the same listener serves both versions, and
every HTTP policy applies to each stream — routing, splits, header operations, faults,
retries, timeouts, redirects — with streams multiplexed, flow control honoured both ways,
a client's RST_STREAM cancelling its request (`DC`), and `HTTP/2` in the access log."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

from aiohttp import web

from minimesh.dataplane.accesslog import response_code_details, text_line
from minimesh.dataplane.current import Current
from minimesh.dataplane.exchange import Exchange, Listener, ListenerKind
from minimesh.dataplane.http1 import Downstream
from minimesh.dataplane.http2 import Http2Downstream
from minimesh.dataplane.listeners import Serving
from minimesh.dataplane.proxy import Proxy
from minimesh.dataplane.sniff import H2_PREFACE
from minimesh.dataplane.upstream import Upstreams
from tests.inproc.h2upstream import H2Backend
from tests.inproc.test_proxy_tcp import SOURCE, Target
from tests.inproc.upstreams import (
    REVIEWS,
    Backend,
    H2Client,
    Reply,
    Seen,
    compile_yaml,
    gateway_http,
    placeholders,
    running_mesh,
    service,
    traffic_policy,
    web_route,
)

APP = service("web", "app")


async def exchange_count(exchanges: list[Exchange], count: int) -> None:
    """Wait until the proxy reported `count` requests (a cancelled one reports as it unwinds)."""
    async with asyncio.timeout(10):
        while len(exchanges) < count:
            await asyncio.sleep(0.01)


async def test_curl_with_prior_knowledge_and_http1_share_the_gateway_port() -> None:
    app = Backend("app")
    async with running_mesh(APP + web_route(), {"app": app}) as mesh:
        curl = await asyncio.create_subprocess_exec(
            "curl", "-s", "--http2-prior-knowledge", "-H", "Host: example.com", "-w", " %{http_version} %{http_code}",
            f"{mesh.gateway_url}/hello?x=1", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(10):
            out, _ = await curl.communicate()
        assert out == b"app 2 200"
        seen = app.seen[0]
        assert (seen.method, seen.path, seen.headers["host"]) == ("GET", "/hello?x=1", "example.com")
        assert seen.headers["user-agent"].startswith("curl/")
        assert "x-request-id" in seen.headers
        h2 = mesh.last()
        assert (h2.protocol, h2.status, h2.authority, h2.path) == ("HTTP/2", 200, "example.com", "/hello?x=1")
        assert '"GET /hello?x=1 HTTP/2" 200 - via_upstream' in text_line(h2)
        answer = await mesh.get("/again")
        assert (answer.status, answer.body) == (200, b"app")
        assert mesh.last().protocol == "HTTP/1.1"


class Wire(asyncio.Transport):
    """A transport fed by hand, byte by byte if need be; it keeps what the proxy writes."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: asyncio.BaseProtocol | None = None
        self.written = bytearray()
        self.closed = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_the_first_bytes_decide_the_version_even_one_at_a_time() -> None:
    app = Backend("app")
    async with running_mesh(APP + web_route(), {"app": app}) as mesh:
        http1, http2 = Wire(), Wire()
        for wire, first, rest in (
            (http1, b"P", b"OST / HTTP/1.1\r\nhost: example.com\r\ncontent-length: 0\r\n\r\n"),
            (http2, H2_PREFACE[:5], H2_PREFACE[5:]),
        ):
            protocol = mesh.gateway._protocol()
            wire.set_protocol(protocol)
            protocol.connection_made(wire)
            protocol.data_received(first)
            assert wire.protocol is protocol, "undecided"
            protocol.data_received(rest)
        assert isinstance(http1.protocol, Downstream)
        assert isinstance(http2.protocol, Http2Downstream)
        assert http2.written[3] == 0x04, "the server's SETTINGS frame"
        async with asyncio.timeout(10):
            while not http1.written.endswith(b"\r\n\r\napp"):
                await asyncio.sleep(0.01)
        assert http1.written.startswith(b"HTTP/1.1 200 OK\r\n")
        for wire in (http1, http2):
            wire.get_protocol().connection_lost(None)
        assert not mesh.gateway.connections


REVIEWS_SPLIT = (
    REVIEWS
    + """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: ["*"]
  gateways: [gw, mesh]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 75}
    - {destination: {host: reviews, subset: v2}, weight: 25}
"""
)


async def test_concurrent_streams_are_routed_and_split_each_on_its_own() -> None:
    parts = {name: Backend(name) for name in ("v1", "v2", "v3")}
    async with running_mesh(REVIEWS_SPLIT, parts) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            ids = [client.request("GET", f"/r/{n}") for n in range(60)]
            jason = client.request("GET", "/r/jason", {"end-user": "jason"})
            answers = [await client.answer(stream_id) for stream_id in ids]
            assert {a.status for a in answers} == {200}
            counts = Counter(a.body for a in answers)
            assert set(counts) == {b"v1", b"v2"} and counts[b"v1"] > counts[b"v2"], counts
            assert (await client.answer(jason)).body == b"v3"
            assert len({e.request_id for e in mesh.exchanges}) == 61
            assert {e.downstream for e in mesh.exchanges} == {mesh.exchanges[0].downstream}, "one connection"
        finally:
            await client.close()
        sidecar = await H2Client.connect(mesh.sidecar.address)
        try:
            answer = await sidecar.get("/x", {"end-user": "jason"}, authority="reviews:9080")
            assert (answer.status, answer.body) == (200, b"v3")
            assert parts["v3"].seen[-1].headers["host"] == "reviews:9080"
            assert mesh.last().listener.kind == "sidecar"
        finally:
            await sidecar.close()


async def test_streams_are_multiplexed_on_one_connection() -> None:
    app = Backend("app")
    count = 8
    everyone = asyncio.Event()

    async def waits_for_all(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        if app.active == count:
            everyone.set()
        await asyncio.wait_for(everyone.wait(), 10)
        return web.Response(body=seen.path.encode())

    app.handler = waits_for_all
    async with running_mesh(APP + web_route(), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            ids = {client.request("GET", f"/{n}"): f"/{n}".encode() for n in range(count)}
            for stream_id, path in ids.items():
                answer = await client.answer(stream_id)
                assert (answer.status, answer.body) == (200, path)
            assert app.max_active == count
        finally:
            await client.close()


async def test_header_operations_and_response_headers_as_http2_carries_them() -> None:
    app = Backend("app", Reply(headers={"x-internal": "secret", "x-app": "yes"}))
    rules = """
    - route: [{destination: {host: web}}]
      headers:
        request: {set: {x-added: "1"}, remove: [x-drop]}
        response: {add: {X-Served-By: mesh}, remove: [x-internal]}
    """
    async with running_mesh(APP + gateway_http(rules), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            answer = await client.get("/", {"x-drop": "no", "x-keep": "yes", "cookie": "a=1"})
        finally:
            await client.close()
        assert answer.status == 200
        seen = app.seen[0]
        assert (seen.headers["x-added"], seen.headers["x-keep"]) == ("1", "yes")
        assert "x-drop" not in seen.headers
        assert (answer.headers["x-served-by"], answer.headers["x-app"]) == ("mesh", "yes")
        assert "x-internal" not in answer.headers
        names = [name for name, _ in answer.pairs]
        assert names[0] == b":status"
        assert all(name == name.lower() for name in names)
        assert not {b"connection", b"keep-alive", b"transfer-encoding"} & set(names)
        assert answer.headers["server"] == "istio-envoy"


async def test_a_fault_abort_answers_the_stream_locally() -> None:
    app = Backend("app")
    rules = """
    - match: [{uri: {prefix: /faulty}}]
      fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
      route: [{destination: {host: web}}]
    - route: [{destination: {host: web}}]
    """
    async with running_mesh(APP + gateway_http(rules), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            aborted = await client.answer(client.request("POST", "/faulty", body=b"ignored"))
            assert (aborted.status, aborted.body) == (503, b"fault filter abort")
            assert (aborted.headers["content-type"], aborted.headers["content-length"]) == ("text/plain", "18")
            assert mesh.last().flag_text == "FI"
            assert app.seen == []
            fine = await client.get("/fine")
            assert (fine.status, fine.body) == (200, b"app")
        finally:
            await client.close()


async def test_a_retry_replays_the_body_and_succeeds() -> None:
    app = Backend("app")
    app.replies.append(Reply(status=503))
    async with running_mesh(APP + web_route("retries: {attempts: 2, retryOn: 5xx}"), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            answer = await client.answer(client.request("POST", "/upload", body=b"payload"))
        finally:
            await client.close()
        assert (answer.status, answer.body) == (200, b"app")
        assert [(s.body, s.attempt) for s in app.seen] == [(b"payload", 1), (b"payload", 2)]
        assert (mesh.last().attempts, mesh.last().bytes_received) == (2, 7)


async def test_the_route_timeout_is_504_UT() -> None:
    app = Backend("app", Reply(delay=0.6))
    async with running_mesh(APP + web_route("timeout: 0.2s"), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            answer = await client.get("/")
        finally:
            await client.close()
        assert (answer.status, answer.body) == (504, b"upstream request timeout")
        assert mesh.last().flag_text == "UT"


async def test_a_redirect_and_a_direct_response() -> None:
    rules = """
    - match: [{uri: {prefix: /old}}]
      redirect: {uri: /new, authority: moved.example.com}
    - directResponse: {status: 418, body: {string: teapot}}
    """
    async with running_mesh(gateway_http(rules)) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            moved = await client.get("/old")
            direct = await client.get("/else")
        finally:
            await client.close()
        assert (moved.status, moved.headers["location"]) == (301, "http://moved.example.com/new")
        assert (direct.status, direct.body) == (418, b"teapot")


async def test_a_mirror_gets_a_copy_and_cors_answers_a_preflight() -> None:
    app, copy = Backend("app"), Backend("copy")
    rules = """
    - corsPolicy: {allowOrigins: [{exact: "https://app.example.com"}], allowMethods: [POST]}
      mirror: {host: shadow}
      route: [{destination: {host: web}}]
    """
    yaml = APP + "---" + service("shadow", "copy") + gateway_http(rules)
    async with running_mesh(yaml, {"app": app, "copy": copy}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            origin = {"origin": "https://app.example.com"}
            preflight = await client.answer(
                client.request("OPTIONS", "/orders", {**origin, "access-control-request-method": "POST"})
            )
            posted = await client.answer(client.request("POST", "/orders", origin, body=b"order"))
        finally:
            await client.close()
        assert (preflight.status, preflight.headers["access-control-allow-origin"]) == (200, "https://app.example.com")
        assert (posted.status, posted.headers["access-control-allow-origin"]) == (200, "https://app.example.com")
        assert [s.method for s in app.seen] == ["POST"]
        async with asyncio.timeout(10):
            while not copy.seen:
                await asyncio.sleep(0.01)
        assert (copy.seen[0].headers["host"], copy.seen[0].body) == ("example.com-shadow", b"order")


async def test_http2_max_requests_overflows_streams_past_the_limit() -> None:
    release = asyncio.Event()
    app = Backend("app")

    async def held(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        await asyncio.wait_for(release.wait(), 10)
        return web.Response(body=b"app")

    app.handler = held
    pool = traffic_policy("web", "{connectionPool: {http: {http2MaxRequests: 2}}}")
    async with running_mesh(APP + pool + web_route("retries: {attempts: 0}"), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            first = [client.request("GET", f"/{n}") for n in range(2)]
            await client.until(lambda: app.active == 2)
            over = [await client.get(f"/over/{n}") for n in range(3)]
            release.set()
            admitted = [await client.answer(stream_id) for stream_id in first]
        finally:
            release.set()
            await client.close()
        assert {(a.status, a.headers["x-envoy-overloaded"]) for a in over} == {(503, "true")}
        assert {a.status for a in admitted} == {200}
        assert app.max_active == 2


async def test_a_large_response_waits_for_the_clients_window() -> None:
    body = os.urandom(3 * 1024 * 1024 + 17)
    app = Backend("app", Reply(body=body))
    async with running_mesh(APP + web_route(), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            client.auto_ack = False
            stream_id = client.request("GET", "/big")
            answer = client.answers[stream_id]
            await client.until(lambda: len(answer.body) >= 65535)
            await client.ping()
            assert len(answer.body) == 65535, "nothing past the window"
            assert not answer.ended
            client.auto_ack = True
            client.ack(stream_id)
            await client.answer(stream_id)
        finally:
            await client.close()
        assert answer.status == 200
        assert answer.headers["content-length"] == str(len(body))
        assert answer.body == body
        assert mesh.last().bytes_sent == len(body)


async def test_a_request_body_larger_than_the_window_streams_through() -> None:
    body = os.urandom(5 * 1024 * 1024)
    app = Backend("app")
    async with running_mesh(APP + web_route(), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            stream_id = client.request("POST", "/upload", {"content-length": str(len(body))}, more=True)
            h2 = client.h2
            sent = 0
            while sent < len(body):
                await client.until(lambda: h2.local_flow_control_window(stream_id) > 0)
                size = min(h2.local_flow_control_window(stream_id), h2.max_outbound_frame_size, len(body) - sent)
                h2.send_data(stream_id, body[sent : sent + size], end_stream=sent + size == len(body))
                client.writer.write(h2.data_to_send())
                sent += size
            answer = await client.answer(stream_id)
        finally:
            await client.close()
        assert (answer.status, answer.body) == (200, b"app")
        assert app.seen[0].body == body
        assert mesh.last().bytes_received == len(body)


async def test_a_client_reset_cancels_its_stream_only() -> None:
    release = asyncio.Event()

    async def streams_then_stalls(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        if seen.path != "/stall":
            return web.Response(body=b"fine")
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first")
        await asyncio.wait_for(release.wait(), 10)
        return response

    app = Backend("app")
    app.handler = streams_then_stalls
    async with running_mesh(APP + web_route(), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            stalled = client.request("GET", "/stall")
            answer = client.answers[stalled]
            await client.until(lambda: answer.body == b"first")
            client.reset(stalled)
            await exchange_count(mesh.exchanges, 1)
            cancelled = mesh.exchanges[0]
            assert (cancelled.status, cancelled.flag_text, cancelled.bytes_sent) == (200, "DC", 5)
            fine = await client.get("/fine")
            assert (fine.status, fine.body) == (200, b"fine")
        finally:
            release.set()
            await client.close()


async def test_a_reset_upstream_mid_response_resets_the_stream() -> None:
    async def dies(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-length": "100"})
        await response.prepare(request)
        await response.write(b"partial")
        assert request.transport is not None
        request.transport.abort()
        return response

    app = Backend("app")
    app.handler = dies
    async with running_mesh(APP + web_route(), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            answer = await client.get("/")
            assert (answer.status, answer.reset, answer.ended) == (200, 0, False)
            last = mesh.last()
            assert (last.flag_text, response_code_details(last)) == (
                "UC",
                "upstream_reset_after_response_started{connection_termination}",
            )
            assert (await client.get("/")).reset == 0, "the connection still serves"
        finally:
            await client.close()


DETECTED = """
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{name: $PORT_NAME, port: $app}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web-app}
spec: {address: 127.0.0.1, ports: {$PORT_NAME: $app}, labels: {app: web}}
"""


async def test_a_captured_connection_speaking_http2_is_served_as_http() -> None:
    """On a port of undeclared protocol the preface is sniffed, and the upstream is spoken to
    in the client's protocol (Envoy's USE_DOWNSTREAM_PROTOCOL, as Istio sets for sniffed
    ports); on an `http` port the listener tells the versions apart itself and the upstream
    gets HTTP/1.1."""
    for port_name, app in (("web", H2Backend("app")), ("http", Backend("app"))):
        await app.start()
        values = {**placeholders({"app": app}), "PORT_NAME": port_name}
        snapshot = compile_yaml(DETECTED, values)
        exchanges: list[Exchange] = []
        proxy = Proxy(Current(snapshot), Upstreams(), observers=(exchanges.append,))
        listener = Listener(ListenerKind.SIDECAR, 15001, workload=SOURCE)
        outbound = Serving(proxy, listener, transparent=True, original_of=Target(("127.0.0.1", app.port)))
        await outbound.start("127.0.0.1", 0)
        client = await H2Client.connect(outbound.address)
        try:
            answer = await client.get("/captured", authority=f"web:{app.port}")
            assert (answer.status, answer.body) == (200, b"app"), port_name
            assert (exchanges[-1].protocol, exchanges[-1].cluster) == (
                "HTTP/2",
                f"outbound|{app.port}||web.default.svc.cluster.local",
            )
        finally:
            await client.close()
            await outbound.stop()
            await proxy.close()
            await app.close()
