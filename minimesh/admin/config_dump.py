"""`/config_dump`: the snapshot in force as JSON, with its generation and the source
file:line:col of every rule, services with their endpoints, and every cluster with its policy.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from minimesh.config.model import DestinationRule, Gateway
from minimesh.config.names import resource_ref
from minimesh.registry.model import Workload
from minimesh.routing.snapshot import CompiledVirtualService, MeshService, Snapshot


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    """`/config_dump`: the generation, every resource with the `file:line:col` of each
    rule, services with their endpoints, and every cluster with its policy."""
    mesh = snapshot.mesh
    return {
        "generation": snapshot.generation,
        "virtualServices": [_virtual_service_json(vs) for vs in snapshot.virtual_services],
        "destinationRules": [_destination_rule_json(dr) for dr in mesh.destination_rules],
        "gateways": [_gateway_json(name, gw) for name, gw in snapshot.gateways.items()],
        "serviceEntries": [
            {"ref": resource_ref(se.meta), "location": str(se.meta.location), "hosts": list(se.hosts)}
            for se in mesh.service_entries
        ],
        "services": [_service_json(svc) for svc in snapshot.services.values()],
        "clusters": [
            {
                "name": c.name,
                "endpoints": [str(e) for e in c.endpoints],
                "policy": c.policy.describe(),
                "problem": c.problem,
            }
            for c in snapshot.clusters.values()
        ],
        "workloads": [_workload_json(w) for w in snapshot.workloads],
        "meshConfig": {
            "outboundTrafficPolicy": mesh.mesh_config.outbound_mode,
            "defaultRetry": _plain(mesh.mesh_config.default_retry),
        },
    }


def _destination_rule_json(dr: DestinationRule) -> dict[str, Any]:
    return {
        "ref": resource_ref(dr.meta),
        "location": str(dr.meta.location),
        "host": dr.host,
        "trafficPolicy": _plain(dr.traffic_policy),
        "subsets": [{"name": s.name, "labels": dict(s.labels), "location": str(s.location)} for s in dr.subsets],
    }


def _gateway_json(name: str, gw: Gateway) -> dict[str, Any]:
    return {
        "ref": f"Gateway/{name}",
        "location": str(gw.meta.location),
        "selector": dict(gw.selector),
        "servers": [{"port": s.port.number, "protocol": s.port.protocol, "hosts": list(s.hosts)} for s in gw.servers],
    }


def _service_json(svc: MeshService) -> dict[str, Any]:
    return {
        "host": svc.host,
        "namespace": svc.namespace,
        "origin": svc.origin,
        "external": svc.external,
        "ports": [str(p) for p in svc.ports],
        "endpoints": {str(port): [str(e) for e in found] for port, found in svc.endpoints.items()},
    }


def _workload_json(w: Workload) -> dict[str, Any]:
    return {
        "name": w.name,
        "namespace": w.namespace,
        "address": w.address,
        "service": w.service,
        "labels": dict(w.labels),
        "origin": w.origin,
    }


def _plain(value: object) -> Any:
    """A config value as JSON-able data (dataclasses to dicts, tuples to lists)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return str(value)


def _virtual_service_json(vs: CompiledVirtualService) -> dict[str, Any]:
    return {
        "ref": vs.ref,
        "location": str(vs.meta.location),
        "hosts": list(vs.hosts),
        "gateways": sorted(vs.gateways),
        "http": [
            {
                "ref": route.ref,
                "name": route.name,
                "location": str(route.location),
                "match": [block.describe() for block in route.blocks],
                "route": [
                    {"host": d.host, "subset": d.subset, "port": d.port, "weight": d.weight} for d in route.destinations
                ],
                "redirect": _plain(route.redirect),
                "directResponse": route.direct_response.status if route.direct_response else None,
                "timeout": route.timeout,
                "retries": str(route.retries) if route.retries else None,
                "fault": _plain(route.fault),
                "mirrors": [{"host": mi.destination.host, "percentage": mi.percentage} for mi in route.mirrors],
            }
            for route in vs.routes
        ],
    }
