"""The mirror step, as Envoy's request mirroring: a copy of the request goes to the mirror's
cluster with Host `HOST-shadow`, in the background, its body streamed alongside the request's
(Envoy's streaming shadow), its response read and dropped. Mirrors are bounded in number, and
their answers never hold up the request they copy.
"""

from __future__ import annotations

import asyncio
import random

from minimesh.dataplane.http1 import Body, UpstreamClosed
from minimesh.dataplane.replay import Replay
from minimesh.dataplane.respond import Head
from minimesh.dataplane.upstream import UpstreamFailure, Upstreams
from minimesh.routing.pick import hash_key
from minimesh.routing.request import RequestView
from minimesh.routing.snapshot import Cluster, Endpoint, Mirror

MIRRORS_IN_FLIGHT = 64
"""Mirrored requests in flight at once; more are dropped, so that copies whose mirror is slow
never pile up in the daemon (a mirror that never answers, on a route with no timeout, holds
its copies until its connections close)."""


class Mirrors:
    """The mirrored copies in flight, owned here and cancelled on close."""

    def __init__(self, upstreams: Upstreams, rng: random.Random) -> None:
        self.upstreams = upstreams
        self.rng = rng
        self.tasks: set[asyncio.Task[None]] = set()

    def copy(self, mirror: Mirror, view: RequestView, head: Head, body: bytes | Replay, timeout: float | None) -> None:
        """Send a copy of the request (head, in the mirror cluster's protocol, and body: whole,
        or a copy of one still arriving) to the mirror's cluster, given up past `timeout`
        (the route's, as Envoy gives its shadows; None: no limit)."""
        cluster = mirror.cluster
        if len(self.tasks) >= MIRRORS_IN_FLIGHT or not cluster.endpoints:
            return
        state = self.upstreams.state(cluster)
        consistent = cluster.policy.load_balancer.consistent_hash
        endpoint = state.pick(cluster, self.rng, hash_key(consistent, view) if consistent is not None else None)
        if endpoint is None:
            return
        replay = body if isinstance(body, Replay) else None
        copy = body.tee() if isinstance(body, Replay) else body
        task = asyncio.get_running_loop().create_task(
            self._send(cluster, endpoint, head.shadow(), copy, replay, timeout)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(
        self,
        cluster: Cluster,
        endpoint: Endpoint,
        head: Head,
        body: Body | bytes,
        replay: Replay | None,
        timeout: float | None,
    ) -> None:
        """One copy sent and its answer dropped; a copy of a body still arriving (`body`, from
        `replay`) is given up when done, so that it never holds the request up."""
        try:
            async with asyncio.timeout(timeout):
                response = await head.send(self.upstreams, cluster, endpoint, body, 0)
                while await response.body.read():
                    pass
        except (UpstreamFailure, UpstreamClosed, TimeoutError):
            return
        finally:
            if replay is not None and isinstance(body, Body):
                replay.untee(body)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def __repr__(self) -> str:
        return f"<Mirrors in flight={len(self.tasks)}>"
