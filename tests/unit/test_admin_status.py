"""`minimesh status` from the admin API's data: each service port with its protocol, and
whether the port declared it or leaves it to detection from the client's first bytes."""

from __future__ import annotations

import json

from minimesh.admin.app import cluster_json
from minimesh.admin.client import status_lines
from minimesh.config import model as m
from minimesh.config.labels import ServicePortSpec
from minimesh.registry.model import Workload
from minimesh.routing.compile import compile_snapshot
from tests.unit.test_routing_compile import load_mesh

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: ratings}
spec:
  selector: {app: ratings}
  ports: [{name: http-api, port: 9080}, {name: db, port: 3306, appProtocol: mysql}, {name: misc, port: 7000}]
"""


def workload(name: str, service: str | None, address: str, *ports: ServicePortSpec) -> Workload:
    return Workload(
        name=name,
        address=address,
        labels=m.labels_of({"app": name.split("-")[0]}),
        service=service,
        service_ports=ports,
    )


def clusters_json() -> list[dict[str, object]]:
    snap = compile_snapshot(
        load_mesh(SERVICE),
        (
            workload("ratings-v1", None, "10.0.0.4"),
            workload("tcp-echo-v1", "tcp-echo", "10.0.0.8", ServicePortSpec(9000, "tcp"), ServicePortSpec(9002)),
        ),
    )
    found = []
    for cluster in snap.clusters.values():
        service = snap.services[cluster.host]
        found.append(cluster_json(cluster, None, 0.0, service.port(cluster.port)))
    plain: list[dict[str, object]] = json.loads(json.dumps(found))
    return plain


def test_clusters_carry_the_protocol_of_their_service_port_and_whether_it_was_declared() -> None:
    by_name = {c["name"]: (c["protocol"], c["protocolDeclared"]) for c in clusters_json()}
    assert by_name == {
        "outbound|9080||ratings.default.svc.cluster.local": ("HTTP", True),
        "outbound|3306||ratings.default.svc.cluster.local": ("MYSQL", True),
        "outbound|7000||ratings.default.svc.cluster.local": ("AUTO", False),
        "outbound|9000||tcp-echo.default.svc.cluster.local": ("TCP", True),
        "outbound|9002||tcp-echo.default.svc.cluster.local": ("AUTO", False),
    }


def test_status_shows_each_port_declared_or_detected() -> None:
    dump = {"generation": 3, "loadedAt": "now", "sources": ["mesh.yaml"], "listeners": [], "workloads": []}
    lines = status_lines("http://127.0.0.1:15000", dump, clusters_json())
    services = lines[lines.index("services:") + 1 : lines.index("workloads:")]
    assert services == [
        "  ratings.default.svc.cluster.local:9080  HTTP (declared)  10.0.0.4:9080 ratings-v1 healthy",
        "  ratings.default.svc.cluster.local:3306  MYSQL (declared)  10.0.0.4:3306 ratings-v1 healthy",
        "  ratings.default.svc.cluster.local:7000  detected (sniffed)  10.0.0.4:7000 ratings-v1 healthy",
        "  tcp-echo.default.svc.cluster.local:9000  TCP (declared)  10.0.0.8:9000 tcp-echo-v1 healthy",
        "  tcp-echo.default.svc.cluster.local:9002  detected (sniffed)  10.0.0.8:9002 tcp-echo-v1 healthy",
    ]
