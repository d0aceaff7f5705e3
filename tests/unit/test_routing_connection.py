"""Deciding one captured connection: the handling its destination port gets (`plan`), the
service it reaches (`service_at`), and the `tcp[]`/`tls[]` rule, split and cluster it takes."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from minimesh.config import model as m
from minimesh.config.labels import ServicePortSpec
from minimesh.registry.model import Workload
from minimesh.routing.compile import compile_snapshot
from minimesh.routing.connection import (
    Plan,
    decide_connection,
    handling_of,
    inbound_plan,
    plan,
    service_at,
    trace_connection,
)
from minimesh.routing.offline import placeholders
from minimesh.routing.snapshot import (
    BlackHole,
    Connect,
    ConnectionFacts,
    ConnectionOutcome,
    MeshService,
    PassThrough,
    Snapshot,
)
from tests.unit.test_routing_compile import load_mesh

FQDN = "{}.default.svc.cluster.local"


def instance(name: str, service: str, version: str, address: str, *ports: ServicePortSpec) -> Workload:
    labels = m.labels_of({"app": service, "version": version})
    return Workload(name=name, address=address, labels=labels, service=service, service_ports=ports)


WORKLOADS = (
    instance("tcp-echo-v1", "tcp-echo", "v1", "10.0.1.1", ServicePortSpec(9000, "tcp")),
    instance("tcp-echo-v2", "tcp-echo", "v2", "10.0.1.2", ServicePortSpec(9000, "tcp")),
    instance("reviews-v1", "reviews", "v1", "10.0.0.5", ServicePortSpec(9080, "http")),
    instance("legacy-v1", "legacy", "v1", "10.0.0.9", ServicePortSpec(7000)),
    instance("mysqldb-v1", "mysqldb", "v1", "10.0.0.10", ServicePortSpec(3306, "mysql")),
)
SLEEP = {"app": "sleep"}

SUBSETS = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcp-echo}
spec:
  host: tcp-echo
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
"""

SPLIT = (
    SUBSETS
    + """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo}
spec:
  hosts: [tcp-echo]
  tcp:
  - match: [{port: 9000}]
    route:
    - {destination: {host: tcp-echo, subset: v1}, weight: V1}
    - {destination: {host: tcp-echo, subset: v2}, weight: V2}
"""
)

ENTRIES = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: [db.example.com]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy-db}
spec:
  hosts: [legacy-db.example.com]
  addresses: [192.0.2.10]
  ports: [{number: 3306, name: mysql, protocol: MYSQL}]
  resolution: STATIC
  endpoints: [{address: 198.51.100.7}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wildcard}
