"""The compiled, immutable routing state: services, clusters with their merged policies,
virtual services with compiled match predicates, gateways, and the outcomes of a decision.

Built once per config generation by `compile.py`; read by every request, never changed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from minimesh.config import model as m
from minimesh.config.durations import format_duration
from minimesh.config.labels import DETECTED, GRPC_WEB
from minimesh.config.names import host_covers
from minimesh.errors import Location
from minimesh.registry.model import Workload
from minimesh.routing.headers import Cors, RequestOps, ResponseOps
from minimesh.routing.request import RequestView
from minimesh.routing.retry import RetryDecider, RetryPolicy

INGRESS_LABELS: m.Labels = (("istio", "ingressgateway"),)
"""The labels of the built-in ingress gateway: it serves every Gateway that selects them."""

NO_OPERATIONS = m.HeaderOperations()


# ---------------------------------------------------------------- services and clusters


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address of a cluster; `workload` is None for a ServiceEntry host reached by name."""

    workload: Workload | None
    address: str
    port: int
    labels: m.Labels = ()

    def __str__(self) -> str:
        who = f" ({self.workload.name})" if self.workload else ""
        return f"{self.address}:{self.port}{who}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    name: str = ""
    protocol: str = DETECTED

    @property
    def declared(self) -> bool:
        """Did the port name its protocol, or is it sniffed from the client's first bytes?"""
        return self.protocol != DETECTED

    def __str__(self) -> str:
        return f"{self.number}/{self.protocol}" + (f" ({self.name})" if self.name else "")


@dataclass(frozen=True, slots=True)
class MeshService:
    """A service of the registry: a Kubernetes-style service or a ServiceEntry host."""

    host: str
    short: str
    namespace: str
    ports: tuple[ServicePort, ...]
    endpoints: Mapping[int, tuple[Endpoint, ...]] = field(repr=False)
    origin: str = ""
    external: bool = False
    resolution: str = ""
    """A ServiceEntry's `resolution` (NONE, STATIC, DNS); "" for a Kubernetes-style service."""

    def port(self, number: int) -> ServicePort | None:
        return next((p for p in self.ports if p.number == number), None)

    def __repr__(self) -> str:
        ports = ",".join(str(p.number) for p in self.ports)
        count = sum(len(e) for e in self.endpoints.values())
        return f"<MeshService {self.host} ports={ports} endpoints={count} from {self.origin}>"


DEFAULT_LOAD_BALANCER = m.LoadBalancer(simple="LEAST_REQUEST")
UNLIMITED = m.ConnectionPool()


@dataclass(frozen=True, slots=True)
class CookieAffinity:
    """Consistent hashing on a cookie with a `ttl`: a request without the cookie is given one,
    as Envoy's cookie hash policy does, `NAME="VALUE"; Max-Age=TTL; Path=PATH; ATTRIBUTES;
    HttpOnly` (Max-Age in whole seconds, left out for a ttl under one second: a session cookie;
    Path left out when none is set). `suffix` is everything after the value, made once."""

    name: str
    suffix: str

    @classmethod
    def of(cls, consistent: m.ConsistentHash | None) -> CookieAffinity | None:
        if consistent is None or not consistent.http_cookie_name or consistent.http_cookie_ttl is None:
            return None
        parts = []
        if int(consistent.http_cookie_ttl):
            parts.append(f"Max-Age={int(consistent.http_cookie_ttl)}")
        if consistent.http_cookie_path:
            parts.append(f"Path={consistent.http_cookie_path}")
        parts += [f"{name}={value}" if value else name for name, value in consistent.http_cookie_attributes]
        parts.append("HttpOnly")
        return cls(consistent.http_cookie_name, "".join(f"; {part}" for part in parts))

    def header(self, value: str) -> bytes:
        """The `Set-Cookie` value that gives a client the cookie `value`."""
        return f'{self.name}="{value}"{self.suffix}'.encode("latin-1")


