"""The greeter server: `Greet` answers with this instance's version (env VERSION), after
`sleep` seconds if the request asks (to try route timeouts); `Chat` answers each message as
it arrives. With env FAIL=unavailable every call ends in UNAVAILABLE (to try retries).

    VERSION=v2 python -m greeter.server            # listens on 0.0.0.0:50051 (env PORT)
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from greeter.service import PORT, SERVICE, decode, encode

VERSION = os.environ.get("VERSION", "v1")
FAIL = os.environ.get("FAIL", "")
HOST = socket.gethostname()


def _refuse(context: grpc.ServicerContext) -> None:
    if FAIL == "unavailable":
        context.abort(grpc.StatusCode.UNAVAILABLE, f"greeter {VERSION} on {HOST} fails every call (FAIL=unavailable)")


def greet(request: dict[str, Any], context: grpc.ServicerContext) -> dict[str, Any]:
    _refuse(context)
    time.sleep(min(float(request.get("sleep", 0)), 60.0))
    return {"message": f"hello {request.get('name', 'world')}", "version": VERSION, "host": HOST}


def chat(requests: Iterator[dict[str, Any]], context: grpc.ServicerContext) -> Iterator[dict[str, Any]]:
    _refuse(context)
    for seq, request in enumerate(requests, 1):
        yield {"text": request.get("text", ""), "seq": seq, "version": VERSION, "host": HOST}


def main() -> None:
    if FAIL not in ("", "unavailable"):
        sys.exit(f"greeter.server: FAIL={FAIL!r} is not known; use FAIL=unavailable or leave it unset")
    port = int(os.environ.get("PORT", PORT))
    handlers = {
        "Greet": grpc.unary_unary_rpc_method_handler(greet, request_deserializer=decode, response_serializer=encode),
        "Chat": grpc.stream_stream_rpc_method_handler(chat, request_deserializer=decode, response_serializer=encode),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    print(f"greeter {VERSION} listening on :{port}" + (f" (FAIL={FAIL})" if FAIL else ""), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(grace=1))
    server.wait_for_termination()


if __name__ == "__main__":
    main()
