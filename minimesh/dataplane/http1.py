"""HTTP/1.1 on the wire, both sides: llhttp (httptools) parses, bytes pass through untouched.

`Downstream` is one client connection: its `RequestReader` parses requests, its worker hands
each to the proxy's handler in order, and `Responder`s frame the responses onto its `Output`;
bytes it cannot parse get Envoy's answer (400, 431, 408) once the requests before them are
answered. `UpstreamConnection` is one keep-alive connection to an endpoint; its
`ResponseReader` parses the responses. Header names are lower-cased, as Envoy forwards them.

Two module-level objects hold state, on purpose: the `Outbox` of each event loop (kept by the
loop, weakly, so it ends with the loop and every connection on a loop shares its bursts) and
`DATE`, a once-a-second cache of the `date` value whose state is only the current time.
"""

from __future__ import annotations

import asyncio
import collections
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Protocol, cast

import httptools

from minimesh.dataplane.grpc import MessageCounter
from minimesh.routing.headers import HOP_BY_HOP, HeaderList

READ_HIGH_WATER = 1 << 20
"""Buffered body bytes past which a connection stops reading until they are consumed."""
PIPELINE_DEPTH = 16


VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What a downstream connection is allowed: header size and how long it may dawdle.

    `max_header_bytes` counts the URL, names and values of a head, and the raw bytes of a
    head still arriving (so a header that never ends is refused as it grows, memory flat).
    `headers_timeout` runs from the first byte of a request head to its end (Envoy's
    `request_headers_timeout`: 408 and close); `idle_timeout` closes a connection that
    has no request in progress for that long.
    """

    max_header_bytes: int = 60 * 1024
    headers_timeout: float = 30.0
    idle_timeout: float = 300.0


DEFAULT_LIMITS = ConnectionLimits()
"""Envoy's `max_request_headers_kb` (60); the timeouts minimesh applies by default."""
DELAYED_CLOSE = 1.0
"""Envoy's `delayed_close_timeout`: how long a connection ended by a local reply drains what
the client still sends before it closes."""
REASONS = {
    200: b"OK", 201: b"Created", 204: b"No Content", 301: b"Moved Permanently", 302: b"Found",
    303: b"See Other", 304: b"Not Modified", 307: b"Temporary Redirect", 308: b"Permanent Redirect",
    400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Payload Too Large", 418: b"I'm a teapot", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout",
}  # fmt: skip
FRAMING_HEADERS = HOP_BY_HOP | {b"content-length"}
"""Headers a response head never passes on: the proxy frames each message itself."""


def reason(status: int) -> bytes:
    return REASONS.get(status, b"Unknown")


