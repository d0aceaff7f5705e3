"""Routing through a real gateway and sidecar: matches, weighted splits with a seeded rng,
subsets, rewrites, header operations, and the headers Envoy adds on the way (request id,
trace propagation, attempt count, x-forwarded-for, server) — plus 404 `NR`."""

from __future__ import annotations

import uuid
from collections import Counter

from tests.inproc.upstreams import REVIEWS, Backend, Reply, gateway_http, running_mesh


def backends(*names: str) -> dict[str, Backend]:
    return {name: Backend(name) for name in names}


async def test_first_matching_rule_wins_and_routes_to_its_subset() -> None:
    vs = """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {prefix: /v3}}, {queryParams: {v: {exact: "3"}}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - match: [{uri: {exact: /nowhere}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"""
    async with running_mesh(REVIEWS + vs, backends("v1", "v2", "v3")) as mesh:
        assert (await mesh.get("/x", headers={"end-user": "jason"})).body == b"v2"
        assert (await mesh.get("/v3/page")).body == b"v3"
        assert (await mesh.get("/other?v=3")).body == b"v3"
        assert (await mesh.get("/other", headers={"end-user": "jasonx"})).body == b"v1"
        assert (await mesh.get("/nowhere/deeper")).body == b"v1"
        routes = [e.route for e in mesh.exchanges]
        assert routes == [f"VirtualService/default/reviews#http[{i}]" for i in (0, 1, 1, 3, 3)]
        assert [e.cluster for e in mesh.exchanges][:2] == [
            "outbound|9080|v2|reviews.default.svc.cluster.local",
            "outbound|9080|v3|reviews.default.svc.cluster.local",
        ]


SPLIT = """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 75}
    - {destination: {host: reviews, subset: v2}, weight: 25}
    - {destination: {host: reviews, subset: v3}, weight: 0}
"""


async def test_weighted_split_follows_the_weights_and_a_seed_repeats_it() -> None:
    runs = []
    for _ in range(2):
        async with running_mesh(REVIEWS + SPLIT, backends("v1", "v2", "v3"), seed=11) as mesh:
            runs.append([(await mesh.get("/")).body for _ in range(200)])
    counts = Counter(runs[0])
    assert counts[b"v3"] == 0
    assert 130 <= counts[b"v1"] <= 170, counts
    assert counts[b"v1"] + counts[b"v2"] == 200
    assert runs[0] == runs[1]


async def test_header_route_always_wins_over_the_split() -> None:
    async with running_mesh(REVIEWS + SPLIT, backends("v1", "v2", "v3")) as mesh:
        bodies = {(await mesh.get("/", headers={"end-user": "jason"})).body for _ in range(30)}
        assert bodies == {b"v3"}


async def test_sidecar_routes_absolute_form_requests_by_authority() -> None:
    vs = """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /two}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"""
    parts = backends("v1", "v2", "v3")
    async with running_mesh(REVIEWS + vs, parts) as mesh:
        answer = await mesh.via_sidecar("GET", "http://reviews:9080/two/x?q=1")
        assert (answer.status, answer.body) == (200, b"v2")
        assert parts["v2"].seen[0].path == "/two/x?q=1"
        assert parts["v2"].seen[0].headers["host"] == "reviews:9080"
        assert (await mesh.via_sidecar("GET", "http://reviews.default.svc.cluster.local:9080/")).body == b"v1"
        assert mesh.last().listener.kind == "sidecar"
        assert "x-forwarded-for" not in parts["v1"].seen[0].headers
        headers = {"X-Forwarded-For": "10.1.2.3", "X-Forwarded-Proto": "https"}
        await mesh.via_sidecar("GET", "http://reviews:9080/", headers=headers)
        kept = parts["v1"].seen[-1].headers
        assert (kept["x-forwarded-for"], kept["x-forwarded-proto"]) == ("10.1.2.3", "https")


async def test_rewrite_of_uri_prefix_and_authority() -> None:
    vs = gateway_http(
        """
  - match: [{uri: {prefix: /old}}]
    rewrite: {uri: /new, authority: reviews.internal}
    route: [{destination: {host: reviews, subset: v1}}]
"""
    )
    parts = backends("v1", "v2", "v3")
    async with running_mesh(REVIEWS + vs, parts) as mesh:
        assert (await mesh.get("/old/page?x=1")).status == 200
        seen = parts["v1"].seen[0]
        assert seen.path == "/new/page?x=1"
        assert seen.headers["host"] == "reviews.internal"
        assert mesh.last().path == "/old/page?x=1"


