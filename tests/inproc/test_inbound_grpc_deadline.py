"""The server sidecar holds a gRPC call to the deadline its client sent (`grpc-timeout`), as
Istio's inbound route has Envoy's connection manager do: an app slower than that is cut off
(its stream reset) and the client told DEADLINE_EXCEEDED, or, once the response has begun,
reset; a deadline of 0 is already past, and the app is told the deadline in Envoy's writing. The app is an HTTP/2 upstream that does not keep deadlines itself (grpcio would, and
race the sidecar), behind a real inbound listener.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from minimesh.dataplane.accesslog import response_code_details
from minimesh.dataplane.exchange import Exchange, ListenerKind
from tests.inproc.h2upstream import H2Backend, H2Reply
from tests.inproc.test_peer_metadata import SERVER_ADDRESS, chain
from tests.inproc.upstreams import H2Answer, H2Client, until

GRPC = {"content-type": "application/grpc", "te": "trailers"}
FRAME = b"\0\0\0\0\x02hi"
ANSWER = H2Reply(headers=(("content-type", "application/grpc"),), body=FRAME, trailers=(("grpc-status", "0"),))


@asynccontextmanager
async def calling(reply: H2Reply, timeout: str) -> AsyncIterator[tuple[H2Answer, H2Backend, Exchange]]:
    """One gRPC call with `grpc-timeout: timeout`, straight to the server sidecar of an app
    that answers `reply`, as a caller outside the mesh makes it: the answer, the app, and what
    the server sidecar recorded."""
    app = await H2Backend("app", reply).start()
    try:
        async with chain(app, "grpc", ListenerKind.SIDECAR, captured=True) as found:
            client = await H2Client.connect((SERVER_ADDRESS, app.port))
            try:
                stream = client.request("POST", "/demo.Slow/Call", {**GRPC, "grpc-timeout": timeout}, FRAME)
                answer = await client.answer(stream)
            finally:
                await client.close()
            yield answer, app, found.reported_by(ListenerKind.INBOUND)
    finally:
        await app.close()


async def test_a_call_past_its_deadline_gets_deadline_exceeded_and_the_app_is_reset() -> None:
    async with calling(H2Reply(hold=True), "200m") as (answer, app, inbound):
        await until(lambda: app.seen[0].reset is not None, "the app's stream reset")
    assert (answer.status, answer.headers["grpc-status"], answer.headers["grpc-message"], answer.body) == (
        200, "4", "downstream duration timeout", b"",
    )  # fmt: skip
    assert (inbound.grpc_status, response_code_details(inbound), inbound.flag_text) == (
        4, "max_duration_timeout", "-",
    )  # fmt: skip


async def test_a_response_begun_is_reset_at_the_deadline() -> None:
    begun = H2Reply(headers=(("content-type", "application/grpc"),), body=FRAME, hold_end=True)
    async with calling(begun, "1S") as (answer, app, inbound):
        await until(lambda: app.seen[0].reset is not None, "the app's stream reset")
    assert (answer.status, answer.body, answer.reset is not None, answer.trailers) == (200, FRAME, True, {})
    assert response_code_details(inbound) == "max_duration_timeout"


async def test_a_call_within_its_deadline_reaches_the_app_with_the_deadline_as_envoy_writes_it() -> None:
    async with calling(ANSWER, "10S") as (answer, app, inbound):
        pass
    assert (answer.status, answer.trailers, answer.body) == (200, {"grpc-status": "0"}, FRAME)
    assert (app.seen[0].headers["grpc-timeout"], app.seen[0].reset) == ("10000m", None)
    assert response_code_details(inbound) == "via_upstream"


async def test_a_deadline_of_zero_is_already_past() -> None:
    async with calling(H2Reply(hold=True), "0m") as (answer, _, inbound):
        pass
    assert (answer.status, answer.headers["grpc-status"], answer.headers["grpc-message"]) == (
        200, "4", "downstream duration timeout",
    )  # fmt: skip
    assert response_code_details(inbound) == "max_duration_timeout"
