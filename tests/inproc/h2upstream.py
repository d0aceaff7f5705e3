"""A small HTTP/2 upstream (h2c, prior knowledge) for the proxy tests, driven by the h2 library:
it records every request with the connection it came on, answers as its `reply` script says
(status, headers, body sent within the proxy's windows, trailers), and can reset a stream
(RST_STREAM REFUSED_STREAM or another code), send GOAWAY after a given stream, hold answers
until released, or limit its concurrent streams. `grpcio_app` serves a real grpcio server in
its place.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import grpc
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame


@dataclass(frozen=True, slots=True)
class H2Reply:
    """How the upstream answers one request; `echo` sends the request body back; `reset`
    answers with RST_STREAM of that code instead, or, with `reset_after_head`, after the head
    and the body (the stream then never ends); `hold` holds the whole answer until released,
    `hold_end` only its end (after the head and the body)."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    trailers: tuple[tuple[str, str], ...] = ()
    reset: ErrorCodes | None = None
    reset_after_head: bool = False
    hold: bool = False
    hold_end: bool = False
    echo: bool = False


@dataclass(slots=True)
class H2Seen:
    """One request as the upstream got it: pseudo-headers among `headers`; `reset`, the code
    of the RST_STREAM the proxy sent on it, if it did."""

    headers: dict[str, str]
    connection: int
    stream_id: int
    body: bytes = b""
    ended: bool = False
    pairs: list[tuple[str, str]] = field(default_factory=list)
    reset: int | None = None

    @property
    def path(self) -> str:
        return self.headers[":path"]


class _ServerConnection(asyncio.Protocol):
    def __init__(self, backend: H2Backend, number: int) -> None:
        self.backend = backend
        self.number = number
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        if backend.max_streams is not None:
            initial = {SettingCodes.MAX_CONCURRENT_STREAMS: backend.max_streams}
            self.h2.local_settings = Settings(client=False, initial_values=initial)
        self.transport: asyncio.Transport | None = None
        self.seen: dict[int, H2Seen] = {}
        self.started = 0
        self.window = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.backend.connections.append(self)
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend.open.discard(self)
        for task in self.tasks:
            task.cancel()
        self.window.set()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except H2Error:
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            self._event(event)
        self.flush()

    def _event(self, event: object) -> None:
        if isinstance(event, RequestReceived):
            self._request(event)
        elif isinstance(event, DataReceived):
            seen = self.seen.get(event.stream_id or 0)
            if seen is not None:
                seen.body += event.data or b""
            self.h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id or 0)
        elif isinstance(event, StreamEnded):
            seen = self.seen.get(event.stream_id or 0)
            if seen is not None:
                seen.ended = True
                self._answer(seen)
        elif isinstance(event, WindowUpdated | StreamReset | ConnectionTerminated):
            if isinstance(event, StreamReset) and (seen := self.seen.get(event.stream_id or 0)) is not None:
                seen.reset = event.error_code
            self.window.set()

    def _request(self, event: RequestReceived) -> None:
        pairs = [(bytes(n).decode(), bytes(v).decode("latin-1")) for n, v in event.headers or ()]
        seen = H2Seen(dict(pairs), self.number, event.stream_id or 0, pairs=pairs)
        self.started += 1
        backend = self.backend
        if backend.goaway_after is not None and self.started > backend.goaway_after:
            return  # above the GOAWAY's last stream id: never processed
        backend.seen.append(seen)
        self.seen[seen.stream_id] = seen
        if backend.goaway_after is not None and self.started == backend.goaway_after:
            frame = GoAwayFrame(0)
            frame.last_stream_id = seen.stream_id
            self.flush()
            if self.transport is not None:
                self.transport.write(frame.serialize())

    def _answer(self, seen: H2Seen) -> None:
        reply = self.backend.next_reply(seen)
        if reply.reset is not None and not reply.reset_after_head:
            self.h2.reset_stream(seen.stream_id, reply.reset)
            return
        task = asyncio.get_running_loop().create_task(self._send(seen, reply))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, seen: H2Seen, reply: H2Reply) -> None:
        if reply.hold:
            await self.backend.released.wait()
        body = seen.body if reply.echo else reply.body if reply.body is not None else self.backend.name.encode()
        headers = [(":status", str(reply.status)), *reply.headers]
        try:
            self.h2.send_headers(seen.stream_id, [(n.encode(), v.encode()) for n, v in headers])
            while body:
                room = min(self.h2.local_flow_control_window(seen.stream_id), self.h2.max_outbound_frame_size)
                if room <= 0:
                    self.window.clear()
                    self.flush()
                    await self.window.wait()
                    continue
                self.h2.send_data(seen.stream_id, body[:room])
                body = body[room:]
            if reply.hold_end:
                self.flush()
                await self.backend.released.wait()
            if reply.reset is not None:
                self.h2.reset_stream(seen.stream_id, reply.reset)
            elif reply.trailers:
                self.h2.send_headers(
                    seen.stream_id, [(n.encode(), v.encode()) for n, v in reply.trailers], end_stream=True
                )
            else:
                self.h2.end_stream(seen.stream_id)
        except H2Error:
            return
        self.flush()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class H2Backend:
    """An HTTP/2 upstream on 127.0.0.1; `replies` are used in order, then `reply`."""

    def __init__(
        self,
        name: str,
        reply: H2Reply | Callable[[H2Seen], H2Reply] = H2Reply(),
        *,
        max_streams: int | None = None,
        goaway_after: int | None = None,
    ) -> None:
        self.name = name
        self.reply = reply
        self.replies: list[H2Reply] = []
        self.max_streams = max_streams
        self.goaway_after = goaway_after
        self.labels: dict[str, str] = {}
        self.seen: list[H2Seen] = []
        self.connections: list[_ServerConnection] = []
        self.open: set[_ServerConnection] = set()
        self.released = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    def next_reply(self, seen: H2Seen) -> H2Reply:
        if self.replies:
            return self.replies.pop(0)
        return self.reply(seen) if callable(self.reply) else self.reply

    def _connection(self) -> _ServerConnection:
        conn = _ServerConnection(self, len(self.connections))
        self.open.add(conn)
        return conn

    async def start(self) -> H2Backend:
        self._server = await asyncio.get_running_loop().create_server(self._connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.released.set()
        for conn in list(self.open):
            conn.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()

    def __repr__(self) -> str:
        return f"<H2Backend {self.name} :{self.port} seen={len(self.seen)} connections={len(self.connections)}>"


@contextlib.asynccontextmanager
async def grpcio_app(service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> AsyncIterator[H2Backend]:
    """A real grpcio server on 127.0.0.1 with `handlers` for `service`'s methods, standing as
    the backend `app` a mesh routes to (only its port is used)."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    app = H2Backend("app")
    app.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield app
    finally:
        await server.stop(None)
