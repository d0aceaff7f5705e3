"""The admin API (`http://127.0.0.1:15000`): health, readiness, the config in force, clusters,
stats, Prometheus metrics, the log level, `apply` and overlays. A bad request gets a 4xx
saying what is wrong (a config: one located line per problem), never a 5xx.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import hdrs, web

from minimesh.admin.config_dump import snapshot_json
from minimesh.admin.metrics import Metrics
from minimesh.config.durations import parse_duration
from minimesh.config.source import MAX_DOCUMENT_BYTES, decode, too_large
from minimesh.dataplane.current import Current
from minimesh.dataplane.exchange import Listener
from minimesh.dataplane.upstream import ClusterState, Upstreams
from minimesh.errors import ConfigError
from minimesh.overlays import Layers
from minimesh.routing.snapshot import Cluster, ServicePort, Snapshot

log = logging.getLogger("minimesh")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
CONFIG_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "application/json"})
"""The Content-Types of a body of documents (as the Kubernetes API server takes them; none at all
is read as YAML too). Only UTF-8 (or its subset ASCII) is read."""
CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


@dataclass(frozen=True, slots=True)
class ConfigState:
    """Where the config in force came from, when, and the error of the last reload (None: it worked)."""

    sources: tuple[str, ...]
    loaded_at: float
    error: tuple[str, ...] | None = None


class Runtime(Protocol):
    """What the admin API reads of a running daemon."""

    @property
    def current(self) -> Current[Snapshot]: ...

    @property
    def upstreams(self) -> Upstreams: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def config(self) -> ConfigState: ...

    @property
    def ready(self) -> bool: ...

    @property
    def reloads_rejected(self) -> int: ...

    @property
    def internal_errors(self) -> int: ...

    def listeners(self) -> list[Listener]: ...

    @property
    def layers(self) -> Layers: ...

    async def apply(self, text: str, source: str) -> int: ...

    async def reset_applied(self) -> int: ...

    async def add_overlay(self, text: str, ttl: float | None, scope: str | None) -> tuple[str, int]: ...

    async def remove_overlay(self, overlay_id: str) -> bool: ...


def iso_time(moment: float) -> str:
    stamp = datetime.fromtimestamp(moment, UTC)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{stamp.microsecond // 1000:03d}Z"


def listener_json(listener: Listener) -> dict[str, Any]:
    return {
        "kind": listener.kind,
        "name": listener.name,
        "address": listener.address,
        "port": listener.port,
        "workload": listener.workload.name if listener.workload else None,
        "gateways": list(listener.gateways),
    }


def config_dump(runtime: Runtime) -> dict[str, Any]:
    """The snapshot in force, with where it came from and the last reload's error."""
    config = runtime.config
    dump = snapshot_json(runtime.current.get())
    dump["sources"] = list(config.sources)
    dump["loadedAt"] = iso_time(config.loaded_at)
    dump["lastReloadError"] = list(config.error) if config.error is not None else None
    dump["reloadsRejected"] = runtime.reloads_rejected
    dump["internalErrors"] = runtime.internal_errors
    dump["listeners"] = [listener_json(listener) for listener in runtime.listeners()]
    return dump


def cluster_json(cluster: Cluster, state: ClusterState | None, now: float, port: ServicePort | None) -> dict[str, Any]:
    """One cluster: its service port's protocol (declared, or detected from the first bytes),
    its policy, each endpoint's health and load, and its circuit-breaker counters."""
    endpoints = []
    for endpoint in cluster.endpoints:
        host = state.hosts.get((endpoint.address, endpoint.port)) if state else None
        ejected = host is not None and host.ejected_until is not None and host.ejected_until > now
        endpoints.append(
            {
                "address": endpoint.address,
                "port": endpoint.port,
                "workload": endpoint.workload.name if endpoint.workload else None,
                "health": "ejected" if ejected else "healthy",
                "timesEjected": host.times_ejected if host else 0,
                "activeRequests": host.in_flight if host else 0,
                "connections": host.connections if host else 0,
                "successes": host.successes if host else 0,
                "failures": host.failures if host else 0,
            }
        )
    return {
        "name": cluster.name,
        "host": cluster.host,
        "port": cluster.port,
        "subset": cluster.subset,
        "protocol": port.protocol if port is not None else None,
        "protocolDeclared": port.declared if port is not None else None,
        "policy": cluster.policy.describe(),
        "problem": cluster.problem or None,
        "endpoints": endpoints,
        "circuitBreakers": {
            "activeRequests": state.requests if state else 0,
            "pending": state.pending if state else 0,
            "connections": state.connections if state else 0,
            "retries": state.retries if state else 0,
            "overflows": state.overflows if state else 0,
        },
    }


