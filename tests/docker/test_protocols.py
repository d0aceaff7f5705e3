"""Every byte a captured app sends keeps working (DESIGN §1.3 Protocols), on the real engine
with real servers and clients: Redis, MariaDB and HTTPS outside the mesh passed through,
MariaDB in the mesh declared `mysql`, Istio's TCP traffic shifting with tcp-echo,
REGISTRY_ONLY and ServiceEntry, the `istio_tcp_*` metrics, and bookinfo's ratings v2 on
MariaDB. One compose project (bookinfo plus tests/docker/protocols.yml) and one daemon serve
the whole module; each test writes the mesh.yaml it needs first.

Every client runs in bookinfo's `sleep` container, which the daemon captures; each server is
first shown to answer without minimesh (from the `direct` container outside the mesh, or on
its own loopback), so a failure names what the mesh did.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
import yaml

from tests.conftest import BOOKINFO
from tests.docker.conftest import COMPOSE_FILE, Compose, Mesh, merge_variant, wait_captured

VARIANTS = BOOKINFO / "variants"
PROTOCOLS_FILE = Path(__file__).with_name("protocols.yml")
BASE = merge_variant(BOOKINFO / "mesh.yaml", None)
ALL_V1 = merge_variant(BOOKINFO / "mesh.yaml", VARIANTS / "tcp-echo-all-v1.yaml")
"""bookinfo's mesh.yaml and step 1 of Istio's TCP traffic-shifting task: tcp-echo all to v1."""
TCP_ECHO = "tcp-echo.default.svc.cluster.local"
CONNECTIONS = 100
STARS = re.compile(r'<font color="(\w+)" class="stars">(★*)☆*</font>')

REGISTRY_ONLY = """\
apiVersion: minimesh.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"""
SERVICE_ENTRIES = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web-out}
spec:
  hosts: [web-out]
  location: MESH_EXTERNAL
  ports: [{number: 8000, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: redis-out}
spec:
  hosts: [redis-out]
  location: MESH_EXTERNAL
  ports: [{number: 6379, name: tcp-redis, protocol: TCP}]
  resolution: DNS
"""

ECHO_CLIENT = """
import json, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
answers = []
for _ in range(count):
    try:
        with socket.create_connection((host, port), timeout=10) as conn:
            conn.sendall(b"hello\\n")
            data = b""
            while not data.endswith(b"\\n"):
                chunk = conn.recv(100)
                if not chunk:
                    break
                data += chunk
        answers.append(data.decode(errors="replace").strip() or "closed")
    except OSError as exc:
        answers.append(f"error: {exc}")
print(json.dumps(answers))
"""
"""Opens COUNT connections one after another, each sending one line and reading one answer."""

PROBE = """
import json, socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode().decode("unicode_escape").encode()
received, how = b"", "closed"
try:
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(payload)
        while b"\\n" not in received and (chunk := conn.recv(4096)):
            received += chunk
        how = "answered" if received else "closed"
except TimeoutError:
    how = "open (no answer within 10 s)"
except ConnectionResetError:
    how = "reset"
except OSError as exc:
    how = f"error: {exc}"
print(json.dumps({"received": received.decode(errors="replace"), "how": how}))
"""
"""One connection: sends PAYLOAD, reads one line or until the other side closes; says what came back and how."""


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA of the test's own and a certificate for `tls-server`, mounted into the containers at /certs."""
    folder = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    leaf = ca.issue_cert("tls-server")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    leaf.private_key_pem.write_to_path(str(folder / "server.key"))
    return folder


@pytest.fixture(scope="module")
def bookinfo(images: None, certs: Path) -> Iterator[Compose]:
    """Overrides conftest's: bookinfo plus the servers outside the mesh, one project for the module."""
    compose = Compose(
        f"mmproto{os.getpid()}", files=(COMPOSE_FILE, PROTOCOLS_FILE), env={"MINIMESH_TEST_CERTS": str(certs)}
    )
    compose.run("up", "-d")
    try:
        yield compose
    finally:
        compose.run("down", "-v", "--remove-orphans", check=False)


@pytest.fixture(scope="module")
def sleep(mesh: Mesh, bookinfo: Compose) -> str:
    """The captured client container (Istio's `sleep`): curl, redis-cli, mariadb, python3."""
    name = bookinfo.container("sleep")
    wait_captured(name, mesh.log.read_text)
    return name


