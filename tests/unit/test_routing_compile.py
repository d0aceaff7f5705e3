"""Compiling config + workloads into a Snapshot: services, endpoints, clusters and the
DestinationRule policy merged for each (host, subset, port), as Istio builds them."""

from __future__ import annotations

import json
import textwrap

import pytest

from minimesh.admin.config_dump import snapshot_json
from minimesh.config import model as m
from minimesh.config.labels import ServicePortSpec
from minimesh.config.load import load_layers
from minimesh.config.names import gateway_ref
from minimesh.config.source import parse_text
from minimesh.registry.model import Workload
from minimesh.registry.static import workloads_of
from minimesh.routing.compile import compile_snapshot, retry_policy
from minimesh.routing.retry import RetryPolicy
from minimesh.routing.snapshot import Snapshot
from tests.conftest import BOOKINFO

FQDN = "{}.default.svc.cluster.local"


def load_mesh(*texts: str) -> m.Mesh:
    """Each text is one layer (a later one replaces documents of the same name)."""
    layers = []
    for i, text in enumerate(texts):
        documents, problems = parse_text(textwrap.dedent(text), f"layer{i}.yaml" if i else "mesh.yaml")
        assert problems == []
        layers.append(documents)
    loaded = load_layers(layers)
    assert [str(p) for p in loaded.errors] == []
    return loaded.mesh


def workload(
    name: str,
    service: str | None = None,
    version: str | None = None,
    *,
    address: str = "10.0.0.1",
    namespace: str = "default",
    ports: tuple[int, ...] = (9080,),
    labels: tuple[tuple[str, str], ...] = (),
    named_ports: tuple[tuple[str, int], ...] = (),
) -> Workload:
    base = {"app": service or name, **({"version": version} if version else {}), **dict(labels)}
    return Workload(
        name=name,
        address=address,
        namespace=namespace,
        labels=m.labels_of(base),
        service=service,
        service_ports=tuple(ServicePortSpec(p) for p in ports) if service else (),
        named_ports=named_ports,
    )


BOOKINFO_WORKLOADS = (
    workload("productpage-v1", "productpage", "v1", address="10.0.0.2"),
    workload("details-v1", "details", "v1", address="10.0.0.3"),
    workload("ratings-v1", "ratings", "v1", address="10.0.0.4"),
    workload("reviews-v1", "reviews", "v1", address="10.0.0.5"),
    workload("reviews-v2", "reviews", "v2", address="10.0.0.6"),
    workload("reviews-v3", "reviews", "v3", address="10.0.0.7"),
)
PRODUCTPAGE = BOOKINFO_WORKLOADS[0]


def bookinfo(*extra: str, workloads: tuple[Workload, ...] = BOOKINFO_WORKLOADS) -> Snapshot:
    """The bookinfo mesh.yaml, with `extra` texts or variant file names layered over it."""
    texts = [(BOOKINFO / "mesh.yaml").read_text()]
    for item in extra:
        path = BOOKINFO / "variants" / item
        texts.append(path.read_text() if item.endswith(".yaml") and path.exists() else item)
    return compile_snapshot(load_mesh(*texts), workloads, generation=1)


def snapshot(text: str, workloads: tuple[Workload, ...] = BOOKINFO_WORKLOADS) -> Snapshot:
    return compile_snapshot(load_mesh(text), workloads)


# ---------------------------------------------------------------- services and endpoints


def test_bookinfo_services_come_from_labels() -> None:
    snap = bookinfo()
    assert sorted(snap.services) == sorted(FQDN.format(s) for s in ("productpage", "details", "ratings", "reviews"))
    reviews = snap.services[FQDN.format("reviews")]
    assert [p.number for p in reviews.ports] == [9080]
    assert [e.address for e in reviews.endpoints[9080]] == ["10.0.0.5", "10.0.0.6", "10.0.0.7"]
    assert reviews.origin == "label minimesh.service"


