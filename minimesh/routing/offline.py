"""Placeholder workloads for deciding from config alone (`explain`, `RouteTest`).

Offline, the services Docker would discover are not known. Every cluster-local host the
config routes to or has a DestinationRule for gets one placeholder instance per subset,
exposing the ports the config and the requests at hand name, so decisions are the ones
the running mesh would make with those services up.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from minimesh.config import model as m
from minimesh.config.labels import ServicePortSpec
from minimesh.config.names import fqdn
from minimesh.registry.model import Origin, Workload

CLUSTER_SUFFIX = ".svc.cluster.local"
OFFLINE_ADDRESS = "192.0.2.1"
"""TEST-NET-1: an address no request is ever sent to; placeholders are never dialled."""


def _referenced(mesh: m.Mesh) -> dict[str, set[int]]:
    """Cluster-local hosts the config names, with the ports it names for each."""
    hosts: dict[str, set[int]] = defaultdict(set)
    for rule in mesh.destination_rules:
        hosts[fqdn(rule.host, rule.meta.namespace)].update(port for port, _ in _port_levels(rule))
    for vs in mesh.virtual_services:
        destinations = [d.destination for route in vs.http for d in route.route]
        destinations += [mirror.destination for route in vs.http for mirror in route.mirrors]
        destinations += [d.destination for rule in (*vs.tcp, *vs.tls) for d in rule.route]
        for dest in destinations:
            hosts[fqdn(dest.host, vs.meta.namespace)].update([dest.port] if dest.port else [])
        for host in vs.hosts:
            if "." not in host and "*" not in host:
                hosts[fqdn(host, vs.meta.namespace)]
    return {host: ports for host, ports in hosts.items() if host.endswith(CLUSTER_SUFFIX)}


def _port_levels(rule: m.DestinationRule) -> list[tuple[int, m.TrafficPolicy]]:
    return list(rule.traffic_policy.port_level) if rule.traffic_policy else []


def placeholders(mesh: m.Mesh, known: Iterable[Workload], ports: Iterable[int]) -> tuple[Workload, ...]:
    """Instances for referenced hosts that no Service, WorkloadEntry or `known` workload backs."""
    backed = {fqdn(s.meta.name, s.meta.namespace) for s in mesh.services}
    backed |= {fqdn(w.service, w.namespace) for w in known if w.service}
    backed |= {fqdn(h, se.meta.namespace) for se in mesh.service_entries for h in se.hosts}
    subsets = {fqdn(r.host, r.meta.namespace): r.subsets for r in mesh.destination_rules}
    extra = set(ports) | {80}
    found = []
    for host, named in sorted(_referenced(mesh).items()):
        if host in backed:
            continue
        short, namespace = host.split(".")[:2]
        specs = tuple(ServicePortSpec(port) for port in sorted(named | extra))
        for subset in subsets.get(host) or (None,):
            labels = subset.labels if subset else ()
            suffix = subset.name if subset else "0"
            found.append(
                Workload(
                    name=f"{short}-{suffix}",
                    address=OFFLINE_ADDRESS,
                    namespace=namespace,
                    labels=labels,
                    service=short,
                    service_ports=specs,
                    origin=Origin.OFFLINE,
                )
            )
    return tuple(found)
