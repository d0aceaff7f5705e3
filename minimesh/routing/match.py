"""The per-request decision: which virtual host, which rule, which destination, as Envoy
would decide with the config istiod gives a sidecar or a gateway. `trace` explains it.

Pure: (snapshot, request, rng) → outcome; the data plane acts on the outcome.
"""

from __future__ import annotations

import random

from minimesh.config import model as m
from minimesh.config.durations import format_duration
from minimesh.config.labels import GRPC_WEB
from minimesh.config.names import MESH, host_covers, specificity
from minimesh.routing.pick import RingHash, choose_weighted, hash_key, request_cookie
from minimesh.routing.request import DEFAULT_PORTS, RequestView, split_authority
from minimesh.routing.snapshot import (
    Binding,
    BlackHole,
    Cluster,
    CompiledVirtualService,
    DirectResponse,
    Draw,
    Facts,
    Forward,
    GatewayTable,
    MeshService,
    NoRoute,
    Outcome,
    PassThrough,
    Redirect,
    Route,
    Snapshot,
    TraceStep,
    replace_prefix,
)

Steps = list[TraceStep] | None
"""Where a trace collects its steps; None on the hot path, so nothing is formatted."""

Hit = tuple[Route, str | None]
"""The rule that matched, and the uri prefix its match block matched (for rewrites)."""


def decide(snapshot: Snapshot, request: RequestView, rng: random.Random) -> Outcome:
    """What the proxy does with `request`: forward, redirect, answer, or refuse."""
    return _decide(snapshot, request, rng, None)


def trace(snapshot: Snapshot, request: RequestView, rng: random.Random) -> tuple[Outcome, tuple[TraceStep, ...]]:
    """The same decision, with every step that led to it (`minimesh explain`)."""
    steps: list[TraceStep] = []
    outcome = _decide(snapshot, request, rng, steps)
    steps.extend(describe_outcome(outcome, request))
    return outcome, tuple(steps)


def _decide(snapshot: Snapshot, request: RequestView, rng: random.Random, steps: Steps) -> Outcome:
    if request.gateway == MESH:
        return _at_sidecar(snapshot, request, rng, steps)
    return _at_gateway(snapshot, request, rng, steps)


def _facts(request: RequestView, port: int, gateway: str) -> Facts:
    source = request.source
    if source is None:
        return Facts(request, request.path_only, port, gateway, None, None)
    return Facts(request, request.path_only, port, gateway, source.label_map, source.namespace)


# ---------------------------------------------------------------- sidecars


def _at_sidecar(snapshot: Snapshot, request: RequestView, rng: random.Random, steps: Steps) -> Outcome:
    host, authority_port = split_authority(request.authority)
    namespace = request.source.namespace if request.source else "default"
    port = request.port or authority_port
    service = snapshot.service_for(host, namespace)
    if service is not None:
        listener = port or (service.ports[0].number if service.ports else DEFAULT_PORTS.get(request.scheme, 80))
        exposed = service.port(listener) is not None and authority_port in (None, listener)
        if steps is not None:
            steps.append(
                TraceStep("host", "info" if exposed else "miss", _service_detail(request, service, listener, port))
            )
        if exposed:
            return _to_service(snapshot, service, _facts(request, listener, MESH), rng, steps)
    listener = port or DEFAULT_PORTS.get(request.scheme, 80)
    if service is None and steps is not None:
        steps.append(TraceStep("host", "info", f"{request.authority} is no service of the registry"))
    if listener == 80:
        facts = _facts(request, listener, MESH)
        for pattern, vs in snapshot.external_hosts:
            if host_covers(pattern, host):
                if steps is not None:
                    steps.append(TraceStep(vs.ref, "match", f"host {pattern} (no service: Istio routes it on port 80)"))
                outcome = _in_virtual_service(vs, facts, rng, steps)
                if outcome is not None:
                    return outcome
                break
    if snapshot.mesh.mesh_config.outbound_mode == "REGISTRY_ONLY":
        return BlackHole(host, listener)
    return PassThrough(host, listener)


