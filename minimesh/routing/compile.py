"""Config model + registry workloads → one immutable `Snapshot`, as istiod would build a
proxy's config: services and endpoints, clusters with merged DestinationRule policies,
compiled match predicates, and host tables for sidecars and gateways. Pure, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from types import MappingProxyType

from minimesh.config import model as m
from minimesh.config.labels import (
    DETECTED,
    FAULT_FIRST_ANNOTATION,
    GRPC_WEB,
    HTTP_PROTOCOLS,
    OPAQUE_PROTOCOLS,
    TLS_PROTOCOLS,
    parse_fault_first,
    port_protocol,
)
from minimesh.config.names import CLUSTER_DOMAIN, MESH, fqdn, gateway_ref, host_covers, is_ip, resource_ref, specificity
from minimesh.registry.model import INGRESS_GATEWAY, Workload
from minimesh.registry.static import from_workload_entry
from minimesh.routing.request import RequestView
from minimesh.routing.retry import RetryPolicy
from minimesh.routing.snapshot import (
    INGRESS_LABELS,
    Binding,
    Cluster,
    CompiledVirtualService,
    ConnectionRoute,
    Destination,
    Endpoint,
    Facts,
    GatewaysTest,
    GatewayTable,
    L4Match,
    MatchBlock,
    MeshService,
    MirrorPolicy,
    Policy,
    PortTest,
    Route,
    ServicePort,
    Snapshot,
    SourceTest,
    StringTest,
    Target,
    Test,
    cluster_name,
)

ROOT_NAMESPACE = "istio-system"

HTTP_SERVER_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC", GRPC_WEB})
SNIFFED_PROTOCOLS = frozenset({*HTTP_PROTOCOLS, DETECTED})
TLS_SERVER_PROTOCOLS = frozenset({"HTTPS"})

SIMPLE_LB = {None: "LEAST_REQUEST", "UNSPECIFIED": "LEAST_REQUEST", "LEAST_CONN": "LEAST_REQUEST"}
"""Istio's aliases of `loadBalancer.simple`; any other name stands for itself."""

NO_HEADERS = m.Headers()
HTTP_STATUSES = frozenset(status.value for status in HTTPStatus)


# ---------------------------------------------------------------- names


# ---------------------------------------------------------------- services and endpoints


def _doc_target(workload: Workload, port: m.ServicePort) -> int | None:
    """The port a workload serves a Service port on: a named targetPort, else the workload's
    port of the service port's name (WorkloadEntry `ports`), else targetPort, else the port."""
    target = port.target_port
    if isinstance(target, str) and not target.isdigit():
        return workload.port_named(target)
    named = workload.port_named(port.name) if port.name else None
    if named is not None:
        return named
    return int(target) if target is not None else port.port


@dataclass(slots=True)
class _ServiceDraft:
    namespace: str
    name: str
    doc: m.Service | None = None
    members: list[Workload] = field(default_factory=list)

    def build(self) -> MeshService:
        if self.doc is not None and self.doc.ports:
            ports = tuple(ServicePort(p.port, p.name, port_protocol(p.name, p.app_protocol)) for p in self.doc.ports)
            endpoints = {
                sp.port: tuple(
                    Endpoint(w, w.address, target, w.labels)
                    for w in self.members
                    if (target := _doc_target(w, sp)) is not None
                )
                for sp in self.doc.ports
            }
            origin = resource_ref(self.doc.meta)
        else:
            declared: dict[int, ServicePort] = {}
            for w in self.members:
                for spec in w.service_ports:
                    port = ServicePort(spec.number, spec.protocol, port_protocol(spec.protocol))
                    declared.setdefault(spec.number, port)
            ports = tuple(declared.values())
            endpoints = {
                number: tuple(
                    Endpoint(w, w.address, w.port_named(spec.protocol) or number, w.labels)
                    for w in self.members
                    for spec in w.service_ports
                    if spec.number == number
                )
                for number in declared
            }
            origin = resource_ref(self.doc.meta) if self.doc else "label minimesh.service"
        host = f"{self.name}.{self.namespace}.{CLUSTER_DOMAIN}"
        return MeshService(host, self.name, self.namespace, ports, endpoints, origin)


