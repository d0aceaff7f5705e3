"""What the four bookinfo services share: the headers they forward and how they serve.

Like Istio's bookinfo, each service forwards the request id, the trace headers and the
logged-in user so that the mesh can route and trace a whole page view.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

FORWARDED = (
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "x-ot-span-context",
    "end-user",
    "user-agent",
    "cookie",
)


def forwarded(request: web.Request) -> dict[str, str]:
    """The headers an outgoing call carries on from the incoming request."""
    return {name: value for name in FORWARDED if (value := request.headers.get(name)) is not None}


def hostname() -> str:
    return os.environ.get("HOSTNAME") or socket.gethostname()


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def client_session(app: web.Application) -> AsyncIterator[None]:
    """One HTTP client per service; `trust_env` so HTTP_PROXY (an explicit sidecar) is honoured."""
    app["client"] = aiohttp.ClientSession(trust_env=True)
    yield
    await app["client"].close()


def serve(app: web.Application) -> None:
    app.router.add_get("/health", health)
    port = int(os.environ.get("PORT", "9080"))
    web.run_app(app, host=os.environ.get("BIND", "0.0.0.0"), port=port, access_log=None, print=None)