@pytest.fixture(scope="module")
def direct(bookinfo: Compose) -> str:
    """A client container outside the mesh: what each server answers without minimesh."""
    return bookinfo.container("direct")


def sh(container: str, script: str, timeout: float = 60) -> str:
    """Run a shell script in the container; its stdout and stderr together."""
    done = subprocess.run(["docker", "exec", container, "sh", "-c", script], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    return done.stdout + done.stderr


def python(container: str, script: str, *args: str, timeout: float = 120) -> object:
    """Run a Python script in the container; the JSON it prints last."""
    done = subprocess.run(["docker", "exec", container, "python3", "-c", script, *args], capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip
    assert done.returncode == 0, f"python3 in {container} failed: {done.stderr[-2000:]}"
    return json.loads(done.stdout.splitlines()[-1])


def eventually(what: str, attempt: Callable[[], str], ok: Callable[[str], bool], timeout: float = 60) -> str:
    """Repeat `attempt` until `ok` holds for its output; fails naming `what` and the last output."""
    deadline = time.monotonic() + timeout
    while True:
        output = attempt()
        if ok(output):
            return output
        assert time.monotonic() < deadline, f"{what} within {timeout} s; last output: {output[-1500:]!r}"
        time.sleep(0.3)


def mariadb_query(host: str, sql: str) -> str:
    return f"timeout 20 mariadb -h {host} -uroot -ppassword --connect-timeout=10 -N -B -e '{sql}' 2>&1"


def echo_answers(sleep: str, count: int = CONNECTIONS) -> Counter[str]:
    answers = python(sleep, ECHO_CLIENT, "tcp-echo", "9000", str(count))
    assert isinstance(answers, list)
    return Counter(answer.partition(" hello")[0] if answer.endswith(" hello") else answer for answer in answers)


def tcp_echo_split(v1: int, v2: int) -> str:
    """mesh.yaml with Istio's 80/20 tcp-echo route, its weights edited to v1/v2 as a user would."""
    documents = list(yaml.safe_load_all(merge_variant(BOOKINFO / "mesh.yaml", VARIANTS / "tcp-echo-20-v2.yaml")))
    route = next(d for d in documents if d["kind"] == "VirtualService" and d["metadata"]["name"] == "tcp-echo")
    destinations = route["spec"]["tcp"][0]["route"]
    destinations[0]["weight"], destinations[1]["weight"] = v1, v2
    return yaml.safe_dump_all(documents, sort_keys=False)


def tcp_counters(mesh: Mesh, source: str) -> Counter[tuple[str, str]]:
    """istio_tcp_* for tcp-echo from `source`, summed by (metric, reporter): the server sidecar
    names the calling workload too, as Istio's does (from mTLS peer metadata)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: Counter[tuple[str, str]] = Counter()
    for line in text.splitlines():
        found = re.match(r"(istio_tcp_\w+)\{(.*)\} (\S+)$", line)
        if not found:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(2)))
        if labels.get("destination_service") != TCP_ECHO:
            continue
        if labels.get("source_workload") != source:
            continue
        totals[(found.group(1), labels.get("reporter", ""))] += int(float(found.group(3)))
    return totals


def settled_tcp_counters(mesh: Mesh, source: str, timeout: float = 30) -> Counter[tuple[str, str]]:
    """tcp_counters once every connection counted as opened is counted as closed too."""
    deadline = time.monotonic() + timeout
    while True:
        counters = tcp_counters(mesh, source)
        open_now = {
            reporter: counters[("istio_tcp_connections_opened_total", reporter)]
            - counters[("istio_tcp_connections_closed_total", reporter)]
            for reporter in ("source", "destination")
        }
        if not any(open_now.values()):
            return counters
        assert time.monotonic() < deadline, f"tcp-echo connections still open after {timeout} s: {open_now}"
        time.sleep(0.3)


def page_stars(mesh: Mesh) -> list[tuple[str, int]]:
    """(color, stars) of each review on the product page, or [("ratings-error", 0)]."""
    with urllib.request.urlopen(mesh.url("/productpage"), timeout=30) as response:
        html = response.read().decode()
    if "Ratings service is currently unavailable" in html:
        return [("ratings-error", 0)]
    return [(color, len(full)) for color, full in STARS.findall(html)]


# ---------------------------------------------------------------- outside the mesh: passed through (ALLOW_ANY)


def test_redis_outside_the_mesh_answers_ping(mesh: Mesh, sleep: str, direct: str) -> None:
    mesh.write(BASE)
    ping = "timeout 20 redis-cli -h redis-out PING 2>&1"
    eventually("redis-out answering PING directly", lambda: sh(direct, ping), lambda out: out.strip() == "PONG")
    through = sh(sleep, ping)
    assert through.strip() == "PONG", (
        f"redis-cli PING from captured {sleep} to redis-out (outside the mesh): {through!r}"
    )


def test_mariadb_outside_the_mesh_greets_first_and_logs_in(mesh: Mesh, sleep: str, direct: str) -> None:
    mesh.write(BASE)
    query = mariadb_query("mariadb-out", "SELECT Rating FROM test.ratings ORDER BY ReviewID")
    eventually("mariadb-out serving directly", lambda: sh(direct, query), lambda out: out.split() == ["5", "4"])
    through = sh(sleep, query)
    assert through.split() == ["5", "4"], (
        f"mariadb from captured {sleep} to mariadb-out (outside the mesh; the server speaks first): {through!r}"
    )


def test_mariadb_in_the_mesh_declared_mysql(mesh: Mesh, sleep: str, bookinfo: Compose) -> None:
    mesh.write(BASE)
    mysqldb = bookinfo.container("mysqldb")
    local = mariadb_query("127.0.0.1", "SELECT COUNT(*) FROM test.ratings")
    eventually("mysqldb serving on its own loopback", lambda: sh(mysqldb, local), lambda out: out.strip() == "2")
    wait_captured(mysqldb, mesh.log.read_text)
    through = sh(sleep, mariadb_query("mysqldb", "SELECT Rating FROM test.ratings ORDER BY ReviewID"))
    assert through.split() == ["5", "4"], (
        f"mariadb from captured {sleep} to mysqldb (in the mesh, mysql:3306): {through!r}"
    )


def test_https_outside_the_mesh_keeps_its_certificate(mesh: Mesh, sleep: str, direct: str, certs: Path) -> None:
    mesh.write(BASE)
    curl = "timeout 30 curl -sS --cacert /certs/ca.pem -o /dev/null -w '%{http_code}\\n%{certs}' https://tls-server:8443/ 2>&1"
    leaf = "".join((certs / "server.pem").read_text().split()[2:-2])
    eventually("tls-server answering directly", lambda: sh(direct, curl), lambda out: out.startswith("200\n"))
    through = sh(sleep, curl)
    assert through.startswith("200\n"), f"curl https://tls-server:8443/ from captured {sleep}: {through[:500]!r}"
    assert leaf in "".join(through.split()), "curl saw a certificate other than tls-server's own"


# ---------------------------------------------------------------- in the mesh: TCP routes


def test_tcp_traffic_shifting_100_80_0(mesh: Mesh, sleep: str, bookinfo: Compose) -> None:
    """Istio's task: 100% v1, then 80/20, then all to v2, each by editing mesh.yaml."""
    for version, prefix in (("v1", "one"), ("v2", "two")):
        server = bookinfo.container(f"tcp-echo-{version}")
        eventually(f"{server} echoing on its own loopback",
                   lambda s=server: json.dumps(python(s, ECHO_CLIENT, "127.0.0.1", "9000", "1")),
                   lambda out, p=prefix: out == json.dumps([f"{p} hello"]))  # fmt: skip
    mesh.write(ALL_V1)
    seen = echo_answers(sleep)
    assert seen == Counter({"one": CONNECTIONS}), f"all-v1: {CONNECTIONS} connections from {sleep} gave {dict(seen)}"

    mesh.apply(VARIANTS / "tcp-echo-20-v2.yaml")
    seen = echo_answers(sleep)
    sigma = math.sqrt(CONNECTIONS * 0.2 * 0.8)
    low, high = CONNECTIONS * 0.2 - 4 * sigma, CONNECTIONS * 0.2 + 4 * sigma
    assert set(seen) == {"one", "two"} and low <= seen["two"] <= high, f"80/20: {dict(seen)}"

    mesh.write(tcp_echo_split(0, 100))
    seen = echo_answers(sleep)
    assert seen == Counter({"two": CONNECTIONS}), f"0/100: {dict(seen)}"


def test_tcp_metrics_count_connections_and_bytes(mesh: Mesh, sleep: str) -> None:
    mesh.write(ALL_V1)
    before = settled_tcp_counters(mesh, sleep)
    count = 10
    answers = echo_answers(sleep, count)
    assert answers == Counter({"one": count}), f"{count} tcp-echo connections from {sleep}: {dict(answers)}"
    line, answer = len(b"hello\n"), len(b"one hello\n")
    expected = Counter(
        {
            (metric, reporter): value
            for reporter in ("source", "destination")
            for metric, value in (
                ("istio_tcp_connections_opened_total", count),
                ("istio_tcp_connections_closed_total", count),
                ("istio_tcp_received_bytes_total", count * line),
                ("istio_tcp_sent_bytes_total", count * answer),
            )
        }
    )
    after = settled_tcp_counters(mesh, sleep)
    moved = Counter({key: after[key] - before[key] for key in expected})
    assert moved == expected, f"istio_tcp_* for {count} tcp-echo connections from {sleep}: moved {dict(moved)}"


# ---------------------------------------------------------------- REGISTRY_ONLY and ServiceEntry


def test_registry_only_blocks_unknown_hosts_and_a_service_entry_opens_each(mesh: Mesh, sleep: str, direct: str) -> None:
    web = "rm -f /tmp/body; timeout 30 curl -sS -o /tmp/body -w '%{http_code} ' http://web-out:8000/ 2>&1; wc -c < /tmp/body"
    redis = ["redis-out", "6379", "PING\\r\\n"]
    eventually("web-out answering directly", lambda: sh(direct, web), lambda out: out.startswith("200"))
    eventually("redis-out answering directly", lambda: sh(direct, "redis-cli -h redis-out PING"), "PONG\n".__eq__)

    mesh.write(BASE + "---\n" + REGISTRY_ONLY)
    answer = sh(sleep, web)
    assert answer.split() == ["502", "0"], f"REGISTRY_ONLY, HTTP to web-out (no ServiceEntry): status, size {answer!r}"
    blocked = python(sleep, PROBE, *redis)
    assert blocked in ({"received": "", "how": "closed"}, {"received": "", "how": "reset"}), (
        f"REGISTRY_ONLY, TCP to redis-out (no ServiceEntry) should be closed at once: {blocked}"
    )
    inside = sh(sleep, "timeout 30 curl -sS -o /dev/null -w '%{http_code}' http://ratings:9080/ratings/0 2>&1")
    assert inside == "200", f"REGISTRY_ONLY still lets mesh services through: ratings answered {inside!r}"

    mesh.write(BASE + "---\n" + REGISTRY_ONLY + "---\n" + SERVICE_ENTRIES)
    answer = sh(sleep, web)
    assert answer.startswith("200 "), f"REGISTRY_ONLY with a ServiceEntry for web-out:8000: status, size {answer!r}"
    opened = python(sleep, PROBE, *redis)
    assert opened == {"received": "+PONG\r\n", "how": "answered"}, (
        f"REGISTRY_ONLY with a ServiceEntry for redis-out:6379: {opened}"
    )


# ---------------------------------------------------------------- bookinfo: ratings v2 on MariaDB


def test_bookinfo_ratings_v2_reads_its_stars_from_mariadb(mesh: Mesh, bookinfo: Compose) -> None:
    mysqldb = bookinfo.container("mysqldb")
    eventually("mysqldb serving on its own loopback",
               lambda: sh(mysqldb, mariadb_query("127.0.0.1", "SELECT COUNT(*) FROM test.ratings")),
               lambda out: out.strip() == "2")  # fmt: skip
    mesh.apply(VARIANTS / "virtual-service-ratings-mysql.yaml")
    assert page_stars(mesh) == [("red", 5), ("red", 4)], "reviews v3 → ratings v2-mysql → mysqldb through the mesh"
    update = "UPDATE test.ratings SET Rating = {} WHERE ReviewID = 1"
    sh(mysqldb, mariadb_query("127.0.0.1", update.format(2)))
    try:
        assert page_stars(mesh) == [("red", 2), ("red", 4)], "the stars come from the database"
    finally:
        sh(mysqldb, mariadb_query("127.0.0.1", update.format(5)))