@dataclass(frozen=True, slots=True)
class Policy:
    """The DestinationRule policy in force for one cluster, merged as Istio merges it.

    `tls` None means Istio's auto mTLS; `origin` says which levels it came from; `cookie` is
    the cookie the proxy sets for affinity, if the load balancer asks for one.
    """

    load_balancer: m.LoadBalancer = DEFAULT_LOAD_BALANCER
    connection_pool: m.ConnectionPool = UNLIMITED
    outlier_detection: m.OutlierDetection | None = None
    tls: m.ClientTLS | None = None
    origin: str = "defaults"
    cookie: CookieAffinity | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cookie", CookieAffinity.of(self.load_balancer.consistent_hash))

    def describe(self) -> str:
        lb = self.load_balancer
        balance = f"consistent hash {_hash_source(lb.consistent_hash)}" if lb.consistent_hash else lb.simple
        pool = "limits " + _pool_text(self.connection_pool) if self.connection_pool != UNLIMITED else "unlimited"
        outlier = _outlier_text(self.outlier_detection) if self.outlier_detection else "none"
        tls = self.tls.mode if self.tls else "auto (ISTIO_MUTUAL inside the mesh)"
        return f"lb {balance}; pool {pool}; outlier detection {outlier}; tls {tls} (from {self.origin})"


def _hash_source(consistent: m.ConsistentHash) -> str:
    cookie = consistent.http_cookie_name
    if cookie and consistent.http_cookie_ttl is not None:
        cookie += f" (set when missing, ttl {format_duration(consistent.http_cookie_ttl)})"
    pairs = {
        "header": consistent.http_header_name,
        "cookie": cookie,
        "source ip": "yes" if consistent.use_source_ip else None,
        "query": consistent.http_query_parameter_name,
    }
    return ", ".join(f"{kind} {value}" for kind, value in pairs.items() if value) or "(no key)"


POOL_LIMITS = {
    "max_connections": "maxConnections",
    "http1_max_pending_requests": "http1MaxPendingRequests",
    "http2_max_requests": "http2MaxRequests",
    "max_requests_per_connection": "maxRequestsPerConnection",
    "max_retries": "maxRetries",
    "max_concurrent_streams": "maxConcurrentStreams",
}
"""The connection pool limits `explain` shows, by their Istio names."""


def _pool_text(pool: m.ConnectionPool) -> str:
    return " ".join(f"{label}={getattr(pool, attr)}" for attr, label in POOL_LIMITS.items() if getattr(pool, attr))


def _outlier_text(od: m.OutlierDetection) -> str:
    errors = f"{od.consecutive_5xx_errors or od.consecutive_gateway_errors} consecutive errors"
    timing = f"interval {format_duration(od.interval)} ejection {format_duration(od.base_ejection_time)}"
    return f"{errors}, {timing}, max {od.max_ejection_percent}%"


def cluster_name(port: int, subset: str | None, host: str) -> str:
    """Istio's cluster name: `outbound|9080|v1|reviews.default.svc.cluster.local`."""
    return f"outbound|{port}|{subset or ''}|{host}"


@dataclass(frozen=True, slots=True)
class Cluster:
    """A destination service port and subset: its endpoints and its merged policy.

    `problem` says why a cluster has no endpoints by construction (unknown host or subset);
    the data plane answers such a cluster, like an empty one, with 503 `UH`.
    """

    name: str
    host: str
    short: str
    namespace: str
    subset: str | None
    port: int
    endpoints: tuple[Endpoint, ...]
    policy: Policy = Policy()
    protocol: str = DETECTED
    selector: m.Labels = ()
    problem: str = ""
    original_destination: bool = False
    """A ServiceEntry of resolution NONE or DNS whose endpoints only name the host: a captured
    connection goes where it was headed (Envoy's ORIGINAL_DST cluster; for DNS, the address
    the app resolved the host to, which is what a resolver beside it would answer)."""

    def __repr__(self) -> str:
        lb = self.policy.load_balancer.simple or "CONSISTENT_HASH"
        problem = f" problem={self.problem!r}" if self.problem else ""
        return f"<Cluster {self.name} endpoints={len(self.endpoints)} lb={lb}{problem}>"


# ---------------------------------------------------------------- compiled routes