spec:
  hosts: ["*.example.org"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
"""


def mesh_of(*texts: str, mode: str = "ALLOW_ANY") -> Snapshot:
    config = f"apiVersion: minimesh.dev/v1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec: {{outboundTrafficPolicy: {{mode: {mode}}}}}\n"
    return compile_snapshot(load_mesh("---\n".join((config, *texts))), WORKLOADS)


def facts(address: str, port: int, *, sni: str | None = None, labels: dict[str, str] | None = None) -> ConnectionFacts:
    return ConnectionFacts(address, port, sni, "mesh", labels, "default" if labels is not None else None)


def reached(snap: Snapshot, address: str, port: int, sni: str | None) -> MeshService | None:
    """The service a connection reaches (`service_at` without the service port)."""
    found = service_at(snap, address, port, sni)
    return found[0] if found is not None else None


def decide(snap: Snapshot, address: str, port: int, **kwargs: object) -> ConnectionOutcome:
    sni = kwargs.get("sni")
    assert sni is None or isinstance(sni, str)
    labels = kwargs.get("labels")
    assert labels is None or isinstance(labels, dict)
    service = reached(snap, address, port, sni)
    return decide_connection(snap, service, facts(address, port, sni=sni, labels=labels), random.Random(7))


def connect(outcome: ConnectionOutcome) -> Connect:
    assert isinstance(outcome, Connect), outcome
    return outcome


def host_of(found: MeshService | None) -> str | None:
    return found.host if found is not None else None


# ---------------------------------------------------------------- plan: how a port is served


@pytest.mark.parametrize(
    ("address", "port", "handling", "host", "protocol"),
    [
        ("10.0.1.1", 9000, "tcp", FQDN.format("tcp-echo"), "TCP"),
        ("10.0.0.10", 3306, "tcp", FQDN.format("mysqldb"), "MYSQL"),
        ("10.0.0.5", 9080, "http", FQDN.format("reviews"), "HTTP"),
        ("10.0.0.9", 7000, "detect", FQDN.format("legacy"), "AUTO"),
        ("203.0.113.9", 9080, "detect", None, "AUTO"),
        ("203.0.113.9", 12345, "passthrough", None, "AUTO"),
        ("203.0.113.9", 5432, "tcp", "db.example.com", "TCP"),
        ("192.0.2.10", 3306, "tcp", "legacy-db.example.com", "MYSQL"),
        ("203.0.113.9", 443, "tls", None, "TLS"),
    ],
)
def test_plan_serves_each_port_in_its_protocol(
    address: str, port: int, handling: str, host: str | None, protocol: str
) -> None:
    found = plan(mesh_of(ENTRIES), address, port)
    assert (found.handling, host_of(found.service), found.protocol) == (handling, host, protocol)


def test_plan_under_registry_only_sniffs_an_unknown_destination_to_refuse_it() -> None:
    assert plan(mesh_of(mode="REGISTRY_ONLY"), "203.0.113.9", 12345) == Plan("detect", None)
    assert plan(mesh_of(), "203.0.113.9", 12345) == Plan("passthrough", None)


@pytest.mark.parametrize(
    ("protocol", "handling"),
    [("HTTP", "http"), ("GRPC-WEB", "http"), ("HTTP2", "http"), ("GRPC", "http"), ("HTTPS", "tls"), ("TLS", "tls"),
     ("TCP", "tcp"), ("MONGO", "tcp"), ("REDIS", "tcp"), ("AUTO", "detect")],
)  # fmt: skip
def test_handling_of_each_protocol(protocol: str, handling: str) -> None:
    assert handling_of(protocol) == handling


def test_inbound_serves_a_workload_port_in_its_protocol_and_sniffs_the_rest() -> None:
    snap = mesh_of()
    by_name = {w.name: w for w in WORKLOADS}
    assert inbound_plan(snap, by_name["tcp-echo-v1"], 9000) == "tcp"
    assert inbound_plan(snap, by_name["reviews-v1"], 9080) == "http"
    assert inbound_plan(snap, by_name["legacy-v1"], 7000) == "detect"
    assert inbound_plan(snap, by_name["reviews-v1"], 15020) == "detect"


# ---------------------------------------------------------------- outside the registry


def test_allow_any_passes_an_unknown_destination_through_and_registry_only_blocks_it() -> None:
    assert decide(mesh_of(), "203.0.113.9", 6379) == PassThrough("203.0.113.9", 6379)
    assert decide(mesh_of(mode="REGISTRY_ONLY"), "203.0.113.9", 6379) == BlackHole("203.0.113.9", 6379)


def test_a_port_the_service_does_not_have_follows_the_outbound_policy() -> None:
    """An endpoint's address on a port no service port claims is no service's: Istio has no
    listener there, so ALLOW_ANY passes it through and REGISTRY_ONLY blocks it."""
    reviews = mesh_of().services[FQDN.format("reviews")]
    outcome = decide_connection(mesh_of(), reviews, facts("10.0.0.5", 8081), random.Random(1))
    assert outcome == PassThrough("10.0.0.5", 8081)
    only = mesh_of(mode="REGISTRY_ONLY")
    assert decide_connection(only, reviews, facts("10.0.0.5", 8081), random.Random(1)) == BlackHole("10.0.0.5", 8081)


# ---------------------------------------------------------------- tcp[] rules


def test_a_service_without_tcp_rules_takes_its_default_route_to_every_endpoint() -> None:
    outcome = connect(decide(mesh_of(SUBSETS), "10.0.1.2", 9000))
    assert outcome.route_ref == "default"
    assert outcome.cluster.name == "outbound|9000||" + FQDN.format("tcp-echo")
    assert [e.address for e in outcome.cluster.endpoints] == ["10.0.1.1", "10.0.1.2"]


def test_tcp_weights_split_connections_by_a_seeded_draw() -> None:
    snap = mesh_of(SPLIT.replace("V1", "80").replace("V2", "20"))
    service = reached(snap, "10.0.1.1", 9000, None)
    rng = random.Random(11)
    counts = Counter(
        connect(decide_connection(snap, service, facts("10.0.1.1", 9000), rng)).cluster.subset for _ in range(2000)
    )
    assert set(counts) == {"v1", "v2"}
    assert 1520 <= counts["v1"] <= 1680, counts
    first = connect(decide_connection(snap, service, facts("10.0.1.1", 9000), random.Random(3)))
    again = connect(decide_connection(snap, service, facts("10.0.1.1", 9000), random.Random(3)))
    assert first.cluster.subset == again.cluster.subset
    assert first.draw is not None and first.draw.weights == (80, 20)


@pytest.mark.parametrize(("v1", "v2", "subset"), [("100", "0", "v1"), ("0", "100", "v2")])
def test_a_zero_weight_destination_gets_no_connection(v1: str, v2: str, subset: str) -> None:
    snap = mesh_of(SPLIT.replace("V1", v1).replace("V2", v2))
    rng = random.Random(5)
    service = reached(snap, "10.0.1.1", 9000, None)
    picked = {connect(decide_connection(snap, service, facts("10.0.1.1", 9000), rng)).cluster.subset for _ in range(50)}
    assert picked == {subset}


def rules(match: str) -> Snapshot:
    return mesh_of(
        SUBSETS
        + f"""\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: tcp-echo}}
