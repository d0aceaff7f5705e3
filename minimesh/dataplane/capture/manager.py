"""Capture for every injected container, kept in step with the registry.

For each container workload with a network namespace: a `Namespace` thread, listeners on
15001 (outbound) and 15006 (inbound) made inside it, then istio-init's rules. A container
that leaves loses all three; stopping the daemon removes every rule it installed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from minimesh.dataplane.capture.netns import (
    INBOUND_PORT,
    OUTBOUND_PORT,
    CaptureError,
    Namespace,
    abort_bypassing,
    install_rules,
    netns_unavailable,
    owners,
    remove_rules,
)
from minimesh.dataplane.exchange import Listener, ListenerKind
from minimesh.dataplane.listeners import Serving
from minimesh.dataplane.proxy import Proxy
from minimesh.registry.model import Workload
from minimesh.registry.watch import DockerUnavailable, DockerWatcher, connect

log = logging.getLogger("minimesh.capture")


def inbound_ports(workload: Workload) -> tuple[int, ...]:
    return tuple(sorted({spec.number for spec in workload.service_ports}))


@dataclass(slots=True)
class Captured:
    """One container under capture: its namespace thread, its two listeners, its ports."""

    workload: Workload
    namespace: Namespace
    outbound: Serving
    inbound: Serving
    ports: tuple[int, ...]

    def __repr__(self) -> str:
        ports = ",".join(map(str, self.ports))
        return f"<Captured {self.workload.name} netns={self.namespace.path} inbound ports {ports}>"


def scrub_left_rules(alive: Callable[[int], bool]) -> list[str]:
    """Remove the capture rules a killed daemon left in running containers; the containers cleaned.
    Rules of a daemon that is still `alive` (by the pid in their comment) are its own to remove.

    Needs root and a Docker Engine; without them there is nothing minimesh could have installed."""
    if netns_unavailable():
        return []
    try:
        client = connect()
    except DockerUnavailable:
        return []
    cleaned = []
    for container_id, record in DockerWatcher(client, lambda _: None).list_containers().items():
        pid = (record.get("State") or {}).get("Pid") or 0
        path = f"/proc/{pid}/ns/net"
        if not pid or any(_still_running(owner, alive) for owner in owners(path) if owner != os.getpid()):
            continue
        if remove_rules(path):
            cleaned.append(str(record.get("Name") or container_id).lstrip("/"))
    return cleaned


def _still_running(pid: int, alive: Callable[[int], bool], grace: float = 3.0) -> bool:
    """Is daemon `pid` running, after `grace` seconds for one that is still dying (killed just now)?"""
    deadline = time.monotonic() + grace
    while alive(pid):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)
    return False


def _install_and_abort(path: str, ports: tuple[int, ...]) -> None:
    install_rules(path, ports)
    abort_bypassing(path, ports)


async def put_rules_in(path: str, ports: tuple[int, ...]) -> None:
    """Put the rules in (and abort what bypasses them) in a thread a cancellation cannot orphan:
    cancelled (the daemon stopping), it waits for the thread and takes the rules out again
    before passing the cancellation on, so no rule outlives the daemon that put it in."""
    work = asyncio.ensure_future(asyncio.to_thread(_install_and_abort, path, ports))
    try:
        await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        await asyncio.to_thread(remove_rules, path)
        raise


class NetnsCapture:
    """Transparent capture of every injected container workload, by its netns path."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.captured: dict[str, Captured] = {}
        self.failed: dict[str, str] = {}
        self._lock = asyncio.Lock()

    @staticmethod
    def wanted(workloads: Iterable[Workload]) -> dict[str, Workload]:
        return {w.netns: w for w in workloads if w.inject and w.netns and w.origin == "container"}

    async def reconcile(self, workloads: Iterable[Workload]) -> None:
        """Capture the containers that joined, release those that left, follow label changes."""
        wanted = self.wanted(workloads)
        async with self._lock:
            try:
                for path in [p for p in self.captured if p not in wanted]:
                    await self._release(self.captured.pop(path))
                self.failed = {p: reason for p, reason in self.failed.items() if p in wanted}
                for path, workload in wanted.items():
                    current = self.captured.get(path)
                    if current is None:
                        await self._capture(path, workload)
                    elif current.workload != workload:
                        await self._update(current, workload)
            finally:
                self._served()

    def _served(self) -> None:
        """Tell the proxy which endpoints a server sidecar serves: the captured containers."""
        self.proxy.upstreams.sidecars = frozenset(captured.workload.address for captured in self.captured.values())

    async def _capture(self, path: str, workload: Workload) -> None:
        namespace = Namespace(path)
        outbound = Serving(
            self.proxy, Listener(ListenerKind.SIDECAR, OUTBOUND_PORT, workload=workload), transparent=True
        )
        inbound_listener = Listener(ListenerKind.INBOUND, INBOUND_PORT, workload=workload, dial=namespace.connect)
        inbound = Serving(self.proxy, inbound_listener, transparent=True)
        ports = inbound_ports(workload)
        try:
            await asyncio.to_thread(namespace.start)
            await outbound.start("", 0, sock=await namespace.listen(OUTBOUND_PORT))
            await inbound.start("", 0, sock=await namespace.listen(INBOUND_PORT))
            await put_rules_in(path, ports)
        except (asyncio.CancelledError, CaptureError, OSError) as exc:
            await asyncio.gather(outbound.stop(), inbound.stop())
            namespace.stop()
            if isinstance(exc, asyncio.CancelledError):
                raise
            reason = f"cannot capture container {workload.name}: {exc}"
            if self.failed.get(path) != reason:
                log.error("minimesh: %s", reason)
            self.failed[path] = reason
            return
        self.failed.pop(path, None)
        self.captured[path] = Captured(workload, namespace, outbound, inbound, ports)
        log.info("minimesh: capturing %s: outbound → %d, inbound ports %s → %d", workload.name, OUTBOUND_PORT,
                 ",".join(map(str, ports)) or "none", INBOUND_PORT)  # fmt: skip

    async def _update(self, current: Captured, workload: Workload) -> None:
        current.workload = workload
        current.outbound.listener = replace(current.outbound.listener, workload=workload)
        current.inbound.listener = replace(current.inbound.listener, workload=workload)
        ports = inbound_ports(workload)
        if ports != current.ports:
            await asyncio.to_thread(install_rules, current.namespace.path, ports)
            current.ports = ports

    async def _release(self, captured: Captured) -> None:
        await asyncio.gather(captured.outbound.stop(), captured.inbound.stop())
        captured.namespace.stop()
        self.proxy.forget_workload(captured.workload)
        try:
            await asyncio.to_thread(remove_rules, captured.namespace.path)
        except CaptureError as exc:
            log.debug("removing rules of %s: %s", captured.workload.name, exc)
        log.info("minimesh: released %s", captured.workload.name)

    def servings(self) -> list[Serving]:
        return [s for c in self.captured.values() for s in (c.outbound, c.inbound)]

    async def close(self) -> None:
        """Release every container: listeners closed, threads ended, rules removed."""
        async with self._lock:
            await asyncio.gather(*(self._release(c) for c in self.captured.values()))
            self.captured.clear()
            self._served()

    def __repr__(self) -> str:
        return f"<NetnsCapture captured={len(self.captured)} failed={len(self.failed)}>"