class Facts:
    """The parts of one request that match conditions read, computed once per decision.

    Read-only by convention. It and the other objects made per request are plain classes,
    not dataclasses: compiled, their `__init__` costs a tenth of a dataclass's."""

    __slots__ = ("gateway", "labels", "namespace", "path", "port", "request")

    def __init__(
        self,
        request: RequestView,
        path: str,
        port: int,
        gateway: str,
        labels: Mapping[str, str] | None,
        namespace: str | None,
    ) -> None:
        self.request = request
        self.path = path
        self.port = port
        self.gateway = gateway
        self.labels = labels
        self.namespace = namespace

    def header(self, name: str) -> str | None:
        reader = PSEUDO_HEADERS.get(name)
        return reader(self.request) if reader else self.request.headers.get(name)


PSEUDO_HEADERS: dict[str, Callable[[RequestView], str]] = {
    ":method": lambda request: request.method,
    ":authority": lambda request: request.authority,
    ":scheme": lambda request: request.scheme,
    ":path": lambda request: request.path,
}

Readers = Literal["path", "header", "query"]
READERS: dict[str, Callable[[Facts, str], str | None]] = {
    "path": lambda facts, name: facts.path,
    "header": lambda facts, name: facts.header(name),
    "query": lambda facts, name: facts.request.query_params().get(name),
}
"""Where each kind of string condition reads its value from the request."""


@dataclass(frozen=True, slots=True)
class StringTest:
    """One string condition, as Envoy's header/path/query matchers evaluate it.

    `match` None is a present match; `invert` is `withoutHeaders`, which reads a missing
    header as empty unless the condition is a present match (Istio's translation).
    """

    label: str
    reads: Readers
    name: str
    match: m.StringMatch | None
    invert: bool = False
    ignore_case: bool = False

    def value(self, facts: Facts) -> str | None:
        return facts.path if self.reads == "path" else READERS[self.reads](facts, self.name)

    def holds(self, facts: Facts) -> bool:
        value = self.value(facts)
        if value is None:
            if self.invert and self.match is not None:
                value = ""
            else:
                return self.invert
        held = True if self.match is None else self.match.matches(value, ignore_case=self.ignore_case)
        return held != self.invert

    def why(self, facts: Facts) -> str:
        value = self.value(facts)
        subject = {"path": "path", "header": self.name, "query": f"query parameter {self.name}"}[self.reads]
        shown = f"request has {subject} {value!r}" if value is not None else f"request has no {subject}"
        return f"{self.label} — {shown}"


@dataclass(frozen=True, slots=True)
class PortTest:
    port: int

    @property
    def label(self) -> str:
        return f"port {self.port}"

    def holds(self, facts: Facts) -> bool:
        return facts.port == self.port

    def why(self, facts: Facts) -> str:
        return f"{self.label} — request is on port {facts.port}"


@dataclass(frozen=True, slots=True)
class GatewaysTest:
    """Match-level `gateways`: decides alone; source labels and namespace are then ignored."""

    gateways: frozenset[str]

    @property
    def label(self) -> str:
        return "gateways " + ",".join(sorted(self.gateways))

    def holds(self, facts: Facts) -> bool:
        return facts.gateway in self.gateways

    def why(self, facts: Facts) -> str:
        return f"{self.label} — request is at {facts.gateway}"


@dataclass(frozen=True, slots=True)
class SourceTest:
    """`sourceLabels` and `sourceNamespace` against the calling workload."""

    labels: m.Labels
    namespace: str | None

    @property
    def label(self) -> str:
        parts = []
        if self.labels:
            parts.append("sourceLabels " + ",".join(f"{k}={v}" for k, v in self.labels))
        if self.namespace:
            parts.append(f"sourceNamespace {self.namespace}")
        return " ".join(parts)

    def holds(self, facts: Facts) -> bool:
        if facts.labels is None or facts.namespace is None:
            return False
        if not m.labels_match(self.labels, facts.labels):
            return False
        return self.namespace is None or self.namespace == facts.namespace

    def why(self, facts: Facts) -> str:
        if facts.labels is None:
            return f"{self.label} — request has no source workload"
        shown = ",".join(f"{k}={v}" for k, v in sorted(facts.labels.items())) or "no labels"
        return f"{self.label} — source has {shown} in namespace {facts.namespace}"


Test = StringTest | PortTest | GatewaysTest | SourceTest


