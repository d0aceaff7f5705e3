"""HTTP/1.1 on the wire, both sides: keep-alive, chunked bodies streamed both ways, a large
response with bounded memory, HEAD, `Expect: 100-continue`, oversized headers (431), a client
too slow with its headers (408), pipelining, bodies too large to keep for a retry, and the
framing details a proxy must get exactly right."""

from __future__ import annotations

import asyncio
import contextlib
import tracemalloc

from aiohttp import web

from minimesh.admin.metrics import Metrics
from minimesh.dataplane.accesslog import text_line
from minimesh.dataplane.exchange import Exchange
from minimesh.dataplane.http1 import ConnectionLimits, Downstream
from tests.inproc.upstreams import (
    PATIENCE,
    Backend,
    Mesh,
    RawClient,
    Reply,
    Seen,
    running_mesh,
    service,
    until,
    web_route,
)

APP = service("web", "app")
CLUSTER = "outbound|9080||web.default.svc.cluster.local"


NO_RETRIES = web_route("retries: {attempts: 0}")


async def connect(mesh: Mesh) -> RawClient:
    return await RawClient.connect(mesh.gateway.address)


def upstream_paused(mesh: Mesh) -> bool:
    """Has a gateway connection stopped reading the upstream whose response it passes on?"""
    return any(
        isinstance(conn, Downstream) and conn.out.producer is not None and not conn.out.producer.is_reading()  # type: ignore[attr-defined]
        for conn in mesh.gateway.connections
    )


def logged(exchange: Exchange) -> tuple[str, int]:
    """The access-log line's request, status, flags and details; and how many requests
    `istio_requests_total` counted with that status."""
    line = text_line(exchange).split("] ", 1)[1]
    metrics = Metrics()
    metrics(exchange)
    counted = sum(
        int(float(row.rsplit(" ", 1)[1]))
        for row in metrics.prometheus().splitlines()
        if row.startswith("istio_requests_total{") and f'response_code="{exchange.status}"' in row
    )
    return " ".join(line.split(" ")[:6]), counted


async def test_keep_alive_on_both_sides() -> None:
    app = Backend("app")
    async with running_mesh(APP + web_route(), {"app": app}) as mesh:
        client = await connect(mesh)
        for i in range(5):
            client.send(b"GET /%d HTTP/1.1\r\nhost: example.com\r\n\r\n" % i)
            response = await client.response()
            assert (response.status, response.body) == (200, b"app")
            assert response.header(b"connection") is None
        await client.close()
        assert [s.path for s in app.seen] == [f"/{i}" for i in range(5)]
        assert len(app.connections) == 1


async def test_requests_without_retries_reuse_the_upstream_connection_cleanly() -> None:
    app = Backend("app")
    async with running_mesh(APP + NO_RETRIES, {"app": app}) as mesh:
        for method in ("GET", "DELETE", "GET", "OPTIONS", "GET"):
            answer = await mesh.request(method, "/")
            assert answer.status == 200
        assert len(app.connections) == 1
        assert all("transfer-encoding" not in s.headers for s in app.seen)


