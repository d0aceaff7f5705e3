"""What the server and the client share: the method paths and the JSON (de)serializers that
stand in for protobuf, so neither side needs code generated from a .proto file.
"""

from __future__ import annotations

import json
from typing import Any

SERVICE = "greeter.Greeter"
GREET = f"/{SERVICE}/Greet"
CHAT = f"/{SERVICE}/Chat"
PORT = 50051


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    decoded = json.loads(data or b"{}")
    if not isinstance(decoded, dict):
        raise ValueError(f"a greeter message is a JSON object, not {type(decoded).__name__}")
    return decoded
