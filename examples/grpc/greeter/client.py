"""The greeter client: N unary `Greet` calls on one channel (one HTTP/2 connection, so any
spread over versions is the mesh's per-request routing), or a `Chat` stream of N messages,
each sent only after the previous answer arrived. Prints each reply's version or gRPC
status, then a summary; `--json` prints the summary as one JSON line instead.

    python -m greeter.client --target greeter:50051 --calls 20
    python -m greeter.client --target greeter:50051 --chat --calls 5
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc

from greeter.service import CHAT, GREET, decode, encode

NO_CLIENT_RETRIES = [("grpc.enable_retries", 0)]
"""Retries are the mesh's job here: grpcio's own stay off, so each status is what the mesh gave."""


def greet(channel: grpc.Channel, calls: int, timeout: float, sleep: float) -> list[dict[str, Any]]:
    stub = channel.unary_unary(GREET, request_serializer=encode, response_deserializer=decode)
    results = []
    for number in range(1, calls + 1):
        try:
            reply = stub({"name": f"call {number}", "sleep": sleep}, timeout=timeout)
            results.append({"status": "OK", "version": reply["version"], "host": reply["host"]})
        except grpc.RpcError as error:
            results.append({"status": error.code().name, "message": error.details() or ""})
    return results


def chat(channel: grpc.Channel, messages: int, timeout: float) -> list[dict[str, Any]]:
    stub = channel.stream_stream(CHAT, request_serializer=encode, response_deserializer=decode)
    outgoing: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def requests() -> Iterator[dict[str, Any]]:
        while (message := outgoing.get(timeout=timeout)) is not None:
            yield message

    results: list[dict[str, Any]] = []
    outgoing.put({"text": "message 1"})
    replies = stub(requests(), timeout=timeout)
    try:
        for reply in replies:
            results.append({"status": "OK", "version": reply["version"], "seq": reply["seq"], "text": reply["text"]})
            sent = len(results) + 1
            outgoing.put({"text": f"message {sent}"} if sent <= messages else None)
    except grpc.RpcError as error:
        results.append({"status": error.code().name, "message": error.details() or ""})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m greeter.client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="greeter:50051", help="host:port of the greeter (default %(default)s)")
    parser.add_argument("--calls", type=int, default=10, help="unary calls, or messages with --chat")
    parser.add_argument("--chat", action="store_true", help="one bidirectional Chat stream instead of Greet calls")
    parser.add_argument("--timeout", type=float, default=30.0, help="each call's deadline in seconds")
    parser.add_argument("--sleep", type=float, default=0.0, help="ask the server to wait this long before answering")
    parser.add_argument("--json", action="store_true", help="print the replies and summary as one JSON line")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    with grpc.insecure_channel(args.target, options=NO_CLIENT_RETRIES) as channel:
        if args.chat:
            results = chat(channel, args.calls, args.timeout)
        else:
            results = greet(channel, args.calls, args.timeout, args.sleep)
    summary = Counter(r["version"] if r["status"] == "OK" else r["status"] for r in results)
    if args.json:
        print(json.dumps({"replies": results, "summary": dict(summary)}))
        return 0
    for number, result in enumerate(results, 1):
        detail = result["version"] if result["status"] == "OK" else f"{result['status']}: {result['message']}"
        print(f"{number:4} {detail}")
    print("summary: " + ", ".join(f"{key} {count}" for key, count in sorted(summary.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
