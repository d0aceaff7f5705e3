"""gRPC-Web as Envoy's `grpc_web` filter, where Istio installs it: a sidecar calling a
`grpc-web` service port, and a gateway's `GRPC-WEB` server. A browser-style client (HTTP/1.1,
`application/grpc-web+proto` or `-text`) reaches a real `grpcio` server, which speaks only
gRPC; replies come back as gRPC-Web frames with the trailers as the last one, errors as
`grpc-status` headers, local replies keep their status.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import grpc
import pytest
from h2.errors import ErrorCodes

from minimesh.dataplane.accesslog import response_code_details
from minimesh.dataplane.grpc_web import MESSAGE_LIMIT, Frames, GrpcWeb, decode_text
from tests.inproc.h2upstream import H2Backend, H2Reply, grpcio_app
from tests.inproc.upstreams import PATIENCE, Answer, H2Answer, H2Client, Mesh, running_mesh, service

WEB = service("web", "app", protocol="grpc-web")
URL = "http://web:9080"
"""The service as the sidecar's client (HTTP_PROXY) names it: the sidecar's outbound listener
for a `grpc-web` port translates."""
PROTO = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1"}
TEXT = {"content-type": "application/grpc-web-text", "accept": "application/grpc-web-text", "x-grpc-web": "1"}


async def call(mesh: Mesh, method: str, headers: dict[str, str], data: bytes) -> Answer:
    """A gRPC-Web call to the `web` service through the sidecar."""
    return await mesh.via_sidecar("POST", f"{URL}/demo.Greeter/{method}", headers=headers, data=data)


async def answered(reply: H2Reply) -> tuple[Answer, H2Backend]:
    """A gRPC-Web `Say` call through the sidecar to an HTTP/2 upstream that answers `reply`."""
    app = H2Backend("app", reply)
    async with running_mesh(WEB, {"app": app}) as mesh:
        return await call(mesh, "Say", PROTO, frame(b"web")), app


def frame(message: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(message).to_bytes(4, "big") + message


def frames(body: bytes) -> list[tuple[int, bytes]]:
    """A gRPC-Web body as (flag, payload) per frame; it must hold whole frames only."""
    out = []
    while body:
        length = int.from_bytes(body[1:5], "big")
        out.append((body[0], body[5 : 5 + length]))
        body = body[5 + length :]
    return out


def decoded(text: bytes) -> bytes:
    """A `-text` body: base64 segments, each padded, one after another."""
    out = b""
    while text:
        out += base64.b64decode(text[:4])
        text = text[4:]
    return out


@asynccontextmanager
async def greeter(gate: asyncio.Event | None = None) -> AsyncIterator[Mesh]:
    """A grpcio server behind the `grpc-web` port, with the gateway in front: `Say` answers
    `hello X` (or fails NOT_FOUND for `nobody`), `Count` streams three replies, the last ones
    only once `gate` is set."""

    async def say(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"nobody":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such person")
        await context.send_initial_metadata((("x-served", "yes"),))
        context.set_trailing_metadata((("x-done", "1"),))
        return b"hello " + request

    async def count(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        yield b"1"
        if gate is not None:
            await gate.wait()
        yield b"2"
        yield b"3"

    handlers = {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    }
    async with grpcio_app("demo.Greeter", handlers) as app, running_mesh(WEB, {"app": app}) as mesh:
        yield mesh


async def test_a_unary_call_in_proto_and_in_text() -> None:
    """Each way, the call is counted as Envoy's `grpc_stats` (after the filter) counts it: one
    message in, as gRPC once decoded from text, and one out."""
    async with greeter() as mesh:
        proto = await call(mesh, "Say", PROTO, frame(b"web"))
        text = await call(mesh, "Say", TEXT, base64.b64encode(frame(b"text")))
        exchanges = mesh.exchanges
    assert (proto.status, proto.headers["content-type"], proto.headers["x-served"]) == (
        200, "application/grpc-web+proto", "yes",
    )  # fmt: skip
    assert "grpc-status" not in proto.headers, "the status comes in the trailer frame"
    (message, trailer) = frames(proto.body)
    assert message == (0, b"hello web")
    assert trailer[0] == 0x80
    assert sorted(trailer[1].decode().split("\r\n")) == ["", "grpc-message:", "grpc-status:0", "x-done:1"]
    assert text.headers["content-type"] == "application/grpc-web-text+proto"
    assert frames(decoded(text.body))[0] == (0, b"hello text")
    assert frames(decoded(text.body))[1][0] == 0x80, "the trailer frame, in base64 too"
    assert [(e.grpc, e.grpc_status, e.status) for e in exchanges] == [(True, 0, 200)] * 2
    counted = [(e.request_messages, e.response_messages) for e in exchanges]
    assert [(sent.count, back.count) for sent, back in counted if sent and back] == [(1, 1)] * 2


async def test_a_server_stream_comes_frame_by_frame() -> None:
    """The second reply is held until the client has read the first: a proxy that waited for
    the whole response would never pass the first on."""
    gate = asyncio.Event()
    async with greeter(gate) as mesh:
        url = f"{URL}/demo.Greeter/Count"
        async with mesh.session.post(url, headers=PROTO, data=frame(b"go"), proxy=mesh.sidecar_url) as response:
            first = await asyncio.wait_for(response.content.readexactly(6), PATIENCE)
            gate.set()
            rest = await response.read()
    assert frames(first) == [(0, b"1")]
    assert frames(rest)[:2] == [(0, b"2"), (0, b"3")]
    assert frames(rest)[2][0] == 0x80 and b"grpc-status:0" in frames(rest)[2][1]


async def test_an_error_status_arrives_in_the_headers() -> None:
    """grpcio answers a failed unary call trailers-only: the status goes out as headers."""
    async with greeter() as mesh:
        answer = await call(mesh, "Say", PROTO, frame(b"nobody"))
    assert (answer.status, answer.headers["grpc-status"], answer.headers["grpc-message"], answer.body) == (
        200, "5", "no such person", b"",
    )  # fmt: skip
    assert answer.headers["content-type"] == "application/grpc-web+proto"
    assert mesh.exchanges[0].grpc_status == 5


async def test_a_local_reply_keeps_its_http_status() -> None:
    """No endpoint: Envoy's 503 text becomes `grpc-message`, UNAVAILABLE its `grpc-status`."""
    async with running_mesh(service("web", protocol="grpc-web")) as mesh:
        answer = await call(mesh, "Say", PROTO, frame(b"web"))
    assert (answer.status, answer.headers["grpc-status"], answer.headers["grpc-message"], answer.body) == (
        503, "14", "no healthy upstream", b"",
    )  # fmt: skip
    assert (answer.headers["content-type"], answer.headers["content-length"]) == ("application/grpc-web+proto", "0")
    assert (mesh.exchanges[0].flag_text, mesh.exchanges[0].grpc_status) == ("UH", 14)