def cluster_stats(cluster: Cluster, state: ClusterState | None, now: float) -> list[tuple[str, int]]:
    """Envoy's names for one cluster's live counters."""
    hosts = [state.hosts.get((e.address, e.port)) for e in cluster.endpoints] if state else []
    ejected = sum(1 for h in hosts if h is not None and h.ejected_until is not None and h.ejected_until > now)
    prefix = f"cluster.{cluster.name}."
    values = {
        "upstream_cx_active": state.connections if state else 0,
        "upstream_rq_active": state.requests if state else 0,
        "upstream_rq_pending_active": state.pending if state else 0,
        "upstream_rq_pending_overflow": state.overflows if state else 0,
        "outlier_detection.ejections_active": ejected,
        "outlier_detection.ejections_enforced_total": sum(h.times_ejected for h in hosts if h is not None),
        "membership_total": len(cluster.endpoints),
        "membership_healthy": len(cluster.endpoints) - ejected,
    }
    return [(prefix + name, value) for name, value in values.items()]


class AdminApi:
    """The handlers, over one daemon's state."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def ready(self, request: web.Request) -> web.Response:
        if self.runtime.ready:
            return web.Response(text="LIVE\n")
        return web.Response(status=503, text="NOT READY\n")

    async def config_dump(self, request: web.Request) -> web.Response:
        return web.json_response(config_dump(self.runtime), dumps=_dumps)

    async def clusters(self, request: web.Request) -> web.Response:
        runtime = self.runtime
        now = runtime.upstreams.clock()
        states = runtime.upstreams.clusters
        snapshot = runtime.current.get()
        found = [
            cluster_json(c, states.get(c.name), now, _service_port(snapshot, c)) for c in snapshot.clusters.values()
        ]
        return web.json_response({"clusters": found}, dumps=_dumps)

    async def stats(self, request: web.Request) -> web.Response:
        runtime = self.runtime
        snapshot = runtime.current.get()
        now = runtime.upstreams.clock()
        states = runtime.upstreams.clusters
        lines = [
            ("minimesh.config_generation", snapshot.generation),
            ("minimesh.config_reloads_rejected", runtime.reloads_rejected),
            ("minimesh.internal_errors", runtime.internal_errors),
        ]
        for cluster in snapshot.clusters.values():
            lines += cluster_stats(cluster, states.get(cluster.name), now)
        lines += runtime.metrics.cluster_stats(snapshot.clusters)
        return web.Response(text="".join(f"{name}: {value}\n" for name, value in sorted(lines)))

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.runtime.metrics.prometheus(), headers={"content-type": PROMETHEUS})

    async def logging_get(self, request: web.Request) -> web.Response:
        return web.json_response({"level": logging.getLevelName(log.getEffectiveLevel()).lower()})

    async def logging_post(self, request: web.Request) -> web.Response:
        wanted = request.query.get("level", "").lower()
        level = LEVELS.get(wanted)
        if level is None:
            choices = "|".join(LEVELS)
            return web.Response(status=400, text=f"error: level must be one of {choices}, got '{wanted}'\n")
        log.setLevel(level)
        log.info("minimesh: log level is now %s", wanted)
        return web.json_response({"level": wanted})

    async def apply(self, request: web.Request) -> web.Response:
        source = request.query.get("source", "applied")
        if not source.isprintable():
            return web.Response(status=400, text="error: source must be a file name, without control characters\n")
        try:
            generation = await self.runtime.apply(await _documents(request, source), source)
        except ConfigError as exc:
            return _problems(exc, with_file=True)
        applied = [d.ref for d in self.runtime.layers.applied.values()]
        return web.json_response({"generation": generation, "applied": applied})

    async def reset_applied(self, request: web.Request) -> web.Response:
        return web.json_response({"generation": await self.runtime.reset_applied(), "applied": []})

    async def overlays_get(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        found = [o.as_json(now) for o in self.runtime.layers.overlays.values()]
        return web.json_response({"overlays": found}, dumps=_dumps)

    async def overlays_post(self, request: web.Request) -> web.Response:
        ttl = None
        if "ttl" in request.query:
            try:
                ttl = parse_duration(request.query["ttl"])
            except ValueError as exc:
                return web.Response(status=400, text=f"1:1: error: ttl: {exc}\n")
        try:
            text = await _documents(request, "overlay")
            overlay_id, generation = await self.runtime.add_overlay(text, ttl, request.query.get("scope"))
        except ConfigError as exc:
            return _problems(exc, with_file=False)
        return web.json_response({"id": overlay_id, "generation": generation}, status=201)

    async def overlays_delete(self, request: web.Request) -> web.Response:
        if await self.runtime.remove_overlay(request.match_info["id"]):
            return web.Response(status=204)
        return web.Response(status=404, text=f"no overlay {request.match_info['id']}\n")


def _service_port(snapshot: Snapshot, cluster: Cluster) -> ServicePort | None:
    service = snapshot.services.get(cluster.host)
    return service.port(cluster.port) if service is not None else None


async def _documents(request: web.Request, source: str) -> str:
    """The body of an `apply` or overlay request: YAML or JSON documents in UTF-8, at most
    MAX_DOCUMENT_BYTES. 415 and 413 are raised here; bytes that are not UTF-8 are a ConfigError."""
    if hdrs.CONTENT_TYPE in request.headers:
        if request.content_type not in CONFIG_TYPES:
            raise web.HTTPUnsupportedMediaType(
                text=f"error: Content-Type {request.content_type} is neither YAML nor JSON; send the documents "
                "with Content-Type: application/yaml\n"
            )
        charset = (request.charset or "utf-8").lower()
        if charset not in CHARSETS:
            raise web.HTTPUnsupportedMediaType(text=f"error: charset {charset} is not read here; send UTF-8\n")
    length = request.content_length
    if length is not None and length > MAX_DOCUMENT_BYTES:
        raise web.HTTPRequestEntityTooLarge(
            MAX_DOCUMENT_BYTES, length, text=f"error: {too_large(length, source).message}\n"
        )
    try:
        data = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise web.HTTPRequestEntityTooLarge(
            MAX_DOCUMENT_BYTES, MAX_DOCUMENT_BYTES + 1, text=f"error: {too_large(None, source).message}\n"
        ) from exc
    text, undecodable = decode(data, source)
    if undecodable is not None:
        raise ConfigError([undecodable])
    return text


def _problems(exc: ConfigError, *, with_file: bool) -> web.Response:
    """400 with one `LINE:COL: error: MESSAGE` line per problem (the file too when it is not the body)."""
    lines = []
    for problem in exc.problems:
        text = str(problem)
        if not with_file and problem.location.file == "overlay":
            text = text.removeprefix("overlay:")
        lines.append(text)
    return web.Response(status=400, text="\n".join(lines) + "\n")


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2)


def build_app(runtime: Runtime) -> web.Application:
    """The admin web application over `runtime`."""
    api = AdminApi(runtime)
    app = web.Application(client_max_size=MAX_DOCUMENT_BYTES + 1)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/ready", api.ready)
    app.router.add_get("/config_dump", api.config_dump)
    app.router.add_get("/clusters", api.clusters)
    app.router.add_get("/stats", api.stats)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/logging", api.logging_get)
    app.router.add_post("/logging", api.logging_post)
    app.router.add_post("/apply", api.apply)
    app.router.add_delete("/apply", api.reset_applied)
    app.router.add_get("/overlays", api.overlays_get)
    app.router.add_post("/overlays", api.overlays_post)
    app.router.add_delete("/overlays/{id}", api.overlays_delete)
    return app