def _kubernetes_services(mesh: m.Mesh, workloads: tuple[Workload, ...]) -> list[MeshService]:
    drafts: dict[tuple[str, str], _ServiceDraft] = {}
    for doc in mesh.services:
        drafts.setdefault((doc.meta.namespace, doc.meta.name), _ServiceDraft(doc.meta.namespace, doc.meta.name, doc))
    for w in workloads:
        if w.service:
            drafts.setdefault((w.namespace, w.service), _ServiceDraft(w.namespace, w.service)).members.append(w)
    for doc in mesh.services:
        if not doc.selector:
            continue
        draft = drafts[(doc.meta.namespace, doc.meta.name)]
        for w in workloads:
            selected = w.namespace == doc.meta.namespace and m.labels_match(doc.selector, w.label_map)
            if selected and w not in draft.members:
                draft.members.append(w)
    return [draft.build() for draft in drafts.values()]


def _entry_endpoints(
    entry: m.ServiceEntry, host: str, port: m.Port, workloads: tuple[Workload, ...]
) -> tuple[Endpoint, ...]:
    fallback = port.target_port or port.number
    if entry.workload_selector is not None:
        selector = entry.workload_selector
        return tuple(
            Endpoint(w, w.address, w.port_named(port.name) or fallback, w.labels)
            for w in workloads
            if w.namespace == entry.meta.namespace and m.labels_match(selector, w.label_map)
        )
    if entry.endpoints:
        return tuple(
            Endpoint(from_workload_entry(we), we.address, we.port_for(port.name) or fallback, we.labels)
            for we in entry.endpoints
        )
    if entry.resolution != "STATIC" and not host.startswith("*"):
        return (Endpoint(None, host, fallback),)
    return ()


def _entry_services(mesh: m.Mesh, workloads: tuple[Workload, ...]) -> list[MeshService]:
    found = []
    for entry in mesh.service_entries:
        ports = tuple(ServicePort(p.number, p.name, port_protocol(p.protocol)) for p in entry.ports)
        for raw in entry.hosts:
            host = fqdn(raw, entry.meta.namespace)
            endpoints = {p.number: _entry_endpoints(entry, host, p, workloads) for p in entry.ports}
            origin, external = resource_ref(entry.meta), entry.location != "MESH_INTERNAL"
            found.append(
                MeshService(host, host, entry.meta.namespace, ports, endpoints, origin, external, entry.resolution)
            )
    return found


def _services(mesh: m.Mesh, workloads: tuple[Workload, ...]) -> dict[str, MeshService]:
    services: dict[str, MeshService] = {}
    for service in (*_kubernetes_services(mesh, workloads), *_entry_services(mesh, workloads)):
        services.setdefault(service.host, service)
    return services


def _names(services: Mapping[str, MeshService]) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """How clients spell each service: `reviews.default`, `reviews.default.svc`, the FQDN, and
    `reviews` from a client in the same namespace (the DNS search path of a pod)."""
    names: dict[str, str] = {}
    shorts: dict[tuple[str, str], str] = {}
    for host in services:
        if host.startswith("*"):
            continue
        names.setdefault(host, host)
        if host.endswith("." + CLUSTER_DOMAIN):
            short, namespace = host.split(".")[:2]
            names.setdefault(f"{short}.{namespace}.svc", host)
            names.setdefault(f"{short}.{namespace}", host)
            shorts.setdefault((short, namespace), host)
    return names, shorts


# ---------------------------------------------------------------- DestinationRules and policies


@dataclass(frozen=True, slots=True)
class _Rule:
    """The DestinationRules of one host in one namespace, merged as Istio merges them."""

    host: str
    namespace: str
    refs: tuple[str, ...]
    traffic_policy: m.TrafficPolicy | None
    subsets: tuple[m.Subset, ...]
    order: int

    @property
    def ref(self) -> str:
        return "+".join(self.refs)


def _rules(mesh: m.Mesh) -> list[_Rule]:
    merged: dict[tuple[str, str], _Rule] = {}
    for order, dr in enumerate(mesh.destination_rules):
        if dr.workload_selector is not None:
            continue
        key = (fqdn(dr.host, dr.meta.namespace), dr.meta.namespace)
        earlier = merged.get(key)
        if earlier is None:
            merged[key] = _Rule(key[0], key[1], (resource_ref(dr.meta),), dr.traffic_policy, dr.subsets, order)
            continue
        names = {s.name for s in earlier.subsets}
        merged[key] = _Rule(
            earlier.host,
            earlier.namespace,
            (*earlier.refs, resource_ref(dr.meta)),
            earlier.traffic_policy or dr.traffic_policy,
            earlier.subsets + tuple(s for s in dr.subsets if s.name not in names),
            earlier.order,
        )
    return list(merged.values())


