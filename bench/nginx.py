"""nginx as the upstream (a fixed ~100-byte answer) and as the reference reverse proxy.

Each instance has its own config, pid, logs and temp paths in the bench's temp dir, runs in
the foreground (`daemon off`) with one worker, and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from procs import LOOPBACK, Pinning, Process, wait_http

BODY = "ok " + "minimesh-bench " * 6 + "x" * 6 + "\n"
"""The upstream's answer: 100 bytes."""

_COMMON = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{body}
}}
"""

_UPSTREAM = """\
    server {{
        listen {host}:{port} reuseport backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "{text}";
        }}
    }}
"""

_PROXY = """\
    upstream web {{
        server {host}:{upstream};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {host}:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
        }}
    }}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/bin")
    if found is None:
        raise RuntimeError("nginx not found: apt-get install -y nginx-light (or nginx)")
    return found


def start(name: str, workdir: Path, body: str, pinning: Pinning, port: int) -> Process:
    directory = workdir / name
    directory.mkdir()
    config = directory / "nginx.conf"
    config.write_text(_COMMON.format(dir=directory, body=body))
    cmd = pinning.server_cmd(
        [nginx_binary(), "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(config)]
    )
    process = Process(name, cmd, directory / "stdout.log")
    problem = wait_http(port, "/", process, time.monotonic() + 10)
    if problem is not None:
        process.stop()
        log = (directory / "error.log").read_text(errors="replace") if (directory / "error.log").exists() else ""
        raise RuntimeError(f"{problem}\n{log}")
    return process


def start_upstream(workdir: Path, pinning: Pinning, ports: tuple[int, ...]) -> Process:
    """One nginx worker answering on each of `ports` (two endpoints for load balancing)."""
    body = "".join(_UPSTREAM.format(host=LOOPBACK, port=port, text=BODY.replace("\n", "\\n")) for port in ports)
    return start("nginx-upstream", workdir, body, pinning, ports[0])


def start_proxy(workdir: Path, pinning: Pinning, port: int, upstream: int) -> Process:
    """nginx as a reverse proxy with a keep-alive pool to the upstream."""
    body = _PROXY.format(host=LOOPBACK, port=port, upstream=upstream)
    return start("nginx-proxy", workdir, body, pinning, port)
