"""The traffic policies driven as a user drives them: `minimesh up --no-docker -f DIR` with a
Gateway, Services and WorkloadEntries of plain HTTP servers on 127.0.0.1, and real clients.

Splits land within statistical tolerance, header routes always win, faults hit their
percentage, circuit breaking never lets more through than configured, an endpoint that
answers 500 is ejected, and mirrors arrive with `-shadow`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp

from tests.inproc.conftest import StartDaemon, StartUpstream
from tests.inproc.upstreams import Backend, Reply, until

HEAD = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: web}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: v1
kind: Service
metadata: {name: svc}
spec: {selector: {app: svc}, ports: [{name: http, port: 9080}]}
"""


def entry(name: str, upstream: Backend, version: str, app: str = "svc") -> str:
    return f"""---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}}}
spec: {{address: 127.0.0.1, ports: {{http: {upstream.port}}}, labels: {{app: {app}, version: {version}}}}}
"""


def write(folder: Path, *parts: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "mesh.yaml").write_text(HEAD + "".join(parts))
    return folder


SUBSETS = """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
"""


async def statuses(url: str, count: int, concurrency: int = 8, **kwargs: object) -> list[tuple[int, str]]:
    results: list[tuple[int, str]] = []
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            async with session.get(url, **kwargs) as response:  # type: ignore[arg-type]
                results.append((response.status, await response.text()))

        for start in range(0, count, concurrency):
            await asyncio.gather(*(one() for _ in range(min(concurrency, count - start))))
    return results


async def test_splits_land_within_tolerance_and_header_routes_always_win(
    tmp_path: Path, start_daemon: StartDaemon, upstreams: StartUpstream
) -> None:
    v1, v2 = await upstreams("v1"), await upstreams("v2")
    routes = """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: ["*"]
  gateways: [web]
  http:
  - match: [{headers: {x-tester: {exact: "yes"}}}]
    route: [{destination: {host: svc, subset: v2, port: {number: 9080}}}]
  - route:
    - {destination: {host: svc, subset: v1, port: {number: 9080}}, weight: 80}
    - {destination: {host: svc, subset: v2, port: {number: 9080}}, weight: 20}
"""
    daemon = await start_daemon(write(tmp_path / "mesh", routes, SUBSETS, entry("a", v1, "v1"), entry("b", v2, "v2")))
    split = Counter(body for _, body in await statuses(f"{daemon.gateway}/", 1000))
    assert set(split) == {"v1", "v2"}
    assert 150 <= split["v2"] <= 250, split
    tester = Counter(body for _, body in await statuses(f"{daemon.gateway}/", 200, headers={"x-tester": "yes"}))
    assert tester == Counter({"v2": 200})


async def test_faults_hit_their_percentage(tmp_path: Path, start_daemon: StartDaemon, upstreams: StartUpstream) -> None:
    v1 = await upstreams("v1")
    routes = """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: ["*"]
  gateways: [web]
  http:
  - fault: {abort: {httpStatus: 418, percentage: {value: 30}}}
    route: [{destination: {host: svc, port: {number: 9080}}}]
"""
    daemon = await start_daemon(write(tmp_path / "mesh", routes, entry("a", v1, "v1")))
    results = Counter(await statuses(f"{daemon.gateway}/", 1000))
    assert set(results) == {(200, "v1"), (418, "fault filter abort")}
    assert 240 <= results[(418, "fault filter abort")] <= 360, results


async def test_circuit_breaking_never_lets_more_through_than_configured(
    tmp_path: Path, start_daemon: StartDaemon, upstreams: StartUpstream
) -> None:
    slow = await upstreams("slow")
    slow.reply = Reply(hold=True)
    routes = """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: ["*"]
  gateways: [web]
  http:
  - route: [{destination: {host: svc, port: {number: 9080}}}]
    retries: {attempts: 0}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
"""
    daemon = await start_daemon(write(tmp_path / "mesh", routes, entry("a", slow, "v1")))
    overloaded = 0
    async with aiohttp.ClientSession() as session:

        async def one() -> int:
            nonlocal overloaded
            async with session.get(f"{daemon.gateway}/") as response:
                body = await response.text()
                if response.status == 503:
                    assert response.headers["x-envoy-overloaded"] == "true"
                    assert body == "upstream connect error or disconnect/reset before headers. reset reason: overflow"
                    overloaded += 1
                return response.status

        # the first request is held at the upstream, the second waits for its connection: the
        # other eight overflow; only then is the upstream let go
        requests = asyncio.gather(*(one() for _ in range(10)))
        await until(lambda: overloaded == 8, "eight requests answered 503 overflow")
        slow.release()
        codes = Counter(await requests)
    assert slow.max_active == 1
    assert codes[200] >= 1 and codes[503] == overloaded >= 7, codes


async def test_an_endpoint_answering_500_is_ejected(
    tmp_path: Path, start_daemon: StartDaemon, upstreams: StartUpstream
) -> None:
    good, bad = await upstreams("good"), await upstreams("bad")
    bad.reply = Reply(status=500)
    routes = """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: ["*"]
  gateways: [web]
  http:
  - route: [{destination: {host: svc, port: {number: 9080}}}]
    retries: {attempts: 0}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}
"""
    daemon = await start_daemon(write(tmp_path / "mesh", routes, entry("a", good, "v1"), entry("b", bad, "v1")))
    first = Counter(code for code, _ in await statuses(f"{daemon.gateway}/", 20, concurrency=1))
    assert first[500] == 3, first
    after = Counter(await statuses(f"{daemon.gateway}/", 50, concurrency=4))
    assert after == Counter({(200, "good"): 50})
    async with aiohttp.ClientSession() as session, session.get(f"{daemon.admin}/clusters") as response:
        clusters = (await response.json())["clusters"]
    health = {e["port"]: e["health"] for c in clusters if c["host"].startswith("svc.") for e in c["endpoints"]}
    assert health == {good.port: "healthy", bad.port: "ejected"}


async def test_mirrors_arrive_with_shadow(tmp_path: Path, start_daemon: StartDaemon, upstreams: StartUpstream) -> None:
    main, shadow = await upstreams("main"), await upstreams("shadow")
    shadow.reply = Reply(hold=True)
    routes = """---
apiVersion: v1
kind: Service
metadata: {name: copy}
spec: {selector: {app: copy}, ports: [{name: http, port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: ["*"]
  gateways: [web]
  http:
  - route: [{destination: {host: svc, port: {number: 9080}}}]
    mirror: {host: copy, port: {number: 9080}}
    mirrorPercentage: {value: 100}
"""
    mesh = write(tmp_path / "mesh", routes, entry("a", main, "v1"), entry("s", shadow, "v1", app="copy"))
    daemon = await start_daemon(mesh)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{daemon.gateway}/orders", headers={"host": "shop.local"}) as response,
    ):
        assert (response.status, await response.text()) == (200, "main"), "answered while the mirror is held"
    await until(lambda: shadow.seen, "the mirrored copy")
    shadow.release()
    assert [r.headers["host"] for r in shadow.seen] == ["shop.local-shadow"]
    assert [r.path for r in shadow.seen] == ["/orders"]
