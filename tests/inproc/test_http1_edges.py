"""Envoy's answers at the HTTP/1 edges (issue 12): 400 for a body that breaks before its response
starts, a pipelined request answered before the bytes after it fail the connection, 431 as soon
as a head passes 60 KiB (memory flat, however much more comes), and seeded fuzzing of the codec:
random and mutated bytes get Envoy's statuses, nothing crashes, every connection is closed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tracemalloc
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimesh.dataplane.http1 import ConnectionLimits, Downstream
from tests.inproc.upstreams import PATIENCE, Backend, Mesh, RawClient, Seen, running_mesh, service, until, web_route

APP = service("web", "app")
ROUTE = web_route("retries: {attempts: 0}", "timeout: 1s")
CLUSTER = "outbound|9080||web.default.svc.cluster.local"
GET = b"GET /%d HTTP/1.1\r\nhost: example.com\r\n\r\n"
CHUNKED = b"POST /up HTTP/1.1\r\nhost: example.com\r\ntransfer-encoding: chunked\r\n\r\n"


async def connect(mesh: Mesh) -> RawClient:
    return await RawClient.connect(mesh.gateway.address)


def downstreams(mesh: Mesh) -> list[Downstream]:
    return list(mesh.gateway.connections)


# ---------------------------------------------------------------- a body that breaks


async def test_a_bad_chunk_before_the_response_is_400() -> None:
    app = Backend("app")
    async with running_mesh(APP + ROUTE, {"app": app}) as mesh:
        client = await connect(mesh)
        client.send(CHUNKED + b"5\r\nhello\r\nzz\r\n")
        response = await client.response()
        assert (response.status, response.body, response.header(b"connection")) == (400, b"Bad Request", b"close")
        assert await client.closed() == b""
        await until(lambda: mesh.exchanges, "the refusal logged")
        assert (mesh.last().status, mesh.last().flag_text, mesh.last().details) == (400, "DPE", "http1.codec_error")


async def test_a_bad_chunk_while_the_request_is_forwarded_is_its_400() -> None:
    async def read_all(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        return web.Response(body=await request.read())

    app = Backend("app")
    app.handler = read_all
    async with running_mesh(APP + ROUTE, {"app": app}) as mesh:
        client = await connect(mesh)
        client.send(CHUNKED + b"5\r\nhello\r\n")
        await until(lambda: app.seen, "the request at the upstream")
        client.send(b"not-hex\r\n")
        response = await client.response()
        assert (response.status, response.body, response.header(b"connection")) == (400, b"Bad Request", b"close")
        assert await client.closed() == b""
        await until(lambda: mesh.exchanges, "the request logged")
        assert (mesh.last().status, mesh.last().flag_text) == (400, "DC")
        state = mesh.proxy.upstreams.clusters[CLUSTER]
        await until(lambda: state.requests == 0 and state.connections == 0, "the upstream request released")


# ---------------------------------------------------------------- pipelining, then garbage


async def test_a_pipelined_good_request_is_answered_before_the_garbage_after_it_fails() -> None:
    async def slow_first(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        if request.path == "/1":
            await asyncio.sleep(0.1)
        return web.Response(body=request.path.encode())

    app = Backend("app")
    app.handler = slow_first
    async with running_mesh(APP + ROUTE, {"app": app}) as mesh:
        client = await connect(mesh)
        client.send(GET % 1 + GET % 2 + b"\x01\x02 garbage\r\n\r\n" + GET % 3)
        first, second, failure = [await client.response() for _ in range(3)]
        assert [(r.status, r.body, r.header(b"connection")) for r in (first, second)] == [
            (200, b"/1", None),
            (200, b"/2", None),
        ]
        assert (failure.status, failure.header(b"connection")) == (400, b"close")
        assert await client.closed() == b""
        assert [s.path for s in app.seen] == ["/1", "/2"]


# ---------------------------------------------------------------- a head that never ends


async def test_a_header_that_never_ends_is_431_once_past_60_kib() -> None:
    async with running_mesh(APP + ROUTE, {"app": Backend("app")}) as mesh:
        client = await connect(mesh)
        client.send(b"GET / HTTP/1.1\r\nhost: example.com\r\nx-big: " + b"v" * (61 * 1024))
        response = await client.response()  # no line end yet: refused while the bytes arrive
        assert (response.status, response.header(b"connection")) == (431, b"close")
        assert await client.closed() == b""


async def test_an_8_mib_header_streamed_gets_431_with_memory_flat() -> None:
    async with running_mesh(APP + ROUTE, {"app": Backend("app")}) as mesh:
        client = await connect(mesh)
        tracemalloc.start()
        try:
            client.send(b"GET / HTTP/1.1\r\nhost: example.com\r\nx-big: ")
            piece = b"v" * 65536
            with contextlib.suppress(ConnectionError):
                for _ in range(128):
                    client.send(piece)
                    await client.writer.drain()
            response = await client.response()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert response.status == 431
        assert peak < 2 << 20, f"{peak} bytes at the peak for an 8 MiB header"


async def test_a_head_just_under_60_kib_in_several_reads_is_served() -> None:
    async with running_mesh(APP + ROUTE, {"app": Backend("app")}) as mesh:
        client = await connect(mesh)
        filler = b"".join(b"x-fill-%02d: %b\r\n" % (i, b"v" * 1000) for i in range(58))
        head = b"GET / HTTP/1.1\r\nhost: example.com\r\n" + filler + b"\r\n"
        parts = [head[i : i + 20000] for i in range(0, len(head), 20000)]
        for count, part in enumerate(parts[:-1], start=1):
            client.send(part)
            sent = sum(len(p) for p in parts[:count])
            await until(
                lambda sent=sent: any(d._reader.head_bytes >= sent for d in downstreams(mesh)), "a read of the head"
            )
        client.send(parts[-1])
        assert (await client.response()).status == 200
        await client.close()


# ---------------------------------------------------------------- fuzzing the codec

ENVOY_STATUSES = {200, 400, 403, 404, 405, 408, 413, 431, 503, 504}
"""What may answer fuzzed bytes: the upstream (200), the codec (400, 408, 431), routing and
local replies (403 upgrade, 404, 405 CONNECT, 413 body, 503, 504 route timeout)."""
REQUESTS = [
    GET % 1,
    b"POST /p HTTP/1.1\r\nhost: example.com\r\ncontent-length: 5\r\n\r\nhello",
    CHUNKED + b"5\r\nhello\r\n0\r\n\r\n",
    b"HEAD / HTTP/1.0\r\n\r\n",
    b"GET http://example.com/abs HTTP/1.1\r\nhost: example.com\r\nconnection: close\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nhost: example.com\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nhost: example.com\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n",
]


def mutate(data: bytes, rng: random.Random) -> bytes:
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data) + 1)
        op = rng.random()
        if op < 0.4:
            data = data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
        elif op < 0.7:
            data = data[:at] + data[at + rng.randint(1, 8) :]
        else:
            data = data[:at] + rng.choice([b"\r\n", b"\r\n\r\n", b":", b" ", b"0\r\n", b"\x00", b"\xff"]) + data[at:]
    return data


wire = st.one_of(
    st.binary(max_size=200),
    st.builds(
        mutate,
        st.lists(st.sampled_from(REQUESTS), min_size=1, max_size=3).map(b"".join),
        st.randoms(use_true_random=False),
    ),
    st.tuples(st.lists(st.sampled_from(REQUESTS), max_size=3).map(b"".join), st.binary(min_size=1, max_size=50)).map(
        b"".join
    ),
)


def gateway_sockets(port: int) -> int:
    """Connections of this process whose local end is the gateway's port (accepted downstreams)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] != "0A" and fields[9] in inodes:
                    count += 1
    return count


