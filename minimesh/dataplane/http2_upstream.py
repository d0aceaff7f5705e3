"""HTTP/2 upstream (h2c with prior knowledge), framed by the sans-IO `h2` library: one
connection to an endpoint carries many requests at once, one stream each, whose responses
stream back as `UpstreamResponse`s. Flow control is honoured both ways; GOAWAY and
RST_STREAM end streams as Envoy's codec reports them (`StreamRefused`, `StreamReset`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings

from minimesh.dataplane.http1 import Body, UpstreamClosed, UpstreamResponse
from minimesh.dataplane.http2 import STREAM_WINDOW, Http2Connection, h2_config
from minimesh.routing.headers import HeaderList


class StreamRefused(Exception):
    """The upstream refused a stream before its response: RST_STREAM REFUSED_STREAM, or a
    GOAWAY whose last stream id is below it. Nothing of it was processed (Envoy's
    `remote refused stream reset`)."""


class StreamResetByPeer(Exception):
    """The upstream reset a stream before its response head with another code (Envoy's `remote reset`)."""


def _fields(headers: object) -> HeaderList:
    return [(bytes(name), bytes(value)) for name, value in headers or ()]  # type: ignore[attr-defined]


class UpstreamStream:
    """One request on an HTTP/2 upstream connection: its head awaited, its body sent within the
    upstream's windows, its response's body acknowledged to the upstream as the proxy reads
    it (so a slow client paces the upstream). `close` abandons it (RST_STREAM CANCEL)."""

    __slots__ = ("_acked", "_waiter", "conn", "done", "head", "id", "response", "sender")

    def __init__(self, conn: Http2Upstream, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.head: asyncio.Future[UpstreamResponse] = conn.loop.create_future()
        self.response: UpstreamResponse | None = None
        self.sender: asyncio.Task[None] | None = None
        self.done = False
        self._acked = 0
        self._waiter: asyncio.Future[None] | None = None

    # ---- ResponseSource

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.conn.loop

    @property
    def transport(self) -> asyncio.Transport | None:
        return None

    def resume(self) -> None:
        """The proxy read some of the response body: hand that much window back."""
        response = self.response
        if response is None:
            return
        body = response.body
        taken = body.received - body.buffered - self._acked
        if taken > 0:
            self._acked += taken
            self.conn.acknowledge(self.id, taken)

    def close(self) -> None:
        """Abandon the stream (the client left, a timeout, a retry): RST_STREAM CANCEL."""
        if not self.done:
            self.conn.reset(self.id)
            self.finish(UpstreamClosed("the proxy reset the stream", before_headers=not self.head.done()))

    # ---- the response

    def head_received(self, headers: object) -> None:
        """The response head, as h2 gives it: `:status`, then the fields as bytes."""
        status = 0
        fields: HeaderList = []
        for raw_name, raw_value in headers or ():  # type: ignore[attr-defined]
            name, value = bytes(raw_name), bytes(raw_value)
            if name == b":status":
                status = int(value)
            elif name[:1] != b":":
                fields.append((name, value))
        response = self.response = UpstreamResponse(self, status, b"", fields)
        if not self.head.done():
            self.head.set_result(response)

    def received(self, data: bytes) -> bool:
        """Body bytes in; False when nothing awaits them (their window goes straight back)."""
        response = self.response
        if response is None or response.body.complete:
            return False
        if data:
            response.body.feed(data)
        return True

    # ---- the request body

    async def send_body(self, body: Body | bytes) -> None:
        """Send the request body no faster than the upstream's windows allow, then END_STREAM.
        A body that fails (the client left) resets the stream."""
        try:
            if isinstance(body, bytes):
                await self._send(body, end=True)
                return
            while chunk := await body.read():
                await self._send(chunk, end=False)
            await self._send(b"", end=True)
        except (OSError, UpstreamClosed, H2Error):
            self.close()

    async def _send(self, data: bytes, *, end: bool) -> None:
        h2 = self.conn.h2
        while data:
            if self.done:
                return
            room = min(h2.local_flow_control_window(self.id), h2.max_outbound_frame_size)
            if room <= 0 or self.conn.write_paused:
                await self.wait()
                continue
            chunk, data = data[:room], data[room:]
            h2.send_data(self.id, chunk, end_stream=end and not data)
            self.conn.flush_soon()
            if end and not data:
                return
        if end and not self.done:
            h2.end_stream(self.id)
            self.conn.flush_soon()

    async def wait(self) -> None:
        self._waiter = self.conn.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- the end

    def finish(self, error: BaseException | None = None) -> None:
        """The stream is over: a head still awaited gets `error`, a body still arriving fails
        with it (or ends, without one); the request body stops."""
        if self.done:
            return
        self.done = True
        self.wake()
        head = self.head
        if not head.done():
            head.set_exception(error or UpstreamClosed("upstream ended the stream", before_headers=True))
        response = self.response
        if response is not None and not response.body.complete:
            if error is None:
                response.body.finish()
            else:
                reason = error.reason if isinstance(error, UpstreamClosed) else "remote_reset"
                response.body.fail(UpstreamClosed(str(error), before_headers=False, reason=reason))
        sender = self.sender
        if sender is not None and not sender.done() and sender is not asyncio.current_task():
            sender.cancel()
            self.conn.reset(self.id)
        self.conn.stream_done(self)

    def __repr__(self) -> str:
        return f"<UpstreamStream {self.id} {'done' if self.done else 'open'}>"


class Http2Upstream(Http2Connection):
    """One HTTP/2 connection to an endpoint. `ready` resolves once the upstream's SETTINGS
    are in (its concurrency limit known). It takes no new stream once `draining`: after a
    GOAWAY, or `max_requests` streams (`maxRequestsPerConnection`), and closes when its
    last stream ends; losing it fails every stream it carries (`connection termination`)."""

    def __init__(
        self, on_lost: Callable[[Http2Upstream], None], max_requests: int = 0, on_free: Callable[[], None] | None = None
    ) -> None:
        super().__init__(H2Connection(config=h2_config(client_side=True)))
        self.h2.local_settings = Settings(
            client=True, initial_values={SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW, SettingCodes.ENABLE_PUSH: 0}
        )
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.ready.add_done_callback(lambda future: future.cancelled() or future.exception())
        self.streams: dict[int, UpstreamStream] = {}
        self.started = 0
        self.draining = False
        self.closed = False
        self.waiting = 0
        """Requests waiting for `ready` to start a stream here."""
        self.opening: asyncio.Task[None] | None = None
        self._on_lost: Callable[[Http2Upstream], None] | None = on_lost
        self._max_requests = max_requests
        self._on_free = on_free
        """Called as each stream ends: a request waiting for a slot may take one."""

    def takes(self, limit: int) -> bool:
        """Whether a new stream may start here now, within `limit` concurrent streams
        (`maxConcurrentStreams`) and the upstream's own SETTINGS_MAX_CONCURRENT_STREAMS."""
        if self.draining or self.closed or not self.ready.done() or self.ready.exception() is not None:
            return False
        return len(self.streams) < min(limit, self.h2.remote_settings.max_concurrent_streams)

    # ---- asyncio.Protocol

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()

    def lost(self) -> None:
        """The connection is gone (or never came): every stream on it fails, once."""
        self.closed = True
        self.draining = True
        error = UpstreamClosed("upstream closed the connection", before_headers=True)
        if not self.ready.done():
            self.ready.set_exception(error)
        for stream in list(self.streams.values()):
            stream.finish(error)
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost(self)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_all()

    # ---- h2 events

    def event(self, event: Event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, DataReceived):
            data = event.data or b""
            padding = (event.flow_controlled_length or 0) - len(data)
            if padding:
                self.acknowledge(event.stream_id or 0, padding)
            if stream is None or not stream.received(data):
                self.acknowledge(event.stream_id or 0, len(data))
        elif isinstance(event, ResponseReceived) and stream is not None:
            stream.head_received(event.headers)
        elif isinstance(event, TrailersReceived) and stream is not None and stream.response is not None:
            stream.response.trailers = _fields(event.headers)
        elif isinstance(event, StreamEnded) and stream is not None:
            stream.finish()
        elif isinstance(event, StreamReset) and stream is not None:
            refused = event.error_code == ErrorCodes.REFUSED_STREAM
            stream.finish(StreamRefused("upstream refused the stream") if refused else StreamResetByPeer(str(event)))
        elif isinstance(event, WindowUpdated):
            if stream is not None:
                stream.wake()
            elif not event.stream_id:
                self._wake_all()
        elif isinstance(event, RemoteSettingsChanged):
            if not self.ready.done():
                self.ready.set_result(None)
            self._wake_all()
        elif isinstance(event, ConnectionTerminated):
            self._goaway(event.last_stream_id or 0)

    def _goaway(self, last_stream_id: int) -> None:
        """The upstream sent GOAWAY: streams above `last_stream_id` were never processed (they
        fail as refused, safe to retry); the rest finish; no new stream starts here.

        h2 takes a GOAWAY for the end of the whole connection and refuses every frame after
        it; RFC 9113 §6.8 (and Envoy) let the streams it spared finish, so the connection's
        state is set back to open for them."""
        self.draining = True
        self.h2.state_machine.state = ConnectionState.CLIENT_OPEN
        for stream in [s for s in self.streams.values() if s.id > last_stream_id]:
            stream.finish(StreamRefused("upstream sent GOAWAY below the stream"))
        if not self.streams:
            self.close()

    def _wake_all(self) -> None:
        for stream in self.streams.values():
            stream.wake()

    # ---- streams

    async def exchange(self, fields: HeaderList, body: Body | bytes) -> UpstreamResponse:
        """Start a stream with the request head `fields` and send `body` beside it (a
        bidirectional stream gets its response head before its request ends); the response
        once its head is in. Cancelled, the stream is reset; a head h2 will not send (a
        header HTTP/2 forbids) raises its H2Error."""
        stream_id = self.h2.get_next_available_stream_id()
        stream = UpstreamStream(self, stream_id)
        self.streams[stream_id] = stream
        self.started += 1
        if self._max_requests and self.started >= self._max_requests:
            self.draining = True
        empty = isinstance(body, bytes) and not body
        try:
            self.h2.send_headers(stream_id, fields, end_stream=empty)
        except H2Error:
            del self.streams[stream_id]
            raise
        self.flush_soon()
        if not empty and not self._sent_whole(stream_id, body):
            stream.sender = self.loop.create_task(stream.send_body(body))
        try:
            return await stream.head
        except asyncio.CancelledError:
            stream.close()
            raise

    def _sent_whole(self, stream_id: int, body: Body | bytes) -> bool:
        """Send a buffered body that the windows take in one frame beside its head, with
        END_STREAM (a unary gRPC call: no task, no pass of the loop); False for any other."""
        if not isinstance(body, bytes) or self.write_paused:
            return False
        h2 = self.h2
        if len(body) > min(h2.local_flow_control_window(stream_id), h2.max_outbound_frame_size):
            return False
        h2.send_data(stream_id, body, end_stream=True)
        return True

    def stream_done(self, stream: UpstreamStream) -> None:
        if self.streams.pop(stream.id, None) is None:
            return
        if self.draining and not self.streams:
            self.close()
        if self._on_free is not None:
            self._on_free()

    def acknowledge(self, stream_id: int, size: int) -> None:
        if not self.closed:
            self.h2.acknowledge_received_data(size, stream_id)
            self.flush_soon()

    def reset(self, stream_id: int) -> None:
        if not self.closed:
            with contextlib.suppress(H2Error):
                self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
            self.flush_soon()

    def close(self) -> None:
        """GOAWAY, then close (the streams still open fail as the connection goes)."""
        self.draining = True
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(H2Error):
                self.h2.close_connection()
            self.flush()
            self.transport.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "draining" if self.draining else "open"
        return f"<Http2Upstream {state} streams={len(self.streams)} started={self.started}>"