@dataclass(frozen=True, slots=True)
class MatchBlock:
    """One `match` entry: every test must hold. `static` are the tests Istio applies when it
    builds a proxy's routes (port, gateways, source), so a block failing them does not
    exist for that proxy. `prefix` is what a uri prefix rewrite replaces (None: the path)."""

    index: int
    tests: tuple[Test, ...]
    static: tuple[Test, ...] = ()
    prefix: str | None = "/"
    checks: tuple[Test, ...] = field(init=False, repr=False, compare=False)
    """`static` then `tests`: what `holds` runs through, in one loop."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "checks", self.static + self.tests)

    def holds(self, facts: Facts) -> bool:
        for test in self.checks:  # noqa: SIM110 (a plain loop: no generator per request)
            if not test.holds(facts):
                return False
        return True

    def exists_for(self, facts: Facts) -> bool:
        return all(test.holds(facts) for test in self.static)

    def first_failure(self, facts: Facts) -> Test | None:
        return next((test for test in (*self.static, *self.tests) if not test.holds(facts)), None)

    def describe(self) -> str:
        return " and ".join(test.label for test in (*self.tests, *self.static)) or "anything"


@dataclass(frozen=True, slots=True)
class Target:
    """A route destination resolved on one port: the cluster, and the headers the route and
    the destination add or remove; `authority` is the Host rewrite, if any."""

    cluster: Cluster
    request_headers: m.HeaderOperations = NO_OPERATIONS
    response_headers: m.HeaderOperations = NO_OPERATIONS
    authority: str | None = None
    request_ops: RequestOps = field(init=False, repr=False, compare=False)
    response_ops: ResponseOps = field(init=False, repr=False, compare=False)
    """The header operations ready for the wire, compiled with the target."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "request_ops", RequestOps.of(self.request_headers))
        object.__setattr__(self, "response_ops", ResponseOps.of(self.response_headers))


@dataclass(frozen=True, slots=True)
class Destination:
    """One `route[]` entry. Its Target is `fixed` when the port is known at compile time,
    else looked up per listener port (`by_port`), else built for that port."""

    host: str
    subset: str | None
    port: int | None
    weight: int
    build: Callable[[int], Target] = field(repr=False, compare=False)
    fixed: Target | None = None
    by_port: Mapping[int, Target] = field(default_factory=dict, repr=False)

    def target(self, listener_port: int) -> Target:
        if self.fixed is not None:
            return self.fixed
        return self.by_port.get(listener_port) or self.build(listener_port)

    @property
    def label(self) -> str:
        return self.subset or self.host.split(".")[0]


@dataclass(frozen=True, slots=True)
class MirrorPolicy:
    destination: Destination
    percentage: float


