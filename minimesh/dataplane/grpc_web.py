"""gRPC-Web, as Envoy's `grpc_web` filter that Istio installs for a `grpc-web` port: a
gRPC-Web request goes upstream as gRPC (a `-text` body base64-decoded), and its response
comes back as gRPC-Web: the trailers as the body's last frame, base64 when the client asked
for text, a response that is not gRPC told in `grpc-status` and `grpc-message` headers.
"""

from __future__ import annotations

import base64
import binascii

from minimesh.dataplane.grpc import GRPC_CONTENT_TYPE, PREFIX, is_grpc, trailers_only
from minimesh.routing.headers import HeaderList

CONTENT_TYPES = {
    b"application/grpc-web": False,
    b"application/grpc-web+proto": False,
    b"application/grpc-web-text": True,
    b"application/grpc-web-text+proto": True,
}
"""The request content-types Envoy's filter takes (the others pass untouched), and whether
the body is base64 text."""
PROTO = b"application/grpc-web+proto"
TEXT_PROTO = b"application/grpc-web-text+proto"
TRAILER_FLAG = b"\x80"
"""The flag byte of the frame that carries the trailers."""
MESSAGE_LIMIT = 16384
"""How much of an upstream's response that is not gRPC becomes its `grpc-message` (Envoy's
MAX_BUFFERED_PLAINTEXT_LENGTH); the rest is dropped. Envoy applies it to a body it buffered
across chunks and passes one that came in a single chunk whole; minimesh cuts any, so that the
answer does not depend on how the body was split. A local reply's body is taken whole."""
BAD_BASE64 = b"Bad gRPC-web request, invalid base64 data."
BAD_SIZE_DETAILS = "grpc_base_64_decode_failed_bad_size"
BAD_DATA_DETAILS = "grpc_base_64_decode_failed"


class GrpcWeb:
    """One gRPC-Web request's translation: whether its body came as base64 text, and whether
    its response goes back as text (`accept: application/grpc-web-text`)."""

    __slots__ = ("text_request", "text_response")

    def __init__(self, text_request: bool, text_response: bool) -> None:
        self.text_request = text_request
        self.text_response = text_response

    @classmethod
    def of(cls, content_type: bytes | None, accept: bytes | None) -> GrpcWeb | None:
        """The translation a request with these headers gets; None for one that is not gRPC-Web."""
        text = CONTENT_TYPES.get(content_type or b"")
        if text is None:
            return None
        return cls(text, accept in (b"application/grpc-web-text", TEXT_PROTO))

    @property
    def content_type(self) -> bytes:
        """The response's content-type, as Envoy sets it (proto whatever the request said)."""
        return TEXT_PROTO if self.text_response else PROTO

    def upstream_headers(self, headers: HeaderList) -> HeaderList:
        """The request's headers as gRPC: `content-type: application/grpc`, `te: trailers`,
        `grpc-accept-encoding: identity` unless the client named its own, no content-length
        (the body's length as gRPC is not the one the client sent)."""
        out = [header for header in headers if header[0] not in (b"content-type", b"content-length", b"te")]
        out += [(b"content-type", GRPC_CONTENT_TYPE), (b"te", b"trailers")]
        if not any(name == b"grpc-accept-encoding" for name, _ in headers):
            out.append((b"grpc-accept-encoding", b"identity"))
        return out

    def reply_headers(self, grpc_status: int, body: bytes, headers: HeaderList) -> HeaderList:
        """The headers of a response that is not gRPC (a local reply, or an upstream's), which
        goes out without its body: the body (an upstream's cut to MESSAGE_LIMIT as it was
        read) as `grpc-message`, `grpc_status` as
        `grpc-status`. One that has no body only changes its content-type, as Envoy's filter
        transforms a response from its body."""
        if not body:
            out = [header for header in headers if header[0] not in (b"content-type", b"content-length")]
            return [*out, (b"content-type", self.content_type)]
        return trailers_only(grpc_status, body, headers, self.content_type)

    def grpc_headers(self, headers: HeaderList) -> HeaderList:
        """A gRPC response's headers for the gRPC-Web client: its content-type, no length."""
        return self.reply_headers(0, b"", headers)

    def encoder(self) -> Frames | None:
        """What re-encodes the response's frames, for a client that asked for text."""
        return Frames() if self.text_response else None

    def trailer_frame(self, trailers: HeaderList) -> bytes:
        """The trailers as gRPC-Web's last frame: `name:value` lines, each ended by CRLF."""
        block = b"".join(b"%b:%b\r\n" % (name, value) for name, value in trailers)
        frame = TRAILER_FLAG + len(block).to_bytes(4, "big") + block
        return base64.b64encode(frame) if self.text_response else frame

    def __repr__(self) -> str:
        return f"<GrpcWeb text_request={self.text_request} text_response={self.text_response}>"


def is_grpc_response(status: int, content_type: bytes | None) -> bool:
    """A response with a body the filter passes on as frames rather than as a `grpc-message`:
    200 with a gRPC content-type, or already in gRPC-Web's proto encoding (Envoy's
    `isGrpcResponseHeaders`, `isProtoEncodedGrpcWebResponseHeaders`)."""
    if status != 200:
        return False
    base = (content_type or b"").partition(b";")[0].strip().lower()
    return is_grpc(content_type) or base in (PROTO, b"application/grpc-web")


def decode_text(data: bytes) -> tuple[bytes | None, str]:
    """A `-text` request body decoded; (None, Envoy's details) when it is not valid base64
    (padding is mandatory, so its length is a multiple of 4)."""
    if len(data) % 4:
        return None, BAD_SIZE_DETAILS
    try:
        return base64.b64decode(data, validate=True), ""
    except binascii.Error:
        return None, BAD_DATA_DETAILS


class Frames:
    """Re-encodes a response body as base64, each whole frame on its own as Envoy's filter
    does, holding back a frame until all of it is in."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = bytearray()

    def feed(self, data: bytes) -> bytes:
        held = self._held
        held += data
        at = 0
        out = []
        while len(held) - at >= PREFIX:
            end = at + PREFIX + int.from_bytes(held[at + 1 : at + PREFIX], "big")
            if end > len(held):
                break
            out.append(base64.b64encode(held[at:end]))
            at = end
        del held[:at]
        return b"".join(out)

    def __repr__(self) -> str:
        return f"<Frames held={len(self._held)}>"
