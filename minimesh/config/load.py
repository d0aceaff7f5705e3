"""YAML documents → the typed model: schema check, then one builder per kind.

Each document is checked against Istio's schema first; only a valid one is built, and a
problem's severity comes from its issue's code. The builder records every field it reads, so
a field Istio knows but minimesh does not implement is reported as a warning ("has no effect
locally") instead of passing silently. A builder that raises is a bug, never a config error.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from minimesh.config import model as m
from minimesh.config.durations import parse_duration
from minimesh.config.schema import IssueCode, check_document
from minimesh.config.source import SPEC, Document, FieldPath, field_path, read_paths
from minimesh.errors import ConfigError, Problem, Severity


class _Reader:
    """Reads one document for a builder: typed getters that remember what was read."""

    def __init__(self, document: Document, problems: list[Problem]) -> None:
        self.document = document
        self.problems = problems
        self.used: set[FieldPath] = {()}
        self.whole: set[FieldPath] = set()
        self.asked: set[FieldPath] = set()

    def report(self, severity: Severity, path: FieldPath, message: str, *, key: bool = False) -> None:
        where = self.document.where(path, key=key)
        self.problems.append(Problem(where, severity, message, self.document.ref, field_path(path)))

    def error(self, path: FieldPath, message: str, *, key: bool = False) -> None:
        self.report("error", path, message, key=key)

    def warn(self, path: FieldPath, message: str, *, key: bool = False) -> None:
        self.report("warning", path, message, key=key)

    def raw(self, path: FieldPath, *, whole: bool = False) -> Any:
        """The value at `path` (None when absent); marks it, and every parent on the way, as read."""
        self.asked.add(path)
        value: Any = self.document.body
        for i, part in enumerate(path):
            if isinstance(part, int):
                if not isinstance(value, list) or part >= len(value):
                    return None
            elif not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
            self.used.add(path[: i + 1])
        if whole:
            self.whole.add(path)
        return value

    def has(self, path: FieldPath) -> bool:
        self.asked.add(path)
        value: Any = self.document.body
        for part in path:
            if isinstance(part, int):
                if not isinstance(value, list) or part >= len(value):
                    return False
            elif not isinstance(value, dict) or part not in value:
                return False
            value = value[part]
        return True

    def text(self, path: FieldPath, default: str | None = None) -> str | None:
        value = self.raw(path)
        return default if value is None else str(value)

    def integer(self, path: FieldPath) -> int | None:
        value = self.raw(path)
        return None if value is None else int(value)

    def flag(self, path: FieldPath, default: bool = False) -> bool:
        value = self.raw(path)
        return default if value is None else bool(value)

    def items(self, path: FieldPath) -> list[FieldPath]:
        value = self.raw(path)
        return [(*path, i) for i in range(len(value))] if isinstance(value, list) else []

    def strings(self, path: FieldPath) -> tuple[str, ...]:
        value = self.raw(path, whole=True)
        return tuple(str(v) for v in value) if isinstance(value, list) else ()

    def pairs(self, path: FieldPath) -> tuple[tuple[str, str], ...]:
        value = self.raw(path, whole=True)
        return tuple((str(k), str(v)) for k, v in value.items()) if isinstance(value, dict) else ()

    def labels(self, path: FieldPath) -> m.Labels | None:
        value = self.raw(path, whole=True)
        return m.labels_of({str(k): str(v) for k, v in value.items()}) if isinstance(value, dict) else None

    def duration(self, path: FieldPath) -> float | None:
        value = self.raw(path)
        if value is None:
            return None
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.error(path, str(exc))
            return None

    def percent(self, path: FieldPath) -> float | None:
        """Istio's `Percent {value}`: 0-100, fractions allowed."""
        value = self.raw((*path, "value"))
        if value is None:
            return None if not self.has(path) else 0.0
        number = float(value)
        if not 0.0 <= number <= 100.0:
            self.error((*path, "value"), f"percentage must be between 0 and 100, got {value}")
            return None
        return number

    def regex(self, path: FieldPath) -> re.Pattern[str] | None:
        text = self.text(path) or ""
        try:
            return re.compile(text)
        except re.error as exc:
            self.error(path, f"regex '{text}' does not compile: {exc}; write it in RE2 syntax")
            return None

    def unused(self) -> Iterable[FieldPath]:
        """Top-most fields that were written but never read."""
        for path in self.document.keys:
            if path in self.used or path[:-1] not in self.used:
                continue
            if any(path[: len(w)] == w for w in self.whole):
                continue
            yield path


# ---------------------------------------------------------------- shared pieces


