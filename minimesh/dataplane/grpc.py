"""gRPC as the proxy sees it: which requests are gRPC, Envoy's HTTP → gRPC status mapping,
the trailers-only response a local reply to a gRPC request becomes, the route timeout a
`grpc-timeout` header sets (Istio's `max_grpc_timeout`), and the count of the messages a
stream carries (`MessageCounter`).
"""

from __future__ import annotations

from minimesh.routing.headers import HeaderList

GRPC_CONTENT_TYPE = b"application/grpc"
GRPC_TIMEOUT = b"grpc-timeout"
HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
"""Envoy's `Grpc::Utility::httpToGrpcStatus` (INTERNAL, UNAUTHENTICATED, PERMISSION_DENIED,
UNIMPLEMENTED, UNAVAILABLE); any other status is UNKNOWN."""
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
TIMEOUT_DIGITS_MAX = 99_999_999
"""The largest number a `grpc-timeout` carries (at most 8 digits)."""
TIMEOUT_UNIT_MS = {ord("H"): 3_600_000, ord("M"): 60_000, ord("S"): 1000, ord("m"): 1}
TIMEOUT_PER_MS = {ord("u"): 1000, ord("n"): 1_000_000}
"""Sub-millisecond units: how many make a millisecond (Envoy rounds them up to whole ones)."""
TIMEOUT_UNITS = b"mSMH"
PREFIX = 5
"""A gRPC message's prefix: a flag byte, then its length in 4 bytes, big-endian."""
_PLAIN = frozenset(range(0x20, 0x7F)) - {ord("%")}
"""Bytes `grpc-message` carries as they are; others are percent-encoded (gRPC's HTTP/2 spec)."""


def is_grpc(content_type: bytes | None) -> bool:
    """A gRPC request, as Envoy tells one: content-type `application/grpc`, or it followed by
    `+` or `;` (`application/grpc+proto`); grpc-web is not."""
    if content_type is None or not content_type.startswith(GRPC_CONTENT_TYPE):
        return False
    return len(content_type) == len(GRPC_CONTENT_TYPE) or content_type[len(GRPC_CONTENT_TYPE)] in b"+;"


def grpc_status_of(http_status: int) -> int:
    """The gRPC status Envoy gives a local reply of `http_status`."""
    return HTTP_TO_GRPC.get(http_status, UNKNOWN)


def grpc_status_header(value: bytes | None) -> int | None:
    """The code a `grpc-status` header carries; None when absent or not a number."""
    return int(value) if value is not None and value.isdigit() else None


def response_grpc_status(given: int | None, http_status: int) -> int | None:
    """The gRPC status the metrics report for a gRPC request (Istio's `grpc_response_status`):
    the one its response carried, else the mapping of its HTTP status; None when it got no
    response."""
    if given is not None:
        return given
    return grpc_status_of(http_status) if http_status else None


def grpc_message(text: bytes) -> bytes:
    """`text` percent-encoded for the `grpc-message` header."""
    return b"".join(bytes((byte,)) if byte in _PLAIN else b"%%%02X" % byte for byte in text)


def trailers_only(status: int, body: bytes, headers: HeaderList, content_type: bytes = GRPC_CONTENT_TYPE) -> HeaderList:
    """A local reply's headers as Envoy answers a gRPC request: `content-type:
    application/grpc` (or gRPC-Web's), `grpc-status` (`status`, unless `headers` set one) and
    the body text as `grpc-message`, after `headers`; the body itself is not sent."""
    out = [header for header in headers if header[0] not in (b"content-type", b"content-length", b"grpc-message")]
    out.append((b"content-type", content_type))
    if not any(name == b"grpc-status" for name, _ in out):
        out.append((b"grpc-status", b"%d" % status))
    if body:
        out.append((b"grpc-message", grpc_message(body)))
    return out


def grpc_timeout_ms(value: bytes | None) -> int | None:
    """A `grpc-timeout` header in milliseconds, as Envoy's `Grpc::Common::getGrpcTimeout`
    reads it: a number of at most 8 digits and a unit (H, M, S, m; u and n rounded up to a
    whole millisecond); None when absent or malformed."""
    if not value or not value[:-1].isdigit():
        return None
    number = int(value[:-1])
    if number > TIMEOUT_DIGITS_MAX:
        return None
    unit = value[-1]
    scale = TIMEOUT_UNIT_MS.get(unit)
    if scale is not None:
        return number * scale
    per_ms = TIMEOUT_PER_MS.get(unit)
    return None if per_ms is None else -(-number // per_ms)


def format_grpc_timeout(ms: int) -> bytes:
    """`ms` as Envoy writes a `grpc-timeout` (`Grpc::Common::toGrpcTimeout`): in milliseconds,
    or seconds, minutes, hours when the number would need more than 8 digits."""
    unit = 0
    if ms > TIMEOUT_DIGITS_MAX:
        ms //= 1000
        unit = 1
    while ms > TIMEOUT_DIGITS_MAX:
        if unit == len(TIMEOUT_UNITS) - 1:
            ms = TIMEOUT_DIGITS_MAX
            break
        ms //= 60
        unit += 1
    return b"%d%c" % (ms, TIMEOUT_UNITS[unit])


def grpc_route_timeout(route_timeout: float | None, header: bytes | None) -> float | None:
    """The timeout of a gRPC request, in seconds (None: none), as Envoy's router sets it on a
    route Istio gives `max_grpc_timeout` equal to its timeout (`setTimeout`, 0 when it has
    none): the request's `grpc-timeout` (none when absent or 0), capped at the route timeout."""
    requested = (grpc_timeout_ms(header) or 0) / 1000
    if route_timeout and (not requested or requested > route_timeout):
        requested = route_timeout
    return requested or None


class MessageCounter:
    """Counts the length-prefixed messages of one direction of a gRPC stream, fed in chunks
    split anywhere; a message counts from its first byte, as Envoy's `Grpc::FrameInspector`
    (which the `grpc_stats` filter Istio installs uses) counts it."""

    __slots__ = ("_prefix", "_skip", "count")

    def __init__(self) -> None:
        self.count = 0
        self._skip = 0
        """Bytes of the current message still to come."""
        self._prefix = b""
        """The part of the next prefix seen so far."""

    def feed(self, data: bytes) -> None:
        end = len(data)
        at = self._skip
        if at >= end:
            self._skip = at - end
            return
        prefix = self._prefix
        while at < end:
            if not prefix:
                self.count += 1
            taken = min(PREFIX - len(prefix), end - at)
            prefix += data[at : at + taken]
            at += taken
            if len(prefix) == PREFIX:
                at += int.from_bytes(prefix[1:], "big")
                prefix = b""
        self._prefix = prefix
        self._skip = at - end

    def __repr__(self) -> str:
        return f"<MessageCounter count={self.count} skip={self._skip}>"
