"""Where a captured connection goes, as a sidecar's listeners decide it: the protocol its
destination port is served in (`plan`), then for bytes proxied as TCP or TLS the service,
`tcp[]`/`tls[]` rule and cluster (`decide_connection`); `trace_connection` explains it.

Pure: (snapshot, where the connection was headed, its source, its SNI) → outcome.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from minimesh.config.labels import DETECTED, HTTP_PROTOCOLS, TLS_PROTOCOLS
from minimesh.config.names import host_covers
from minimesh.registry.model import Workload
from minimesh.routing.pick import choose_weighted
from minimesh.routing.snapshot import (
    BlackHole,
    CompiledVirtualService,
    Connect,
    ConnectionFacts,
    ConnectionOutcome,
    ConnectionRoute,
    Draw,
    MeshService,
    PassThrough,
    Snapshot,
    TraceStep,
)

Handling = Literal["http", "tcp", "tls", "detect", "passthrough"]
"""How a listener serves a connection before reading it: `http` parses HTTP/1; `tcp` proxies
bytes at once (server-first protocols work); `tls` reads the ClientHello for its SNI first;
`detect` sniffs the first bytes; `passthrough` sends it on as addressed, unread."""

Steps = list[TraceStep] | None


@dataclass(frozen=True, slots=True)
class Plan:
    """A listener's handling of one destination port, and the service it reaches (if known)."""

    handling: Handling
    service: MeshService | None
    protocol: str = DETECTED


Reached = tuple[MeshService, int]
"""A service and the service port a connection reaches (an endpoint may listen on another)."""


def handling_of(protocol: str) -> Handling:
    """How a port of `protocol` is served: every HTTP protocol as HTTP (an HTTP/2 client is
    told from an HTTP/1.1 one by its preface, on any of them)."""
    if protocol in HTTP_PROTOCOLS:
        return "http"
    if protocol in TLS_PROTOCOLS:
        return "tls"
    if protocol == DETECTED:
        return "detect"
    return "tcp"


def plan(snapshot: Snapshot, address: str, port: int) -> Plan:
    """The outbound handling of a connection to `address:port`: a service's port is served in
    its protocol; a ServiceEntry port open on every address likewise; an unknown address is
    sniffed where some service serves HTTP (its Host may name a service), else it follows
    `outboundTrafficPolicy`: passed through unread, or sniffed to be refused as Envoy would."""
    reached = snapshot.addresses.get((address, port))
    if reached is not None:
        protocol = _port_protocol(*reached)
        return Plan(handling_of(protocol), reached[0], protocol)
    wide = snapshot.port_services.get(port)
    if wide:
        protocol = _port_protocol(wide[0], port)
        if protocol in TLS_PROTOCOLS:
            return Plan("tls", None, protocol)
        return Plan(handling_of(protocol), wide[0], protocol)
    if port in snapshot.sniffed_ports or snapshot.mesh.mesh_config.outbound_mode == "REGISTRY_ONLY":
        return Plan("detect", None)
    return Plan("passthrough", None)


def inbound_plan(snapshot: Snapshot, workload: Workload, port: int) -> Handling:
    """How `workload`'s inbound sidecar serves its `port`: in the port's declared protocol,
    sniffed when it declares none (and for a port no service names)."""
    return handling_of(snapshot.inbound_protocols.get((workload.name, port), DETECTED))


def _port_protocol(service: MeshService, port: int) -> str:
    found = service.port(port)
    return found.protocol if found is not None else DETECTED


def service_at(snapshot: Snapshot, address: str, port: int, sni: str | None) -> Reached | None:
    """The service (and service port) a connection reaches: by its destination address,
    else by the SNI it offers among the services open on that port (TLS ServiceEntries),
    else the TCP ServiceEntry that claims the port on every address."""
    reached = snapshot.addresses.get((address, port))
    if reached is not None:
        return reached
    wide = snapshot.port_services.get(port, ())
    if sni is not None:
        for candidate in wide:
            if _port_protocol(candidate, port) in TLS_PROTOCOLS and host_covers(candidate.host, sni):
                return candidate, port
        return None
    found = next((s for s in wide if _port_protocol(s, port) not in TLS_PROTOCOLS), None)
    return (found, port) if found is not None else None


def decide_connection(
    snapshot: Snapshot,
    service: MeshService | None,
    facts: ConnectionFacts,
    rng: random.Random,
) -> ConnectionOutcome:
    """Where a TCP or TLS connection to `service` (None: outside the registry) goes;
    `facts.port` is the service port it reached."""
    return _decide(snapshot, service, facts, rng, None)


def trace_connection(
    snapshot: Snapshot, service: MeshService | None, facts: ConnectionFacts, rng: random.Random
) -> tuple[ConnectionOutcome, tuple[TraceStep, ...]]:
    """The same decision with every step that led to it (`minimesh explain tcp://...`)."""
    steps: list[TraceStep] = []
    outcome = _decide(snapshot, service, facts, rng, steps)
    steps.extend(describe_connection(outcome))
    return outcome, tuple(steps)


