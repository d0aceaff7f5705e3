"""A scoped overlay changes only what it overrides: for small random meshes (services, their
VirtualServices, an unscoped overlay) and a random scope (VirtualServices replacing some of
the mesh's, or new), the snapshot a scoped request is routed by and the default one decide
every request to a host the scope does not touch the same way, to the last step of the trace.

Both snapshots are compiled as the daemon compiles them: the files, then `Layers.layers()`
(applied, unscoped overlays) or `Layers.layers(scope)` (and then the scope's own). The
services, their endpoints and subsets are loaded once; only the VirtualServices vary."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimesh.config import model as m
from minimesh.config.load import Layer, load_layers
from minimesh.config.source import parse_text
from minimesh.overlays import Layers, Overlay
from minimesh.registry.static import workloads_of
from minimesh.routing.compile import compile_snapshot
from minimesh.routing.match import trace
from minimesh.routing.request import RequestView
from minimesh.routing.snapshot import Forward, Snapshot

SERVICES = ("a", "b", "c", "d")
HOSTS = (*SERVICES, "elsewhere.example")
PATHS = ("/", "/x/1", "/y")
USERS = (None, "ann")
NAMES = tuple(f"vs{number}" for number in range(6))
SCOPE = "alice"


def _service(name: str, number: int) -> list[dict[str, Any]]:
    """A Service `name` on 9080, two endpoints (v1, v2) and a DestinationRule with both subsets."""
    documents: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
         "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 9080}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": name},
         "spec": {"host": name, "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")]}},
    ]  # fmt: skip
    documents += [
        {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": f"{name}-{version}"},
         "spec": {"address": f"10.0.{number}.{last}", "ports": {"http": 9080},
                  "labels": {"app": name, "version": version}}}
        for last, version in ((1, "v1"), (2, "v2"))
    ]  # fmt: skip
    return documents


@st.composite
def destinations(draw: st.DrawFn) -> list[dict[str, Any]]:
    hosts = draw(st.lists(st.sampled_from(SERVICES), min_size=1, max_size=2, unique=True))
    found: list[dict[str, Any]] = []
    for host in hosts:
        destination: dict[str, Any] = {"host": host}
        subset = draw(st.sampled_from((None, "v1", "v2")))
        if subset:
            destination["subset"] = subset
        found.append({"destination": destination})
    if len(found) == 2:
        weight = draw(st.integers(0, 100))
        found[0]["weight"], found[1]["weight"] = weight, 100 - weight
    return found


MATCHES = st.sampled_from(
    (None, [{"uri": {"prefix": "/x"}}], [{"uri": {"exact": "/y"}}], [{"headers": {"x-user": {"exact": "ann"}}}])
)


@st.composite
def rule(draw: st.DrawFn) -> dict[str, Any]:
    found: dict[str, Any] = {"route": draw(destinations())}
    match = draw(MATCHES)
    if match:
        found["match"] = match
    if draw(st.booleans()):
        found["timeout"] = draw(st.sampled_from(("1s", "250ms")))
    return found


@st.composite
def virtual_service(draw: st.DrawFn, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name},
        "spec": {"hosts": [draw(st.sampled_from(SERVICES))], "http": draw(st.lists(rule(), min_size=1, max_size=3))},
    }


@st.composite
def virtual_services(draw: st.DrawFn, max_size: int) -> list[dict[str, Any]]:
    names = draw(st.lists(st.sampled_from(NAMES), max_size=max_size, unique=True))
    return [draw(virtual_service(name)) for name in names]


def layer(documents: list[dict[str, Any]], source: str) -> Layer:
    parsed, problems = parse_text(yaml.safe_dump_all(documents, sort_keys=False), source)
    assert problems == []
    return parsed


def _services() -> m.Mesh:
    loaded = load_layers(
        [layer([d for number, name in enumerate(SERVICES) for d in _service(name, number)], "svc.yaml")]
    )
    assert [str(p) for p in loaded.errors] == []
    return loaded.mesh


MESH = _services()
WORKLOADS = workloads_of(MESH)


def compiled(layers: list[Layer]) -> Snapshot:
    """The snapshot of the services with the VirtualServices of `layers` merged over each other."""
    loaded = load_layers(layers)
    assert [str(p) for p in loaded.errors] == []
    mesh = dataclasses.replace(MESH, virtual_services=loaded.mesh.virtual_services)
    return compile_snapshot(mesh, WORKLOADS, generation=2)


def hosts_of(documents: list[dict[str, Any]]) -> set[str]:
    return {host for document in documents for host in document["spec"]["hosts"]}


def decision(snapshot: Snapshot, request: RequestView) -> tuple[object, ...]:
    """What routing decides for `request`, as `explain` tells it, and where a forward goes."""
    outcome, steps = trace(snapshot, request, random.Random(5))
    where: tuple[object, ...] = ()
    if isinstance(outcome, Forward):
        where = (outcome.route_ref, outcome.cluster.name, outcome.cluster.endpoints, outcome.timeout)
    return (type(outcome).__name__, *where, tuple(str(step) for step in steps))


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    files=virtual_services(max_size=4),
    unscoped=virtual_services(max_size=1),
    scoped=virtual_services(max_size=3).filter(bool),
)
def test_a_scoped_snapshot_agrees_with_the_default_where_the_scope_does_not_reach(
    files: list[dict[str, Any]], unscoped: list[dict[str, Any]], scoped: list[dict[str, Any]]
) -> None:
    base = layer(files, "mesh.yaml")
    layers = Layers()
    for overlay, scope in ((unscoped, None), (scoped, SCOPE)):
        if overlay:
            overlay_id = layers.next_id()
            layers.overlays[overlay_id] = Overlay(overlay_id, tuple(layer(overlay, overlay_id)), None, scope)
    default = compiled([base, *layers.layers()])
    scoped_snapshot = compiled([base, *layers.layers(SCOPE)])

    in_force = {vs.meta.name: vs.hosts for vs in scoped_snapshot.mesh.virtual_services}
    assert all(in_force[d["metadata"]["name"]] == tuple(d["spec"]["hosts"]) for d in scoped), "the scope's own win"
    below = {d["metadata"]["name"]: d for d in files} | {d["metadata"]["name"]: d for d in unscoped}
    replaced = [below[d["metadata"]["name"]] for d in scoped if d["metadata"]["name"] in below]
    touched = hosts_of(scoped) | hosts_of(replaced)
    compared = 0
    for host in HOSTS:
        if host in touched:
            continue
        for path in PATHS:
            for user in USERS:
                headers = {"x-user": user} if user else {}
                request = RequestView.from_url("GET", f"http://{host}:9080{path}", headers, source=None)
                assert decision(scoped_snapshot, request) == decision(default, request), (host, path, user)
                compared += 1
    assert compared >= len(PATHS) * len(USERS), "the host outside the registry is never touched"
