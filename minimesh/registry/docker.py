"""Docker containers → workloads, by their labels (DESIGN §1.2). Pure: no Docker I/O here.

`workload_of(record)` reads one container's inspect record (the Docker API's JSON); a
container without `minimesh.service` is not in the mesh, and one with unreadable labels
is skipped with one line that names the container and the label.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from minimesh.config.labels import (
    INJECT_LABEL,
    NAMESPACE_LABEL,
    PORT_LABEL,
    SERVICE_ACCOUNT_LABEL,
    SERVICE_LABEL,
    ServicePortSpec,
    parse_ports,
)
from minimesh.config.model import labels_of
from minimesh.registry.model import Origin, Workload

HIDDEN_LABEL_PREFIXES = ("minimesh.", "com.docker.", "org.opencontainers.")
"""Labels that describe the container to Docker or to minimesh, not the workload to the mesh."""


@dataclass(frozen=True, slots=True)
class Skipped:
    """A container that carries `minimesh.service` but cannot join the mesh, and why."""

    container: str
    reason: str

    def __str__(self) -> str:
        return f"container {self.container} is not in the mesh: {self.reason}"


def _name(record: Mapping[str, Any]) -> str:
    return str(record.get("Name") or record.get("Id", "")[:12]).lstrip("/")


def _address(record: Mapping[str, Any], network: str | None) -> tuple[str, tuple[str, ...]]:
    """The container's IP on `network` (or its first network with one), and its aliases there."""
    networks: Mapping[str, Any] = (record.get("NetworkSettings") or {}).get("Networks") or {}
    ordered = sorted(networks.items(), key=lambda item: (item[0] != network, item[0]))
    for _, settings in ordered:
        address = (settings or {}).get("IPAddress")
        if address:
            return str(address), tuple(str(a) for a in (settings.get("Aliases") or ()))
    return "", ()


def _exposed(record: Mapping[str, Any]) -> tuple[ServicePortSpec, ...]:
    exposed: Mapping[str, Any] = (record.get("Config") or {}).get("ExposedPorts") or {}
    ports = sorted(int(key.partition("/")[0]) for key in exposed if key.endswith("/tcp") and key[:-4].isdigit())
    return tuple(ServicePortSpec(port) for port in ports)


def ready(record: Mapping[str, Any]) -> bool:
    """Running, and healthy when it has a health check (Kubernetes' readiness)."""
    state: Mapping[str, Any] = record.get("State") or {}
    health = state.get("Health")
    return bool(state.get("Running")) and (not health or health.get("Status") == "healthy")


def workload_of(record: Mapping[str, Any], network: str | None = None) -> Workload | Skipped | None:
    """The workload a container is, None when it is not in the mesh, Skipped when it cannot be."""
    labels: Mapping[str, str] = (record.get("Config") or {}).get("Labels") or {}
    service = labels.get(SERVICE_LABEL)
    if service is None:
        return None
    name = _name(record)
    if not service.strip():
        return Skipped(name, f"label {SERVICE_LABEL} is empty; set it to the service name")
    try:
        ports = parse_ports(labels[PORT_LABEL]) if PORT_LABEL in labels else _exposed(record)
    except ValueError as exc:
        return Skipped(name, f"label {PORT_LABEL}: {exc}")
    if not ports:
        return Skipped(name, f"no port: set label {PORT_LABEL} (e.g. http:9080) or EXPOSE one in the image")
    inject = labels.get(INJECT_LABEL, "true").lower()
    if inject not in ("true", "false"):
        return Skipped(name, f"label {INJECT_LABEL} must be true or false, got '{labels[INJECT_LABEL]}'")
    address, _ = _address(record, network)
    if not address:
        return Skipped(name, "it has no IP address on any network; attach it to the compose network")
    pid = (record.get("State") or {}).get("Pid") or 0
    return Workload(
        name=name,
        address=address,
        namespace=labels.get(NAMESPACE_LABEL, "default"),
        labels=labels_of({k: v for k, v in labels.items() if not k.startswith(HIDDEN_LABEL_PREFIXES)}),
        service_account=labels.get(SERVICE_ACCOUNT_LABEL, service),
        service=service,
        service_ports=ports,
        inject=inject == "true",
        netns=f"/proc/{pid}/ns/net" if pid else None,
        origin=Origin.CONTAINER,
    )


def aliases_of(record: Mapping[str, Any], network: str | None = None) -> tuple[str, ...]:
    """The network aliases a container answers to (checked against its service by `validate --compose`)."""
    return _address(record, network)[1]
