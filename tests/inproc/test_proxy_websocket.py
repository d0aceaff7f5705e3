"""WebSocket through the gateway and a sidecar, as Istio allows by default: the upgrade goes
upstream, the 101 comes back, frames flow both ways (large ones too) until either side
closes, the access log counts the tunnel's bytes, and an upgrade the upstream refuses is
an ordinary response."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from tests.inproc.upstreams import Backend, Mesh, RawClient, Seen, running_mesh, service

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
    for _ in range(200):
        if len(mesh.exchanges) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(mesh.exchanges)} exchanges logged, expected {count}")


async def test_a_websocket_passes_through_the_gateway_both_ways() -> None:
    app = Backend("app")
    app.handler = Echo()
    async with running_mesh(APP + ROUTES, {"app": app}) as mesh:
        url = mesh.gateway_url + "/chat"
        async with mesh.session.ws_connect(url, headers={"Host": "example.com"}) as socket:
            for i in range(3):
                await socket.send_str(f"hi {i}")
                assert await socket.receive_str(timeout=5) == f"echo hi {i}"
            await socket.send_str(BIG)
            assert await socket.receive_str(timeout=5) == f"echo {BIG}"
            await socket.send_str("bye")
            assert (await socket.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
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
        assert await socket.receive_str(timeout=5) == "echo hi"
        await socket.close()
        await asyncio.wait_for(echo.left.wait(), 5)
        await logged(mesh)
        assert (mesh.last().status, mesh.last().flag_text) == (101, "-")


async def test_a_websocket_through_the_sidecar() -> None:
    app = Backend("app")
    app.handler = Echo()
    async with running_mesh(APP + ROUTES, {"app": app}) as mesh:
        async with mesh.session.ws_connect("http://web:9080/feed", proxy=mesh.sidecar_url) as socket:
            await socket.send_str("through the sidecar")
            assert await socket.receive_str(timeout=5) == "echo through the sidecar"
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