class _DateCache:
    """The `date` header value, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


DATE = _DateCache()


def local_reply_bytes(status: int, body: bytes, *, close: bool) -> bytes:
    """A whole local reply as Envoy frames one: content-length, content-type when there is a
    body, date, `server: istio-envoy`, and `connection: close` when the connection ends."""
    head = b"HTTP/1.1 %d %b\r\ncontent-length: %d\r\n" % (status, reason(status), len(body))
    if body:
        head += b"content-type: text/plain\r\n"
    head += b"date: %b\r\nserver: istio-envoy\r\n" % DATE.get()
    if close:
        head += b"connection: close\r\n"
    return head + b"\r\n" + body


def local_reply_headers(body: bytes, given: HeaderList | None) -> HeaderList:
    """A local reply's headers, whatever the codec: `given`, then Envoy's headers for one
    (content-type when there is a body, date, server) that `given` does not set."""
    defaults: HeaderList = [(b"date", DATE.get()), (b"server", b"istio-envoy")]
    if body:
        defaults.insert(0, (b"content-type", b"text/plain"))
    if not given:
        return defaults
    names = {name for name, _ in given}
    return [*given, *(header for header in defaults if header[0] not in names)]


class Sender(Protocol):
    """A writer with a write held back by the outbox (an upstream connection, a downstream's `Output`)."""

    def send_held(self) -> None: ...


class Outbox:
    """Writes held back until every callback ready in this pass of the loop has run, then made
    back to back: requests to upstreams and whole responses. Under load a peer is then woken
    once per burst and answers the burst at once: an upstream on the proxy's own core no
    longer preempts it at every request, nor does a client on another core need waking at
    every answer. While passes carry one write each (light load), and from the first pass
    that writes nothing after a burst, writes go at once: a lone request never waits."""

    __slots__ = ("_busy", "_held", "_loop", "_open", "_writes")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._held: list[Sender] = []
        self._open = False
        self._writes = 0
        self._busy = False

    def defer(self, sender: Sender) -> bool:
        """Should `sender` hold its write back (the outbox then calls its `send_held`), or write
        at once? At once when it is the first of its pass and no burst is under way."""
        self._writes += 1
        if not self._open:
            self._open = True
            self._loop.call_soon(self._flush)
            if not self._busy:
                return False
        self._held.append(sender)
        return True

    def _flush(self) -> None:
        self._busy = self._writes > 1
        self._open = False
        self._writes = 0
        if self._busy:
            self._loop.call_soon(self._settle)
        held, self._held = self._held, []
        for sender in held:
            sender.send_held()

    def _settle(self) -> None:
        """A pass went by since the busy one: if it wrote nothing, the burst is over."""
        if not self._open:
            self._busy = False


_OUTBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = weakref.WeakKeyDictionary()
"""One outbox per loop, found from the loop rather than passed down: every connection of a loop
must share it, and the connections are made by asyncio's factories, which take no arguments."""


def outbox(loop: asyncio.AbstractEventLoop) -> Outbox:
    """The loop's outbox."""
    box = _OUTBOXES.get(loop)
    if box is None:
        box = _OUTBOXES[loop] = Outbox(loop)
    return box


def first_header(headers: HeaderList, name: bytes) -> bytes | None:
    """The value of the first header called `name` (lower-case), if any."""
    for key, value in headers:
        if key == name:
            return value
    return None


class Body:
    """A message body arriving in chunks, read as they come (`take`: all at once, once complete),
    its gRPC messages counted as they arrive once `count_messages` asked for it."""

    __slots__ = ("_chunks", "_complete", "_loop", "_on_drain", "_size", "_waiter", "error", "messages", "received")

    def __init__(
        self, on_drain: Callable[[], None] | None = None, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._loop = loop
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._complete = False
        self._waiter: asyncio.Future[None] | None = None
        self._on_drain = on_drain
        self.error: BaseException | None = None
        self.received = 0
        self.messages: MessageCounter | None = None

    @property
    def buffered(self) -> int:
        return self._size

    @property
    def complete(self) -> bool:
        return self._complete

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self.received += len(data)
        if self.messages is not None:
            self.messages.feed(data)
        self._wake()

    def count_messages(self) -> MessageCounter:
        """Count the body's gRPC messages from now on, and those of what it holds unread (a
        request body is counted before the proxy reads any of it)."""
        if self.messages is None:
            self.messages = MessageCounter()
            for chunk in self._chunks:
                self.messages.feed(chunk)
        return self.messages

    def finish(self) -> None:
        self._complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._complete = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = (self._loop or asyncio.get_running_loop()).create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read(self) -> bytes:
        """The next chunk; b"" at the end."""
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self._complete:
                return b""
            await self._wait()
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._on_drain is not None and self._size < READ_HIGH_WATER:
            self._on_drain()
        return chunk

    def take(self) -> bytes:
        """Everything buffered, at once (for a body already complete)."""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if self._on_drain is not None:
            self._on_drain()
        return data


class Request:
    """One downstream request as parsed: lower-case header names, body still arriving.
    (A plain class: made per request, and a compiled `__init__` is ten times a dataclass's.)"""

    __slots__ = ("body", "expects_continue", "headers", "keep_alive", "method", "target", "upgrade", "version")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: HeaderList,
        body: Body,
        version: bytes = b"1.1",
        keep_alive: bool = True,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.version = version
        self.keep_alive = keep_alive
        self.expects_continue = False
        self.upgrade: bytes | None = None
        """The `Upgrade` protocol (`websocket`) when the request asks to switch protocols."""

    def header(self, name: bytes) -> bytes | None:
        return first_header(self.headers, name)

    @property
    def has_body(self) -> bool:
        return not (self.body.complete and self.body.buffered == 0 and self.body.received == 0)


Handler = Callable[[Request, "Responder"], Awaitable[None]]
Rejected = Callable[["Downstream", int, int], None]
"""Told of a request answered before it reached the handler: (connection, status, body bytes sent)."""


class Responder:
    """Writes one response to the downstream connection, framing it as HTTP/1.1."""

    __slots__ = ("_chunked", "_conn", "_ended", "_keep_alive", "_request", "bytes_sent", "head_sent", "status")

    def __init__(self, conn: Downstream, request: Request) -> None:
        self._conn = conn
        self._request = request
        self._chunked = False
        self._ended = False
        self._keep_alive = request.keep_alive and request.upgrade is None
        self.head_sent = False
        self.status = 0
        self.bytes_sent = 0

    def send_head(self, status: int, headers: HeaderList, length: int | None, *, reason_phrase: bytes = b"") -> None:
        """Status line and headers; `length` None means chunked (or close-delimited for HTTP/1.0)."""
        self._conn.out.write(self._head(status, headers, length, reason_phrase))

    def send_whole(
        self, status: int, headers: HeaderList, length: int | None, body: bytes, *, reason_phrase: bytes = b""
    ) -> None:
        """A response whose whole body is at hand, framed as `send_head`, `send` and `end` would
        frame it, in one write (one syscall, one segment on the wire)."""
        data = self._head(status, headers, length, reason_phrase)
        if body and self._request.method != b"HEAD":
            self.bytes_sent += len(body)
            data += b"%x\r\n%b\r\n" % (len(body), body) if self._chunked else body
        if self._chunked:
            data += b"0\r\n\r\n"
        self._conn.out.write_soon(data)
        self._ended = True
        if not self._keep_alive:
            self._conn.close()

    def _head(self, status: int, headers: HeaderList, length: int | None, reason_phrase: bytes) -> bytes:
        self.status = status
        self.head_sent = True
        parts = [b"HTTP/1.1 %d %b\r\n" % (status, reason_phrase or reason(status))]
        for name, value in headers:
            if name not in FRAMING_HEADERS:
                parts += (name, b": ", value, b"\r\n")
        if length is not None:
            parts.append(b"content-length: %d\r\n" % length)
        elif not (self._request.method == b"HEAD" or status in (204, 304) or status < 200):
            if self._request.version == b"1.1":
                self._chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                self._keep_alive = False
        if not self._keep_alive or self._conn.out.closing:
            self._keep_alive = False
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def send(self, data: bytes) -> None:
        if not data or self._request.method == b"HEAD":
            return
        self.bytes_sent += len(data)
        if self._chunked:
            self._conn.out.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._conn.out.write(data)

    def end(self, trailers: HeaderList | None = None) -> None:
        """End the response; `trailers` are dropped, as Envoy's HTTP/1 codec drops them by default."""
        if self._ended:
            return
        self._ended = True
        if self._chunked:
            self._conn.out.write(b"0\r\n\r\n")
        if not self._keep_alive:
            self._conn.close()

    def answered(self, status: int, sent: int) -> None:
        """The connection answered this request itself (a local reply for bad bytes in its
        body): that is its response, as the access log records it."""
        self.status = status
        self.head_sent = True
        self.bytes_sent = sent
        self._ended = True

    def abort(self) -> None:
        """Reset the connection mid-response (the upstream died after the head was sent)."""
        self._ended = True
        self._conn.close()

    async def drain(self) -> None:
        await self._conn.out.drain()

    @property
    def blocked(self) -> bool:
        """The client reads slower than we write: `drain` would wait."""
        return self._conn.out.blocked

    def switch(self, headers: HeaderList, upstream: UpstreamConnection) -> Tunnel:
        """Answer 101 Switching Protocols with the upstream's `headers`; from then on the
        connection is a tunnel to `upstream`."""
        self.status = 101
        self.head_sent = True
        self._ended = True
        parts = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return self._conn.splice(b"".join(parts), upstream, self, self._request.body)

    def set_producer(self, producer: asyncio.BaseTransport | None) -> None:
        """The transport to pause while the client is slower than the upstream."""
        self._conn.out.producer = producer

    def reply(self, status: int, body: bytes = b"", headers: HeaderList | None = None) -> None:
        """A whole local reply, with Envoy's headers for one (see `local_reply_headers`)."""
        self.send_whole(status, local_reply_headers(body, headers), len(body), body)

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def peer(self) -> str:
        return self._conn.peer_text

    @property
    def connection(self) -> Downstream:
        return self._conn


class Deadline:
    """A connection's one timeout: `at` (loop time; 0 while none), its timer moved only when
    it would fire too late. The timer already running is kept when it fires no later (it then
    finds `at` moved and waits again), so a busy connection sets no timers; `on_expire` runs
    once `at` has passed."""

    __slots__ = ("_loop", "_on_expire", "_timer", "_timer_at", "at")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expire: Callable[[], None]) -> None:
        self._loop = loop
        self._on_expire = on_expire
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.at = 0.0

    def set(self, delay: float) -> None:
        """Expire `delay` seconds from now."""
        at = self._loop.time() + delay
        self.at = at
        if self._timer is None or at < self._timer_at:
            self._arm(at)

    def stop(self) -> None:
        """No deadline and no timer: the connection is gone."""
        self.at = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._expire)

    def _expire(self) -> None:
        self._timer = None
        at = self.at
        if not at:
            return
        if self._loop.time() < at:
            self._arm(at)
        else:
            self._on_expire()