def _decide(
    snapshot: Snapshot, service: MeshService | None, facts: ConnectionFacts, rng: random.Random, steps: Steps
) -> ConnectionOutcome:
    where = facts.sni or facts.address
    if service is None:
        if steps is not None:
            steps.append(TraceStep("host", "info", f"{where}:{facts.port} is no service of the registry"))
        return _outside(snapshot, where, facts.port)
    if steps is not None:
        protocol = _port_protocol(service, facts.port)
        steps.append(TraceStep("host", "info", f"{where}:{facts.port} → {service.host} port {facts.port}/{protocol}"))
    tls = facts.sni is not None
    for vs in snapshot.connection_hosts.get(service.host, ())[:1]:
        if steps is not None:
            steps.append(TraceStep(vs.ref, "match", f"host {_covering(vs, service.host)}"))
        hit = _first_rule(vs.tls if tls else vs.tcp, facts, steps)
        if hit is not None:
            return _connect(hit, facts.port, rng)
    if steps is not None:
        steps.append(TraceStep("route", "info", f"no {'tls' if tls else 'tcp'} rule claims it: the default route"))
    route = snapshot.default_routes.get((service.host, facts.port))
    if route is None:
        if steps is not None:
            steps.append(
                TraceStep("route", "info", f"{service.host} has no port {facts.port}: as outside the registry")
            )
        return _outside(snapshot, where, facts.port)
    return Connect("default", route.destinations[0].target(facts.port).cluster, None, None)


def _outside(snapshot: Snapshot, where: str, port: int) -> PassThrough | BlackHole:
    """A destination no service port claims: `outboundTrafficPolicy` decides."""
    if snapshot.mesh.mesh_config.outbound_mode == "REGISTRY_ONLY":
        return BlackHole(where, port)
    return PassThrough(where, port)


def _covering(vs: CompiledVirtualService, host: str) -> str:
    return next((h for h in vs.hosts if host_covers(h, host)), host)


def _first_rule(routes: tuple[ConnectionRoute, ...], facts: ConnectionFacts, steps: Steps) -> ConnectionRoute | None:
    for route in routes:
        name = route.ref.rpartition("#")[2]
        if not route.matches:
            if steps is not None:
                steps.append(TraceStep(name, "match", "no match conditions"))
            return route
        failures = [match.failure(facts) for match in route.matches]
        if None in failures:
            held = route.matches[failures.index(None)]
            if steps is not None:
                steps.append(TraceStep(name, "match", f"match[{held.index}]: {held.describe()}"))
            return route
        if steps is not None:
            steps.append(TraceStep(name, "miss", "; ".join(f"match[{i}]: {why}" for i, why in enumerate(failures))))
    return None


def _connect(route: ConnectionRoute, port: int, rng: random.Random) -> Connect:
    if len(route.destinations) == 1:
        return Connect(route.ref, route.destinations[0].target(port).cluster, route, None)
    picked = choose_weighted(route.weights, rng)
    return Connect(route.ref, route.destinations[picked].target(port).cluster, route, Draw(route.weights, picked))


def describe_connection(outcome: ConnectionOutcome) -> list[TraceStep]:
    """The steps that say what a connection decision does: split, cluster, result."""
    if isinstance(outcome, PassThrough):
        text = f"{outcome.host}:{outcome.port} goes out as addressed, unread"
        return [TraceStep("result", "info", f"{outcome.cluster}: {text}")]
    if isinstance(outcome, BlackHole):
        text = f"{outcome.host}:{outcome.port} is not in the registry (REGISTRY_ONLY): connection closed, UH"
        return [TraceStep("result", "miss", f"{outcome.cluster}: {text}")]
    steps = []
    if outcome.draw is not None and outcome.route is not None:
        labels = [d.label for d in outcome.route.destinations]
        weights = " ".join(f"{label}={w}" for label, w in zip(labels, outcome.draw.weights, strict=True))
        steps.append(TraceStep("split", "info", f"weights {weights} → drew {labels[outcome.draw.picked]}"))
    cluster = outcome.cluster
    if cluster.original_destination:
        endpoints = "the connection's original destination (resolution NONE or DNS)"
    else:
        endpoints = ", ".join(str(e) for e in cluster.endpoints) or "none (connection closed, UH)"
    problem = f"; {cluster.problem}" if cluster.problem else ""
    steps.append(TraceStep("cluster", "info", f"{cluster.name}: endpoints {endpoints}{problem}"))
    steps.append(TraceStep("policy", "info", cluster.policy.describe()))
    steps.append(TraceStep("result", "info", f"proxied as TCP by {outcome.route_ref}, a destination per connection"))
    return steps