FAULTS = """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http:
  - match: [{uri: {exact: /demo.Greeter/Say}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: web}}]
  - fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
    route: [{destination: {host: web}}]
"""


async def test_a_fault_answers_as_envoy_answers_a_request_it_does_not_take_for_grpc() -> None:
    """Envoy judges a local reply's gRPC-ness from the request as the client sent it, before
    the `grpc_web` filter: a `grpcStatus` abort is then plain 200 (the code ignored) and the
    filter maps 200 to UNKNOWN; a 503 abort stays 503, UNAVAILABLE."""
    async with running_mesh(WEB + FAULTS, {"app": H2Backend("app", H2Reply())}) as mesh:
        grpc_abort = await call(mesh, "Say", PROTO, frame(b"web"))
        http_abort = await call(mesh, "Count", PROTO, frame(b"web"))
    for answer, status, code in ((grpc_abort, 200, "2"), (http_abort, 503, "14")):
        assert (answer.status, answer.headers["grpc-status"], answer.headers["grpc-message"], answer.body) == (
            status, code, "fault filter abort", b"",
        )  # fmt: skip
        assert answer.headers["content-type"] == "application/grpc-web+proto"
    assert [(e.flag_text, e.grpc_status) for e in mesh.exchanges] == [("FI", 2), ("FI", 14)]


