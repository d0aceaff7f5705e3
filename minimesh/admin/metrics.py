"""Istio's standard metrics: an `Exchange` observer that aggregates per label set (one dict
lookup and a few adds per request, one series per TCP connection's labels) and renders
Prometheus text and Envoy-style counters on scrape.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from minimesh.dataplane.exchange import Exchange, Listener, ListenerKind
from minimesh.dataplane.grpc import response_grpc_status
from minimesh.registry.model import Workload
from minimesh.routing.request import split_authority

BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000,
           3600000)  # fmt: skip
"""Envoy's default histogram buckets, which Istio's telemetry uses for durations (ms) and sizes (bytes)."""
LE = (*[str(bound) for bound in BUCKETS], "+Inf")

UNKNOWN = "unknown"
CLUSTER_ID = "Kubernetes"
"""Istio's default cluster id, what `source_cluster`/`destination_cluster` say in one cluster."""
NO_PEER = dict.fromkeys(
    ("workload", "workload_namespace", "principal", "app", "version", "canonical_service", "canonical_revision",
     "cluster"),
    UNKNOWN,
)  # fmt: skip
MESH_SUFFIX = ".svc.cluster.local"

STATUS_CLASSES = tuple(f"upstream_rq_{n}xx" for n in range(6))
"""Envoy's counters of upstream responses by status class, indexed by `status // 100`."""

Labels = tuple[tuple[str, str], ...]


def peer(workload: Workload | None) -> dict[str, str]:
    """A side of a request as Istio's peer metadata describes it (without mTLS: no principal)."""
    if workload is None:
        return NO_PEER
    labels = workload.label_map
    app = labels.get("app", UNKNOWN)
    version = labels.get("version", UNKNOWN)
    return {
        "workload": workload.name,
        "workload_namespace": workload.namespace,
        "principal": UNKNOWN,
        "app": app,
        "version": version,
        "canonical_service": labels.get("service.istio.io/canonical-name", labels.get("app", workload.name)),
        "canonical_revision": labels.get("service.istio.io/canonical-revision", labels.get("version", "latest")),
        "cluster": CLUSTER_ID,
    }


def service_parts(host: str) -> tuple[str, str]:
    """`reviews.default.svc.cluster.local` → (`reviews`, `default`); another host is its own name."""
    if host.endswith(MESH_SUFFIX):
        name, _, namespace = host[: -len(MESH_SUFFIX)].partition(".")
        return name, namespace or UNKNOWN
    return host, UNKNOWN


def labels_of(
    listener: Listener,
    source: Workload | None,
    destination: Workload | None,
    service: str,
    status: int,
    flags: str,
    *,
    tcp: bool = False,
    grpc: bool = False,
    grpc_status: int | None = None,
) -> Labels:
    """The labels of `istio_requests_total` and friends for one kind of request, or of the
    `istio_tcp_*` families for a TCP connection (`tcp`: no response code). A gRPC request
    (`grpc`) reports its protocol as `grpc` and `grpc_status` as `grpc_response_status`. A server
    sidecar (inbound) reports as `destination`, and the calling proxy as `source`; `source` is
    None for a caller not known (outside the mesh)."""
    inbound = listener.kind is ListenerKind.INBOUND
    caller = peer(source)
    target = peer(destination)
    name, namespace = service_parts(service) if service else (UNKNOWN, UNKNOWN)
    labels = (
        ("reporter", "destination" if inbound else "source"),
        ("source_workload", caller["workload"]),
        ("source_canonical_service", caller["canonical_service"]),
        ("source_canonical_revision", caller["canonical_revision"]),
        ("source_workload_namespace", caller["workload_namespace"]),
        ("source_principal", caller["principal"]),
        ("source_app", caller["app"]),
        ("source_version", caller["version"]),
        ("source_cluster", caller["cluster"]),
        ("destination_workload", target["workload"]),
        ("destination_workload_namespace", target["workload_namespace"]),
        ("destination_principal", target["principal"]),
        ("destination_app", target["app"]),
        ("destination_version", target["version"]),
        ("destination_service", service or UNKNOWN),
        ("destination_canonical_service", target["canonical_service"]),
        ("destination_canonical_revision", target["canonical_revision"]),
        ("destination_service_name", name),
        ("destination_service_namespace", namespace),
        ("destination_cluster", target["cluster"]),
        ("request_protocol", "tcp" if tcp else "grpc" if grpc else "http"),
        ("response_code", str(status)),
        ("grpc_response_status", "" if grpc_status is None else str(grpc_status)),
        ("response_flags", flags),
        ("connection_security_policy", UNKNOWN),
    )
    if tcp:
        return tuple(label for label in labels if label[0] not in HTTP_ONLY_LABELS)
    return labels