@dataclass(frozen=True, slots=True)
class Mirror:
    """A mirror resolved for one request: where, and how often (percent)."""

    cluster: Cluster
    percentage: float


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled `http[]` rule of a VirtualService (or the default route of a service)."""

    ref: str
    name: str
    location: Location | None
    blocks: tuple[MatchBlock, ...]
    destinations: tuple[Destination, ...] = ()
    weights: tuple[int, ...] = ()
    timeout: float | None = None
    retries: RetryPolicy | None = None
    fault: m.HTTPFaultInjection | None = None
    mirrors: tuple[MirrorPolicy, ...] = ()
    cors: m.CorsPolicy | None = None
    rewrite: m.HTTPRewrite | None = None
    redirect: m.HTTPRedirect | None = None
    direct_response: m.HTTPDirectResponse | None = None
    response_headers: m.HeaderOperations = NO_OPERATIONS
    """The rule's own `headers.response`, for the replies it makes itself (redirect, direct
    response); forwarded responses take them, with the destination's, from their Target."""
    fault_first: int | None = None
    """From `minimesh.dev/fault-first: N`: the fault fires for exactly the first N requests
    (percentages ignored), counted by the data plane per route `ref`."""
    retry: RetryDecider = field(init=False, repr=False, compare=False)
    reply_ops: ResponseOps = field(init=False, repr=False, compare=False)
    cors_headers: Cors | None = field(init=False, repr=False, compare=False)
    mirror_clusters: tuple[Mirror, ...] | None = field(init=False, repr=False, compare=False)
    """`retries`, `response_headers`, `cors` and `mirrors` compiled for the data plane (the
    mirrors when their ports are fixed; else per request, see `Forward.mirrors`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "retry", RetryDecider.of(self.retries))
        object.__setattr__(self, "reply_ops", ResponseOps.of(self.response_headers))
        object.__setattr__(self, "cors_headers", Cors.of(self.cors) if self.cors is not None else None)
        fixed = all(p.destination.fixed is not None for p in self.mirrors)
        mirrors = tuple(Mirror(p.destination.target(0).cluster, p.percentage) for p in self.mirrors) if fixed else None
        object.__setattr__(self, "mirror_clusters", mirrors)

    def __repr__(self) -> str:
        return f"<Route {self.ref} blocks={len(self.blocks)} destinations={len(self.destinations)}>"


class ConnectionFacts:
    """What `tcp[]` and `tls[]` match conditions read of one connection: where it was headed
    (`address`, `port`), the SNI it offered, and its source. Made per connection: a plain class."""

    __slots__ = ("address", "gateway", "labels", "namespace", "port", "sni")

    def __init__(
        self,
        address: str,
        port: int,
        sni: str | None,
        gateway: str,
        labels: Mapping[str, str] | None,
        namespace: str | None,
    ) -> None:
        self.address = address
        self.port = port
        self.sni = sni
        self.gateway = gateway
        self.labels = labels
        self.namespace = namespace


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class L4Match:
    """One `match` entry of a `tcp[]` or `tls[]` rule; every condition it sets must hold. As
    for HTTP, match-level `gateways` decide alone (source labels then do not apply)."""

    index: int
    port: int | None = None
    subnets: tuple[Network, ...] = ()
    labels: m.Labels = ()
    namespace: str | None = None
    gateways: frozenset[str] = frozenset()
    sni_hosts: tuple[str, ...] = ()

    def failure(self, facts: ConnectionFacts) -> str | None:
        """Why the connection fails this match, None when it holds."""
        if self.port is not None and facts.port != self.port:
            return f"port {self.port} — connection is to port {facts.port}"
        if self.subnets and not _in_subnets(facts.address, self.subnets):
            return f"destinationSubnets {self.subnet_text} — connection is to {facts.address or 'a name'}"
        if self.sni_hosts and not any(host_covers(h, facts.sni or "") for h in self.sni_hosts):
            return f"sniHosts {','.join(self.sni_hosts)} — connection offers SNI {facts.sni or 'none'}"
        if self.gateways:
            return None if facts.gateway in self.gateways else f"gateways — connection is at {facts.gateway}"
        if self.labels or self.namespace:
            if facts.labels is None or not m.labels_match(self.labels, facts.labels):
                return f"sourceLabels {','.join(f'{k}={v}' for k, v in self.labels)} — source does not carry them"
            if self.namespace is not None and self.namespace != facts.namespace:
                return f"sourceNamespace {self.namespace} — source is in {facts.namespace}"
        return None

    @property
    def subnet_text(self) -> str:
        return ",".join(str(n) for n in self.subnets)

    def describe(self) -> str:
        parts = [f"port {self.port}"] if self.port is not None else []
        parts += [f"destinationSubnets {self.subnet_text}"] if self.subnets else []
        parts += [f"sniHosts {','.join(self.sni_hosts)}"] if self.sni_hosts else []
        parts += ["gateways " + ",".join(sorted(self.gateways))] if self.gateways else []
        parts += ["sourceLabels " + ",".join(f"{k}={v}" for k, v in self.labels)] if self.labels else []
        return " and ".join(parts) or "anything"


def _in_subnets(address: str, subnets: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in subnet for subnet in subnets)


@dataclass(frozen=True, slots=True)
class ConnectionRoute:
    """One compiled `tcp[]` or `tls[]` rule: its matches (none: every connection) and its
    weighted destinations, one chosen per connection."""

    ref: str
    location: Location | None
    matches: tuple[L4Match, ...]
    destinations: tuple[Destination, ...]
    weights: tuple[int, ...]

    def __repr__(self) -> str:
        return f"<ConnectionRoute {self.ref} matches={len(self.matches)} destinations={len(self.destinations)}>"


@dataclass(frozen=True, slots=True)
class CompiledVirtualService:
    """A VirtualService with resolved hosts and gateways and its compiled rules, in order:
    `routes` from `http[]`, `tcp` and `tls` from its connection rules."""

    ref: str
    meta: m.Meta
    hosts: tuple[str, ...]
    gateways: frozenset[str]
    routes: tuple[Route, ...]
    order: int
    source: m.VirtualService = field(repr=False)
    tcp: tuple[ConnectionRoute, ...] = ()
    tls: tuple[ConnectionRoute, ...] = ()

    def exists_for(self, facts: Facts) -> bool:
        """Does any rule exist for this proxy and port (a rule with no match, or a match block
        whose static tests hold)? Istio leaves the VirtualService out where none does."""
        return any(not route.blocks or any(b.exists_for(facts) for b in route.blocks) for route in self.routes)

    def __repr__(self) -> str:
        return f"<CompiledVirtualService {self.ref} hosts={','.join(self.hosts)} routes={len(self.routes)}>"


@dataclass(frozen=True, slots=True)
class Binding:
    """A VirtualService bound at a gateway under one virtual host domain."""

    domain: str
    virtual_service: CompiledVirtualService
    gateway: str
    server: m.Server


@dataclass(frozen=True, slots=True)
class GatewayTable:
    """The virtual hosts of one gateway proxy, for one protocol family (plain or TLS).

    `exact` maps a domain to its bindings; `wildcards` are ordered most specific first.
    """

    gateways: tuple[str, ...]
    exact: Mapping[str, tuple[Binding, ...]]
    wildcards: tuple[tuple[str, tuple[Binding, ...]], ...]
    servers: tuple[tuple[str, m.Server], ...]
    https_redirects: tuple[str, ...] = ()
    """The virtual hosts that answer plain HTTP with 301 to https, most specific first: the
    hosts of servers with `tls.httpsRedirect` (VirtualService bound or not) and the domains
    bound under them."""
    anonymous_exact: Mapping[str, tuple[Binding, ...]] = field(default_factory=dict, repr=False)
    anonymous_wildcards: tuple[tuple[str, tuple[Binding, ...]], ...] = field(default=(), repr=False)
    """`exact` and `wildcards` as a request with no source workload (every request at an
    ingress) finds them: only bindings whose VirtualService has a rule for the binding's
    gateway and port, and no domain left without one. Precomputed, since it depends on the
    binding alone."""

    def anonymous(self, host: str) -> tuple[Binding, ...]:
        """The bindings of the most specific virtual host that exists for `host`, for a request
        with no source workload."""
        found = self.anonymous_exact.get(host)
        if found:
            return found
        for domain, bindings in self.anonymous_wildcards:
            if host_covers(domain, host):
                return bindings
        return ()


# ---------------------------------------------------------------- outcomes


class Draw:
    """The weighted split a decision made: the weights of the route's destinations and the
    pick. Made per request, so a plain class (see `Facts`)."""

    __slots__ = ("picked", "weights")

    def __init__(self, weights: tuple[int, ...], picked: int) -> None:
        self.weights = weights
        self.picked = picked


class Forward:
    """Send the request upstream to `target.cluster` under `route`. Made per request, so a
    plain class (see `Facts`)."""

    __slots__ = ("draw", "grpc_web", "port", "prefix", "route", "route_ref", "target")

    def __init__(
        self,
        route_ref: str,
        route: Route,
        target: Target,
        port: int,
        draw: Draw | None = None,
        prefix: str | None = "/",
    ) -> None:
        self.route_ref = route_ref
        self.route = route
        self.target = target
        self.port = port
        self.draw = draw
        self.prefix = prefix
        self.grpc_web = target.cluster.protocol == GRPC_WEB
        """Whether the listener translates gRPC-Web, as Istio installs its `grpc_web` filter:
        at a sidecar for a `grpc-web` service port, at a gateway for a `GRPC-WEB` server."""

    @property
    def cluster(self) -> Cluster:
        return self.target.cluster

    @property
    def timeout(self) -> float | None:
        return self.route.timeout

    @property
    def retries(self) -> RetryPolicy | None:
        return self.route.retries

    @property
    def fault(self) -> m.HTTPFaultInjection | None:
        return self.route.fault

    @property
    def request_headers(self) -> m.HeaderOperations:
        return self.target.request_headers

    @property
    def response_headers(self) -> m.HeaderOperations:
        return self.target.response_headers

    @property
    def mirrors(self) -> tuple[Mirror, ...]:
        fixed = self.route.mirror_clusters
        if fixed is not None:
            return fixed
        return tuple(Mirror(p.destination.target(self.port).cluster, p.percentage) for p in self.route.mirrors)

    def rewritten(self, path: str, authority: str) -> tuple[str, str]:
        """The path and authority sent upstream, as Envoy rewrites them for this route."""
        return rewrite_path(self.route.rewrite, self.prefix, path), self.target.authority or authority

    def __repr__(self) -> str:
        return f"<Forward {self.route_ref} → {self.cluster.name} endpoints={len(self.cluster.endpoints)}>"


def rewrite_path(rewrite: m.HTTPRewrite | None, prefix: str | None, path: str) -> str:
    """Envoy's `regex_rewrite` (on the path, query kept) or `prefix_rewrite`."""
    if rewrite is None:
        return path
    if rewrite.uri_regex is not None:
        head, sep, query = path.partition("?")
        return rewrite.uri_regex.match.sub(rewrite.uri_regex.rewrite, head) + sep + query
    if rewrite.uri is None:
        return path
    return replace_prefix(rewrite.uri, prefix, path)


