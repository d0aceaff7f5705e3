"""HTTP/1.1 on the wire, both sides: llhttp (httptools) parses, bytes pass through untouched.

`Downstream` is one client connection: it parses requests, hands each to the proxy's
handler in order, and frames the responses; bytes it cannot parse get Envoy's answer (400,
431, 408) once the requests before them are answered. `UpstreamConnection` is one keep-alive
connection to an endpoint. Header names are lower-cased, as Envoy forwards them.
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
    """A connection with a write held back by the outbox."""

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


class BodyTooLarge(Exception):
    """A body that had to be buffered (for a retry or a mirror) outgrew its bound."""


class Body:
    """A message body arriving in chunks; read it whole (bounded) or stream it."""

    __slots__ = ("_chunks", "_complete", "_loop", "_on_drain", "_size", "_waiter", "error", "received")

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
        self._wake()

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

    async def read_all(self, limit: int) -> bytes:
        """The whole body; BodyTooLarge once it passes `limit` bytes."""
        while not self._complete:
            if self._size > limit:
                raise BodyTooLarge(limit)
            await self._wait()
        if self.error is not None:
            raise self.error
        if self._size > limit:
            raise BodyTooLarge(limit)
        data = b"".join(self._chunks)
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
        self._conn.write(self._head(status, headers, length, reason_phrase))

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
        self._conn.write_soon(data)
        self._ended = True
        self._conn.response_done(keep_alive=self._keep_alive)

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
        if not self._keep_alive or self._conn.closing:
            self._keep_alive = False
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def send(self, data: bytes) -> None:
        if not data or self._request.method == b"HEAD":
            return
        self.bytes_sent += len(data)
        if self._chunked:
            self._conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._conn.write(data)

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._chunked:
            self._conn.write(b"0\r\n\r\n")
        self._conn.response_done(keep_alive=self._keep_alive)

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
        self._conn.response_done(keep_alive=False)

    async def drain(self) -> None:
        await self._conn.drain()

    @property
    def blocked(self) -> bool:
        """The client reads slower than we write: `drain` would wait."""
        return self._conn.blocked

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
        self._conn.producer = producer

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


class Downstream(asyncio.Protocol):
    """One client connection: requests are parsed and answered strictly in order."""

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
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: collections.deque[Request] = collections.deque()
        self._current: Request | None = None
        self._headers: HeaderList = []
        self._header_bytes = 0
        self._in_head = False
        self._head_bytes = 0
        """Raw bytes of the head still arriving, counted a whole read at a time."""
        self._begun = 0
        """Requests begun in the bytes being parsed."""
        self._url = b""
        self._worker: asyncio.Task[None] | None = None
        self._responder: Responder | None = None
        """The responder of the request the worker serves."""
        self._failed = 0
        self._failed_body = b""
        """The status of the local reply (and its body) that ends this connection once the
        requests parsed before the bad bytes are answered; 0 while none."""
        self._wakeup: asyncio.Future[None] | None = None
        self._busy = False
        self._loop = asyncio.get_running_loop()
        self._outbox = outbox(self._loop)
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._held = b""
        self._read_paused = False
        self._upgraded = False
        """Bytes from the client are no longer HTTP: a tunnel's after a 101, or dropped after `_finish`."""
        self._early = b""
        self._tunnel: Tunnel | None = None
        self.closing = False
        self.producer: asyncio.BaseTransport | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.peer_text = ":0"
        """`host:port` of the peer, as the access log and x-forwarded-for write it."""
        self.extra: dict[str, Any] = {}

    def socket(self) -> Any:
        """The connection's socket (for socket options such as SO_ORIGINAL_DST)."""
        return self._transport.get_extra_info("socket") if self._transport is not None else None

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's subclasses
        peer = transport.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("", 0)
        self.peer_text = f"{self.peer[0]}:{self.peer[1]}"
        self._set_deadline(self._limits.idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self._upgraded:
            if not self._failed:
                self._tunnel_in(data)
            return
        in_head = self._in_head
        idle = self._current is None
        self._begun = 0
        try:
            self._parser.feed_data(data)
            if self._in_head:
                self._head_arriving(len(data), in_head, idle)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded = True
            self._pause_reading()
            self._tunnel_in(data[int(upgrade.args[0]) :])
        except httptools.HttpParserError:
            if self._header_bytes > self._limits.max_header_bytes:
                self._fail(431, reason(431))
            else:
                self._fail(400, reason(400))

    def _head_arriving(self, size: int, in_head: bool, idle: bool) -> None:
        """A read ended inside a request head: count it, refuse it past the limit (431, as
        Envoy does while the bytes arrive), and start the headers timeout. The `size` bytes are
        all head when the read began inside it, or on an idle connection where it began (a head
        that began after other bytes of the read is counted from the next read on)."""
        if in_head and self._begun == 0:
            self._head_bytes += size
        elif not in_head and idle and self._begun == 1:
            self._head_bytes = size
        if self._head_bytes > self._limits.max_header_bytes:
            self._fail(431, reason(431))
        elif not self._deadline:
            self._set_deadline(self._limits.headers_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._deadline = 0.0
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._current is not None and not self._current.body.complete:
            self._current.body.fail(ConnectionResetError("downstream closed the connection"))
        if self._worker is not None and tunnel is None:
            self._worker.cancel()
        self._wake_drain()
        if self._on_close is not None:
            self._on_close(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.producer is not None and hasattr(self.producer, "pause_reading"):
            self.producer.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.producer is not None and hasattr(self.producer, "resume_reading"):
            self.producer.resume_reading()
        self._wake_drain()

    # ---- llhttp callbacks

    def on_message_begin(self) -> None:
        self._headers = []
        self._header_bytes = 0
        self._head_bytes = 0
        self._begun += 1
        self._url = b""
        self._in_head = True
        self._deadline = 0.0

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
        parser = self._parser
        request = Request(
            parser.get_method(),
            self._url,
            self._headers,
            Body(self._resume_reading, self._loop),
            VERSIONS.get(parser.get_http_version()) or parser.get_http_version().encode(),
            parser.should_keep_alive(),
        )
        request.expects_continue = request.header(b"expect") == b"100-continue"
        if parser.should_upgrade():
            request.upgrade = request.header(b"upgrade") or b""
        self._current = request
        self._in_head = False
        self._deadline = 0.0
        self._busy = True
        self._queue.append(request)
        if len(self._queue) > PIPELINE_DEPTH:
            self._pause_reading()
        if self._worker is None:
            self._worker = self._loop.create_task(self._work())
        else:
            wakeup = self._wakeup
            if wakeup is not None and not wakeup.done():
                wakeup.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self._current is not None
        self._current.body.feed(body)
        if self._current.body.buffered > READ_HIGH_WATER:
            self._pause_reading()

    def on_message_complete(self) -> None:
        if self._current is not None:
            self._current.body.finish()
            self._current = None

    # ---- serving

    async def _work(self) -> None:
        """The connection's one worker: serves queued requests in order, then waits for more."""
        queue = self._queue
        while not self.closing:
            if not queue:
                if self._failed:
                    self._send_failure()
                    return
                self._busy = False
                if not self._in_head:
                    self._set_deadline(self._limits.idle_timeout)
                self._wakeup = self._loop.create_future()
                await self._wakeup
                self._wakeup = None
                continue
            self._busy = True
            request = queue.popleft()
            if self._read_paused and len(self._queue) <= PIPELINE_DEPTH // 2 and not self._upgraded:
                self._resume_reading()
            if request.expects_continue and not request.body.complete:
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
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

    # ---- after a 101: a tunnel

    def _tunnel_in(self, data: bytes) -> None:
        """Bytes past an upgrade request: to the upstream once the tunnel is up, else held
        (reading is paused meanwhile, so this stays small)."""
        if self._tunnel is not None:
            self._tunnel.up(data)
        elif data:
            self._early += data

    def splice(self, head: bytes, upstream: UpstreamConnection, responder: Responder, body: Body) -> Tunnel:
        tunnel = Tunnel(self, upstream, responder, body)
        self.write(head)
        self._tunnel = tunnel
        self.producer = upstream.transport
        upstream.splice(tunnel, self._transport)
        early, self._early = self._early, b""
        if early:
            tunnel.up(early)
        self._resume_reading()
        return tunnel

    def response_done(self, *, keep_alive: bool) -> None:
        if not keep_alive:
            self.close()

    def write(self, data: bytes) -> None:
        """Write now (after anything the outbox holds for this connection, to keep the order)."""
        if self._held:
            self.send_held()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def write_soon(self, data: bytes) -> None:
        """Write with the outbox's next burst (a whole response: nothing else waits on it)."""
        if self._held:
            self._held += data
        elif self._transport is not None and not self._transport.is_closing():
            if self._outbox.defer(self):
                self._held = data
            else:
                self._transport.write(data)

    def send_held(self) -> None:
        data, self._held = self._held, b""
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    @property
    def blocked(self) -> bool:
        return self._write_paused and not self.closing

    async def drain(self) -> None:
        if self._write_paused and not self.closing:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._drain_waiter = None

    def close(self) -> None:
        self.closing = True
        if self._held:
            self.send_held()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _fail(self, status: int, body: bytes) -> None:
        """Envoy's answer to a request it could not parse or wait for: a local reply, then close.
        Reading stops; the requests parsed before the bad bytes are answered first. Bad bytes in
        the body of the request being served: its handler stops (`DC`), and the local reply is
        its response if nothing of one was sent yet, else the connection is reset."""
        if self._failed or self.closing:
            return
        self._failed, self._failed_body = status, body
        self._pause_reading()
        current, self._current = self._current, None
        if current is not None:
            if self._queue and self._queue[-1] is current:
                self._queue.pop()
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
        """The local reply of `_fail`, logged and counted as a request refused before routing."""
        status, body = self._failed, self._failed_body
        self._finish(status, body)
        if self._on_reject is not None:
            self._on_reject(self, status, len(body))

    def _finish(self, status: int, body: bytes) -> None:
        """Write the local reply that ends the connection, then Envoy's delayed close: no more
        writes (FIN) and what the client still sends is read and dropped for at most
        DELAYED_CLOSE seconds, so a client still writing reads the reply rather than a reset."""
        self.write(local_reply_bytes(status, body, close=True))
        self.closing = True
        transport = self._transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            self.close()
            return
        transport.write_eof()
        self._upgraded = True
        self._read_paused = False
        transport.resume_reading()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(DELAYED_CLOSE, self.close)

    def _pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self._transport is not None and not self.closing and not self._failed:
            self._read_paused = False
            self._transport.resume_reading()

    # ---- timeouts: one deadline at a time, its timer moved only when it would fire too late

    def _set_deadline(self, delay: float) -> None:
        """Time out `delay` seconds from now: the headers timeout while a head is arriving,
        else the idle timeout. The timer already running is kept when it fires no later (it
        then finds the deadline moved and waits again), so a busy connection sets no timers."""
        at = self._loop.time() + delay
        self._deadline = at
        if self._timer is None or at < self._timer_at:
            self._arm(at)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._expire)

    def _expire(self) -> None:
        self._timer = None
        deadline = self._deadline
        if not deadline or self.closing:
            return
        if self._loop.time() < deadline:
            self._arm(deadline)
        elif self._in_head:
            self._fail(408, b"")
        else:
            self.close()

    def __repr__(self) -> str:
        state = "closing" if self.closing else ("busy" if self._busy else "idle")
        return f"<Downstream {self.peer[0]}:{self.peer[1]} {state} queued={len(self._queue)}>"


# ---------------------------------------------------------------- upstream side


class UpstreamClosed(Exception):
    """The upstream closed or reset the connection before the response was complete."""

    def __init__(self, message: str, *, before_headers: bool, sent_nothing: bool = False) -> None:
        super().__init__(message)
        self.before_headers = before_headers
        self.sent_nothing = sent_nothing


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


class UpstreamConnection(asyncio.Protocol):
    """One connection to an endpoint; one exchange at a time; reusable while keep-alive holds."""

    def __init__(
        self,
        on_idle: Callable[[UpstreamConnection], None] | None = None,
        on_lost: Callable[[UpstreamConnection], None] | None = None,
    ) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.loop = asyncio.get_running_loop()
        self._outbox = outbox(self.loop)
        self.transport: asyncio.Transport | None = None
        self._response: UpstreamResponse | None = None
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._headers: HeaderList = []
        self._reason = b""
        self._head_request = False
        self._received_any = False
        self._paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._on_idle = on_idle
        self._on_lost = on_lost
        self.closed = False
        self.requests = 0
        self._held = b""
        self._early = b""
        self._switched = False
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
        error = UpstreamClosed(
            "upstream closed the connection", before_headers=True, sent_nothing=not self._received_any
        )
        response = self._response
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        elif response is not None and not response.body.complete:
            if response.close_delimited:
                response.keep_alive = False
                response.body.finish()
            else:
                response.body.fail(UpstreamClosed("upstream closed mid-response", before_headers=False))

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
        if self._switched:
            self._early += data
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._early += data[int(upgrade.args[0]) :]
        except httptools.HttpParserError as exc:
            self._broken(f"invalid upstream response: {exc}")

    def _broken(self, message: str) -> None:
        error = UpstreamClosed(message, before_headers=self._head is not None and not self._head.done())
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        elif self._response is not None and not self._response.body.complete:
            self._response.body.fail(error)
        self.close()

    def on_message_begin(self) -> None:
        self._headers = []
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200 and status != 101:
            return
        if status == 101:
            self._switched = True
        response = UpstreamResponse(self, status, self._reason, self._headers)
        response.keep_alive = self._parser.should_keep_alive()
        self._response = response
        if self._head is not None and not self._head.done():
            self._head.set_result(response)
        if self._head_request or status in (204, 304):
            self._complete(response, reusable=not self._head_request)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None and not response.body.complete:
            response.body.feed(body)
            if response.body.buffered > READ_HIGH_WATER:
                self.pause()

    def on_message_complete(self) -> None:
        response = self._response
        if response is not None and not response.body.complete:
            self._complete(response, reusable=response.keep_alive)

    def _complete(self, response: UpstreamResponse, *, reusable: bool) -> None:
        response.body.finish()
        self._response = None
        self._head = None
        if response.status == 101:
            return  # the connection becomes a tunnel, or is closed: never pooled again
        if not reusable:
            response.keep_alive = False
            self.close()
        elif self._on_idle is not None:
            self._on_idle(self)

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
        self._head = arrived
        self._head_request = head_request
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
        return self._head is None and self._response is None and not self.closed

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
        self.downstream.write(data)

    def close(self) -> None:
        """Either side closed (the normal end of a tunnel) or the proxy stops: close both."""
        if not self.done.done():
            self.done.set_result(None)
        self.downstream.close()
        self.upstream.close()
