"""Helpers for tests that ship with the package: small HTTP upstreams on 127.0.0.1.

`start_upstream(name)` serves every path on an ephemeral port, records each request, and
answers as its settable `behaviour` says (status, delay, body, headers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Recorded:
    """One request an upstream received; header names are lower-case."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How an upstream answers: `body` None means the upstream's name."""

    status: int = 200
    delay: float = 0.0
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class Upstream:
    """A running upstream: where it listens, what it received, how it answers next."""

    def __init__(self, name: str, behaviour: Behaviour) -> None:
        self.name = name
        self.behaviour = behaviour
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.most_in_flight = 0
        """The most requests this upstream was serving at once (circuit-breaking tests read it)."""
        self.port = 0
        self._runner: web.ServerRunner | None = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        path = request.raw_path
        self.requests.append(Recorded(request.method, path, {k.lower(): v for k, v in request.headers.items()}, body))
        behaviour = self.behaviour
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if behaviour.delay:
                await asyncio.sleep(behaviour.delay)
        finally:
            self.in_flight -= 1
        text = self.name.encode() if behaviour.body is None else behaviour.body
        return web.Response(status=behaviour.status, body=text, headers=dict(behaviour.headers))

    async def start(self, host: str = "127.0.0.1") -> None:
        self._runner = web.ServerRunner(web.Server(self._handle), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Upstream {self.name} on 127.0.0.1:{self.port} requests={len(self.requests)} {self.behaviour}>"


async def start_upstream(name: str, behaviour: Behaviour | None = None) -> Upstream:
    """An upstream named `name` listening on an ephemeral 127.0.0.1 port; `close()` it after."""
    upstream = Upstream(name, behaviour or Behaviour())
    await upstream.start()
    return upstream