def _rule_for(host: str, namespace: str, rules: list[_Rule]) -> _Rule | None:
    """Istio's lookup: DestinationRules of the service's namespace first, then of the root
    namespace, then any other (a client there would use it); the most specific host wins."""
    tiers = (
        lambda ns: ns == namespace,
        lambda ns: ns == ROOT_NAMESPACE,
        lambda ns: True,
    )
    for tier in tiers:
        candidates = [r for r in rules if tier(r.namespace) and host_covers(r.host, host)]
        if candidates:
            return min(candidates, key=lambda r: (specificity(r.host), r.order))
    return None


def _port_level(policy: m.TrafficPolicy, port: int) -> m.TrafficPolicy | None:
    return next((p for number, p in policy.port_level if number == port), None)


def _normal_lb(lb: m.LoadBalancer | None) -> m.LoadBalancer:
    if lb is None:
        return m.LoadBalancer(simple="LEAST_REQUEST")
    if lb.consistent_hash is not None:
        return m.LoadBalancer(consistent_hash=lb.consistent_hash)
    return m.LoadBalancer(simple=SIMPLE_LB.get(lb.simple, lb.simple))


def _apply(base: m.TrafficPolicy, level: m.TrafficPolicy, port: int) -> tuple[m.TrafficPolicy, bool]:
    """One level over `base`: its port-level settings for `port` replace every field (left-out
    fields fall back to defaults); otherwise each field it sets overrides that field."""
    chosen = _port_level(level, port)
    if chosen is not None:
        return m.TrafficPolicy(chosen.load_balancer, chosen.connection_pool, chosen.outlier_detection, chosen.tls), True
    return (
        m.TrafficPolicy(
            level.load_balancer or base.load_balancer,
            level.connection_pool or base.connection_pool,
            level.outlier_detection or base.outlier_detection,
            level.tls or base.tls,
        ),
        False,
    )


def _merged_policy(rule: _Rule | None, subset: m.Subset | None, port: int) -> Policy:
    """Istio's MergeTrafficPolicy for one (host, subset, port): the top level, then the subset."""
    if rule is None:
        return Policy()
    stack = [("top level", rule.traffic_policy)]
    if subset is not None:
        stack.append((f"subset {subset.name}", subset.traffic_policy))
    policy = m.TrafficPolicy()
    levels = []
    for label, level in stack:
        if level is not None:
            policy, by_port = _apply(policy, level, port)
            levels.append(f"{label} port {port}" if by_port else label)
    return Policy(
        load_balancer=_normal_lb(policy.load_balancer),
        connection_pool=policy.connection_pool or m.ConnectionPool(),
        outlier_detection=policy.outlier_detection,
        tls=policy.tls,
        origin=f"{rule.ref} " + (", ".join(levels) or "(no traffic policy)"),
    )


# ---------------------------------------------------------------- clusters


