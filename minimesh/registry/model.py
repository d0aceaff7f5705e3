"""The registry's records: a `Workload` is one container or WorkloadEntry in the mesh (or a
placeholder for a service deciding offline does not know), and its `Origin`; the ingress
gateway is one too, as the peer it is to the sidecars it calls (`INGRESS_GATEWAY`).

Pure data: discovery (Docker labels, WorkloadEntry documents) produces these, and
routing.compile turns them into endpoints of services.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from minimesh.config.labels import ServicePortSpec
from minimesh.config.model import Labels


class Origin(StrEnum):
    """Where a workload comes from: a WorkloadEntry, a Docker container, or a placeholder that
    stands for an unknown service when deciding offline (`explain`, RouteTests)."""

    WORKLOAD_ENTRY = "WorkloadEntry"
    CONTAINER = "container"
    OFFLINE = "offline placeholder"


@dataclass(frozen=True, slots=True)
class Workload:
    """One instance: its address, its labels and identity, and how its ports are reached."""

    name: str
    address: str
    namespace: str = "default"
    labels: Labels = ()
    service_account: str = ""
    service: str | None = None
    service_ports: tuple[ServicePortSpec, ...] = ()
    named_ports: tuple[tuple[str, int], ...] = ()
    inject: bool = True
    sidecar_port: int | None = None
    netns: str | None = None
    origin: Origin = Origin.WORKLOAD_ENTRY
    label_map: Mapping[str, str] = field(init=False, repr=False, compare=False)
    """`labels` as a mapping, made once: sidecar routing reads it on every request."""
    peer_id: bytes = field(init=False, repr=False, compare=False)
    """How its proxy names itself to a server sidecar, as Istio's `x-envoy-peer-metadata-id`:
    `sidecar~IP~NAME.NAMESPACE~NAMESPACE.svc.cluster.local` (`router~...` for a gateway)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_map", dict(self.labels))
        kind = "router" if self.label_map.get("istio") == "ingressgateway" else "sidecar"
        peer_id = f"{kind}~{self.address}~{self.name}.{self.namespace}~{self.namespace}.svc.cluster.local"
        object.__setattr__(self, "peer_id", peer_id.encode())

    @property
    def identity(self) -> str:
        account = self.service_account or self.service or self.name
        return f"spiffe://cluster.local/ns/{self.namespace}/sa/{account}"

    def port_named(self, name: str) -> int | None:
        return dict(self.named_ports).get(name)

    def __str__(self) -> str:
        return f"{self.name}.{self.namespace}"


INGRESS_GATEWAY = Workload(
    "istio-ingressgateway", "127.0.0.1", "istio-system", (("app", "istio-ingressgateway"), ("istio", "ingressgateway"))
)
"""The built-in ingress gateway as a peer: what Istio's metrics and peer ids say of it."""
