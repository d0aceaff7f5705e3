"""Timeouts and retries as Envoy's router applies Istio's policy: 504 `UT`, retries within the
route timeout, per-try timeouts, each `retryOn` condition, Istio's default policy, `URX`,
the body replayed on retry, another endpoint on retry — and the upstream failures Envoy
answers itself (`UF` refused, `UC` closed before headers)."""

from __future__ import annotations

import time

import aiohttp
import pytest
from aiohttp import web

from tests.inproc.upstreams import RESET, Backend, Hangup, Reply, Seen, refused_port, running_mesh, service, web_route

APP = service("web", "app")


def script(backend: Backend, *statuses: int) -> Backend:
    backend.replies.extend(Reply(status=s) for s in statuses)
    return backend


async def test_route_timeout_is_504_UT() -> None:
    app = Backend("app", Reply(hold=True))
    async with running_mesh(APP + web_route("timeout: 0.2s"), {"app": app}) as mesh:
        started = time.monotonic()
        answer = await mesh.get("/")
        assert time.monotonic() - started >= 0.2
        assert (answer.status, answer.body) == (504, b"upstream request timeout")
        assert answer.headers["content-type"] == "text/plain"
        assert mesh.last().flag_text == "UT"
        assert mesh.last().upstream_host == f"127.0.0.1:{app.port}"
        assert app.seen[0].all("x-envoy-expected-rq-timeout-ms") == ["200"]


