"""HTTP/2 downstream (h2c with prior knowledge, what gRPC clients send), framed by the
sans-IO `h2` library: each stream (its `StreamLifecycle`) becomes a `Request` for the same
proxy steps as HTTP/1.1, answered through its `Stream` (a `Responding`). Flow control is
honoured both ways. `Http2Connection` is what it shares with the upstream side.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings

from minimesh.dataplane.http1 import (
    DEFAULT_LIMITS,
    FRAMING_HEADERS,
    READ_HIGH_WATER,
    Body,
    ConnectionLimits,
    Request,
    local_reply_headers,
)
from minimesh.routing.headers import HeaderList

VERSION = b"2"
"""`Request.version` of an HTTP/2 request (the access log prints `HTTP/2`, as Envoy does)."""
STREAM_WINDOW = 2 * READ_HIGH_WATER
"""What a client may send on one stream before the proxy consumes it: more than the body the
proxy buffers for retries and mirrors, so waiting for that body never stalls."""
CONNECTION_WINDOW = 16 * READ_HIGH_WATER
"""What a client may send on all its streams before the proxy consumes it."""
MAX_CONCURRENT_STREAMS = 2**31 - 1
"""Envoy's default `max_concurrent_streams`."""
OUT_HIGH_WATER = 1 << 16
"""Response bytes held for one stream (its window closed) past which `drain` waits."""


def h2_config(*, client_side: bool) -> H2Configuration:
    """The `h2` settings of both codecs: what arrives is validated, what goes out is not
    checked again (its names are already lower-case, its values came through a validating
    codec or the config), which saves about a sixth of the CPU of a proxied call."""
    return H2Configuration(
        client_side=client_side, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
    )


Handler = Callable[[Request, "Stream"], Awaitable[None]]


class Stream:
    """One request's response on its HTTP/2 stream (the `Responding` the proxy writes to):
    `:status` and lower-case headers less the connection-specific ones, then DATA held here
    and sent no faster than the client's windows allow. Ending early (`abort`) resets the
    stream with NO_ERROR, as Envoy does. The stream's life on the connection (the request,
    its window, its end) is its `lifecycle`'s."""

    __slots__ = (
        "_conn", "_end_pending", "_ended", "_head_request", "_out", "_out_size", "_trailers", "_waiter", "bytes_sent",
        "closed", "head_sent", "id", "lifecycle", "status",
    )  # fmt: skip

    def __init__(self, conn: Http2Downstream, stream_id: int, lifecycle: StreamLifecycle) -> None:
        self._conn = conn
        self.id = stream_id
        self.lifecycle = lifecycle
        self._head_request = lifecycle.request.method == b"HEAD"
        self._out: collections.deque[bytes] = collections.deque()
        self._out_size = 0
        self._end_pending = False
        self._ended = False
        self._trailers: HeaderList | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        """Nothing more goes out: the stream ended, was reset, or the connection is gone."""
        self.head_sent = False
        self.status = 0
        self.bytes_sent = 0

    # ---- Responding

    def send_head(self, status: int, headers: HeaderList, length: int | None, *, reason_phrase: bytes = b"") -> None:
        self._head(status, headers, length, end=False)

    def send_whole(
        self, status: int, headers: HeaderList, length: int | None, body: bytes, *, reason_phrase: bytes = b""
    ) -> None:
        if self._head_request:
            body = b""
        self._head(status, headers, length, end=not body)
        self._ended = True
        if body:
            self.bytes_sent += len(body)
            self._queue(body)
            self._end_pending = True
            self.pump()

    def _head(self, status: int, headers: HeaderList, length: int | None, *, end: bool) -> None:
        self.status = status
        self.head_sent = True
        if self.closed:
            return
        fields = [(b":status", b"%d" % status)]
        for name, value in headers:
            name = name.lower()
            if name not in FRAMING_HEADERS:
                fields.append((name, value))
        if length is not None:
            fields.append((b"content-length", b"%d" % length))
        self._conn.h2.send_headers(self.id, fields, end_stream=end)
        if end:
            self.lifecycle.finished()
        self._conn.flush_soon()

    def send(self, data: bytes) -> None:
        if not data or self._head_request:
            return
        self.bytes_sent += len(data)
        if not self.closed:
            self._queue(data)
            self.pump()

    def end(self, trailers: HeaderList | None = None) -> None:
        """End the stream after the body held, with `trailers` (gRPC's `grpc-status`) if given."""
        if self._ended:
            return
        self._ended = True
        self._trailers = trailers
        self._end_pending = True
        self.pump()

    def abort(self) -> None:
        """Reset the stream mid-response (the upstream died after the head was sent)."""
        self._ended = True
        self.lifecycle.reset(ErrorCodes.NO_ERROR)

    def reply(self, status: int, body: bytes = b"", headers: HeaderList | None = None) -> None:
        """A whole local reply, with Envoy's headers for one."""
        self.send_whole(status, local_reply_headers(body, headers), len(body), body)

    async def drain(self) -> None:
        while self.blocked:
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def blocked(self) -> bool:
        """The client reads slower than the proxy writes: its window, or the socket, is full."""
        return not self.closed and (self._out_size > OUT_HIGH_WATER or self._conn.write_paused)

    def set_producer(self, producer: asyncio.BaseTransport | None) -> None:
        """Nothing to do: `drain` waits on this stream's window, which paces the upstream."""

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def peer(self) -> str:
        return self._conn.peer_text

    @property
    def connection(self) -> Http2Downstream:
        return self._conn

    # ---- the wire

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)

    def pump(self) -> None:
        """Send what the windows allow of the held body, and the end of the stream after it."""
        if self.closed:
            return
        h2 = self._conn.h2
        out = self._out
        carried = False
        while out:
            room = min(h2.local_flow_control_window(self.id), h2.max_outbound_frame_size)
            if room <= 0:
                break
            chunk = out[0]
            if len(chunk) > room:
                out[0] = chunk[room:]
                chunk = chunk[:room]
            else:
                out.popleft()
            self._out_size -= len(chunk)
            carried = self._end_pending and not out and self._trailers is None
            h2.send_data(self.id, chunk, end_stream=carried)
        if self._end_pending and not out:
            if self._trailers is not None:
                h2.send_headers(self.id, self._trailers, end_stream=True)
            elif not carried:
                h2.end_stream(self.id)
            self.lifecycle.finished()
        self._conn.flush_soon()
        if self._out_size <= OUT_HIGH_WATER:
            self.wake()

    def close(self) -> None:
        """Nothing more goes out: what is held is dropped, and a `drain` waiting returns."""
        self.closed = True
        self._out.clear()
        self._out_size = 0
        self.wake()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("ended" if self._ended else "open")
        return f"<Stream {self.id} {state} status={self.status} held={self._out_size}>"