class _Clusters:
    """The cluster index while compiling: every service port and subset of its DestinationRule,
    plus empty clusters, with the reason, for destinations the registry cannot serve."""

    def __init__(self, services: Mapping[str, MeshService], rules: list[_Rule]) -> None:
        self.services = services
        self.known: dict[str, Cluster] = {}
        for svc in services.values():
            rule = _rule_for(svc.host, svc.namespace, rules)
            for port in svc.ports:
                for subset in (None, *(rule.subsets if rule else ())):
                    cluster = self._build(svc, port, subset, rule)
                    self.known.setdefault(cluster.name, cluster)

    @staticmethod
    def _build(svc: MeshService, port: ServicePort, subset: m.Subset | None, rule: _Rule | None) -> Cluster:
        endpoints = svc.endpoints.get(port.number, ())
        if subset is not None:
            endpoints = tuple(e for e in endpoints if m.labels_match(subset.labels, dict(e.labels)))
        return Cluster(
            name=cluster_name(port.number, subset.name if subset else None, svc.host),
            host=svc.host,
            short=svc.short,
            namespace=svc.namespace,
            subset=subset.name if subset else None,
            port=port.number,
            endpoints=endpoints,
            policy=_merged_policy(rule, subset, port.number),
            protocol=port.protocol,
            selector=subset.labels if subset else (),
            original_destination=svc.resolution in ("NONE", "DNS") and not any(e.workload for e in endpoints),
        )

    def get(self, host: str, subset: str | None, port: int) -> Cluster:
        """The cluster Envoy would be sent to; an empty one (with why) when none exists."""
        name = cluster_name(port, subset, host)
        found = self.known.get(name)
        if found is not None:
            return found
        svc = self.services.get(host)
        if svc is None:
            problem = f"host {host} is no service or ServiceEntry in the registry"
        elif svc.port(port) is None:
            problem = f"{host} has no port {port} (it has {', '.join(str(p.number) for p in svc.ports) or 'none'})"
        else:
            problem = f"no DestinationRule defines subset {subset} for {host}"
        parts = host.split(".")
        namespace = svc.namespace if svc else (parts[1] if host.endswith(CLUSTER_DOMAIN) else "")
        short = svc.short if svc else parts[0]
        return Cluster(name, host, short, namespace, subset, port, (), problem=problem)

    def ensure(self, host: str, subset: str | None, port: int) -> Cluster:
        cluster = self.get(host, subset, port)
        return self.known.setdefault(cluster.name, cluster)


# ---------------------------------------------------------------- routes


def retry_policy(retry: m.HTTPRetry) -> RetryPolicy | None:
    """Istio's ConvertPolicy: `attempts: 0` is off; status codes in retryOn become retriable
    codes; without retryOn the default conditions keep 503 retriable."""
    if retry.attempts <= 0:
        return None
    if not retry.retry_on:
        return RetryPolicy(retry.attempts, m.DEFAULT_RETRY_ON, m.DEFAULT_RETRIABLE_STATUS, retry.per_try_timeout)
    is_code = [token.isdigit() and int(token) in HTTP_STATUSES for token in retry.retry_on]
    codes = tuple(int(t) for t, code in zip(retry.retry_on, is_code, strict=True) if code)
    conditions = tuple(t for t, code in zip(retry.retry_on, is_code, strict=True) if not code)
    if codes and "retriable-status-codes" not in conditions:
        conditions += ("retriable-status-codes",)
    return RetryPolicy(retry.attempts, conditions, codes, retry.per_try_timeout)


def _fault_first(meta: m.Meta) -> int | None:
    """The `minimesh.dev/fault-first` count of a VirtualService (validation rejects a bad one)."""
    value = dict(meta.annotations).get(FAULT_FIRST_ANNOTATION)
    try:
        return None if value is None else parse_fault_first(value)
    except ValueError:
        return None


def _string_label(field_name: str, name: str, match: m.StringMatch | None) -> str:
    return f"{field_name} {name} {match if match is not None else 'present'}"


def _match_block(index: int, match: m.HTTPMatchRequest, namespace: str) -> MatchBlock:
    tests: list[Test] = []
    if match.uri is not None:
        tests.append(StringTest(f"uri {match.uri}", "path", "", match.uri, ignore_case=match.ignore_uri_case))
    for label, pseudo, string in (
        ("scheme", ":scheme", match.scheme),
        ("method", ":method", match.method),
        ("authority", ":authority", match.authority),
    ):
        if string is not None:
            tests.append(StringTest(f"{label} {string}", "header", pseudo, string))
    tests += [StringTest(_string_label("header", n, s), "header", n, s) for n, s in match.headers]
    tests += [
        StringTest(_string_label("withoutHeaders", n, s), "header", n, s, invert=True) for n, s in match.without_headers
    ]
    tests += [StringTest(_string_label("queryParams", n, s), "query", n, s) for n, s in match.query_params]
    static: list[Test] = [PortTest(match.port)] if match.port else []
    if match.gateways:
        static.append(GatewaysTest(frozenset(gateway_ref(g, namespace) for g in match.gateways)))
    elif match.source_labels or match.source_namespace:
        static.append(SourceTest(match.source_labels, match.source_namespace))
    prefix = "/" if match.uri is None else (match.uri.value if match.uri.kind == "prefix" else None)
    return MatchBlock(index, tuple(tests), tuple(static), prefix)