def replace_prefix(replacement: str, prefix: str | None, path: str) -> str:
    """Envoy's prefix rewrite: `replacement` in place of the prefix the rule matched, the rest
    of the path and its query kept; an exact or regex match counts its whole path as matched."""
    matched = len(path.partition("?")[0]) if prefix is None else len(prefix)
    return replacement + path[matched:]


@dataclass(frozen=True, slots=True)
class Redirect:
    """Answer with a redirect; `route` is None for a Gateway server's `httpsRedirect`.
    `listener` is the port the rule was built for (a Gateway server's, a service's)."""

    route_ref: str
    route: Route | None
    status: int
    location: str
    listener: int = 0


@dataclass(frozen=True, slots=True)
class DirectResponse:
    route_ref: str
    route: Route
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class NoRoute:
    """Envoy's 404 `NR`: no virtual host or no route matched."""

    reason: str
    status: int = 404
    flag: str = "NR"


@dataclass(frozen=True, slots=True)
class PassThrough:
    """ALLOW_ANY: a host outside the registry goes out as addressed (`PassthroughCluster`)."""

    host: str
    port: int
    cluster: str = "PassthroughCluster"
    route_ref: str = "allow_any"
    """The route Istio's sidecar logs for HTTP to a host outside the registry."""


@dataclass(frozen=True, slots=True)
class BlackHole:
    """REGISTRY_ONLY: a host outside the registry gets 502 from `BlackHoleCluster`."""

    host: str
    port: int
    status: int = 502
    cluster: str = "BlackHoleCluster"
    route_ref: str = "block_all"
    """The route Istio's sidecar logs for HTTP it blocks under REGISTRY_ONLY."""


