"""Kubernetes and Istio names, one rule each for every module that reads them: a host's
FQDN, host matching and precedence, `gateways` references, and how a resource is named.

Pure and shared by config checks, routing, explain and the admin API, so `validate` and the
proxy can never read the same name two ways.
"""

from __future__ import annotations

import ipaddress
from typing import Protocol

CLUSTER_DOMAIN = "svc.cluster.local"
MESH = "mesh"
"""The reserved gateway name of every sidecar."""


def is_ip(text: str) -> bool:
    """Is `text` an IP address (IPv6 with or without brackets), not a name?"""
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def fqdn(host: str, namespace: str) -> str:
    """Istio's ResolveShortnameToFQDN: a name without a dot is a service of `namespace`; a
    dotted name (`reviews.prod`) is kept as written, lower-cased."""
    host = host.lower()
    if host == "*" or "." in host or is_ip(host):
        return host
    return f"{host}.{namespace}.{CLUSTER_DOMAIN}"


def host_covers(pattern: str, host: str) -> bool:
    """Istio host matching: `*` covers all, `*.x.com` covers `a.x.com` and `*.a.x.com`."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return host.endswith(suffix) and (not host.startswith("*") or len(host) >= len(pattern))
    return pattern == host


def specificity(domain: str) -> tuple[int, int]:
    """Envoy's virtual host order: exact before wildcard, a longer wildcard first."""
    return (1 if domain.startswith("*") else 0, -len(domain))


def gateway_ref(name: str, namespace: str) -> str:
    """A `gateways` entry → `namespace/name` (or `mesh`), as Istio resolves it."""
    if name == MESH:
        return MESH
    if "/" in name:
        ns, _, short = name.partition("/")
        return f"{namespace if ns == '.' else ns}/{short}"
    if "." in name:
        short, ns = name.split(".")[:2]
        return f"{ns}/{short}"
    return f"{namespace}/{name}"


class Named(Protocol):
    """A resource's identity: a document, or its parsed metadata."""

    @property
    def kind(self) -> str: ...

    @property
    def namespace(self) -> str: ...

    @property
    def name(self) -> str: ...


def resource_ref(resource: Named) -> str:
    """`Kind/namespace/name`, the namespace always written: how routing, `x-minimesh-route`
    and `/config_dump` name a resource."""
    return f"{resource.kind}/{resource.namespace}/{resource.name}"


def shown_ref(resource: Named) -> str:
    """`Kind/name`, or `Kind/namespace/name` outside the default namespace: how a problem
    names its resource in `validate`'s output."""
    if resource.namespace == "default":
        return f"{resource.kind}/{resource.name}"
    return resource_ref(resource)