spec:
  hosts: [tcp-echo]
  tcp:
  - match: [{match}]
    route: [{{destination: {{host: tcp-echo, subset: v2}}}}]
  - route: [{{destination: {{host: tcp-echo, subset: v1}}}}]
"""
    )


@pytest.mark.parametrize(
    ("match", "address", "labels", "subset"),
    [
        ("{port: 9000}", "10.0.1.1", None, "v2"),
        ("{port: 9001}", "10.0.1.1", None, "v1"),
        ("{sourceLabels: {app: sleep}}", "10.0.1.1", SLEEP, "v2"),
        ("{sourceLabels: {app: sleep}}", "10.0.1.1", {"app": "web"}, "v1"),
        ("{sourceLabels: {app: sleep}}", "10.0.1.1", None, "v1"),
        ("{destinationSubnets: [10.0.1.0/24]}", "10.0.1.1", None, "v2"),
        ("{destinationSubnets: [10.0.1.2/32]}", "10.0.1.1", None, "v1"),
        ("{port: 9000, sourceLabels: {app: sleep}}", "10.0.1.1", None, "v1"),
    ],
)
def test_tcp_match_on_port_source_labels_and_destination_subnets(
    match: str, address: str, labels: dict[str, str] | None, subset: str
) -> None:
    assert connect(decide(rules(match), address, 9000, labels=labels)).cluster.subset == subset


def test_the_trace_says_why_each_tcp_rule_missed_or_held() -> None:
    snap = rules("{port: 9001}, {sourceLabels: {app: sleep}}")
    service = reached(snap, "10.0.1.1", 9000, None)
    outcome, steps = trace_connection(snap, service, facts("10.0.1.1", 9000, labels={"app": "web"}), random.Random(1))
    lines = [str(step) for step in steps]
    assert lines[:4] == [
        "host info: 10.0.1.1:9000 → tcp-echo.default.svc.cluster.local port 9000/TCP",
        "VirtualService/default/tcp-echo match: host tcp-echo.default.svc.cluster.local",
        "tcp[0] miss: match[0]: port 9001 — connection is to port 9000; "
        "match[1]: sourceLabels app=sleep — source does not carry them",
        "tcp[1] match: no match conditions",
    ]
    assert connect(outcome).route_ref == "VirtualService/default/tcp-echo#tcp[1]"
    assert (
        lines[4]
        == "cluster info: outbound|9000|v1|tcp-echo.default.svc.cluster.local: endpoints 10.0.1.1:9000 (tcp-echo-v1)"
    )


# ---------------------------------------------------------------- tls[] rules and ServiceEntries


TLS_RULES = """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api.example.com]
  tls:
  - match: [{sniHosts: ["*.example.com"], port: 8443}]
    route: [{destination: {host: db.example.com, port: {number: 5432}}}]
  - match: [{sniHosts: ["*.example.com"]}]
    route: [{destination: {host: api.example.com, port: {number: 443}}}]