def test_every_subset_of_a_destination_rule_is_a_cluster() -> None:
    snap = bookinfo()
    names = [n for n in snap.clusters if n.endswith("reviews.default.svc.cluster.local")]
    assert names == [
        "outbound|9080||reviews.default.svc.cluster.local",
        "outbound|9080|v1|reviews.default.svc.cluster.local",
        "outbound|9080|v2|reviews.default.svc.cluster.local",
        "outbound|9080|v3|reviews.default.svc.cluster.local",
    ]
    v2 = snap.clusters["outbound|9080|v2|reviews.default.svc.cluster.local"]
    assert [e.workload.name for e in v2.endpoints if e.workload] == ["reviews-v2"]
    assert (v2.short, v2.namespace, v2.subset, v2.port, v2.selector) == (
        "reviews",
        "default",
        "v2",
        9080,
        (("version", "v2"),),
    )
    assert repr(v2) == "<Cluster outbound|9080|v2|reviews.default.svc.cluster.local endpoints=1 lb=LEAST_REQUEST>"


SERVICE_WITH_ENTRIES = """\
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1}
spec: {address: 127.0.0.1, ports: {http: 9181}, labels: {app: reviews, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v2}
spec: {address: 127.0.0.1, ports: {http: 9182}, labels: {app: reviews, version: v2}}
"""


def test_a_service_document_selects_workload_entries_by_their_named_ports() -> None:
    mesh = load_mesh(SERVICE_WITH_ENTRIES)
    snap = compile_snapshot(mesh, workloads_of(mesh))
    reviews = snap.services[FQDN.format("reviews")]
    assert reviews.origin == "Service/default/reviews"
    assert [str(p) for p in reviews.ports] == ["9080/HTTP (http)"]
    assert [(e.address, e.port) for e in reviews.endpoints[9080]] == [("127.0.0.1", 9181), ("127.0.0.1", 9182)]


WEB_SERVICE = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [PORT]\n"


@pytest.mark.parametrize(
    ("port_spec", "named_ports", "expected"),
    [
        ("{name: http, port: 9080, targetPort: 8080}", (), 8080),
        ("{name: http, port: 9080, targetPort: web}", (("web", 8181),), 8181),
        ("{name: http, port: 9080, targetPort: web}", (), None),
        ("{name: http, port: 9080}", (("http", 9182),), 9182),
        ("{name: http, port: 9080}", (), 9080),
        ("{port: 9080}", (), 9080),
    ],
)
def test_service_target_ports(port_spec: str, named_ports: tuple[tuple[str, int], ...], expected: int | None) -> None:
    mesh = load_mesh(WEB_SERVICE.replace("PORT", port_spec))
    app = workload("web-1", labels=(("app", "web"),), named_ports=named_ports)
    endpoints = compile_snapshot(mesh, [app]).services[FQDN.format("web")].endpoints[9080]
    assert [e.port for e in endpoints] == ([expected] if expected else [])


def test_workloads_in_another_namespace_are_another_service() -> None:
    snap = compile_snapshot(m.Mesh(), [workload("a", "api"), workload("b", "api", namespace="prod")])
    assert sorted(snap.services) == ["api.default.svc.cluster.local", "api.prod.svc.cluster.local"]
    assert snap.service_for("api", "prod") is snap.services["api.prod.svc.cluster.local"]
    assert snap.service_for("api.prod") is snap.services["api.prod.svc.cluster.local"]
    assert snap.service_for("api.default.svc") is snap.services["api.default.svc.cluster.local"]


SERVICE_ENTRIES = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: static}
spec:
  hosts: [db.example.com]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.1.0.1}, {address: 10.1.0.2, labels: {zone: b}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns}
spec:
  hosts: [httpbin.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms}
spec:
  hosts: [legacy.internal]
  location: MESH_INTERNAL
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: legacy}}
"""


def test_service_entries_define_hosts_ports_and_endpoints() -> None:
    legacy = workload("legacy-vm", labels=(("app", "legacy"),), address="192.168.1.9", named_ports=(("http", 18080),))
    snap = compile_snapshot(load_mesh(SERVICE_ENTRIES), [legacy])
    db = snap.services["db.example.com"]
    assert [(e.address, e.port, e.labels) for e in db.endpoints[5432]] == [
        ("10.1.0.1", 5432, ()),
        ("10.1.0.2", 5432, (("zone", "b"),)),
    ]
    assert db.external and db.ports[0].protocol == "TCP"
    assert [(e.workload, e.address, e.port) for e in snap.services["httpbin.org"].endpoints[80]] == [
        (None, "httpbin.org", 80)
    ]
    internal = snap.services["legacy.internal"]
    assert not internal.external
    assert [(e.address, e.port) for e in internal.endpoints[8080]] == [("192.168.1.9", 18080)]


# ---------------------------------------------------------------- DestinationRule policies

POLICY_LEVELS = """\
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}, {name: http-admin, port: 9081}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {maxConnections: 10}}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      outlierDetection: {consecutive5xxErrors: 3}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: LEAST_CONN}
      portLevelSettings:
      - port: {number: 9081}
        tls: {mode: SIMPLE}
