"""Workloads declared in config: `WorkloadEntry` documents (a ServiceEntry's own endpoints
become endpoints in routing.compile, not workloads).

With `--no-docker` these are the only workloads; a WorkloadEntry annotated
`minimesh.sidecar-port` gets an explicit outbound sidecar on that port.
"""

from __future__ import annotations

from minimesh.config import model as m
from minimesh.config.labels import (
    PORT_LABEL,
    SERVICE_LABEL,
    SIDECAR_PORT_ANNOTATION,
    ServicePortSpec,
    parse_ports,
)
from minimesh.registry.model import Origin, Workload


def _service_ports(entry: m.WorkloadEntry, labels: dict[str, str]) -> tuple[ServicePortSpec, ...]:
    """`minimesh.port` when the entry declares it, else (for a `minimesh.service` entry) one
    service port per entry port; validation has already checked the label."""
    if PORT_LABEL in labels:
        try:
            return parse_ports(labels[PORT_LABEL])
        except ValueError:
            return ()
    if SERVICE_LABEL in labels:
        return tuple(ServicePortSpec(port, name) for name, port in entry.ports)
    return ()


def from_workload_entry(entry: m.WorkloadEntry) -> Workload:
    annotations = dict(entry.meta.annotations)
    labels = dict(entry.labels)
    sidecar = annotations.get(SIDECAR_PORT_ANNOTATION, "")
    return Workload(
        name=entry.meta.name,
        address=entry.address,
        namespace=entry.meta.namespace,
        labels=entry.labels,
        service_account=entry.service_account,
        service=labels.get(SERVICE_LABEL),
        service_ports=_service_ports(entry, labels),
        named_ports=entry.ports,
        sidecar_port=int(sidecar) if sidecar.isdigit() else None,
        origin=Origin.WORKLOAD_ENTRY,
    )


def workloads_of(mesh: m.Mesh) -> tuple[Workload, ...]:
    """Every WorkloadEntry of `mesh` as a workload."""
    return tuple(from_workload_entry(entry) for entry in mesh.workload_entries)
