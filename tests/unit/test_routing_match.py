"""Deciding one request: hosts, gateway binding, every match field, splits, retries and
timeouts, redirects and rewrites, egress, and the trace `minimesh explain` prints."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimesh.config.model import Mesh
from minimesh.registry.model import Workload
from minimesh.routing.compile import compile_snapshot
from minimesh.routing.match import decide, trace
from minimesh.routing.pick import RingHash
from minimesh.routing.request import RequestView
from minimesh.routing.snapshot import (
    BlackHole,
    DirectResponse,
    Forward,
    NoRoute,
    Outcome,
    PassThrough,
    Redirect,
    Snapshot,
)
from tests.unit.test_routing_compile import BOOKINFO_WORKLOADS, PRODUCTPAGE, bookinfo, snapshot, workload

RNG = random.Random(7)


def request(
    url: str,
    headers: dict[str, str] | None = None,
    *,
    method: str = "GET",
    source: Workload | None = PRODUCTPAGE,
    gateway: str = "mesh",
) -> RequestView:
    return RequestView.from_url(method, url, headers or {}, source=source, gateway=gateway)


def forward(outcome: Outcome) -> Forward:
    assert isinstance(outcome, Forward), outcome
    return outcome


def subset_of(snap: Snapshot, req: RequestView, rng: random.Random = RNG) -> str | None:
    return forward(decide(snap, req, rng)).cluster.subset


VS_HEAD = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
"""


def reviews_vs(rules: str) -> Snapshot:
    return bookinfo(VS_HEAD + "\n".join("  " + line for line in rules.strip("\n").splitlines()))


# ---------------------------------------------------------------- bookinfo tasks


@pytest.mark.parametrize("service", ["productpage", "reviews", "ratings", "details"])
def test_bookinfo_routes_every_service_to_v1(service: str) -> None:
    outcome = forward(decide(bookinfo(), request(f"http://{service}:9080/"), RNG))
    assert outcome.route_ref == f"VirtualService/default/{service}#http[0]"
    assert outcome.cluster.name == f"outbound|9080|v1|{service}.default.svc.cluster.local"
    assert [e.workload.name for e in outcome.cluster.endpoints if e.workload] == [f"{service}-v1"]


@pytest.mark.parametrize(
    ("headers", "subset", "route"),
    [
        ({"end-user": "jason"}, "v2", "VirtualService/default/reviews#http[0]"),
        ({"end-user": "Jason"}, "v1", "VirtualService/default/reviews#http[1]"),
        ({}, "v1", "VirtualService/default/reviews#http[1]"),
    ],
)
def test_jason_sees_reviews_v2(headers: dict[str, str], subset: str, route: str) -> None:
    outcome = forward(
        decide(bookinfo("virtual-service-reviews-jason-v2.yaml"), request("http://reviews:9080/r", headers), RNG)
    )
    assert (outcome.cluster.subset, outcome.route_ref) == (subset, route)


def test_fifty_fifty_split_with_a_seeded_rng() -> None:
    snap = bookinfo("virtual-service-reviews-50-v3.yaml")
    rng = random.Random(42)
    drawn = Counter(forward(decide(snap, request("http://reviews:9080/"), rng)).cluster.subset for _ in range(2000))
    assert set(drawn) == {"v1", "v3"}
    assert abs(drawn["v1"] - 1000) < 100
    outcome = forward(decide(snap, request("http://reviews:9080/"), random.Random(1)))
    assert outcome.draw is not None and outcome.draw.weights == (50, 50)
    assert outcome.route.destinations[outcome.draw.picked].subset == outcome.cluster.subset


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ((100, 0), {"v1"}),
        ((0, 100), {"v2"}),
        ((3, 1), {"v1", "v2"}),
    ],
)
def test_weights_are_relative_and_zero_gets_nothing(weights: tuple[int, int], expected: set[str]) -> None:
    snap = reviews_vs(
        f"""
- route:
  - {{destination: {{host: reviews, subset: v1}}, weight: {weights[0]}}}
  - {{destination: {{host: reviews, subset: v2}}, weight: {weights[1]}}}
"""
    )
    rng = random.Random(3)
    drawn = Counter(subset_of(snap, request("http://reviews/"), rng) for _ in range(400))
    assert set(drawn) == expected
    if weights == (3, 1):
        assert 250 < drawn["v1"] < 350


def test_a_lone_destination_gets_everything_even_with_weight_zero() -> None:
    snap = reviews_vs("- route: [{destination: {host: reviews, subset: v3}, weight: 0}]")
    outcome = forward(decide(snap, request("http://reviews/"), RNG))
    assert (outcome.cluster.subset, outcome.draw) == ("v3", None)


# ---------------------------------------------------------------- hosts


@pytest.mark.parametrize(
    ("authority", "namespace", "expected"),
    [
        ("reviews", "default", "v1"),
        ("reviews:9080", "default", "v1"),
        ("reviews.default", "default", "v1"),
        ("reviews.default.svc", "default", "v1"),
        ("reviews.default.svc.cluster.local", "default", "v1"),
        ("REVIEWS.default.svc.cluster.local:9080", "default", "v1"),
        ("reviews.default:9080", "prod", "v1"),
        ("reviews", "prod", None),
        ("reviews:8000", "default", None),
    ],
)
def test_client_spellings_of_a_service_host(authority: str, namespace: str, expected: str | None) -> None:
    source = workload("client", "client", namespace=namespace)
    outcome = decide(bookinfo(), request(f"http://{authority}/reviews/1", source=source), RNG)
    if expected is None:
        assert isinstance(outcome, PassThrough)
    else:
        assert forward(outcome).cluster.subset == expected


