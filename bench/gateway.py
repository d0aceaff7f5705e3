"""The ingress gateway assembled in-process, for `make bench` while `minimesh up` is missing.

The same pieces the daemon wires (load → compile → `Current` → `Proxy` → `Serving`), on
uvloop or asyncio's own loop, with no access log and no metrics observers (so it flatters
the gateway a little). Prints `ready` once listening; SIGTERM stops it.

    .venv/bin/python bench/gateway.py --config DIR --port PORT [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from minimesh.config.load import load_paths
from minimesh.dataplane.current import Current
from minimesh.dataplane.exchange import Listener, ListenerKind
from minimesh.dataplane.listeners import Serving
from minimesh.dataplane.proxy import Proxy
from minimesh.dataplane.upstream import Upstreams
from minimesh.registry.static import workloads_of
from minimesh.routing.compile import compile_snapshot


async def serve(config: str, port: int) -> None:
    mesh = load_paths([config]).raise_errors()
    snapshot = compile_snapshot(mesh, workloads_of(mesh), generation=1)
    proxy = Proxy(Current(snapshot), Upstreams())
    serving = Serving(proxy, Listener(ListenerKind.GATEWAY, port, gateways=snapshot.ingress_gateways))
    await serving.start("127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"ready {serving!r} loop={type(loop).__module__}", flush=True)
    await stop.wait()
    await serving.stop()
    await proxy.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="mesh.yaml, or a folder of them")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.config, args.port))
    else:
        asyncio.run(serve(args.config, args.port))


if __name__ == "__main__":
    main()