def _service_detail(request: RequestView, service: MeshService, listener: int, port: int | None) -> str:
    how = "" if port else " (no port given: the service's first port)"
    text = f"{request.authority} → {service.host} port {listener}{how}"
    if service.port(listener) is None:
        ports = ", ".join(str(p.number) for p in service.ports) or "none"
        return f"{text}, which the service does not expose (it has {ports})"
    if split_authority(request.authority)[1] not in (None, listener):
        return f"{text}, but the Host header names another port"
    return text


def _to_service(snapshot: Snapshot, service: MeshService, facts: Facts, rng: random.Random, steps: Steps) -> Outcome:
    ranked = snapshot.mesh_hosts.get(service.host, ())
    if ranked:
        chosen = ranked[0]
        if steps is not None:
            steps.append(TraceStep(chosen.ref, "match", _covering(chosen, service.host)))
            shadowed = f"also covers {service.host}; {chosen.ref} comes first"
            steps.extend(TraceStep(other.ref, "miss", shadowed) for other in ranked[1:])
        outcome = _in_virtual_service(chosen, facts, rng, steps)
        if outcome is not None:
            return outcome
    elif steps is not None:
        steps.append(TraceStep("VirtualService", "info", f"none for {service.host}: the default route"))
    route = snapshot.default_routes[(service.host, facts.port)]
    return _act(route, "/", facts, rng)


def _covering(vs: CompiledVirtualService, host: str) -> str:
    written = next(raw for raw, h in zip(vs.source.hosts, vs.hosts, strict=True) if host_covers(h, host))
    return f"host {written} covers {host}"


def _in_virtual_service(vs: CompiledVirtualService, facts: Facts, rng: random.Random, steps: Steps) -> Outcome | None:
    """The outcome of the first rule that matches; NoRoute when none does; None when no rule
    exists for this proxy and port at all (Istio then drops the VirtualService here)."""
    hit = _first_rule(vs.routes, facts, steps)
    if hit is not None:
        return _act(hit[0], hit[1], facts, rng)
    if vs.exists_for(facts):
        return NoRoute(f"no rule of {vs.ref} matches")
    if steps is not None:
        steps.append(TraceStep(vs.ref, "info", "no rule applies to this source or port, so Istio leaves it out here"))
    return None


def _first_rule(routes: tuple[Route, ...], facts: Facts, steps: Steps) -> Hit | None:
    for route in routes:
        if not route.blocks:
            if steps is not None:
                steps.append(TraceStep(_rule(route), "match", "no match conditions"))
            return route, "/"
        for block in route.blocks:
            if block.holds(facts):
                if steps is not None:
                    steps.append(TraceStep(_rule(route), "match", _held(route, block.index)))
                return route, block.prefix
        if steps is not None:
            steps.append(TraceStep(_rule(route), "miss", _missed(route, facts)))
    return None


def _rule(route: Route) -> str:
    """How a trace names a rule: `http[2]`."""
    return route.ref.rpartition("#")[2]


def _held(route: Route, index: int) -> str:
    text = route.blocks[index].describe()
    return f"match[{index}]: {text}" if len(route.blocks) > 1 else text


def _missed(route: Route, facts: Facts) -> str:
    reasons = []
    for block in route.blocks:
        failed = block.first_failure(facts)
        reason = failed.why(facts) if failed else "held"
        reasons.append(f"match[{block.index}]: {reason}" if len(route.blocks) > 1 else reason)
    return "; ".join(reasons)


# ---------------------------------------------------------------- gateways


