"""What the proxy tests stand on: small real upstreams on 127.0.0.1, a mesh built from YAML
text, a real gateway and sidecar listener, and clients (aiohttp, raw sockets for the wire, or
`H2Client`: HTTP/2 with prior knowledge, driven by the h2 library).

`Backend` answers as its `replies` script says, then as `reply`, recording every request with
the connection it came on and how many were in flight at once; a reply that `hold`s waits
until the test releases the backend, so tests order events instead of timing them (`until`
waits for a condition). `running_mesh(yaml, backends)` substitutes each backend's port for
`$NAME` in the YAML, compiles the snapshot and serves it; `Mesh.exchanges` holds what the
proxy observed of each request (the access log's view).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import random
import socket
import string
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httptools
import pytest
from aiohttp import web
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes, Settings

from minimesh.config.load import load_layers
from minimesh.config.source import parse_text
from minimesh.dataplane.current import Current
from minimesh.dataplane.exchange import Exchange, Listener, ListenerKind
from minimesh.dataplane.http1 import DEFAULT_LIMITS, ConnectionLimits
from minimesh.dataplane.listeners import Serving
from minimesh.dataplane.proxy import Proxy
from minimesh.dataplane.upstream import Upstreams
from minimesh.registry.model import Workload
from minimesh.registry.static import workloads_of
from minimesh.routing.compile import compile_snapshot
from minimesh.routing.snapshot import Snapshot

RESET = b"upstream connect error or disconnect/reset before headers. reset reason: "
PATIENCE = 30.0
"""How long a test waits for what should happen at once: only a broken proxy runs out of it,
so it fails the test and never measures speed."""


async def until(condition: Callable[[], object], what: str, timeout: float = PATIENCE) -> None:
    """Wait until `condition` (a predicate, plain or async) is true; fail naming `what` if it never is."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if loop.time() > deadline:
            pytest.fail(f"waited {timeout:g} s in vain for {what}")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------- upstreams


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer of a backend: `body` None means the backend's name."""

    status: int = 200
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    hold: bool = False
    """Answer only once the backend is released (`Backend.release`, or its close)."""


@dataclass(frozen=True, slots=True)
class Seen:
    """One request a backend received; `connection` is the client port it came from."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    connection: int
    pairs: tuple[tuple[str, str], ...] = ()
    """Every header line, in order (repeated names included)."""

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.pairs if key == name]

    @property
    def attempt(self) -> int:
        return int(self.headers.get("x-envoy-attempt-count", "0"))


Handler = Callable[[web.BaseRequest, Seen], Awaitable[web.StreamResponse]]
"""Answers in place of the replies; it gets the request before its body is read (`Seen.body` is empty)."""


class Backend:
    """An HTTP/1.1 upstream on an ephemeral 127.0.0.1 port."""

    def __init__(self, name: str, reply: Reply | None = None, *, labels: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.reply = reply or Reply()
        self.replies: collections.deque[Reply] = collections.deque()
        self.handler: Handler | None = None
        self.labels = dict(labels or {"version": name})
        self.seen: list[Seen] = []
        self.active = 0
        self.max_active = 0
        self.port = 0
        self.released = asyncio.Event()
        self._runner: web.ServerRunner | None = None

    def release(self) -> None:
        """Let every held reply go, now and from now on."""
        self.released.set()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            body = b"" if self.handler is not None else await request.content.read()
            headers = {k.lower(): v for k, v in request.headers.items()}
            pairs = tuple((k.lower(), v) for k, v in request.headers.items())
            seen = Seen(request.method, request.raw_path, headers, body, int(peer[1]) if peer else 0, pairs)
            self.seen.append(seen)
            if self.handler is not None:
                return await self.handler(request, seen)
            reply = self.replies.popleft() if self.replies else self.reply
            if reply.hold:
                await self.released.wait()
            if reply.delay:
                await asyncio.sleep(reply.delay)
            text = self.name.encode() if reply.body is None else reply.body
            return web.Response(status=reply.status, body=text, headers=dict(reply.headers))
        finally:
            self.active -= 1

    async def start(self) -> Backend:
        self._runner = web.ServerRunner(web.Server(self._handle), access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def connections(self) -> set[int]:
        return {s.connection for s in self.seen}

    def __repr__(self) -> str:
        return f"<Backend {self.name} :{self.port} seen={len(self.seen)} max_active={self.max_active}>"


LISTEN_PORTS = range(20000, 32000)
"""Where the daemon's ports are picked: below Linux's ephemeral range (32768-60999), so no
outgoing connection takes one between the pick and the daemon's bind."""


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now."""
    found: list[int] = []
    for port in random.sample(LISTEN_PORTS, 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError(f"no {count} free ports in {LISTEN_PORTS}")


def refused_port() -> int:
    """A 127.0.0.1 port nothing listens on (connecting to it is refused). Below the ephemeral
    range, so no listener the test starts on port 0 (a gateway, a backend) can get it: one
    that did would answer, and the proxy would be talking to itself."""
    return free_ports(1)[0]


class Hangup:
    """An upstream that reads a request head and closes without answering (reset before headers)."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async def start(self) -> Hangup:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# ---------------------------------------------------------------- config


GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
"""


def service(name: str, *members: str, port: int = 9080, protocol: str = "http") -> str:
    """A Service `name` on `port` (named `protocol`) selecting `app: name`, and one
    WorkloadEntry per member (its port `$MEMBER`, its labels `app: name` plus the backend's
    labels `$MEMBER_LABELS`)."""
    docs = [
        f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec: {{selector: {{app: {name}}}, ports: [{{name: {protocol}, port: {port}}}]}}
"""
    ]
    docs += [
        f"""
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}-{member}}}
spec: {{address: 127.0.0.1, ports: {{{protocol}: ${member}}}, labels: {{app: {name}, ${member}_LABELS}}}}
"""
        for member in members
    ]
    return "---".join(docs)


REVIEWS = (
    service("reviews", "v1", "v2", "v3")
    + """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"""
)
"""Service `reviews` with members v1, v2 and v3, and a DestinationRule with a subset for each."""


def traffic_policy(host: str, policy: str) -> str:
    """A DestinationRule for `host` with this `trafficPolicy` (a flow mapping)."""
    return f"""
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}}}
spec: {{host: {host}, trafficPolicy: {policy}}}
"""


def gateway_http(rules: str) -> str:
    """A VirtualService `web` bound to the gateway for every host, with these `http:` rules
    (indented two spaces, as under `http:`)."""
    return (
        """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
"""
        + textwrap.indent(textwrap.dedent(rules).strip("\n"), "  ")
        + "\n"
    )


def web_route(*policy: str) -> str:
    """The VirtualService most proxy tests use: everything through the gateway to Service
    `web`, with `policy` lines (`timeout: 1s`, `retries: {attempts: 0}`) on its one rule."""
    return gateway_http("- route: [{destination: {host: web}}]" + "".join(f"\n  {line}" for line in policy))


def compile_yaml(text: str, ports: Mapping[str, int | str]) -> Snapshot:
    """The snapshot of YAML `text` with `$NAME` placeholders filled from `ports`."""
    filled = string.Template(textwrap.dedent(text)).substitute(ports)
    documents, problems = parse_text(filled, "mesh.yaml")
    assert problems == [], problems
    loaded = load_layers([documents])
    assert [str(p) for p in loaded.errors] == [], filled
    return compile_snapshot(loaded.mesh, workloads_of(loaded.mesh), generation=1)


def placeholders(backends: Mapping[str, Backend], ports: Mapping[str, int] | None = None) -> dict[str, str]:
    values = {name: str(b.port) for name, b in backends.items()}
    values |= {f"{name}_LABELS": ", ".join(f"{k}: {v}" for k, v in b.labels.items()) for name, b in backends.items()}
    values |= {name: str(port) for name, port in (ports or {}).items()}
    return values


# ---------------------------------------------------------------- the mesh under test


