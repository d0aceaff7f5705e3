"""The gRPC rules of the proxy: Envoy's HTTP → gRPC status mapping, which requests are gRPC,
`grpc-message` encoding, the trailers-only headers, `grpc-timeout` read, capped by the
route timeout and written upstream on each try as Envoy's router does (with
`x-envoy-expected-rq-timeout-ms`), and messages counted however a stream is split."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minimesh.config.model import GRPC_CODES
from minimesh.dataplane.deadline import Expected
from minimesh.dataplane.grpc import (
    MessageCounter,
    format_grpc_timeout,
    grpc_message,
    grpc_route_timeout,
    grpc_status_header,
    grpc_status_of,
    grpc_timeout_ms,
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


@pytest.mark.parametrize(
    ("header", "ms"),
    [
        (b"2H", 7_200_000),
        (b"3M", 180_000),
        (b"5S", 5000),
        (b"250m", 250),
        (b"1500u", 2),
        (b"1000u", 1),
        (b"1n", 1),
        (b"0m", 0),
        (b"99999999S", 99_999_999_000),
        (b"000000001S", 1000),
        (b"100000000S", None),
        (b"5s", None),
        (b"S", None),
        (b"m", None),
        (b"1.5S", None),
        (b"-1S", None),
        (b"", None),
        (None, None),
    ],
)
def test_grpc_timeout_is_read_as_envoy_reads_it(header: bytes | None, ms: int | None) -> None:
    assert grpc_timeout_ms(header) == ms


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (250, b"250m"),
        (99_999_999, b"99999999m"),
        (100_000_000, b"100000S"),
        (99_999_999_000, b"99999999S"),
        (100_000_000_000, b"1666666M"),
        (10**20, b"99999999H"),
    ],
)
def test_grpc_timeout_is_written_as_envoy_writes_it(ms: int, text: bytes) -> None:
    assert format_grpc_timeout(ms) == text
    if ms <= 99_999_999:
        assert grpc_timeout_ms(text) == ms


@pytest.mark.parametrize(
    ("route", "header", "timeout"),
    [
        (None, None, None),
        (None, b"250m", 0.25),
        (None, b"0m", None),
        (None, b"bad", None),
        (1.0, None, 1.0),
        (1.0, b"250m", 0.25),
        (1.0, b"5S", 1.0),
        (1.0, b"0m", 1.0),
        (0.0, b"250m", 0.25),
    ],
)
def test_a_grpc_request_gets_its_grpc_timeout_capped_by_the_route_timeout(
    route: float | None, header: bytes | None, timeout: float | None
) -> None:
    assert grpc_route_timeout(route, header) == timeout


@pytest.mark.parametrize(
    ("timeout", "per_try", "elapsed", "told"),
    [
        (0.25, None, 0, 250),
        (2.0, 0.5, 0, 500),
        (0.5, 2.0, 0, 500),
        (0.5, 0.5, 0, 500),
        (None, 0.3, 0, 300),
        (None, 0.3, 5000, 300),
        (2.0, 0.5, 1800, 200),
        (2.0, None, 700, 1300),
        (2.0, 0.5, 2000, 1),
        (2.0, 0.5, 9000, 1),
    ],
)
def test_each_try_is_told_the_time_it_has(
    timeout: float | None, per_try: float | None, elapsed: int, told: int
) -> None:
    grpc = Expected.of(timeout, per_try, grpc=True)
    plain = Expected.of(timeout, per_try, grpc=False)
    assert grpc is not None and plain is not None
    assert grpc.fields(elapsed) == [(b"x-envoy-expected-rq-timeout-ms", b"%d" % told), (b"grpc-timeout", b"%dm" % told)]
    assert plain.lines(elapsed) == b"x-envoy-expected-rq-timeout-ms: %d\r\n" % told


@pytest.mark.parametrize(("timeout", "per_try"), [(None, None), (0.0, None), (0.0001, None), (None, 0.0)])
def test_no_timeout_tells_the_upstream_nothing(timeout: float | None, per_try: float | None) -> None:
    assert Expected.of(timeout, per_try, grpc=True) is None


def framed(messages: list[tuple[int, bytes]]) -> bytes:
    return b"".join(bytes((flag,)) + len(body).to_bytes(4, "big") + body for flag, body in messages)


def counted(stream: bytes, cuts: list[int]) -> int:
    counter = MessageCounter()
    edges = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    for start, stop in itertools.pairwise(edges):
        counter.feed(stream[start:stop])
    return counter.count


MESSAGES = st.lists(st.tuples(st.sampled_from([0, 1]), st.binary(max_size=40)), max_size=12)


@given(MESSAGES, st.lists(st.integers(min_value=0), max_size=30))
def test_any_split_of_a_stream_counts_its_messages(messages: list[tuple[int, bytes]], cuts: list[int]) -> None:
    assert counted(framed(messages), cuts) == len(messages)


@given(MESSAGES, st.integers(min_value=1), st.lists(st.integers(min_value=0), max_size=10))
def test_a_message_counts_from_its_first_byte(messages: list[tuple[int, bytes]], keep: int, cuts: list[int]) -> None:
    stream = framed([*messages, (0, b"tail")])
    partial = stream[: len(stream) - 9 + keep % 9]
    assert counted(partial, cuts) == len(messages) + (len(partial) > len(stream) - 9)


def test_a_message_of_a_mebibyte_in_chunks_then_an_empty_one() -> None:
    counter = MessageCounter()
    counter.feed(b"\x00\x00\x10\x00\x00")
    for _ in range(16):
        counter.feed(bytes(65536))
    counter.feed(b"\x00\x00\x00")
    assert counter.count == 2
    counter.feed(b"\x00\x00")
    assert counter.count == 2
    counter.feed(b"\x01")
    assert counter.count == 3
