"""Circuit breaking: the DestinationRule's `connectionPool` limits are real limits. Bursts of
concurrent requests held at the upstream never put more requests on it than allowed; the
excess gets Envoy's 503 `UO` with `x-envoy-overloaded: true`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from tests.inproc.upstreams import (
    RESET,
    Answer,
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

OVERFLOW = RESET + b"overflow"
CLUSTER = "outbound|9080||web.default.svc.cluster.local"


def mesh_yaml(pool: str, retries: str = "retries: {attempts: 0}", members: tuple[str, ...] = ("app",)) -> str:
    rule = f"""
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web}}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    connectionPool: {pool}
"""
    return service("web", *members) + rule + web_route(retries)


async def burst(mesh: Mesh, count: int) -> list[Answer]:
    return list(await asyncio.gather(*(mesh.get(f"/{i}") for i in range(count))))


async def held_burst(mesh: Mesh, count: int, held: Backend, settled: Callable[[], bool], what: str) -> list[Answer]:
    """`count` concurrent requests while `held` holds its replies; it lets them go once `settled`."""
    requests = asyncio.ensure_future(burst(mesh, count))
    await until(settled, what)
    held.release()
    return await requests


def pending(mesh: Mesh) -> int:
    state = mesh.proxy.upstreams.clusters.get(CLUSTER)
    return state.pending if state is not None else 0


def overflowed(answers: list[Answer]) -> list[Answer]:
    return [a for a in answers if a.status == 503 and a.body == OVERFLOW]


async def test_max_connections_queues_the_rest_and_never_exceeds_the_limit() -> None:
    app = Backend("app", Reply(hold=True))
    async with running_mesh(mesh_yaml("{tcp: {maxConnections: 2}}"), {"app": app}) as mesh:
        answers = await held_burst(
            mesh, 10, app, lambda: app.active == 2 and pending(mesh) == 8, "two requests upstream, eight queued"
        )
        assert [a.status for a in answers] == [200] * 10
        assert app.max_active == 2
        assert len(app.connections) == 2


async def test_a_full_pending_queue_answers_503_UO_overloaded() -> None:
    app = Backend("app", Reply(hold=True))
    pool = "{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}"
    async with running_mesh(mesh_yaml(pool, retries=""), {"app": app}) as mesh:
        answers = await held_burst(mesh, 6, app, lambda: len(mesh.exchanges) == 4, "four overflows")
        served = [a for a in answers if a.status == 200]
        rejected = overflowed(answers)
        assert (len(served), len(rejected)) == (2, 4)
        assert all(a.headers["x-envoy-overloaded"] == "true" for a in rejected)
        assert all(a.headers["content-type"] == "text/plain" for a in rejected)
        assert app.max_active == 1
        assert len(app.seen) == 2, "an overflow is never retried"
        assert sorted(e.flag_text for e in mesh.exchanges) == ["-", "-", "UO", "UO", "UO", "UO"]
        state = mesh.proxy.upstreams.clusters[CLUSTER]
        assert (state.pending, state.requests, state.connections) == (0, 0, 1)


async def test_http2_max_requests_bounds_requests_in_flight() -> None:
    app = Backend("app", Reply(hold=True))
    async with running_mesh(mesh_yaml("{http: {http2MaxRequests: 3}}"), {"app": app}) as mesh:
        answers = await held_burst(
            mesh, 8, app, lambda: app.active == 3 and len(mesh.exchanges) == 5, "three upstream, five overflows"
        )
        assert len([a for a in answers if a.status == 200]) == 3
        assert len(overflowed(answers)) == 5
        assert app.max_active == 3
        assert (await mesh.get("/after")).status == 200


async def test_max_requests_per_connection_closes_and_reopens() -> None:
    app = Backend("app")
    async with running_mesh(mesh_yaml("{http: {maxRequestsPerConnection: 2}}"), {"app": app}) as mesh:
        for i in range(6):
            assert (await mesh.get(f"/{i}")).status == 200
        assert len(app.connections) == 3
        by_connection = [[s.path for s in app.seen if s.connection == c] for c in app.connections]
        assert sorted(len(paths) for paths in by_connection) == [2, 2, 2]


async def test_without_limits_one_keep_alive_connection_serves_sequential_requests() -> None:
    app = Backend("app")
    async with running_mesh(mesh_yaml("{}"), {"app": app}) as mesh:
        for i in range(5):
            assert (await mesh.get(f"/{i}")).status == 200
        assert len(app.connections) == 1


async def test_max_retries_bounds_retries_in_flight_across_the_cluster() -> None:
    app = Backend("app")
    first_attempts = 0
    every_first_attempt_in = asyncio.Event()
    active_retries = 0
    most = 0

    async def count(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        # every first attempt fails together; the retry admitted is held until released
        nonlocal first_attempts, active_retries, most
        if seen.attempt == 1:
            first_attempts += 1
            if first_attempts == 4:
                every_first_attempt_in.set()
            await every_first_attempt_in.wait()
            return web.Response(status=503, body=b"busy")
        active_retries += 1
        most = max(most, active_retries)
        try:
            await app.released.wait()
        finally:
            active_retries -= 1
        return web.Response(status=503, body=b"busy")

    app.handler = count
    yaml = mesh_yaml("{http: {maxRetries: 1}}", retries="retries: {attempts: 3, retryOn: 5xx}")
    async with running_mesh(yaml, {"app": app}) as mesh:
        answers = await held_burst(mesh, 4, app, lambda: len(mesh.exchanges) == 3, "three retries refused")
        assert {(a.status, a.body) for a in answers} == {(503, b"busy")}
        assert most == 1
        flags = sorted(e.flag_text for e in mesh.exchanges)
        assert "UO" in flags, flags
        assert set(flags) <= {"UO", "URX"}
        assert flags == ["UO", "UO", "UO", "URX"]
        assert mesh.proxy.upstreams.clusters[CLUSTER].retries == 0


async def test_a_busy_endpoint_never_starves_another_under_max_connections() -> None:
    slow, fast = Backend("slow", Reply(hold=True)), Backend("fast")
    pool = "{tcp: {maxConnections: 1}}"
    async with running_mesh(mesh_yaml(pool, members=("slow", "fast")), {"slow": slow, "fast": fast}) as mesh:
        answers = await held_burst(
            mesh, 4, slow, lambda: len(mesh.exchanges) == 2, "the fast endpoint's two answers while slow holds"
        )
        assert [a.status for a in answers] == [200] * 4
        assert slow.max_active == 1 and fast.max_active == 1


async def test_a_response_still_streaming_holds_its_request_slot() -> None:
    release = asyncio.Event()

    async def streaming(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-length": "10"})
        await response.prepare(request)
        await response.write(b"01234")
        await release.wait()
        await response.write(b"56789")
        return response

    app = Backend("app")
    app.handler = streaming
    async with running_mesh(mesh_yaml("{http: {http2MaxRequests: 1}}"), {"app": app}) as mesh:
        async with mesh.session.get(mesh.gateway_url + "/", headers={"Host": "example.com"}) as first:
            assert await first.content.readexactly(5) == b"01234"
            second = await mesh.get("/")
            assert (second.status, second.body) == (503, OVERFLOW)
            release.set()
            assert await first.content.read() == b"56789"
        app.handler = None
        assert (await mesh.get("/")).status == 200


async def test_a_queued_request_whose_client_leaves_gives_up_its_place() -> None:
    app = Backend("app", Reply(hold=True))
    pool = "{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}"
    async with running_mesh(mesh_yaml(pool), {"app": app}) as mesh:
        first = asyncio.create_task(mesh.get("/first"))
        await until(lambda: app.active == 1, "the first request upstream")
        leaving = await RawClient.connect(mesh.gateway.address)
        leaving.send(b"GET /leaving HTTP/1.1\r\nhost: example.com\r\n\r\n")
        await until(lambda: pending(mesh) == 1, "the second request queued")
        await leaving.close()
        await until(lambda: pending(mesh) == 0, "the leaving request out of the queue")
        third = asyncio.create_task(mesh.get("/third"))
        await until(lambda: pending(mesh) == 1, "the third request queued")
        app.release()
        assert ((await first).status, (await third).status) == (200, 200)
        assert [s.path for s in app.seen] == ["/first", "/third"]
        state = mesh.proxy.upstreams.clusters[CLUSTER]
        assert (state.pending, state.requests, state.connections) == (0, 0, 1)
