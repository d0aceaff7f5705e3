"""The daemon's listener set: the ingress gateway and the explicit sidecars (one per workload
annotated with a sidecar port), started, pointed at each new snapshot and reconciled with it."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Iterable
from dataclasses import replace

from minimesh.config.labels import SIDECAR_PORT_ANNOTATION
from minimesh.dataplane.exchange import Listener, ListenerKind
from minimesh.dataplane.listeners import Serving
from minimesh.dataplane.proxy import Proxy
from minimesh.errors import MinimeshError
from minimesh.registry.model import Workload
from minimesh.routing.snapshot import Snapshot

log = logging.getLogger("minimesh")

SIDECAR_HOST = "127.0.0.1"
"""Explicit sidecars listen on loopback only: local processes reach them through HTTP_PROXY."""


class DaemonError(MinimeshError):
    """Why the daemon cannot start, as one line that names the cause and the fix."""


def sidecars_of(workloads: Iterable[Workload]) -> dict[int, Workload]:
    """The explicit sidecars wanted, by port: one per workload annotated with a sidecar port."""
    wanted: dict[int, Workload] = {}
    for workload in workloads:
        if workload.sidecar_port is not None and workload.sidecar_port not in wanted:
            wanted[workload.sidecar_port] = workload
    return wanted


def bind_problem(exc: OSError, host: str, port: int, fix: str) -> str:
    """The one line a failed bind is reported as."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is in use; {fix}"
    if exc.errno == errno.EACCES:
        return f"no permission to listen on port {port} (ports below 1024 need root); {fix}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}: not an address of this machine; pass --bind"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}; {fix}"


def sidecar_fix(workload: Workload) -> str:
    return f"change the {SIDECAR_PORT_ANNOTATION} annotation of WorkloadEntry/{workload.name}"


class ListenerSet:
    """The gateway and the sidecars over one proxy; `failed` holds the sidecar ports the last
    reconcile could not listen on, and why (the daemon is then not ready)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.gateway: Serving | None = None
        self.sidecars: dict[int, Serving] = {}
        self.failed: dict[int, str] = {}

    def servings(self) -> list[Serving]:
        return [s for s in (self.gateway, *self.sidecars.values()) if s is not None]

    async def start(self, snapshot: Snapshot, bind: str, gateway_port: int) -> None:
        """The gateway on `bind`:`gateway_port` and the sidecars `snapshot` asks for;
        DaemonError if one cannot listen."""
        listener = Listener(ListenerKind.GATEWAY, gateway_port, snapshot.ingress_gateways, address=bind)
        gateway = Serving(self.proxy, listener)
        self.gateway = gateway
        try:
            await gateway.start(bind, gateway_port)
        except OSError as exc:
            raise DaemonError(bind_problem(exc, bind, gateway_port, "pass --gateway-port")) from exc
        gateway.listener = replace(listener, port=gateway.address[1])
        bound = (
            ", ".join(snapshot.ingress_gateways)
            or "none: no Gateway selects istio: ingressgateway, so every request gets 404"
        )
        log.info("minimesh: gateway on http://%s:%d (Gateway %s)", bind, gateway.address[1], bound)
        for port, workload in sidecars_of(snapshot.workloads).items():
            problem = await self._start_sidecar(port, workload)
            if problem:
                raise DaemonError(problem)

    async def _start_sidecar(self, port: int, workload: Workload) -> str:
        """Listen for `workload`'s outbound traffic on 127.0.0.1:`port`; the problem, or ""."""
        serving = Serving(self.proxy, Listener(ListenerKind.SIDECAR, port, workload=workload, address=SIDECAR_HOST))
        try:
            await serving.start(SIDECAR_HOST, port)
        except OSError as exc:
            return bind_problem(exc, SIDECAR_HOST, port, sidecar_fix(workload))
        self.sidecars[port] = serving
        log.info("minimesh: sidecar of %s on %s:%d (HTTP_PROXY=http://%s:%d)", workload, SIDECAR_HOST, port,
                 SIDECAR_HOST, port)  # fmt: skip
        return ""

    def retarget(self, snapshot: Snapshot) -> None:
        """Point the listeners that stay at what `snapshot` says of them; in the loop step of the swap."""
        if self.gateway is not None and self.gateway.listener.gateways != snapshot.ingress_gateways:
            self.gateway.listener = replace(self.gateway.listener, gateways=snapshot.ingress_gateways)
        wanted = sidecars_of(snapshot.workloads)
        for port, serving in self.sidecars.items():
            workload = wanted.get(port)
            if workload is not None and serving.listener.workload != workload:
                serving.listener = replace(serving.listener, workload=workload)

    async def reconcile(self, snapshot: Snapshot) -> None:
        """Stop the sidecars no workload asks for any more; start the new ones."""
        wanted = sidecars_of(snapshot.workloads)
        for port in [p for p in self.sidecars if p not in wanted]:
            serving = self.sidecars.pop(port)
            log.info("minimesh: sidecar of %s on %s:%d stopped", serving.listener.name, SIDECAR_HOST, port)
            await serving.stop()
        self.failed = {}
        for port, workload in wanted.items():
            if port not in self.sidecars:
                problem = await self._start_sidecar(port, workload)
                if problem:
                    log.error("minimesh: error: %s", problem)
                    self.failed[port] = problem

    async def close(self) -> None:
        await asyncio.gather(*(serving.stop() for serving in self.servings()))