class StreamLifecycle:
    """One HTTP/2 stream on its connection, from the client's HEADERS to its end: the
    `request` it carries (its body's window handed back to the client as the proxy reads it),
    the `stream` its response goes out on, the `task` serving it, and its end: finished,
    reset, or gone with the client or the connection."""

    __slots__ = ("_acked", "_conn", "id", "request", "stream", "task")

    def __init__(self, conn: Http2Downstream, stream_id: int, method: bytes, path: bytes, headers: HeaderList) -> None:
        self._conn = conn
        self.id = stream_id
        self.request = Request(method, path, headers, Body(self.consumed, conn.loop), VERSION)
        self._acked = 0
        self.stream = Stream(conn, stream_id, self)
        self.task: asyncio.Task[None] | None = None

    def consumed(self) -> None:
        """The proxy read some of the request body: hand that much window back to the client."""
        body = self.request.body
        taken = body.received - body.buffered - self._acked
        if taken > 0:
            self._acked += taken
            self._conn.acknowledge(self.id, taken)

    def reset(self, code: ErrorCodes) -> None:
        """End the stream abruptly: RST_STREAM with `code`, anything held is dropped."""
        if not self.stream.closed:
            self._conn.h2.reset_stream(self.id, code)
            self._conn.flush_soon()
            self.finished(reset=True)

    def finished(self, *, reset: bool = False) -> None:
        """Nothing more goes out on this stream. A request body still arriving is refused
        (RST_STREAM NO_ERROR, as RFC 9113 §8.1 allows once the response is complete) and
        what of it was never read is handed back to the connection's window."""
        if not self.request.body.complete and not reset:
            self._conn.h2.reset_stream(self.id, ErrorCodes.NO_ERROR)
        self.gone("the response ended before the request body")

    def gone(self, why: str) -> None:
        """The stream is over for the proxy: nothing more goes out, a request body still
        awaited fails with `why`, and what of it was never read is handed back to the
        connection's window."""
        self.stream.close()
        body = self.request.body
        if not body.complete:
            body.fail(ConnectionResetError(why))
        unread = body.received - self._acked
        if unread > 0:
            self._acked += unread
            self._conn.acknowledge(self.id, unread)
        self._conn.stream_closed(self)

    def __repr__(self) -> str:
        return f"<StreamLifecycle {self.id} acked={self._acked} {self.stream!r}>"


class Http2Connection(asyncio.Protocol):
    """What both ends of an HTTP/2 connection share: the `h2` state machine, opened with its
    SETTINGS and a connection window of CONNECTION_WINDOW; what arrives handed to `event`
    frame by frame (a frame h2 refuses closes the connection); what h2 frames written at the
    end of a pass of the loop, every stream's together."""

    def __init__(self, h2: H2Connection) -> None:
        self.loop = asyncio.get_running_loop()
        self.h2 = h2
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self._flush_pending = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's subclasses
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - self.h2.inbound_flow_control_window)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except H2Error:
            self.flush()
            self.close()
            return
        for event in events:
            self.event(event)
        self.flush()

    def pause_writing(self) -> None:
        self.write_paused = True

    def event(self, event: Event) -> None:
        """One h2 event of what arrived."""
        raise NotImplementedError

    def close(self) -> None:
        """GOAWAY, then close."""
        raise NotImplementedError

    def flush_soon(self) -> None:
        """Write what h2 has framed at the end of this pass of the loop."""
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        data = self.h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)


