"""What the proxy records of each request and each TCP connection (`Exchange`), who served
it (`Listener`), and the request ids it gives: read by the access log and the metrics.

Plain classes for what is made per request: compiled, their `__init__` costs a tenth of a
dataclass's. `_ID_BITS`, the request ids' generator, is a module global on purpose: its state
never matters (seeded from the OS, never reseeded; ids need only be unique), and measured, an
owned one passed per call costs the same (3.4 vs 3.6 us per id, plain Python), so owning it buys
nothing but a change to every caller.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from minimesh.dataplane.grpc import MessageCounter
from minimesh.dataplane.upstream import Dial
from minimesh.registry.model import INGRESS_GATEWAY, Workload
from minimesh.routing.snapshot import Endpoint

FLAG_ORDER = (
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR", "RBAC",
)  # fmt: skip
"""Envoy's access-log flags in the order `%RESPONSE_FLAGS%` prints them."""
FLAG_RANK = {flag: rank for rank, flag in enumerate(FLAG_ORDER)}


class ListenerKind(StrEnum):
    """Who serves a connection: the ingress gateway, the outbound side of a workload's sidecar,
    or its inbound side (netns capture only)."""

    GATEWAY = "gateway"
    SIDECAR = "sidecar"
    INBOUND = "inbound"


@dataclass(frozen=True, slots=True)
class Listener:
    """Who is serving, on `address:port`: the ingress gateway (`gateway`), the outbound side
    of `workload`'s sidecar (`sidecar`), or its inbound side (`inbound`), which hands requests
    to the app through `dial` (a socket made inside the app's network namespace)."""

    kind: ListenerKind
    port: int
    gateways: tuple[str, ...] = ()
    workload: Workload | None = None
    address: str = ""
    dial: Dial | None = field(default=None, compare=False, repr=False)
    source: Workload | None = field(init=False, compare=False, repr=False)
    """Who sends the requests it serves, as far as it knows: its workload, or the ingress
    gateway; None at a server sidecar, where a request names its caller (`Exchange.source`)."""
    caller_id: bytes | None = field(init=False, compare=False, repr=False)
    """The peer id its proxy sends to a server sidecar (`source.peer_id`); None at a server
    sidecar, which forwards to its own app."""

    def __post_init__(self) -> None:
        kind = self.kind
        source = self.workload
        if kind is ListenerKind.GATEWAY:
            source = INGRESS_GATEWAY
        elif kind is ListenerKind.INBOUND:
            source = None
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "caller_id", source.peer_id if source is not None else None)

    @property
    def name(self) -> str:
        return self.workload.name if self.workload else "istio-ingressgateway"


def inbound_cluster_name(workload: Workload, port: int) -> str:
    """Envoy's inbound cluster name, with the workload (one daemon serves every sidecar)."""
    return f"inbound|{port}||{workload.name}.{workload.namespace}"


class Exchange:
    """One request's (or one TCP connection's) path through the proxy: what the access log
    and metrics read.
    (A plain class: made per request, and a compiled `__init__` is ten times a dataclass's.)"""

    __slots__ = (
        "attempts", "authority", "began", "bytes_received", "bytes_sent", "cluster", "destination",
        "destination_service", "details", "downstream", "duration", "flags", "forwarded_for", "grpc", "grpc_status",
        "listener", "method",
        "original", "path", "protocol", "request_id", "request_messages", "response_messages", "route", "sni",
        "source", "started", "status", "tcp", "upstream_host", "upstream_time", "user_agent",
    )  # fmt: skip

    def __init__(
        self,
        listener: Listener,
        method: str,
        path: str,
        authority: str,
        protocol: str,
        request_id: str,
        started: float,
        began: float,
        downstream: str,
        user_agent: str = "",
        forwarded_for: str = "",
    ) -> None:
        self.listener = listener
        self.source = listener.source
        """Who sent it: the listener's own source, or at a server sidecar the workload that
        the request's peer id names (None: a caller outside the mesh, or one not known)."""
        self.method = method
        self.path = path
        self.authority = authority
        self.protocol = protocol
        self.request_id = request_id
        self.started = started
        self.began = began
        self.downstream = downstream
        self.user_agent = user_agent
        self.forwarded_for = forwarded_for
        self.status = 0
        self.flags: list[str] = []
        self.route = ""
        self.cluster = ""
        self.upstream_host = ""
        self.destination: Endpoint | None = None
        self.destination_service = ""
        self.bytes_received = 0
        self.bytes_sent = 0
        self.attempts = 0
        self.upstream_time: float | None = None
        self.duration = 0.0
        self.original: tuple[str, int] | None = None
        self.details = ""
        """Envoy's %RESPONSE_CODE_DETAILS% when the flags do not imply it."""
        self.tcp = False
        """A connection proxied as bytes (tcp_proxy), not an HTTP request: `bytes_received`
        went upstream, `bytes_sent` came back, and there is no status."""
        self.sni = ""
        """The server name a TLS connection offered (%REQUESTED_SERVER_NAME%)."""
        self.grpc = False
        """A gRPC request (content-type `application/grpc`): metrics count it as `grpc`."""
        self.grpc_status: int | None = None
        """The `grpc-status` the response carried in its headers, or the proxy's own reply gave."""
        self.request_messages: MessageCounter | None = None
        self.response_messages: MessageCounter | None = None
        """The gRPC messages of each direction, counted on a gRPC request (a gRPC-Web one once
        translated) and a gRPC response (`istio_request_messages_total` and friend)."""

    @property
    def flag_text(self) -> str:
        """`%RESPONSE_FLAGS%`: the flags in Envoy's order, `-` when none."""
        if not self.flags:
            return "-"
        return ",".join(sorted(dict.fromkeys(self.flags), key=lambda flag: FLAG_RANK.get(flag, len(FLAG_RANK))))


Observer = Callable[[Exchange], None]

HTTP_VERSIONS = {b"1.1": "HTTP/1.1", b"1.0": "HTTP/1.0", b"2": "HTTP/2"}
UUID4_KEEP = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
UUID4_MARK = (4 << 76) | (0x8000 << 48)
"""A version 4 UUID: 122 random bits, the version nibble 4 and the RFC 4122 variant bits."""
_ID_BITS = random.Random()
"""The request ids' own generator (seeded from the OS), apart from the proxy's rng so a seeded
run draws the same splits whatever the ids; cheaper than `uuid.uuid4`'s `os.urandom` per request."""


def request_id(bits: Callable[[int], int] = _ID_BITS.getrandbits) -> str:
    """A fresh `x-request-id`: a random UUID4 in its canonical text form, as Envoy makes them."""
    text = "%032x" % (bits(128) & UUID4_KEEP | UUID4_MARK)
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


class LazyHeaders(Mapping[str, str]):
    """A request's headers as routing reads them (names lower-case, text latin-1, the last of a
    repeated name), decoded only when something reads them: most requests never do."""

    __slots__ = ("_decoded", "_raw")

    def __init__(self, raw: dict[bytes, bytes]) -> None:
        self._raw = raw
        self._decoded: dict[str, str] | None = None

    def _text(self) -> dict[str, str]:
        decoded = self._decoded
        if decoded is None:
            decoded = self._decoded = {n.decode("latin-1"): v.decode("latin-1") for n, v in self._raw.items()}
        return decoded

    def __getitem__(self, name: str) -> str:
        return self._text()[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self._text().get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._text()

    def __iter__(self) -> Iterator[str]:
        return iter(self._text())

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"<LazyHeaders {self._text()!r}>"