def _l4_match(index: int, match: m.L4MatchAttributes, namespace: str) -> L4Match:
    return L4Match(
        index=index,
        port=match.port,
        subnets=tuple(ipaddress.ip_network(s, strict=False) for s in match.destination_subnets if _is_network(s)),
        labels=match.source_labels,
        namespace=match.source_namespace,
        gateways=frozenset(gateway_ref(g, namespace) for g in match.gateways),
        sni_hosts=match.sni_hosts,
    )


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _is_internal(name: str) -> bool:
    return name.startswith(":") or name == "host"


def _clean(ops: m.HeaderOperations) -> m.HeaderOperations:
    """Header operations Envoy may apply: pseudo-headers and Host are not among them."""
    return m.HeaderOperations(
        tuple((k, v) for k, v in ops.set if not _is_internal(k)),
        tuple((k, v) for k, v in ops.add if not _is_internal(k)),
        tuple(k for k in ops.remove if not _is_internal(k)),
    )


def _join(first: m.HeaderOperations, then: m.HeaderOperations) -> m.HeaderOperations:
    return m.HeaderOperations(first.set + then.set, first.add + then.add, first.remove + then.remove)


def _header_authority(headers: m.Headers) -> str | None:
    """A Host set through `headers.request` is an authority rewrite; `set` beats `add`."""
    for pairs in (headers.request.set, headers.request.add):
        for name, value in pairs:
            if name in ("host", ":authority"):
                return value
    return None


class _Compiler:
    """Compiles VirtualServices against the services and clusters of one generation."""

    def __init__(self, mesh: m.Mesh, services: Mapping[str, MeshService], clusters: _Clusters) -> None:
        self.services = services
        self.clusters = clusters
        self.default_retry = retry_policy(mesh.mesh_config.default_retry)

    def destination(
        self,
        dest: m.Destination,
        weight: int,
        namespace: str,
        headers: m.Headers = NO_HEADERS,
        route_headers: m.Headers = NO_HEADERS,
        route_authority: str | None = None,
    ) -> Destination:
        """Istio's GetDestinationCluster: the destination's port, else the service's only
        port, else the port the request came in on (so a Target per port)."""
        host = fqdn(dest.host, namespace)
        svc = self.services.get(host)
        request = _join(_clean(route_headers.request), _clean(headers.request))
        response = _join(_clean(route_headers.response), _clean(headers.response))
        authority = route_authority or _header_authority(headers)
        clusters = self.clusters

        def build(port: int) -> Target:
            return Target(clusters.get(host, dest.subset, port), request, response, authority)

        fixed = dest.port or (svc.ports[0].number if svc and len(svc.ports) == 1 else None)
        if fixed is not None:
            clusters.ensure(host, dest.subset, fixed)
            return Destination(host, dest.subset, fixed, weight, build, fixed=build(fixed))
        for port in svc.ports if svc else ():
            clusters.ensure(host, dest.subset, port.number)
        by_port = {p.number: build(p.number) for p in svc.ports} if svc else {}
        return Destination(host, dest.subset, None, weight, build, by_port=by_port)

    def route(self, vs: m.VirtualService, rule: m.HTTPRoute, fault_first: int | None = None) -> Route:
        namespace = vs.meta.namespace
        authority = (rule.rewrite.authority if rule.rewrite else None) or _header_authority(rule.headers)
        destinations = tuple(
            self.destination(d.destination, d.weight, namespace, d.headers, rule.headers, authority) for d in rule.route
        )
        mirrors = tuple(
            MirrorPolicy(self.destination(mirror.destination, 0, namespace), percentage)
            for mirror in rule.mirrors
            if (percentage := 100.0 if mirror.percentage is None else mirror.percentage) > 0
        )
        faulty = rule.fault is not None
        return Route(
            ref=f"{resource_ref(vs.meta)}#http[{rule.index}]",
            name=rule.name,
            location=rule.location,
            blocks=tuple(_match_block(i, match, namespace) for i, match in enumerate(rule.match)),
            destinations=destinations,
            weights=tuple(d.weight for d in destinations),
            timeout=None if faulty else rule.timeout,
            retries=None if faulty else (retry_policy(rule.retries) if rule.retries else self.default_retry),
            fault=rule.fault,
            mirrors=mirrors,
            cors=rule.cors_policy,
            rewrite=rule.rewrite,
            redirect=rule.redirect,
            direct_response=rule.direct_response,
            response_headers=_clean(rule.headers.response),
            fault_first=fault_first if faulty else None,
        )

    def connection_route(self, vs: m.VirtualService, rule: m.TCPRoute, kind: str) -> ConnectionRoute:
        """A `tcp[]` or `tls[]` rule (`kind`): its matches and weighted destinations."""
        namespace = vs.meta.namespace
        destinations = tuple(self.destination(d.destination, d.weight, namespace) for d in rule.route)
        return ConnectionRoute(
            ref=f"{resource_ref(vs.meta)}#{kind}[{rule.index}]",
            location=rule.location,
            matches=tuple(_l4_match(i, match, namespace) for i, match in enumerate(rule.match)),
            destinations=destinations,
            weights=tuple(d.weight for d in destinations),
        )

    def virtual_service(self, vs: m.VirtualService, order: int) -> CompiledVirtualService:
        namespace = vs.meta.namespace
        gateways = frozenset(gateway_ref(g, namespace) for g in vs.gateways) or frozenset({MESH})
        fault_first = _fault_first(vs.meta)
        return CompiledVirtualService(
            ref=resource_ref(vs.meta),
            meta=vs.meta,
            hosts=tuple(fqdn(h, namespace) for h in vs.hosts),
            gateways=gateways,
            routes=tuple(self.route(vs, rule, fault_first) for rule in vs.http),
            order=order,
            source=vs,
            tcp=tuple(self.connection_route(vs, rule, "tcp") for rule in vs.tcp),
            tls=tuple(self.connection_route(vs, rule, "tls") for rule in vs.tls),
        )

    def default_route(self, svc: MeshService, port: ServicePort) -> Route:
        """What a sidecar does for a service no VirtualService claims: every endpoint."""
        clusters = self.clusters

        def build(number: int) -> Target:
            return Target(clusters.get(svc.host, None, number))

        destination = Destination(svc.host, None, port.number, 0, build, fixed=build(port.number))
        return Route("default", "default", None, (), (destination,), (0,), retries=self.default_retry)