@dataclass(frozen=True, slots=True)
class Answer:
    """A response as a client saw it; header names lower-case (`names`: each as often as sent)."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    names: tuple[str, ...] = ()

    @classmethod
    async def of(cls, response: aiohttp.ClientResponse) -> Answer:
        body = await response.read()
        names = tuple(k.lower() for k in response.headers)
        return cls(response.status, {k.lower(): v for k, v in response.headers.items()}, body, names)


class Mesh:
    """A proxy serving one snapshot through a gateway listener and a sidecar listener."""

    def __init__(self, proxy: Proxy, gateway: Serving, sidecar: Serving, session: aiohttp.ClientSession) -> None:
        self.proxy = proxy
        self.gateway = gateway
        self.sidecar = sidecar
        self.session = session
        self.exchanges: list[Exchange] = []
        self.values: dict[str, str] = {}

    @property
    def gateway_url(self) -> str:
        host, port = self.gateway.address
        return f"http://{host}:{port}"

    @property
    def sidecar_url(self) -> str:
        host, port = self.sidecar.address
        return f"http://{host}:{port}"

    def reload(self, yaml_text: str) -> None:
        """Swap in the snapshot of new YAML (same backends, `GATEWAY` prepended), as a reload does."""
        self.proxy.current.swap(compile_yaml(GATEWAY + "---" + yaml_text, self.values))

    async def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        """A request to the gateway (`path` may carry a query), Host `example.com` by default."""
        headers = {"Host": "example.com", **kwargs.pop("headers", {})}
        async with self.session.request(method, self.gateway_url + path, headers=headers, **kwargs) as response:
            return await Answer.of(response)

    async def get(self, path: str, **kwargs: Any) -> Answer:
        return await self.request("GET", path, **kwargs)

    async def via_sidecar(self, method: str, url: str, **kwargs: Any) -> Answer:
        """An absolute-form request (`GET http://reviews:9080/x`) to the sidecar, as HTTP_PROXY sends it."""
        async with self.session.request(method, url, proxy=self.sidecar_url, **kwargs) as response:
            return await Answer.of(response)

    def last(self) -> Exchange:
        return self.exchanges[-1]


@contextlib.asynccontextmanager
async def running_mesh(
    yaml_text: str,
    backends: Mapping[str, Backend] | None = None,
    *,
    ports: Mapping[str, int] | None = None,
    seed: int = 7,
    clock: Callable[[], float] | None = None,
    limits: ConnectionLimits = DEFAULT_LIMITS,
    source: Workload | None = None,
    connector: aiohttp.BaseConnector | None = None,
) -> AsyncIterator[Mesh]:
    """Start `backends`, compile `yaml_text` (with `GATEWAY` prepended) and serve it."""
    backends = backends or {}
    for backend in backends.values():
        if not backend.port:
            await backend.start()
    values = placeholders(backends, ports)
    snapshot = compile_yaml(GATEWAY + "---" + yaml_text, values)
    upstreams = Upstreams(clock=clock) if clock is not None else Upstreams()
    exchanges: list[Exchange] = []
    proxy = Proxy(Current(snapshot), upstreams, rng=random.Random(seed), observers=(exchanges.append,))
    gateway = Serving(proxy, Listener(ListenerKind.GATEWAY, 8080, gateways=snapshot.ingress_gateways), limits)
    sidecar = Serving(proxy, Listener(ListenerKind.SIDECAR, 15001, workload=source), limits)
    await gateway.start("127.0.0.1", 0)
    await sidecar.start("127.0.0.1", 0)
    session = aiohttp.ClientSession(
        connector=connector or aiohttp.TCPConnector(limit=0), auto_decompress=False, timeout=aiohttp.ClientTimeout(20)
    )
    mesh = Mesh(proxy, gateway, sidecar, session)
    mesh.exchanges = exchanges
    mesh.values = values
    try:
        yield mesh
    finally:
        await session.close()
        await gateway.stop()
        await sidecar.stop()
        await proxy.close()
        for backend in backends.values():
            await backend.close()


# ---------------------------------------------------------------- raw HTTP/1.1 on a socket


@dataclass(slots=True)
class RawResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


class RawClient:
    """One client connection with exact bytes out and parsed responses in, for wire tests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.responses: collections.deque[RawResponse] = collections.deque()
        self._current: RawResponse | None = None
        self._head_only = False
        self._parser = httptools.HttpResponseParser(self)
        self.informational: list[int] = []

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> RawClient:
        reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer)

    # llhttp callbacks
    def on_message_begin(self) -> None:
        self._current = RawResponse(0, [])

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._current is not None
        self._current.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self._current is not None
        self._current.status = self._parser.get_status_code()
        if self._current.status < 200:
            self.informational.append(self._current.status)
            self._current = None
        elif self._head_only:
            self.responses.append(self._current)
            self._current = None
            self._parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        assert self._current is not None
        self._current.body += body

    def on_message_complete(self) -> None:
        if self._current is not None:
            self.responses.append(self._current)
            self._current = None

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, *, head: bool = False, timeout: float = PATIENCE) -> RawResponse:
        """The next whole response (`head`: the answer to a HEAD, which has no body)."""
        self._head_only = head
        async with asyncio.timeout(timeout):
            while not self.responses:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionResetError("the proxy closed the connection")
                self._parser.feed_data(data)
        return self.responses.popleft()

    async def interim(self, timeout: float = PATIENCE) -> int:
        """The next informational (1xx) status, e.g. 100 Continue."""
        async with asyncio.timeout(timeout):
            while not self.informational:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionResetError("the proxy closed the connection")
                self._parser.feed_data(data)
        return self.informational.pop(0)

    async def closed(self, timeout: float = PATIENCE) -> bytes:
        """Everything left until the proxy closes the connection."""
        async with asyncio.timeout(timeout):
            return await self.reader.read()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# ---------------------------------------------------------------- HTTP/2 (h2c, prior knowledge)


