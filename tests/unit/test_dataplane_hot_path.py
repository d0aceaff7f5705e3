"""What the request path precomputes or shortcuts gives exactly what the plain way gives:
request ids, lazily decoded headers, the access log's time and line, metrics keys, and the
gateway's virtual hosts for a request with no source workload; deadlines that behave as
`asyncio.timeout`; and when the outbox holds a write back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minimesh.admin.metrics import KEYS_KEPT, Metrics
from minimesh.config.names import host_covers
from minimesh.dataplane.accesslog import _StartTimes, fields, text_line
from minimesh.dataplane.deadline import Deadline
from minimesh.dataplane.exchange import Exchange, LazyHeaders, Listener, ListenerKind, request_id
from minimesh.dataplane.http1 import Outbox
from minimesh.registry.model import Workload
from minimesh.routing.compile import compile_snapshot
from minimesh.routing.request import RequestView
from minimesh.routing.snapshot import Binding, Endpoint, Facts, GatewayTable
from tests.clocks import on_virtual_time
from tests.unit.test_routing_compile import load_mesh

# ---------------------------------------------------------------- request ids


@given(st.integers(min_value=0, max_value=(1 << 128) - 1))
def test_a_request_id_is_the_uuid4_of_its_random_bits(bits: int) -> None:
    text = request_id(lambda k: bits)
    assert text == str(uuid.UUID(int=bits, version=4))
    parsed = uuid.UUID(text)
    assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)


def test_request_ids_differ() -> None:
    assert len({request_id() for _ in range(1000)}) == 1000


# ---------------------------------------------------------------- headers

HEADER_NAMES = st.sampled_from([b"host", b"x-user", b"cookie", b"x-caf\xe9", b"accept"])


@given(st.lists(st.tuples(HEADER_NAMES, st.binary(max_size=8))))
def test_lazy_headers_read_as_the_decoded_dict_with_the_last_value_of_a_name(pairs: list[tuple[bytes, bytes]]) -> None:
    expected = {name.decode("latin-1"): value.decode("latin-1") for name, value in pairs}
    headers = LazyHeaders(dict(pairs))
    assert len(headers) == len(expected)
    assert list(headers) == list(expected)
    assert headers == expected
    for name in ("host", "x-user", "x-café", "absent"):
        assert (name in headers) == (name in expected)
        assert headers.get(name) == expected.get(name)
        assert headers.get(name, "-") == expected.get(name, "-")


def test_lazy_headers_raise_key_error_for_a_missing_name() -> None:
    with pytest.raises(KeyError):
        LazyHeaders({b"host": b"a"})["cookie"]


# ---------------------------------------------------------------- the access log


def reference_start_time(started: float) -> str:
    moment = datetime.fromtimestamp(started, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


@given(st.lists(st.floats(min_value=0, max_value=4e9, allow_nan=False), min_size=1, max_size=5))
def test_start_time_is_datetimes_to_the_millisecond(moments: list[float]) -> None:
    start_time = _StartTimes()
    for started in moments:
        assert start_time(started) == reference_start_time(started)


@pytest.mark.parametrize("started", [0.0, 1.0, 1.9999994, 1.9999995, 1.9999996, 1795046399.9996, 1795046400.0004])
def test_start_time_carries_a_rounded_up_second(started: float) -> None:
    start_time = _StartTimes()
    assert start_time(started - 1.0 if started >= 1.0 else started) == reference_start_time(
        started - 1.0 if started >= 1.0 else started
    )
    assert start_time(started) == reference_start_time(started)


QUOTED = {
    "upstream_transport_failure_reason",
    "x_forwarded_for",
    "user_agent",
    "request_id",
    "authority",
    "upstream_host",
}


def reference_text_line(exchange: Exchange) -> str:
    """The TEXT format as Istio writes it from the JSON fields: `-` for none, some quoted."""
    out = []
    for name, value in fields(exchange).items():
        shown = "-" if value is None else str(value)
        out.append(f'"{shown}"' if name in QUOTED else shown)
    start, method, path, protocol, *rest = out
    return f'[{start}] "{method} {path} {protocol}" ' + " ".join(rest)


REVIEWS = Workload(name="reviews-v1", namespace="default", address="10.0.0.5", labels=(("app", "reviews"),))
GATEWAY = Listener(ListenerKind.GATEWAY, 8080, ("default/bookinfo-gateway",), address="127.0.0.1")
SIDECAR = Listener(ListenerKind.SIDECAR, 15001, workload=REVIEWS)


def exchange(listener: Listener = GATEWAY, **changes: object) -> Exchange:
    base = Exchange(
        listener=listener, method="GET", path="/reviews/1?x=1", authority="bookinfo.local", protocol="HTTP/1.1",
        request_id="r-1", started=1795046400.1234, began=0.0, downstream="127.0.0.1:50000",
    )  # fmt: skip
    for name, value in changes.items():
        setattr(base, name, value)
    return base


@pytest.mark.parametrize(
    "made",
    [
        exchange(),
        exchange(
            status=200,
            route="VirtualService/default/reviews#http[0]",
            cluster="outbound|9080||reviews",
            upstream_host="10.0.0.5:9080",
            destination=Endpoint(REVIEWS, "10.0.0.5", 9080),
            destination_service="reviews.default.svc.cluster.local",
            bytes_received=12,
            bytes_sent=345,
            upstream_time=0.0123,
            duration=0.0189,
            user_agent="curl/8",
            forwarded_for="1.2.3.4",
        ),
        exchange(SIDECAR, status=503, flags=["URX", "UF"], duration=2.5, authority="", downstream=""),
        exchange(status=404, flags=["NR"], route="r", destination=Endpoint(None, "example.com", 80)),
        exchange(Listener(ListenerKind.GATEWAY, 80), status=0, flags=["DC"], request_id=""),
    ],
)
def test_the_text_line_is_the_json_fields_in_istio_order(made: Exchange) -> None:
    assert text_line(made) == reference_text_line(made)


# ---------------------------------------------------------------- metrics


def test_metrics_count_equal_listeners_and_workloads_as_one_label_set() -> None:
    metrics = Metrics()
    for listener in (GATEWAY, Listener(ListenerKind.GATEWAY, 8080, ("default/bookinfo-gateway",), address="127.0.0.1")):
        metrics(exchange(listener, status=200, destination=Endpoint(REVIEWS, "10.0.0.5", 9080)))
    assert repr(metrics) == "<Metrics series=1 requests=2>"


def test_metrics_keep_counting_past_the_keys_they_remember() -> None:
    metrics = Metrics()
    for index in range(KEYS_KEPT + 10):
        metrics(exchange(Listener(ListenerKind.GATEWAY, 8080 + index % 3), status=200))
    assert repr(metrics) == f"<Metrics series=1 requests={KEYS_KEPT + 10}>"


# ---------------------------------------------------------------- gateway virtual hosts

GATEWAYS = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: front}
spec:
  selector: {istio: ingressgateway}
  servers:
  - {port: {number: 80, name: http, protocol: HTTP}, hosts: ["*.example.com", "shop.example.com"]}
  - {port: {number: 8080, name: http-alt, protocol: HTTP}, hosts: ["*"]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: back}
spec:
  selector: {istio: ingressgateway}
  servers:
  - {port: {number: 80, name: http, protocol: HTTP}, hosts: ["admin.example.com"], tls: {httpsRedirect: true}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop-alt-port-only}
spec:
  hosts: [shop.example.com]
  gateways: [front]
  http:
  - match: [{port: 8080}]
    route: [{destination: {host: shop}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: any-example}
spec:
  hosts: ["*.example.com"]
  gateways: [front, back]
  http:
  - match: [{gateways: [back]}]
    route: [{destination: {host: admin}}]
  - match: [{uri: {prefix: /api}, port: 80}]
    route: [{destination: {host: api}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mesh-sources-only}
spec:
  hosts: ["*"]
  gateways: [front]
  http:
  - match: [{sourceLabels: {app: web}}]
    route: [{destination: {host: web}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catch-all}
spec:
  hosts: ["*"]
  gateways: [front]
  http:
  - route: [{destination: {host: web}}]
"""