def _at_gateway(snapshot: Snapshot, request: RequestView, rng: random.Random, steps: Steps) -> Outcome:
    name = snapshot.gateway_aliases.get(request.gateway)
    if name is None:
        return NoRoute(f"no Gateway {request.gateway} in the config")
    tls = request.scheme == "https"
    table = snapshot.gateway_tables[(name, tls)]
    host, _ = split_authority(request.authority)
    bound = _gateway_bindings(table, host, request)
    if not tls and table.https_redirects:
        secured = _requires_tls(table, host, bound)
        if secured is not None:
            if steps is not None:
                detail = f"{', '.join(table.gateways)}: virtual host {secured} has httpsRedirect"
                steps.append(TraceStep("gateway", "info", detail))
            return Redirect("", None, 301, f"https://{request.authority}{request.path}")
    if not bound:
        return NoRoute(_unbound_reason(table, host, tls))
    if steps is not None:
        steps.append(TraceStep("gateway", "info", f"{', '.join(table.gateways)}: virtual host {bound[0][0].domain}"))
    for binding, facts in bound:
        vs = binding.virtual_service
        if steps is not None:
            steps.append(TraceStep(vs.ref, "match", f"bound to {binding.gateway}, host {binding.domain}"))
        hit = _first_rule(vs.routes, facts, steps)
        if hit is not None:
            outcome = _act(hit[0], hit[1], facts, rng)
            if isinstance(outcome, Forward):
                outcome.grpc_web = binding.server.port.protocol == GRPC_WEB
            return outcome
    return NoRoute(f"no rule matches at {name} for host {host}")


def _gateway_bindings(table: GatewayTable, host: str, request: RequestView) -> tuple[tuple[Binding, Facts], ...]:
    """The bindings of the most specific virtual host that exists for `host`: a VirtualService
    with no rule for this gateway and port contributes nothing (Istio leaves it out)."""
    if request.source is None:
        path = request.path_only
        return tuple(
            [(b, Facts(request, path, b.server.port.number, b.gateway, None, None)) for b in table.anonymous(host)]
        )
    exact = table.exact.get(host, ())
    candidates = ((exact,) if exact else ()) + tuple(b for d, b in table.wildcards if host_covers(d, host))
    for bindings in candidates:
        bound = tuple(
            (binding, facts)
            for binding in bindings
            if binding.virtual_service.exists_for(facts := _facts(request, binding.server.port.number, binding.gateway))
        )
        if bound:
            return bound
    return ()


def _requires_tls(table: GatewayTable, host: str, bound: tuple[tuple[Binding, Facts], ...]) -> str | None:
    """The virtual host Envoy picks for `host` if it requires TLS: the most specific
    `httpsRedirect` domain covering `host`, unless a bound domain is more specific still."""
    domain = next((d for d in table.https_redirects if host_covers(d, host)), None)
    if domain is not None and (not bound or specificity(domain) <= specificity(bound[0][0].domain)):
        return domain
    return None


def _unbound_reason(table: GatewayTable, host: str, tls: bool) -> str:
    gateways = ", ".join(table.gateways)
    kind = "HTTPS" if tls else "HTTP"
    admitted = any(host_covers(raw.rpartition("/")[2].lower(), host) for _, s in table.servers for raw in s.hosts)
    if not admitted:
        return f"no {kind} server of {gateways} admits host {host}"
    return f"no VirtualService bound to {gateways} serves host {host}"


# ---------------------------------------------------------------- acting on a rule


def _act(route: Route, prefix: str | None, facts: Facts, rng: random.Random) -> Outcome:
    if route.redirect is not None:
        location = redirect_location(route.redirect, facts.request, facts.port, prefix)
        return Redirect(route.ref, route, route.redirect.redirect_code, location, facts.port)
    if route.direct_response is not None:
        return DirectResponse(route.ref, route, route.direct_response.status, route.direct_response.body)
    if not route.destinations:
        return NoRoute(f"{route.ref} has no destination")
    if len(route.destinations) == 1:
        return Forward(route.ref, route, route.destinations[0].target(facts.port), facts.port, None, prefix)
    picked = choose_weighted(route.weights, rng)
    target = route.destinations[picked].target(facts.port)
    return Forward(route.ref, route, target, facts.port, Draw(route.weights, picked), prefix)


