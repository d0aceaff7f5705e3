"""One HTTP/2 downstream stream in memory, an `h2` client on the other side of a fake
transport: its `StreamLifecycle` (the request body's window handed back as the proxy reads
it; a response that ends first refuses the rest of the body; a client reset fails the
awaited body and cancels the handler) and its `Stream` (a body past the
client's window is held until the window opens, then the stream ends)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, Event, ResponseReceived, StreamEnded, StreamReset, WindowUpdated
from h2.settings import SettingCodes

from minimesh.dataplane.http1 import READ_HIGH_WATER, Request
from minimesh.dataplane.http2 import Http2Downstream, Stream
from tests.clocks import on_virtual_time, settle

REQUEST = [(b":method", b"POST"), (b":path", b"/upload"), (b":scheme", b"http"), (b":authority", b"web")]


class Transport:
    """What the connection writes, kept for the client to read."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class Client:
    """An `h2` client talking to one `Http2Downstream` whose handler is `handler`; `connect`
    exchanges the prefaces and settings, and forgets the events they made."""

    def __init__(self, handler: Callable[[Request, Stream], Awaitable[None]], window: int = 65535) -> None:
        self.transport = Transport()
        self.server = Http2Downstream(handler)
        self.server.connection_made(cast(asyncio.BaseTransport, self.transport))
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.events: list[Event] = []

    async def connect(self) -> Client:
        await self.send()
        self.events.clear()
        return self

    async def send(self) -> None:
        """Hand the server what the client framed, and let both sides run."""
        self.server.data_received(self.h2.data_to_send())
        await self.receive()

    async def receive(self) -> None:
        await settle()
        data, self.transport.written = bytes(self.transport.written), bytearray()
        self.events += self.h2.receive_data(data)
        if outgoing := self.h2.data_to_send():
            self.server.data_received(outgoing)
            await settle()

    def of(self, kind: type[Event], stream_id: int) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind) and event.stream_id == stream_id]


@on_virtual_time
async def test_the_request_body_window_is_handed_back_as_the_proxy_reads_it() -> None:
    sent = READ_HIGH_WATER + (1 << 16)
    read: list[int] = []
    proceed = asyncio.Event()

    async def handler(request: Request, stream: Stream) -> None:
        await proceed.wait()
        while sum(read) < sent:
            read.append(len(await request.body.read()))
        stream.reply(200)

    client = await Client(handler).connect()
    client.h2.send_headers(1, REQUEST)
    for _ in range(sent // (1 << 14)):
        client.h2.send_data(1, b"x" * (1 << 14))
    await client.send()
    assert client.of(WindowUpdated, 1) == [], "nothing read yet: no window back"
    proceed.set()
    await client.receive()
    assert sum(read) == sent
    assert 0 < sum(event.delta for event in client.of(WindowUpdated, 1)) <= sent
    assert client.of(ResponseReceived, 1) and client.of(StreamEnded, 1)


@on_virtual_time
async def test_a_response_that_ends_before_the_request_body_refuses_the_rest() -> None:
    async def handler(request: Request, stream: Stream) -> None:
        stream.reply(413)

    client = await Client(handler).connect()
    client.h2.send_headers(1, REQUEST)
    client.h2.send_data(1, b"y" * 500)
    await client.send()
    assert [dict(event.headers)[b":status"] for event in client.of(ResponseReceived, 1)] == [b"413"]
    assert [event.error_code for event in client.of(StreamReset, 1)] == [ErrorCodes.NO_ERROR]
    assert client.server._streams == {}


@on_virtual_time
async def test_a_client_reset_fails_the_awaited_body_and_cancels_the_handler() -> None:
    outcome: list[str] = []

    async def handler(request: Request, stream: Stream) -> None:
        try:
            while await request.body.read():
                pass
        except ConnectionResetError as exc:
            outcome.append(str(exc))
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    client = await Client(handler).connect()
    client.h2.send_headers(1, REQUEST)
    await client.send()
    client.h2.reset_stream(1, ErrorCodes.CANCEL)
    await client.send()
    assert outcome == ["cancelled"]
    assert client.server._streams == {}


@on_virtual_time
async def test_a_body_past_the_client_window_is_held_until_the_window_opens() -> None:
    streams: list[Stream] = []

    async def handler(request: Request, stream: Stream) -> None:
        streams.append(stream)
        stream.send_head(200, [], 300)
        stream.send(b"z" * 300)
        stream.end()

    client = await Client(handler, window=100).connect()
    client.h2.send_headers(1, REQUEST, end_stream=True)
    await client.send()
    got = b"".join(event.data for event in client.of(DataReceived, 1))
    assert got == b"z" * 100 and not client.of(StreamEnded, 1)
    assert not streams[0].closed and repr(streams[0]).endswith("held=200>")
    client.h2.increment_flow_control_window(200, stream_id=1)
    client.h2.increment_flow_control_window(200)
    await client.send()
    assert b"".join(event.data for event in client.of(DataReceived, 1)) == b"z" * 300
    assert client.of(StreamEnded, 1) and streams[0].closed