# ---------------------------------------------------------------- host tables


def _ranked(host: str, virtual_services: Iterable[CompiledVirtualService]) -> tuple[CompiledVirtualService, ...]:
    """The VirtualServices whose hosts cover `host`, most specific host first, then file order."""
    ranked = []
    for vs in virtual_services:
        matching = [specificity(h) for h in vs.hosts if host_covers(h, host)]
        if matching:
            ranked.append(((min(matching), vs.order), vs))
    return tuple(vs for _, vs in sorted(ranked, key=lambda item: item[0]))


def _external_hosts(
    virtual_services: Iterable[CompiledVirtualService], services: Mapping[str, MeshService]
) -> tuple[tuple[str, CompiledVirtualService], ...]:
    """VirtualService hosts that name no service: Istio routes them on port 80 only."""
    found = [
        (host, vs)
        for vs in virtual_services
        for host in vs.hosts
        if host not in services and not any(host_covers(host, s) for s in services)
    ]
    return tuple(sorted(found, key=lambda item: (specificity(item[0]), item[1].order)))


def _server_host(raw: str, gateway_namespace: str) -> tuple[str, str]:
    """A Gateway server host `ns/host` → (namespace allowed to bind, host)."""
    namespace, sep, host = raw.partition("/")
    if not sep:
        return "*", raw.lower()
    return (gateway_namespace if namespace == "." else namespace), host.lower()


def _intersect(vs_host: str, server_host: str) -> str | None:
    """The virtual host domain a VirtualService host gets under a server host: the narrower."""
    if host_covers(server_host, vs_host):
        return vs_host
    if host_covers(vs_host, server_host):
        return server_host
    return None


def _scope(name: str, gateways: Mapping[str, m.Gateway]) -> tuple[str, ...]:
    """The Gateways served by the same proxy as `name`: the built-in ingress serves every one
    selecting `istio: ingressgateway`; any other selector is its own proxy."""
    ingress = dict(INGRESS_LABELS)
    selector = gateways[name].selector
    if m.labels_match(selector, ingress):
        return tuple(n for n, g in gateways.items() if m.labels_match(g.selector, ingress))
    return tuple(n for n, g in gateways.items() if g.selector == selector)


