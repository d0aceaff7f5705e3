"""Request bodies still arriving when routing decides, kept for retries and mirrors as Envoy's
router keeps them: forwarded as they arrive while a copy is recorded up to BUFFER_LIMIT, the
copy replayed to a retry then the rest streamed on, a body past the bound not retried, a
mirror's copy streamed alongside whatever its size (Envoy's streaming shadow), and the copy
sent again on a fresh connection when a reused one proves closed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import httptools

from minimesh.admin.metrics import Metrics
from minimesh.dataplane.proxy import BUFFER_LIMIT
from tests.inproc.h2upstream import H2Backend
from tests.inproc.upstreams import (
    Backend,
    H2Client,
    RawClient,
    RawResponse,
    Reply,
    running_mesh,
    service,
    until,
    web_route,
)

APPS = service("web", "app") + "---" + service("shadow", "copy")


class FailsOnceMidBody:
    """Two endpoints' worth of one HTTP/1.1 upstream script: the first request (on either
    port) is answered 503 and its connection closed once part of its body is in; every later
    request is read whole, recorded in `bodies` (port, body) and answered 200."""

    def __init__(self) -> None:
        self.failed = False
        self.bodies: list[tuple[int, bytes]] = []
        self.ports: list[int] = []
        self._servers: list[asyncio.Server] = []

    async def start(self) -> FailsOnceMidBody:
        for _ in range(2):
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self._servers.append(server)
            self.ports.append(int(server.sockets[0].getsockname()[1]))
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = int(writer.get_extra_info("sockname")[1])
        body = bytearray()
        complete = asyncio.Event()

        class Request:
            def on_body(self, data: bytes) -> None:
                body.extend(data)

            def on_message_complete(self) -> None:
                complete.set()

        parser = httptools.HttpRequestParser(Request())
        with contextlib.suppress(ConnectionError):
            while not complete.is_set():
                data = await reader.read(65536)
                if not data:
                    return
                parser.feed_data(data)
                if body and not self.failed:
                    self.failed = True
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    await writer.drain()
                    writer.close()
                    return
            self.bodies.append((port, bytes(body)))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()


async def upload_in_two(address: tuple[str, int], between: Callable[[], object], what: str) -> RawResponse:
    """POST `hello world` chunked: `hello`, then, once `between` holds, ` world` and the end."""
    client = await RawClient.connect(address)
    client.send(b"POST /upload HTTP/1.1\r\nhost: example.com\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await until(between, what)
    client.send(b"6\r\n world\r\n0\r\n\r\n")
    response = await client.response()
    await client.close()
    return response


async def test_a_chunked_upload_failing_midway_is_retried_with_the_whole_body_once() -> None:
    upstream = await FailsOnceMidBody().start()
    first, second = upstream.ports
    ports = {"one": first, "one_LABELS": "version: one", "two": second, "two_LABELS": "version: two"}
    try:
        async with running_mesh(service("web", "one", "two") + web_route(), ports=ports) as mesh:
            response = await upload_in_two(mesh.gateway.address, lambda: upstream.failed,
                                           "the first endpoint to fail with part of the body")  # fmt: skip
            assert (response.status, response.body) == (200, b"ok")
            assert len(upstream.bodies) == 1
            assert upstream.bodies[0][1] == b"hello world", "replayed, then continued live, each byte once"
            assert (mesh.last().attempts, mesh.last().bytes_received) == (2, 11)
    finally:
        await upstream.close()


async def chunks(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def test_a_streamed_body_past_the_bound_is_forwarded_once_and_not_retried() -> None:
    app = Backend("app", Reply(status=503))
    body = b"b" * (BUFFER_LIMIT + 300_000)
    async with running_mesh(
        service("web", "app") + web_route("retries: {attempts: 2, retryOn: 5xx}"), {"app": app}
    ) as mesh:
        answer = await mesh.request("POST", "/upload", data=chunks(body))
        assert answer.status == 503, "the failure goes to the client as if the route had no retries"
        assert [s.body == body for s in app.seen] == [True]
        assert app.seen[0].headers["transfer-encoding"] == "chunked"
        exchange = mesh.last()
        assert (exchange.attempts, exchange.flag_text, exchange.bytes_received) == (1, "-", len(body))
        metrics = Metrics()
        metrics(exchange)
        assert dict(metrics.cluster_stats([exchange.cluster])) == {
            f"cluster.{exchange.cluster}.upstream_rq_5xx": 1,
            f"cluster.{exchange.cluster}.upstream_rq_total": 1,
        }


async def test_a_mirror_streams_a_streamed_body_as_the_request_does() -> None:
    app, copy = Backend("app"), Backend("copy")
    body = bytes(range(256)) * 1000
    async with running_mesh(APPS + web_route("mirror: {host: shadow}"), {"app": app, "copy": copy}) as mesh:
        answer = await mesh.request("POST", "/orders", data=chunks(body, 10_000))
        assert (answer.status, answer.body) == (200, b"app")
        await until(lambda: copy.seen, "the mirrored copy")
        assert copy.seen[0].body == body == app.seen[0].body
        assert copy.seen[0].headers["transfer-encoding"] == app.seen[0].headers["transfer-encoding"] == "chunked"


async def test_a_streamed_body_past_the_bound_is_mirrored_all_the_same() -> None:
    app, copy = Backend("app"), Backend("copy")
    body = b"m" * (BUFFER_LIMIT + 1)
    async with running_mesh(APPS + web_route("mirror: {host: shadow}"), {"app": app, "copy": copy}) as mesh:
        answer = await mesh.request("POST", "/big", data=chunks(body))
        assert answer.status == 200
        await until(lambda: copy.seen, "the big request's copy")
        assert [(s.path, s.body == body) for s in copy.seen] == [("/big", True)]
        assert app.seen[0].body == body


async def test_a_mirror_gets_the_body_as_it_arrives() -> None:
    """The copy's first bytes reach the mirror while the client has not sent the rest."""
    app, copy = H2Backend("app"), H2Backend("copy")
    grpc = service("web", "app", protocol="grpc") + "---" + service("shadow", "copy", protocol="grpc")
    async with running_mesh(grpc + web_route("mirror: {host: shadow}"), {"app": app, "copy": copy}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            stream = client.request(
                "POST", "/demo.Echo/Chat", {"content-type": "application/grpc"}, b"first", more=True
            )
            await until(lambda: copy.seen and copy.seen[0].body == b"first", "the copy's first bytes")
            client.h2.send_data(stream, b" and the rest", end_stream=True)
            client.writer.write(client.h2.data_to_send())
            answer = await client.answer(stream)
        finally:
            await client.close()
        await until(lambda: copy.seen[0].ended, "the whole copy")
    assert answer.status == 200
    assert copy.seen[0].body == app.seen[0].body == b"first and the rest"
    assert copy.seen[0].headers[":authority"] == "example.com-shadow"


class ClosesItsFirstConnection:
    """An HTTP/1.1 upstream whose first connection answers one request, keeps alive, then
    closes without a word when the next request starts on it (an idle timeout just struck);
    requests on later connections are read whole, recorded in `bodies` and answered 200."""

    def __init__(self) -> None:
        self.connections = 0
        self.closed_one = False
        self.bodies: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> ClosesItsFirstConnection:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        done: list[bytes] = []
        body = bytearray()

        class Request:
            def on_message_begin(self) -> None:
                body.clear()

            def on_body(self, data: bytes) -> None:
                body.extend(data)

            def on_message_complete(self) -> None:
                done.append(bytes(body))

        parser = httptools.HttpRequestParser(Request())
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if first and done:
                    self.closed_one = True
                    writer.close()
                    return
                parser.feed_data(data)
                if done:
                    if not first:
                        self.bodies.append(done[-1])
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    await writer.drain()
                    if not first:
                        done.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_a_streamed_body_sent_on_a_connection_the_upstream_had_closed_goes_again_on_a_new_one() -> None:
    upstream = await ClosesItsFirstConnection().start()
    ports = {"app": upstream.port, "app_LABELS": "version: v1"}
    try:
        async with running_mesh(service("web", "app") + web_route(), ports=ports) as mesh:
            assert (await mesh.get("/warm")).status == 200
            response = await upload_in_two(mesh.gateway.address, lambda: upstream.closed_one,
                                           "the reused connection to close under the request")  # fmt: skip
            assert (response.status, response.body) == (200, b"ok")
            assert upstream.bodies == [b"hello world"]
            assert (upstream.connections, mesh.last().attempts, mesh.last().flag_text) == (2, 1, "-")
    finally:
        await upstream.close()