HTTP_ONLY_LABELS = frozenset({"response_code", "grpc_response_status"})
PEER_LABELS = 20
"""How many of the labels, from the first, say who called whom (`reporter` to
`destination_cluster`): all that Istio's gRPC message counters carry, as their counts are
reported while a stream is still open."""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_labels(labels: Labels) -> str:
    return ",".join(f'{name}="{_escape(value)}"' for name, value in labels)


class Histogram:
    """Counts per bucket (not cumulative until rendered), their sum and count."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> Iterator[str]:
        total = 0
        for le, count in zip(LE, self.counts, strict=True):
            total += count
            yield f'{name}_bucket{{{labels},le="{le}"}} {total}'
        yield f"{name}_sum{{{labels}}} {self.sum}"
        yield f"{name}_count{{{labels}}} {self.count}"


class Series:
    """Everything measured for one label set; `peer` is its labels up to `PEER_LABELS`, set
    once a gRPC request counts in it."""

    __slots__ = ("duration", "labels", "peer", "request_bytes", "requests", "response_bytes")

    def __init__(self, labels: str) -> None:
        self.labels = labels
        self.peer = ""
        self.requests = 0
        self.duration = Histogram()
        self.request_bytes = Histogram()
        self.response_bytes = Histogram()


class TcpSeries:
    """The `istio_tcp_*` counters of one label set."""

    __slots__ = ("closed", "labels", "opened", "received", "sent")

    def __init__(self, labels: str) -> None:
        self.labels = labels
        self.opened = 0
        self.closed = 0
        self.sent = 0
        self.received = 0


TCP_COUNTERS = (
    ("istio_tcp_connections_opened_total", "opened", "Count of TCP connections opened."),
    ("istio_tcp_connections_closed_total", "closed", "Count of TCP connections closed."),
    ("istio_tcp_sent_bytes_total", "sent", "Bytes sent back to the client over TCP connections."),
    ("istio_tcp_received_bytes_total", "received", "Bytes received from the client over TCP connections."),
)


MESSAGE_COUNTERS = (
    ("istio_request_messages_total", 0, "Count of gRPC messages received from clients."),
    ("istio_response_messages_total", 1, "Count of gRPC messages sent to clients."),
)


HISTOGRAMS = (
    ("istio_request_duration_milliseconds", "duration", "Duration of requests, in milliseconds."),
    ("istio_request_bytes", "request_bytes", "Sizes of request bodies, in bytes."),
    ("istio_response_bytes", "response_bytes", "Sizes of response bodies, in bytes."),
)

Key = tuple[int, int, int, str, int, str, bool, int | None]
"""A label set's lookup key: the listener, source and destination workloads by identity (hashing
them by value costs more than the rest of the bookkeeping), service, status, flags, and whether
the request is gRPC with the gRPC status it got."""
KEYS_KEPT = 4096
"""Keys remembered before the lookup table starts over (reloads make new listeners and workloads)."""


class Metrics:
    """Istio's request metrics and per-cluster upstream counters, aggregated as requests end."""

    def __init__(self) -> None:
        self._by_key: dict[Key, tuple[Listener, Workload | None, Workload | None, Series]] = {}
        """Each entry keeps its listener and workloads alive, so their ids are not reused meanwhile."""
        self._by_labels: dict[str, Series] = {}
        self._tcp: dict[str, TcpSeries] = {}
        self._messages: dict[str, list[int]] = {}
        """Per peer label set: the gRPC messages received from clients and sent to them."""
        self.upstream: dict[str, dict[str, int]] = {}
        """Per cluster: `upstream_rq_total` and `upstream_rq_2xx`... of the responses upstreams gave."""

    def __call__(self, exchange: Exchange) -> None:
        if exchange.tcp:
            connection = self._tcp_series(exchange)
            connection.closed += 1
            connection.sent += exchange.bytes_sent
            connection.received += exchange.bytes_received
            return
        destination = exchange.destination
        workload = destination.workload if destination is not None else None
        listener = exchange.listener
        source = exchange.source
        service = exchange.destination_service or exchange.authority
        flags = exchange.flag_text
        grpc = exchange.grpc
        grpc_status = response_grpc_status(exchange.grpc_status, exchange.status) if grpc else None
        key = (id(listener), id(source), id(workload), service, exchange.status, flags, grpc, grpc_status)
        entry = self._by_key.get(key)
        if entry is None:
            if len(self._by_key) >= KEYS_KEPT:
                self._by_key.clear()
            labels = labels_of(
                listener,
                source,
                workload,
                split_authority(service)[0],
                exchange.status,
                flags,
                grpc=grpc,
                grpc_status=grpc_status,
            )
            series = self._series(render_labels(labels))
            if grpc:
                series.peer = render_labels(labels[:PEER_LABELS])
            self._by_key[key] = (listener, source, workload, series)
        else:
            series = entry[3]
        series.requests += 1
        if grpc:
            self._count_messages(series.peer, exchange)
        series.duration.observe(exchange.duration * 1000.0)
        series.request_bytes.observe(exchange.bytes_received)
        series.response_bytes.observe(exchange.bytes_sent)
        if exchange.upstream_time is not None and exchange.cluster:
            counts = self.upstream.get(exchange.cluster)
            if counts is None:
                counts = self.upstream[exchange.cluster] = {"upstream_rq_total": 0}
            counts["upstream_rq_total"] += 1
            group = STATUS_CLASSES[min(exchange.status // 100, 5)]
            counts[group] = counts.get(group, 0) + 1

    def _count_messages(self, peer: str, exchange: Exchange) -> None:
        """Add a gRPC request's messages to its peers' counts, as Istio's stats filter does once
        Envoy's `grpc_stats` filter has seen a message either way (both counters then)."""
        received = exchange.request_messages.count if exchange.request_messages is not None else 0
        sent = exchange.response_messages.count if exchange.response_messages is not None else 0
        if received or sent:
            counts = self._messages.get(peer)
            if counts is None:
                counts = self._messages[peer] = [0, 0]
            counts[0] += received
            counts[1] += sent

    def opened(self, exchange: Exchange) -> None:
        """A TCP connection was routed: `istio_tcp_connections_opened_total` counts it."""
        self._tcp_series(exchange).opened += 1

    def _tcp_series(self, exchange: Exchange) -> TcpSeries:
        destination = exchange.destination
        workload = destination.workload if destination is not None else None
        service = exchange.destination_service or (exchange.sni or exchange.upstream_host.rpartition(":")[0])
        labels = labels_of(exchange.listener, exchange.source, workload, service, 0, exchange.flag_text, tcp=True)
        text = render_labels(labels)
        series = self._tcp.get(text)
        if series is None:
            series = self._tcp[text] = TcpSeries(text)
        return series

    def _series(self, text: str) -> Series:
        """The series of a label set (rendered) seen first under a new key."""
        series = self._by_labels.get(text)
        if series is None:
            series = self._by_labels[text] = Series(text)
        return series

    def prometheus(self) -> str:
        """The Prometheus text exposition of every metric family."""
        series = list(self._by_labels.values())
        lines = [
            "# HELP istio_requests_total Count of requests, by source, destination and response.",
            "# TYPE istio_requests_total counter",
        ]
        lines += [f"istio_requests_total{{{s.labels}}} {s.requests}" for s in series]
        for name, attribute, text in HISTOGRAMS:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
            for s in series:
                histogram: Histogram = getattr(s, attribute)
                lines.extend(histogram.lines(name, s.labels))
        for name, index, text in MESSAGE_COUNTERS:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
            lines += [f"{name}{{{peer}}} {counts[index]}" for peer, counts in self._messages.items()]
        for name, attribute, text in TCP_COUNTERS:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
            lines += [f"{name}{{{c.labels}}} {getattr(c, attribute)}" for c in self._tcp.values()]
        return "\n".join(lines) + "\n"

    def cluster_stats(self, names: Iterable[str]) -> Iterator[tuple[str, int]]:
        """Envoy-style `(stat, value)` pairs of the upstream responses of each named cluster."""
        for name in names:
            counts = self.upstream.get(name, {"upstream_rq_total": 0})
            for stat, value in sorted(counts.items()):
                yield f"cluster.{name}.{stat}", value

    def __repr__(self) -> str:
        total = sum(s.requests for s in self._by_labels.values())
        return f"<Metrics series={len(self._by_labels)} requests={total}>"