def redirect_location(redirect: m.HTTPRedirect, request: RequestView, listener: int, prefix: str | None) -> str:
    """The Location Envoy builds from the redirect Istio gives it: scheme, host and port as
    configured (`redirect_port`); the path replaced by `uri` (the query kept unless `uri` has
    its own) or its matched `prefix` replaced by `prefixRewrite`."""
    scheme = redirect.scheme or request.scheme
    port = redirect_port(redirect, scheme, listener)
    host = redirect.authority or _request_host(request, scheme, port)
    path = request.path
    if redirect.prefix_rewrite is not None:
        path = replace_prefix(redirect.prefix_rewrite, prefix, path)
    elif redirect.uri:
        query = request.query
        path = redirect.uri if "?" in redirect.uri or not query else f"{redirect.uri}?{query}"
    if not path.startswith("/"):
        path = "/" + path
    return f"{scheme}://{host}{f':{port}' if port else ''}{path}"


def redirect_port(redirect: m.HTTPRedirect, scheme: str, listener: int) -> int | None:
    """Istio's port_redirect: `port`, or for FROM_REQUEST_PORT the port the rule was built for
    (`listener`: the Gateway server's port from the YAML, the service port at a sidecar), never
    the Host header's; None when it is the default port of `scheme` (80 http, 443 https)."""
    port = redirect.port or (listener if redirect.derive_port == "FROM_REQUEST_PORT" else None)
    return None if port == DEFAULT_PORTS.get(scheme) else port


def _request_host(request: RequestView, scheme: str, port: int | None) -> str:
    """Envoy's processRequestHost: the Host header, its port dropped when a new port is set or
    when the scheme changes away from the old scheme's default port."""
    authority = request.authority
    old_port = split_authority(authority)[1]
    if old_port is None:
        return authority
    default = DEFAULT_PORTS.get(request.scheme)
    if port is not None or (scheme != request.scheme and old_port == default):
        return authority[: authority.rindex(":")]
    return authority


# ---------------------------------------------------------------- explaining an outcome


def describe_outcome(outcome: Outcome, request: RequestView) -> list[TraceStep]:
    """The steps that say what a decision does: split, cluster, policies, faults, result."""
    if isinstance(outcome, Forward):
        return _describe_forward(outcome, request)
    if isinstance(outcome, Redirect):
        return [TraceStep("redirect", "info", _redirect_detail(outcome, request))]
    if isinstance(outcome, DirectResponse):
        return [TraceStep("direct response", "info", f"{outcome.status}, {len(outcome.body)} bytes")]
    if isinstance(outcome, NoRoute):
        return [TraceStep("result", "miss", f"{outcome.status} {outcome.flag}: {outcome.reason}")]
    if isinstance(outcome, PassThrough):
        return [TraceStep("result", "info", f"{outcome.cluster}: {outcome.host}:{outcome.port} goes out as addressed")]
    return [TraceStep("result", "miss", f"{outcome.status} {outcome.cluster}: {outcome.host} is not in the registry")]


def _redirect_detail(outcome: Redirect, request: RequestView) -> str:
    """The Location, and where its port came from."""
    text = f"{outcome.status} to {outcome.location}"
    redirect = outcome.route.redirect if outcome.route is not None else None
    if redirect is None:
        return f"{text} (the server's httpsRedirect: https, the Host header and path as sent)"
    scheme = redirect.scheme or request.scheme
    if redirect.port:
        chosen = f"port {redirect.port} as set"
    elif redirect.derive_port == "FROM_REQUEST_PORT":
        where = "service port" if request.gateway == MESH else "Gateway server"
        chosen = f"derivePort FROM_REQUEST_PORT: port {outcome.listener} of the {where} the request matched"
    else:
        return text
    if redirect_port(redirect, scheme, outcome.listener) is None:
        chosen += f", left out as the default port of {scheme}"
        if redirect.authority is None and split_authority(request.authority)[1] is not None:
            chosen += "; the Host header's own port stays"
    return f"{text} ({chosen})"


