"""The mirror step, as Envoy's request mirroring: a copy of the request goes to the mirror's
cluster with Host `HOST-shadow`, in the background, its response read and dropped; mirrors
are bounded and never hold up the request they copy.
"""

from __future__ import annotations

import asyncio
import random

from minimesh.dataplane.http1 import UpstreamClosed
from minimesh.dataplane.respond import Head
from minimesh.dataplane.upstream import UpstreamFailure, Upstreams
from minimesh.routing.pick import hash_key
from minimesh.routing.request import RequestView
from minimesh.routing.snapshot import Cluster, Endpoint, Mirror

MIRRORS_IN_FLIGHT = 64
"""Mirrored requests in flight at once; more are dropped (mirrors must never slow traffic)."""
MIRROR_TIMEOUT = 30.0


class Mirrors:
    """The mirrored copies in flight, owned here and cancelled on close."""

    def __init__(self, upstreams: Upstreams, rng: random.Random) -> None:
        self.upstreams = upstreams
        self.rng = rng
        self.tasks: set[asyncio.Task[None]] = set()

    def copy(self, mirror: Mirror, view: RequestView, head: Head, body: bytes) -> None:
        """Send a copy of the request (head, in the mirror cluster's protocol, and whole body)
        to the mirror's cluster."""
        cluster = mirror.cluster
        if len(self.tasks) >= MIRRORS_IN_FLIGHT or not cluster.endpoints:
            return
        state = self.upstreams.state(cluster)
        consistent = cluster.policy.load_balancer.consistent_hash
        endpoint = state.pick(cluster, self.rng, hash_key(consistent, view) if consistent is not None else None)
        if endpoint is None:
            return
        task = asyncio.get_running_loop().create_task(self._send(cluster, endpoint, head.shadow(), body))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, cluster: Cluster, endpoint: Endpoint, head: Head, body: bytes) -> None:
        try:
            async with asyncio.timeout(MIRROR_TIMEOUT):
                response = await head.send(self.upstreams, cluster, endpoint, body, 0)
                while await response.body.read():
                    pass
        except (UpstreamFailure, UpstreamClosed, TimeoutError):
            return

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def __repr__(self) -> str:
        return f"<Mirrors in flight={len(self.tasks)}>"
