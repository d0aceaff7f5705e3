"""The typed config model: every kind minimesh reads, as frozen dataclasses.

Names follow Istio's API (snake_case); values are already parsed (durations in seconds,
regexes compiled, Istio's defaults applied) so nothing downstream touches raw YAML.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from minimesh.config.names import shown_ref
from minimesh.errors import Location

Labels = tuple[tuple[str, str], ...]
"""Labels as sorted (key, value) pairs: hashable and comparable."""


def labels_of(mapping: dict[str, str] | None) -> Labels:
    return tuple(sorted((mapping or {}).items()))


def labels_match(selector: Labels, labels: Mapping[str, str]) -> bool:
    """Kubernetes `matchLabels`: every selector pair is present in `labels`."""
    return all(labels.get(key) == value for key, value in selector)


@dataclass(frozen=True, slots=True)
class Meta:
    """Who a resource is and where it was written."""

    kind: str
    name: str
    namespace: str
    location: Location
    labels: Labels = ()
    annotations: Labels = ()

    @property
    def ref(self) -> str:
        return shown_ref(self)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)


# ---------------------------------------------------------------- VirtualService


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Istio StringMatch: exactly one of exact, prefix, regex (RE2, matched in full)."""

    kind: str
    value: str
    pattern: re.Pattern[str] | None = None

    def matches(self, text: str, *, ignore_case: bool = False) -> bool:
        if self.kind == "exact":
            return text.lower() == self.value.lower() if ignore_case else text == self.value
        if self.kind == "prefix":
            return text.lower().startswith(self.value.lower()) if ignore_case else text.startswith(self.value)
        return self.pattern is not None and self.pattern.fullmatch(text) is not None

    def __str__(self) -> str:
        return f"{self.kind} '{self.value}'"


@dataclass(frozen=True, slots=True)
class HTTPMatchRequest:
    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch | None], ...] = ()
    without_headers: tuple[tuple[str, StringMatch | None], ...] = ()
    query_params: tuple[tuple[str, StringMatch | None], ...] = ()
    port: int | None = None
    source_labels: Labels = ()
    gateways: tuple[str, ...] = ()
    source_namespace: str | None = None
    ignore_uri_case: bool = False


@dataclass(frozen=True, slots=True)
class Destination:
    host: str
    subset: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        text = self.host + (f":{self.port}" if self.port else "")
        return text + (f" subset {self.subset}" if self.subset else "")


@dataclass(frozen=True, slots=True)
class HeaderOperations:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOperations = HeaderOperations()
    response: HeaderOperations = HeaderOperations()


@dataclass(frozen=True, slots=True)
class RouteDestination:
    destination: Destination
    weight: int = 0
    headers: Headers = Headers()


@dataclass(frozen=True, slots=True)
class HTTPRedirect:
    uri: str | None = None
    prefix_rewrite: str | None = None
    authority: str | None = None
    port: int | None = None
    derive_port: str | None = None
    scheme: str | None = None
    redirect_code: int = 301


@dataclass(frozen=True, slots=True)
class RegexRewrite:
    match: re.Pattern[str]
    rewrite: str


@dataclass(frozen=True, slots=True)
class HTTPRewrite:
    uri: str | None = None
    authority: str | None = None
    uri_regex: RegexRewrite | None = None


@dataclass(frozen=True, slots=True)
class HTTPDirectResponse:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Delay:
    fixed_delay: float
    percentage: float | None


GRPC_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip
GRPC_CODES = {name: code for code, name in enumerate(GRPC_NAMES)}
"""gRPC status codes by the names Istio's `abort.grpcStatus` takes."""


@dataclass(frozen=True, slots=True)
class Abort:
    """`http_status` is what the request gets; a `grpcStatus` abort answers 200 and gives a
    gRPC request `grpc_status`, as Envoy's fault filter does."""

    http_status: int
    percentage: float | None
    grpc_status: int | None = None


@dataclass(frozen=True, slots=True)
class HTTPFaultInjection:
    delay: Delay | None = None
    abort: Abort | None = None


@dataclass(frozen=True, slots=True)
class HTTPRetry:
    attempts: int
    per_try_timeout: float | None = None
    retry_on: tuple[str, ...] = ()
    """Empty when `retryOn` is not written: Istio's default list, with 503 retriable."""
    retry_remote_localities: bool = False


DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes")
DEFAULT_RETRIABLE_STATUS = (503,)
DEFAULT_RETRY = HTTPRetry(attempts=2, per_try_timeout=None)
"""What Istio gives a route with no `retries`."""


