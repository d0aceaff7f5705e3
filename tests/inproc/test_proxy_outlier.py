"""Outlier detection: endpoints ejected after consecutive 5xx or gateway errors, for the
base ejection time times the number of ejections (on an injected clock), within `maxEjectionPercent` but
always at least one host, and 503 `UH` `no healthy upstream` when none is left."""

from __future__ import annotations

from tests.clocks import FakeClock
from tests.inproc.upstreams import Backend, Reply, refused_port, running_mesh, service, web_route

CLUSTER = "outbound|9080||web.default.svc.cluster.local"


def mesh_yaml(outlier: str, *members: str) -> str:
    rule = f"""
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web}}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    outlierDetection: {outlier}
"""
    return service("web", *members) + rule + web_route("retries: {attempts: 0}")


async def test_consecutive_5xx_ejects_the_failing_endpoint_and_the_others_keep_serving() -> None:
    bad, good = Backend("bad", Reply(status=500)), Backend("good")
    yaml = mesh_yaml("{consecutive5xxErrors: 3, baseEjectionTime: 1s}", "bad", "good")
    async with running_mesh(yaml, {"bad": bad, "good": good}, clock=FakeClock()) as mesh:
        statuses = [(await mesh.get("/")).status for _ in range(30)]
        assert statuses.count(500) == 3
        assert statuses[statuses.index(500) :].count(500) == 3
        assert statuses[-20:] == [200] * 20, "zero errors once the endpoint is ejected"
        host = mesh.proxy.upstreams.clusters[CLUSTER].hosts[("127.0.0.1", bad.port)]
        assert host.ejected and host.times_ejected == 1


async def test_a_success_resets_the_streak() -> None:
    app = Backend("app")
    app.replies.extend(Reply(status=s) for s in (500, 500, 200, 500, 500, 200))
    async with running_mesh(mesh_yaml("{consecutive5xxErrors: 3}", "app"), {"app": app}, clock=FakeClock()) as mesh:
        assert [(await mesh.get("/")).status for _ in range(8)] == [500, 500, 200, 500, 500, 200, 200, 200]


async def test_consecutive_gateway_errors_count_502_503_504_only() -> None:
    flaky, good = Backend("flaky"), Backend("good")
    flaky.replies.extend(Reply(status=s) for s in (500, 502, 500, 503, 504))
    yaml = mesh_yaml("{consecutiveGatewayErrors: 2, consecutive5xxErrors: 0}", "flaky", "good")
    async with running_mesh(yaml, {"flaky": flaky, "good": good}, clock=FakeClock()) as mesh:
        for _ in range(12):
            await mesh.get("/")
        assert len(flaky.seen) == 5, "500 and 502 interleaved never trip it; 503 then 504 do"
        state = mesh.proxy.upstreams.clusters[CLUSTER].hosts[("127.0.0.1", flaky.port)]
        assert state.ejected


async def test_ejection_lasts_base_time_times_the_number_of_ejections() -> None:
    clock = FakeClock()
    bad, good = Backend("bad", Reply(status=503)), Backend("good")
    yaml = mesh_yaml("{consecutive5xxErrors: 1, baseEjectionTime: 1s}", "bad", "good")
    async with running_mesh(yaml, {"bad": bad, "good": good}, clock=clock) as mesh:

        async def hits_on_bad(requests: int) -> int:
            before = len(bad.seen)
            for _ in range(requests):
                await mesh.get("/")
            return len(bad.seen) - before

        assert await hits_on_bad(4) == 1  # ejected for 1s
        clock.advance(0.9)
        assert await hits_on_bad(4) == 0
        clock.advance(0.2)
        assert await hits_on_bad(4) == 1  # back, fails again: ejected for 2s
        clock.advance(1.5)
        assert await hits_on_bad(4) == 0
        clock.advance(0.6)
        assert await hits_on_bad(4) == 1
        host = mesh.proxy.upstreams.clusters[CLUSTER].hosts[("127.0.0.1", bad.port)]
        assert host.times_ejected == 3


async def test_max_ejection_percent_still_ejects_one_host() -> None:
    backends = {name: Backend(name, Reply(status=500)) for name in ("a", "b", "c")}
    yaml = mesh_yaml("{consecutive5xxErrors: 2, maxEjectionPercent: 10}", *backends)
    async with running_mesh(yaml, backends, clock=FakeClock()) as mesh:
        for _ in range(30):
            assert (await mesh.get("/")).status == 500
        hosts = mesh.proxy.upstreams.clusters[CLUSTER].hosts.values()
        assert sum(h.ejected for h in hosts) == 1


async def test_max_ejection_percent_caps_the_ejected_share() -> None:
    backends = {name: Backend(name, Reply(status=500)) for name in ("a", "b", "c", "d")}
    yaml = mesh_yaml("{consecutive5xxErrors: 1, maxEjectionPercent: 50}", *backends)
    async with running_mesh(yaml, backends, clock=FakeClock()) as mesh:
        for _ in range(20):
            await mesh.get("/")
        hosts = mesh.proxy.upstreams.clusters[CLUSTER].hosts.values()
        assert sum(h.ejected for h in hosts) == 2
        assert len([b for b in backends.values() if len(b.seen) > 2]) == 2


async def test_the_only_replica_ejected_gives_503_UH_no_healthy_upstream() -> None:
    clock = FakeClock()
    app = Backend("app", Reply(status=500))
    async with running_mesh(
        mesh_yaml("{consecutive5xxErrors: 2, baseEjectionTime: 1s}", "app"), {"app": app}, clock=clock
    ) as mesh:
        assert [(await mesh.get("/")).status for _ in range(2)] == [500, 500]
        answer = await mesh.get("/")
        assert (answer.status, answer.body) == (503, b"no healthy upstream")
        assert answer.headers["content-type"] == "text/plain"
        assert mesh.last().flag_text == "UH"
        assert len(app.seen) == 2
        clock.advance(1.01)
        app.reply = Reply()
        assert (await mesh.get("/")).status == 200


async def test_connect_failures_count_as_errors() -> None:
    good = Backend("good")
    ports = {"dead": refused_port(), "dead_LABELS": "version: v0"}
    yaml = mesh_yaml("{consecutive5xxErrors: 2}", "dead", "good")
    async with running_mesh(yaml, {"good": good}, ports=ports, clock=FakeClock()) as mesh:
        statuses = [(await mesh.get("/")).status for _ in range(12)]
        assert statuses.count(503) == 2
        assert statuses[-8:] == [200] * 8
        assert {e.flag_text for e in mesh.exchanges if e.status == 503} == {"UF"}
