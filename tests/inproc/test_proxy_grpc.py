"""gRPC requests (HTTP/2, content-type application/grpc) answered by the proxy itself, as
Envoy answers them: a trailers-only response (HTTP 200, `grpc-status` by Envoy's HTTP → gRPC
mapping, the body text as `grpc-message`), `fault.abort.grpcStatus`, and the metrics'
`request_protocol="grpc"` and `grpc_response_status`; a real `grpcio` client sees the codes."""

from __future__ import annotations

import time

import grpc
from aiohttp import web

from minimesh.admin.metrics import Metrics
from minimesh.dataplane.accesslog import text_line
from minimesh.dataplane.exchange import Exchange
from minimesh.registry.model import Workload
from tests.inproc.upstreams import Backend, H2Answer, H2Client, Reply, Seen, gateway_http, running_mesh, service

APP = service("web", "app")
GRPC = {"content-type": "application/grpc", "te": "trailers"}
FRAME = b"\x00\x00\x00\x00\x02hi"
"""One gRPC message (uncompressed, 2 bytes)."""
RULES = """
- match: [{uri: {prefix: /demo.Echo/Abort}}]
  fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
  route: [{destination: {host: web}}]
- match: [{uri: {prefix: /demo.Echo/Late}}]
  fault: {abort: {grpcStatus: DEADLINE_EXCEEDED, percentage: {value: 100}}}
  route: [{destination: {host: web}}]
- match: [{uri: {prefix: /demo.Echo/}}]
  route: [{destination: {host: web}}]
"""


def requests_total(exchanges: list[Exchange]) -> list[str]:
    """The `istio_requests_total` lines the metrics give for these requests."""
    metrics = Metrics()
    for exchange in exchanges:
        metrics(exchange)
    return [line for line in metrics.prometheus().splitlines() if line.startswith("istio_requests_total{")]


def trailers_only(answer: H2Answer) -> tuple[int, str, str, str | None, bytes]:
    headers = answer.headers
    assert answer.ended and "content-length" not in headers
    return answer.status, headers["content-type"], headers["grpc-status"], headers.get("grpc-message"), answer.body


