"""Container records → workloads: labels, ports, readiness and the one-line reasons to skip."""

from __future__ import annotations

from typing import Any

import pytest

from minimesh.config.labels import ServicePortSpec
from minimesh.dataplane.capture.netns import capture_rules
from minimesh.registry.docker import Skipped, aliases_of, ready, workload_of
from minimesh.registry.model import Origin, Workload


def record(labels: dict[str, str], *, exposed: tuple[str, ...] = ("9080/tcp",), ip: str = "172.18.0.5",
           running: bool = True, health: str | None = None, pid: int = 4242) -> dict[str, Any]:  # fmt: skip
    state: dict[str, Any] = {"Running": running, "Pid": pid}
    if health is not None:
        state["Health"] = {"Status": health}
    return {
        "Id": "0123456789abcdef",
        "Name": "/bookinfo-reviews-v2-1",
        "Config": {"Labels": labels, "ExposedPorts": {port: {} for port in exposed}},
        "State": state,
        "NetworkSettings": {"Networks": {"bookinfo_default": {"IPAddress": ip, "Aliases": ["reviews", "abc123"]}}},
    }


def test_a_labelled_container_is_a_workload() -> None:
    found = workload_of(
        record({"minimesh.service": "reviews", "app": "reviews", "version": "v2", "com.docker.compose.service": "x"})
    )
    assert found == Workload(
        name="bookinfo-reviews-v2-1",
        address="172.18.0.5",
        namespace="default",
        labels=(("app", "reviews"), ("version", "v2")),
        service_account="reviews",
        service="reviews",
        service_ports=(ServicePortSpec(9080),),
        inject=True,
        netns="/proc/4242/ns/net",
        origin=Origin.CONTAINER,
    )
    assert isinstance(found, Workload)
    assert found.identity == "spiffe://cluster.local/ns/default/sa/reviews"


def test_labels_override_the_defaults() -> None:
    found = workload_of(
        record(
            {
                "minimesh.service": "ratings",
                "minimesh.port": "http:9080,tcp:3306",
                "minimesh.namespace": "prod",
                "minimesh.serviceaccount": "bookinfo-ratings",
                "minimesh.inject": "false",
            }
        )
    )
    assert isinstance(found, Workload)
    assert found.service_ports == (ServicePortSpec(9080, "http"), ServicePortSpec(3306, "tcp"))
    assert (found.namespace, found.inject) == ("prod", False)
    assert found.identity == "spiffe://cluster.local/ns/prod/sa/bookinfo-ratings"


def test_a_container_without_the_service_label_is_not_in_the_mesh() -> None:
    assert workload_of(record({"app": "db"})) is None


@pytest.mark.parametrize(
    ("labels", "exposed", "reason"),
    [
        ({"minimesh.service": "reviews", "minimesh.port": "http:nine"}, ("9080/tcp",),
         "label minimesh.port: 'http:nine' is not a port; write [PROTOCOL:]PORT, e.g. http:9080"),
        ({"minimesh.service": "reviews", "minimesh.port": "smtp:25"}, ("9080/tcp",),
         "label minimesh.port: unknown protocol 'smtp' in 'smtp:25'; use one of grpc, grpc-web, http, http2, https, mongo, mysql, redis, tcp, tls, udp"),
        ({"minimesh.service": "reviews"}, (),
         "no port: set label minimesh.port (e.g. http:9080) or EXPOSE one in the image"),
        ({"minimesh.service": "reviews", "minimesh.inject": "maybe"}, ("9080/tcp",),
         "label minimesh.inject must be true or false, got 'maybe'"),
        ({"minimesh.service": " "}, ("9080/tcp",), "label minimesh.service is empty; set it to the service name"),
    ],
)  # fmt: skip
def test_bad_labels_skip_the_container_with_one_line(
    labels: dict[str, str], exposed: tuple[str, ...], reason: str
) -> None:
    found = workload_of(record(labels, exposed=exposed))
    assert found == Skipped("bookinfo-reviews-v2-1", reason)
    assert str(found).startswith("container bookinfo-reviews-v2-1 is not in the mesh: ")


def test_readiness_follows_the_health_check() -> None:
    assert ready(record({}))
    assert not ready(record({}, running=False))
    assert not ready(record({}, health="starting"))
    assert ready(record({}, health="healthy"))


def test_aliases() -> None:
    assert aliases_of(record({})) == ("reviews", "abc123")


def test_capture_rules_are_istio_inits() -> None:
    assert capture_rules([9080], owner=4242).splitlines() == [
        "*nat",
        ":MINIMESH_OUTPUT - [0:0]",
        ":MINIMESH_INBOUND - [0:0]",
        '-A OUTPUT -p tcp -m comment --comment "minimesh:4242" -j MINIMESH_OUTPUT',
        "-A MINIMESH_OUTPUT -m mark --mark 0x539 -j RETURN",
        "-A MINIMESH_OUTPUT -d 127.0.0.0/8 -j RETURN",
        "-A MINIMESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        '-A PREROUTING -p tcp -m comment --comment "minimesh:4242" -j MINIMESH_INBOUND',
        "-A MINIMESH_INBOUND -p tcp --dport 9080 -j REDIRECT --to-ports 15006",
        "COMMIT",
    ]
