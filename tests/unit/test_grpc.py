"""The gRPC rules of the proxy's own replies: Envoy's HTTP → gRPC status mapping, which
requests are gRPC, `grpc-message` encoding and the trailers-only headers."""

from __future__ import annotations

import pytest

from minimesh.config.model import GRPC_CODES
from minimesh.dataplane.grpc import (
    grpc_message,
    grpc_status_header,
    grpc_status_of,
    is_grpc,
    response_grpc_status,
    trailers_only,
)


@pytest.mark.parametrize(
    ("http_status", "name"),
    [
        (400, "INTERNAL"),
        (401, "UNAUTHENTICATED"),
        (403, "PERMISSION_DENIED"),
        (404, "UNIMPLEMENTED"),
        (429, "UNAVAILABLE"),
        (502, "UNAVAILABLE"),
        (503, "UNAVAILABLE"),
        (504, "UNAVAILABLE"),
        (200, "UNKNOWN"),
        (302, "UNKNOWN"),
        (405, "UNKNOWN"),
        (408, "UNKNOWN"),
        (500, "UNKNOWN"),
        (501, "UNKNOWN"),
    ],
)
def test_http_statuses_map_to_grpc_as_envoy_maps_them(http_status: int, name: str) -> None:
    assert grpc_status_of(http_status) == GRPC_CODES[name]


def test_the_status_names_number_as_grpc_numbers_them() -> None:
    assert (GRPC_CODES["OK"], GRPC_CODES["DEADLINE_EXCEEDED"], GRPC_CODES["UNAUTHENTICATED"]) == (0, 4, 16)
    assert sorted(GRPC_CODES.values()) == list(range(17))


@pytest.mark.parametrize(
    ("content_type", "grpc"),
    [
        (b"application/grpc", True),
        (b"application/grpc+proto", True),
        (b"application/grpc;charset=utf-8", True),
        (b"application/grpc-web", False),
        (b"application/grpcx", False),
        (b"application/json", False),
        (None, False),
    ],
)
def test_a_grpc_request_is_told_by_its_content_type(content_type: bytes | None, grpc: bool) -> None:
    assert is_grpc(content_type) is grpc


def test_grpc_message_is_percent_encoded_outside_printable_ascii() -> None:
    assert grpc_message(b"no healthy upstream") == b"no healthy upstream"
    assert grpc_message(b"100% caf\xc3\xa9\n") == b"100%25 caf%C3%A9%0A"


def test_trailers_only_headers_replace_the_content_type_and_keep_a_given_grpc_status() -> None:
    headers = [(b"content-type", b"text/plain"), (b"x-envoy-overloaded", b"true")]
    assert trailers_only(14, b"overflow", headers) == [
        (b"x-envoy-overloaded", b"true"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"14"),
        (b"grpc-message", b"overflow"),
    ]
    assert trailers_only(12, b"", [(b"grpc-status", b"5")]) == [
        (b"grpc-status", b"5"),
        (b"content-type", b"application/grpc"),
    ]


def test_the_reported_grpc_status_is_the_responses_else_the_http_mapping() -> None:
    assert grpc_status_header(b"5") == 5
    assert grpc_status_header(b"x") is None and grpc_status_header(None) is None
    assert response_grpc_status(5, 200) == 5
    assert response_grpc_status(None, 503) == 14
    assert response_grpc_status(None, 0) is None