def _meta(r: _Reader) -> m.Meta:
    r.raw(("apiVersion",))
    r.raw(("metadata",), whole=True)
    return m.Meta(
        kind=r.text(("kind",)) or "",
        name=r.text(("metadata", "name")) or "",
        namespace=r.text(("metadata", "namespace")) or "default",
        location=r.document.where(()),
        labels=r.labels(("metadata", "labels")) or (),
        annotations=r.labels(("metadata", "annotations")) or (),
    )


ANY_VALUE = "*"
"""`regex: "*"` under `withoutHeaders`: no RE2 regex but Istio's "any value", which its
validation lets through and its translation turns into a present match."""


def _string_match(r: _Reader, path: FieldPath, *, star_is_present: bool = False) -> m.StringMatch | None:
    """A StringMatch; None for a present match (`{}`, or `regex: "*"` where `star_is_present`)."""
    value = r.raw(path)
    if not isinstance(value, dict) or not value:
        return None
    for kind in ("exact", "prefix", "regex"):
        if kind in value:
            text = r.text((*path, kind)) or ""
            if kind != "regex":
                return m.StringMatch(kind, text)
            if star_is_present and text == ANY_VALUE:
                return None
            pattern = r.regex((*path, kind))
            return m.StringMatch(kind, text, pattern) if pattern else None
    return None


def _match_map(
    r: _Reader, path: FieldPath, *, lower: bool = True, star_is_present: bool = False
) -> tuple[tuple[str, m.StringMatch | None], ...]:
    """Header matches (names lower-cased, as HTTP compares them) or query parameters (as written)."""
    value = r.raw(path)
    if not isinstance(value, dict):
        return ()
    return tuple(
        (str(name).lower() if lower else str(name), _string_match(r, (*path, name), star_is_present=star_is_present))
        for name in value
    )


def _destination(r: _Reader, path: FieldPath) -> m.Destination:
    return m.Destination(
        host=r.text((*path, "host")) or "",
        subset=r.text((*path, "subset")) or None,
        port=r.integer((*path, "port", "number")),
    )


def _header_ops(r: _Reader, path: FieldPath) -> m.HeaderOperations:
    return m.HeaderOperations(
        set=tuple((k.lower(), v) for k, v in r.pairs((*path, "set"))),
        add=tuple((k.lower(), v) for k, v in r.pairs((*path, "add"))),
        remove=tuple(name.lower() for name in r.strings((*path, "remove"))),
    )


def _headers(r: _Reader, path: FieldPath) -> m.Headers:
    return m.Headers(_header_ops(r, (*path, "request")), _header_ops(r, (*path, "response")))


def _weighted(r: _Reader, path: FieldPath, *, http: bool = True) -> tuple[m.RouteDestination, ...]:
    destinations = tuple(
        m.RouteDestination(
            destination=_destination(r, (*item, "destination")),
            weight=r.integer((*item, "weight")) or 0,
            headers=_headers(r, (*item, "headers")) if http else m.Headers(),
        )
        for item in r.items(path)
    )
    negative = [i for i, dest in enumerate(destinations) if dest.weight < 0]
    for i in negative:
        r.error((*path, i, "weight"), f"weight must not be negative, got {destinations[i].weight}")
    if negative:
        return destinations
    total = sum(d.weight for d in destinations)
    if len(destinations) > 1:
        if total == 0:
            r.error(path, "every destination has weight 0, so none gets traffic; give at least one a weight")
        elif total != 100:
            r.warn(path, f"weights sum to {total}, not 100; they are relative (each gets weight/{total})")
    return destinations


RETRY_ON_TOKENS = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)