@dataclass(frozen=True, slots=True)
class Mirror:
    destination: Destination
    percentage: float | None = None


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: float | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: str = "FORWARD"


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    index: int
    location: Location
    name: str = ""
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[RouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    rewrite: HTTPRewrite | None = None
    timeout: float | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirrors: tuple[Mirror, ...] = ()
    cors_policy: CorsPolicy | None = None
    headers: Headers = Headers()


@dataclass(frozen=True, slots=True)
class L4MatchAttributes:
    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_labels: Labels = ()
    gateways: tuple[str, ...] = ()
    source_namespace: str | None = None
    sni_hosts: tuple[str, ...] = ()
    """`tls[].match[].sniHosts`; always empty in a `tcp[]` match."""


@dataclass(frozen=True, slots=True)
class TCPRoute:
    """One `tcp[]` rule, or one `tls[]` rule (whose matches carry `sniHosts`)."""

    index: int
    location: Location
    match: tuple[L4MatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True)
class VirtualService:
    meta: Meta
    hosts: tuple[str, ...]
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    tls: tuple[TCPRoute, ...] = ()
    export_to: tuple[str, ...] = ()


# ---------------------------------------------------------------- DestinationRule


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    http_header_name: str | None = None
    http_cookie_name: str | None = None
    http_cookie_path: str | None = None
    http_cookie_ttl: float | None = None
    http_cookie_attributes: tuple[tuple[str, str], ...] = ()
    """Extra `Set-Cookie` attributes as (name, value); an empty value writes the name alone."""
    use_source_ip: bool = False
    http_query_parameter_name: str | None = None


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    simple: str | None = None
    consistent_hash: ConsistentHash | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    max_connections: int | None = None
    connect_timeout: float | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: float | None = None
    max_concurrent_streams: int | None = None
    h2_upgrade_policy: str | None = None
    use_client_protocol: bool = False


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx_errors: int | None = None
    consecutive_gateway_errors: int | None = None
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0


@dataclass(frozen=True, slots=True)
class ClientTLS:
    mode: str = "DISABLE"
    sni: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    credential_name: str | None = None
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """One level of DestinationRule policy; `None` fields inherit from the level above."""

    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLS | None = None
    port_level: tuple[tuple[int, TrafficPolicy], ...] = ()


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Labels
    traffic_policy: TrafficPolicy | None
    location: Location


@dataclass(frozen=True, slots=True)
class DestinationRule:
    meta: Meta
    host: str
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()
    workload_selector: Labels | None = None


# ---------------------------------------------------------------- Gateway


@dataclass(frozen=True, slots=True)
class ServerTLS:
    mode: str = "SIMPLE"
    https_redirect: bool = False
    credential_name: str | None = None
    server_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None


@dataclass(frozen=True, slots=True)
class Port:
    number: int
    protocol: str
    name: str = ""
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class Server:
    port: Port
    hosts: tuple[str, ...]
    tls: ServerTLS | None = None
    name: str = ""


@dataclass(frozen=True, slots=True)
class Gateway:
    meta: Meta
    selector: Labels
    servers: tuple[Server, ...]


# ---------------------------------------------------------------- registry kinds


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    meta: Meta
    address: str
    ports: tuple[tuple[str, int], ...] = ()
    labels: Labels = ()
    service_account: str = ""
    network: str = ""
    weight: int = 0

    def port_for(self, name: str) -> int | None:
        return dict(self.ports).get(name)


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    meta: Meta
    hosts: tuple[str, ...]
    ports: tuple[Port, ...] = ()
    addresses: tuple[str, ...] = ()
    location: str = "MESH_EXTERNAL"
    resolution: str = "NONE"
    endpoints: tuple[WorkloadEntry, ...] = ()
    workload_selector: Labels | None = None
    export_to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    name: str = ""
    target_port: int | str | None = None
    protocol: str = "TCP"
    app_protocol: str | None = None


@dataclass(frozen=True, slots=True)
class Service:
    meta: Meta
    selector: Labels | None
    ports: tuple[ServicePort, ...] = ()


@dataclass(frozen=True, slots=True)
class EgressListener:
    hosts: tuple[str, ...]
    port: Port | None = None


@dataclass(frozen=True, slots=True)
class Sidecar:
    meta: Meta
    workload_selector: Labels | None = None
    egress: tuple[EgressListener, ...] = ()
    outbound_mode: str | None = None


# ---------------------------------------------------------------- security


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    meta: Meta
    selector: Labels | None = None
    mode: str = "UNSET"
    port_level: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    meta: Meta
    selector: Labels | None = None
    action: str = "ALLOW"
    rules: tuple[Rule, ...] = ()


# ---------------------------------------------------------------- minimesh.dev kinds


@dataclass(frozen=True, slots=True)
class MeshConfig:
    meta: Meta | None = None
    outbound_mode: str = "ALLOW_ANY"
    default_retry: HTTPRetry = DEFAULT_RETRY
    access_log_file: str = "/dev/stdout"
    access_log_encoding: str = "TEXT"


@dataclass(frozen=True, slots=True)
class TestRequest:
    method: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    source_labels: Labels = ()
    gateway: str | None = None


@dataclass(frozen=True, slots=True)
class TestExpectation:
    host: str | None = None
    subset: str | None = None
    status: int | None = None
    port: int | None = None
    route: str | None = None
    fault: str | None = None


@dataclass(frozen=True, slots=True)
class RouteTest:
    meta: Meta
    request: TestRequest
    expect: TestExpectation


# ---------------------------------------------------------------- the whole config


@dataclass(frozen=True, slots=True)
class Mesh:
    """Every document of a config, typed; the input of routing.compile."""

    virtual_services: tuple[VirtualService, ...] = ()
    destination_rules: tuple[DestinationRule, ...] = ()
    gateways: tuple[Gateway, ...] = ()
    service_entries: tuple[ServiceEntry, ...] = ()
    workload_entries: tuple[WorkloadEntry, ...] = ()
    services: tuple[Service, ...] = ()
    sidecars: tuple[Sidecar, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    route_tests: tuple[RouteTest, ...] = ()
    mesh_config: MeshConfig = field(default_factory=MeshConfig)