def _affinity(cluster: Cluster, request: RequestView) -> str | None:
    """How a cluster that hashes on a cookie places `request`: by the cookie it carries, else
    by a new one the proxy sets (with a ttl), else at random."""
    consistent = cluster.policy.load_balancer.consistent_hash
    name = consistent.http_cookie_name if consistent is not None else None
    if consistent is None or not name:
        return None
    value = request_cookie(request, name)
    if value is not None:
        endpoint = RingHash(cluster.endpoints, random.Random(0)).pick(key=hash_key(consistent, request))
        return f"cookie {name}={value} hashes to {endpoint or 'no endpoint'}: every request carrying it goes there"
    cookie = cluster.policy.cookie
    if cookie is None:
        return f"request has no cookie {name} and httpCookie sets no ttl, so none is set: a random endpoint"
    example = cookie.header("VALUE").decode("latin-1")
    return (
        f"request has no cookie {name}: the proxy makes a VALUE from the client connection (16 hex digits), "
        f"sends the request to the endpoint it hashes to and answers with Set-Cookie: {example}; "
        "requests carrying it stick to that endpoint"
    )


def _describe_forward(forward: Forward, request: RequestView) -> list[TraceStep]:
    route = forward.route
    cluster = forward.cluster
    steps = []
    if forward.draw is not None:
        labels = [d.label for d in route.destinations]
        weights = " ".join(f"{label}={w}" for label, w in zip(labels, forward.draw.weights, strict=True))
        steps.append(TraceStep("split", "info", f"weights {weights} → drew {labels[forward.draw.picked]}"))
    selector = ",".join(f"{k}={v}" for k, v in cluster.selector)
    subset = f"subset {cluster.subset} ({selector or 'all'})" if cluster.subset else "no subset"
    endpoints = ", ".join(str(e) for e in cluster.endpoints) or "none (503 UH)"
    problem = f"; {cluster.problem}" if cluster.problem else ""
    steps.append(TraceStep("cluster", "info", f"{cluster.name}: {subset}; endpoints {endpoints}{problem}"))
    steps.append(TraceStep("policy", "info", cluster.policy.describe()))
    affinity = _affinity(cluster, request)
    if affinity is not None:
        steps.append(TraceStep("affinity", "info", affinity))
    faulty = "off: the route injects a fault"
    timeout = format_duration(route.timeout) if route.timeout is not None else (faulty if route.fault else "none")
    steps.append(TraceStep("timeout", "info", timeout))
    retries = str(route.retries) if route.retries else (faulty if route.fault else "off (attempts 0)")
    steps.append(TraceStep("retries", "info", retries))
    if route.fault is not None:
        steps.append(TraceStep("fault", "info", _fault_text(route.fault, route.fault_first)))
    steps.extend(TraceStep("mirror", "info", f"{mi.cluster.name} {mi.percentage:g}%") for mi in forward.mirrors)
    if route.rewrite is not None:
        path, authority = forward.rewritten(request.path, request.authority)
        steps.append(TraceStep("rewrite", "info", f"{request.authority}{request.path} → {authority}{path}"))
    return steps


def _fault_text(fault: m.HTTPFaultInjection, first: int | None) -> str:
    def share(percentage: float | None) -> str:
        if first is not None:
            return f"the first {first} requests only (minimesh.dev/fault-first; percentage ignored)"
        return _percent(percentage)

    parts = []
    if fault.delay is not None:
        parts.append(f"delay {format_duration(fault.delay.fixed_delay)} for {share(fault.delay.percentage)}")
    if fault.abort is not None:
        parts.append(f"abort {fault.abort.http_status} for {share(fault.abort.percentage)}")
    return "; ".join(parts)


def _percent(value: float | None) -> str:
    return "0% (no percentage given: nothing is injected)" if value is None else f"{value:g}%"
