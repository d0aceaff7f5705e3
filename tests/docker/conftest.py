"""Docker end-to-end fixtures: the real engine, the images `make images` builds, bookinfo
under compose, and `minimesh up` with netns capture, each torn down after its tests.

Without an engine these tests skip with the reason; under CI they fail instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import BOOKINFO, ROOT

COMPOSE_FILE = BOOKINFO / "docker-compose.yml"
PATIENCE = 60.0
"""How long a test waits for what should happen soon: running out fails it, never measures speed."""


def until(condition: Callable[[], bool], what: str, timeout: float = PATIENCE) -> None:
    """Wait until `condition` holds; fail naming `what` if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:g} s in vain for {what}"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "the docker command is not installed"
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        return "no Docker Engine answers (docker info failed)"
    if os.geteuid() != 0:
        return "netns capture needs root"
    return None


@pytest.fixture(scope="session")
def engine() -> None:
    problem = _engine_problem()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"Docker tests never skip under CI, but {problem}")
    pytest.skip(problem)


def compose_command() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"]


@pytest.fixture(scope="session")
def images(engine: None) -> None:
    result = subprocess.run(["bash", "compose/images.sh"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@dataclass
class Compose:
    project: str
    files: tuple[Path, ...] = (COMPOSE_FILE,)
    env: Mapping[str, str] = field(default_factory=dict)
    """Variables the compose files interpolate, on top of this process's environment."""

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [*compose_command(), "-p", self.project]
        for file in self.files:
            command += ["-f", str(file)]
        result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, check=False,
                                env={**os.environ, **self.env})  # fmt: skip
        if check:
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result

    def container(self, service: str, index: int = 1) -> str:
        ids = self.run("ps", "-q", service).stdout.split()
        assert ids, f"no container for {service}"
        name = subprocess.run(
            ["docker", "inspect", "-f", "{{.Name}}", ids[index - 1]], capture_output=True, text=True, check=True
        )
        return name.stdout.strip().lstrip("/")


@pytest.fixture(scope="module")
def bookinfo(images: None) -> Iterator[Compose]:
    compose = Compose(f"mmtest{os.getpid()}")
    compose.run("up", "-d")
    try:
        yield compose
    finally:
        compose.run("down", "-v", "--remove-orphans", check=False)


def merge_variant(base: Path, variant: Path | None) -> str:
    """mesh.yaml with the variant's documents replacing the same kind and name: an edit a user makes."""
    documents = [d for d in yaml.safe_load_all(base.read_text()) if d]
    if variant is not None:
        replacing = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(variant.read_text()) if d}
        documents = [replacing.pop((d["kind"], d["metadata"]["name"]), d) for d in documents] + list(replacing.values())
    return yaml.safe_dump_all(documents, sort_keys=False)


@dataclass
class Mesh:
    process: subprocess.Popen[str]
    config: Path
    gateway: int
    admin: int
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.gateway}{path}"

    def admin_json(self, path: str) -> object:
        import json

        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=5) as response:
            return json.loads(response.read())

    def generation(self) -> int:
        dump = self.admin_json("/config_dump")
        assert isinstance(dump, dict)
        return int(dump["generation"])

    def apply(self, variant: Path | None) -> None:
        """Edit mesh.yaml to the variant and wait until the daemon serves it."""
        self.write(merge_variant(BOOKINFO / "mesh.yaml", variant))

    def write(self, text: str) -> None:
        """Make mesh.yaml `text` (a user's edit) and wait until the daemon serves it."""
        if self.config.read_text() == text:
            return
        before = self.generation()
        self.config.write_text(text)
        until(lambda: self.generation() != before, "the edited mesh.yaml applied")


def capture_rules(container: str) -> str:
    """The nat rules in the container's network namespace ("MINIMESH" in them: it is captured)."""
    pid = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", container], capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "iptables-save", "-t", "nat"],
                          capture_output=True, text=True, check=False).stdout  # fmt: skip


def wait_captured(container: str, log: Callable[[], str], timeout: float = 30) -> None:
    """Until the daemon captures the container (its rules go in after its listeners serve)."""
    deadline = time.monotonic() + timeout
    while "MINIMESH" not in capture_rules(container):
        if time.monotonic() > deadline:
            said = [line for line in log().splitlines() if container in line] or log().splitlines()[-20:]
            raise AssertionError(
                f"{container} was not captured within {timeout} s; the daemon said:\n" + "\n".join(said[-20:])
            )
        time.sleep(0.2)


def wait_ready(admin: int, process: subprocess.Popen[str], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"minimesh up exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"minimesh up was not ready within {timeout} s: {log.read_text()[-3000:]}")


def wait_serving(url: str, log: Callable[[], str], timeout: float = 60) -> None:
    """Until bookinfo's apps listen (they start a second or two after their containers; the
    compose file has no health checks, so nothing else says when they are ready). `log`
    gives the daemon's log for the failure message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200 and "Reviews served by:" in response.read().decode():
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not serve bookinfo within {timeout} s: {log()[-3000:]}")


@pytest.fixture(scope="module")
def mesh(bookinfo: Compose, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    folder = tmp_path_factory.mktemp("mesh")
    config = folder / "mesh.yaml"
    config.write_text(merge_variant(BOOKINFO / "mesh.yaml", None))
    gateway, admin = free_port(), free_port()
    log = folder / "minimesh.log"
    command = [sys.executable, "-m", "minimesh", "up", "--capture", "netns", "-f", str(config),
               "--gateway-port", str(gateway), "--admin-port", str(admin),
               "--docker-label", f"com.docker.compose.project={bookinfo.project}"]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=folder)
    try:
        wait_ready(admin, process, log)
        wait_serving(f"http://127.0.0.1:{gateway}/productpage", log.read_text)
        yield Mesh(process, config, gateway, admin, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
