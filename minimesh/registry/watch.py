"""The only Docker I/O of the registry: list containers, follow events, publish workloads.

The docker SDK blocks, so listing and the event stream run in worker threads; the event
loop only receives finished results. Every change is published as the whole current set
(workloads and skipped containers), debounced so a burst of events is one update.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from minimesh.config.labels import SERVICE_LABEL
from minimesh.errors import MinimeshError
from minimesh.registry.docker import Skipped, ready, workload_of
from minimesh.registry.model import Workload

log = logging.getLogger("minimesh.registry")

EVENTS = frozenset(
    {"start", "restart", "die", "stop", "kill", "destroy", "pause", "unpause", "health_status", "connect", "disconnect"}
)
DEBOUNCE = 0.05


class DockerUnavailable(MinimeshError):
    """No Docker Engine answers."""


@dataclass(frozen=True, slots=True)
class Discovered:
    """The mesh's containers right now: workloads that are ready, and those skipped with why."""

    workloads: tuple[Workload, ...] = ()
    skipped: tuple[Skipped, ...] = ()


Publish = Callable[[Discovered], None]


def connect(client_factory: Callable[[], Any] | None = None) -> Any:
    """A docker SDK client that answers, or DockerUnavailable with how to get one."""
    try:
        if client_factory is None:
            import docker

            client_factory = docker.from_env
        client = client_factory()
        client.ping()
    except Exception as exc:
        message = f"no Docker Engine answers ({exc.__class__.__name__}); start Docker, or run with --no-docker"
        raise DockerUnavailable(message) from exc
    return client


class DockerWatcher:
    """Keeps `records` (container id → inspect record) in step with the engine and publishes."""

    def __init__(self, client: Any, publish: Publish, network: str | None = None, labels: tuple[str, ...] = ()) -> None:
        self.client = client
        self.publish = publish
        self.network = network
        self.labels = labels
        """Extra `KEY=VALUE` labels a container must carry to be seen (one compose project, say)."""
        self.records: dict[str, Mapping[str, Any]] = {}
        self._stream: Any = None
        self._stopped = threading.Event()
        self._last: Discovered | None = None
        self.listed_at = 0.0
        """When the containers were first listed (wall clock): events are read from then on."""

    def _inspect(self, container_id: str) -> Mapping[str, Any] | None:
        try:
            record: Mapping[str, Any] = self.client.api.inspect_container(container_id)
        except Exception as exc:
            if exc.__class__.__name__ == "NotFound":
                return None
            raise
        return record

    def list_containers(self) -> dict[str, Mapping[str, Any]]:
        """Every container with the service label, inspected (blocking: call from a thread)."""
        self.listed_at = min(self.listed_at, time.time()) if self.listed_at else time.time()
        found: dict[str, Mapping[str, Any]] = {}
        for summary in self.client.api.containers(filters={"label": [SERVICE_LABEL, *self.labels]}):
            record = self._inspect(summary["Id"])
            if record is not None:
                found[summary["Id"]] = record
        return found

    def _wanted(self, labels: Mapping[str, str]) -> bool:
        if SERVICE_LABEL not in labels:
            return False
        return all(labels.get(key) == value for key, _, value in (item.partition("=") for item in self.labels))

    def discovered(self) -> Discovered:
        """The workloads of the ready containers; bad labels are kept aside."""
        workloads: list[Workload] = []
        skipped: list[Skipped] = []
        for record in self.records.values():
            if not (record.get("State") or {}).get("Running"):
                continue
            found = workload_of(record, self.network)
            if isinstance(found, Skipped):
                skipped.append(found)
            elif found is not None and ready(record):
                workloads.append(found)
        return Discovered(tuple(sorted(workloads, key=lambda w: w.name)), tuple(skipped))

    def _events(self) -> Iterator[Mapping[str, Any]]:
        """Events from just before the containers were listed on: a container that started
        between the listing and the subscription is seen too (a repeat is harmless)."""
        since = int(self.listed_at) - 1 if self.listed_at else None
        self._stream = self.client.events(decode=True, since=since, filters={"type": ["container", "network"]})
        yield from self._stream

    async def run(self) -> None:
        """List, publish, then follow events until cancelled."""
        loop = asyncio.get_running_loop()
        if not self.records:
            self.records = await asyncio.to_thread(self.list_containers)
        self._emit()
        changed: asyncio.Queue[str] = asyncio.Queue()
        reader = threading.Thread(target=self._read_events, args=(loop, changed), name="docker events", daemon=True)
        reader.start()
        try:
            while True:
                ids = {await changed.get()}
                await asyncio.sleep(DEBOUNCE)
                while not changed.empty():
                    ids.add(changed.get_nowait())
                for container_id in ids:
                    record = await asyncio.to_thread(self._inspect, container_id)
                    labels = ((record or {}).get("Config") or {}).get("Labels") or {}
                    if record is None or not self._wanted(labels):
                        self.records.pop(container_id, None)
                    else:
                        self.records[container_id] = record
                self._emit()
        finally:
            self.stop()

    def _read_events(self, loop: asyncio.AbstractEventLoop, changed: asyncio.Queue[str]) -> None:
        try:
            for event in self._events():
                if self._stopped.is_set():
                    return
                action = str(event.get("Action") or event.get("status") or "").partition(":")[0]
                if action not in EVENTS:
                    continue
                actor = event.get("Actor") or {}
                container_id = (actor.get("Attributes") or {}).get("container") or actor.get("ID") or event.get("id")
                if container_id:
                    loop.call_soon_threadsafe(changed.put_nowait, str(container_id))
        except Exception as exc:
            if not self._stopped.is_set():
                log.error("lost the Docker event stream: %s; restart minimesh to rediscover containers", exc)

    def _emit(self) -> None:
        current = self.discovered()
        if current == self._last:
            return
        previous = {s.container for s in self._last.skipped} if self._last else set()
        for skipped in current.skipped:
            if skipped.container not in previous:
                log.warning("%s", skipped)
        self._last = current
        self.publish(current)

    def stop(self) -> None:
        self._stopped.set()
        stream = self._stream
        if stream is not None and hasattr(stream, "close"):
            try:
                stream.close()
            except Exception as exc:
                log.debug("closing the Docker event stream: %s", exc)

    def __repr__(self) -> str:
        return f"<DockerWatcher containers={len(self.records)} network={self.network or 'any'}>"