"""


@pytest.mark.parametrize(
    ("subset", "port", "lb", "max_connections", "outlier", "tls", "origin"),
    [
        (None, 9081, "ROUND_ROBIN", 10, None, None, "top level"),
        (None, 9080, "RANDOM", None, None, None, "top level port 9080"),
        ("v1", 9081, "ROUND_ROBIN", 10, 3, None, "top level, subset v1"),
        ("v1", 9080, "RANDOM", None, 3, None, "top level port 9080, subset v1"),
        ("v2", 9080, "LEAST_REQUEST", None, None, None, "top level port 9080, subset v2"),
        ("v2", 9081, "LEAST_REQUEST", None, None, "SIMPLE", "top level, subset v2 port 9081"),
    ],
)
def test_destination_rule_levels_merge_as_istio_merges_them(
    subset: str | None,
    port: int,
    lb: str,
    max_connections: int | None,
    outlier: int | None,
    tls: str | None,
    origin: str,
) -> None:
    snap = snapshot(POLICY_LEVELS, (workload("r1", labels=(("app", "reviews"), ("version", "v1"))),))
    policy = snap.clusters[f"outbound|{port}|{subset or ''}|reviews.default.svc.cluster.local"].policy
    assert policy.load_balancer.simple == lb
    assert policy.connection_pool.max_connections == max_connections
    assert (policy.outlier_detection.consecutive_5xx_errors if policy.outlier_detection else None) == outlier
    assert (policy.tls.mode if policy.tls else None) == tls
    assert policy.origin == f"DestinationRule/default/reviews {origin}"


def test_load_balancer_defaults_to_least_request() -> None:
    snap = bookinfo()
    for cluster in snap.clusters.values():
        assert cluster.policy.load_balancer == m.LoadBalancer(simple="LEAST_REQUEST")
        assert cluster.policy.connection_pool == m.ConnectionPool()
        assert cluster.policy.outlier_detection is None


DR_PRECEDENCE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: wildcard}
spec:
  host: "*.default.svc.cluster.local"
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings-elsewhere, namespace: other}
spec:
  host: ratings.default.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details}
spec:
  host: details
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details-more}
spec:
  host: details.default.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: other-ns-only, namespace: other}
spec:
  host: productpage.default.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
"""


def test_destination_rule_precedence() -> None:
    snap = snapshot(DR_PRECEDENCE)
    lb = {c.name: c.policy.load_balancer for c in snap.clusters.values()}
    # the service's own namespace beats a more specific host elsewhere
    assert lb["outbound|9080||ratings.default.svc.cluster.local"].simple == "RANDOM"
    # two rules for one host in one namespace merge: the first policy, every subset
    details = lb["outbound|9080||details.default.svc.cluster.local"]
    assert details.consistent_hash == m.ConsistentHash(http_header_name="x-user")
    assert "outbound|9080|v1|details.default.svc.cluster.local" in snap.clusters
    # an exact host beats the wildcard
    assert lb["outbound|9080||reviews.default.svc.cluster.local"].simple == "RANDOM"
    assert lb["outbound|9080||productpage.default.svc.cluster.local"].simple == "RANDOM"


def test_a_destination_rule_elsewhere_applies_when_the_service_namespace_has_none() -> None:
    text = DR_PRECEDENCE.split("---\n")[-1]
    snap = snapshot(text)
    assert snap.clusters["outbound|9080||productpage.default.svc.cluster.local"].policy.load_balancer.simple == (
        "ROUND_ROBIN"
    )


