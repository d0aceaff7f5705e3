"""What the `h2` library alone costs per proxied gRPC unary call, in this process: the frames
minimesh's two h2 connections parse and build for one call (the request in and out, the
response head, message and trailers back), with minimesh's own h2 settings, timed apart from
the peers that stand in for the client and the upstream. bench/grpc.py sets it beside the
time one call may take at the DESIGN target, which is how a codec can rule a target out.
"""

from __future__ import annotations

import statistics
import time

from h2.config import H2Configuration
from h2.connection import H2Connection

from minimesh.dataplane.http2 import h2_config

CALLS, ROUNDS, WARMUP = 3000, 3, 500
METHOD = "/greeter.Greeter/Greet"
MESSAGE = b"\0\0\0\0\x10greeter-bench-rq"
"""One 16-byte gRPC message with its 5-byte prefix: what each of the bench's calls carries."""
CLIENT_HEAD = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", METHOD.encode()),
               (b":authority", b"mesh-server:50051"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
               (b"user-agent", b"h2load nghttp2/1.52.0")]  # fmt: skip
REQUEST_ID = b"3b0c1d2e-4f50-4a6b-8c7d-9e0f1a2b3c4d"
UPSTREAM_HEAD = [*CLIENT_HEAD, (b"x-forwarded-proto", b"http"), (b"x-request-id", REQUEST_ID),
                 (b"x-envoy-attempt-count", b"1")]  # fmt: skip
RESPONSE_HEAD = [(b":status", b"200"), (b"server", b"nginx"), (b"date", b"Wed, 02 Dec 2026 12:00:00 GMT"),
                 (b"content-type", b"application/grpc")]  # fmt: skip
CLIENT_RESPONSE_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                        (b"x-envoy-upstream-service-time", b"1")]  # fmt: skip
TRAILERS = [(b"grpc-status", b"0")]


def _pair(*, ours_client: bool) -> tuple[H2Connection, H2Connection]:
    """minimesh's end of a connection (its settings) and a plain h2 peer, past their SETTINGS."""
    ours = H2Connection(h2_config(client_side=ours_client))
    peer = H2Connection(H2Configuration(client_side=not ours_client, header_encoding=None))
    ours.initiate_connection()
    peer.initiate_connection()
    for _ in range(2):
        peer.receive_data(ours.data_to_send())
        ours.receive_data(peer.data_to_send())
    return ours, peer


def _send(conn: H2Connection, stream: int, head: list[tuple[bytes, bytes]], *, trailers: bool) -> bytes:
    """One side of a unary call framed by `conn`: `head`, the message, then trailers (a
    response) or END_STREAM on the message (a request); the bytes to put on the wire."""
    conn.send_headers(stream, head)
    conn.send_data(stream, MESSAGE, end_stream=not trailers)
    if trailers:
        conn.send_headers(stream, TRAILERS, end_stream=True)
    return conn.data_to_send()


def _take(conn: H2Connection, stream: int, wire: bytes) -> None:
    """`wire` taken in by `conn`, the message's window handed back."""
    conn.receive_data(wire)
    conn.acknowledge_received_data(len(MESSAGE), stream)


def _relay(into: H2Connection, out: H2Connection, stream: int, wire: bytes, head: list[tuple[bytes, bytes]],
           *, trailers: bool) -> tuple[bytes, float]:  # fmt: skip
    """What minimesh does with one side of a call: `wire` in on one connection, out again on
    the other with `head`; the bytes it sends and the seconds it took."""
    started = time.perf_counter()
    _take(into, stream, wire)
    sent = _send(out, stream, head, trailers=trailers)
    return sent, time.perf_counter() - started


def _round(calls: int) -> float:
    """Seconds of minimesh-side h2 work per call over `calls` calls on one pair of connections."""
    downstream, client = _pair(ours_client=False)
    upstream, server = _pair(ours_client=True)
    ours = 0.0
    for number in range(calls):
        stream = 2 * number + 1
        wire = _send(client, stream, CLIENT_HEAD, trailers=False)
        wire, request = _relay(downstream, upstream, stream, wire, UPSTREAM_HEAD, trailers=False)
        _take(server, stream, wire)
        wire = _send(server, stream, RESPONSE_HEAD, trailers=True)
        wire, response = _relay(upstream, downstream, stream, wire, CLIENT_RESPONSE_HEAD, trailers=True)
        _take(client, stream, wire)
        ours += request + response
    return ours / calls


def codec_us_per_call() -> float:
    """The median over ROUNDS of the h2 library's minimesh-side work per call, in microseconds."""
    _round(WARMUP)
    return round(statistics.median(_round(CALLS) for _ in range(ROUNDS)) * 1e6, 1)
