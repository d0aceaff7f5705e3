"""Mirroring (`HOST-shadow`, fire and forget, within the route timeout, only of a request
with an endpoint to go to, `mirrorPercentage`), CORS preflight and simple requests as Envoy's
CORS filter answers them, redirects and direct responses."""

from __future__ import annotations

import asyncio

from tests.inproc.upstreams import Backend, Reply, gateway_http, running_mesh, service, traffic_policy, until, web_route

APPS = service("web", "app") + "---" + service("shadow", "copy")


async def test_mirror_gets_a_copy_with_a_shadow_host_and_its_answer_is_dropped() -> None:
    app, copy = Backend("app"), Backend("copy", Reply(status=500, body=b"mirror answer"))
    policy = ("mirror: {host: shadow}", "timeout: 3s")
    async with running_mesh(APPS + web_route(*policy), {"app": app, "copy": copy}) as mesh:
        answer = await mesh.request("POST", "/orders?id=1", data=b'{"n": 1}', headers={"Host": "shop.example.com:80"})
        assert (answer.status, answer.body) == (200, b"app")
        await until(lambda: copy.seen, "the mirrored copy")
        seen = copy.seen[0]
        assert seen.headers["host"] == "shop.example.com-shadow:80"
        assert (seen.method, seen.path, seen.body) == ("POST", "/orders?id=1", b'{"n": 1}')
        assert seen.headers["x-request-id"] == app.seen[0].headers["x-request-id"]
        assert (
            seen.all("x-envoy-expected-rq-timeout-ms") == app.seen[0].all("x-envoy-expected-rq-timeout-ms") == ["3000"]
        )
        assert app.seen[0].headers["host"] == "shop.example.com:80"
        assert mesh.last().flag_text == "-"


async def test_a_slow_mirror_never_delays_the_request() -> None:
    app, copy = Backend("app"), Backend("copy", Reply(hold=True))
    async with running_mesh(APPS + web_route("mirror: {host: shadow}"), {"app": app, "copy": copy}) as mesh:
        for _ in range(3):
            assert (await mesh.get("/")).status == 200
        assert len(mesh.proxy.mirrors.tasks) == 3, "each request was answered while its mirror was still unanswered"
        await until(lambda: len(copy.seen) == 3, "three mirrored copies")
        copy.release()
        await until(lambda: not mesh.proxy.mirrors.tasks, "the mirrors answered once released")


async def test_a_mirror_is_given_up_at_the_route_timeout() -> None:
    app, copy = Backend("app"), Backend("copy", Reply(hold=True))
    async with running_mesh(
        APPS + web_route("mirror: {host: shadow}", "timeout: 3s"), {"app": app, "copy": copy}
    ) as mesh:
        assert (await mesh.get("/")).status == 200
        given_up = "the copy given up at the route's timeout, still unanswered"
        await until(lambda: not mesh.proxy.mirrors.tasks, given_up, timeout=20)
        assert (len(copy.seen), copy.released.is_set()) == (1, False), "it reached the mirror, which never answered"


async def test_only_a_request_with_an_endpoint_to_go_to_is_mirrored() -> None:
    """Envoy starts its shadows once the request has a host: one answered `no healthy
    upstream` is not copied; one refused by `http2MaxRequests` after that still is."""
    copy = Backend("copy", Reply(hold=True))
    nobody = service("web") + "---" + service("shadow", "copy")
    async with running_mesh(nobody + web_route("mirror: {host: shadow}"), {"copy": copy}) as mesh:
        assert (await mesh.get("/")).status == 503
        assert (mesh.last().flag_text, len(mesh.proxy.mirrors.tasks)) == ("UH", 0)

    app, copy = Backend("app", Reply(hold=True)), Backend("copy", Reply(hold=True))
    pool = traffic_policy("web", "{connectionPool: {http: {http2MaxRequests: 1}}}")
    async with running_mesh(APPS + pool + web_route("mirror: {host: shadow}"), {"app": app, "copy": copy}) as mesh:
        first = asyncio.create_task(mesh.get("/first"))
        await until(lambda: app.active == 1, "the first request upstream")
        second = await mesh.get("/second")
        assert (second.status, mesh.last().flag_text) == (503, "UO")
        await until(lambda: len(copy.seen) == 2, "both copies")
        assert sorted(seen.path for seen in copy.seen) == ["/first", "/second"]
        app.release()
        assert (await first).status == 200


async def test_mirror_percentage_mirrors_a_share() -> None:
    app, copy = Backend("app"), Backend("copy")
    async with running_mesh(
        APPS + web_route("mirror: {host: shadow}", "mirrorPercentage: {value: 25}"), {"app": app, "copy": copy}
    ) as mesh:
        for _ in range(100):
            await mesh.get("/")
        await until(lambda: not mesh.proxy.mirrors.tasks, "every mirror sent is answered")
        assert 12 <= len(copy.seen) <= 40, len(copy.seen)


async def test_an_unreachable_mirror_changes_nothing() -> None:
    app = Backend("app")
    async with running_mesh(
        APPS + web_route("mirror: {host: shadow}"), {"app": app}, ports={"copy": 1, "copy_LABELS": "version: v1"}
    ) as mesh:
        assert (await mesh.get("/")).status == 200
        assert mesh.last().flag_text == "-"