async def test_local_replies_to_grpc_requests_are_trailers_only() -> None:
    app = Backend("app")
    async with running_mesh(APP + gateway_http(RULES), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            no_route = await client.answer(client.request("POST", "/other.Svc/Call", GRPC, FRAME))
            aborted = await client.answer(client.request("POST", "/demo.Echo/Abort", GRPC, FRAME))
            late = await client.answer(client.request("POST", "/demo.Echo/Late", GRPC, FRAME))
            plain_late = await client.answer(client.request("POST", "/demo.Echo/Late", body=b"x"))
        finally:
            await client.close()
    assert trailers_only(no_route) == (200, "application/grpc", "12", None, b"")
    assert trailers_only(aborted) == (200, "application/grpc", "14", "fault filter abort", b"")
    assert trailers_only(late) == (200, "application/grpc", "4", "fault filter abort", b"")
    assert (plain_late.status, plain_late.body, plain_late.headers["content-type"]) == (
        200, b"fault filter abort", "text/plain",
    )  # fmt: skip
    assert "grpc-status" not in plain_late.headers
    assert app.seen == []
    lines = [text_line(exchange) for exchange in mesh.exchanges]
    assert '"POST /other.Svc/Call HTTP/2" 200 NR' in lines[0]
    assert '"POST /demo.Echo/Abort HTTP/2" 200 FI' in lines[1]
    totals = requests_total(mesh.exchanges[:3])
    for code, flags in (("12", "NR"), ("14", "FI"), ("4", "FI")):
        assert any(
            'request_protocol="grpc",response_code="200",'
            f'grpc_response_status="{code}",response_flags="{flags}"' in line
            for line in totals
        ), (code, totals)
    plain = requests_total(mesh.exchanges[3:])
    assert len(plain) == 1 and 'request_protocol="http",response_code="200",grpc_response_status=""' in plain[0]


async def test_an_upstream_grpc_status_header_reaches_the_metrics() -> None:
    app = Backend("app", Reply(headers={"content-type": "application/grpc", "grpc-status": "5"}, body=b""))
    async with running_mesh(APP + gateway_http(RULES), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            answer = await client.answer(client.request("POST", "/demo.Echo/Find", GRPC, FRAME))
        finally:
            await client.close()
    assert (answer.status, answer.headers["grpc-status"]) == (200, "5")
    assert [s.body for s in app.seen] == [FRAME]
    totals = requests_total(mesh.exchanges)
    assert len(totals) == 1
    assert 'request_protocol="grpc",response_code="200",grpc_response_status="5",response_flags="-"' in totals[0]


async def test_grpcio_sees_unavailable_with_envoys_text_when_no_upstream_is_healthy() -> None:
    async with running_mesh(service("web") + gateway_http(RULES)) as mesh:
        host, port = mesh.gateway.address
        async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
            say = channel.unary_unary("/demo.Echo/Say")
            try:
                await say(b"hi", timeout=10)
            except grpc.aio.AioRpcError as error:
                failure = error
            else:
                raise AssertionError("the call succeeded with no upstream")
            abort = channel.unary_unary("/demo.Echo/Late")
            try:
                await abort(b"hi", timeout=10)
            except grpc.aio.AioRpcError as error:
                late = error
            else:
                raise AssertionError("the fault did not abort the call")
    assert (failure.code(), failure.details()) == (grpc.StatusCode.UNAVAILABLE, "no healthy upstream")
    assert (late.code(), late.details()) == (grpc.StatusCode.DEADLINE_EXCEEDED, "fault filter abort")
    assert [e.flag_text for e in mesh.exchanges] == ["UH", "FI"]
    assert 'grpc_response_status="14",response_flags="UH"' in "".join(requests_total(mesh.exchanges[:1]))


async def test_over_http1_the_trailers_only_reply_is_framed_with_content_length_0() -> None:
    async with running_mesh(service("web") + gateway_http(RULES)) as mesh:
        answer = await mesh.request("POST", "/other.Svc/Call", headers={"content-type": "application/grpc"})
    assert (answer.status, answer.body, answer.headers["content-length"]) == (200, b"", "0")
    assert (answer.headers["content-type"], answer.headers["grpc-status"]) == ("application/grpc", "12")
    assert mesh.last().flag_text == "NR"


async def test_retry_on_unavailable_retries_a_trailers_only_reply_on_the_second_endpoint() -> None:
    yaml = service("web", "bad", "good") + gateway_http(
        '- route: [{destination: {host: web}}]\n  retries: {attempts: 1, retryOn: "unavailable"}'
    )
    grpc_reply = {"content-type": "application/grpc"}
    bad = Backend("bad", Reply(headers={**grpc_reply, "grpc-status": "14", "grpc-message": "down"}, body=b""))
    good = Backend("good", Reply(headers={**grpc_reply, "grpc-status": "0"}, body=FRAME))
    async with running_mesh(yaml, {"bad": bad, "good": good}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            answers = [await client.answer(client.request("POST", "/demo.Echo/Say", GRPC, FRAME)) for _ in range(20)]
        finally:
            await client.close()
    assert {(a.status, a.headers["grpc-status"], a.body) for a in answers} == {(200, "0", FRAME)}
    assert bad.seen, "some first attempts went to the bad endpoint"
    assert all(s.attempt == 1 for s in bad.seen)
    assert len([s for s in good.seen if s.attempt == 2]) == len(bad.seen)
    assert sorted(e.attempts for e in mesh.exchanges if e.attempts == 2) == [2] * len(bad.seen)
    totals = requests_total(mesh.exchanges)
    assert len(totals) == 1 and 'grpc_response_status="0",response_flags="-"' in totals[0]


async def test_without_the_condition_a_grpc_unavailable_reply_is_passed_on() -> None:
    yaml = service("web", "bad") + gateway_http(
        '- route: [{destination: {host: web}}]\n  retries: {attempts: 2, retryOn: "5xx,deadline-exceeded"}'
    )
    bad = Backend("bad", Reply(headers={"content-type": "application/grpc", "grpc-status": "14"}, body=b""))
    async with running_mesh(yaml, {"bad": bad}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            answer = await client.answer(client.request("POST", "/demo.Echo/Say", GRPC, FRAME))
        finally:
            await client.close()
    assert (answer.status, answer.headers["grpc-status"]) == (200, "14")
    assert [s.attempt for s in bad.seen] == [1]
    assert mesh.last().flag_text == "-"


async def test_a_retry_is_told_in_grpc_timeout_what_is_left_of_the_callers_deadline() -> None:
    # The client's 5 s (Istio's max_grpc_timeout lets it set the route timeout) goes to the
    # first try whole; the retry, sent at least 0.4 s in, is told no more than what is left.
    yaml = service("web", "app") + gateway_http(
        '- route: [{destination: {host: web}}]\n  retries: {attempts: 1, retryOn: "unavailable"}'
    )
    app = Backend("app")
    app.replies.extend(
        [
            Reply(headers={"content-type": "application/grpc", "grpc-status": "14"}, body=b"", delay=0.4),
            Reply(headers={"content-type": "application/grpc", "grpc-status": "0"}, body=FRAME),
        ]
    )
    async with running_mesh(yaml, {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            answer = await client.answer(
                client.request("POST", "/demo.Echo/Say", {**GRPC, "grpc-timeout": "5S"}, FRAME)
            )
        finally:
            await client.close()
    assert (answer.headers["grpc-status"], [s.attempt for s in app.seen]) == ("0", [1, 2])
    first, retry = app.seen
    assert (first.all("grpc-timeout"), first.all("x-envoy-expected-rq-timeout-ms")) == (["5000m"], ["5000"])
    [left] = retry.all("x-envoy-expected-rq-timeout-ms")
    assert 0 < int(left) <= 4600
    assert retry.all("grpc-timeout") == [f"{left}m"]


TIMEOUTS = """
- match: [{uri: {prefix: /demo.Echo/Bounded}}]
  timeout: 0.2s
  route: [{destination: {host: web}}]
- route: [{destination: {host: web}}]
"""


async def test_grpc_timeout_sets_the_route_timeout_and_a_timeout_is_unavailable() -> None:
    app = Backend("app", Reply(hold=True))
    async with running_mesh(APP + gateway_http(TIMEOUTS), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            started = time.monotonic()
            answer = await client.answer(
                client.request("POST", "/demo.Echo/Say", {**GRPC, "grpc-timeout": "200000u"}, FRAME)
            )
            elapsed = time.monotonic() - started
        finally:
            await client.close()
    assert elapsed >= 0.2
    assert trailers_only(answer) == (200, "application/grpc", "14", "upstream request timeout", b"")
    assert app.seen[0].all("grpc-timeout") == ["200m"]
    assert app.seen[0].all("x-envoy-expected-rq-timeout-ms") == ["200"]
    assert mesh.last().flag_text == "UT"
    assert '"POST /demo.Echo/Say HTTP/2" 200 UT' in text_line(mesh.last())


async def test_the_route_timeout_caps_grpc_timeout_and_the_upstream_is_told() -> None:
    app = Backend("app", Reply(hold=True))
    async with running_mesh(APP + gateway_http(TIMEOUTS), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address)
        try:
            long = client.request("POST", "/demo.Echo/Bounded", {**GRPC, "grpc-timeout": "5S"}, FRAME)
            unset = client.request("POST", "/demo.Echo/Bounded", GRPC, FRAME)
            answers = [await client.answer(long), await client.answer(unset)]
        finally:
            await client.close()
    assert [(a.headers["grpc-status"], a.headers["grpc-message"]) for a in answers] == [
        ("14", "upstream request timeout")
    ] * 2
    assert [s.all("grpc-timeout") for s in app.seen] == [["200m"], ["200m"]]
    assert [e.flag_text for e in mesh.exchanges] == ["UT", "UT"]


async def test_grpc_timeout_means_nothing_on_a_request_that_is_not_grpc() -> None:
    app = Backend("app", Reply(delay=0.3))
    async with running_mesh(APP + gateway_http(TIMEOUTS), {"app": app}) as mesh:
        answer = await mesh.request("POST", "/demo.Echo/Say", headers={"grpc-timeout": "100m"}, data=b"x")
    assert (answer.status, answer.body) == (200, b"app")
    assert app.seen[0].all("grpc-timeout") == ["100m"]


def framed(*bodies: bytes) -> bytes:
    return b"".join(b"\x00" + len(body).to_bytes(4, "big") + body for body in bodies)


async def test_the_messages_of_a_grpc_stream_are_counted_however_they_are_split() -> None:
    app = Backend("app")
    replies = framed(b"one", b"", b"three" * 1000, b"four")

    async def streams(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        await request.content.read()
        response = web.StreamResponse(headers={"content-type": "application/grpc", "grpc-status": "0"})
        await response.prepare(request)
        for start in range(0, len(replies), 7):
            await response.write(replies[start : start + 7])
        return response

    app.handler = streams
    sent = framed(b"a" * 10, b"b", b"c" * 20000)
    async with running_mesh(APP + gateway_http(RULES), {"app": app}) as mesh:
        client = await H2Client.connect(mesh.gateway.address, window=1 << 20)
        try:
            stream_id = client.request("POST", "/demo.Echo/Chat", GRPC, sent[:3], more=True)
            for start in range(3, len(sent), 6000):
                client.h2.send_data(stream_id, sent[start : start + 6000], end_stream=start + 6000 >= len(sent))
            client.writer.write(client.h2.data_to_send())
            answer = await client.answer(stream_id)
            plain = await client.answer(client.request("POST", "/demo.Echo/Plain", body=sent[:9000]))
        finally:
            await client.close()
    assert (answer.body, plain.status) == (replies, 200)
    metrics = Metrics()
    for exchange in mesh.exchanges:
        metrics(exchange)
    text = metrics.prometheus().splitlines()
    received = [line for line in text if line.startswith("istio_request_messages_total{")]
    sent_back = [line for line in text if line.startswith("istio_response_messages_total{")]
    assert [line.rpartition(" ")[2] for line in received + sent_back] == ["3", "4"]
    assert received[0].startswith(
        'istio_request_messages_total{reporter="source",source_workload="istio-ingressgateway"'
    )
    assert received[0].endswith('destination_cluster="Kubernetes"} 3')
    assert "request_protocol" not in received[0] and "response_code" not in received[0]


BATCH = Workload("batch-1", "127.0.0.9", labels=(("app", "batch"),), service="batch")
MESH_FAULT = """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http:
  - match: [{sourceLabels: {app: batch}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: web}}]
  - route: [{destination: {host: web}}]
"""


async def test_a_call_aborted_in_the_callers_sidecar_counts_against_the_routes_service() -> None:
    """Istio's source reporter counts a fault-aborted call as a call to the service of the
    route it matched (Envoy's connection manager gives the stream the route's cluster, whose
    metadata names the service), though no upstream was ever picked."""
    app = Backend("app")
    async with running_mesh(service("web", "app", protocol="grpc") + MESH_FAULT, {"app": app}, source=BATCH) as mesh:
        client = await H2Client.connect(mesh.sidecar.address)
        try:
            answer = await client.answer(client.request("POST", "/demo.Echo/Say", GRPC, FRAME, authority="web:9080"))
        finally:
            await client.close()
    assert trailers_only(answer) == (200, "application/grpc", "14", "fault filter abort", b"")
    assert app.seen == []
    totals = requests_total(mesh.exchanges)
    assert len(totals) == 1, totals
    assert 'reporter="source",source_workload="batch-1"' in totals[0]
    assert 'destination_workload="unknown"' in totals[0]
    assert 'destination_service="web.default.svc.cluster.local"' in totals[0]
    assert 'destination_service_name="web",destination_service_namespace="default"' in totals[0]
    assert 'request_protocol="grpc",response_code="200",grpc_response_status="14",response_flags="FI"' in totals[0]
