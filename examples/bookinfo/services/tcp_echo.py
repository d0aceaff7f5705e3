"""Istio's `tcp-echo` sample server: on each port given, answers every line with PREFIX, a space
and the line (`tcp_echo.py 9000,9001 one`: v1 answers "one hello" to "hello"); the connection
ends when the client closes its side.
"""

from __future__ import annotations

import asyncio
import sys


async def echo(prefix: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(prefix + b" " + line)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(ports: list[int], prefix: str) -> None:
    servers = [await asyncio.start_server(lambda r, w: echo(prefix.encode(), r, w), "0.0.0.0", port) for port in ports]
    print(f"listening on {', '.join(str(port) for port in ports)}, prefix: {prefix}", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: tcp_echo.py PORT[,PORT...] PREFIX")
    asyncio.run(main([int(port) for port in sys.argv[1].split(",")], sys.argv[2]))