class RequestReader:
    """The parsing side of a downstream connection, llhttp's callbacks: each head becomes a
    `Request` (within the connection's header limit) appended to `queue`, and the worker
    parked on `waiter` is woken; its body follows as it arrives. The connection feeds
    `parser` and calls `head_arriving` when a read ends inside a head."""

    __slots__ = (
        "_conn", "_drained", "_header_bytes", "_headers", "_limits", "_loop", "_timeout", "_url",
        "begun", "current", "head_bytes", "in_head", "parser", "queue", "started", "waiter",
    )  # fmt: skip

    def __init__(self, conn: Downstream, limits: ConnectionLimits, timeout: Deadline) -> None:
        self._conn = conn
        self._drained = conn.resume_reading
        self._limits = limits
        self._loop = conn.loop
        self._timeout = timeout
        self.parser = httptools.HttpRequestParser(self)
        self._headers: HeaderList = []
        self._header_bytes = 0
        self._url = b""
        self.in_head = False
        self.head_bytes = 0
        """Raw bytes of the head still arriving, counted a whole read at a time."""
        self.begun = 0
        """Requests begun in the bytes being parsed."""
        self.current: Request | None = None
        """The request whose head or body is being parsed."""
        self.queue: collections.deque[Request] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        """Set while the connection's worker waits for a request."""
        self.started = False
        """The worker was started (at the first request)."""

    @property
    def too_large(self) -> bool:
        """The head parsed so far passes the header limit."""
        return self._header_bytes > self._limits.max_header_bytes

    def head_arriving(self, size: int, in_head: bool, idle: bool) -> None:
        """A read ended inside a request head: count it, refuse it past the limit (431, as
        Envoy does while the bytes arrive), and start the headers timeout. The `size` bytes are
        all head when the read began inside it, or on an idle connection where it began (a head
        that began after other bytes of the read is counted from the next read on)."""
        if in_head and self.begun == 0:
            self.head_bytes += size
        elif not in_head and idle and self.begun == 1:
            self.head_bytes = size
        if self.head_bytes > self._limits.max_header_bytes:
            self._conn.fail(431, reason(431))
        elif not self._timeout.at:
            self._timeout.set(self._limits.headers_timeout)

    def on_message_begin(self) -> None:
        self._headers = []
        self._header_bytes = 0
        self.head_bytes = 0
        self.begun += 1
        self._url = b""
        self.in_head = True
        self._timeout.at = 0.0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._limits.max_header_bytes:
            raise httptools.HttpParserError("headers too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > self._limits.max_header_bytes:
            raise httptools.HttpParserError("headers too large")
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        request = Request(
            parser.get_method(),
            self._url,
            self._headers,
            Body(self._drained, self._loop),
            VERSIONS.get(parser.get_http_version()) or parser.get_http_version().encode(),
            parser.should_keep_alive(),
        )
        request.expects_continue = request.header(b"expect") == b"100-continue"
        if parser.should_upgrade():
            request.upgrade = request.header(b"upgrade") or b""
        self.current = request
        self.in_head = False
        self._timeout.at = 0.0
        queue = self.queue
        queue.append(request)
        if len(queue) > PIPELINE_DEPTH:
            self._conn.pause_reading()
        waiter = self.waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
        elif not self.started:
            self.started = True
            self._conn.start()

    def on_body(self, body: bytes) -> None:
        current = self.current
        assert current is not None
        current.body.feed(body)
        if current.body.buffered > READ_HIGH_WATER:
            self._conn.pause_reading()

    def on_message_complete(self) -> None:
        if self.current is not None:
            self.current.body.finish()
            self.current = None


class Output:
    """What a downstream connection writes, in order: at once, or (a whole response) with the
    outbox's next burst; `blocked` while the client reads slower than that, with the
    `producer` feeding it (a tunnel's upstream) paused meanwhile. Once `closing`, the
    connection is ending."""

    __slots__ = ("_drain_waiter", "_held", "_loop", "_outbox", "_paused", "closing", "producer", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._outbox = outbox(loop)
        self._held = b""
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.closing = False
        self.producer: asyncio.BaseTransport | None = None
        self.transport: asyncio.Transport | None = None

    def write(self, data: bytes) -> None:
        """Write now (after anything the outbox holds for this connection, to keep the order)."""
        if self._held:
            self.send_held()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write_soon(self, data: bytes) -> None:
        """Write with the outbox's next burst (a whole response: nothing else waits on it)."""
        if self._held:
            self._held += data
        elif self.transport is not None and not self.transport.is_closing():
            if self._outbox.defer(self):
                self._held = data
            else:
                self.transport.write(data)

    def send_held(self) -> None:
        data, self._held = self._held, b""
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    @property
    def blocked(self) -> bool:
        return self._paused and not self.closing

    async def drain(self) -> None:
        if self._paused and not self.closing:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    def pause(self) -> None:
        """The transport's buffer is full: pause the producer too."""
        self._paused = True
        if self.producer is not None and hasattr(self.producer, "pause_reading"):
            self.producer.pause_reading()

    def resume(self) -> None:
        """The transport's buffer drained: resume the producer and whoever waits in `drain`."""
        self._paused = False
        if self.producer is not None and hasattr(self.producer, "resume_reading"):
            self.producer.resume_reading()
        self.wake()

    def wake(self) -> None:
        """Let whoever waits in `drain` go on (the buffer drained, or the connection is gone)."""
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._drain_waiter = None

    def close(self) -> None:
        """Write what is held, then close."""
        self.closing = True
        if self._held:
            self.send_held()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Downstream(asyncio.Protocol):
    """One client connection: requests are parsed (`RequestReader`) and answered strictly in
    order by one worker task, through `out`; one `Deadline` times the head and the idle."""

    def __init__(
        self,
        handler: Handler,
        on_close: Callable[[Downstream], None] | None = None,
        limits: ConnectionLimits = DEFAULT_LIMITS,
        on_reject: Rejected | None = None,
    ) -> None:
        self._handler = handler
        self._on_close = on_close
        self._on_reject = on_reject
        self._limits = limits
        self.loop = asyncio.get_running_loop()
        self.out = Output(self.loop)
        self._timeout = Deadline(self.loop, self._timed_out)
        self._transport: asyncio.Transport | None = None
        self._read_paused = False
        self._failed = 0
        self._failed_body = b""
        """The status of the local reply (and its body) that ends this connection once the
        requests parsed before the bad bytes are answered; 0 while none."""
        self._reader = RequestReader(self, limits, self._timeout)
        self._worker: asyncio.Task[None] | None = None
        self._responder: Responder | None = None
        """The responder of the request the worker serves."""
        self._upgraded = False
        """Bytes from the client are no longer HTTP: a tunnel's after a 101, or dropped after `_finish`."""
        self._early = b""
        self._tunnel: Tunnel | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.peer_text = ":0"
        """`host:port` of the peer, as the access log and x-forwarded-for write it."""
        self.extra: dict[str, Any] = {}

    def socket(self) -> Any:
        """The connection's socket (for socket options such as SO_ORIGINAL_DST)."""
        return self._transport.get_extra_info("socket") if self._transport is not None else None

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = self.out.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio's
        peer = transport.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("", 0)
        self.peer_text = f"{self.peer[0]}:{self.peer[1]}"
        self._timeout.set(self._limits.idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self._upgraded:
            if self._failed:
                return
            if self._tunnel is not None:
                self._tunnel.up(data)
            else:
                self._early += data  # reading is paused until the tunnel is up: this stays small
            return
        reader = self._reader
        in_head = reader.in_head
        idle = reader.current is None
        reader.begun = 0
        try:
            reader.parser.feed_data(data)
            if reader.in_head:
                reader.head_arriving(len(data), in_head, idle)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded = True
            self.pause_reading()
            self._early += data[int(upgrade.args[0]) :]
        except httptools.HttpParserError:
            status = 431 if reader.too_large else 400
            self.fail(status, reason(status))

    def connection_lost(self, exc: Exception | None) -> None:
        self.out.closing = True
        self._timeout.stop()
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.close()
        current = self._reader.current
        if current is not None and not current.body.complete:
            current.body.fail(ConnectionResetError("downstream closed the connection"))
        if self._worker is not None and tunnel is None:
            self._worker.cancel()
        self.out.wake()
        if self._on_close is not None:
            self._on_close(self)

    def pause_writing(self) -> None:
        self.out.pause()

    def resume_writing(self) -> None:
        self.out.resume()

    # ---- serving

    def start(self) -> None:
        """Start the worker (the reader has the connection's first request)."""
        self._worker = self.loop.create_task(self._work())

    async def _work(self) -> None:
        """The connection's one worker: serves queued requests in order, then waits for more."""
        reader = self._reader
        queue = reader.queue
        out = self.out
        while not out.closing:
            if not queue:
                if self._failed:
                    self._send_failure()
                    return
                if not reader.in_head:
                    self._timeout.set(self._limits.idle_timeout)
                waiter = reader.waiter = self.loop.create_future()
                await waiter
                reader.waiter = None
                continue
            request = queue.popleft()
            if self._read_paused and len(queue) <= PIPELINE_DEPTH // 2 and not self._upgraded:
                self.resume_reading()
            if request.expects_continue and not request.body.complete:
                out.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            responder = self._responder = Responder(self, request)
            try:
                await self._handler(request, responder)
            except asyncio.CancelledError:
                raise
            except Exception:
                if not responder.head_sent:
                    responder.reply(500, b"internal error in minimesh")
                self.close()
                raise
            if not responder.ended:
                responder.end()
            if not request.body.complete or request.upgrade is not None:
                self.close()

    @property
    def _busy(self) -> bool:
        """The worker has a request to serve (it is not waiting for one)."""
        waiter = self._reader.waiter
        return self._worker is not None and (waiter is None or waiter.done())

    def splice(self, head: bytes, upstream: UpstreamConnection, responder: Responder, body: Body) -> Tunnel:
        """After a 101: write its `head`, then carry bytes both ways (what arrived early first)."""
        tunnel = Tunnel(self, upstream, responder, body)
        self.out.write(head)
        self._tunnel = tunnel
        self.out.producer = upstream.transport
        upstream.splice(tunnel, self._transport)
        early, self._early = self._early, b""
        if early:
            tunnel.up(early)
        self.resume_reading()
        return tunnel

    def close(self) -> None:
        self.out.close()

    # ---- a local reply that ends the connection

    def fail(self, status: int, body: bytes) -> None:
        """Envoy's answer to a request it could not parse or wait for: a local reply, then close.
        Reading stops; the requests parsed before the bad bytes are answered first. Bad bytes in
        the body of the request being served: its handler stops (`DC`), and the local reply is
        its response if nothing of one was sent yet, else the connection is reset."""
        if self._failed or self.out.closing:
            return
        self._failed, self._failed_body = status, body
        self.pause_reading()
        reader = self._reader
        current, reader.current = reader.current, None
        if current is not None:
            if reader.queue and reader.queue[-1] is current:
                reader.queue.pop()
            elif self._responder is not None and self._responder._request is current:
                if self._worker is not None:
                    self._worker.cancel()
                if self._responder.head_sent:
                    self.close()
                else:
                    self._responder.answered(status, len(body))
                    self._finish(status, body)
                return
        if not self._busy:
            self._send_failure()

    def _send_failure(self) -> None:
        """The local reply of `fail`, logged and counted as a request refused before routing."""
        status, body = self._failed, self._failed_body
        self._finish(status, body)
        if self._on_reject is not None:
            self._on_reject(self, status, len(body))

    def _finish(self, status: int, body: bytes) -> None:
        """Write the local reply that ends the connection, then Envoy's delayed close: no more
        writes (FIN) and what the client still sends is read and dropped for at most
        DELAYED_CLOSE seconds, so a client still writing reads the reply rather than a reset."""
        self.out.write(local_reply_bytes(status, body, close=True))
        self.out.closing = True
        transport = self._transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            self.close()
            return
        transport.write_eof()
        self._upgraded = True
        self._read_paused = False
        transport.resume_reading()
        self._timeout.set(DELAYED_CLOSE)

    def _timed_out(self) -> None:
        """The deadline passed: a head still arriving is refused (408); otherwise the connection
        was idle, or a local reply's delayed close is over: close."""
        if self._reader.in_head and not self.out.closing:
            self.fail(408, b"")
        else:
            self.close()

    def pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and self._transport is not None and not self.out.closing and not self._failed:
            self._read_paused = False
            self._transport.resume_reading()

    def __repr__(self) -> str:
        state = "closing" if self.out.closing else ("busy" if self._busy else "idle")
        return f"<Downstream {self.peer[0]}:{self.peer[1]} {state} queued={len(self._reader.queue)}>"


# ---------------------------------------------------------------- upstream side


class UpstreamClosed(Exception):
    """The upstream closed the connection, or reset the stream, before the response was
    complete; `reason` is Envoy's name for it (`connection_termination`, `remote_reset`)."""

    def __init__(
        self, message: str, *, before_headers: bool, sent_nothing: bool = False, reason: str = "connection_termination"
    ) -> None:
        super().__init__(message)
        self.before_headers = before_headers
        self.sent_nothing = sent_nothing
        self.reason = reason


class ResponseSource(Protocol):
    """What carries an upstream response: an HTTP/1.1 `UpstreamConnection`, or one stream of
    an HTTP/2 connection. `resume` is called as the body is read; `close` abandons it;
    `transport` is what a slow client pauses (None when flow control paces it instead)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def transport(self) -> asyncio.Transport | None: ...

    def resume(self) -> None: ...

    def close(self) -> None: ...


class UpstreamResponse:
    """A response being received: status and headers are in, the body streams; `trailers`
    are the HTTP/2 trailers that ended it, if any."""

    __slots__ = ("body", "conn", "headers", "keep_alive", "reason", "status", "trailers")

    def __init__(self, conn: ResponseSource, status: int, reason_phrase: bytes, headers: HeaderList) -> None:
        self.conn = conn
        self.status = status
        self.reason = reason_phrase
        self.headers = headers
        self.body = Body(conn.resume, conn.loop)
        self.keep_alive = True
        self.trailers: HeaderList | None = None

    def header(self, name: bytes) -> bytes | None:
        return first_header(self.headers, name)

    @property
    def length(self) -> int | None:
        value = self.header(b"content-length")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def close_delimited(self) -> bool:
        """No length and not chunked: the body ends when the upstream closes (HTTP/1.0 style)."""
        return self.header(b"content-length") is None and b"chunked" not in (self.header(b"transfer-encoding") or b"")


class ResponseReader:
    """The parsing side of an upstream connection, llhttp's callbacks: the response to the
    request in flight resolves `head` once its head is in (interim 1xx skipped), its body
    follows as it arrives, and at its end the connection is handed back (`on_idle`), or
    closed when it cannot be reused. After a 101 (`switched`) the bytes are a tunnel's."""

    __slots__ = ("_conn", "_headers", "_on_idle", "_reason", "head", "head_request", "parser", "response", "switched")

    def __init__(self, conn: UpstreamConnection, on_idle: Callable[[UpstreamConnection], None] | None) -> None:
        self._conn = conn
        self._on_idle = on_idle
        self.parser = httptools.HttpResponseParser(self)
        self._headers: HeaderList = []
        self._reason = b""
        self.head: asyncio.Future[UpstreamResponse] | None = None
        """Resolved with the response once its head is in."""
        self.head_request = False
        self.response: UpstreamResponse | None = None
        """The response whose body is arriving."""
        self.switched = False

    def lost(self, *, sent_nothing: bool) -> None:
        """The upstream closed: the response awaited fails, a close-delimited body ends."""
        response = self.response
        if self.head is not None and not self.head.done():
            error = UpstreamClosed("upstream closed the connection", before_headers=True, sent_nothing=sent_nothing)
            self.head.set_exception(error)
        elif response is not None and not response.body.complete:
            if response.close_delimited:
                response.keep_alive = False
                response.body.finish()
            else:
                response.body.fail(UpstreamClosed("upstream closed mid-response", before_headers=False))

    def broken(self, message: str) -> None:
        """The upstream sent bytes that are not HTTP: the response awaited fails with `message`."""
        pending = self.head is not None and not self.head.done()
        error = UpstreamClosed(message, before_headers=pending)
        if self.head is not None and pending:
            self.head.set_exception(error)
        elif self.response is not None and not self.response.body.complete:
            self.response.body.fail(error)

    def on_message_begin(self) -> None:
        self._headers = []
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200 and status != 101:
            return
        if status == 101:
            self.switched = True
        response = UpstreamResponse(self._conn, status, self._reason, self._headers)
        response.keep_alive = self.parser.should_keep_alive()
        self.response = response
        if self.head is not None and not self.head.done():
            self.head.set_result(response)
        if self.head_request or status in (204, 304):
            self._complete(response, reusable=not self.head_request)

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None and not response.body.complete:
            response.body.feed(body)
            if response.body.buffered > READ_HIGH_WATER:
                self._conn.pause()

    def on_message_complete(self) -> None:
        response = self.response
        if response is not None and not response.body.complete:
            self._complete(response, reusable=response.keep_alive)

    def _complete(self, response: UpstreamResponse, *, reusable: bool) -> None:
        response.body.finish()
        self.response = None
        self.head = None
        if response.status == 101:
            return  # the connection becomes a tunnel, or is closed: never pooled again
        if not reusable:
            response.keep_alive = False
            self._conn.close()
        elif self._on_idle is not None:
            self._on_idle(self._conn)


class UpstreamConnection(asyncio.Protocol):
    """One connection to an endpoint; one exchange at a time; reusable while keep-alive holds.
    It writes requests (bodies no faster than the upstream takes them); its `ResponseReader`
    reads the responses."""

    def __init__(
        self,
        on_idle: Callable[[UpstreamConnection], None] | None = None,
        on_lost: Callable[[UpstreamConnection], None] | None = None,
    ) -> None:
        self._reader = ResponseReader(self, on_idle)
        self.loop = asyncio.get_running_loop()
        self._outbox = outbox(self.loop)
        self.transport: asyncio.Transport | None = None
        self._received_any = False
        self._paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._on_lost = on_lost
        self.closed = False
        self.requests = 0
        self._held = b""
        self._early = b""
        self._tunnel: Tunnel | None = None
        self.producer: asyncio.Transport | None = None
        """The downstream transport to pause while this upstream reads slower (a tunnel)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's subclasses

    def send_held(self) -> None:
        """Write the request the outbox held back, unless the connection is gone meanwhile."""
        data, self._held = self._held, b""
        if data and not self.closed and self.transport is not None:
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake_drain()
        if self._on_lost is not None:
            self._on_lost(self)
        if self._tunnel is not None:
            self._tunnel.close()
            return
        self._reader.lost(sent_nothing=not self._received_any)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.producer is not None:
            self.producer.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.producer is not None and not self.producer.is_closing():
            self.producer.resume_reading()
        self._wake_drain()

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        self._drain_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._received_any = True
        if self._tunnel is not None:
            self._tunnel.down(data)
            return
        if self._reader.switched:
            self._early += data
            return
        try:
            self._reader.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._early += data[int(upgrade.args[0]) :]
        except httptools.HttpParserError as exc:
            self._reader.broken(f"invalid upstream response: {exc}")
            self.close()

    def splice(self, tunnel: Tunnel, downstream: asyncio.Transport | None) -> None:
        """Carry `tunnel` from now on: what the upstream sent past its 101 goes first."""
        self._tunnel = tunnel
        self.producer = downstream
        early, self._early = self._early, b""
        if early:
            tunnel.down(early)
        if self.closed:
            tunnel.close()

    async def exchange(
        self, head: bytes, body: Body | bytes, *, head_request: bool = False, chunked: bool = True
    ) -> UpstreamResponse:
        """Send a request; return once the response head has arrived. A streamed `body` goes
        out chunked, or as it arrives when the head carries its content-length."""
        assert self.transport is not None
        arrived: asyncio.Future[UpstreamResponse] = self.loop.create_future()
        reader = self._reader
        reader.head = arrived
        reader.head_request = head_request
        self._received_any = False
        self.requests += 1
        if isinstance(body, bytes) and len(body) < 65536:
            if self._outbox.defer(self):
                self._held = head + body
            else:
                self.transport.write(head + body)
        elif isinstance(body, bytes):
            self.transport.write(head)
            self.transport.write(body)
        else:
            self.transport.write(head)
            await self._stream(body, chunked)
        return await arrived

    async def _stream(self, body: Body, chunked: bool) -> None:
        """Pass a body on as it arrives, no faster than the upstream takes it; stop early if
        the connection is gone (the pending head then carries the error)."""
        assert self.transport is not None
        while not self.closed:
            chunk = await body.read()
            if not chunk:
                if chunked:
                    self.transport.write(b"0\r\n\r\n")
                return
            self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if self._write_paused:
                self._drain_waiter = self.loop.create_future()
                await self._drain_waiter

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    @property
    def idle(self) -> bool:
        return self._reader.head is None and self._reader.response is None and not self.closed

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("idle" if self.idle else "busy")
        return f"<UpstreamConnection {state} requests={self.requests}>"


class Tunnel:
    """After a 101 Switching Protocols (WebSocket): bytes pass both ways untouched, each side
    paused while the other is slow to take them, until either closes; then both close.
    Counted as the request's bytes received and the response's bytes sent."""

    __slots__ = ("body", "done", "downstream", "responder", "upstream")

    def __init__(self, downstream: Downstream, upstream: UpstreamConnection, responder: Responder, body: Body) -> None:
        self.downstream = downstream
        self.upstream = upstream
        self.responder = responder
        self.body = body
        self.done: asyncio.Future[None] = upstream.loop.create_future()

    def up(self, data: bytes) -> None:
        """From the client to the upstream."""
        self.body.received += len(data)
        transport = self.upstream.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def down(self, data: bytes) -> None:
        """From the upstream to the client."""
        self.responder.bytes_sent += len(data)
        self.downstream.out.write(data)

    def close(self) -> None:
        """Either side closed (the normal end of a tunnel) or the proxy stops: close both."""
        if not self.done.done():
            self.done.set_result(None)
        self.downstream.close()
        self.upstream.close()
