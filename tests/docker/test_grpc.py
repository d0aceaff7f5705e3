"""gRPC through the mesh (DESIGN §1.3 Protocols, issue 9) on the real engine, with the
greeter example's grpcio servers and its client CLI in the captured `frontend` and `batch`
containers: unary and bidirectional-streaming calls, a 0/100 → 90/10 → 100/0 split by
editing mesh.yaml, `abort.grpcStatus` and an HTTP abort for one caller, a route timeout,
a retry on UNAVAILABLE onto the second v1 endpoint, `istio_requests_total` with
`grpc_response_status`, and `curl --http2-prior-knowledge` through the gateway.

Expected statuses are Envoy's: a local reply to a gRPC request is a trailers-only response
whose grpc-status is `Grpc::Utility::httpToGrpcStatus` of the HTTP status (503 and an
upstream timeout's 504 both UNAVAILABLE), with the reply's body text as grpc-message.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import BOOKINFO, ROOT
from tests.docker.conftest import COMPOSE_FILE, Compose, Mesh, merge_variant, wait_captured
from tests.docker.test_protocols import eventually
from tests.inproc.test_proxy_grpc_web import frames

GRPC = ROOT / "examples" / "grpc"
VARIANTS = GRPC / "variants"
TEST_FILE = Path(__file__).with_name("grpc.yml")
GREETER = "greeter.default.svc.cluster.local"
TARGET = "greeter:50051"
CALLS = 200
UNAVAILABLE = "UNAVAILABLE"
GRPC_OK = ("grpc", "200", "0")
"""request_protocol, response_code and grpc_response_status of a call that succeeded."""


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def bookinfo(images: None) -> Iterator[Compose]:
    """Overrides conftest's: bookinfo plus the greeter example, one project for the module."""
    compose = Compose(f"mmgrpc{os.getpid()}", files=(COMPOSE_FILE, GRPC / "docker-compose.yml", TEST_FILE))
    compose.run("up", "-d")
    try:
        yield compose
    finally:
        compose.run("rm", "--stop", "--force", "greeter-v1-failing", check=False)
        compose.run("down", "-v", "--remove-orphans", check=False)


@pytest.fixture(scope="module")
def greeters(bookinfo: Compose) -> None:
    """Both greeter versions answer on their own loopback (without minimesh)."""
    for version in ("v1", "v2"):
        serving(bookinfo.container(f"greeter-{version}"), {version: 1})


@pytest.fixture(scope="module")
def frontend(mesh: Mesh, bookinfo: Compose, greeters: None) -> str:
    """A captured caller labelled app=frontend, with the greeter client in it."""
    name = bookinfo.container("frontend")
    wait_captured(name, mesh.log.read_text)
    return name


@pytest.fixture(scope="module")
def batch(mesh: Mesh, bookinfo: Compose, greeters: None) -> str:
    """A second captured caller, labelled app=batch: the one a fault is injected for."""
    name = bookinfo.container("batch")
    wait_captured(name, mesh.log.read_text)
    return name


def serving(container: str, summary: dict[str, int]) -> None:
    """Until the greeter in `container` gives `summary` for one call on its own loopback."""
    eventually(f"{container} answering on 127.0.0.1:50051",
               lambda: json.dumps(client_run(container, "--target", "127.0.0.1:50051", "--calls", "1")["summary"]),
               json.dumps(summary).__eq__)  # fmt: skip


