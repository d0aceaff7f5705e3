"""gRPC as the proxy's own replies see it: which requests are gRPC, Envoy's HTTP → gRPC
status mapping, and the trailers-only response a local reply to a gRPC request becomes.
"""

from __future__ import annotations

from minimesh.routing.headers import HeaderList

GRPC_CONTENT_TYPE = b"application/grpc"
HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
"""Envoy's `Grpc::Utility::httpToGrpcStatus` (INTERNAL, UNAUTHENTICATED, PERMISSION_DENIED,
UNIMPLEMENTED, UNAVAILABLE); any other status is UNKNOWN."""
UNKNOWN = 2
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


def trailers_only(status: int, body: bytes, headers: HeaderList) -> HeaderList:
    """A local reply's headers as Envoy answers a gRPC request: `content-type:
    application/grpc`, `grpc-status` (`status`, unless `headers` set one) and the body text
    as `grpc-message`, after `headers`; the body itself is not sent (the HTTP status is 200)."""
    out = [header for header in headers if header[0] not in (b"content-type", b"grpc-message")]
    out.append((b"content-type", GRPC_CONTENT_TYPE))
    if not any(name == b"grpc-status" for name, _ in out):
        out.append((b"grpc-status", b"%d" % status))
    if body:
        out.append((b"grpc-message", grpc_message(body)))
    return out
