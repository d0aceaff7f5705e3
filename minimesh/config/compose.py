"""`minimesh validate --compose FILE`: do a compose file's labels, ports and aliases fit the mesh?

Offline and pure: the compose file is read as YAML with positions, each compose service's
`minimesh.*` labels, ports and network aliases are compared with what the mesh config
expects, and every mismatch (or a server-first port left to detection) is a located problem.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from minimesh.config import model as m
from minimesh.config.labels import (
    INJECT_LABEL,
    NAMESPACE_LABEL,
    PORT_LABEL,
    SERVICE_LABEL,
    ServicePortSpec,
    parse_ports,
)
from minimesh.config.names import fqdn
from minimesh.config.source import Document, FieldPath, parse_text
from minimesh.errors import Location, Problem

SERVER_FIRST = {
    21: ("FTP", "tcp"),
    25: ("SMTP", "tcp"),
    110: ("POP3", "tcp"),
    143: ("IMAP", "tcp"),
    587: ("SMTP", "tcp"),
    3306: ("MySQL/MariaDB", "mysql"),
}
"""Well-known ports of protocols whose server speaks first, with the protocol word that
declares them. Detection waits for a client's first bytes, which such a client sends only
after the server's greeting (Istio's "server first protocols" trap)."""


@dataclass(frozen=True, slots=True)
class ComposeService:
    """One compose service as the mesh sees it."""

    name: str
    labels: Mapping[str, str]
    aliases: frozenset[str]
    ports: frozenset[int]
    """Its `expose` ports and the container side of its `ports`: Docker exposes both."""
    location: Location

    @property
    def mesh_service(self) -> str | None:
        return self.labels.get(SERVICE_LABEL)


def _labels(raw: Any) -> dict[str, str]:
    if isinstance(raw, dict):
        return {str(k): "" if v is None else str(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return {str(item).partition("=")[0]: str(item).partition("=")[2] for item in raw}
    return {}


def _aliases(raw: Any) -> frozenset[str]:
    if not isinstance(raw, dict):
        return frozenset()
    found: set[str] = set()
    for settings in raw.values():
        if isinstance(settings, dict) and isinstance(settings.get("aliases"), list):
            found.update(str(alias) for alias in settings["aliases"])
    return frozenset(found)


def _exposed(raw: Any) -> frozenset[int]:
    ports = set()
    for item in raw if isinstance(raw, list) else []:
        text = str(item).partition("/")[0]
        if text.isdigit():
            ports.add(int(text))
    return frozenset(ports)


def _published(raw: Any) -> frozenset[int]:
    """The container ports of `ports`: `3306`, `8080:3306`, `127.0.0.1:8080:3306/tcp`, or
    `{target: 3306}`; UDP ports and ranges are left out."""
    ports = set()
    for item in raw if isinstance(raw, list) else []:
        if isinstance(item, dict):
            target, udp = str(item.get("target", "")), str(item.get("protocol", "tcp")).lower() == "udp"
        else:
            text, _, protocol = str(item).partition("/")
            target, udp = text.rpartition(":")[2], protocol.lower() == "udp"
        if target.isdigit() and not udp:
            ports.add(int(target))
    return frozenset(ports)


def services_of(document: Document) -> list[ComposeService]:
    body = document.body if isinstance(document.body, dict) else {}
    services = body.get("services") if isinstance(body.get("services"), dict) else {}
    found = []
    for name, spec in (services or {}).items():
        if not isinstance(spec, dict):
            continue
        found.append(
            ComposeService(
                name=str(name),
                labels=_labels(spec.get("labels")),
                aliases=_aliases(spec.get("networks")) | {str(name)},
                ports=_exposed(spec.get("expose")) | _published(spec.get("ports")),
                location=document.where(("services", name)),
            )
        )
    return found


def _problem(service: ComposeService, document: Document, path: FieldPath, message: str, severity: str) -> Problem:
    where = document.where(("services", service.name, *path))
    return Problem(where, "error" if severity == "error" else "warning", message, f"compose service {service.name}")


def check_compose(path: str, text: str, mesh: m.Mesh) -> list[Problem]:
    """Every mismatch between the compose file at `path` and the mesh config."""
    documents, problems = parse_text(text, path)
    if problems or not documents:
        return problems or [Problem(Location(path, 1, 1), "error", "the compose file is empty")]
    document = documents[0]
    services = [s for s in services_of(document) if s.mesh_service is not None]
    by_mesh_service: dict[tuple[str, str], list[ComposeService]] = defaultdict(list)
    for service in services:
        try:
            if PORT_LABEL in service.labels:
                parse_ports(service.labels[PORT_LABEL])
        except ValueError as exc:
            problems.append(_problem(service, document, ("labels", PORT_LABEL), f"label {PORT_LABEL}: {exc}", "error"))
        if service.labels.get(INJECT_LABEL, "true").lower() not in ("true", "false"):
            message = f"label {INJECT_LABEL} must be true or false"
            problems.append(_problem(service, document, ("labels", INJECT_LABEL), message, "error"))
        namespace = service.labels.get(NAMESPACE_LABEL, "default")
        by_mesh_service[(namespace, service.mesh_service or "")].append(service)
    for (_, name), members in by_mesh_service.items():
        for service in members:
            if name not in service.aliases:
                message = (
                    f"instances of service '{name}' must answer to it: add `aliases: [{name}]` under this "
                    f"service's network, or callers of {name} reach no instance"
                )
                problems.append(_problem(service, document, ("networks",), message, "error"))
    problems += _check_ports(document, services, mesh)
    problems += _check_subsets(document, services, mesh)
    problems += _check_server_first(document, services, mesh)
    return problems


def _port_specs(service: ComposeService) -> tuple[ServicePortSpec, ...]:
    """The service ports its instances declare: the `minimesh.port` label, else the exposed
    ports, whose protocol is then detected (none when the label cannot be read)."""
    if PORT_LABEL in service.labels:
        try:
            return parse_ports(service.labels[PORT_LABEL])
        except ValueError:
            return ()
    return tuple(ServicePortSpec(port) for port in sorted(service.ports))


def _declared_ports(service: ComposeService) -> frozenset[int]:
    return frozenset(spec.number for spec in _port_specs(service))


def _check_ports(document: Document, services: list[ComposeService], mesh: m.Mesh) -> list[Problem]:
    """Ports the mesh config routes to that the service's instances do not declare."""
    wanted: dict[str, set[int]] = defaultdict(set)
    for vs in mesh.virtual_services:
        for route in vs.http:
            for dest in route.route:
                if dest.destination.port:
                    wanted[fqdn(dest.destination.host, vs.meta.namespace)].add(dest.destination.port)
    problems = []
    for service in services:
        declared = _declared_ports(service)
        host = fqdn(service.mesh_service or "", service.labels.get(NAMESPACE_LABEL, "default"))
        if not declared:
            continue
        for port in sorted(wanted.get(host, set()) - declared):
            message = (
                f"the mesh routes to {service.mesh_service}:{port} but this service declares "
                f"{', '.join(map(str, sorted(declared)))}; add {port} to label {PORT_LABEL}"
            )
            problems.append(_problem(service, document, ("labels",), message, "error"))
    return problems