def test_a_port_the_request_was_sent_to_must_be_a_port_of_the_service() -> None:
    snap = bookinfo()
    on_port = RequestView("GET", "/", "reviews", {}, port=9080, source=PRODUCTPAGE)
    assert forward(decide(snap, on_port, RNG)).port == 9080
    elsewhere = RequestView("GET", "/", "reviews", {}, port=9090, source=PRODUCTPAGE)
    assert isinstance(decide(snap, elsewhere, RNG), PassThrough)
    disagree = RequestView("GET", "/", "reviews:9081", {}, port=9080, source=PRODUCTPAGE)
    assert isinstance(decide(snap, disagree, RNG), PassThrough)


WILDCARDS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: everything}
spec:
  hosts: ["*.default.svc.cluster.local"]
  http: [{route: [{destination: {host: details}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: all}
spec:
  hosts: ["*"]
  http: [{route: [{destination: {host: ratings}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-exact}
spec:
  hosts: [reviews.default.svc.cluster.local]
  http: [{route: [{destination: {host: reviews, subset: v2}}]}]
"""


@pytest.mark.parametrize(
    ("host", "route"),
    [
        ("reviews", "VirtualService/default/reviews-exact#http[0]"),
        ("productpage", "VirtualService/default/everything#http[0]"),
        ("details.default.svc.cluster.local", "VirtualService/default/everything#http[0]"),
    ],
)
def test_the_most_specific_host_wins(host: str, route: str) -> None:
    snap = snapshot(WILDCARDS)
    assert forward(decide(snap, request(f"http://{host}/"), RNG)).route_ref == route


def test_the_first_virtual_service_for_a_host_wins_at_a_sidecar() -> None:
    second = (
        VS_HEAD.replace("name: reviews}", "name: reviews-b}")
        + "  - route: [{destination: {host: reviews, subset: v3}}]\n"
    )
    snap = bookinfo(second)
    outcome, steps = trace(snap, request("http://reviews/"), RNG)
    assert forward(outcome).cluster.subset == "v1"
    assert ("VirtualService/default/reviews-b", "miss") in [(s.what, s.verdict) for s in steps]


def test_no_virtual_service_means_the_default_route_to_every_endpoint() -> None:
    snap = compile_snapshot(Mesh(), BOOKINFO_WORKLOADS)
    outcome = forward(decide(snap, request("http://reviews:9080/"), RNG))
    assert outcome.route_ref == "default"
    assert outcome.cluster.name == "outbound|9080||reviews.default.svc.cluster.local"
    assert len(outcome.cluster.endpoints) == 3
    assert outcome.retries is not None and outcome.retries.attempts == 2


# ---------------------------------------------------------------- gateways

GATEWAY_VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  gateways: [GATEWAYS]
  http:
  - match: [{uri: {prefix: /mesh-only}, gateways: [mesh]}]
    route: [{destination: {host: reviews, subset: v3}}]
  - route: [{destination: {host: reviews, subset: v2, port: {number: 9080}}}]
"""


@pytest.mark.parametrize(
    ("gateways", "at", "path", "expected"),
    [
        ("bookinfo-gateway", "mesh", "/", "default"),
        ("bookinfo-gateway", "bookinfo-gateway", "/", "v2"),
        ("bookinfo-gateway", "bookinfo-gateway", "/mesh-only", "v2"),
        ("bookinfo-gateway, mesh", "mesh", "/", "v2"),
        ("bookinfo-gateway, mesh", "mesh", "/mesh-only", "v3"),
        ("mesh", "bookinfo-gateway", "/", "productpage"),
        ("default/bookinfo-gateway", "default/bookinfo-gateway", "/", "v2"),
    ],
)
def test_gateway_binding(gateways: str, at: str, path: str, expected: str) -> None:
    snap = bookinfo(GATEWAY_VS.replace("GATEWAYS", gateways))
    host = "reviews.default.svc.cluster.local" if at != "mesh" else "reviews"
    outcome = decide(
        snap, request(f"http://{host}{path}", gateway=at, source=None if at != "mesh" else PRODUCTPAGE), RNG
    )
    if expected == "productpage":
        assert isinstance(outcome, NoRoute)
        return
    chosen = forward(outcome)
    assert (chosen.cluster.subset or chosen.route_ref) == expected


GATEWAY_HOSTS = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["bookinfo.com", "*.example.com"]
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["secure.example.com"]
    tls: {mode: SIMPLE, credentialName: secure}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo}
spec:
  hosts: ["*"]
  gateways: [bookinfo-gateway]
  http: [{route: [{destination: {host: productpage, port: {number: 9080}}}]}]
"""


@pytest.mark.parametrize(
    ("url", "admitted"),
    [
        ("http://bookinfo.com/productpage", True),
        ("http://bookinfo.com:8080/productpage", True),
        ("http://shop.example.com/", True),
        ("http://example.com/", False),
        ("http://other.org/", False),
        ("https://secure.example.com/", True),
        ("https://bookinfo.com/", False),
    ],
)
def test_gateway_server_hosts_admit_the_authority(url: str, admitted: bool) -> None:
    snap = bookinfo(GATEWAY_HOSTS)
    outcome = decide(snap, request(url, gateway="bookinfo-gateway", source=None), RNG)
    if admitted:
        assert forward(outcome).cluster.short == "productpage"
    else:
        assert isinstance(outcome, NoRoute) and "admits host" in outcome.reason


def test_an_unknown_gateway_has_no_route() -> None:
    outcome = decide(bookinfo(), request("http://x/", gateway="nope", source=None), RNG)
    assert isinstance(outcome, NoRoute) and outcome.status == 404


def test_gateways_merge_virtual_services_for_one_host() -> None:
    second = """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: bookinfo-api}
        spec:
          hosts: ["*"]
          gateways: [bookinfo-gateway]
          http: [{match: [{uri: {prefix: /api/v2}}], route: [{destination: {host: details}}]}]
        """
    snap = bookinfo(second)
    at_gateway = request("http://localhost:8080/api/v2/x", gateway="bookinfo-gateway", source=None)
    assert forward(decide(snap, at_gateway, RNG)).route_ref == "VirtualService/default/bookinfo-api#http[0]"


def test_https_redirect_on_a_plain_server() -> None:
    text = """\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: bookinfo-gateway}
        spec:
          selector: {istio: ingressgateway}
          servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"], tls: {httpsRedirect: true}}]
        """
    outcome = decide(bookinfo(text), request("http://bookinfo.com/productpage?u=1", gateway="bookinfo-gateway"), RNG)
    assert isinstance(outcome, Redirect)
    assert (outcome.status, outcome.location) == (301, "https://bookinfo.com/productpage?u=1")


HTTPS_ONLY = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - {port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}
  - {port: {number: 80, name: http-secure, protocol: HTTP}, hosts: [secure.example.com, "ops/*.admin.example.com"],
     tls: {httpsRedirect: true}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: ["*", api.admin.example.com, secure.example.com]
  gateways: [gw]
  http: [{route: [{destination: {host: productpage}}]}]
"""


@pytest.mark.parametrize(
    ("authority", "location"),
    [
        # Envoy's require_tls: https://, then the Host header and the path as sent
        ("secure.example.com", "https://secure.example.com/p?q=1"),
        ("secure.example.com:8080", "https://secure.example.com:8080/p?q=1"),
        # no VirtualService for *.admin.example.com, and it is more specific than "*"
        ("x.admin.example.com", "https://x.admin.example.com/p?q=1"),
        # an exact virtual host (not bound under the redirect server: ops/ only) beats the wildcard
        ("api.admin.example.com", None),
        ("shop.example.com", None),
    ],
)
def test_https_redirect_servers_answer_301_with_or_without_a_virtual_service(
    authority: str, location: str | None
) -> None:
    outcome = decide(bookinfo(HTTPS_ONLY), at_gateway(authority, "/p?q=1"), RNG)
    if location is None:
        assert forward(outcome).cluster.short == "productpage"
    else:
        assert isinstance(outcome, Redirect)
        assert (outcome.status, outcome.location, outcome.route) == (301, location, None)


def test_an_https_redirect_server_alone_redirects_and_explain_says_why() -> None:
    text = """\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: gw}
        spec:
          selector: {istio: ingressgateway}
          servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [shop.example.com], tls: {httpsRedirect: true}}]
        """
    snap = snapshot(text)
    outcome, steps = trace(snap, request("http://shop.example.com/cart", gateway="gw", source=None), RNG)
    assert isinstance(outcome, Redirect) and outcome.location == "https://shop.example.com/cart"
    assert [str(s) for s in steps] == [
        "gateway info: default/gw: virtual host shop.example.com has httpsRedirect",
        "redirect info: 301 to https://shop.example.com/cart "
        "(the server's httpsRedirect: https, the Host header and path as sent)",
    ]
    elsewhere = decide(snap, request("http://other.example.com/cart", gateway="gw", source=None), RNG)
    assert isinstance(elsewhere, NoRoute) and "admits host" in elsewhere.reason


# ---------------------------------------------------------------- every match field

MATCHES: list[tuple[str, str, dict[str, str], str, bool]] = [
    # (match block, url, headers, method, holds)
    ("{uri: {exact: /reviews/1}}", "http://reviews/reviews/1?x=1", {}, "GET", True),
    ("{uri: {exact: /reviews/1}}", "http://reviews/reviews/12", {}, "GET", False),
    ("{uri: {prefix: /reviews}}", "http://reviews/reviews/1", {}, "GET", True),
    ("{uri: {prefix: /reviews}}", "http://reviews/Reviews/1", {}, "GET", False),
    ("{uri: {prefix: /reviews}, ignoreUriCase: true}", "http://reviews/REVIEWS/1", {}, "GET", True),
    ("{uri: {exact: /a}, ignoreUriCase: true}", "http://reviews/A", {}, "GET", True),
    ("{uri: {regex: '/reviews/[0-9]+'}}", "http://reviews/reviews/42?q=a", {}, "GET", True),
    ("{uri: {regex: '/reviews/[0-9]+'}}", "http://reviews/reviews/42/x", {}, "GET", False),
    ("{headers: {end-user: {}}}", "http://reviews/", {"end-user": ""}, "GET", True),
    ("{headers: {end-user: {}}}", "http://reviews/", {}, "GET", False),
    ("{headers: {end-user: {exact: jason}}}", "http://reviews/", {"end-user": "jason"}, "GET", True),
    ("{headers: {end-user: {prefix: ja}}}", "http://reviews/", {"end-user": "jason"}, "GET", True),
    ("{headers: {end-user: {prefix: ja}}}", "http://reviews/", {"end-user": "bob"}, "GET", False),
    ("{headers: {end-user: {regex: 'j.*n'}}}", "http://reviews/", {"end-user": "jason"}, "GET", True),
    ("{headers: {end-user: {regex: 'j.*'}}}", "http://reviews/", {"end-user": "xjason"}, "GET", False),
    ("{headers: {End-User: {exact: jason}}}", "http://reviews/", {"END-USER": "jason"}, "GET", True),
    ("{withoutHeaders: {end-user: {exact: jason}}}", "http://reviews/", {"end-user": "bob"}, "GET", True),
    ("{withoutHeaders: {end-user: {exact: jason}}}", "http://reviews/", {"end-user": "jason"}, "GET", False),
    ("{withoutHeaders: {end-user: {exact: jason}}}", "http://reviews/", {}, "GET", True),
    ("{withoutHeaders: {end-user: {}}}", "http://reviews/", {}, "GET", True),
    ("{withoutHeaders: {end-user: {}}}", "http://reviews/", {"end-user": "x"}, "GET", False),
    ("{withoutHeaders: {end-user: {regex: '.*'}}}", "http://reviews/", {}, "GET", False),
    ("{withoutHeaders: {end-user: {regex: '*'}}}", "http://reviews/", {}, "GET", True),
    ("{withoutHeaders: {end-user: {regex: '*'}}}", "http://reviews/", {"end-user": ""}, "GET", False),
    ("{withoutHeaders: {end-user: {regex: '*'}}}", "http://reviews/", {"end-user": "*"}, "GET", False),
    ("{queryParams: {v: {exact: '2'}}}", "http://reviews/?v=2&v=3", {}, "GET", True),
    ("{queryParams: {v: {exact: '3'}}}", "http://reviews/?v=2&v=3", {}, "GET", False),
    ("{queryParams: {v: {regex: '[0-9]'}}}", "http://reviews/?v=7", {}, "GET", True),
    ("{queryParams: {v: {prefix: 'ab'}}}", "http://reviews/?v=abc", {}, "GET", True),
    ("{queryParams: {v: {exact: 'a b'}}}", "http://reviews/?v=a%20b", {}, "GET", True),
    ("{queryParams: {v: {}}}", "http://reviews/?v", {}, "GET", True),
    ("{queryParams: {v: {}}}", "http://reviews/?w=1", {}, "GET", False),
    ("{method: {exact: POST}}", "http://reviews/", {}, "POST", True),
    ("{method: {exact: POST}}", "http://reviews/", {}, "GET", False),
    ("{authority: {exact: 'reviews:9080'}}", "http://reviews:9080/", {}, "GET", True),
    ("{authority: {prefix: reviews.default}}", "http://reviews/", {}, "GET", False),
    ("{scheme: {exact: http}}", "http://reviews/", {}, "GET", True),
    ("{port: 9080}", "http://reviews/", {}, "GET", True),
    ("{port: 9081}", "http://reviews/", {}, "GET", False),
    ("{sourceLabels: {app: productpage}}", "http://reviews/", {}, "GET", True),
    ("{sourceLabels: {app: productpage, version: v2}}", "http://reviews/", {}, "GET", False),
    ("{sourceNamespace: default}", "http://reviews/", {}, "GET", True),
    (
        "{headers: {end-user: {exact: jason}}, uri: {prefix: /r}}",
        "http://reviews/r",
        {"end-user": "jason"},
        "GET",
        True,
    ),
    (
        "{headers: {end-user: {exact: jason}}, uri: {prefix: /r}}",
        "http://reviews/x",
        {"end-user": "jason"},
        "GET",
        False,
    ),
]


@pytest.mark.parametrize(("block", "url", "headers", "method", "holds"), MATCHES)
def test_match_fields(block: str, url: str, headers: dict[str, str], method: str, holds: bool) -> None:
    snap = reviews_vs(
        f"""
- match: [{block}]
  route: [{{destination: {{host: reviews, subset: v2}}}}]
- route: [{{destination: {{host: reviews, subset: v1}}}}]
"""
    )
    assert subset_of(snap, request(url, headers, method=method)) == ("v2" if holds else "v1")


def test_any_match_block_may_hold() -> None:
    snap = reviews_vs(
        """
- match: [{uri: {exact: /a}}, {uri: {exact: /b}}]
  route: [{destination: {host: reviews, subset: v2}}]
- route: [{destination: {host: reviews, subset: v1}}]
"""
    )
    assert [subset_of(snap, request(f"http://reviews/{p}")) for p in "abc"] == ["v2", "v2", "v1"]


def test_source_labels_need_a_source() -> None:
    snap = reviews_vs(
        """
- match: [{sourceLabels: {app: productpage}}]
  route: [{destination: {host: reviews, subset: v2}}]
- route: [{destination: {host: reviews, subset: v1}}]
"""
    )
    assert subset_of(snap, request("http://reviews/", source=None)) == "v1"
    other = workload("other", "other", namespace="prod", labels=(("app", "productpage"),))
    assert subset_of(snap, request("http://reviews.default/", source=other)) == "v2"


def test_a_virtual_service_with_no_rule_for_this_source_falls_back_to_the_default_route() -> None:
    snap = reviews_vs(
        """
- match: [{sourceLabels: {app: ratings}}]
  route: [{destination: {host: reviews, subset: v2}}]
"""
    )
    outcome = forward(decide(snap, request("http://reviews/"), RNG))
    assert (outcome.route_ref, outcome.cluster.subset) == ("default", None)


def test_no_matching_rule_is_404_nr() -> None:
    snap = reviews_vs("- match: [{uri: {prefix: /only}}]\n  route: [{destination: {host: reviews, subset: v2}}]")
    outcome = decide(snap, request("http://reviews/other"), RNG)
    assert outcome == NoRoute("no rule of VirtualService/default/reviews matches")


# ---------------------------------------------------------------- retries, timeouts, faults, mirrors


DEFAULT_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
ABORT = "fault: {abort: {httpStatus: 500, percentage: {value: 100}}}"


@pytest.mark.parametrize(
    ("fields", "timeout", "retries"),
    [
        ([], None, (2, DEFAULT_ON, (503,))),
        (["timeout: 3s"], 3.0, (2, DEFAULT_ON, (503,))),
        (["retries: {attempts: 0}"], None, None),
        (["retries: {attempts: 4, perTryTimeout: 1s}"], None, (4, DEFAULT_ON, (503,))),
        (["retries: {attempts: 3, retryOn: 5xx}"], None, (3, "5xx", ())),
        (["timeout: 3s", "retries: {attempts: 3}", ABORT], None, None),
    ],
)
def test_timeouts_and_retries(
    fields: list[str], timeout: float | None, retries: tuple[int, str, tuple[int, ...]] | None
) -> None:
    rule = "\n".join(["- route: [{destination: {host: reviews, subset: v1}}]", *(f"  {f}" for f in fields)])
    outcome = forward(decide(reviews_vs(rule), request("http://reviews/"), RNG))
    assert outcome.timeout == timeout
    policy = outcome.retries
    assert ((policy.attempts, ",".join(policy.retry_on), policy.retriable_status_codes) if policy else None) == retries


def test_a_fault_is_passed_on_and_turns_retries_and_timeout_off() -> None:
    snap = bookinfo("virtual-service-ratings-delay.yaml")
    outcome = forward(decide(snap, request("http://ratings:9080/", {"end-user": "jason"}), RNG))
    assert outcome.fault is not None and outcome.fault.delay is not None
    assert (outcome.fault.delay.fixed_delay, outcome.fault.delay.percentage) == (7.0, 100.0)
    assert (outcome.timeout, outcome.retries) == (None, None)
    plain = forward(decide(snap, request("http://ratings:9080/"), RNG))
    assert plain.fault is None and plain.retries is not None


def test_mirrors_resolve_to_clusters_with_a_percentage() -> None:
    snap = reviews_vs(
        """
- route: [{destination: {host: reviews, subset: v1}}]
  mirror: {host: reviews, subset: v2}
  mirrors:
  - {destination: {host: reviews, subset: v3}, percentage: {value: 25}}
  - {destination: {host: ratings}, percentage: {value: 0}}
"""
    )
    outcome = forward(decide(snap, request("http://reviews/"), RNG))
    assert [(mi.cluster.subset, mi.percentage) for mi in outcome.mirrors] == [("v2", 100.0), ("v3", 25.0)]


def test_header_operations_join_route_and_destination() -> None:
    snap = reviews_vs(
        """
- headers: {request: {set: {x-route: r, host: set-by-route}}, response: {remove: [x-secret]}}
  route:
  - destination: {host: reviews, subset: v1}
    headers: {request: {add: {x-dest: d}}}
"""
    )
    outcome = forward(decide(snap, request("http://reviews/"), RNG))
    assert outcome.request_headers.set == (("x-route", "r"),)
    assert outcome.request_headers.add == (("x-dest", "d"),)
    assert outcome.response_headers.remove == ("x-secret",)
    assert outcome.rewritten("/p", "reviews") == ("/p", "set-by-route")


# ---------------------------------------------------------------- missing subsets and hosts


def test_a_subset_matching_no_endpoint_forwards_to_an_empty_cluster() -> None:
    snap = bookinfo(workloads=BOOKINFO_WORKLOADS[:3] + BOOKINFO_WORKLOADS[4:])
    outcome = forward(decide(snap, request("http://reviews/"), RNG))
    assert (outcome.cluster.subset, outcome.cluster.endpoints, outcome.cluster.problem) == ("v1", (), "")


def test_unknown_subset_and_unknown_host_forward_to_empty_clusters() -> None:
    snap = reviews_vs("- route: [{destination: {host: reviews, subset: v9}}]")
    outcome = forward(decide(snap, request("http://reviews/"), RNG))
    assert outcome.cluster.endpoints == () and "subset v9" in outcome.cluster.problem
    snap = reviews_vs("- route: [{destination: {host: reviews.default}}]")
    outcome = forward(decide(snap, request("http://reviews:9080/"), RNG))
    assert outcome.cluster.name == "outbound|9080||reviews.default"
    assert "no service" in outcome.cluster.problem


# ---------------------------------------------------------------- redirects, rewrites, direct responses


@pytest.mark.parametrize(
    ("redirect", "url", "location", "status"),
    [
        ("{uri: /v2/ratings}", "http://reviews/ratings?x=1", "http://reviews/v2/ratings?x=1", 301),
        ("{uri: '/new?a=b'}", "http://reviews/old?x=1", "http://reviews/new?a=b", 301),
        ("{authority: bookinfo.com, redirectCode: 302}", "http://reviews:9080/p", "http://bookinfo.com/p", 302),
        ("{scheme: https}", "http://reviews/p", "https://reviews/p", 301),
        ("{scheme: https}", "http://reviews:9080/p", "https://reviews:9080/p", 301),
        ("{port: 8443, scheme: https}", "http://reviews:9080/p", "https://reviews:8443/p", 301),
        ("{port: 443, scheme: https}", "http://reviews:9080/p", "https://reviews:9080/p", 301),
        ("{derivePort: FROM_REQUEST_PORT, authority: other}", "http://reviews:9080/p", "http://other:9080/p", 301),
        ("{derivePort: FROM_PROTOCOL_DEFAULT, authority: other}", "http://reviews:9080/p", "http://other/p", 301),
    ],
)
def test_redirects_build_the_location_envoy_builds(redirect: str, url: str, location: str, status: int) -> None:
    snap = reviews_vs(f"- redirect: {redirect}")
    outcome = decide(snap, request(url), RNG)
    assert isinstance(outcome, Redirect)
    assert (outcome.location, outcome.status, outcome.route_ref) == (
        location,
        status,
        "VirtualService/default/reviews#http[0]",
    )


@pytest.mark.parametrize(
    ("match", "rewrite", "path", "expected"),
    [
        ("{uri: {prefix: /old}}", "{uri: /new}", "/old/x?q=1", "/new/x?q=1"),
        ("{uri: {exact: /old}}", "{uri: /new}", "/old?q=1", "/new?q=1"),
        ("{uri: {regex: '/o.d'}}", "{uri: /new}", "/old", "/new"),
        ("{headers: {x: {}}}", "{uri: /v2}", "/old", "/v2old"),
        (
            "{uri: {prefix: /}}",
            "{uriRegexRewrite: {match: '^/api/(.*)', rewrite: '/v2/\\1'}}",
            "/api/x?y=1",
            "/v2/x?y=1",
        ),
    ],
)
def test_rewrites_replace_what_the_rule_matched(match: str, rewrite: str, path: str, expected: str) -> None:
    snap = reviews_vs(f"- match: [{match}]\n  rewrite: {rewrite}\n  route: [{{destination: {{host: reviews}}}}]")
    outcome = forward(decide(snap, request(f"http://reviews{path}", {"x": "1"}), RNG))
    assert outcome.rewritten(path, "reviews") == (expected, "reviews")


REDIRECT_PORTS = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - {port: {number: 80, name: http, protocol: HTTP}, hosts: [b.example.com]}
  - {port: {number: 85, name: http-alt, protocol: HTTP}, hosts: [c.example.com]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [b.example.com, c.example.com]
  gateways: [gw]
  http:
  - match: [{uri: {prefix: /foo}}]
    redirect: {derivePort: FROM_REQUEST_PORT}
  - match: [{uri: {prefix: /tls}}]
    redirect: {derivePort: FROM_REQUEST_PORT, scheme: https}
  - match: [{uri: {prefix: /set}}]
    redirect: {port: 80}
  - match: [{uri: {prefix: /old/}}]
    redirect: {prefixRewrite: /new/}
  - match: [{uri: {prefix: /v1}}]
    redirect: {prefixRewrite: /v2, derivePort: FROM_REQUEST_PORT}
  - redirect: {prefixRewrite: /all/}
"""


def at_gateway(authority: str, path: str) -> RequestView:
    """A request as the gateway listener hands it to routing: on minimesh's own port 8080."""
    return RequestView("GET", path, authority, {}, "http", 8080, None, "default/gw", "127.0.0.1:40000")


@pytest.mark.parametrize(
    ("authority", "path", "location"),
    [
        # Istio's "redirect request port" cases: the server's port, 80 left out, a Host port kept as sent
        ("b.example.com", "/foo", "http://b.example.com/foo"),
        ("b.example.com:80", "/foo", "http://b.example.com:80/foo"),
        ("c.example.com", "/foo", "http://c.example.com:85/foo"),
        ("c.example.com:85", "/foo", "http://c.example.com:85/foo"),
        ("c.example.com:8080", "/foo", "http://c.example.com:85/foo"),
        # Istio's "redirect port and scheme": the scheme changes, so 80 is no default and stays
        ("b.example.com", "/tls", "https://b.example.com:80/tls"),
        ("c.example.com:8080", "/tls?a=1", "https://c.example.com:85/tls?a=1"),
        # port 80 with http is Istio's "no port": the Host header decides
        ("c.example.com", "/set", "http://c.example.com/set"),
        ("c.example.com:8080", "/set", "http://c.example.com:8080/set"),
        # prefixRewrite: the matched prefix replaced, the rest and the query kept
        ("b.example.com", "/old/page?x=1", "http://b.example.com/new/page?x=1"),
        ("c.example.com", "/v1/x", "http://c.example.com:85/v2/x"),
        ("b.example.com", "/other", "http://b.example.com/all/other"),
    ],
)
def test_gateway_redirects_derive_the_port_from_the_server_as_istio_does(
    authority: str, path: str, location: str
) -> None:
    outcome = decide(snapshot(REDIRECT_PORTS), at_gateway(authority, path), RNG)
    assert isinstance(outcome, Redirect)
    assert (outcome.status, outcome.location) == (301, location)


def test_explain_says_where_a_redirect_port_came_from() -> None:
    snap = snapshot(REDIRECT_PORTS)
    _, steps = trace(snap, request("http://c.example.com/foo", gateway="gw", source=None), RNG)
    assert str(steps[-1]) == (
        "redirect info: 301 to http://c.example.com:85/foo "
        "(derivePort FROM_REQUEST_PORT: port 85 of the Gateway server the request matched)"
    )
    _, steps = trace(snap, request("http://b.example.com:80/foo", gateway="gw", source=None), RNG)
    assert steps[-1].detail == (
        "301 to http://b.example.com:80/foo (derivePort FROM_REQUEST_PORT: port 80 of the Gateway server the "
        "request matched, left out as the default port of http; the Host header's own port stays)"
    )


def test_a_sidecar_redirect_derives_the_port_the_request_was_sent_to() -> None:
    text = """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: site}
        spec:
          hosts: [www.example.com]
          http: [{match: [{uri: {exact: /foo}}], redirect: {derivePort: FROM_REQUEST_PORT, scheme: https}}]
        """
    outcome = decide(bookinfo(text), request("http://www.example.com/foo"), RNG)
    assert isinstance(outcome, Redirect) and outcome.location == "https://www.example.com:80/foo"
    assert outcome.listener == 80


def test_a_scheme_change_drops_the_old_default_port() -> None:
    text = """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: site}
        spec:
          hosts: [www.example.com]
          http: [{redirect: {scheme: https}}]
        """
    outcome = decide(bookinfo(text), request("http://www.example.com:80/p"), RNG)
    assert isinstance(outcome, Redirect) and outcome.location == "https://www.example.com/p"


def test_authority_rewrite() -> None:
    snap = reviews_vs("- rewrite: {authority: reviews.internal}\n  route: [{destination: {host: reviews}}]")
    assert forward(decide(snap, request("http://reviews/a"), RNG)).rewritten("/a", "reviews") == (
        "/a",
        "reviews.internal",
    )


def test_direct_response() -> None:
    snap = reviews_vs("- directResponse: {status: 503, body: {string: down}}")
    assert decide(snap, request("http://reviews/"), RNG) == DirectResponse(
        "VirtualService/default/reviews#http[0]",
        snap.mesh_hosts["reviews.default.svc.cluster.local"][0].routes[0],
        503,
        b"down",
    )


# ---------------------------------------------------------------- egress

EGRESS = """\
apiVersion: minimesh.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {outboundTrafficPolicy: {mode: MODE}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin}
spec:
  hosts: [httpbin.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
"""


@pytest.mark.parametrize(
    ("mode", "url", "expected"),
    [
        ("REGISTRY_ONLY", "http://example.com/", BlackHole("example.com", 80)),
        ("REGISTRY_ONLY", "http://example.com:8080/", BlackHole("example.com", 8080)),
        ("ALLOW_ANY", "http://example.com/", PassThrough("example.com", 80)),
        ("REGISTRY_ONLY", "http://httpbin.org/get", "outbound|80||httpbin.org"),
        ("ALLOW_ANY", "http://httpbin.org/get", "outbound|80||httpbin.org"),
    ],
)
def test_egress_to_hosts_outside_the_registry(mode: str, url: str, expected: object) -> None:
    snap = snapshot(EGRESS.replace("MODE", mode))
    outcome = decide(snap, request(url), RNG)
    if isinstance(expected, str):
        assert forward(outcome).cluster.name == expected
        assert [(e.address, e.port) for e in forward(outcome).cluster.endpoints] == [("httpbin.org", 80)]
    else:
        assert outcome == expected


def test_a_virtual_service_for_a_host_outside_the_registry_routes_on_port_80() -> None:
    text = """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: external}
        spec:
          hosts: [api.example.com]
          http: [{route: [{destination: {host: details, port: {number: 9080}}}]}]
        """
    snap = bookinfo(text)
    assert forward(decide(snap, request("http://api.example.com/x"), RNG)).cluster.short == "details"
    assert isinstance(decide(snap, request("http://api.example.com:8080/x"), RNG), PassThrough)


# ---------------------------------------------------------------- trace


def test_trace_of_a_jason_request() -> None:
    snap = bookinfo("virtual-service-reviews-jason-v2.yaml")
    outcome, steps = trace(snap, request("http://reviews:9080/reviews/0", {"end-user": "jason"}), random.Random(1))
    assert forward(outcome).cluster.subset == "v2"
    assert [str(s) for s in steps[:3]] == [
        "host info: reviews:9080 → reviews.default.svc.cluster.local port 9080",
        "VirtualService/default/reviews match: host reviews covers reviews.default.svc.cluster.local",
        "http[0] match: header end-user exact 'jason'",
    ]
    assert [s.what for s in steps[3:]] == ["cluster", "policy", "timeout", "retries"]
    cluster = "outbound|9080|v2|reviews.default.svc.cluster.local"
    assert steps[3].detail == f"{cluster}: subset v2 (version=v2); endpoints 10.0.0.6:9080 (reviews-v2)"
    assert steps[4].detail.startswith("lb LEAST_REQUEST; pool unlimited; outlier detection none")
    assert steps[6].detail.startswith("2 retries on connect-failure")


def test_trace_of_a_request_that_is_not_jason() -> None:
    snap = bookinfo("virtual-service-reviews-jason-v2.yaml")
    _, steps = trace(snap, request("http://reviews:9080/reviews/0"), RNG)
    assert str(steps[2]) == "http[0] miss: header end-user exact 'jason' — request has no end-user"
    assert str(steps[3]) == "http[1] match: no match conditions"


def test_trace_shows_the_weight_draw_and_the_fault() -> None:
    _, steps = trace(bookinfo("virtual-service-reviews-50-v3.yaml"), request("http://reviews/"), random.Random(1))
    split = next(s for s in steps if s.what == "split")
    assert split.detail in ("weights v1=50 v3=50 → drew v1", "weights v1=50 v3=50 → drew v3")
    _, steps = trace(
        bookinfo("virtual-service-ratings-abort.yaml"), request("http://ratings/", {"end-user": "jason"}), RNG
    )
    details = {s.what: s.detail for s in steps}
    assert details["fault"] == "abort 500 for 100%"
    assert details["retries"] == details["timeout"] == "off: the route injects a fault"


def test_trace_and_decide_agree_for_the_same_seed() -> None:
    snap = bookinfo("virtual-service-reviews-50-v3.yaml")
    picks = set()
    for seed in range(20):
        traced = trace(snap, request("http://reviews/"), random.Random(seed))[0]
        decided = decide(snap, request("http://reviews/"), random.Random(seed))
        assert isinstance(traced, Forward) and isinstance(decided, Forward)
        assert (traced.route_ref, traced.target, traced.port, traced.prefix) == (
            decided.route_ref,
            decided.target,
            decided.port,
            decided.prefix,
        )
        assert traced.draw is not None and decided.draw is not None
        assert (traced.draw.weights, traced.draw.picked) == (decided.draw.weights, decided.draw.picked)
        picks.add(decided.draw.picked)
    assert picks == {0, 1}


# ---------------------------------------------------------------- never raises

HOSTS = ["reviews", "reviews:9080", "reviews:1", "productpage.default", "x.example.com", "", ":", "[::1]:80", "a:b:c"]
SNAPSHOTS = [
    bookinfo(),
    bookinfo("virtual-service-reviews-50-v3.yaml"),
    bookinfo("virtual-service-ratings-abort.yaml"),
    bookinfo(GATEWAY_HOSTS),
]


@settings(max_examples=300, deadline=None)
@given(
    snapshot_index=st.integers(0, len(SNAPSHOTS) - 1),
    method=st.sampled_from(["GET", "POST", "", "weird method"]),
    path=st.text(max_size=30),
    authority=st.sampled_from(HOSTS) | st.text(max_size=20),
    headers=st.dictionaries(
        st.sampled_from(["end-user", "cookie", "x", ":authority"]), st.text(max_size=10), max_size=3
    ),
    scheme=st.sampled_from(["http", "https", "ftp"]),
    port=st.none() | st.integers(0, 70000),
    gateway=st.sampled_from(["mesh", "bookinfo-gateway", "default/bookinfo-gateway", "nope"]),
    with_source=st.booleans(),
)
def test_random_requests_never_raise(
    snapshot_index: int,
    method: str,
    path: str,
    authority: str,
    headers: dict[str, str],
    scheme: str,
    port: int | None,
    gateway: str,
    with_source: bool,
) -> None:
    view = RequestView(method, path, authority, headers, scheme, port, PRODUCTPAGE if with_source else None, gateway)
    outcome, steps = trace(SNAPSHOTS[snapshot_index], view, random.Random(0))
    assert isinstance(outcome, Forward | Redirect | DirectResponse | NoRoute | PassThrough | BlackHole)
    assert steps


STICKY = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: user, ttl: 1h, path: /}}}}
"""


def test_explain_shows_the_cookie_decision() -> None:
    snap = snapshot(STICKY)
    outcome, steps = trace(snap, request("http://reviews:9080/"), RNG)
    details = {s.what: s.detail for s in steps}
    assert details["policy"].startswith("lb consistent hash cookie user (set when missing, ttl 3600s)")
    assert details["affinity"] == (
        "request has no cookie user: the proxy makes a VALUE from the client connection (16 hex digits), sends "
        'the request to the endpoint it hashes to and answers with Set-Cookie: user="VALUE"; Max-Age=3600; Path=/; '
        "HttpOnly; requests carrying it stick to that endpoint"
    )
    cluster = forward(outcome).cluster
    chosen = RingHash(cluster.endpoints, random.Random(0)).pick(key="abc")
    _, steps = trace(snap, request("http://reviews:9080/", {"cookie": 'user="abc"'}), RNG)
    details = {s.what: s.detail for s in steps}
    assert details["affinity"] == f"cookie user=abc hashes to {chosen}: every request carrying it goes there"


def test_explain_says_no_cookie_is_set_without_a_ttl() -> None:
    snap = snapshot(STICKY.replace(", ttl: 1h", ""))
    _, steps = trace(snap, request("http://reviews:9080/"), RNG)
    assert {s.what: s.detail for s in steps}["affinity"] == (
        "request has no cookie user and httpCookie sets no ttl, so none is set: a random endpoint"
    )
