"""Cross-reference warnings and lints: each case names the exact line and message."""

from __future__ import annotations

import textwrap

import pytest

from minimesh.config.check import check_mesh
from minimesh.config.load import load_layers, load_paths
from minimesh.config.names import fqdn, host_covers
from minimesh.config.source import parse_text
from tests.conftest import BOOKINFO, EXAMPLES


def findings(text: str) -> list[str]:
    documents, problems = parse_text(textwrap.dedent(text), "mesh.yaml")
    loaded = load_layers([documents], problems)
    assert loaded.errors == ()
    return [str(p) for p in check_mesh(loaded.mesh, loaded.documents)]


DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
---
"""
VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
"""

CASES = [
    (
        "subset no DestinationRule defines",
        DR + VS + "  http:\n  - route: [{destination: {host: reviews, subset: v9}}]\n",
        [
            "mesh.yaml:14:51: warning: subset 'v9' of host reviews is defined in no DestinationRule; requests to it "
            "get 503 no healthy upstream (VirtualService/reviews http[0].route[0].destination.subset)"
        ],
    ),
    (
        "host defined nowhere",
        VS + "  http:\n  - route: [{destination: {host: ghost}}]\n",
        [
            "mesh.yaml:7:34: warning: host 'ghost' is defined in none of the given files (no Service or "
            "DestinationRule) (VirtualService/reviews http[0].route[0].destination.host)"
        ],
    ),
    (
        "gateway defined nowhere",
        DR + VS + "  gateways: [missing-gateway]\n  http:\n  - route: [{destination: {host: reviews}}]\n",
        [
            "mesh.yaml:13:14: warning: gateway 'missing-gateway' is defined in none of the given files "
            "(VirtualService/reviews gateways[0])"
        ],
    ),
    (
        "rule shadowed by a catch-all",
        DR
        + VS
        + "  http:\n  - route: [{destination: {host: reviews}}]\n"
        + "  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: reviews}}]\n",
        [
            "mesh.yaml:15:5: warning: http[1] is never reached: http[0] above it matches every request "
            "(VirtualService/reviews http[1])"
        ],
    ),
    (
        "fault without percentage, and a timeout it disables",
        DR + VS + "  http:\n  - fault: {abort: {httpStatus: 500}}\n    timeout: 1s\n"
        "    route: [{destination: {host: reviews}}]\n",
        [
            "mesh.yaml:14:20: warning: fault abort has no percentage, so it injects nothing; add percentage: "
            "{value: 100} (VirtualService/reviews http[0].fault.abort)",
            "mesh.yaml:15:14: warning: this route has a fault, so Istio turns its timeout off; the timeout here "
            "has no effect (VirtualService/reviews http[0].timeout)",
        ],
    ),
    (
        "default retries on POST",
        DR + VS + "  http:\n  - match: [{method: {exact: POST}}]\n    route: [{destination: {host: reviews}}]\n",
        [
            "mesh.yaml:14:12: warning: POST requests on this route are retried twice by Istio's default retry "
            "policy; set retries.attempts: 0 if the upstream is not idempotent (VirtualService/reviews http[0].match)"
        ],
    ),
    (
        "ALLOW policy with no rules",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: lock}\n"
        "spec: {selector: {matchLabels: {app: reviews}}}\n",
        [
            "mesh.yaml:4:7: warning: an ALLOW policy with no rules matches nothing, so it denies every request "
            "to its workloads (AuthorizationPolicy/lock rules)",
            "mesh.yaml:4:7: warning: AuthorizationPolicy is validated but not enforced by minimesh yet: production "
            "enforces it, this local mesh does not (AuthorizationPolicy/lock)",
        ],
    ),
    (
        "PeerAuthentication is not enforced yet, and says so",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict}\n"
        "spec: {mtls: {mode: STRICT}}\n",
        [
            "mesh.yaml:4:14: warning: PeerAuthentication is validated but not enforced by minimesh yet: production "
            "enforces it, this local mesh does not (sidecars talk plaintext) (PeerAuthentication/strict mtls)"
        ],
    ),
    (
        "Gateway host no VirtualService binds",
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n"
        "  selector: {istio: ingressgateway}\n"
        "  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [shop.example.com]}]\n",
        [
            "mesh.yaml:6:70: warning: host 'shop.example.com' of this Gateway is bound by no VirtualService; its "
            "requests get 404 (Gateway/gw servers[0].hosts[0])"
        ],
    ),
    (
        "a Gateway host with httpsRedirect needs no VirtualService: it answers 301",
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n"
        "  selector: {istio: ingressgateway}\n"
        "  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [shop.example.com],\n"
        "             tls: {httpsRedirect: true}}]\n",
        [],
    ),
    (
        "two DestinationRules for one host",
        DR + DR.replace("name: reviews}", "name: reviews-2}"),
        [
            "mesh.yaml:12:9: warning: a second DestinationRule for host reviews.default.svc.cluster.local (the "
            "first is DestinationRule/reviews); Istio uses only one, so merge them (DestinationRule/reviews-2 host)"
        ],
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_findings(case: str, text: str, expected: list[str]) -> None:
    assert findings(text) == expected


def test_bookinfo_and_its_variants_have_no_findings() -> None:
    for variant in [None, *sorted((BOOKINFO / "variants").glob("*.yaml"))]:
        paths = [str(BOOKINFO)] + ([str(variant)] if variant else [])
        loaded = load_paths(paths)
        assert loaded.errors == (), variant
        assert check_mesh(loaded.mesh, loaded.documents) == [], variant


def test_corpus_loads_without_errors() -> None:
    loaded = load_paths([str(EXAMPLES.parent / "tests" / "data" / "corpus")])
    assert [str(p) for p in loaded.errors] == []


@pytest.mark.parametrize(
    ("host", "namespace", "expected"),
    [
        ("reviews", "default", "reviews.default.svc.cluster.local"),
        ("reviews.prod", "default", "reviews.prod"),
        ("reviews.prod.svc", "default", "reviews.prod.svc"),
        ("Reviews", "prod", "reviews.prod.svc.cluster.local"),
        ("api.example.com", "default", "api.example.com"),
        ("*.example.com", "default", "*.example.com"),
    ],
)
def test_fqdn(host: str, namespace: str, expected: str) -> None:
    assert fqdn(host, namespace) == expected


def test_host_covers() -> None:
    assert host_covers("*", "anything")
    assert host_covers("*.example.com", "a.example.com")
    assert not host_covers("*.example.com", "example.org")
    assert not host_covers("a.example.com", "b.example.com")


TCP = VS + "  tcp:\n"
CONNECTION_CASES = [
    (
        "tcp rule shadowed by a match-less one",
        DR
        + TCP
        + "  - route: [{destination: {host: reviews}}]\n"
        + "  - match: [{port: 9000}]\n    route: [{destination: {host: reviews, subset: v1}}]\n",
        [
            "mesh.yaml:15:5: warning: tcp[1] is never reached: tcp[0] above it matches every connection "
            "(VirtualService/reviews tcp[1])"
        ],
    ),
    (
        "tcp rule shadowed by an empty match, and a subset no DestinationRule defines",
        DR
        + TCP
        + "  - match: [{port: 9000}, {}]\n    route: [{destination: {host: reviews, subset: v2}}]\n"
        + "  - route: [{destination: {host: reviews}}]\n",
        [
            "mesh.yaml:15:51: warning: subset 'v2' of host reviews is defined in no DestinationRule; requests to it "
            "get 503 no healthy upstream (VirtualService/reviews tcp[0].route[0].destination.subset)",
            "mesh.yaml:16:5: warning: tcp[1] is never reached: tcp[0] above it matches every connection "
            "(VirtualService/reviews tcp[1])",
        ],
    ),
    (
        "tls destinations are cross-referenced; rules with sniHosts shadow nothing",
        VS.replace("[reviews]", "[api.example.com]")
        + "  tls:\n"
        + "  - match: [{sniHosts: [api.example.com]}]\n    route: [{destination: {host: ghost.example.com}}]\n"
        + "  - match: [{sniHosts: [www.example.com]}]\n    route: [{destination: {host: ghost.example.com}}]\n",
        [
            "mesh.yaml:8:34: warning: host 'ghost.example.com' is defined in none of the given files (no Service "
            "or DestinationRule) (VirtualService/reviews tls[0].route[0].destination.host)",
            "mesh.yaml:10:34: warning: host 'ghost.example.com' is defined in none of the given files (no Service "
            "or DestinationRule) (VirtualService/reviews tls[1].route[0].destination.host)",
        ],
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), CONNECTION_CASES, ids=[c[0] for c in CONNECTION_CASES])
def test_tcp_and_tls_rules_are_checked_like_http(case: str, text: str, expected: list[str]) -> None:
    assert findings(text) == expected


def test_tcp_and_tls_routing_is_enforced_so_neither_is_warned_about() -> None:
    text = textwrap.dedent(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: api}
        spec:
          hosts: [api.example.com]
          tcp:
          - match: [{port: 9000, sourceLabels: {app: sleep}, destinationSubnets: [10.0.0.0/8]}]
            route: [{destination: {host: api.example.com, port: {number: 9000}}, weight: 100}]
          tls:
          - match: [{sniHosts: [api.example.com], port: 443, sourceLabels: {app: sleep}}]
            route: [{destination: {host: api.example.com, port: {number: 443}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: api}
        spec:
          hosts: [api.example.com]
          ports: [{number: 443, name: tls, protocol: TLS}, {number: 9000, name: tcp, protocol: TCP}]
          resolution: DNS
        """
    )
    documents, problems = parse_text(text, "mesh.yaml")
    loaded = load_layers([documents], problems)
    every = [str(p) for p in (*loaded.problems, *check_mesh(loaded.mesh, loaded.documents))]
    assert every == []