class Http2Downstream(Http2Connection):
    """One HTTP/2 client connection: its streams are served concurrently, each in its own
    task; a stream the client resets is cancelled (`DC`); closing sends GOAWAY."""

    def __init__(
        self,
        handler: Handler,
        on_close: Callable[[Http2Downstream], None] | None = None,
        limits: ConnectionLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(H2Connection(config=h2_config(client_side=False)))
        self._handler = handler
        self._on_close = on_close
        self._limits = limits
        self.h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
            },
        )
        self.h2.decoder.max_header_list_size = limits.max_header_bytes
        self._streams: dict[int, StreamLifecycle] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.peer_text = ":0"
        """`host:port` of the peer, as the access log and x-forwarded-for write it."""
        self.extra: dict[str, Any] = {}

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ":0"
        super().connection_made(transport)
        self._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for lifecycle in list(self._streams.values()):
            self._gone(lifecycle, "downstream closed the connection")
        if self._on_close is not None:
            self._on_close(self)

    def resume_writing(self) -> None:
        self.write_paused = False
        for lifecycle in self._streams.values():
            lifecycle.stream.wake()

    # ---- h2 events

    def event(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            lifecycle = self._streams.get(event.stream_id or 0)
            data = event.data or b""
            padding = (event.flow_controlled_length or 0) - len(data)
            if padding:
                self.acknowledge(event.stream_id or 0, padding)
            if lifecycle is None:
                self.acknowledge(event.stream_id or 0, len(data))
            elif data:
                lifecycle.request.body.feed(data)
        elif isinstance(event, StreamEnded):
            lifecycle = self._streams.get(event.stream_id or 0)
            if lifecycle is not None:
                lifecycle.request.body.finish()
        elif isinstance(event, RequestReceived):
            self._request(event)
        elif isinstance(event, WindowUpdated):
            if event.stream_id:
                lifecycle = self._streams.get(event.stream_id)
                if lifecycle is not None:
                    lifecycle.stream.pump()
            else:
                self._pump_all()
        elif isinstance(event, RemoteSettingsChanged):
            self._pump_all()
        elif isinstance(event, StreamReset):
            lifecycle = self._streams.get(event.stream_id or 0)
            if lifecycle is not None:
                self._gone(lifecycle, "downstream reset the stream")
        elif isinstance(event, ConnectionTerminated):
            self.close()

    def _request(self, event: RequestReceived) -> None:
        """A new stream: its pseudo-headers become the request line, `:authority` the Host."""
        stream_id = event.stream_id or 0
        method = path = authority = b""
        headers: HeaderList = []
        for raw_name, raw_value in event.headers or ():
            name, value = bytes(raw_name), bytes(raw_value)
            if name[:1] != b":":
                headers.append((name, value))
            elif name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
        if authority:
            headers = [(b"host", authority), *(header for header in headers if header[0] != b"host")]
        lifecycle = StreamLifecycle(self, stream_id, method, path, headers)
        self._streams[stream_id] = lifecycle
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lifecycle.task = self.loop.create_task(self._serve(lifecycle))

    def _gone(self, lifecycle: StreamLifecycle, why: str) -> None:
        """The client reset the stream or left: stop its proxying (`DC`)."""
        lifecycle.gone(why)
        task = lifecycle.task
        if task is not None and not task.done():
            task.cancel()

    def _pump_all(self) -> None:
        for lifecycle in list(self._streams.values()):
            lifecycle.stream.pump()

    # ---- serving

    async def _serve(self, lifecycle: StreamLifecycle) -> None:
        stream = lifecycle.stream
        try:
            await self._handler(lifecycle.request, stream)
        except asyncio.CancelledError:
            raise
        except Exception:
            if not stream.head_sent:
                stream.reply(500, b"internal error in minimesh")
            else:
                stream.abort()
            raise
        if not stream.ended:
            stream.end()

    def stream_closed(self, lifecycle: StreamLifecycle) -> None:
        """The stream is over; the connection idles once it has none open."""
        if self._streams.pop(lifecycle.id, None) is not None and not self._streams:
            self._idle()

    def acknowledge(self, stream_id: int, size: int) -> None:
        if not self.closing:
            self.h2.acknowledge_received_data(size, stream_id)
            self.flush_soon()

    # ---- idle timeout and closing

    def _idle(self) -> None:
        if not self.closing and self._timer is None:
            self._timer = self.loop.call_later(self._limits.idle_timeout, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if not self._streams:
            self.close()

    def close(self) -> None:
        """GOAWAY, then close; the streams still open are cancelled (h2 sends nothing more
        once either side sent GOAWAY)."""
        if self.closing:
            return
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for lifecycle in list(self._streams.values()):
            self._gone(lifecycle, "the connection is closing")
        transport = self.transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(ProtocolError):  # h2 already sent one (a protocol error, the client's GOAWAY)
                self.h2.close_connection()
            self.flush()
            transport.close()

    def __repr__(self) -> str:
        state = "closing" if self.closing else "open"
        return f"<Http2Downstream {self.peer_text} {state} streams={len(self._streams)}>"
