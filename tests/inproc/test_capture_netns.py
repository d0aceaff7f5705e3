"""Capture of a namespace whose app already holds connections: those that would bypass the
mesh are aborted when the rules go in, loopback and the mesh's own are left alone. A real
network namespace (`ip netns`), real iptables and `ss`; root only, and never skipped in CI.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from minimesh.dataplane.capture.manager import put_rules_in
from minimesh.dataplane.capture.netns import abort_bypassing, bypass_filter, install_rules, listening_ports

APP = """
import json, socket, sys
inside, outside, out_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
servers = {port: socket.create_server((inside, port)) for port in (9000, 9080)}
loopback = socket.create_server(("127.0.0.1", 9001))
clients = {"out": socket.create_connection((outside, out_port)), "lo": socket.create_connection(("127.0.0.1", 9001))}
accepted = {"lo": loopback.accept()[0]}
print("ready", flush=True)
sys.stdin.readline()
accepted.update((port, server.accept()[0]) for port, server in servers.items())
print("accepted", flush=True)
sys.stdin.readline()
state = {f"{side}:{key}": sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
         for side, sockets in (("client", clients), ("accepted", accepted)) for key, sock in sockets.items()}
print(json.dumps(state), flush=True)
"""
ECONNABORTED = 103


@dataclass(frozen=True)
class Namespace:
    """A network namespace joined to the host by a veth pair on a /24 of its own."""

    name: str
    inside: str
    outside: str


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    missing = [tool for tool in ("ip", "ss", "iptables-restore", "nsenter") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        reason = f"needs root and {', '.join(missing) or 'nothing else'}"
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root with iproute2 and iptables: {reason}")
        pytest.skip(reason)
    name = f"mmtest{uuid.uuid4().hex[:8]}"
    net = f"10.{random.randrange(64, 128)}.{random.randrange(256)}"  # a CI run beside this one picks another
    subprocess.run(["ip", "netns", "add", name], check=True)
    host_end = f"mm{name[-8:]}"
    try:
        subprocess.run(
            ["ip", "link", "add", host_end, "type", "veth", "peer", "name", "mm0", "netns", name], check=True
        )
        for command in (["ip", "addr", "add", f"{net}.2/24", "dev", host_end], ["ip", "link", "set", host_end, "up"]):
            subprocess.run(command, check=True)
        for command in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{net}.1/24", "dev", "mm0"],
                        ["ip", "link", "set", "mm0", "up"]):  # fmt: skip
            subprocess.run(["ip", "netns", "exec", name, *command], check=True)
        yield Namespace(name, f"{net}.1", f"{net}.2")
    finally:
        subprocess.run(["ip", "link", "delete", host_end], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_capture_aborts_the_connections_that_would_bypass_it(namespace: Namespace) -> None:
    with socket.create_server((namespace.outside, 0)) as outside:
        app = subprocess.Popen(["ip", "netns", "exec", namespace.name, sys.executable, "-c", APP, namespace.inside,
                                namespace.outside, str(outside.getsockname()[1])],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert app.stdin is not None and app.stdout is not None
        try:
            assert app.stdout.readline().strip() == "ready"
            peers = [
                outside.accept()[0],
                *(socket.create_connection((namespace.inside, port)) for port in (9000, 9080)),
            ]
            app.stdin.write("accept\n")
            app.stdin.flush()
            assert app.stdout.readline().strip() == "accepted"
            path = f"/var/run/netns/{namespace.name}"
            install_rules(path, [9080])
            abort_bypassing(path, [9080])
            app.stdin.write("report\n")
            app.stdin.flush()
            state = json.loads(app.stdout.readline())
        finally:
            app.kill()
            app.wait()
        for peer in peers:
            peer.close()
    assert state["client:out"] == ECONNABORTED, "the app's own outbound connection bypasses the mesh"
    assert state["accepted:9080"] == ECONNABORTED, "an inbound connection to a captured port bypasses it"
    assert state["accepted:9000"] == 0, "a port the mesh does not capture is the app's own"
    assert state["client:lo"] == 0 and state["accepted:lo"] == 0, "loopback is never captured"


def test_bypass_filter_keeps_listening_ports_that_are_not_captured() -> None:
    listening = listening_ports("LISTEN 0 4096 0.0.0.0:9080 0.0.0.0:*\nLISTEN 0 128 [::]:22 [::]:*\n")
    assert listening == {9080, 22}
    text = bypass_filter(listening, [9080])
    assert "sport = :22" in text and "sport = :15001" in text and "sport = :9080" not in text


def test_a_capture_cancelled_while_its_rules_go_in_leaves_no_rule(namespace: Namespace) -> None:
    path = f"/var/run/netns/{namespace.name}"

    async def cancel_midway() -> None:
        task = asyncio.ensure_future(put_rules_in(path, (9080,)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    assert "MINIMESH" not in subprocess.run(["ip", "netns", "exec", namespace.name, "iptables-save", "-t", "nat"],
                                            capture_output=True, text=True, check=True).stdout  # fmt: skip