async def test_a_text_body_that_is_not_base64_is_refused() -> None:
    async with greeter() as mesh:
        bad_size = await call(mesh, "Say", TEXT, b"abcde")
        bad_data = await call(mesh, "Say", TEXT, b"ab!=")
    for answer in (bad_size, bad_data):
        assert (answer.status, answer.headers["grpc-status"]) == (400, "13")
        assert answer.headers["grpc-message"] == "Bad gRPC-web request, invalid base64 data."
    assert [e.details for e in mesh.exchanges] == [
        "grpc_base_64_decode_failed_bad_size", "grpc_base_64_decode_failed",
    ]  # fmt: skip


async def test_an_upstream_answer_that_is_not_grpc_becomes_grpc_message() -> None:
    answer, app = await answered(H2Reply(status=404, headers=(("content-type", "text/plain"),), body=b"not here"))
    assert (answer.status, answer.headers["grpc-status"], answer.headers["grpc-message"], answer.body) == (
        404, "12", "not here", b"",
    )  # fmt: skip
    seen = app.seen[0]
    assert (seen.headers["content-type"], seen.headers["te"], seen.headers["grpc-accept-encoding"]) == (
        "application/grpc", "trailers", "identity",
    )  # fmt: skip
    assert seen.body == frame(b"web")


async def test_other_requests_to_the_port_pass_untouched() -> None:
    """The filter takes gRPC-Web content-types only."""
    app = H2Backend("app", H2Reply(body=b"plain"))
    async with running_mesh(WEB, {"app": app}) as mesh:
        answer = await mesh.via_sidecar("POST", f"{URL}/x", headers={"content-type": "application/json"}, data=b"{}")
    assert (answer.status, answer.body, "grpc-status" in answer.headers) == (200, b"plain", False)
    assert app.seen[0].headers["content-type"] == "application/json"
    assert mesh.exchanges[0].grpc is False


async def over_h2(mesh: Mesh, headers: dict[str, str], pieces: list[bytes]) -> H2Answer:
    """A gRPC-Web `Say` call from an HTTP/2 client (a browser on an h2 connection) through the
    sidecar, its body sent in `pieces`, each its own DATA frame."""
    client = await H2Client.connect(mesh.sidecar.address)
    try:
        stream = client.request("POST", "/demo.Greeter/Say", headers, pieces[0], authority="web:9080", more=True)
        for number, piece in enumerate(pieces[1:], 2):
            client.h2.send_data(stream, piece, end_stream=number == len(pieces))
        client.writer.write(client.h2.data_to_send())
        return await client.answer(stream)
    finally:
        await client.close()


async def test_an_http2_client_gets_the_same_translation() -> None:
    """A text body sent in pieces that split its base64 anywhere, the reply in text, the
    message counted once decoded."""
    body = base64.b64encode(frame(b"over h2"))
    async with greeter() as mesh:
        answer = await over_h2(mesh, {**TEXT, "content-length": str(len(body))}, [body[:3], body[3:10], body[10:]])
    assert (answer.status, answer.headers["content-type"], answer.trailers) == (
        200, "application/grpc-web-text+proto", {},
    )  # fmt: skip
    (message, trailer) = frames(decoded(answer.body))
    assert message == (0, b"hello over h2")
    assert trailer[0] == 0x80 and b"grpc-status:0" in trailer[1]
    sent = mesh.exchanges[0].request_messages
    assert (mesh.exchanges[0].protocol, sent.count if sent else None) == ("HTTP/2", 1)


async def test_only_the_start_of_a_long_answer_becomes_grpc_message() -> None:
    """Envoy keeps MAX_BUFFERED_PLAINTEXT_LENGTH bytes of a body it buffers for `grpc-message`
    (asked over HTTP/2, whose client takes a header that long)."""
    page = H2Reply(status=502, headers=(("content-type", "text/html"),), body=b"x" * (MESSAGE_LIMIT + 5000))
    async with running_mesh(WEB, {"app": H2Backend("app", page)}) as mesh:
        answer = await over_h2(mesh, PROTO, [frame(b"web")[:2], frame(b"web")[2:]])
    assert (answer.status, answer.headers["grpc-status"], answer.body) == (502, "14", b"")
    assert answer.headers["grpc-message"] == "x" * MESSAGE_LIMIT