CORS = service("web", "app") + gateway_http(
    """
  - match: [{uri: {prefix: /faulty}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
    corsPolicy: &cors
      allowOrigins: [{exact: "https://app.example.com"}, {regex: "https://.*[.]dev[.]example[.]com"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-token, content-type]
      exposeHeaders: [x-trace]
      maxAge: 24h
      allowCredentials: true
    route: [{destination: {host: web}}]
  - corsPolicy: *cors
    route: [{destination: {host: web}}]
"""
)

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-token"}


async def test_cors_preflight_from_an_allowed_origin_is_answered_by_the_proxy() -> None:
    app = Backend("app")
    async with running_mesh(CORS, {"app": app}) as mesh:
        for origin in ("https://app.example.com", "https://a.dev.example.com"):
            answer = await mesh.request("OPTIONS", "/api", headers={"Origin": origin, **PREFLIGHT})
            assert (answer.status, answer.body) == (200, b"")
            assert answer.headers["access-control-allow-origin"] == origin
            assert answer.headers["access-control-allow-methods"] == "GET,POST"
            assert answer.headers["access-control-allow-headers"] == "x-token,content-type"
            assert answer.headers["access-control-max-age"] == "86400"
            assert answer.headers["access-control-allow-credentials"] == "true"
            assert "access-control-expose-headers" not in answer.headers
        assert app.seen == []


async def test_cors_preflight_from_another_origin_is_forwarded() -> None:
    app = Backend("app")
    async with running_mesh(CORS, {"app": app}) as mesh:
        answer = await mesh.request("OPTIONS", "/api", headers={"Origin": "https://evil.example.org", **PREFLIGHT})
        assert (answer.status, answer.body) == (200, b"app")
        assert not [h for h in answer.headers if h.startswith("access-control-")]
        assert [s.method for s in app.seen] == ["OPTIONS"]


async def test_cors_simple_request_gets_the_allow_headers_only_for_an_allowed_origin() -> None:
    async with running_mesh(CORS, {"app": Backend("app")}) as mesh:
        allowed = await mesh.get("/api", headers={"Origin": "https://app.example.com"})
        assert allowed.body == b"app"
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        assert allowed.headers["access-control-expose-headers"] == "x-trace"
        assert allowed.headers["access-control-allow-credentials"] == "true"
        other = await mesh.get("/api", headers={"Origin": "https://evil.example.org"})
        assert other.body == b"app"
        assert not [h for h in other.headers if h.startswith("access-control-")]


async def test_cors_comes_before_the_fault_and_marks_its_answer() -> None:
    async with running_mesh(CORS, {"app": Backend("app")}) as mesh:
        origin = {"Origin": "https://app.example.com"}
        preflight = await mesh.request("OPTIONS", "/faulty", headers={**origin, **PREFLIGHT})
        assert preflight.status == 200
        aborted = await mesh.get("/faulty", headers=origin)
        assert (aborted.status, aborted.body) == (503, b"fault filter abort")
        assert aborted.headers["access-control-allow-origin"] == "https://app.example.com"


REDIRECTS = gateway_http(
    """
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: new.example.com}
  - match: [{uri: {prefix: /moved}}]
    redirect: {scheme: https, redirectCode: 308}
  - match: [{uri: {exact: /health}}]
    directResponse: {status: 200, body: {string: "ok\\n"}}
  - match: [{uri: {exact: /gone}}]
    directResponse: {status: 410}
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: "{}"}}
    headers: {response: {set: {content-type: application/json}, add: {x-served-by: minimesh}}}
  - match: [{uri: {prefix: /signed}}]
    redirect: {uri: /login}
    headers: {response: {add: {cache-control: no-store}}}
"""
)


async def test_redirects_and_direct_responses_never_reach_an_upstream() -> None:
    async with running_mesh(REDIRECTS) as mesh:
        answer = await mesh.get("/old/page?x=1", allow_redirects=False)
        assert (answer.status, answer.body) == (301, b"")
        assert answer.headers["location"] == "http://new.example.com/new?x=1"
        assert answer.headers["content-length"] == "0"
        answer = await mesh.get("/moved", allow_redirects=False, headers={"Host": "shop.example.com"})
        assert answer.status == 308
        assert answer.headers["location"] == "https://shop.example.com/moved"
        answer = await mesh.get("/health")
        assert (answer.status, answer.body) == (200, b"ok\n")
        assert answer.headers["content-type"] == "text/plain"
        assert answer.headers["server"] == "istio-envoy"
        answer = await mesh.get("/gone")
        assert (answer.status, answer.body) == (410, b"")
        assert "x-served-by" not in answer.headers
        assert {e.flag_text for e in mesh.exchanges} == {"-"}
        assert mesh.exchanges[0].route == "VirtualService/default/web#http[0]"


async def test_a_rules_response_headers_apply_to_its_own_replies() -> None:
    async with running_mesh(REDIRECTS) as mesh:
        answer = await mesh.get("/teapot")
        assert (answer.status, answer.body) == (418, b"{}")
        assert answer.headers["content-type"] == "application/json"
        assert answer.names.count("content-type") == 1
        assert answer.headers["x-served-by"] == "minimesh"
        assert answer.headers["server"] == "istio-envoy"
        answer = await mesh.get("/signed/in", allow_redirects=False)
        assert (answer.status, answer.headers["location"]) == (301, "http://example.com/login")
        assert answer.headers["cache-control"] == "no-store"