def _retry(r: _Reader, path: FieldPath) -> m.HTTPRetry:
    attempts = r.integer((*path, "attempts")) or 0
    if attempts < 0:
        r.error((*path, "attempts"), f"attempts must not be negative, got {attempts}")
    retry_on_text = r.text((*path, "retryOn"))
    tokens = tuple(t.strip() for t in retry_on_text.split(",") if t.strip()) if retry_on_text else ()
    for token in tokens:
        if token in RETRY_ON_TOKENS or (token.isdigit() and 100 <= int(token) <= 599):
            continue
        close = difflib.get_close_matches(token, sorted(RETRY_ON_TOKENS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; use Envoy retry-on names or status codes"
        r.error((*path, "retryOn"), f"unknown retryOn condition '{token}'{hint}")
    return m.HTTPRetry(
        attempts=attempts,
        per_try_timeout=r.duration((*path, "perTryTimeout")),
        retry_on=tokens,
        retry_remote_localities=r.flag((*path, "retryRemoteLocalities")),
    )


def _fault(r: _Reader, path: FieldPath) -> m.HTTPFaultInjection:
    delay = abort = None
    if r.has((*path, "delay")):
        fixed = r.duration((*path, "delay", "fixedDelay"))
        if fixed is None:
            r.error((*path, "delay"), "delay needs fixedDelay (exponentialDelay has no effect locally)")
        else:
            delay = m.Delay(fixed, _fault_percentage(r, (*path, "delay")))
    if r.has((*path, "abort")):
        abort = _abort(r, (*path, "abort"))
    return m.HTTPFaultInjection(delay=delay, abort=abort)


def _abort(r: _Reader, path: FieldPath) -> m.Abort | None:
    """An abort by `httpStatus`, or by `grpcStatus` (HTTP 200, as Envoy's fault filter answers)."""
    status = r.integer((*path, "httpStatus"))
    if status is not None:
        if not 200 <= status <= 599:
            r.error((*path, "httpStatus"), f"httpStatus must be in 200-599, got {status}")
            return None
        return m.Abort(status, _fault_percentage(r, path))
    name = r.text((*path, "grpcStatus"))
    if name is None:
        r.error(path, "abort needs httpStatus or grpcStatus (http2Error has no effect locally)")
        return None
    code = m.GRPC_CODES.get(name)
    if code is None:
        close = difflib.get_close_matches(name.upper(), sorted(m.GRPC_CODES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; use a gRPC status name such as UNAVAILABLE"
        r.error((*path, "grpcStatus"), f"unknown grpcStatus '{name}'{hint}")
        return None
    return m.Abort(200, _fault_percentage(r, path), code)


def _fault_percentage(r: _Reader, path: FieldPath) -> float | None:
    if path[-1] == "delay" and r.has((*path, "percent")) and not r.has((*path, "percentage")):
        value = r.integer((*path, "percent"))
        return float(value) if value is not None else None
    return r.percent((*path, "percentage"))


def _cors(r: _Reader, path: FieldPath) -> m.CorsPolicy:
    origins = tuple(match for item in r.items((*path, "allowOrigins")) if (match := _string_match(r, item)) is not None)
    origins += tuple(m.StringMatch("exact", o) for o in r.strings((*path, "allowOrigin")))
    return m.CorsPolicy(
        allow_origins=origins,
        allow_methods=r.strings((*path, "allowMethods")),
        allow_headers=r.strings((*path, "allowHeaders")),
        expose_headers=r.strings((*path, "exposeHeaders")),
        max_age=r.duration((*path, "maxAge")),
        allow_credentials=r.raw((*path, "allowCredentials")),
        unmatched_preflights=r.text((*path, "unmatchedPreflights"), "FORWARD") or "FORWARD",
    )


# ---------------------------------------------------------------- VirtualService


def _http_match(r: _Reader, path: FieldPath) -> m.HTTPMatchRequest:
    return m.HTTPMatchRequest(
        name=r.text((*path, "name"), "") or "",
        uri=_string_match(r, (*path, "uri")),
        scheme=_string_match(r, (*path, "scheme")),
        method=_string_match(r, (*path, "method")),
        authority=_string_match(r, (*path, "authority")),
        headers=_match_map(r, (*path, "headers")),
        without_headers=_match_map(r, (*path, "withoutHeaders"), star_is_present=True),
        query_params=_match_map(r, (*path, "queryParams"), lower=False),
        port=r.integer((*path, "port")),
        source_labels=r.labels((*path, "sourceLabels")) or (),
        gateways=r.strings((*path, "gateways")),
        source_namespace=r.text((*path, "sourceNamespace")),
        ignore_uri_case=r.flag((*path, "ignoreUriCase")),
    )


def _redirect(r: _Reader, path: FieldPath, matches: tuple[m.HTTPMatchRequest, ...]) -> m.HTTPRedirect:
    """A redirect, refused where Istio's validation refuses it: `uri` with `prefixRewrite`, or
    `prefixRewrite` on a rule that matches a uri other than by prefix."""
    redirect = m.HTTPRedirect(
        uri=r.text((*path, "uri")),
        prefix_rewrite=r.text((*path, "prefixRewrite")) or None,
        authority=r.text((*path, "authority")),
        port=r.integer((*path, "port")),
        derive_port=r.text((*path, "derivePort")),
        scheme=r.text((*path, "scheme")),
        redirect_code=r.integer((*path, "redirectCode")) or 301,
    )
    if redirect.prefix_rewrite is None:
        return redirect
    if redirect.uri:
        r.error(path, "a redirect takes only one of uri and prefixRewrite; remove one")
    for i, match in enumerate(matches):
        if match.uri is not None and match.uri.kind != "prefix":
            message = (
                f"redirect.prefixRewrite replaces the matched prefix, but match[{i}] matches the uri by "
                f"{match.uri.kind}; use uri.prefix or redirect.uri"
            )
            r.error((*path[:-1], "match", i, "uri"), message)
    return redirect


def _rewrite(r: _Reader, path: FieldPath) -> m.HTTPRewrite:
    regex = None
    if r.has((*path, "uriRegexRewrite")):
        pattern = r.regex((*path, "uriRegexRewrite", "match"))
        target = r.text((*path, "uriRegexRewrite", "rewrite"), "") or ""
        regex = m.RegexRewrite(pattern, re.sub(r"\\(\d)", r"\\g<\1>", target)) if pattern else None
    return m.HTTPRewrite(uri=r.text((*path, "uri")), authority=r.text((*path, "authority")), uri_regex=regex)


def _direct_response(r: _Reader, path: FieldPath) -> m.HTTPDirectResponse:
    body = r.raw((*path, "body"), whole=True)
    text = ""
    if isinstance(body, dict):
        text = str(body.get("string") or body.get("bytes") or "")
    return m.HTTPDirectResponse(status=r.integer((*path, "status")) or 200, body=text.encode())


def _http_route(r: _Reader, path: FieldPath, index: int) -> m.HTTPRoute:
    actions = [key for key in ("route", "redirect", "directResponse", "delegate") if r.has((*path, key))]
    if not actions:
        r.error(path, "an http route needs one of route, redirect, directResponse")
    elif len(actions) > 1 and actions != ["route"]:
        r.error(path, f"an http route takes only one of route, redirect, directResponse; got {', '.join(actions)}")
    mirrors: list[m.Mirror] = []
    if r.has((*path, "mirror")):
        legacy = r.percent((*path, "mirrorPercentage"))
        if legacy is None and r.has((*path, "mirrorPercent")):
            legacy = float(r.integer((*path, "mirrorPercent")) or 0)
        mirrors.append(m.Mirror(_destination(r, (*path, "mirror")), legacy))
    for item in r.items((*path, "mirrors")):
        mirrors.append(m.Mirror(_destination(r, (*item, "destination")), r.percent((*item, "percentage"))))
    matches = tuple(_http_match(r, item) for item in r.items((*path, "match")))
    return m.HTTPRoute(
        index=index,
        location=r.document.where(path),
        name=r.text((*path, "name"), "") or "",
        match=matches,
        route=_weighted(r, (*path, "route")),
        redirect=_redirect(r, (*path, "redirect"), matches) if r.has((*path, "redirect")) else None,
        direct_response=(_direct_response(r, (*path, "directResponse")) if r.has((*path, "directResponse")) else None),
        rewrite=_rewrite(r, (*path, "rewrite")) if r.has((*path, "rewrite")) else None,
        timeout=r.duration((*path, "timeout")),
        retries=_retry(r, (*path, "retries")) if r.has((*path, "retries")) else None,
        fault=_fault(r, (*path, "fault")) if r.has((*path, "fault")) else None,
        mirrors=tuple(mirrors),
        cors_policy=_cors(r, (*path, "corsPolicy")) if r.has((*path, "corsPolicy")) else None,
        headers=_headers(r, (*path, "headers")),
    )


def _tcp_route(r: _Reader, path: FieldPath, index: int, *, tls: bool = False) -> m.TCPRoute:
    """A `tcp[]` or a `tls[]` rule: the same match attributes, and `sniHosts` for `tls[]`."""
    matches = tuple(
        m.L4MatchAttributes(
            destination_subnets=r.strings((*item, "destinationSubnets")),
            port=r.integer((*item, "port")),
            source_labels=r.labels((*item, "sourceLabels")) or (),
            gateways=r.strings((*item, "gateways")),
            source_namespace=r.text((*item, "sourceNamespace")),
            sni_hosts=tuple(h.lower() for h in r.strings((*item, "sniHosts"))) if tls else (),
        )
        for item in r.items((*path, "match"))
    )
    return m.TCPRoute(index, r.document.where(path), matches, _weighted(r, (*path, "route"), http=False))


def build_virtual_service(r: _Reader) -> m.VirtualService:
    hosts = r.strings(("spec", "hosts"))
    if not hosts:
        r.error(SPEC, "a VirtualService needs at least one host in hosts")
    return m.VirtualService(
        meta=_meta(r),
        hosts=hosts,
        gateways=r.strings(("spec", "gateways")),
        http=tuple(_http_route(r, item, i) for i, item in enumerate(r.items(("spec", "http")))),
        tcp=tuple(_tcp_route(r, item, i) for i, item in enumerate(r.items(("spec", "tcp")))),
        tls=tuple(_tcp_route(r, item, i, tls=True) for i, item in enumerate(r.items(("spec", "tls")))),
        export_to=r.strings(("spec", "exportTo")),
    )


# ---------------------------------------------------------------- DestinationRule


def _load_balancer(r: _Reader, path: FieldPath) -> m.LoadBalancer:
    consistent = None
    ch = (*path, "consistentHash")
    if r.has(ch):
        consistent = m.ConsistentHash(
            http_header_name=r.text((*ch, "httpHeaderName")),
            http_cookie_name=r.text((*ch, "httpCookie", "name")),
            http_cookie_path=r.text((*ch, "httpCookie", "path")),
            http_cookie_ttl=r.duration((*ch, "httpCookie", "ttl")),
            http_cookie_attributes=tuple(
                (r.text((*item, "name"), "") or "", r.text((*item, "value"), "") or "")
                for item in r.items((*ch, "httpCookie", "attributes"))
            ),
            use_source_ip=r.flag((*ch, "useSourceIp")),
            http_query_parameter_name=r.text((*ch, "httpQueryParameterName")),
        )
    return m.LoadBalancer(simple=r.text((*path, "simple")), consistent_hash=consistent)


def _connection_pool(r: _Reader, path: FieldPath) -> m.ConnectionPool:
    tcp, http = (*path, "tcp"), (*path, "http")
    return m.ConnectionPool(
        max_connections=r.integer((*tcp, "maxConnections")),
        connect_timeout=r.duration((*tcp, "connectTimeout")),
        http1_max_pending_requests=r.integer((*http, "http1MaxPendingRequests")),
        http2_max_requests=r.integer((*http, "http2MaxRequests")),
        max_requests_per_connection=r.integer((*http, "maxRequestsPerConnection")),
        max_retries=r.integer((*http, "maxRetries")),
        idle_timeout=r.duration((*http, "idleTimeout")),
        max_concurrent_streams=r.integer((*http, "maxConcurrentStreams")),
        h2_upgrade_policy=r.text((*http, "h2UpgradePolicy")),
        use_client_protocol=r.flag((*http, "useClientProtocol")),
    )


def _outlier(r: _Reader, path: FieldPath) -> m.OutlierDetection:
    consecutive = r.integer((*path, "consecutive5xxErrors"))
    if consecutive is None:
        consecutive = r.integer((*path, "consecutiveErrors"))
    gateway = r.integer((*path, "consecutiveGatewayErrors"))
    if consecutive is None:
        consecutive = 5  # Envoy's default, which Istio leaves in force unless consecutive5xxErrors is set
    percent = r.integer((*path, "maxEjectionPercent"))
    if percent is not None and not 0 <= percent <= 100:
        r.error((*path, "maxEjectionPercent"), f"maxEjectionPercent must be 0-100, got {percent}")
    return m.OutlierDetection(
        consecutive_5xx_errors=consecutive or None,
        consecutive_gateway_errors=gateway or None,
        interval=r.duration((*path, "interval")) or 10.0,
        base_ejection_time=r.duration((*path, "baseEjectionTime")) or 30.0,
        max_ejection_percent=10 if percent is None else percent,
        min_health_percent=r.integer((*path, "minHealthPercent")) or 0,
    )


def _client_tls(r: _Reader, path: FieldPath) -> m.ClientTLS:
    return m.ClientTLS(
        mode=r.text((*path, "mode"), "DISABLE") or "DISABLE",
        sni=r.text((*path, "sni")),
        subject_alt_names=r.strings((*path, "subjectAltNames")),
        credential_name=r.text((*path, "credentialName")),
        client_certificate=r.text((*path, "clientCertificate")),
        private_key=r.text((*path, "privateKey")),
        ca_certificates=r.text((*path, "caCertificates")),
        insecure_skip_verify=r.flag((*path, "insecureSkipVerify")),
    )


def _traffic_policy(r: _Reader, path: FieldPath, *, port_level_settings: bool = True) -> m.TrafficPolicy | None:
    if not r.has(path):
        return None
    lb, cp, od, tls = ((*path, key) for key in ("loadBalancer", "connectionPool", "outlierDetection", "tls"))
    port_level = []
    for item in r.items((*path, "portLevelSettings")) if port_level_settings else ():
        number = r.integer((*item, "port", "number"))
        policy = _traffic_policy(r, item, port_level_settings=False)
        if number is not None and policy is not None:
            port_level.append((number, policy))
    return m.TrafficPolicy(
        load_balancer=_load_balancer(r, lb) if r.has(lb) else None,
        connection_pool=_connection_pool(r, cp) if r.has(cp) else None,
        outlier_detection=_outlier(r, od) if r.has(od) else None,
        tls=_client_tls(r, tls) if r.has(tls) else None,
        port_level=tuple(port_level),
    )


def build_destination_rule(r: _Reader) -> m.DestinationRule:
    subsets: list[m.Subset] = []
    seen: set[str] = set()
    for item in r.items(("spec", "subsets")):
        name = r.text((*item, "name"), "") or ""
        if name in seen:
            r.error((*item, "name"), f"subset '{name}' is defined twice; give each subset its own name")
        seen.add(name)
        labels = r.labels((*item, "labels")) or ()
        subsets.append(m.Subset(name, labels, _traffic_policy(r, (*item, "trafficPolicy")), r.document.where(item)))
    selector = r.labels(("spec", "workloadSelector", "matchLabels"))
    return m.DestinationRule(
        meta=_meta(r),
        host=r.text(("spec", "host"), "") or "",
        traffic_policy=_traffic_policy(r, ("spec", "trafficPolicy")),
        subsets=tuple(subsets),
        export_to=r.strings(("spec", "exportTo")),
        workload_selector=selector,
    )


# ---------------------------------------------------------------- Gateway and registry kinds


def _port(r: _Reader, path: FieldPath) -> m.Port:
    return m.Port(
        number=r.integer((*path, "number")) or 0,
        protocol=(r.text((*path, "protocol"), "") or "").upper(),
        name=r.text((*path, "name"), "") or "",
        target_port=r.integer((*path, "targetPort")),
    )


def build_gateway(r: _Reader) -> m.Gateway:
    servers = []
    for item in r.items(("spec", "servers")):
        tls_path = (*item, "tls")
        tls = None
        if r.has(tls_path):
            tls = m.ServerTLS(
                mode=r.text((*tls_path, "mode"), "SIMPLE") or "SIMPLE",
                https_redirect=r.flag((*tls_path, "httpsRedirect")),
                credential_name=r.text((*tls_path, "credentialName")),
                server_certificate=r.text((*tls_path, "serverCertificate")),
                private_key=r.text((*tls_path, "privateKey")),
                ca_certificates=r.text((*tls_path, "caCertificates")),
            )
        servers.append(
            m.Server(_port(r, (*item, "port")), r.strings((*item, "hosts")), tls, r.text((*item, "name"), "") or "")
        )
    return m.Gateway(meta=_meta(r), selector=r.labels(("spec", "selector")) or (), servers=tuple(servers))


def _workload_entry(r: _Reader, path: FieldPath, meta: m.Meta) -> m.WorkloadEntry:
    ports = r.raw((*path, "ports"), whole=True)
    return m.WorkloadEntry(
        meta=meta,
        address=r.text((*path, "address"), "") or "",
        ports=tuple((str(k), int(v)) for k, v in ports.items()) if isinstance(ports, dict) else (),
        labels=r.labels((*path, "labels")) or (),
        service_account=r.text((*path, "serviceAccount"), "") or "",
        network=r.text((*path, "network"), "") or "",
        weight=r.integer((*path, "weight")) or 0,
    )


def build_workload_entry(r: _Reader) -> m.WorkloadEntry:
    return _workload_entry(r, SPEC, _meta(r))


def build_service_entry(r: _Reader) -> m.ServiceEntry:
    meta = _meta(r)
    endpoints = tuple(
        _workload_entry(r, item, m.Meta("WorkloadEntry", f"{meta.name}-{i}", meta.namespace, r.document.where(item)))
        for i, item in enumerate(r.items(("spec", "endpoints")))
    )
    return m.ServiceEntry(
        meta=meta,
        hosts=r.strings(("spec", "hosts")),
        ports=tuple(_port(r, item) for item in r.items(("spec", "ports"))),
        addresses=r.strings(("spec", "addresses")),
        location=r.text(("spec", "location"), "MESH_EXTERNAL") or "MESH_EXTERNAL",
        resolution=r.text(("spec", "resolution"), "NONE") or "NONE",
        endpoints=endpoints,
        workload_selector=r.labels(("spec", "workloadSelector", "labels")),
        export_to=r.strings(("spec", "exportTo")),
    )


def build_service(r: _Reader) -> m.Service:
    ports = []
    for item in r.items(("spec", "ports")):
        target = r.raw((*item, "targetPort"))
        ports.append(
            m.ServicePort(
                port=r.integer((*item, "port")) or 0,
                name=r.text((*item, "name"), "") or "",
                target_port=target if isinstance(target, int | str) else None,
                protocol=r.text((*item, "protocol"), "TCP") or "TCP",
                app_protocol=r.text((*item, "appProtocol")),
            )
        )
    return m.Service(meta=_meta(r), selector=r.labels(("spec", "selector")), ports=tuple(ports))


def build_sidecar(r: _Reader) -> m.Sidecar:
    egress = tuple(
        m.EgressListener(
            hosts=r.strings((*item, "hosts")),
            port=_port(r, (*item, "port")) if r.has((*item, "port")) else None,
        )
        for item in r.items(("spec", "egress"))
    )
    return m.Sidecar(
        meta=_meta(r),
        workload_selector=r.labels(("spec", "workloadSelector", "labels")),
        egress=egress,
        outbound_mode=r.text(("spec", "outboundTrafficPolicy", "mode")),
    )


def build_peer_authentication(r: _Reader) -> m.PeerAuthentication:
    port_level = r.raw(("spec", "portLevelMtls"))
    ports = tuple(
        (int(port), r.text(("spec", "portLevelMtls", port, "mode"), "UNSET") or "UNSET") for port in (port_level or {})
    )
    return m.PeerAuthentication(
        meta=_meta(r),
        selector=r.labels(("spec", "selector", "matchLabels")),
        mode=r.text(("spec", "mtls", "mode"), "UNSET") or "UNSET",
        port_level=ports,
    )


_SOURCE_FIELDS = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "requestPrincipals": "request_principals",
    "notRequestPrincipals": "not_request_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "serviceAccounts": "service_accounts",
    "notServiceAccounts": "not_service_accounts",
    "ipBlocks": "ip_blocks",
    "notIpBlocks": "not_ip_blocks",
    "remoteIpBlocks": "remote_ip_blocks",
    "notRemoteIpBlocks": "not_remote_ip_blocks",
}
_OPERATION_FIELDS = {
    "hosts": "hosts",
    "notHosts": "not_hosts",
    "ports": "ports",
    "notPorts": "not_ports",
    "methods": "methods",
    "notMethods": "not_methods",
    "paths": "paths",
    "notPaths": "not_paths",
}


def _fields(r: _Reader, path: FieldPath, names: dict[str, str]) -> dict[str, tuple[str, ...]]:
    return {attr: r.strings((*path, key)) for key, attr in names.items() if r.has((*path, key))}


def build_authorization_policy(r: _Reader) -> m.AuthorizationPolicy:
    rules = []
    for item in r.items(("spec", "rules")):
        sources = tuple(m.Source(**_fields(r, (*src, "source"), _SOURCE_FIELDS)) for src in r.items((*item, "from")))
        operations = tuple(
            m.Operation(**_fields(r, (*to, "operation"), _OPERATION_FIELDS)) for to in r.items((*item, "to"))
        )
        when = tuple(
            m.Condition(
                key=r.text((*cond, "key"), "") or "",
                values=r.strings((*cond, "values")),
                not_values=r.strings((*cond, "notValues")),
            )
            for cond in r.items((*item, "when"))
        )
        rules.append(m.Rule(sources, operations, when))
    return m.AuthorizationPolicy(
        meta=_meta(r),
        selector=r.labels(("spec", "selector", "matchLabels")),
        action=r.text(("spec", "action"), "ALLOW") or "ALLOW",
        rules=tuple(rules),
    )


def build_mesh_config(r: _Reader) -> m.MeshConfig:
    retry = m.DEFAULT_RETRY
    if r.has(("spec", "defaultRetry")):
        retry = _retry(r, ("spec", "defaultRetry"))
    return m.MeshConfig(
        meta=_meta(r),
        outbound_mode=r.text(("spec", "outboundTrafficPolicy", "mode"), "ALLOW_ANY") or "ALLOW_ANY",
        default_retry=retry,
        access_log_file=r.text(("spec", "accessLogFile"), "/dev/stdout") or "",
        access_log_encoding=r.text(("spec", "accessLogEncoding"), "TEXT") or "TEXT",
    )


def build_route_test(r: _Reader) -> m.RouteTest:
    req, exp = ("spec", "request"), ("spec", "expect")
    request = m.TestRequest(
        method=(r.text((*req, "method"), "GET") or "GET").upper(),
        url=r.text((*req, "url"), "") or "",
        headers=tuple((k.lower(), v) for k, v in r.pairs((*req, "headers"))),
        source_labels=r.labels((*req, "sourceLabels")) or (),
        gateway=r.text((*req, "gateway")),
    )
    expect = m.TestExpectation(
        host=r.text((*exp, "host")),
        subset=r.text((*exp, "subset")),
        status=r.integer((*exp, "status")),
        port=r.integer((*exp, "port")),
        route=r.text((*exp, "route")),
        fault=r.text((*exp, "fault")),
    )
    return m.RouteTest(meta=_meta(r), request=request, expect=expect)


Builder = Callable[[_Reader], Any]
BUILDERS: dict[str, Builder] = {
    "VirtualService": build_virtual_service,
    "DestinationRule": build_destination_rule,
    "Gateway": build_gateway,
    "ServiceEntry": build_service_entry,
    "WorkloadEntry": build_workload_entry,
    "Service": build_service,
    "Sidecar": build_sidecar,
    "PeerAuthentication": build_peer_authentication,
    "AuthorizationPolicy": build_authorization_policy,
    "MeshConfig": build_mesh_config,
    "RouteTest": build_route_test,
}
"""Each kind minimesh reads, and the builder that types it."""

_MESH_FIELDS = {
    "VirtualService": "virtual_services",
    "DestinationRule": "destination_rules",
    "Gateway": "gateways",
    "ServiceEntry": "service_entries",
    "WorkloadEntry": "workload_entries",
    "Service": "services",
    "Sidecar": "sidecars",
    "PeerAuthentication": "peer_authentications",
    "AuthorizationPolicy": "authorization_policies",
    "RouteTest": "route_tests",
}


# ---------------------------------------------------------------- whole configs


@dataclass(frozen=True, slots=True)
class Loaded:
    """The result of loading: the model (of the documents that were valid) and every problem."""

    mesh: m.Mesh
    problems: tuple[Problem, ...] = ()
    documents: tuple[Document, ...] = field(default=(), repr=False)

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    def raise_errors(self) -> m.Mesh:
        """The mesh, or ConfigError when any problem is an error."""
        if self.errors:
            raise ConfigError(list(self.errors))
        return self.mesh


def build_document(document: Document, problems: list[Problem]) -> Any:
    """The typed object for one document, or None when it is invalid or of a kind we ignore.
    Bad input is the schema check's and the reader's to report, located; an exception out of a
    builder is a bug in minimesh and propagates as one."""
    found = False
    for issue in check_document(document.body):
        severity: Severity = "warning" if issue.code is IssueCode.UNKNOWN_KIND else "error"
        message = issue.message
        if severity == "warning":
            message += "; minimesh ignores this document"
        found = found or severity == "error"
        where = document.where(issue.path, key=issue.at_key)
        problems.append(Problem(where, severity, message, document.ref, field_path(issue.path)))
        if severity == "warning":
            return None
    builder = BUILDERS.get(document.kind)
    if found or builder is None:
        return None
    reader = _Reader(document, problems)
    before = len(problems)
    built = builder(reader)
    for path in reader.unused():
        reader.warn(path, f"field '{path[-1]}' has no effect locally; minimesh accepts but ignores it", key=True)
    errors = [p for p in problems[before:] if p.severity == "error"]
    return None if errors else built


Layer = list[Document]
"""The documents of one `-f` argument (or one overlay): a later layer replaces a resource
of the same kind, namespace and name from an earlier one, as `kubectl apply` would."""


def fields_read(document: Document) -> frozenset[FieldPath]:
    """Every field path the builder of `document` looks at, present or not (for schema tests)."""
    reader = _Reader(document, [])
    BUILDERS[document.kind](reader)
    return frozenset(reader.asked)


def build_mesh(layers: Iterable[Layer], problems: list[Problem]) -> m.Mesh:
    """The typed model of `layers`; a duplicate inside one layer is an error."""
    chosen: dict[tuple[str, str, str], tuple[int, Document, Any]] = {}
    for number, layer in enumerate(layers):
        for document in layer:
            built = build_document(document, problems)
            if built is None:
                continue
            meta: m.Meta = built.meta
            key = ("MeshConfig", "", "") if isinstance(built, m.MeshConfig) else meta.key
            earlier = chosen.get(key)
            if earlier is not None and earlier[0] == number:
                what = "a second MeshConfig" if key[0] == "MeshConfig" else f"{meta.ref} is defined twice"
                message = f"{what} (first at {earlier[1].where(())}); rename one or remove the duplicate"
                problems.append(Problem(document.where(("metadata", "name")), "error", message, meta.ref))
                continue
            if earlier is not None:
                message = f"replaces {meta.ref} from {earlier[1].where(())}"
                problems.append(Problem(document.where(()), "note", message, meta.ref))
            chosen[key] = (number, document, built)
    lists: dict[str, list[Any]] = {name: [] for name in _MESH_FIELDS.values()}
    mesh_config = m.MeshConfig()
    for _, _, built in chosen.values():
        if isinstance(built, m.MeshConfig):
            mesh_config = built
        else:
            lists[_MESH_FIELDS[built.meta.kind]].append(built)
    fields: dict[str, Any] = {name: tuple(items) for name, items in lists.items()}
    return m.Mesh(**fields, mesh_config=mesh_config)


def load_layers(layers: list[Layer], problems: list[Problem] | None = None) -> Loaded:
    found = list(problems or [])
    mesh = build_mesh(layers, found)
    return Loaded(mesh, tuple(found), tuple(d for layer in layers for d in layer))


def load_paths(paths: Iterable[str], extra: Iterable[Layer] = ()) -> Loaded:
    """Read, check and type every document under `paths`: each path (file or folder) is a layer;
    `extra` layers (applied documents, overlays) go on top."""
    layers: list[Layer] = []
    problems: list[Problem] = []
    for path in paths:
        documents, found = read_paths([path])
        layers.append(documents)
        problems.extend(found)
    return load_layers([*layers, *extra], problems)
