"""Fault injection as Envoy's fault filter does it under Istio: abort (`FI`, body `fault
filter abort`), delay (`DI`) before the abort, nothing without a percentage, timeout and
retries off on a faulted route — and minimesh's deterministic `minimesh.dev/fault-first`."""

from __future__ import annotations

import textwrap
import time

from minimesh.config.check import check_mesh
from minimesh.config.load import load_layers
from minimesh.config.source import parse_text
from tests.inproc.upstreams import Backend, Reply, running_mesh, service

APP = service("web", "app")


def route(fault: str, extra: str = "", annotations: str = "") -> str:
    meta = f"{{name: web, annotations: {{{annotations}}}}}" if annotations else "{name: web}"
    return f"""
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {meta}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - match: [{{uri: {{prefix: /faulty}}}}]
    fault: {fault}
    route: [{{destination: {{host: web}}}}]
{textwrap.indent(extra, "    ")}
  - route: [{{destination: {{host: web}}}}]
"""


async def test_abort_answers_with_the_configured_status_and_never_reaches_the_upstream() -> None:
    app = Backend("app")
    async with running_mesh(APP + route("{abort: {httpStatus: 503, percentage: {value: 100}}}"), {"app": app}) as mesh:
        answer = await mesh.get("/faulty")
        assert (answer.status, answer.body) == (503, b"fault filter abort")
        assert answer.headers["content-type"] == "text/plain"
        assert answer.headers["content-length"] == "18"
        assert mesh.last().flag_text == "FI"
        assert mesh.last().cluster == "outbound|9080||web.default.svc.cluster.local"
        assert app.seen == []
        assert (await mesh.get("/fine")).status == 200


async def test_delay_holds_the_request_then_forwards_it() -> None:
    app = Backend("app")
    async with running_mesh(APP + route("{delay: {fixedDelay: 0.2s, percentage: {value: 100}}}"), {"app": app}) as mesh:
        started = time.monotonic()
        answer = await mesh.get("/faulty")
        assert time.monotonic() - started >= 0.2
        assert (answer.status, answer.body) == (200, b"app")
        assert mesh.last().flag_text == "DI"
        assert len(app.seen) == 1


async def test_delay_comes_before_the_abort() -> None:
    fault = "{delay: {fixedDelay: 0.15s, percentage: {value: 100}}, abort: {httpStatus: 418, percentage: {value: 100}}}"
    app = Backend("app")
    async with running_mesh(APP + route(fault), {"app": app}) as mesh:
        started = time.monotonic()
        answer = await mesh.get("/faulty")
        assert time.monotonic() - started >= 0.15
        assert (answer.status, answer.body) == (418, b"fault filter abort")
        assert mesh.last().flag_text == "DI,FI"
        assert app.seen == []


async def test_a_fault_without_percentage_injects_nothing() -> None:
    fault = "{delay: {fixedDelay: 5s}, abort: {httpStatus: 500}}"
    app = Backend("app")
    async with running_mesh(APP + route(fault), {"app": app}) as mesh:
        for _ in range(10):
            assert (await mesh.get("/faulty")).status == 200
        assert {e.flag_text for e in mesh.exchanges} == {"-"}


async def test_a_faulted_route_has_its_timeout_and_retries_off() -> None:
    fault = "{abort: {httpStatus: 500, percentage: {value: 0}}}"
    extra = "timeout: 0.1s\nretries: {attempts: 3, retryOn: 5xx}"
    app = Backend("app", Reply(status=503, delay=0.3))
    async with running_mesh(APP + route(fault, extra), {"app": app}) as mesh:
        answer = await mesh.get("/faulty")
        assert answer.status == 503
        assert answer.body == b"app"
        assert len(app.seen) == 1
        assert mesh.last().flag_text == "-"


async def test_fault_percentage_draws_from_the_seeded_rng() -> None:
    fault = "{abort: {httpStatus: 500, percentage: {value: 30}}}"
    runs = []
    for _ in range(2):
        async with running_mesh(APP + route(fault), {"app": Backend("app")}, seed=3) as mesh:
            runs.append([(await mesh.get("/faulty")).status for _ in range(100)])
    aborted = runs[0].count(500)
    assert 15 <= aborted <= 45, aborted
    assert runs[0] == runs[1]


async def test_fault_first_faults_exactly_the_first_n_requests_of_each_route() -> None:
    fault = "{delay: {fixedDelay: 0.01s}, abort: {httpStatus: 503, percentage: {value: 0}}}"
    yaml = APP + route(fault, annotations='minimesh.dev/fault-first: "3"')
    app = Backend("app")
    async with running_mesh(yaml, {"app": app}) as mesh:
        statuses = [(await mesh.get("/faulty")).status for _ in range(6)]
        assert statuses == [503, 503, 503, 200, 200, 200]
        assert [e.flag_text for e in mesh.exchanges] == ["DI,FI"] * 3 + ["-"] * 3
        assert (await mesh.get("/other")).status == 200
        assert len(app.seen) == 4

        mesh.reload(yaml)
        assert (await mesh.get("/faulty")).status == 200, "a reload that changes nothing keeps the count"

        changed = APP + route(fault, annotations='minimesh.dev/fault-first: "1"')
        mesh.reload(changed)
        assert [(await mesh.get("/faulty")).status for _ in range(3)] == [503, 200, 200]


async def test_fault_first_ignores_a_full_percentage_after_n() -> None:
    fault = "{abort: {httpStatus: 500, percentage: {value: 100}}}"
    yaml = APP + route(fault, annotations='minimesh.dev/fault-first: "1"')
    async with running_mesh(yaml, {"app": Backend("app")}) as mesh:
        assert [(await mesh.get("/faulty")).status for _ in range(4)] == [500, 200, 200, 200]


def test_fault_first_must_be_a_count() -> None:
    text = APP.replace("$app_LABELS", "version: v1").replace("$app", "9999") + route(
        "{abort: {httpStatus: 500}}", annotations='minimesh.dev/fault-first: "three"'
    )
    documents, syntax = parse_text(textwrap.dedent(text), "mesh.yaml")
    assert syntax == []
    loaded = load_layers([documents])
    found = [str(p) for p in check_mesh(loaded.mesh, loaded.documents) if p.severity == "error"]
    assert len(found) == 1
    assert "annotation minimesh.dev/fault-first must be a whole number of requests" in found[0]
    assert found[0].startswith("mesh.yaml:")
