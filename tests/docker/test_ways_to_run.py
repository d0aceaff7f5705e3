"""The two ways to run the daemon against Docker, and what `make demo-down` leaves: nothing.

As a compose service (compose/minimesh.yml: privileged, host pid and network, the Docker
socket), the way on Docker Desktop; and `make demo`'s host daemon, killed without a chance
to clean up, whose rules `minimesh down` still removes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from minimesh.background import alive
from tests.conftest import BOOKINFO, ROOT
from tests.docker.conftest import Compose, capture_rules, free_port, until, wait_serving

DAEMON_FRAGMENT = ROOT / "compose" / "minimesh.yml"


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def wait_for(url: str, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return get(url)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def capture_rules_left(project: str) -> list[str]:
    """The compose project's containers that still carry minimesh's chains (only its own: other
    meshes, such as `make bench`'s, may run beside the tests)."""
    running = subprocess.run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"],
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    return [container for container in running if "MINIMESH" in capture_rules(container)]


def test_the_daemon_as_a_compose_service(images: None, tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text((BOOKINFO / "mesh.yaml").read_text())
    gateway, admin = free_port(), free_port()
    env = {"MINIMESH_CONFIG_DIR": str(tmp_path), "MINIMESH_CERTS_DIR": str(tmp_path / "certs"),
           "MINIMESH_GATEWAY_PORT": str(gateway), "MINIMESH_ADMIN_PORT": str(admin)}  # fmt: skip
    compose = Compose(f"mmsvc{os.getpid()}", files=(BOOKINFO / "docker-compose.yml", DAEMON_FRAGMENT), env=env)
    try:
        compose.run("up", "-d")
        url = f"http://127.0.0.1:{gateway}/productpage"
        wait_for(url, 90)
        wait_serving(url, lambda: compose.run("logs", "--tail", "60", "minimesh", check=False).stdout)
        assert "Sorry" not in get(url)
        dump = get(f"http://127.0.0.1:{admin}/config_dump")
        assert "minimesh" in dump and '"generation"' in dump
        until(
            lambda: bool(capture_rules_left(compose.project)),
            "the daemon in its container to capture the bookinfo containers",
        )
        compose.run("stop", "-t", "10", "minimesh")
        assert capture_rules_left(compose.project) == [], "stopping the daemon's container removes every rule"
    finally:
        compose.run("down", "-v", "--remove-orphans", check=False)


def test_demo_down_leaves_nothing_even_after_a_killed_daemon(images: None) -> None:
    project = f"mmdemo{os.getpid()}"
    env = {**os.environ, "MINIMESH_DEMO_PROJECT": project}
    up = subprocess.run(["bash", "compose/demo.sh", "up"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600, check=False)  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert "bookinfo is up behind minimesh:  http://127.0.0.1:8080/productpage" in up.stdout
        assert "Reviews served by:" in get("http://127.0.0.1:8080/productpage")
        services = ("productpage", "details", "ratings", "reviews-v1", "reviews-v2", "reviews-v3")
        containers = [f"{project}_{service}_1" for service in services]
        until(lambda: all("MINIMESH" in capture_rules(c) for c in containers), "the demo's daemon to capture bookinfo")
        pid = int((ROOT / ".minimesh" / "minimesh.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        until(lambda: not alive(pid), "the killed daemon gone")
        assert capture_rules_left(project), "a killed daemon leaves its rules behind"
    finally:
        down = subprocess.run(["bash", "compose/demo.sh", "down"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300, check=False)  # fmt: skip
    assert down.returncode == 0, down.stdout + down.stderr
    cleaned = next(line for line in down.stdout.splitlines() if "removed capture rules left in" in line)
    for container in containers:
        assert container in cleaned
    remaining = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    networks = subprocess.run(["docker", "network", "ls", "-q", "--filter", f"name={project}"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert remaining == "" and networks == ""
    assert not (ROOT / ".minimesh" / "minimesh.pid").exists()
