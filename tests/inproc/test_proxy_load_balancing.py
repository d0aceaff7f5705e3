"""Load balancing across real endpoints: ROUND_ROBIN, LEAST_REQUEST (Istio's default),
RANDOM, and consistent hashing on a header, a cookie and the source IP."""

from __future__ import annotations

import asyncio
from collections import Counter

from tests.inproc.upstreams import (
    Answer,
    Backend,
    Mesh,
    RawClient,
    Reply,
    gateway_http,
    running_mesh,
    service,
    until,
    web_route,
)

NAMES = ("a", "b", "c")


def mesh_yaml(load_balancer: str | None, members: tuple[str, ...] = NAMES) -> str:
    rule = (
        f"""
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web}}
spec:
  host: web
  trafficPolicy: {{loadBalancer: {load_balancer}}}
"""
        if load_balancer
        else ""
    )
    return service("web", *members) + rule + web_route()


def backends(*names: str) -> dict[str, Backend]:
    return {name: Backend(name) for name in names}


async def test_round_robin_takes_each_endpoint_in_turn() -> None:
    async with running_mesh(mesh_yaml("{simple: ROUND_ROBIN}"), backends(*NAMES)) as mesh:
        bodies = [(await mesh.get("/")).body for _ in range(9)]
        assert Counter(bodies) == {b"a": 3, b"b": 3, b"c": 3}
        assert bodies[:3] == bodies[3:6] == bodies[6:]


async def test_random_spreads_without_a_pattern() -> None:
    async with running_mesh(mesh_yaml("{simple: RANDOM}", ("a", "b")), backends("a", "b")) as mesh:
        bodies = [(await mesh.get("/")).body for _ in range(100)]
        assert 30 <= bodies.count(b"a") <= 70
        assert bodies[:10] != [b"a", b"b"] * 5 and bodies[:10] != [b"b", b"a"] * 5


async def busy_share(mesh: Mesh, busy: Backend) -> float:
    """With `busy` holding three requests or more open, the share of 100 more that still go to
    it. Each request lands (held at `busy`, or answered by the other) before the next is sent,
    so every pick sees the same load whatever the machine's speed."""
    held: list[asyncio.Task[Answer]] = []

    async def send() -> None:
        before = len(busy.seen)
        task = asyncio.create_task(mesh.get("/"))
        await until(lambda: task.done() or len(busy.seen) > before, "the request answered or held")
        if not task.done():
            held.append(task)

    for _ in range(100):
        if busy.active >= 3:
            break
        await send()
    assert busy.active >= 3
    before = len(busy.seen)
    for _ in range(100):
        await send()
    share = (len(busy.seen) - before) / 100
    busy.release()
    await asyncio.gather(*held)
    return share


async def test_least_request_avoids_the_busy_endpoint_and_is_the_default() -> None:
    parts = backends("a", "b")
    parts["a"].reply = Reply(hold=True)
    async with running_mesh(mesh_yaml(None, ("a", "b")), parts) as mesh:
        share = await busy_share(mesh, parts["a"])
    assert share <= 0.4, share


async def test_random_ignores_load() -> None:
    parts = backends("a", "b")
    parts["a"].reply = Reply(hold=True)
    async with running_mesh(mesh_yaml("{simple: RANDOM}", ("a", "b")), parts) as mesh:
        share = await busy_share(mesh, parts["a"])
    assert share >= 0.3, share


async def test_consistent_hash_on_a_header() -> None:
    async with running_mesh(mesh_yaml("{consistentHash: {httpHeaderName: x-user}}"), backends(*NAMES)) as mesh:
        for user in ("ann", "bob", "cid"):
            assert len({(await mesh.get("/", headers={"x-user": user})).body for _ in range(10)}) == 1
        spread = {(await mesh.get("/", headers={"x-user": f"user-{i}"})).body for i in range(30)}
        assert len(spread) >= 2


async def test_consistent_hash_on_a_cookie() -> None:
    lb = "{consistentHash: {httpCookie: {name: session, ttl: 0s}}}"
    async with running_mesh(mesh_yaml(lb), backends(*NAMES)) as mesh:
        for session in ("s1", "s2", "s3"):
            cookie = {"Cookie": f"theme=dark; session={session}"}
            assert len({(await mesh.get("/", headers=cookie)).body for _ in range(10)}) == 1
        spread = {(await mesh.get("/", headers={"Cookie": f"session=k{i}"})).body for i in range(30)}
        assert len(spread) >= 2


async def test_a_cookie_with_a_zero_ttl_is_set_as_a_session_cookie_unless_the_route_removes_it() -> None:
    lb = "{consistentHash: {httpCookie: {name: session, ttl: 0s}}}"
    async with running_mesh(mesh_yaml(lb), backends(*NAMES)) as mesh:
        first = await mesh.get("/")
        value = first.headers["set-cookie"].removeprefix('session="').removesuffix('"; HttpOnly')
        assert len(value) == 16 and int(value, 16) >= 0, first.headers["set-cookie"]
        again = await mesh.get("/", headers={"Cookie": f"session={value}"})
        assert again.body == first.body and "set-cookie" not in again.headers
        assert len({(await mesh.get("/", headers={"Cookie": f"session={value}"})).body for _ in range(10)}) == 1
    removed = web_route("headers: {response: {remove: [set-cookie]}}")
    async with running_mesh(mesh_yaml(lb).replace(web_route(), removed), backends(*NAMES)) as mesh:
        assert "set-cookie" not in (await mesh.get("/")).headers


async def get_from(mesh: Mesh, source_ip: str) -> bytes:
    reader, writer = await asyncio.open_connection(*mesh.gateway.address, local_addr=(source_ip, 0))
    client = RawClient(reader, writer)
    client.send(b"GET / HTTP/1.1\r\nhost: example.com\r\n\r\n")
    response = await client.response()
    await client.close()
    return response.body


async def test_consistent_hash_on_the_source_ip() -> None:
    async with running_mesh(mesh_yaml("{consistentHash: {useSourceIp: true}}"), backends(*NAMES)) as mesh:
        chosen = {}
        for last in range(1, 13):
            ip = f"127.0.0.{last}"
            picks = {await get_from(mesh, ip) for _ in range(4)}
            assert len(picks) == 1, ip
            chosen[ip] = picks.pop()
        assert len(set(chosen.values())) >= 2


async def test_subset_policy_overrides_the_top_level_balancer() -> None:
    yaml = (
        service("web", *NAMES)
        + """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web}
spec:
  host: web
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets:
  - name: all
    labels: {app: web}
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
"""
        + gateway_http("- route: [{destination: {host: web, subset: all}}]")
    )
    parts = backends(*NAMES)
    parts["a"].reply = Reply(body=b"a")
    async with running_mesh(yaml, parts) as mesh:
        bodies = [(await mesh.get("/")).body for _ in range(6)]
        assert bodies[:3] == bodies[3:] and len(set(bodies)) == 3