@dataclass(slots=True)
class H2Answer:
    """One stream's response as an HTTP/2 client saw it; `reset` is the RST_STREAM error code
    when the proxy reset the stream, `unacked` the DATA bytes the client has not yet handed
    back to the proxy's window."""

    status: int = 0
    pairs: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    reset: int | None = None
    ended: bool = False
    unacked: int = 0
    trailers: dict[str, str] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {name.decode(): value.decode("latin-1") for name, value in self.pairs}


class H2Client:
    """One h2c connection (prior knowledge, as gRPC clients connect) to a listener: streams are
    opened at will and answered concurrently. h2 checks every frame the proxy sends (a DATA
    frame past the window is an error). With `auto_ack` off the client hands no window back,
    so the proxy must stop once it has sent `window` bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, window: int) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.local_settings = Settings(client=True, initial_values={SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.h2.initiate_connection()
        self.auto_ack = True
        self.answers: dict[int, H2Answer] = {}
        self.pings = 0
        self.goaway = False
        self.error: BaseException | None = None
        self._changed = asyncio.Event()
        self._flush()
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, address: tuple[str, int], *, window: int = 65535) -> H2Client:
        reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer, window)

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(65536):
                for event in self.h2.receive_data(data):
                    self._event(event)
                self._flush()
                self._changed.set()
        except Exception as exc:  # any failure is the test's to see
            self.error = exc
        self.goaway = True
        self._changed.set()

    def _event(self, event: object) -> None:
        if isinstance(event, ResponseReceived):
            answer = self.answers[event.stream_id or 0]
            answer.pairs = [(bytes(n), bytes(v)) for n, v in event.headers or ()]
            answer.status = int(answer.headers[":status"])
        elif isinstance(event, DataReceived):
            answer = self.answers[event.stream_id or 0]
            answer.body += event.data or b""
            answer.unacked += event.flow_controlled_length or 0
            if self.auto_ack:
                self.ack(event.stream_id or 0)
        elif isinstance(event, TrailersReceived):
            pairs = event.headers or ()
            self.answers[event.stream_id or 0].trailers = {bytes(n).decode(): bytes(v).decode() for n, v in pairs}
        elif isinstance(event, StreamEnded):
            self.answers[event.stream_id or 0].ended = True
        elif isinstance(event, StreamReset):
            self.answers[event.stream_id or 0].reset = event.error_code
        elif isinstance(event, PingAckReceived):
            self.pings += 1
        elif isinstance(event, ConnectionTerminated):
            self.goaway = True

    def ack(self, stream_id: int) -> None:
        """Hand back the window of what the stream received so far."""
        answer = self.answers[stream_id]
        if answer.unacked:
            self.h2.acknowledge_received_data(answer.unacked, stream_id)
            answer.unacked = 0
            self._flush()

    def request(
        self, method: str, path: str, headers: Mapping[str, str] | None = None, body: bytes = b"",
        authority: str = "example.com", more: bool = False,
    ) -> int:  # fmt: skip
        """Open a stream (`body` fits the initial window; `more`: the caller sends the rest);
        its id, to await its `answer`."""
        stream_id = self.h2.get_next_available_stream_id()
        fields = [(":method", method), (":path", path), (":scheme", "http"), (":authority", authority)]
        fields += [(name.lower(), value) for name, value in (headers or {}).items()]
        self.h2.send_headers(stream_id, [(n.encode(), v.encode()) for n, v in fields], end_stream=not (body or more))
        if body:
            self.h2.send_data(stream_id, body, end_stream=not more)
        self.answers[stream_id] = H2Answer()
        self._flush()
        return stream_id

    def reset(self, stream_id: int) -> None:
        self.h2.reset_stream(stream_id)
        self._flush()

    async def until(self, done: Callable[[], bool], timeout: float = PATIENCE) -> None:
        """Wait until `done()` holds, checking after everything the proxy sends (and every
        10 ms, for conditions on other parties)."""
        async with asyncio.timeout(timeout):
            while not done():
                if self.error is not None:
                    raise self.error
                if self.goaway:
                    raise ConnectionResetError("the proxy closed the connection")
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.01)

    async def answer(self, stream_id: int) -> H2Answer:
        """The stream's whole response (or its reset)."""
        answer = self.answers[stream_id]
        await self.until(lambda: answer.ended or answer.reset is not None)
        return answer

    async def get(self, path: str, headers: Mapping[str, str] | None = None, **kwargs: Any) -> H2Answer:
        return await self.answer(self.request("GET", path, headers, **kwargs))

    async def ping(self) -> None:
        """A round trip: everything the proxy sent before its PING ACK has been read."""
        seen = self.pings
        self.h2.ping(b"minimesh")
        self._flush()
        await self.until(lambda: self.pings > seen)

    async def close(self) -> None:
        self._task.cancel()
        self.writer.close()
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await self.writer.wait_closed()
            await self._task