NOBODY = RequestView("GET", "/", "", {})


def reference_anonymous(table: GatewayTable, host: str) -> tuple[Binding, ...]:
    """The first virtual host (exact, then wildcards by specificity) with a binding whose
    VirtualService has a rule for a sourceless request at the binding's gateway and port."""
    exact = table.exact.get(host, ())
    candidates = ((exact,) if exact else ()) + tuple(b for d, b in table.wildcards if host_covers(d, host))
    for bindings in candidates:
        live = tuple(
            b
            for b in bindings
            if b.virtual_service.exists_for(Facts(NOBODY, "/", b.server.port.number, b.gateway, None, None))
        )
        if live:
            return live
    return ()


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("shop.example.com", ["any-example@80", "catch-all@80"]),
        ("admin.example.com", ["any-example@80"]),
        ("a.example.com", ["any-example@80", "catch-all@80"]),
        ("example.com", ["catch-all@8080"]),
        ("x.org", ["catch-all@8080"]),
        ("", ["catch-all@8080"]),
    ],
)
def test_the_precomputed_virtual_hosts_are_those_a_sourceless_request_finds(host: str, expected: list[str]) -> None:
    snap = compile_snapshot(load_mesh(GATEWAYS), ())
    for table in snap.gateway_tables.values():
        assert table.anonymous(host) == reference_anonymous(table, host)
    found = snap.gateway_tables[("default/front", False)].anonymous(host)
    assert [f"{b.virtual_service.meta.name}@{b.server.port.number}" for b in found] == expected
    assert snap.gateway_tables[("default/front", False)].https_redirects == ("admin.example.com",)