def client_run(container: str, *args: str) -> dict[str, Any]:
    """The greeter client's JSON summary, run in `container` (to `greeter:50051` unless told)."""
    command = ["docker", "exec", container, "python", "-m", "greeter.client", "--target", TARGET, "--json", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"greeter client in {container} failed: {done.stderr[-2000:]}"
    result = json.loads(done.stdout.splitlines()[-1])
    assert isinstance(result, dict)
    return result


def calls(container: str, count: int, *args: str) -> Counter[str]:
    """`count` unary Greet calls on one channel: how many each version answered, or each failure status."""
    return Counter(client_run(container, "--calls", str(count), *args)["summary"])


def greeter_mesh(variant: Path | None = None, route: list[dict[str, Any]] | None = None) -> str:
    """bookinfo's mesh.yaml and the greeter's, with a variant's documents (as a user copies
    them in), or with the greeter VirtualService's `http` routes replaced by `route`."""
    documents = [d for d in yaml.safe_load_all(merge_variant(BOOKINFO / "mesh.yaml", None)) if d]
    greeter = [d for d in yaml.safe_load_all(merge_variant(GRPC / "mesh.yaml", variant)) if d]
    if route is not None:
        service = next(d for d in greeter if d["kind"] == "VirtualService" and d["metadata"]["name"] == "greeter")
        service["spec"]["http"] = route
    return yaml.safe_dump_all(documents + greeter, sort_keys=False)


def to_v1(**policy: Any) -> list[dict[str, Any]]:
    """One route, every call to subset v1, with the given route fields (timeout, retries...)."""
    return [{"route": [{"destination": {"host": "greeter", "subset": "v1"}}], **policy}]


def split(v1: int, v2: int) -> str:
    """The 90/10 variant with its weights edited to v1/v2, as a user would."""
    documents = [d for d in yaml.safe_load_all(greeter_mesh(VARIANTS / "greeter-90-10.yaml")) if d]
    service = next(d for d in documents if d["kind"] == "VirtualService" and d["metadata"]["name"] == "greeter")
    destinations = service["spec"]["http"][0]["route"]
    destinations[0]["weight"], destinations[1]["weight"] = v1, v2
    return yaml.safe_dump_all(documents, sort_keys=False)


def failures(container: str, count: int, *args: str) -> list[tuple[str, str]]:
    """(status, grpc-message) of each of `count` calls."""
    replies = client_run(container, "--calls", str(count), *args)["replies"]
    return [(reply["status"], reply.get("message", "")) for reply in replies]


def request_counters(mesh: Mesh) -> Counter[tuple[str, ...]]:
    """istio_requests_total to the greeter by (reporter, source_app, destination_workload,
    request_protocol, response_code, grpc_response_status)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: Counter[tuple[str, ...]] = Counter()
    keys = ("reporter", "source_app", "destination_workload", "request_protocol", "response_code",
            "grpc_response_status")  # fmt: skip
    for line in text.splitlines():
        found = re.match(r"istio_requests_total\{(.*)\} (\S+)$", line)
        if not found:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
        if labels.get("destination_service") == GREETER:
            totals[tuple(labels.get(key, "") for key in keys)] += int(float(found.group(2)))
    return totals


# ---------------------------------------------------------------- calls through the mesh


def test_unary_calls_through_the_mesh(mesh: Mesh, frontend: str) -> None:
    mesh.write(greeter_mesh())
    seen = calls(frontend, 20)
    assert sum(seen.values()) == 20 and set(seen) <= {"v1", "v2"}, f"20 Greet calls from {frontend}: {dict(seen)}"


def test_bidirectional_stream_answers_each_message_as_it_comes(mesh: Mesh, frontend: str) -> None:
    """The client sends message n+1 only after reply n arrived: a proxy that buffered the
    stream whole would never answer."""
    mesh.write(greeter_mesh())
    replies = client_run(frontend, "--chat", "--calls", "5")["replies"]
    assert [(r["status"], r.get("seq"), r.get("text")) for r in replies] == [
        ("OK", n, f"message {n}") for n in range(1, 6)
    ], f"Chat stream of 5 messages from {frontend}: {replies}"
    assert len({r["version"] for r in replies}) == 1, f"one stream, one server: {replies}"


def test_split_0_100_then_90_10_then_100_0(mesh: Mesh, frontend: str) -> None:
    """Per call, not per connection: the client's one channel sees both versions at 90/10."""
    mesh.write(split(0, 100))
    seen = calls(frontend, CALLS)
    assert seen == Counter({"v2": CALLS}), f"0/100: {CALLS} calls from {frontend} gave {dict(seen)}"

    mesh.write(greeter_mesh(VARIANTS / "greeter-90-10.yaml"))
    seen = calls(frontend, CALLS)
    sigma = math.sqrt(CALLS * 0.1 * 0.9)
    low, high = CALLS * 0.1 - 4 * sigma, CALLS * 0.1 + 4 * sigma
    assert set(seen) == {"v1", "v2"} and low <= seen["v2"] <= high, f"90/10: {dict(seen)}"

    mesh.write(split(100, 0))
    seen = calls(frontend, CALLS)
    assert seen == Counter({"v1": CALLS}), f"100/0: {dict(seen)}"


# ---------------------------------------------------------------- faults, timeouts, retries


def test_grpc_status_abort_for_one_caller(mesh: Mesh, frontend: str, batch: str) -> None:
    mesh.write(greeter_mesh(VARIANTS / "greeter-abort-batch.yaml"))
    aborted = failures(batch, 10)
    assert aborted == [(UNAVAILABLE, "fault filter abort")] * 10, f"abort.grpcStatus UNAVAILABLE for batch: {aborted}"
    spared = calls(frontend, 10)
    assert spared == Counter({"v1": 10}), f"frontend is not batch, so no fault: {dict(spared)}"


def test_http_abort_becomes_the_grpc_status_envoy_maps_it_to(mesh: Mesh, batch: str) -> None:
    """Envoy's httpToGrpcStatus: 503 → UNAVAILABLE, 404 → UNIMPLEMENTED, 403 → PERMISSION_DENIED."""
    for http_status, grpc_status in ((503, UNAVAILABLE), (404, "UNIMPLEMENTED"), (403, "PERMISSION_DENIED")):
        fault = {"abort": {"httpStatus": http_status, "percentage": {"value": 100}}}
        mesh.write(greeter_mesh(route=to_v1(fault=fault)))
        aborted = failures(batch, 3)
        assert aborted == [(grpc_status, "fault filter abort")] * 3, f"abort.httpStatus {http_status}: {aborted}"


def test_route_timeout_gives_unavailable_upstream_request_timeout(mesh: Mesh, frontend: str) -> None:
    """Envoy's upstream timeout is a local 504 'upstream request timeout' → grpc-status 14
    (router.cc onUpstreamTimeout, no explicit gRPC status; status.cc httpToGrpcStatus). Istio
    caps the client's grpc-timeout with the route timeout (max_grpc_timeout), so the route's 1 s
    applies though the client allows 60 s."""
    mesh.write(greeter_mesh(route=to_v1(timeout="1s")))
    slow = failures(frontend, 1, "--sleep", "5", "--timeout", "60")
    assert slow == [(UNAVAILABLE, "upstream request timeout")], f"a 5 s call on a 1 s route: {slow}"
    assert calls(frontend, 3) == Counter({"v1": 3}), "calls within the timeout still answer"


def test_metrics_count_grpc_calls_with_their_grpc_status(mesh: Mesh, frontend: str, batch: str) -> None:
    mesh.write(greeter_mesh(VARIANTS / "greeter-abort-batch.yaml"))
    before = request_counters(mesh)
    assert calls(frontend, 7) == Counter({"v1": 7})
    assert failures(batch, 4) == [(UNAVAILABLE, "fault filter abort")] * 4

    def moved() -> dict[str, int]:
        after = request_counters(mesh)
        delta = Counter({key: after[key] - before[key] for key in after})
        return {
            "frontend OK (source)": sum(
                n for k, n in delta.items() if k[:2] == ("source", "frontend") and k[3:] == GRPC_OK
            ),
            "frontend served OK (destination)": sum(
                n for k, n in delta.items() if k[:2] == ("destination", "frontend") and k[3:] == GRPC_OK
            ),
            "batch aborted (source)": sum(
                n for k, n in delta.items() if k[:2] == ("source", "batch") and k[3:] == ("grpc", "200", "14")
            ),
        }

    expected = {"frontend OK (source)": 7, "frontend served OK (destination)": 7, "batch aborted (source)": 4}
    eventually("istio_requests_total counting 7 OK calls and 4 aborted ones (grpc_response_status 0 and 14)",
               lambda: json.dumps(moved()), json.dumps(expected).__eq__, timeout=30)  # fmt: skip


def test_retry_on_unavailable_succeeds_on_the_second_endpoint(mesh: Mesh, bookinfo: Compose, frontend: str) -> None:
    """A second v1 instance fails every call UNAVAILABLE: without retries the caller sees it,
    with `retryOn: unavailable` every call lands on the healthy one."""
    bookinfo.run("up", "-d", "greeter-v1-failing")
    try:
        failing = bookinfo.container("greeter-v1-failing")
        serving(failing, {UNAVAILABLE: 1})
        wait_captured(failing, mesh.log.read_text)

        mesh.write(greeter_mesh(VARIANTS / "greeter-no-retries.yaml"))
        eventually("calls without retries reaching both v1 endpoints", lambda: json.dumps(sorted(calls(frontend, 20))),
                   json.dumps(sorted(["v1", UNAVAILABLE])).__eq__)  # fmt: skip

        before = request_counters(mesh)
        mesh.write(greeter_mesh(VARIANTS / "greeter-retries.yaml"))
        seen = calls(frontend, 40)
        assert seen == Counter({"v1": 40}), f"retryOn unavailable, 40 calls from {frontend}: {dict(seen)}"
        after = request_counters(mesh)
        refused = sum(after[k] - before[k] for k in after if k[0] == "destination" and k[2] == failing and k[5] == "14")
        assert refused > 0, "the failing instance was tried (and the call retried), as its destination metrics show"
    finally:
        bookinfo.run("rm", "--stop", "--force", "greeter-v1-failing", check=False)


# ---------------------------------------------------------------- the gateway


def test_curl_http2_prior_knowledge_through_the_gateway(mesh: Mesh) -> None:
    """h2c with prior knowledge to the gateway, proxied to productpage (HTTP/1.1)."""
    mesh.write(greeter_mesh())
    done = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-o", "-", "-w", "\n%{http_version} %{http_code}",
         mesh.url("/productpage")], capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.stdout.endswith("\n2 200"), f"curl --http2-prior-knowledge: {done.stdout[-300:]!r} {done.stderr!r}"
    assert "Reviews served by:" in done.stdout, "the page came from productpage through the mesh"