def _bindings(gateway: str, server: m.Server, vs: CompiledVirtualService) -> Iterator[Binding]:
    """The virtual host domains `vs` gets under one server of `gateway`: each server host
    (whose `ns/` part must allow the VirtualService's namespace) narrowed by each VS host."""
    for raw in server.hosts:
        namespace, host = _server_host(raw, gateway.split("/")[0])
        if namespace not in ("*", vs.meta.namespace):
            continue
        for vs_host in vs.hosts:
            domain = _intersect(vs_host, host)
            if domain is not None:
                yield Binding(domain, vs, gateway, server)


def _gateway_table(
    scope: tuple[str, ...],
    tls: bool,
    gateways: Mapping[str, m.Gateway],
    virtual_services: tuple[CompiledVirtualService, ...],
) -> GatewayTable:
    """The virtual hosts of one gateway proxy: VirtualServices of one domain merge, in order.
    A plain server with `httpsRedirect` makes each of its hosts, and each domain bound under
    it, a virtual host that requires TLS (Istio's `require_tls: ALL`)."""
    protocols = TLS_SERVER_PROTOCOLS if tls else HTTP_SERVER_PROTOCOLS
    servers = tuple((g, s) for g in scope for s in gateways[g].servers if s.port.protocol in protocols)
    domains: dict[str, list[Binding]] = {}
    secured: set[str] = set()
    for gateway, server in servers:
        redirects = not tls and server.tls is not None and server.tls.https_redirect
        if redirects:
            secured.update(_server_host(raw, gateway.split("/")[0])[1] for raw in server.hosts)
        for vs in virtual_services:
            if gateway not in vs.gateways or not vs.routes:
                continue
            for binding in _bindings(gateway, server, vs):
                if redirects:
                    secured.add(binding.domain)
                bound = domains.setdefault(binding.domain, [])
                if all(b.virtual_service is not vs for b in bound):
                    bound.append(binding)
    ordered = {d: tuple(sorted(b, key=lambda b: b.virtual_service.order)) for d, b in domains.items()}
    wildcards = sorted(((d, b) for d, b in ordered.items() if d.startswith("*")), key=lambda i: specificity(i[0]))
    exact = {d: b for d, b in ordered.items() if not d.startswith("*")}
    return GatewayTable(
        gateways=scope,
        exact=exact,
        wildcards=tuple(wildcards),
        servers=servers,
        https_redirects=tuple(sorted(secured, key=lambda d: (specificity(d), d))),
        anonymous_exact=MappingProxyType({d: live for d, b in exact.items() if (live := _anonymous(b))}),
        anonymous_wildcards=tuple((d, live) for d, b in wildcards if (live := _anonymous(b))),
    )


NOBODY = RequestView("GET", "/", "", MappingProxyType({}))
"""A stand-in request for the static tests, which read the port, the gateway and the source only."""


def _anonymous(bindings: tuple[Binding, ...]) -> tuple[Binding, ...]:
    """The bindings whose VirtualService has a rule at their gateway and port for a request with
    no source workload (static match tests never read the request itself)."""
    return tuple(
        b
        for b in bindings
        if b.virtual_service.exists_for(Facts(NOBODY, "/", b.server.port.number, b.gateway, None, None))
    )


# ---------------------------------------------------------------- the snapshot