# ---------------------------------------------------------------- the outbox


class Passes:
    """A stand-in loop: `call_soon` callbacks run when the test ends a pass."""

    def __init__(self) -> None:
        self.soon: list[Callable[[], None]] = []

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def end_pass(self) -> None:
        ready, self.soon = self.soon, []
        for callback in ready:
            callback()


class Conn:
    def __init__(self, name: str, sent: list[str]) -> None:
        self.name = name
        self.sent = sent

    def send_held(self) -> None:
        self.sent.append(self.name)


def outbox_and_conns(count: int) -> tuple[Passes, Outbox, list[Conn], list[str]]:
    loop = Passes()
    sent: list[str] = []
    return (
        loop,
        Outbox(cast(asyncio.AbstractEventLoop, cast(Any, loop))),
        [Conn(str(i), sent) for i in range(count)],
        sent,
    )


def test_a_lone_write_goes_at_once_and_later_ones_of_its_pass_wait_for_its_end() -> None:
    loop, box, conns, sent = outbox_and_conns(3)
    assert [box.defer(conn) for conn in conns] == [False, True, True]
    assert sent == []
    loop.end_pass()
    assert sent == ["1", "2"]


def test_after_a_busy_pass_every_write_waits_and_after_a_quiet_one_none() -> None:
    loop, box, conns, sent = outbox_and_conns(3)
    box.defer(conns[0])
    box.defer(conns[1])
    loop.end_pass()
    assert [box.defer(conns[2]), box.defer(conns[0])] == [True, True]
    loop.end_pass()
    assert sent == ["1", "2", "0"]
    assert box.defer(conns[1]) is True
    loop.end_pass()
    assert box.defer(conns[2]) is False
    loop.end_pass()
    assert sent == ["1", "2", "0", "1"]


# ---------------------------------------------------------------- deadlines


@on_virtual_time
async def test_a_deadline_that_passes_cancels_the_block_with_timeout_error() -> None:
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop, 0.01)
    with pytest.raises(TimeoutError):
        async with deadline:
            await asyncio.sleep(1)
    assert loop.time() == pytest.approx(0.01)
    assert deadline.expired()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


@on_virtual_time
async def test_a_block_done_in_time_is_left_alone() -> None:
    deadline = Deadline(asyncio.get_running_loop(), 0.05)
    async with deadline:
        await asyncio.sleep(0.04)
    assert not deadline.expired()
    await asyncio.sleep(0.08)
    assert repr(deadline).endswith("exited>")


@on_virtual_time
async def test_a_deadline_already_past_still_fires() -> None:
    with pytest.raises(TimeoutError):
        async with Deadline(asyncio.get_running_loop(), -1.0):
            await asyncio.sleep(1)


@on_virtual_time
async def test_an_inner_deadline_expires_inside_an_outer_one() -> None:
    loop = asyncio.get_running_loop()
    outer = Deadline(loop, 1.0)
    async with outer:
        with pytest.raises(TimeoutError):
            async with Deadline(loop, 0.01):
                await asyncio.sleep(1)
        await asyncio.sleep(0.9)
    assert not outer.expired()


@on_virtual_time
async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async def held() -> None:
        async with Deadline(asyncio.get_running_loop(), 1.0):
            await asyncio.sleep(1)

    task = asyncio.get_running_loop().create_task(held())
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_pass_that_writes_nothing_ends_the_burst() -> None:
    loop, box, conns, sent = outbox_and_conns(3)
    box.defer(conns[0])
    box.defer(conns[1])
    loop.end_pass()
    loop.end_pass()
    assert box.defer(conns[2]) is False
    loop.end_pass()
    assert sent == ["1"]