async def test_a_chunked_request_body_streams_to_the_upstream() -> None:
    first_chunk = asyncio.Event()
    received: list[bytes] = []

    async def read_slowly(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        while chunk := await request.content.readany():
            received.append(chunk)
            first_chunk.set()
        return web.Response(body=b"got %d" % len(b"".join(received)))

    app = Backend("app")
    app.handler = read_slowly
    async with running_mesh(APP + NO_RETRIES, {"app": app}) as mesh:
        client = await connect(mesh)
        client.send(b"POST /up HTTP/1.1\r\nhost: example.com\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await asyncio.wait_for(first_chunk.wait(), PATIENCE)
        assert b"".join(received) == b"hello"
        client.send(b"6\r\n world\r\n0\r\n\r\n")
        response = await client.response()
        assert (response.status, response.body) == (200, b"got 11")
        assert app.seen[0].headers["transfer-encoding"] == "chunked"
        await client.close()


async def test_a_request_body_with_a_length_keeps_it_when_streamed() -> None:
    app = Backend("app")
    body = bytes(range(256)) * 400
    async with running_mesh(APP + NO_RETRIES, {"app": app}) as mesh:
        assert (await mesh.request("PUT", "/blob", data=body)).status == 200
        assert app.seen[0].body == body
        assert app.seen[0].headers["content-length"] == str(len(body))
        assert "transfer-encoding" not in app.seen[0].headers


async def test_a_chunked_response_streams_to_the_client() -> None:
    client_got_first = asyncio.Event()

    async def stream(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"first;")
        await asyncio.wait_for(client_got_first.wait(), PATIENCE)
        await response.write(b"second")
        await response.write_eof()
        return response

    app = Backend("app")
    app.handler = stream
    async with (
        running_mesh(APP + web_route(), {"app": app}) as mesh,
        mesh.session.get(mesh.gateway_url + "/", headers={"Host": "example.com"}) as response,
    ):
        assert response.headers["transfer-encoding"] == "chunked"
        assert await response.content.readany() == b"first;"
        client_got_first.set()
        assert await response.content.read() == b"second"


async def test_a_large_response_streams_through_in_bounded_memory() -> None:
    chunk = b"z" * 65536
    count = 320  # 20 MiB

    async def big(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-length": str(len(chunk) * count)})
        await response.prepare(request)
        for _ in range(count):
            await response.write(chunk)
        return response

    app = Backend("app")
    app.handler = big
    async with running_mesh(APP + web_route(), {"app": app}) as mesh:
        tracemalloc.start()
        try:
            async with mesh.session.get(mesh.gateway_url + "/big", headers={"Host": "example.com"}) as response:
                assert response.headers["content-length"] == str(len(chunk) * count)
                total = len(await response.content.readexactly(1 << 20))
                # a slow client (this one reads nothing for now): the proxy must stop reading, not buffer
                await until(lambda: upstream_paused(mesh), "the proxy to stop reading the upstream")
                stalled, _ = tracemalloc.get_traced_memory()
                while data := await response.content.readany():
                    total += len(data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert total == len(chunk) * count
        assert stalled < 8 << 20, stalled
        assert peak < 12 << 20, peak


async def test_head_gets_the_headers_and_no_body() -> None:
    app = Backend("app", Reply(body=b"twelve bytes"))
    async with running_mesh(APP + web_route(), {"app": app}) as mesh:
        client = await connect(mesh)
        client.send(b"HEAD / HTTP/1.1\r\nhost: example.com\r\n\r\n")
        response = await client.response(head=True)
        assert response.status == 200
        assert response.header(b"content-length") == b"12"
        client.send(b"GET / HTTP/1.1\r\nhost: example.com\r\n\r\n")
        response = await client.response()
        assert response.body == b"twelve bytes"
        await client.close()
        assert [s.method for s in app.seen] == ["HEAD", "GET"]


async def test_expect_100_continue() -> None:
    app = Backend("app")
    async with running_mesh(APP + web_route(), {"app": app}) as mesh:
        client = await connect(mesh)
        client.send(b"POST / HTTP/1.1\r\nhost: example.com\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        assert await client.interim() == 100
        client.send(b"hello")
        response = await client.response()
        assert response.status == 200
        assert app.seen[0].body == b"hello"
        assert "expect" not in app.seen[0].headers
        await client.close()


async def test_headers_past_60_kib_are_431() -> None:
    app = Backend("app")
    async with running_mesh(APP + web_route(), {"app": app}) as mesh:
        client = await connect(mesh)
        filler = b"".join(b"x-fill-%d: %b\r\n" % (i, b"v" * 1000) for i in range(62))
        client.send(b"GET / HTTP/1.1\r\nhost: example.com\r\n" + filler + b"\r\n")
        response = await client.response()
        assert (response.status, response.body) == (431, b"Request Header Fields Too Large")
        assert response.header(b"connection") == b"close"
        assert await client.closed() == b""
        assert app.seen == []
        assert logged(mesh.last()) == ('"- - -" 431 DPE http1.headers_too_large', 1)
        small = b"".join(b"x-fill-%d: %b\r\n" % (i, b"v" * 1000) for i in range(50))
        client = await connect(mesh)
        client.send(b"GET / HTTP/1.1\r\nhost: example.com\r\n" + small + b"\r\n")
        assert (await client.response()).status == 200
        await client.close()


async def test_a_client_that_never_finishes_its_headers_is_cut_with_408() -> None:
    limits = ConnectionLimits(headers_timeout=0.2, idle_timeout=5)
    async with running_mesh(APP + web_route(), {"app": Backend("app")}, limits=limits) as mesh:
        client = await connect(mesh)
        client.send(b"GET / HTTP/1.1\r\nhost: exa")
        response = await client.response()
        assert (response.status, response.body) == (408, b"")
        assert response.header(b"connection") == b"close"
        assert await client.closed() == b""
        assert logged(mesh.last()) == ('"- - -" 408 - request_header_timeout', 1)


async def test_an_idle_keep_alive_connection_is_closed_without_a_word() -> None:
    limits = ConnectionLimits(headers_timeout=5, idle_timeout=0.2)
    async with running_mesh(APP + web_route(), {"app": Backend("app")}, limits=limits) as mesh:
        client = await connect(mesh)
        client.send(b"GET / HTTP/1.1\r\nhost: example.com\r\n\r\n")
        assert (await client.response()).status == 200
        assert await client.closed() == b""


async def test_a_head_begun_on_an_idle_connection_gets_the_shorter_headers_timeout() -> None:
    limits = ConnectionLimits(headers_timeout=0.2, idle_timeout=10 * PATIENCE)
    async with running_mesh(APP + web_route(), {"app": Backend("app")}, limits=limits) as mesh:
        client = await connect(mesh)
        client.send(b"GET / HTTP/1.1\r\nhost: example.com\r\n\r\n")
        assert (await client.response()).status == 200
        client.send(b"GET / HTTP/1.1\r\nhost: exa")
        response = await client.response()
        assert (response.status, response.header(b"connection")) == (408, b"close")
        assert await client.closed() == b""


async def test_pipelined_requests_are_answered_in_order() -> None:
    async def echo(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        if request.path == "/slow":
            await asyncio.sleep(0.2)
        return web.Response(body=request.path.encode())

    app = Backend("app")
    app.handler = echo
    async with running_mesh(APP + web_route(), {"app": app}) as mesh:
        client = await connect(mesh)
        client.send(b"".join(b"GET %b HTTP/1.1\r\nhost: example.com\r\n\r\n" % p for p in (b"/slow", b"/a", b"/b")))
        bodies = [(await client.response()).body for _ in range(3)]
        assert bodies == [b"/slow", b"/a", b"/b"]
        await client.close()


async def test_a_body_past_the_buffer_bound_is_streamed_once_with_retries_abandoned() -> None:
    app = Backend("app", Reply(status=503))
    body = b"b" * (2 << 20)
    async with running_mesh(APP + web_route("retries: {attempts: 2, retryOn: 5xx}"), {"app": app}) as mesh:
        answer = await mesh.request("POST", "/upload", data=body)
        assert answer.status == 503
        assert len(app.seen) == 1
        assert app.seen[0].body == body
        assert mesh.last().flag_text == "-"
        small = await mesh.request("POST", "/upload", data=b"s" * 1000)
        assert small.status == 503
        assert len(app.seen) == 4


async def test_a_close_delimited_upstream_response_passes_through() -> None:
    async def old_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nfrom an old server")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(old_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running_mesh(APP + web_route(), {}, ports={"app": port, "app_LABELS": "version: v1"}) as mesh:
            for _ in range(2):
                answer = await mesh.get("/")
                assert (answer.status, answer.body) == (200, b"from an old server")
                assert mesh.last().flag_text == "-"
    finally:
        server.close()
        await server.wait_closed()


async def test_a_malformed_request_is_400() -> None:
    async with running_mesh(APP + web_route(), {"app": Backend("app")}) as mesh:
        client = await connect(mesh)
        client.send(b"GET / HTTP/1.1\r\nhost example.com\r\n\r\n")
        response = await client.response()
        assert (response.status, response.body) == (400, b"Bad Request")
        assert await client.closed() == b""
        assert logged(mesh.last()) == ('"- - -" 400 DPE http1.codec_error', 1)
        assert mesh.last().bytes_sent == len(b"Bad Request")


async def test_a_client_that_leaves_mid_request_releases_the_upstream_connection() -> None:
    release = asyncio.Event()

    async def hold(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        with contextlib.suppress(asyncio.CancelledError):
            await release.wait()
        return web.Response(body=b"late")

    app = Backend("app")
    app.handler = hold
    async with running_mesh(APP + NO_RETRIES, {"app": app}) as mesh:
        client = await connect(mesh)
        client.send(b"GET / HTTP/1.1\r\nhost: example.com\r\n\r\n")
        await until(lambda: app.seen, "the request upstream")
        await client.close()
        await until(lambda: mesh.exchanges, "the exchange logged")
        assert mesh.last().flag_text == "DC"
        state = mesh.proxy.upstreams.clusters[CLUSTER]
        assert (state.connections, state.requests) == (0, 0)
        release.set()