async def test_the_route_timeout_covers_the_body_too() -> None:
    app = Backend("app")

    async def stalls(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-length": "10"})
        await response.prepare(request)
        await response.write(b"12345")
        await app.released.wait()
        await response.write(b"67890")
        return response

    app.handler = stalls
    async with running_mesh(APP + web_route("timeout: 0.3s"), {"app": app}) as mesh:
        started = time.monotonic()
        with pytest.raises(aiohttp.ClientPayloadError):
            await mesh.get("/")
        assert time.monotonic() - started >= 0.3
        assert (mesh.last().status, mesh.last().flag_text, mesh.last().bytes_sent) == (200, "UT", 5)


async def test_retries_count_against_the_route_timeout() -> None:
    # Each attempt alone fits in the route timeout, the two together do not: a timeout per
    # attempt would let the second answer 200. (Delays only ever run longer, so the 504 holds.)
    app = Backend("app")
    app.replies.extend([Reply(status=503, delay=0.3), Reply(status=200, delay=0.3)])
    policy = ("timeout: 0.5s", "retries: {attempts: 10, retryOn: 5xx}")
    async with running_mesh(APP + web_route(*policy), {"app": app}) as mesh:
        started = time.monotonic()
        answer = await mesh.get("/")
        assert time.monotonic() - started >= 0.5
        assert answer.status == 504
        assert mesh.last().flag_text == "UT"
        assert len(app.seen) <= 2


async def test_per_try_timeout_retries_a_slow_attempt() -> None:
    app = Backend("app")
    app.replies.append(Reply(hold=True))
    policy = "retries: {attempts: 2, perTryTimeout: 1s, retryOn: 5xx}"
    async with running_mesh(APP + web_route(policy), {"app": app}) as mesh:
        answer = await mesh.get("/")
        assert (answer.status, answer.body) == (200, b"app")
        assert [s.attempt for s in app.seen] == [1, 2]
        assert mesh.last().flag_text == "-"
        assert mesh.last().attempts == 2


async def test_each_try_is_told_what_is_left_of_the_route_timeout() -> None:
    # Envoy's setTimeoutHeaders: the first try is told the per-try timeout; the retry, sent
    # at least 0.4 s in, no more than what is left of the route's 5 s. A client's own value
    # is replaced; a route with no timeout tells nothing.
    app = Backend("app")
    app.replies.extend([Reply(status=503, delay=0.4), Reply(status=200)])
    policy = ("timeout: 5s", "retries: {attempts: 1, perTryTimeout: 4.8s, retryOn: 5xx}")
    async with running_mesh(APP + web_route(*policy), {"app": app}) as mesh:
        answer = await mesh.get("/", headers={"x-envoy-expected-rq-timeout-ms": "99"})
    assert (answer.status, [s.attempt for s in app.seen]) == (200, [1, 2])
    told = [s.all("x-envoy-expected-rq-timeout-ms") for s in app.seen]
    assert told[0] == ["4800"]
    assert len(told[1]) == 1 and 0 < int(told[1][0]) <= 4600
    untimed = Backend("app")
    async with running_mesh(APP + web_route(), {"app": untimed}) as mesh:
        await mesh.get("/")
    assert "x-envoy-expected-rq-timeout-ms" not in untimed.seen[0].headers


async def test_per_try_timeouts_exhaust_the_retries_UT_URX() -> None:
    app = Backend("app", Reply(hold=True))
    policy = "retries: {attempts: 2, perTryTimeout: 0.05s, retryOn: gateway-error}"
    async with running_mesh(APP + web_route(policy), {"app": app}) as mesh:
        answer = await mesh.get("/")
        assert (answer.status, answer.body) == (504, b"upstream request timeout")
        assert mesh.last().flag_text == "UT,URX"
        assert mesh.last().attempts == 3


async def test_retry_on_5xx_retries_every_5xx_with_the_attempt_count() -> None:
    app = script(Backend("app"), 500, 503)
    async with running_mesh(APP + web_route("retries: {attempts: 3, retryOn: 5xx}"), {"app": app}) as mesh:
        answer = await mesh.get("/")
        assert (answer.status, answer.body) == (200, b"app")
        assert [s.attempt for s in app.seen] == [1, 2, 3]
        assert mesh.last().flag_text == "-"


async def test_retry_on_gateway_error_retries_502_not_500() -> None:
    app = script(Backend("app"), 502, 500)
    async with running_mesh(APP + web_route("retries: {attempts: 3, retryOn: gateway-error}"), {"app": app}) as mesh:
        assert (await mesh.get("/")).status == 500
        assert [s.attempt for s in app.seen] == [1, 2]


async def test_retry_on_retriable_4xx_retries_409_only() -> None:
    app = script(Backend("app"), 409, 404)
    async with running_mesh(APP + web_route("retries: {attempts: 3, retryOn: retriable-4xx}"), {"app": app}) as mesh:
        assert (await mesh.get("/")).status == 404
        assert len(app.seen) == 2


async def test_retry_on_bare_status_codes() -> None:
    app = script(Backend("app"), 418, 418, 503)
    async with running_mesh(APP + web_route('retries: {attempts: 5, retryOn: "418,reset"}'), {"app": app}) as mesh:
        answer = await mesh.get("/")
        assert answer.status == 503
        assert len(app.seen) == 3
        assert mesh.last().flag_text == "-"


async def test_exhausted_retries_return_the_last_answer_with_URX() -> None:
    app = Backend("app", Reply(status=503, body=b"busy"))
    async with running_mesh(APP + web_route("retries: {attempts: 2, retryOn: 5xx}"), {"app": app}) as mesh:
        answer = await mesh.get("/")
        assert (answer.status, answer.body) == (503, b"busy")
        assert mesh.last().flag_text == "URX"
        assert len(app.seen) == 3


async def test_the_default_policy_retries_503_twice_but_not_500() -> None:
    app = Backend("app", Reply(status=503))
    async with running_mesh(APP + web_route(), {"app": app}) as mesh:
        assert (await mesh.get("/")).status == 503
        assert [s.attempt for s in app.seen] == [1, 2, 3]
        assert mesh.last().flag_text == "URX"
        app.reply = Reply(status=500)
        assert (await mesh.get("/")).status == 500
        assert len(app.seen) == 4
        assert mesh.last().flag_text == "-"


async def test_attempts_zero_turns_retries_off() -> None:
    app = Backend("app", Reply(status=503))
    async with running_mesh(APP + web_route("retries: {attempts: 0}"), {"app": app}) as mesh:
        assert (await mesh.get("/")).status == 503
        assert len(app.seen) == 1
        assert mesh.last().flag_text == "-"


async def test_refused_connection_is_503_UF_retried_by_default() -> None:
    async with running_mesh(APP + web_route(), {}, ports={"app": refused_port(), "app_LABELS": "version: v1"}) as mesh:
        answer = await mesh.get("/")
        assert (answer.status, answer.body) == (503, RESET + b"connection failure")
        assert mesh.last().flag_text == "UF,URX"
        assert mesh.last().attempts == 3


async def test_refused_connection_without_retries_is_plain_UF() -> None:
    async with running_mesh(
        APP + web_route("retries: {attempts: 0}"), {}, ports={"app": refused_port(), "app_LABELS": "version: v1"}
    ) as mesh:
        answer = await mesh.get("/")
        assert (answer.status, answer.body) == (503, RESET + b"connection failure")
        assert answer.headers["content-type"] == "text/plain"
        assert "x-envoy-overloaded" not in answer.headers
        assert mesh.last().flag_text == "UF"


async def test_upstream_closing_before_headers_is_503_UC_not_retried_by_default() -> None:
    hangup = await Hangup().start()
    try:
        async with running_mesh(APP + web_route(), {}, ports={"app": hangup.port, "app_LABELS": "version: v1"}) as mesh:
            answer = await mesh.get("/")
            assert (answer.status, answer.body) == (503, RESET + b"connection termination")
            assert mesh.last().flag_text == "UC"
            assert hangup.accepted == 1
    finally:
        await hangup.close()


async def test_reset_and_connect_failure_conditions() -> None:
    hangup = await Hangup().start()
    ports = {"app": hangup.port, "app_LABELS": "version: v1"}
    try:
        async with running_mesh(APP + web_route("retries: {attempts: 2, retryOn: reset}"), {}, ports=ports) as mesh:
            assert (await mesh.get("/")).status == 503
            assert mesh.last().flag_text == "UC,URX"
            assert hangup.accepted == 3
        async with running_mesh(
            APP + web_route("retries: {attempts: 2, retryOn: connect-failure}"), {}, ports=ports
        ) as mesh:
            assert (await mesh.get("/")).status == 503
            assert mesh.last().flag_text == "UC"
            assert hangup.accepted == 4
    finally:
        await hangup.close()


async def test_a_retry_goes_to_another_endpoint_when_there_is_one() -> None:
    yaml = service("web", "bad", "good") + web_route('retries: {attempts: 1, retryOn: "connect-failure,5xx"}')
    bad, good = Backend("bad", Reply(status=500)), Backend("good")
    async with running_mesh(yaml, {"bad": bad, "good": good}) as mesh:
        for _ in range(20):
            answer = await mesh.get("/")
            assert (answer.status, answer.body) == (200, b"good")
        assert bad.seen, "some first attempts went to the bad endpoint"
        assert all(s.attempt == 1 for s in bad.seen)
        assert len([s for s in good.seen if s.attempt == 2]) == len(bad.seen)


async def test_a_refused_endpoint_is_retried_on_another() -> None:
    yaml = service("web", "dead", "good") + web_route()
    good = Backend("good")
    async with running_mesh(yaml, {"good": good}, ports={"dead": refused_port(), "dead_LABELS": "version: v0"}) as mesh:
        answers = [await mesh.get("/") for _ in range(10)]
        assert {(a.status, a.body) for a in answers} == {(200, b"good")}
        assert any(e.attempts == 2 for e in mesh.exchanges)


async def test_a_chunked_post_body_is_streamed_and_replayed_on_retry() -> None:
    app = script(Backend("app"), 503, 503)
    body = b"x" * 300_000

    async def chunks():  # type: ignore[no-untyped-def]
        for start in range(0, len(body), 50_000):
            yield body[start : start + 50_000]

    async with running_mesh(APP + web_route("retries: {attempts: 2, retryOn: 5xx}"), {"app": app}) as mesh:
        answer = await mesh.request("POST", "/upload", data=chunks())
        assert answer.status == 200
        assert [s.body for s in app.seen] == [body, body, body]
        # streamed as it arrives, so framed as it came (chunked), as Envoy's router forwards it
        assert {s.headers["transfer-encoding"] for s in app.seen} == {"chunked"}
        assert mesh.last().bytes_received == len(body)