def _check_subsets(document: Document, services: list[ComposeService], mesh: m.Mesh) -> list[Problem]:
    """DestinationRule subsets whose labels no compose service of that host carries."""
    problems = []
    for rule in mesh.destination_rules:
        host = fqdn(rule.host, rule.meta.namespace)
        members = [s for s in services if fqdn(s.mesh_service or "", s.labels.get(NAMESPACE_LABEL, "default")) == host]
        if not members:
            continue
        for subset in rule.subsets:
            if not any(m.labels_match(subset.labels, dict(s.labels)) for s in members):
                labels = ",".join(f"{k}={v}" for k, v in subset.labels)
                message = (
                    f"subset '{subset.name}' of {rule.meta.ref} selects {labels}, which no compose service of "
                    f"{rule.host} carries; requests to it get 503 no healthy upstream"
                )
                problems.append(Problem(subset.location, "warning", message, rule.meta.ref, "subsets"))
    return problems


def _check_server_first(document: Document, services: list[ComposeService], mesh: m.Mesh) -> list[Problem]:
    """A server-first port (MySQL, SMTP, ...) with no declared protocol: each connection waits
    for client bytes before it is proxied. A `Service` document's port names decide instead."""
    documented = {fqdn(s.meta.name, s.meta.namespace) for s in mesh.services if s.ports}
    problems = []
    for service in services:
        if fqdn(service.mesh_service or "", service.labels.get(NAMESPACE_LABEL, "default")) in documented:
            continue
        specs = _port_specs(service)
        words = {spec.number: spec.protocol or SERVER_FIRST.get(spec.number, ("", ""))[1] for spec in specs}
        label = ",".join(f"{words[n]}:{n}" if words[n] else str(n) for n in words)
        for spec in specs:
            if spec.protocol or spec.number not in SERVER_FIRST:
                continue
            name = SERVER_FIRST[spec.number][0]
            message = (
                f"port {spec.number} looks like {name}, whose server speaks first, and declares no protocol: "
                "each connection waits for client bytes that never come before it is proxied; declare it with label "
                f'{PORT_LABEL}: "{label}"'
            )
            path: FieldPath = ("labels", PORT_LABEL) if PORT_LABEL in service.labels else ("labels",)
            problems.append(_problem(service, document, path, message, "warning"))
    return problems
