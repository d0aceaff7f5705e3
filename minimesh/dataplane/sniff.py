"""Protocol detection from a client's first bytes, as Envoy's http_inspector and
tls_inspector do it: an HTTP/1.x request line, the HTTP/2 preface, a TLS ClientHello (and
the SNI it carries), or anything else (TCP). Pure: bytes in, a verdict out.
"""

from __future__ import annotations

import re
from typing import Literal

Sniffed = Literal["http1", "http2", "tls", "tcp"]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_REQUEST_LINE = 8192
"""A request line longer than this is not read as HTTP (Envoy's inspector reads at most 8 KiB)."""
MAX_CLIENT_HELLO = 16384 + 5
"""One TLS record: a ClientHello that does not fit is TLS without an SNI we can read."""
DETECTION_TIMEOUT = 1.0
"""How long a connection on a port of undeclared protocol waits for its client's first bytes
before it is proxied as TCP (so a server-first protocol such as MySQL still works)."""

_METHOD = re.compile(rb"[A-Z][A-Z_-]{0,23}")
_REQUEST_LINE = re.compile(rb"[A-Z][A-Z_-]{0,23} [^ \r\n]+ HTTP/1\.[01]\r?\n")
_TLS_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000


def sniff(data: bytes) -> Sniffed | None:
    """What the connection speaks, or None while `data` is too short to tell."""
    if not data:
        return None
    if data[0] == _TLS_HANDSHAKE:
        return "tls" if len(data) < 2 or data[1] == 3 else "tcp"
    preface = h2_preface(data)
    if preface is not False:
        return "http2" if preface else None
    space = data.find(b" ")
    if space < 0:
        return None if len(data) <= 24 and _METHOD.fullmatch(data) else "tcp"
    if not _METHOD.fullmatch(data[:space]):
        return "tcp"
    end = data.find(b"\n")
    if end < 0:
        return None if len(data) < MAX_REQUEST_LINE and b"\r" not in data[:-1] else "tcp"
    return "http1" if _REQUEST_LINE.fullmatch(data[: end + 1]) else "tcp"


def h2_preface(data: bytes) -> bool | None:
    """Does `data` start with the HTTP/2 connection preface (prior knowledge)? None while
    it is a prefix of the preface, too short to tell."""
    if not H2_PREFACE.startswith(data[: len(H2_PREFACE)]):
        return False
    return True if len(data) >= len(H2_PREFACE) else None


def server_name(data: bytes) -> str | Literal[False] | None:
    """The SNI of the TLS ClientHello that `data` starts with: the name, None when it
    carries none (or cannot be read), False while the record is still incomplete."""
    if len(data) < 5:
        return False
    length = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + length:
        return False if 5 + length <= MAX_CLIENT_HELLO else None
    try:
        return _sni(memoryview(data)[5 : 5 + length])
    except IndexError:
        return None


def _sni(hello: memoryview) -> str | None:
    if hello[0] != _CLIENT_HELLO:
        return None
    at = 4 + 2 + 32  # handshake header, client_version, random
    at += 1 + hello[at]  # session_id
    at += 2 + int.from_bytes(hello[at : at + 2], "big")  # cipher_suites
    at += 1 + hello[at]  # compression_methods
    if at + 2 > len(hello):
        return None
    end = min(len(hello), at + 2 + int.from_bytes(hello[at : at + 2], "big"))
    at += 2
    while at + 4 <= end:
        kind = int.from_bytes(hello[at : at + 2], "big")
        size = int.from_bytes(hello[at + 2 : at + 4], "big")
        at += 4
        if kind == _SERVER_NAME:
            names = hello[at + 2 : at + size]
            while len(names) >= 3:
                name_length = int.from_bytes(names[1:3], "big")
                if names[0] == 0:
                    return bytes(names[3 : 3 + name_length]).decode("ascii", "replace").lower()
                names = names[3 + name_length :]
            return None
        at += size
    return None
