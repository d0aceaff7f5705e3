"""Checks across documents, and lints for what Istio accepts but users regret.

A cross-reference or a lint is a warning (DESIGN §1.4): a reference may resolve in another
file or in the cluster, and a lint is advice; `--strict` turns them into errors. Only a
`minimesh.*` annotation or label minimesh cannot read is an error here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

from minimesh.config import model as m
from minimesh.config.labels import (
    FAULT_FIRST_ANNOTATION,
    PORT_LABEL,
    SERVICE_LABEL,
    SIDECAR_PORT_ANNOTATION,
    parse_fault_first,
    parse_ports,
)
from minimesh.config.names import fqdn, host_covers
from minimesh.config.source import SPEC, Document, FieldPath, field_path
from minimesh.errors import Problem, Severity

NON_IDEMPOTENT = frozenset({"POST", "PATCH"})


class _Findings:
    """Collects problems, placing each at the line of the field it is about."""

    def __init__(self, documents: Iterable[Document]) -> None:
        self.problems: list[Problem] = []
        self._documents = {(d.kind, d.namespace, d.name): d for d in documents}

    def add(self, severity: Severity, meta: m.Meta, path: FieldPath, message: str) -> None:
        document = self._documents.get(meta.key)
        full = (*SPEC, *path) if path[:1] != ("metadata",) else path
        location = document.where(full) if document else meta.location
        self.problems.append(Problem(location, severity, message, meta.ref, field_path(full)))

    def warn(self, meta: m.Meta, path: FieldPath, message: str) -> None:
        self.add("warning", meta, path, message)

    def error(self, meta: m.Meta, path: FieldPath, message: str) -> None:
        self.add("error", meta, path, message)


def _destinations(vs: m.VirtualService) -> Iterator[tuple[FieldPath, m.Destination]]:
    for route in vs.http:
        for j, dest in enumerate(route.route):
            yield ("http", route.index, "route", j, "destination"), dest.destination
        for j, mirror in enumerate(route.mirrors):
            yield ("http", route.index, "mirrors", j, "destination"), mirror.destination
    for kind, rules in (("tcp", vs.tcp), ("tls", vs.tls)):
        for rule in rules:
            for j, dest in enumerate(rule.route):
                yield (kind, rule.index, "route", j, "destination"), dest.destination


def _known_hosts(mesh: m.Mesh) -> set[str]:
    hosts: set[str] = set()
    for service in mesh.services:
        hosts.add(fqdn(service.meta.name, service.meta.namespace))
    for entry in mesh.service_entries:
        hosts.update(fqdn(h, entry.meta.namespace) for h in entry.hosts)
    for workload in mesh.workload_entries:
        name = dict(workload.labels).get(SERVICE_LABEL)
        if name:
            hosts.add(fqdn(name, workload.meta.namespace))
    for rule in mesh.destination_rules:
        hosts.add(fqdn(rule.host, rule.meta.namespace))
    return hosts


def check_references(mesh: m.Mesh, findings: _Findings) -> None:
    """Subsets, gateways and hosts that no given document defines; two rules for one host."""
    subsets: dict[str, set[str]] = defaultdict(set)
    rules_by_host: dict[str, list[m.DestinationRule]] = defaultdict(list)
    for rule in mesh.destination_rules:
        host = fqdn(rule.host, rule.meta.namespace)
        subsets[host].update(s.name for s in rule.subsets)
        rules_by_host[host].append(rule)
    for host, rules in rules_by_host.items():
        for rule in rules[1:]:
            message = (
                f"a second DestinationRule for host {host} (the first is {rules[0].meta.ref}); "
                "Istio uses only one, so merge them"
            )
            findings.warn(rule.meta, ("host",), message)
    gateways = {(g.meta.namespace, g.meta.name) for g in mesh.gateways}
    known = _known_hosts(mesh)
    for vs in mesh.virtual_services:
        for i, name in enumerate(vs.gateways):
            if name != "mesh" and _gateway_key(name, vs.meta.namespace) not in gateways:
                message = f"gateway '{name}' is defined in none of the given files"
                findings.warn(vs.meta, ("gateways", i), message)
        for path, dest in _destinations(vs):
            host = fqdn(dest.host, vs.meta.namespace)
            if not any(host_covers(h, host) for h in known):
                message = f"host '{dest.host}' is defined in none of the given files (no Service or DestinationRule)"
                findings.warn(vs.meta, (*path, "host"), message)
            if dest.subset and dest.subset not in subsets.get(host, set()):
                message = (
                    f"subset '{dest.subset}' of host {dest.host} is defined in no DestinationRule; "
                    "requests to it get 503 no healthy upstream"
                )
                findings.warn(vs.meta, (*path, "subset"), message)


def _gateway_key(name: str, namespace: str) -> tuple[str, str]:
    if "/" in name:
        ns, _, short = name.partition("/")
        return ns, short
    return namespace, name


def _catches_all(route: m.HTTPRoute) -> bool:
    return not route.match or any(block == m.HTTPMatchRequest(name=block.name) for block in route.match)


def lint_virtual_services(mesh: m.Mesh, findings: _Findings) -> None:
    for vs in mesh.virtual_services:
        _lint_virtual_service(vs, findings)
        _lint_connection_rules(vs, findings)


def _lint_connection_rules(vs: m.VirtualService, findings: _Findings) -> None:
    """A `tcp[]` or `tls[]` rule after one that takes every connection is never reached."""
    for kind, rules in (("tcp", vs.tcp), ("tls", vs.tls)):
        catch_all: m.TCPRoute | None = None
        for rule in rules:
            if catch_all is not None:
                above = f"{kind}[{catch_all.index}]"
                message = f"{kind}[{rule.index}] is never reached: {above} above it matches every connection"
                findings.warn(vs.meta, (kind, rule.index), message)
            elif not rule.match or any(block == m.L4MatchAttributes() for block in rule.match):
                catch_all = rule


def _lint_virtual_service(vs: m.VirtualService, findings: _Findings) -> None:
    catch_all: m.HTTPRoute | None = None
    for route in vs.http:
        where: FieldPath = ("http", route.index)
        if catch_all is not None:
            message = f"http[{route.index}] is never reached: http[{catch_all.index}] above it matches every request"
            findings.warn(vs.meta, where, message)
        elif _catches_all(route):
            catch_all = route
        if route.fault is not None:
            _lint_fault(vs, route, findings)
        elif route.retries is None and _methods(route) & NON_IDEMPOTENT:
            methods = "/".join(sorted(_methods(route) & NON_IDEMPOTENT))
            message = (
                f"{methods} requests on this route are retried twice by Istio's default retry policy; "
                "set retries.attempts: 0 if the upstream is not idempotent"
            )
            findings.warn(vs.meta, (*where, "match"), message)


def _methods(route: m.HTTPRoute) -> set[str]:
    return {b.method.value.upper() for b in route.match if b.method is not None and b.method.kind == "exact"}


def _lint_fault(vs: m.VirtualService, route: m.HTTPRoute, findings: _Findings) -> None:
    assert route.fault is not None
    counted = FAULT_FIRST_ANNOTATION in dict(vs.meta.annotations)
    for name, part in (("delay", route.fault.delay), ("abort", route.fault.abort)):
        if part is not None and part.percentage is None and not counted:
            message = f"fault {name} has no percentage, so it injects nothing; add percentage: {{value: 100}}"
            findings.warn(vs.meta, ("http", route.index, "fault", name), message)
    for name, value in (("timeout", route.timeout), ("retries", route.retries)):
        if value is not None:
            message = f"this route has a fault, so Istio turns its {name} off; the {name} here has no effect"
            findings.warn(vs.meta, ("http", route.index, name), message)


def lint_authorization(mesh: m.Mesh, findings: _Findings) -> None:
    for policy in mesh.authorization_policies:
        if policy.action == "ALLOW" and not policy.rules:
            message = "an ALLOW policy with no rules matches nothing, so it denies every request to its workloads"
            findings.warn(policy.meta, ("rules",), message)


def lint_gateway_hosts(mesh: m.Mesh, findings: _Findings) -> None:
    """A server host no VirtualService binds gets 404, unless the server redirects to HTTPS."""
    for gateway in mesh.gateways:
        bound = [
            vs
            for vs in mesh.virtual_services
            if any(
                _gateway_key(g, vs.meta.namespace) == (gateway.meta.namespace, gateway.meta.name) for g in vs.gateways
            )
        ]
        for i, server in enumerate(gateway.servers):
            if server.tls is not None and server.tls.https_redirect:
                continue
            for j, host in enumerate(server.hosts):
                name = host.partition("/")[2] if "/" in host else host
                if not any(_hosts_overlap(name, h) for vs in bound for h in vs.hosts):
                    message = f"host '{host}' of this Gateway is bound by no VirtualService; its requests get 404"
                    findings.warn(gateway.meta, ("servers", i, "hosts", j), message)


def _hosts_overlap(a: str, b: str) -> bool:
    return host_covers(a, b) or host_covers(b, a)


def check_workload_entries(mesh: m.Mesh, findings: _Findings) -> None:
    """The minimesh annotation and labels a WorkloadEntry may carry must be readable."""
    for entry in mesh.workload_entries:
        port = dict(entry.meta.annotations).get(SIDECAR_PORT_ANNOTATION)
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            message = f"annotation {SIDECAR_PORT_ANNOTATION} must be a port number 1-65535, got '{port}'"
            findings.error(entry.meta, ("metadata", "annotations", SIDECAR_PORT_ANNOTATION), message)
        ports = dict(entry.labels).get(PORT_LABEL)
        if ports is not None:
            try:
                parse_ports(ports)
            except ValueError as exc:
                findings.error(entry.meta, ("labels", PORT_LABEL), f"label {PORT_LABEL}: {exc}")


def check_fault_first(mesh: m.Mesh, findings: _Findings) -> None:
    """`minimesh.dev/fault-first` on a VirtualService must be a count of requests."""
    for vs in mesh.virtual_services:
        value = dict(vs.meta.annotations).get(FAULT_FIRST_ANNOTATION)
        if value is None:
            continue
        try:
            parse_fault_first(value)
        except ValueError as exc:
            findings.error(
                vs.meta,
                ("metadata", "annotations", FAULT_FIRST_ANNOTATION),
                f"annotation {FAULT_FIRST_ANNOTATION} {exc}",
            )


NOT_ENFORCED = "is validated but not enforced by minimesh yet: production enforces it, this local mesh does not"


def check_not_enforced(mesh: m.Mesh, findings: _Findings) -> None:
    """What minimesh accepts as Istio does but does not act on yet, said once per resource."""
    for authorization in mesh.authorization_policies:
        findings.warn(authorization.meta, (), f"AuthorizationPolicy {NOT_ENFORCED}")
    for peer in mesh.peer_authentications:
        findings.warn(peer.meta, ("mtls",), f"PeerAuthentication {NOT_ENFORCED} (sidecars talk plaintext)")
    for sidecar in mesh.sidecars:
        findings.warn(sidecar.meta, (), f"Sidecar {NOT_ENFORCED}")
    for gateway in mesh.gateways:
        for i, server in enumerate(gateway.servers):
            if server.tls is not None and not server.tls.https_redirect:
                findings.warn(gateway.meta, ("servers", i, "tls"), f"an HTTPS/TLS Gateway server {NOT_ENFORCED}")
    for rule in mesh.destination_rules:
        levels = [((), rule.traffic_policy)] + [(("subsets", i), s.traffic_policy) for i, s in enumerate(rule.subsets)]
        for path, traffic in levels:
            if traffic is not None and traffic.tls is not None and traffic.tls.mode != "DISABLE":
                findings.warn(rule.meta, (*path, "trafficPolicy", "tls"), f"tls mode {traffic.tls.mode} {NOT_ENFORCED}")


CHECKS: tuple[Callable[[m.Mesh, _Findings], None], ...] = (
    check_references,
    check_workload_entries,
    check_fault_first,
    lint_gateway_hosts,
    lint_virtual_services,
    lint_authorization,
    check_not_enforced,
)


def check_mesh(mesh: m.Mesh, documents: Iterable[Document] = ()) -> list[Problem]:
    """Every cross-reference warning and lint for `mesh`, placed in `documents`, in file order."""
    findings = _Findings(documents)
    for check in CHECKS:
        check(mesh, findings)
    return sorted(findings.problems, key=lambda p: (p.location.file, p.location.line, p.location.col))
