"""WebSocket through the gateway and a sidecar, as Istio allows by default: the upgrade goes
upstream, the 101 comes back, frames flow both ways (large ones too) until either side
closes, the access log counts the tunnel's bytes, and an upgrade the upstream refuses is
an ordinary response."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from tests.inproc.upstreams import PATIENCE, RESET, Backend, Mesh, RawClient, Seen, running_mesh, service, until

APP = service("web", "app")
ROUTES = """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: ["*", web]
  gateways: [gw, mesh]
  http:
  - route: [{destination: {host: web}}]
"""
BIG = "x" * 300_000
UPGRADE = (
    b"GET /chat HTTP/1.1\r\nhost: example.com\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
    b"sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


class Echo:
    """A WebSocket upstream: answers `echo TEXT`, closes on `bye`, and says when a client left."""

    def __init__(self) -> None:
        self.left = asyncio.Event()

    async def __call__(self, request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            if message.data == "bye":
                await socket.close()
                break
            await socket.send_str(f"echo {message.data}")
        self.left.set()
        return socket


async def logged(mesh: Mesh, count: int = 1) -> None:
    """The access log writes a tunnel when it ends: wait for it."""
    await until(lambda: len(mesh.exchanges) >= count, f"{count} exchanges logged")


async def test_a_websocket_passes_through_the_gateway_both_ways() -> None:
    app = Backend("app")
    app.handler = Echo()
    async with running_mesh(APP + ROUTES, {"app": app}) as mesh:
        url = mesh.gateway_url + "/chat"
        async with mesh.session.ws_connect(url, headers={"Host": "example.com"}) as socket:
            for i in range(3):
                await socket.send_str(f"hi {i}")
                assert await socket.receive_str(timeout=PATIENCE) == f"echo hi {i}"
            await socket.send_str(BIG)
            assert await socket.receive_str(timeout=PATIENCE) == f"echo {BIG}"
            await socket.send_str("bye")
            assert (await socket.receive(timeout=PATIENCE)).type == aiohttp.WSMsgType.CLOSE
        seen = app.seen[0]
        assert (seen.method, seen.path, seen.headers["upgrade"]) == ("GET", "/chat", "websocket")
        assert seen.headers["connection"].lower() == "upgrade"
        assert seen.headers["x-envoy-attempt-count"] == "1"
        await logged(mesh)
        exchange = mesh.last()
        assert (exchange.status, exchange.flag_text, exchange.route) == (101, "-", "VirtualService/default/web#http[0]")
        assert exchange.bytes_received > len(BIG) and exchange.bytes_sent > len(BIG)


async def test_a_client_that_leaves_closes_the_upstream_side() -> None:
    app = Backend("app")
    echo = app.handler = Echo()
    async with running_mesh(APP + ROUTES, {"app": app}) as mesh:
        socket = await mesh.session.ws_connect(mesh.gateway_url + "/chat", headers={"Host": "example.com"})
        await socket.send_str("hi")
        assert await socket.receive_str(timeout=PATIENCE) == "echo hi"
        await socket.close()
        await asyncio.wait_for(echo.left.wait(), PATIENCE)
        await logged(mesh)
        assert (mesh.last().status, mesh.last().flag_text) == (101, "-")


async def test_a_websocket_through_the_sidecar() -> None:
    app = Backend("app")
    app.handler = Echo()
    async with running_mesh(APP + ROUTES, {"app": app}) as mesh:
        async with mesh.session.ws_connect("http://web:9080/feed", proxy=mesh.sidecar_url) as socket:
            await socket.send_str("through the sidecar")
            assert await socket.receive_str(timeout=PATIENCE) == "echo through the sidecar"
        assert app.seen[0].path == "/feed"


async def test_an_upgrade_the_upstream_refuses_is_an_ordinary_response() -> None:
    app = Backend("app")
    async with running_mesh(APP + ROUTES, {"app": app}) as mesh:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await mesh.session.ws_connect(mesh.gateway_url + "/chat", headers={"Host": "example.com"})
        assert refused.value.status == 200
        client = await RawClient.connect(mesh.gateway.address)
        client.send(b"GET / HTTP/1.1\r\nhost: example.com\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
        response = await client.response()
        assert (response.status, response.body) == (200, b"app")
        assert await client.closed() == b""


async def test_a_route_timeout_ends_at_the_101_not_with_the_socket() -> None:
    app = Backend("app")
    app.handler = Echo()
    timed = ROUTES.replace(
        "- route: [{destination: {host: web}}]", "- route: [{destination: {host: web}}]\n    timeout: 0.3s"
    )
    async with (
        running_mesh(APP + timed, {"app": app}) as mesh,
        mesh.session.ws_connect(mesh.gateway_url + "/chat", headers={"Host": "example.com"}) as socket,
    ):
        await asyncio.sleep(0.6)  # past the route timeout: its timer, due first on this loop, has fired
        await socket.send_str("still here")
        assert await socket.receive_str(timeout=PATIENCE) == "echo still here"


async def test_what_a_client_sends_before_the_101_waits_in_its_socket_not_in_the_proxy() -> None:
    app = Backend("app")

    async def slow_to_switch(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        await app.released.wait()
        return await Echo()(request, seen)

    app.handler = slow_to_switch
    async with running_mesh(APP + ROUTES, {"app": app}) as mesh:
        _, writer = await asyncio.open_connection(*mesh.gateway.address)
        writer.write(UPGRADE)
        chunk = b"\x00" * 65536
        for _ in range(1024):  # 64 MiB at most: more than every socket buffer on the way
            writer.write(chunk)
            try:  # until the path takes no more (a drain stuck for half a second)
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                break
        held = [len(connection._early) for connection in mesh.gateway.connections]
        assert held and max(held) <= 4 * 65536, held
        writer.close()


async def test_a_request_pipelined_before_an_upgrade_is_answered_then_the_upgrade_is_made() -> None:
    app = Backend("app")
    app.handler = Echo()
    plain = Backend("plain")
    routes = (
        APP
        + "---"
        + service("other", "plain")
        + ROUTES.replace(
            "  - route: [{destination: {host: web}}]",
            "  - match: [{uri: {exact: /first}}]\n    route: [{destination: {host: other}}]\n"
            "  - route: [{destination: {host: web}}]",
        )
    )
    async with running_mesh(routes, {"app": app, "plain": plain}) as mesh:
        reader, writer = await asyncio.open_connection(*mesh.gateway.address)
        writer.write(b"GET /first HTTP/1.1\r\nhost: example.com\r\n\r\n" + UPGRADE)
        first = await reader.readuntil(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in first
        await reader.readexactly(len(b"plain"))
        switched = await reader.readuntil(b"\r\n\r\n")
        assert switched.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        writer.close()


async def test_only_websocket_upgrades_as_in_istio() -> None:
    app = Backend("app")
    async with running_mesh(APP + ROUTES, {"app": app}) as mesh:
        client = await RawClient.connect(mesh.gateway.address)
        client.send(b"GET / HTTP/1.1\r\nhost: example.com\r\nconnection: upgrade\r\nupgrade: spdy/3\r\n\r\n")
        response = await client.response()
        assert (response.status, response.body) == (403, b"")
        assert mesh.last().details == "upgrade_failed"
        assert app.seen == []

        client = await RawClient.connect(mesh.gateway.address)
        client.send(
            b"GET /h2c HTTP/1.1\r\nhost: example.com\r\nconnection: upgrade, http2-settings\r\nupgrade: h2c\r\n"
            b"http2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
        )
        response = await client.response()
        assert (response.status, response.body, response.header(b"connection")) == (200, b"app", b"close")
        assert app.seen[0].path == "/h2c"
        assert "upgrade" not in app.seen[0].headers and "http2-settings" not in app.seen[0].headers


async def test_a_101_to_a_plain_request_is_an_upstream_protocol_error() -> None:
    async def switch_anyway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
        await asyncio.sleep(1)
        writer.close()

    server = await asyncio.start_server(switch_anyway, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ports = {"app": port, "app_LABELS": "version: v1"}
        async with running_mesh(
            APP + ROUTES.replace("- route:", "- retries: {attempts: 0}\n    route:"), {}, ports=ports
        ) as mesh:
            answer = await mesh.get("/")
            assert (answer.status, answer.body) == (503, RESET + b"protocol error")
            assert mesh.last().flag_text == "UPE"
    finally:
        server.close()