def compile_snapshot(mesh: m.Mesh, workloads: Iterable[Workload], *, generation: int = 0) -> Snapshot:
    """The snapshot of `mesh` over exactly `workloads` (pass WorkloadEntry workloads too:
    `registry.static.workloads_of(mesh)`); ServiceEntry endpoints come from the mesh."""
    registered = tuple(workloads)
    services = _services(mesh, registered)
    clusters = _Clusters(services, _rules(mesh))
    compiler = _Compiler(mesh, services, clusters)
    virtual_services = tuple(compiler.virtual_service(vs, i) for i, vs in enumerate(mesh.virtual_services))
    default_routes = {
        (svc.host, port.number): compiler.default_route(svc, port) for svc in services.values() for port in svc.ports
    }
    in_mesh = tuple(vs for vs in virtual_services if MESH in vs.gateways and vs.routes)
    mesh_hosts = {host: ranked for host in services if (ranked := _ranked(host, in_mesh))}
    with_connections = tuple(vs for vs in virtual_services if MESH in vs.gateways and (vs.tcp or vs.tls))
    connection_hosts = {host: ranked for host in services if (ranked := _ranked(host, with_connections))}
    gateways = {f"{g.meta.namespace}/{g.meta.name}": g for g in mesh.gateways}
    by_scope: dict[tuple[tuple[str, ...], bool], GatewayTable] = {}
    tables = {}
    for name in gateways:
        scope = _scope(name, gateways)
        for tls in (False, True):
            if (scope, tls) not in by_scope:
                by_scope[(scope, tls)] = _gateway_table(scope, tls, gateways, virtual_services)
            tables[(name, tls)] = by_scope[(scope, tls)]
    aliases = {name: name for name in gateways}
    aliases.update({name.split("/")[1]: name for name in gateways if name.startswith("default/")})
    names, shorts = _names(services)
    return Snapshot(
        generation=generation,
        mesh=mesh,
        services=MappingProxyType(services),
        clusters=MappingProxyType(dict(clusters.known)),
        workloads=registered,
        virtual_services=virtual_services,
        gateways=MappingProxyType(gateways),
        names=MappingProxyType(names),
        short_names=MappingProxyType(shorts),
        wildcard_services=tuple(
            sorted((s for s in services.values() if s.host.startswith("*")), key=lambda s: specificity(s.host))
        ),
        mesh_hosts=MappingProxyType(mesh_hosts),
        external_hosts=_external_hosts(in_mesh, services),
        default_routes=MappingProxyType(default_routes),
        gateway_tables=MappingProxyType(tables),
        gateway_aliases=MappingProxyType(aliases),
        connection_hosts=MappingProxyType(connection_hosts),
        addresses=MappingProxyType(_addresses(services, mesh)),
        port_services=MappingProxyType(_port_services(services, mesh)),
        sniffed_ports=frozenset(
            p.number for svc in services.values() for p in svc.ports if p.protocol in SNIFFED_PROTOCOLS
        ),
        inbound_protocols=MappingProxyType(_inbound_protocols(services)),
        peers=MappingProxyType({w.peer_id: w for w in (*registered, INGRESS_GATEWAY)}),
    )


# ---------------------------------------------------------------- where connections go


def _addresses(services: Mapping[str, MeshService], mesh: m.Mesh) -> dict[tuple[str, int], tuple[MeshService, int]]:
    """(IP, port) → the service and its port: each endpoint's address on the service port
    (what an app dials, Docker having no service VIP) and on the port the endpoint serves,
    then ServiceEntry addresses; the first service to claim a pair keeps it."""
    found: dict[tuple[str, int], tuple[MeshService, int]] = {}
    for svc in services.values():
        for port in svc.ports:
            for endpoint in svc.endpoints.get(port.number, ()):
                if is_ip(endpoint.address):
                    found.setdefault((endpoint.address, port.number), (svc, port.number))
                    found.setdefault((endpoint.address, endpoint.port), (svc, port.number))
    for entry in mesh.service_entries:
        for raw in entry.hosts:
            claimed = services.get(fqdn(raw, entry.meta.namespace))
            if claimed is None:
                continue
            for address in entry.addresses:
                if is_ip(address):
                    for port in claimed.ports:
                        found.setdefault((address, port.number), (claimed, port.number))
    return found


def _port_services(services: Mapping[str, MeshService], mesh: m.Mesh) -> dict[int, tuple[MeshService, ...]]:
    """ServiceEntry ports without `addresses`: reached on any address of that port."""
    found: dict[int, list[MeshService]] = {}
    for entry in mesh.service_entries:
        if entry.addresses:
            continue
        for raw in entry.hosts:
            entry_service = services.get(fqdn(raw, entry.meta.namespace))
            if entry_service is None or entry_service.origin != resource_ref(entry.meta):
                continue
            for port in entry_service.ports:
                if port.protocol in OPAQUE_PROTOCOLS or port.protocol in TLS_PROTOCOLS:
                    found.setdefault(port.number, []).append(entry_service)
    return {port: tuple(svcs) for port, svcs in found.items()}


def _inbound_protocols(services: Mapping[str, MeshService]) -> dict[tuple[str, int], str]:
    found: dict[tuple[str, int], str] = {}
    for svc in services.values():
        for port in svc.ports:
            for endpoint in svc.endpoints.get(port.number, ()):
                if endpoint.workload is not None:
                    found.setdefault((endpoint.workload.name, endpoint.port), port.protocol)
    return found
