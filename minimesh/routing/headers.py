"""Header work compiled once per snapshot, ready for the wire: a route's request and response
header operations as the bytes to drop and add, and its CORS policy as the headers Envoy's
CORS filter answers with. The proxy applies them per request without building anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from minimesh.config import model as m

HeaderList = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"upgrade", b"trailer"}
)
"""Headers of one connection, never passed on: the proxy frames each message itself."""
PEER_ID = b"x-envoy-peer-metadata-id"
"""Istio's metadata exchange: the calling proxy's peer id (`Workload.peer_id`), sent to a
server sidecar only, which reads it and passes it on no further."""
PEER_METADATA = b"x-envoy-peer-metadata"
"""Istio's encoded peer metadata beside `PEER_ID`: minimesh sends none and passes none on."""
REWRITTEN_REQUEST_HEADERS = frozenset(
    {b"host", b"content-length", b"x-request-id", b"x-envoy-attempt-count", b"expect", b"x-forwarded-for",
     b"x-forwarded-proto", PEER_ID, PEER_METADATA}
)  # fmt: skip
"""Request headers the proxy writes itself; the client's copies are not passed on."""


@dataclass(frozen=True, slots=True)
class RequestOps:
    """Request header operations, ready to apply: names not passed on, headers to add (as
    HTTP/1.1 lines and as HTTP/2 fields)."""

    drop: frozenset[bytes]
    lines: tuple[bytes, ...]
    fields: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def of(cls, ops: m.HeaderOperations) -> RequestOps:
        names = {n.encode() for n, _ in ops.set} | {n.encode() for n in ops.remove}
        fields = tuple((n.lower().encode(), v.encode("latin-1")) for n, v in (*ops.set, *ops.add))
        lines = tuple(b"%b: %b\r\n" % (n.encode(), v.encode("latin-1")) for n, v in (*ops.set, *ops.add))
        return cls(HOP_BY_HOP | REWRITTEN_REQUEST_HEADERS | names, lines, fields)


@dataclass(frozen=True, slots=True)
class ResponseOps:
    """Response header operations, ready to apply: names dropped (Envoy's own `server` among
    them), headers added."""

    drop: frozenset[bytes]
    add: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def of(cls, ops: m.HeaderOperations) -> ResponseOps:
        drop = {b"server"} | {n.encode() for n, _ in ops.set} | {n.encode() for n in ops.remove}
        return cls(frozenset(drop), tuple((n.encode(), v.encode("latin-1")) for n, v in (*ops.set, *ops.add)))


NO_REQUEST_OPS = RequestOps.of(m.HeaderOperations())
NO_RESPONSE_OPS = ResponseOps.of(m.HeaderOperations())


@dataclass(frozen=True, slots=True)
class Cors:
    """A route's `corsPolicy`, with the headers it answers with already encoded."""

    policy: m.CorsPolicy
    actual: HeaderList
    """What a response to an allowed origin carries besides the origin itself."""
    preflight: HeaderList
    """What a preflight's answer carries besides the origin (and credentials) itself."""

    @classmethod
    def of(cls, policy: m.CorsPolicy) -> Cors:
        credentials: HeaderList = [(b"access-control-allow-credentials", b"true")] if policy.allow_credentials else []
        expose: HeaderList = []
        if policy.expose_headers:
            expose = [(b"access-control-expose-headers", ",".join(policy.expose_headers).encode())]
        preflight: HeaderList = []
        if policy.allow_methods:
            preflight.append((b"access-control-allow-methods", ",".join(policy.allow_methods).encode()))
        if policy.allow_headers:
            preflight.append((b"access-control-allow-headers", ",".join(policy.allow_headers).encode()))
        if policy.max_age is not None:
            preflight.append((b"access-control-max-age", b"%d" % int(policy.max_age)))
        return cls(policy, credentials + expose, credentials + preflight)

    def headers(self, origin: str | None) -> HeaderList:
        """The CORS headers Envoy adds to a response when the request's Origin is allowed."""
        if origin is None or not any(match.matches(origin) for match in self.policy.allow_origins):
            return []
        return [(b"access-control-allow-origin", origin.encode("latin-1")), *self.actual]

    def preflight_headers(self, origin: str | None) -> HeaderList:
        """What Envoy's CORS filter answers a preflight from an allowed Origin with: the allowed
        methods and headers and the max age (expose headers are for the actual request)."""
        if origin is None or not any(match.matches(origin) for match in self.policy.allow_origins):
            return []
        return [(b"access-control-allow-origin", origin.encode("latin-1")), *self.preflight]