async def test_request_and_response_header_operations() -> None:
    vs = gateway_http(
        """
  - headers:
      request:
        set: {x-env: local}
        add: {x-added: one}
        remove: [x-secret]
      response:
        set: {cache-control: no-store}
        add: {x-served-by: minimesh}
        remove: [x-internal]
    route:
    - destination: {host: reviews, subset: v1}
      headers: {request: {set: {x-destination: v1}}}
"""
    )
    parts = backends("v1", "v2", "v3")
    parts["v1"].reply = Reply(headers={"X-Internal": "yes", "Cache-Control": "max-age=60", "X-Kept": "1"})
    async with running_mesh(REVIEWS + vs, parts) as mesh:
        answer = await mesh.get("/", headers={"X-Env": "prod", "X-Secret": "s", "X-Added": "zero"})
        seen = parts["v1"].seen[0].headers
        assert seen["x-env"] == "local"
        assert parts["v1"].seen[0].all("x-env") == ["local"]
        assert parts["v1"].seen[0].all("x-added") == ["zero", "one"]
        assert "x-secret" not in seen
        assert seen["x-destination"] == "v1"
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["x-served-by"] == "minimesh"
        assert answer.headers["x-kept"] == "1"
        assert "x-internal" not in answer.headers
        assert answer.headers["server"] == "istio-envoy"
        assert int(answer.headers["x-envoy-upstream-service-time"]) >= 0


async def test_request_id_is_generated_or_kept_and_trace_headers_pass_through() -> None:
    vs = gateway_http(
        """
  - route: [{destination: {host: reviews, subset: v1}}]
"""
    )
    parts = backends("v1", "v2", "v3")
    trace = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7",
        "x-b3-spanid": "e457b5a2e4d86bd1",
        "x-b3-parentspanid": "05e3ac9a4f6e3b90",
        "x-b3-sampled": "1",
    }
    async with running_mesh(REVIEWS + vs, parts) as mesh:
        first = await mesh.get("/")
        second = await mesh.get("/", headers={"x-request-id": "my-id-1", **trace})
        generated, kept = (s.headers for s in parts["v1"].seen)
        assert uuid.UUID(generated["x-request-id"]).version == 4
        assert mesh.exchanges[0].request_id == generated["x-request-id"]
        assert kept["x-request-id"] == "my-id-1"
        assert {name: kept[name] for name in trace} == trace
        assert generated["x-envoy-attempt-count"] == kept["x-envoy-attempt-count"] == "1"
        assert "x-request-id" not in first.headers and "x-request-id" not in second.headers


async def test_gateway_appends_the_client_address_to_x_forwarded_for() -> None:
    vs = gateway_http(
        """
  - route: [{destination: {host: reviews, subset: v1}}]
"""
    )
    parts = backends("v1", "v2", "v3")
    async with running_mesh(REVIEWS + vs, parts) as mesh:
        await mesh.get("/")
        await mesh.get("/", headers={"X-Forwarded-For": "203.0.113.9"})
        plain, chained = (s.headers for s in parts["v1"].seen)
        assert plain["x-forwarded-for"] == "127.0.0.1"
        assert chained["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
        assert plain["x-forwarded-proto"] == "http"
        await mesh.get("/", headers={"X-Forwarded-Proto": "https"})
        assert parts["v1"].seen[-1].headers["x-forwarded-proto"] == "http"


async def test_no_matching_rule_is_404_NR_with_an_empty_body() -> None:
    vs = """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [shop.example.com]
  gateways: [gw]
  http:
  - match: [{uri: {prefix: /api}}]
    route: [{destination: {host: reviews, subset: v1}}]
"""
    parts = backends("v1", "v2", "v3")
    async with running_mesh(REVIEWS + vs, parts) as mesh:
        for host, path in (("shop.example.com", "/other"), ("unknown.example.com", "/api")):
            answer = await mesh.get(path, headers={"Host": host})
            assert (answer.status, answer.body) == (404, b"")
            assert answer.headers["content-length"] == "0"
            assert answer.headers["server"] == "istio-envoy"
            assert "content-type" not in answer.headers
            assert mesh.last().flag_text == "NR"
        assert parts["v1"].seen == []
        answer = await mesh.get("/api/x", headers={"Host": "shop.example.com"})
        assert answer.status == 200
        assert mesh.last().flag_text == "-"


async def test_hop_by_hop_headers_are_not_forwarded() -> None:
    vs = gateway_http(
        """
  - route: [{destination: {host: reviews, subset: v1}}]
"""
    )
    parts = backends("v1", "v2", "v3")
    async with running_mesh(REVIEWS + vs, parts) as mesh:
        await mesh.get("/", headers={"Keep-Alive": "timeout=5", "Proxy-Connection": "keep-alive", "TE": "gzip"})
        seen = parts["v1"].seen[0].headers
        assert not {"keep-alive", "proxy-connection", "te"} & set(seen)