async def exchange(mesh: Mesh, data: bytes) -> list[int]:
    """Send `data` on a new connection; the statuses of what comes back until the proxy closes."""
    client = await connect(mesh)
    client.send(data)
    statuses: list[int] = []
    try:
        async with asyncio.timeout(PATIENCE):
            while True:
                chunk = await client.reader.read(65536)
                if not chunk:
                    break
                with contextlib.suppress(Exception):
                    client._parser.feed_data(chunk)
                statuses += [r.status for r in client.responses]
                client.responses.clear()
    except ConnectionError:
        pass
    await client.close()
    return statuses


@contextlib.contextmanager
def serving(loop: asyncio.AbstractEventLoop, limits: ConnectionLimits) -> Iterator[tuple[Mesh, list[Any]]]:
    """A mesh served on `loop` (a test of its own, for hypothesis), and what the loop could not hand to any task."""
    unhandled: list[Any] = []
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    running = running_mesh(APP + ROUTE, {"app": Backend("app")}, limits=limits)
    mesh = loop.run_until_complete(running.__aenter__())
    try:
        yield mesh, unhandled
    finally:
        loop.run_until_complete(running.__aexit__(None, None, None))


def test_fuzzed_bytes_get_envoys_statuses_and_every_connection_closes() -> None:
    loop = asyncio.new_event_loop()
    limits = ConnectionLimits(headers_timeout=0.2, idle_timeout=0.1)
    try:
        with serving(loop, limits) as (mesh, unhandled):
            port = mesh.gateway.address[1]

            @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
            @given(wire)
            def one(data: bytes) -> None:
                statuses = loop.run_until_complete(exchange(mesh, data))
                assert set(statuses) <= ENVOY_STATUSES, (data, statuses)
                assert all(s not in (400, 408, 431) for s in statuses[:-1]), (data, statuses)
                assert unhandled == [], unhandled

            one()

            async def closed() -> None:
                await until(
                    lambda: gateway_sockets(port) == 0 and not mesh.gateway.connections, "every connection closed"
                )

            loop.run_until_complete(closed())
    finally:
        loop.close()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(good=st.integers(0, 3), garbage=st.binary(min_size=1, max_size=40).map(lambda b: b"\x01" + b))
def test_pipelined_requests_then_garbage_are_each_answered_then_400(good: int, garbage: bytes) -> None:
    async def run() -> list[int]:
        async with running_mesh(APP + ROUTE, {"app": Backend("app")}) as mesh:
            return await exchange(mesh, b"".join(GET % i for i in range(good)) + garbage)

    assert asyncio.run(run()) == [200] * good + [400]
