"""The `minimesh.*` labels and annotations a workload carries (DESIGN §1.2), and their parsers.

Shared by Docker discovery, WorkloadEntry registration and validation, so one spelling
and one parser serve all three.
"""

from __future__ import annotations

from dataclasses import dataclass

SERVICE_LABEL = "minimesh.service"
PORT_LABEL = "minimesh.port"
NAMESPACE_LABEL = "minimesh.namespace"
SERVICE_ACCOUNT_LABEL = "minimesh.serviceaccount"
INJECT_LABEL = "minimesh.inject"
SIDECAR_PORT_ANNOTATION = "minimesh.sidecar-port"
FAULT_FIRST_ANNOTATION = "minimesh.dev/fault-first"
"""On a VirtualService: each fault of its routes fires for exactly the first N requests (DESIGN §1.4)."""
GRPC_WEB = "GRPC-WEB"
"""The protocol whose requests Istio's `grpc_web` filter translates (a `grpc-web` port or server)."""
PROTOCOLS = {
    "http": "HTTP",
    "http2": "HTTP2",
    "grpc": "GRPC",
    "grpc-web": GRPC_WEB,
    "https": "HTTPS",
    "tls": "TLS",
    "tcp": "TCP",
    "udp": "UDP",
    "mongo": "MONGO",
    "mysql": "MYSQL",
    "redis": "REDIS",
}
"""Istio's port protocols by the word that names them (a port name's prefix, `appProtocol`, or
the `minimesh.port` label), each with its canonical spelling."""
DETECTED = "AUTO"
"""The protocol of a port that declares none: sniffed from the client's first bytes, as Istio
does for an unnamed port (its `UnsupportedProtocol`)."""
HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC", GRPC_WEB})
TLS_PROTOCOLS = frozenset({"HTTPS", "TLS"})
OPAQUE_PROTOCOLS = frozenset({"TCP", "UDP", "MONGO", "MYSQL", "REDIS"})
"""Protocols minimesh proxies as bytes: `mongo`, `mysql` and `redis` are TCP to Istio too."""


@dataclass(frozen=True, slots=True)
class ServicePortSpec:
    """A service port a workload declares itself (the `minimesh.port` label)."""

    number: int
    protocol: str = ""
    """The label's protocol word (`http`, `tcp`, ...) or a WorkloadEntry port's name, read by
    `port_protocol`; "" when the port declares none."""


def port_protocol(name: str, app_protocol: str | None = None) -> str:
    """A port's protocol as Istio reads it: `appProtocol`, else the name's prefix before `-`
    (`http-web`, `tcp-db`), else DETECTED (the port is sniffed)."""
    word = (app_protocol or name).lower()
    return PROTOCOLS.get(word) or PROTOCOLS.get(word.split("-")[0]) or DETECTED


def parse_fault_first(text: str) -> int:
    """The `minimesh.dev/fault-first` annotation: a whole number of requests, 0 or more."""
    if not text.strip().isdigit():
        raise ValueError(f"must be a whole number of requests, e.g. \"3\", got '{text}'")
    return int(text)


def parse_ports(text: str) -> tuple[ServicePortSpec, ...]:
    """The `minimesh.port` label: `[PROTOCOL:]PORT[,...]`; ValueError names what is wrong."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        protocol, sep, number = item.rpartition(":")
        protocol = protocol.lower() if sep else ""
        if protocol and protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol '{protocol}' in '{item}'; use one of {', '.join(sorted(PROTOCOLS))}")
        if not number.isdigit() or not 0 < int(number) < 65536:
            raise ValueError(f"'{item}' is not a port; write [PROTOCOL:]PORT, e.g. http:9080")
        specs.append(ServicePortSpec(int(number), protocol))
    return tuple(specs)
