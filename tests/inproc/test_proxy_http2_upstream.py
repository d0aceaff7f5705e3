"""HTTP/2 upstreams (ports declared `grpc`/`http2`, h2c with prior knowledge, as Envoy speaks
to them): streams multiplexed on one connection per endpoint, flow control both ways,
GOAWAY and RST_STREAM handled as Envoy's codec and router handle them, protocol translation
from HTTP/1.1 clients, trailers passed through, the connection-pool limits, and every HTTP
policy on HTTP/2 requests to an HTTP/2 upstream."""

from __future__ import annotations

from collections import Counter
from typing import Any

import grpc
import pytest
from h2.errors import ErrorCodes

from minimesh.dataplane.accesslog import response_code_details
from minimesh.dataplane.current import Current
from minimesh.dataplane.exchange import Exchange, Listener, ListenerKind
from minimesh.dataplane.http2 import STREAM_WINDOW
from minimesh.dataplane.listeners import Serving
from minimesh.dataplane.proxy import Proxy
from minimesh.dataplane.upstream import Upstreams
from tests.inproc.h2upstream import H2Backend, H2Reply, grpcio_app
from tests.inproc.test_proxy_tcp import Target, tcp_service
from tests.inproc.upstreams import (
    PATIENCE,
    RESET,
    H2Client,
    RawClient,
    compile_yaml,
    gateway_http,
    refused_port,
    running_mesh,
    service,
    until,
    web_route,
)

GRPC_APP = service("web", "app", protocol="grpc")
GRPC = {"content-type": "application/grpc", "te": "trailers"}


def pool(settings: str, tcp: str = "") -> str:
    """A DestinationRule for `web` with these `connectionPool.http` (and `tcp`) settings."""
    return f"""
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web}}
spec: {{host: web, trafficPolicy: {{connectionPool: {{http: {{{settings}}}, tcp: {{{tcp}}}}}}}}}
"""


