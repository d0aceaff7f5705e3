"""Workloads declared in config: `WorkloadEntry` documents and `ServiceEntry` endpoints.

With `--no-docker` these are the only workloads; a WorkloadEntry annotated
`minimesh.sidecar-port` gets an explicit outbound sidecar on that port.
"""

from __future__ import annotations

from minimesh.config import model as m
from minimesh.registry.model import ServicePortSpec, Workload

SIDECAR_PORT_ANNOTATION = "minimesh.sidecar-port"
SERVICE_LABEL = "minimesh.service"


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
        service_ports=tuple(ServicePortSpec(port) for _, port in entry.ports) if SERVICE_LABEL in labels else (),
        named_ports=entry.ports,
        sidecar_port=int(sidecar) if sidecar.isdigit() else None,
        origin="WorkloadEntry",
    )


def workloads_of(mesh: m.Mesh) -> tuple[Workload, ...]:
    """Every WorkloadEntry of `mesh` as a workload."""
    return tuple(from_workload_entry(entry) for entry in mesh.workload_entries)