def test_unknown_subsets_and_hosts_get_empty_clusters_that_say_why() -> None:
    snap = bookinfo(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews}
        spec:
          hosts: [reviews]
          http:
          - route:
            - {destination: {host: reviews, subset: v9}, weight: 50}
            - {destination: {host: nowhere.example.com, port: {number: 80}}, weight: 50}
        """
    )
    v9 = snap.clusters["outbound|9080|v9|reviews.default.svc.cluster.local"]
    assert v9.endpoints == ()
    assert v9.problem == "no DestinationRule defines subset v9 for reviews.default.svc.cluster.local"
    nowhere = snap.clusters["outbound|80||nowhere.example.com"]
    assert nowhere.problem == "host nowhere.example.com is no service or ServiceEntry in the registry"


# ---------------------------------------------------------------- retries, gateways, dump


@pytest.mark.parametrize(
    ("retry", "expected"),
    [
        (m.DEFAULT_RETRY, RetryPolicy(2, m.DEFAULT_RETRY_ON, (503,))),
        (m.HTTPRetry(attempts=0), None),
        (m.HTTPRetry(attempts=5, per_try_timeout=1.0), RetryPolicy(5, m.DEFAULT_RETRY_ON, (503,), 1.0)),
        (
            m.HTTPRetry(attempts=5, retry_on=m.DEFAULT_RETRY_ON),
            RetryPolicy(5, m.DEFAULT_RETRY_ON, ()),
        ),
        (m.HTTPRetry(attempts=3, retry_on=("5xx",)), RetryPolicy(3, ("5xx",), ())),
        (
            m.HTTPRetry(attempts=3, retry_on=("gateway-error", "429")),
            RetryPolicy(3, ("gateway-error", "retriable-status-codes"), (429,)),
        ),
    ],
)
def test_retry_policies_are_converted_as_istio_does(retry: m.HTTPRetry, expected: RetryPolicy | None) -> None:
    assert retry_policy(retry) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mesh", "mesh"),
        ("bookinfo-gateway", "default/bookinfo-gateway"),
        ("istio-system/ingress", "istio-system/ingress"),
        ("./ingress", "prod/ingress"),
        ("ingress.istio-system.svc.cluster.local", "istio-system/ingress"),
    ],
)
def test_gateway_names_resolve_in_the_virtual_service_namespace(name: str, expected: str) -> None:
    assert gateway_ref(name, "prod" if name.startswith(".") else "default") == expected


def test_gateways_selecting_a_workload() -> None:
    snap = bookinfo(
        """\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: egress, namespace: istio-system}
        spec:
          selector: {istio: egressgateway}
          servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
        """
    )
    assert snap.ingress_gateways == ("default/bookinfo-gateway",)
    assert snap.gateways_selecting({"istio": "egressgateway", "x": "y"}) == ("istio-system/egress",)
    assert snap.gateways_selecting({}) == ()


def test_config_dump_is_plain_json_with_source_locations() -> None:
    snap = bookinfo("virtual-service-reviews-jason-v2.yaml")
    dump = json.loads(json.dumps(snapshot_json(snap)))
    assert dump["generation"] == 1
    reviews = next(vs for vs in dump["virtualServices"] if vs["ref"] == "VirtualService/default/reviews")
    assert [rule["location"] for rule in reviews["http"]] == ["layer1.yaml:11:5", "layer1.yaml:19:5"]
    assert reviews["http"][0]["match"] == ["header end-user exact 'jason'"]
    assert reviews["http"][0]["route"] == [{"host": FQDN.format("reviews"), "subset": "v2", "port": 9080, "weight": 0}]
    service = next(s for s in dump["services"] if s["host"] == FQDN.format("reviews"))
    assert service["endpoints"]["9080"][1] == "10.0.0.6:9080 (reviews-v2)"
    assert {dr["ref"] for dr in dump["destinationRules"]} >= {"DestinationRule/default/reviews"}
    assert dump["gateways"][0]["servers"] == [{"port": 8080, "protocol": "HTTP", "hosts": ["*"]}]


def test_snapshot_repr_shows_its_state() -> None:
    assert (
        repr(bookinfo()) == "<Snapshot generation=1 services=4 clusters=11 virtual_services=5 gateways=1 workloads=6>"
    )