async def test_an_http2_client_reaches_an_http2_upstream_and_gets_its_trailers() -> None:
    trailers = (("grpc-status", "14"), ("grpc-message", "down"))
    app = H2Backend("app", H2Reply(headers=(("content-type", "application/grpc"),), trailers=trailers))
    async with running_mesh(GRPC_APP + web_route(), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            answer = await client.answer(client.request("POST", "/pkg.Svc/Call", {**GRPC, "x-custom": "1"}, b"msg"))
        finally:
            await client.close()
        assert (answer.status, answer.body) == (200, b"app")
        assert answer.trailers == {"grpc-status": "14", "grpc-message": "down"}
        seen = app.seen[0]
        assert (seen.headers[":method"], seen.path, seen.headers[":authority"]) == (
            "POST",
            "/pkg.Svc/Call",
            "example.com",
        )
        assert (seen.headers["te"], seen.headers["x-custom"], seen.body) == ("trailers", "1", b"msg")
        assert seen.headers["x-envoy-attempt-count"] == "1"
        exchange = mesh.last()
        assert (exchange.protocol, exchange.grpc, exchange.grpc_status) == ("HTTP/2", True, 14)


async def test_an_http1_client_reaches_an_http2_upstream() -> None:
    app = H2Backend("app", H2Reply(headers=(("x-up", "1"),), trailers=(("grpc-status", "0"),)))
    async with running_mesh(GRPC_APP + web_route(), {"app": app}) as mesh:
        answer = await mesh.request(
            "POST", "/h1?q=1", data=b"body", headers={"Connection": "keep-alive", "TE": "trailers"}
        )
        assert (answer.status, answer.body, answer.headers["x-up"]) == (200, b"app", "1")
        assert "grpc-status" not in answer.headers, "an HTTP/1.1 client gets no trailers (Envoy's default)"
        seen = app.seen[0]
        assert (seen.path, seen.headers[":authority"], seen.headers[":scheme"], seen.body) == (
            "/h1?q=1", "example.com", "http", b"body",
        )  # fmt: skip
        assert "host" not in seen.headers and "connection" not in seen.headers
        assert (seen.headers["te"], seen.headers["content-length"]) == ("trailers", "4")
        assert mesh.last().protocol == "HTTP/1.1"


async def test_streams_share_one_connection_per_endpoint() -> None:
    app = H2Backend("app", H2Reply(hold=True))
    count = 6
    async with running_mesh(GRPC_APP + web_route(), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            ids = [client.request("GET", f"/{n}") for n in range(count)]
            await until(lambda: len(app.seen) == count, "every stream at the upstream")
            app.released.set()
            answers = [await client.answer(stream_id) for stream_id in ids]
            assert {a.status for a in answers} == {200}
            h1 = await mesh.get("/from-http1")
            assert h1.status == 200
        finally:
            await client.close()
        assert len(app.connections) == 1
        assert {s.connection for s in app.seen} == {0}


async def test_bodies_larger_than_every_window_stream_both_ways() -> None:
    app = H2Backend("app", H2Reply(echo=True))
    big = bytes(range(256)) * (3 * 4096 + 7)
    async with running_mesh(GRPC_APP + web_route(), {"app": app}) as mesh:
        answer = await mesh.request("POST", "/echo", data=big)
        assert (answer.status, len(answer.body), answer.body == big) == (200, len(big), True)
        client = await H2Client.connect(mesh.gateway.address)
        try:
            app.reply = H2Reply(body=big)
            streamed = await client.get("/big")
        finally:
            await client.close()
        assert (streamed.status, streamed.body == big) == (200, True)
        assert app.seen[0].body == big


async def test_goaway_refuses_the_streams_above_it_and_they_are_retried_on_a_new_connection() -> None:
    app = H2Backend("app", H2Reply(hold=True), goaway_after=1)
    async with running_mesh(
        GRPC_APP + web_route("retries: {attempts: 2, retryOn: refused-stream}"), {"app": app}
    ) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            ids = [client.request("GET", f"/{n}") for n in range(2)]
            await until(lambda: len(app.seen) == 2, "both streams processed")
            app.released.set()
            answers = [await client.answer(stream_id) for stream_id in ids]
        finally:
            await client.close()
        assert {a.status for a in answers} == {200}
        assert len(app.connections) == 2
        assert sorted(e.attempts for e in mesh.exchanges) == [1, 2]


async def test_a_refused_stream_is_retried_under_refused_stream_and_reported_ur_otherwise() -> None:
    app = H2Backend("app")
    app.replies = [H2Reply(reset=ErrorCodes.REFUSED_STREAM)]
    async with running_mesh(
        GRPC_APP + web_route("retries: {attempts: 1, retryOn: refused-stream}"), {"app": app}
    ) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            retried = await client.get("/r")
            assert (retried.status, retried.body, mesh.last().attempts) == (200, b"app", 2)
            mesh.reload(GRPC_APP + web_route("retries: {attempts: 1, retryOn: connect-failure}"))
            app.replies = [H2Reply(reset=ErrorCodes.REFUSED_STREAM)]
            refused = await client.get("/r")
            app.replies = [H2Reply(reset=ErrorCodes.INTERNAL_ERROR)]
            reset = await client.get("/r")
            mesh.reload(GRPC_APP + web_route("retries: {attempts: 1, retryOn: reset}"))
            app.replies = [H2Reply(reset=ErrorCodes.INTERNAL_ERROR)]
            reset_retried = await client.get("/r")
        finally:
            await client.close()
        assert (refused.status, refused.body) == (503, RESET + b"remote refused stream reset")
        assert (reset.status, reset.body) == (503, RESET + b"remote reset")
        assert [e.flag_text for e in mesh.exchanges[1:3]] == ["UR", "UR"]
        assert (reset_retried.status, mesh.last().attempts) == (200, 2)
        assert len(app.connections) == 1, "a reset stream leaves its connection open"


async def test_a_stream_reset_mid_response_resets_the_client_stream_and_is_ur() -> None:
    app = H2Backend("app", H2Reply(body=b"partial", reset=ErrorCodes.INTERNAL_ERROR, reset_after_head=True))
    async with running_mesh(GRPC_APP + web_route(), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            answer = await client.get("/")
            assert (answer.status, answer.reset, answer.ended) == (200, 0, False)
            assert (await client.get("/")).status == 200, "the connection still serves"
        finally:
            await client.close()
        first = mesh.exchanges[0]
        assert (first.flag_text, response_code_details(first)) == (
            "UR",
            "upstream_reset_after_response_started{remote_reset}",
        )


async def test_a_lost_connection_fails_every_stream_on_it() -> None:
    app = H2Backend("app", H2Reply(hold=True))
    async with running_mesh(GRPC_APP + web_route("retries: {attempts: 0}"), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            ids = [client.request("GET", f"/{n}") for n in range(3)]
            await until(lambda: len(app.seen) == 3, "three streams at the upstream")
            app.connections[0].close()
            answers = [await client.answer(stream_id) for stream_id in ids]
        finally:
            await client.close()
        assert {(a.status, a.body) for a in answers} == {(503, RESET + b"connection termination")}
        assert {e.flag_text for e in mesh.exchanges} == {"UC"}


async def test_max_requests_per_connection_opens_a_new_connection() -> None:
    app = H2Backend("app")
    async with running_mesh(GRPC_APP + pool("maxRequestsPerConnection: 2") + web_route(), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            answers = [await client.get(f"/{n}") for n in range(5)]
        finally:
            await client.close()
        assert {a.status for a in answers} == {200}
        assert [s.connection for s in app.seen] == [0, 0, 1, 1, 2]


@pytest.mark.parametrize(
    ("settings", "max_streams"), [("maxConcurrentStreams: 2", None), ("maxRetries: 3", 2)], ids=["pool", "peer"]
)
async def test_concurrent_streams_beyond_either_limit_take_another_connection(
    settings: str, max_streams: int | None
) -> None:
    """The pool's `maxConcurrentStreams`, or the upstream's SETTINGS_MAX_CONCURRENT_STREAMS."""
    app = H2Backend("app", H2Reply(hold=True), max_streams=max_streams)
    async with running_mesh(GRPC_APP + pool(settings) + web_route(), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            ids = [client.request("GET", f"/{n}") for n in range(2)]
            await until(lambda: len(app.seen) == 2, "two streams at the upstream")
            third = client.request("GET", "/third")
            await until(lambda: len(app.seen) == 3, "the third stream at the upstream")
            app.released.set()
            answers = [await client.answer(stream_id) for stream_id in [*ids, third]]
        finally:
            await client.close()
        assert {a.status for a in answers} == {200}
        assert Counter(s.connection for s in app.seen) == {0: 2, 1: 1}


async def test_past_max_connections_a_request_waits_for_a_stream_and_past_the_pending_queue_overflows() -> None:
    app = H2Backend("app", H2Reply(hold=True), max_streams=1)
    yaml = GRPC_APP + pool("http1MaxPendingRequests: 1", tcp="maxConnections: 1") + web_route("retries: {attempts: 0}")
    async with running_mesh(yaml, {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            first = client.request("GET", "/first")
            await until(lambda: len(app.seen) == 1, "the first stream at the upstream")
            (state,) = mesh.proxy.upstreams.clusters.values()
            second = client.request("GET", "/second")
            await until(lambda: state.pending == 1, "the second request waiting for a stream")
            third = await client.answer(client.request("GET", "/third"))
            app.released.set()
            answers = [await client.answer(stream_id) for stream_id in (first, second)]
        finally:
            await client.close()
        assert (third.status, third.body) == (503, b"upstream connect error or disconnect/reset before headers. "
                                              b"reset reason: overflow")  # fmt: skip
        assert [a.status for a in answers] == [200, 200]
        assert [s.path for s in app.seen] == ["/first", "/second"]
        assert len(app.connections) == 1, "maxConnections holds: the second waited for the first's stream"
        assert (state.pending, state.connections) == (0, 1)


async def test_http2_max_requests_overflows() -> None:
    app = H2Backend("app", H2Reply(hold=True))
    yaml = GRPC_APP + pool("http2MaxRequests: 1") + web_route("retries: {attempts: 0}")
    async with running_mesh(yaml, {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            first = client.request("GET", "/first")
            await until(lambda: len(app.seen) == 1, "the first stream at the upstream")
            over = await client.get("/over")
            app.released.set()
            admitted = await client.answer(first)
        finally:
            await client.close()
        assert (over.status, over.body, over.headers["x-envoy-overloaded"]) == (503, RESET + b"overflow", "true")
        assert admitted.status == 200


# ---------------------------------------------------------------- every policy, HTTP/2 both sides

REVIEWS = (
    service("reviews", "v1", "v2", protocol="grpc")
    + """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""
)


async def test_match_split_subset_rewrite_and_header_operations() -> None:
    parts = {name: H2Backend(name) for name in ("v1", "v2")}
    for name, backend in parts.items():
        backend.labels = {"version": name}
    rules = """
    - match: [{uri: {prefix: /outer}, headers: {end-user: {exact: jason}}}]
      rewrite: {uri: /inner, authority: reviews.internal}
      headers:
        request: {set: {x-set: "1"}, remove: [x-drop]}
        response: {add: {x-added: "added"}}
      route: [{destination: {host: reviews, subset: v2}}]
    - route:
      - {destination: {host: reviews, subset: v1}, weight: 50}
      - {destination: {host: reviews, subset: v2}, weight: 50}
    """
    async with running_mesh(REVIEWS + gateway_http(rules), parts) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            jason = await client.get("/outer/x", {"end-user": "jason", "x-drop": "1"})
            split = [await client.get(f"/s/{n}") for n in range(40)]
        finally:
            await client.close()
        assert (jason.status, jason.body, jason.headers["x-added"]) == (200, b"v2", "added")
        seen = parts["v2"].seen[0]
        assert (seen.path, seen.headers[":authority"], seen.headers["x-set"]) == ("/inner/x", "reviews.internal", "1")
        assert "x-drop" not in seen.headers
        counts = Counter(a.body for a in split)
        assert set(counts) == {b"v1", b"v2"}, counts


async def test_redirect_direct_response_fault_and_cors() -> None:
    app = H2Backend("app")
    rules = """
    - match: [{uri: {prefix: /old}}]
      redirect: {uri: /new, authority: moved.example.com}
    - match: [{uri: {prefix: /teapot}}]
      directResponse: {status: 418, body: {string: teapot}}
    - match: [{uri: {prefix: /fault}}]
      fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
      route: [{destination: {host: web}}]
    - corsPolicy: {allowOrigins: [{exact: "https://app.example.com"}], allowMethods: [POST]}
      route: [{destination: {host: web}}]
    """
    async with running_mesh(GRPC_APP + gateway_http(rules), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            moved = await client.get("/old")
            teapot = await client.get("/teapot")
            fault = await client.get("/fault")
            origin = {"origin": "https://app.example.com"}
            ask = {**origin, "access-control-request-method": "POST"}
            preflight = await client.answer(client.request("OPTIONS", "/x", ask))
            actual = await client.answer(client.request("POST", "/x", origin, b"order"))
        finally:
            await client.close()
        assert (moved.status, moved.headers["location"]) == (301, "http://moved.example.com/new")
        assert (teapot.status, teapot.body) == (418, b"teapot")
        assert (fault.status, mesh.exchanges[2].flag_text) == (503, "FI")
        assert (preflight.status, preflight.headers["access-control-allow-origin"]) == (200, "https://app.example.com")
        assert (actual.status, actual.headers["access-control-allow-origin"]) == (200, "https://app.example.com")
        assert [s.headers[":method"] for s in app.seen] == ["POST"]


async def test_timeout_retry_and_mirror() -> None:
    app, copy = H2Backend("app"), H2Backend("copy")
    rules = """
    - match: [{uri: {prefix: /slow}}]
      timeout: 0.2s
      route: [{destination: {host: web}}]
    - mirror: {host: shadow}
      retries: {attempts: 2, retryOn: 5xx}
      route: [{destination: {host: web}}]
    """
    yaml = GRPC_APP + "---" + service("shadow", "copy", protocol="http2") + gateway_http(rules)
    async with running_mesh(yaml, {"app": app, "copy": copy}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            app.replies = [H2Reply(hold=True)]
            slow = await client.get("/slow")
            app.released.set()
            app.replies = [H2Reply(status=503)]
            retried = await client.answer(client.request("POST", "/orders", None, b"order"))
        finally:
            await client.close()
        assert (slow.status, slow.body, mesh.exchanges[0].flag_text) == (504, b"upstream request timeout", "UT")
        assert (retried.status, retried.body, mesh.last().attempts) == (200, b"app", 2)
        await until(lambda: copy.seen, "the mirror's copy")
        assert (copy.seen[0].headers[":authority"], copy.seen[0].body) == ("example.com-shadow", b"order")


async def test_outlier_detection_and_per_request_load_balancing() -> None:
    bad, good = H2Backend("bad", H2Reply(status=503)), H2Backend("good")
    outlier = """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 60s, maxEjectionPercent: 100}
"""
    yaml = service("web", "bad", "good", protocol="grpc") + outlier + web_route("retries: {attempts: 0}")
    async with running_mesh(yaml, {"bad": bad, "good": good}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            answers = [await client.get(f"/{n}") for n in range(6)]
        finally:
            await client.close()
        assert [a.status for a in answers].count(503) == 1, "ejected after its first 5xx"
        assert len(bad.seen) == 1 and len(good.seen) == 5
    one, other = H2Backend("one"), H2Backend("other")
    balanced = service("web", "one", "other", protocol="grpc") + outlier + web_route()
    async with running_mesh(balanced, {"one": one, "other": other}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            spread = [await client.get(f"/{n}") for n in range(6)]
        finally:
            await client.close()
        assert Counter(a.body for a in spread) == {b"one": 3, b"other": 3}, "per request, not per connection"


async def test_a_slow_client_paces_the_upstream_through_the_windows() -> None:
    """The proxy hands the upstream back only the window of what it passed on, so an HTTP/2
    client that reads nothing holds the upstream to one stream window (nothing is buffered
    whole)."""
    big = bytes(range(256)) * (8 * 4096)
    app = H2Backend("app", H2Reply(body=big))
    async with running_mesh(GRPC_APP + web_route(), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            client.auto_ack = False
            stream_id = client.request("GET", "/big")
            answer = client.answers[stream_id]
            await client.until(lambda: answer.unacked == 65535)
            streams = [
                stream
                for state in mesh.proxy.upstreams.clusters.values()
                for conns in state.h2.by_host.values()
                for conn in conns
                for stream in conn.streams.values()
            ]
            assert len(streams) == 1 and streams[0].response is not None
            body = streams[0].response.body
            await until(lambda: body.received >= STREAM_WINDOW, "the upstream filling its stream window")
            await client.ping()
            assert body.received <= STREAM_WINDOW + 4 * 65536, "no more than the window and what went on"
            client.auto_ack = True
            client.ack(stream_id)
            whole = await client.answer(stream_id)
        finally:
            await client.close()
        assert (whole.status, whole.body == big) == (200, True)


async def test_an_http2_endpoint_that_refuses_connections_is_503_uf() -> None:
    nobody = H2Backend("app")
    nobody.port = refused_port()
    async with running_mesh(GRPC_APP + web_route("retries: {attempts: 0}"), {"app": nobody}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            answer = await client.get("/")
        finally:
            await client.close()
        assert (answer.status, answer.body, mesh.last().flag_text) == (503, RESET + b"connection failure", "UF")


async def test_the_inbound_side_speaks_http2_to_an_app_on_a_grpc_port() -> None:
    """A server sidecar hands a request for its app's `grpc` port to the app in HTTP/2, as
    Istio's inbound cluster for such a port, whatever version the client spoke."""
    app = await H2Backend("app").start()
    snapshot = compile_yaml(tcp_service("greeter", "v1", protocol="grpc"), {"v1": app.port})
    exchanges: list[Exchange] = []
    proxy = Proxy(Current(snapshot), Upstreams(), observers=(exchanges.append,))
    workload = next(w for w in snapshot.workloads if w.name == "greeter-v1")
    listener = Listener(ListenerKind.INBOUND, 15006, workload=workload)
    inbound = Serving(proxy, listener, transparent=True, original_of=Target(("127.0.0.1", app.port)))
    await inbound.start("127.0.0.1", 0)
    try:
        client = await RawClient.connect(inbound.address)
        client.send(b"POST /pkg.Greeter/Hello HTTP/1.1\r\nhost: greeter:9000\r\ncontent-length: 2\r\n\r\nhi")
        answer = await client.response()
        await client.close()
    finally:
        await inbound.stop()
        await proxy.close()
        await app.close()
    assert (answer.status, answer.body) == (200, b"app")
    assert (app.seen[0].headers[":authority"], app.seen[0].body) == ("greeter:9000", b"hi")
    assert exchanges[0].cluster == f"inbound|{app.port}||greeter-v1.default"


@pytest.mark.parametrize("policy", ["", "retries: {attempts: 0}"], ids=["istio-default-retries", "no-retries"])
async def test_grpcio_unary_and_bidirectional_calls_through_the_gateway(policy: str) -> None:
    """Real gRPC (grpcio, raw bytes, no generated code) on both sides: a unary call, a
    bidirectional stream whose replies arrive while the client is still sending, and a
    status from the server's trailers. Istio's default retries (attempts 2) keep a copy of
    the request body for a retry, yet the stream is forwarded as it arrives."""

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"fail":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no room")
        return b"hello " + request

    async def chat(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async for request in requests:
            yield b"echo " + request

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    }
    mesh_yaml = GRPC_APP + web_route(*filter(None, [policy]))
    async with grpcio_app("pkg.Svc", handlers) as app, running_mesh(mesh_yaml, {"app": app}) as mesh:
        host, port = mesh.gateway.address
        async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
            assert await channel.unary_unary("/pkg.Svc/Unary")(b"mesh", timeout=PATIENCE) == b"hello mesh"
            call = channel.stream_stream("/pkg.Svc/Chat")(timeout=PATIENCE)
            for word in (b"one", b"two", b"three"):
                await call.write(word)
                assert await call.read() == b"echo " + word, "each reply before the next message"
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await channel.unary_unary("/pkg.Svc/Unary")(b"fail", timeout=PATIENCE)
        assert (failed.value.code(), failed.value.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "no room")
        assert [e.grpc_status for e in mesh.exchanges] == [0, 0, 8]
        assert {e.protocol for e in mesh.exchanges} == {"HTTP/2"}