# ---------------------------------------------------------------- gRPC-Web


SAY_WEB = """
import base64, urllib.request
message = b'{"name":"sidecar"}'
frame = bytes(1) + len(message).to_bytes(4, "big") + message
headers = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1"}
request = urllib.request.Request("http://greeter-web:50051/greeter.Greeter/Greet", data=frame, headers=headers)
with urllib.request.urlopen(request, timeout=30) as response:
    print(response.status, response.headers["content-type"], base64.b64encode(response.read()).decode())
"""
"""A gRPC-Web call from Python's urllib (HTTP/1.1), as a browser's grpc-web client makes it."""


def test_grpc_web_through_the_gateway_and_through_a_sidecar(mesh: Mesh, bookinfo: Compose, frontend: str) -> None:
    """The greeter on a `grpc-web` port: curl on the host through the gateway, and urllib in
    the captured `frontend`, both speak gRPC-Web over HTTP/1.1 to a grpcio server that speaks
    only gRPC; each gets the reply frame, then the trailers as the last frame."""
    mesh.write(greeter_mesh())
    web = bookinfo.container("greeter-web")
    serving(web, {"web": 1})
    wait_captured(web, mesh.log.read_text)
    message = b'{"name":"gateway"}'
    done = subprocess.run(
        ["curl", "-sS", "--data-binary", "@-", "-H", "content-type: application/grpc-web+proto",
         "-H", "x-grpc-web: 1", "-o", "-", mesh.url("/greeter.Greeter/Greet")],
        input=b"\0" + len(message).to_bytes(4, "big") + message, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert len(frames(done.stdout)) == 2, f"curl: {done.stdout!r} {done.stderr!r}"
    (reply, trailer) = frames(done.stdout)
    assert (reply[0], json.loads(reply[1])["message"], json.loads(reply[1])["version"]) == (0, "hello gateway", "web")
    assert trailer[0] == 0x80 and b"grpc-status:0\r\n" in trailer[1], f"trailer frame: {trailer!r}"

    said = subprocess.run(["docker", "exec", frontend, "python", "-c", SAY_WEB], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert said.returncode == 0, said.stderr[-2000:]
    status, content_type, encoded = said.stdout.split()
    (reply, trailer) = frames(base64.b64decode(encoded))
    assert (status, content_type, json.loads(reply[1])["message"]) == (
        "200", "application/grpc-web+proto", "hello sidecar",
    )  # fmt: skip
    assert b"grpc-status:0\r\n" in trailer[1]