def test_text_frames_are_encoded_whole_however_the_body_is_split() -> None:
    body = frame(b"first") + frame(b"") + frame(b"third message")
    for cut in range(len(body) + 1):
        encoder = Frames()
        text = encoder.feed(body[:cut]) + encoder.feed(body[cut:])
        assert frames(decoded(text)) == [(0, b"first"), (0, b""), (0, b"third message")], cut


def test_which_requests_are_grpc_web() -> None:
    assert GrpcWeb.of(b"application/grpc-web", None) is not None
    assert GrpcWeb.of(b"application/grpc", None) is None
    assert GrpcWeb.of(None, None) is None
    text = GrpcWeb.of(b"application/grpc-web-text+proto", b"application/grpc-web-text+proto")
    assert text is not None and (text.text_request, text.text_response) == (True, True)
    assert decode_text(b"aGk=") == (b"hi", "")


GATEWAY_SERVER = """
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: web-gateway}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 8081, name: web, protocol: PROTOCOL}, hosts: [web.example]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web.example]
  gateways: [web-gateway]
  http: [{route: [{destination: {host: web}}]}]
"""


async def test_a_gateway_translates_on_a_grpc_web_server_and_not_on_an_http_one() -> None:
    """Istio's gateway has the filter when its server is `GRPC-WEB`, whatever the destination
    (here a plain `grpc` port); on an `HTTP` server it passes a gRPC-Web request on as it came,
    for the server sidecar of a `grpc-web` port to translate."""
    handlers = {"Say": grpc.unary_unary_rpc_method_handler(lambda request, context: b"hello " + request)}
    async with grpcio_app("demo.Greeter", handlers) as app, running_mesh(
        service("web", "app", protocol="grpc") + GATEWAY_SERVER.replace("PROTOCOL", "GRPC-WEB"), {"app": app}
    ) as mesh:  # fmt: skip
        headers = {**PROTO, "Host": "web.example"}
        answer = await mesh.request("POST", "/demo.Greeter/Say", headers=headers, data=frame(b"gateway"))
    assert (answer.status, frames(answer.body)[0]) == (200, (0, b"hello gateway"))
    backend = H2Backend("app", H2Reply(body=b"as sent"))
    async with running_mesh(WEB + GATEWAY_SERVER.replace("PROTOCOL", "HTTP"), {"app": backend}) as mesh:
        answer = await mesh.request("POST", "/demo.Greeter/Say", headers=headers, data=frame(b"on"))
    assert (answer.status, answer.body) == (200, b"as sent")
    assert backend.seen[0].headers["content-type"] == "application/grpc-web+proto"


async def test_a_response_of_headers_alone_only_changes_its_content_type() -> None:
    """Envoy's filter transforms a response that is not gRPC from its body: with none, the
    status and headers pass as they came, with gRPC-Web's content-type and no `grpc-status`."""
    answer, _ = await answered(H2Reply(status=503, headers=(("x-why", "busy"),), body=b""))
    assert (answer.status, answer.headers["x-why"], answer.headers["content-type"], answer.body) == (
        503, "busy", "application/grpc-web+proto", b"",
    )  # fmt: skip
    assert "grpc-status" not in answer.headers


async def test_an_upstream_reset_mid_response_cuts_the_client_short() -> None:
    """After the head, a reset cannot become a status: the client's response is cut (no final
    chunk, so no trailer frame), flagged `UR` as Envoy's router flags it."""
    reply = H2Reply(
        headers=(("content-type", "application/grpc"),),
        body=frame(b"partial"),
        reset=ErrorCodes.INTERNAL_ERROR,
        reset_after_head=True,
    )
    async with running_mesh(WEB, {"app": H2Backend("app", reply)}) as mesh:
        url = f"{URL}/demo.Greeter/Say"
        async with mesh.session.post(url, headers=PROTO, data=frame(b"x"), proxy=mesh.sidecar_url) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    cut = next(e for e in mesh.exchanges if e.flag_text == "UR")
    assert response_code_details(cut) == "upstream_reset_after_response_started{remote_reset}"
