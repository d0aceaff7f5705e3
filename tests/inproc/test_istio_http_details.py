"""Where a request gets what it gets on an Istio cluster, driven as a user drives it:
`minimesh up --no-docker` with plain HTTP servers on 127.0.0.1 and a real HTTP client.

Redirect ports come from the Gateway server (never minimesh's own listening port), the
matched prefix is replaced by `prefixRewrite`, `withoutHeaders` with `regex: "*"` means
"header absent", an `httpsRedirect` server answers 301 with no VirtualService bound, and a
cookie hash with a `ttl` sets the cookie and sticks to the endpoint it picked. `validate`
and `explain` agree with what the daemon does.
"""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp

from tests.inproc.conftest import Daemon, StartDaemon, StartUpstream, minimesh
from tests.inproc.upstreams import Backend

MESH = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: web}
spec:
  selector: {istio: ingressgateway}
  servers:
  - {port: {number: 80, name: http, protocol: HTTP}, hosts: [b.example.com]}
  - {port: {number: 85, name: http-alt, protocol: HTTP}, hosts: [c.example.com]}
  - {port: {number: 80, name: http-secure, protocol: HTTP}, hosts: [secure.example.com], tls: {httpsRedirect: true}}
---
apiVersion: v1
kind: Service
metadata: {name: svc}
spec: {selector: {app: svc}, ports: [{name: http, port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc
  trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: sticky, ttl: 1h, path: /}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [b.example.com, c.example.com]
  gateways: [web]
  http:
  - match: [{uri: {prefix: /foo}}]
    redirect: {derivePort: FROM_REQUEST_PORT}
  - match: [{uri: {prefix: /tls}}]
    redirect: {derivePort: FROM_REQUEST_PORT, scheme: https}
  - match: [{uri: {prefix: /old/}}]
    redirect: {prefixRewrite: /new/}
  - match: [{uri: {prefix: /canary}, withoutHeaders: {x-canary: {regex: "*"}}}]
    directResponse: {status: 200, body: {string: stable}}
  - match: [{uri: {prefix: /canary}}]
    directResponse: {status: 200, body: {string: canary}}
  - route: [{destination: {host: svc, port: {number: 9080}}}]
"""

SET_COOKIE = re.compile(r'sticky="([0-9a-f]{16})"; Max-Age=3600; Path=/; HttpOnly')
"""Envoy's Set-Cookie for `httpCookie {name: sticky, ttl: 1h, path: /}`: 16 hex digits, quoted."""


def entry(name: str, upstream: Backend) -> str:
    return f"""---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}}}
spec: {{address: 127.0.0.1, ports: {{http: {upstream.port}}}, labels: {{app: svc}}}}
"""


async def mesh_file(tmp_path: Path, upstreams: StartUpstream) -> Path:
    a, b = await upstreams("a"), await upstreams("b")
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH + entry("svc-a", a) + entry("svc-b", b))
    return path


async def get(daemon: Daemon, host: str, path: str, **headers: str) -> aiohttp.ClientResponse:
    """One request on a connection of its own, no redirect followed, no cookie kept."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.get(daemon.gateway + path, headers={"Host": host, **headers}, allow_redirects=False) as response,
    ):
        await response.read()
        return response


async def test_redirect_locations_are_the_ones_istio_gives(
    tmp_path: Path, start_daemon: StartDaemon, upstreams: StartUpstream
) -> None:
    daemon = await start_daemon(await mesh_file(tmp_path, upstreams))
    cases = [
        # derivePort FROM_REQUEST_PORT: the Gateway server's port, 80 left out for http
        ("b.example.com", "/foo", "http://b.example.com/foo"),
        # ... a port the client wrote in the Host header stays when none is derived (Envoy keeps the Host)
        ("b.example.com:80", "/foo", "http://b.example.com:80/foo"),
        ("c.example.com", "/foo", "http://c.example.com:85/foo"),
        # ... and the local port the client reached minimesh on never takes the server's place
        (f"c.example.com:{daemon.gateway_port}", "/foo", "http://c.example.com:85/foo"),
        # a scheme change keeps 80, which is no default for https
        ("b.example.com", "/tls", "https://b.example.com:80/tls"),
        # prefixRewrite: the matched prefix replaced, the rest and the query kept
        ("b.example.com", "/old/page?x=1", "http://b.example.com/new/page?x=1"),
    ]
    for host, path, location in cases:
        response = await get(daemon, host, path)
        assert (response.status, response.headers["location"]) == (301, location), (host, path)
    assert "has no effect locally" not in daemon.stderr()


async def test_without_headers_star_means_the_header_is_absent(
    tmp_path: Path, start_daemon: StartDaemon, upstreams: StartUpstream
) -> None:
    daemon = await start_daemon(await mesh_file(tmp_path, upstreams))
    plain = await get(daemon, "b.example.com", "/canary")
    assert (plain.status, await plain.text()) == (200, "stable")
    for value in ("1", ""):
        flagged = await get(daemon, "b.example.com", "/canary", **{"x-canary": value})
        assert (flagged.status, await flagged.text()) == (200, "canary")


async def test_an_https_redirect_server_answers_301_without_a_virtual_service(
    tmp_path: Path, start_daemon: StartDaemon, upstreams: StartUpstream
) -> None:
    daemon = await start_daemon(await mesh_file(tmp_path, upstreams))
    response = await get(daemon, "secure.example.com", "/cart?id=7")
    assert (response.status, response.headers["location"]) == (301, "https://secure.example.com/cart?id=7")
    with_port = await get(daemon, f"secure.example.com:{daemon.gateway_port}", "/cart")
    assert with_port.headers["location"] == f"https://secure.example.com:{daemon.gateway_port}/cart"
    assert (await get(daemon, "other.example.com", "/cart")).status == 404


async def test_a_cookie_with_a_ttl_is_set_and_then_sticks(
    tmp_path: Path, start_daemon: StartDaemon, upstreams: StartUpstream
) -> None:
    daemon = await start_daemon(await mesh_file(tmp_path, upstreams))
    pinned: dict[str, str] = {}
    for _ in range(16):
        first = await get(daemon, "b.example.com", "/")
        assert first.status == 200
        cookie = SET_COOKIE.fullmatch(first.headers["set-cookie"])
        assert cookie is not None, first.headers["set-cookie"]
        pinned[cookie.group(1)] = await first.text()
    assert len(pinned) == 16, "each new connection gets a cookie of its own"
    assert set(pinned.values()) == {"a", "b"}, "new clients spread over the endpoints"
    for value, endpoint in list(pinned.items())[:4]:
        for _ in range(5):
            again = await get(daemon, "b.example.com", "/", Cookie=f'theme=dark; sticky="{value}"')
            assert await again.text() == endpoint
            assert "set-cookie" not in again.headers


async def test_validate_and_explain_agree(tmp_path: Path, upstreams: StartUpstream) -> None:
    path = await mesh_file(tmp_path, upstreams)
    validated = minimesh("validate", "-f", str(path))
    assert validated.returncode == 0, validated.stdout
    assert "get 404" not in validated.stdout and "no effect locally" not in validated.stdout
    explained = minimesh("explain", "-f", str(path), "--gateway", "web", "GET", "http://c.example.com/foo")
    assert (
        "301 to http://c.example.com:85/foo "
        "(derivePort FROM_REQUEST_PORT: port 85 of the Gateway server the request matched)"
    ) in explained.stdout
    secure = minimesh("explain", "-f", str(path), "--gateway", "web", "GET", "http://secure.example.com/cart")
    assert "301 to https://secure.example.com/cart" in secure.stdout
    sticky = minimesh("explain", "-f", str(path), "--gateway", "web", "GET", "http://b.example.com/")
    assert 'answers with Set-Cookie: sticky="VALUE"; Max-Age=3600; Path=/; HttpOnly' in sticky.stdout
