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
MESSAGE = b"\0\0\0\0\x10greeter-bench-rq"
"""One 16-byte gRPC message with its 5-byte prefix, as the bench's calls carry."""
CLIENT_HEAD = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/greeter.Greeter/Greet"),
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


def _round(calls: int) -> float:
    """Seconds of minimesh-side h2 work per call over `calls` calls on one pair of connections."""
    downstream, client = _pair(ours_client=False)
    upstream, server = _pair(ours_client=True)
    ours = 0.0
    for number in range(calls):
        stream = 2 * number + 1
        client.send_headers(stream, CLIENT_HEAD)
        client.send_data(stream, MESSAGE, end_stream=True)
        wire = client.data_to_send()
        started = time.perf_counter()
        downstream.receive_data(wire)
        downstream.acknowledge_received_data(len(MESSAGE), stream)
        upstream.send_headers(stream, UPSTREAM_HEAD)
        upstream.send_data(stream, MESSAGE, end_stream=True)
        wire = upstream.data_to_send()
        ours += time.perf_counter() - started
        server.receive_data(wire)
        server.acknowledge_received_data(len(MESSAGE), stream)
        server.send_headers(stream, RESPONSE_HEAD)
        server.send_data(stream, MESSAGE)
        server.send_headers(stream, TRAILERS, end_stream=True)
        wire = server.data_to_send()
        started = time.perf_counter()
        upstream.receive_data(wire)
        upstream.acknowledge_received_data(len(MESSAGE), stream)
        downstream.send_headers(stream, CLIENT_RESPONSE_HEAD)
        downstream.send_data(stream, MESSAGE)
        downstream.send_headers(stream, TRAILERS, end_stream=True)
        wire = downstream.data_to_send()
        ours += time.perf_counter() - started
        client.receive_data(wire)
        client.acknowledge_received_data(len(MESSAGE), stream)
    return ours / calls


def codec_us_per_call() -> float:
    """The median over ROUNDS of the h2 library's minimesh-side work per call, in microseconds."""
    _round(WARMUP)
    return round(statistics.median(_round(CALLS) for _ in range(ROUNDS)) * 1e6, 1)