Outcome = Forward | Redirect | DirectResponse | NoRoute | PassThrough | BlackHole


class Connect:
    """Proxy a connection to `cluster` (Envoy's tcp_proxy), under `route_ref` (`default`
    when no rule claimed it). Made per connection, so a plain class (see `Facts`)."""

    __slots__ = ("cluster", "draw", "route", "route_ref")

    def __init__(self, route_ref: str, cluster: Cluster, route: ConnectionRoute | None, draw: Draw | None) -> None:
        self.route_ref = route_ref
        self.cluster = cluster
        self.route = route
        self.draw = draw

    def __repr__(self) -> str:
        return f"<Connect {self.route_ref} → {self.cluster.name} endpoints={len(self.cluster.endpoints)}>"


ConnectionOutcome = Connect | PassThrough | BlackHole

Verdict = Literal["match", "miss", "info"]


@dataclass(frozen=True, slots=True)
class TraceStep:
    """One line of `minimesh explain`: what was considered, and whether it held."""

    what: str
    verdict: Verdict
    detail: str

    def __str__(self) -> str:
        return f"{self.what} {self.verdict}: {self.detail}"


# ---------------------------------------------------------------- the snapshot


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one config generation routes by; immutable, swapped whole on reload."""

    generation: int
    mesh: m.Mesh = field(repr=False)
    services: Mapping[str, MeshService] = field(repr=False)
    clusters: Mapping[str, Cluster] = field(repr=False)
    workloads: tuple[Workload, ...] = field(repr=False)
    virtual_services: tuple[CompiledVirtualService, ...] = field(repr=False)
    gateways: Mapping[str, m.Gateway] = field(repr=False)
    names: Mapping[str, str] = field(repr=False)
    short_names: Mapping[tuple[str, str], str] = field(repr=False)
    wildcard_services: tuple[MeshService, ...] = field(repr=False)
    mesh_hosts: Mapping[str, tuple[CompiledVirtualService, ...]] = field(repr=False)
    external_hosts: tuple[tuple[str, CompiledVirtualService], ...] = field(repr=False)
    default_routes: Mapping[tuple[str, int], Route] = field(repr=False)
    gateway_tables: Mapping[tuple[str, bool], GatewayTable] = field(repr=False)
    gateway_aliases: Mapping[str, str] = field(repr=False)
    connection_hosts: Mapping[str, tuple[CompiledVirtualService, ...]] = field(repr=False)
    """Per service host, the sidecar's VirtualServices with `tcp[]` or `tls[]` rules, ranked."""
    addresses: Mapping[tuple[str, int], tuple[MeshService, int]] = field(repr=False)
    """(IP, port) → the service a connection to it reaches and the service port: endpoint
    addresses (there is no service VIP on Docker), and ServiceEntry `addresses`."""
    port_services: Mapping[int, tuple[MeshService, ...]] = field(repr=False)
    """ServiceEntry ports reached on any address (no `addresses`, as Istio's 0.0.0.0:PORT
    listeners): a TCP one claims the port, TLS ones are told apart by SNI."""
    sniffed_ports: frozenset[int] = field(repr=False)
    """Ports some service serves HTTP or leaves to detection: a connection to an unknown
    address there is sniffed (HTTP goes through `http[]` by its Host header)."""
    inbound_protocols: Mapping[tuple[str, int], str] = field(repr=False)
    """(workload name, port it listens on) → that port's protocol, for its inbound sidecar."""
    peers: Mapping[bytes, Workload] = field(default_factory=dict, repr=False)
    """Peer id (`Workload.peer_id`) → the workload, the ingress gateway among them: whom a
    server sidecar reports as the caller of a request that names its sidecar."""
    scoped: Mapping[str, Snapshot] = field(default_factory=dict, repr=False)
    """The snapshots of scoped overlays, compiled and swapped in with this one: a request with
    `x-minimesh-test: SCOPE` is routed by `scoped[SCOPE]`."""

    def gateways_selecting(self, labels: m.Labels | Mapping[str, str]) -> tuple[str, ...]:
        """The Gateways (`namespace/name`) whose selector picks a workload with `labels`."""
        found = dict(labels)
        return tuple(name for name, gw in self.gateways.items() if m.labels_match(gw.selector, found))

    @property
    def ingress_gateways(self) -> tuple[str, ...]:
        """The Gateways the built-in ingress serves: those selecting `istio: ingressgateway`."""
        return self.gateways_selecting(INGRESS_LABELS)

    def service_for(self, host: str, namespace: str = "default") -> MeshService | None:
        """The service a client in `namespace` reaches by `host` (short, `.ns`, `.ns.svc` or FQDN)."""
        fqdn = self.names.get(host) or self.short_names.get((host, namespace))
        if fqdn is not None:
            return self.services[fqdn]
        return next((s for s in self.wildcard_services if host_covers(s.host, host)), None)

    def __repr__(self) -> str:
        return (
            f"<Snapshot generation={self.generation} services={len(self.services)} "
            f"clusters={len(self.clusters)} virtual_services={len(self.virtual_services)} "
            f"gateways={len(self.gateways)} workloads={len(self.workloads)}>"
        )
