"""A streamed body (`minimesh.dataplane.http1.Body`) read to its end, as the unit tests check it."""

from __future__ import annotations

from minimesh.dataplane.http1 import Body


async def whole(body: Body) -> bytes:
    """`body` read to its end, chunk by chunk."""
    parts = []
    while chunk := await body.read():
        parts.append(chunk)
    return b"".join(parts)