"""


@pytest.mark.parametrize(
    ("sni", "host"),
    [
        ("api.example.com", "api.example.com"),
        ("API.example.com".lower(), "api.example.com"),
        ("a.example.org", "*.example.org"),
        ("deep.a.example.org", "*.example.org"),
        ("example.org", None),
        ("other.net", None),
    ],
)
def test_a_tls_connection_reaches_the_tls_service_entry_its_sni_names(sni: str, host: str | None) -> None:
    assert host_of(reached(mesh_of(ENTRIES), "203.0.113.9", 443, sni)) == host


def test_tls_rules_match_sni_hosts_with_wildcards() -> None:
    snap = mesh_of(ENTRIES + TLS_RULES)
    outcome = connect(decide(snap, "203.0.113.9", 443, sni="api.example.com"))
    assert outcome.route_ref == "VirtualService/default/api#tls[1]"
    assert outcome.cluster.name == "outbound|443||api.example.com"
    service = reached(snap, "203.0.113.9", 443, "api.example.com")
    _, steps = trace_connection(snap, service, facts("203.0.113.9", 443, sni="api.example.com"), random.Random(1))
    assert str(steps[2]) == "tls[0] miss: match[0]: port 8443 — connection is to port 443"
    assert str(steps[3]) == "tls[1] match: match[0]: sniHosts *.example.com"


def test_a_tls_rule_does_not_take_an_sni_its_hosts_do_not_cover() -> None:
    snap = mesh_of(
        ENTRIES
        + TLS_RULES.replace(
            '["*.example.com"]}]\n    route: [{destination: {host: api',
            '["www.example.com"]}]\n    route: [{destination: {host: api',
        )
    )
    service = snap.services["api.example.com"]
    outcome, steps = trace_connection(snap, service, facts("203.0.113.9", 443, sni="api.example.com"), random.Random(1))
    assert connect(outcome).route_ref == "default"
    assert "sniHosts www.example.com — connection offers SNI api.example.com" in str(steps[3])


def test_service_entry_resolutions_decide_where_a_connection_goes() -> None:
    snap = mesh_of(ENTRIES)
    none = connect(decide(snap, "203.0.113.9", 5432)).cluster
    assert none.original_destination
    static = connect(decide(snap, "192.0.2.10", 3306)).cluster
    assert not static.original_destination
    assert [(e.address, e.port) for e in static.endpoints] == [("198.51.100.7", 3306)]
    dns = connect(decide(snap, "203.0.113.9", 443, sni="api.example.com")).cluster
    assert dns.original_destination, "a captured connection goes to the address the app resolved"
    assert [(e.address, e.port) for e in dns.endpoints] == [("api.example.com", 443)]
    wildcard = connect(decide(snap, "203.0.113.9", 443, sni="a.example.org")).cluster
    assert wildcard.original_destination and wildcard.endpoints == ()


def test_an_address_a_service_entry_lists_is_that_service_on_its_ports_only() -> None:
    snap = mesh_of(ENTRIES)
    assert host_of(reached(snap, "192.0.2.10", 3306, None)) == "legacy-db.example.com"
    assert reached(snap, "192.0.2.10", 3307, None) is None
    assert host_of(reached(snap, "198.51.100.99", 5432, None)) == "db.example.com"
    assert service_at(snap, "198.51.100.99", 443, None) is None


def test_offline_placeholders_stand_in_for_hosts_tcp_and_tls_rules_route_to() -> None:
    mesh = load_mesh(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: db}
        spec:
          hosts: [db.example.com]
          tcp:
          - route: [{destination: {host: mysqldb, port: {number: 3306}}}]
          tls:
          - match: [{sniHosts: [db.example.com]}]
            route: [{destination: {host: tls-proxy}}]
        """
    )
    found = {w.name: [spec.number for spec in w.service_ports] for w in placeholders(mesh, (), [7000])}
    assert found == {"mysqldb-0": [80, 3306, 7000], "tls-proxy-0": [80, 7000]}
