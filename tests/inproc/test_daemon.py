"""`minimesh up --no-docker` driven as a user drives it: a real subprocess, WorkloadEntry
upstreams on 127.0.0.1, the gateway, an explicit sidecar, the admin API, hot reload,
the access log, metrics, SIGTERM, and the status, wait, up --detach and down commands."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import socket
from pathlib import Path

import aiohttp

from tests.inproc.conftest import Daemon, Shop, StartDaemon, free_ports, minimesh, refused
from tests.inproc.upstreams import PATIENCE, until


async def fetch(session: aiohttp.ClientSession, url: str, **kwargs: object) -> tuple[int, str]:
    async with session.get(url, **kwargs) as response:  # type: ignore[arg-type]
        return response.status, await response.text()


async def generation(daemon: Daemon, session: aiohttp.ClientSession) -> int:
    dump = await daemon.config_dump(session)
    value = dump["generation"]
    assert isinstance(value, int)
    return value


async def traffic(session: aiohttp.ClientSession, url: str, results: list[tuple[int, str]], *, clients: int,
                  stop: asyncio.Event, most: int = 20_000) -> int:  # fmt: skip
    """`clients` concurrent loops GETting `url` until `stop` is set (`most` requests at most);
    how many were sent."""
    sent = 0

    async def client() -> None:
        nonlocal sent
        while not stop.is_set() and sent < most:
            sent += 1
            try:
                results.append(await fetch(session, url))
            except aiohttp.ClientError as exc:
                results.append((0, repr(exc)))

    await asyncio.gather(*(client() for _ in range(clients)))
    return sent


# ---------------------------------------------------------------- serving


async def test_gateway_routes_to_workload_entries(shop: Shop, start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(shop.folder, args=("--debug-headers", "--seed", "7"))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{daemon.gateway}/reviews/1") as response:
            assert (response.status, await response.text()) == (200, "reviews-v1")
            assert response.headers["x-minimesh-route"] == "VirtualService/default/entry#http[0]"
            assert response.headers["server"] == "istio-envoy"
        assert await fetch(session, f"{daemon.gateway}/productpage") == (200, "productpage-v1")
        status, _ = await fetch(session, f"{daemon.gateway}/nowhere")
        assert status == 404


async def test_explicit_sidecar_routes_by_source_labels(shop: Shop, start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(shop.folder)
    async with aiohttp.ClientSession() as session:
        # productpage's sidecar: `sourceLabels: {app: productpage}` sends it to reviews v2
        proxy = f"http://127.0.0.1:{shop.sidecar}"
        assert await fetch(session, "http://reviews:9080/reviews/1", proxy=proxy) == (200, "reviews-v2")
        # the gateway has no source workload: the catch-all rule, v1
        assert await fetch(session, f"{daemon.gateway}/reviews/1") == (200, "reviews-v1")


async def test_admin_api(shop: Shop, start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(shop.folder)
    async with aiohttp.ClientSession() as session:
        assert (await fetch(session, f"{daemon.admin}/healthz"))[0] == 200
        assert (await fetch(session, f"{daemon.admin}/ready"))[0] == 200
        assert (await fetch(session, f"{daemon.gateway}/reviews/1"))[0] == 200

        dump = await daemon.config_dump(session)
        assert dump["generation"] == 1
        assert dump["sources"] == [str(shop.path)]
        assert dump["lastReloadError"] is None
        line = shop.path.read_text().splitlines().index("  - name: reviews-entry") + 1
        routes = [route for vs in dump["virtualServices"] for route in vs["http"]]  # type: ignore[attr-defined]
        entry = next(route for route in routes if route["name"] == "reviews-entry")
        assert entry["location"].startswith(f"{shop.path}:{line}:")
        kinds = {(listener["kind"], listener["port"]) for listener in dump["listeners"]}  # type: ignore[attr-defined]
        assert kinds == {("gateway", daemon.gateway_port), ("sidecar", shop.sidecar)}

        async with session.get(f"{daemon.admin}/clusters") as response:
            clusters = {c["name"]: c for c in (await response.json())["clusters"]}
        v1 = clusters["outbound|9080|v1|reviews.default.svc.cluster.local"]
        assert v1["endpoints"] == [
            {"address": "127.0.0.1", "port": shop.ports["reviews_v1"], "workload": "reviews-v1", "health": "healthy",
             "timesEjected": 0, "activeRequests": 0, "connections": 1, "successes": 1, "failures": 0}
        ]  # fmt: skip
        assert v1["circuitBreakers"] == {"activeRequests": 0, "pending": 0, "connections": 1, "retries": 0,
                                         "overflows": 0}  # fmt: skip
        assert "LEAST_REQUEST" in v1["policy"]

        status, stats = await fetch(session, f"{daemon.admin}/stats")
        assert status == 200
        prefix = "cluster.outbound|9080|v1|reviews.default.svc.cluster.local."
        for stat in ("upstream_rq_active: 0", "upstream_rq_pending_overflow: 0",
                     "outlier_detection.ejections_active: 0", "upstream_rq_total: 1", "upstream_rq_2xx: 1"):  # fmt: skip
            assert prefix + stat in stats.splitlines()

        async with session.get(f"{daemon.admin}/metrics") as response:
            assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
            metrics = await response.text()
        assert "# TYPE istio_requests_total counter" in metrics
        assert "# TYPE istio_request_duration_milliseconds histogram" in metrics
        assert "# TYPE istio_tcp_connections_opened_total counter" in metrics
        total = re.search(r"^istio_requests_total\{([^}]*)\} (\d+)$", metrics, re.MULTILINE)
        assert total is not None and total.group(2) == "1"
        labels = dict(re.findall(r'(\w+)="([^"]*)"', total.group(1)))
        assert labels["response_code"] == "200"
        assert labels["reporter"] == "source"
        assert labels["source_workload"] == "istio-ingressgateway"
        assert labels["destination_workload"] == "reviews-v1"
        assert labels["destination_version"] == "v1"
        assert labels["destination_service"] == "reviews.default.svc.cluster.local"
        assert labels["destination_service_name"] == "reviews"
        assert labels["response_flags"] == "-"
        assert "istio_request_duration_milliseconds_bucket{" in metrics and 'le="+Inf"} 1' in metrics

        async with session.get(f"{daemon.admin}/logging") as response:
            assert await response.json() == {"level": "info"}
        async with session.post(f"{daemon.admin}/logging?level=debug") as response:
            assert response.status == 200
        async with session.get(f"{daemon.admin}/logging") as response:
            assert await response.json() == {"level": "debug"}
        async with session.post(f"{daemon.admin}/logging?level=loud") as response:
            assert response.status == 400


async def access_lines(daemon: Daemon, count: int) -> list[str]:
    """The access-log lines (stdout), once there are `count` of them."""
    await until(lambda: len(daemon.stdout().splitlines()) >= count, f"{count} access-log lines")
    return daemon.stdout().splitlines()


async def test_access_log(shop: Shop, start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(shop.folder)
    async with aiohttp.ClientSession() as session:
        await fetch(session, f"{daemon.gateway}/nowhere", headers={"user-agent": "probe/1", "x-request-id": "r-404"})
        await fetch(session, f"{daemon.gateway}/reviews/1", headers={"x-request-id": "r-200"})
        not_found, found = await access_lines(daemon, 2)
        time_ = r"\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\]"
        assert re.match(
            time_ + r' "GET /nowhere HTTP/1\.1" 404 NR route_not_found - "-" 0 0 \d+ - "-" "probe/1" "r-404" '
            rf'"127\.0\.0\.1:{daemon.gateway_port}" "-" - - 127\.0\.0\.1:{daemon.gateway_port} 127\.0\.0\.1:\d+ - - '
            r"istio-ingressgateway -$",
            not_found,
        ), not_found
        upstream = shop.ports["reviews_v1"]
        assert re.match(
            time_ + r' "GET /reviews/1 HTTP/1\.1" 200 - via_upstream - "-" 0 10 \d+ \d+ "-" "[^"]+" "r-200" '
            rf'"127\.0\.0\.1:{daemon.gateway_port}" "127\.0\.0\.1:{upstream}" '
            r"outbound\|9080\|v1\|reviews\.default\.svc\.cluster\.local - "
            rf"127\.0\.0\.1:{daemon.gateway_port} 127\.0\.0\.1:\d+ - VirtualService/default/entry#http\[0\] "
            r"istio-ingressgateway reviews-v1$",
            found,
        ), found

        # MeshConfig switches the encoding on reload
        config = "---\napiVersion: minimesh.dev/v1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {accessLogEncoding: JSON}\n"
        shop.write(shop.text(extra=config))
        await until(lambda: _generation_is(daemon, session, 2), "the JSON access log config live")
        await fetch(session, f"{daemon.gateway}/nowhere", headers={"x-request-id": "r-json"})
        record = json.loads((await access_lines(daemon, 3))[2])
        assert record["response_code"] == 404
        assert record["response_flags"] == "NR"
        assert record["request_id"] == "r-json"
        assert record["upstream_host"] is None
        assert record["source_workload"] == "istio-ingressgateway"


async def _generation_is(daemon: Daemon, session: aiohttp.ClientSession, wanted: int) -> bool:
    return await generation(daemon, session) == wanted


# ---------------------------------------------------------------- hot reload


async def test_reload_under_traffic_loses_nothing(shop: Shop, start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(shop.folder)
    results: list[tuple[int, str]] = []
    stop = asyncio.Event()
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as session,
        aiohttp.ClientSession() as admin,  # never queued behind the traffic's eight connections
    ):
        load = asyncio.create_task(traffic(session, f"{daemon.gateway}/reviews/1", results, clients=8, stop=stop))
        await until(lambda: len(results) >= 400, "400 requests before the reload")
        shop.write(shop.text(entry_subset="v2"))
        await until(lambda: _generation_is(daemon, admin, 2), "the reload")
        live = len(results)
        await until(lambda: len(results) >= live + 400, "400 requests after the reload")
        stop.set()
        sent = await load
        failed = [r for r in results if r[0] != 200]
        assert not failed, f"{len(failed)} of {len(results)} requests failed, e.g. {failed[:3]}"
        assert len(results) == sent
        assert results[0] == (200, "reviews-v1")
        assert (200, "reviews-v2") in results
        assert await fetch(session, f"{daemon.gateway}/reviews/1") == (200, "reviews-v2")


async def test_broken_reload_keeps_the_last_good_config(shop: Shop, start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(shop.folder)
    results: list[tuple[int, str]] = []
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        load = asyncio.create_task(traffic(session, f"{daemon.gateway}/reviews/1", results, clients=4, stop=stop))
        await until(lambda: len(results) >= 100, "100 requests before the broken edit")
        broken = shop.text().replace("subset: v1, port", "subset: v1, prot")
        shop.path.write_text(broken)  # in place, as some editors save
        line = broken.splitlines().index(next(x for x in broken.splitlines() if "prot:" in x)) + 1

        async def error_shown() -> bool:
            return (await daemon.config_dump(session))["lastReloadError"] is not None

        await until(error_shown, "the reload error in /config_dump")
        before = len(results)
        await until(lambda: len(results) >= before + 100, "100 requests after the refused reload")
        stop.set()
        await load
        dump = await daemon.config_dump(session)
        assert dump["generation"] == 1
        errors = dump["lastReloadError"]
        assert isinstance(errors, list) and len(errors) == 1
        assert errors[0].startswith(f"{shop.path}:{line}:")
        assert "error: unknown field 'prot'" in errors[0]
        assert f"{shop.path}:{line}:" in daemon.stderr()
        assert all(r == (200, "reviews-v1") for r in results), [r for r in results if r[0] != 200][:3]

        status = minimesh("status", "--admin", daemon.admin)
        assert status.returncode == 0
        assert "unknown field 'prot'" in status.stdout

        shop.write(shop.text(entry_subset="v2"))
        await until(lambda: _generation_is(daemon, session, 2), "the fixed file")
        assert (await daemon.config_dump(session))["lastReloadError"] is None
        assert await fetch(session, f"{daemon.gateway}/reviews/1") == (200, "reviews-v2")


async def test_reloads_in_a_row_each_go_live(shop: Shop, start_daemon: StartDaemon) -> None:
    """Each save is served once its generation is live (how fast is `make bench`'s to report)."""
    daemon = await start_daemon(shop.folder)
    async with aiohttp.ClientSession() as session:
        for number in range(2, 8):
            subset = "v2" if number % 2 == 0 else "v1"
            shop.write(shop.text(entry_subset=subset))
            await until(functools.partial(_generation_is, daemon, session, number), f"reload {number} live")
            assert await fetch(session, f"{daemon.gateway}/reviews/1") == (200, f"reviews-{subset}")


async def test_reload_reconciles_listeners(shop: Shop, start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(shop.folder)
    (reviews_sidecar,) = free_ports(1)
    async with aiohttp.ClientSession() as session:
        # the Gateway renamed (and the VirtualService bound to the new name); reviews-v1 gets a
        # sidecar; productpage-v1 loses its own
        shop.write(shop.text(gateway="shop", reviews_sidecar=reviews_sidecar, productpage_sidecar=False))

        async def reconciled() -> bool:
            listeners = (await daemon.config_dump(session))["listeners"]
            return [x["port"] for x in listeners] == [daemon.gateway_port, reviews_sidecar]  # type: ignore[attr-defined]

        await until(reconciled, "the sidecars reconciled")
        assert await fetch(session, f"{daemon.gateway}/reviews/1") == (200, "reviews-v1")
        proxy = f"http://127.0.0.1:{reviews_sidecar}"
        assert await fetch(session, "http://productpage:9080/", proxy=proxy) == (200, "productpage-v1")
        assert refused(shop.sidecar)
        listeners = (await daemon.config_dump(session))["listeners"]
        assert [(x["kind"], x["gateways"]) for x in listeners] == [  # type: ignore[attr-defined]
            ("gateway", ["default/shop"]),
            ("sidecar", []),
        ]
        status, _ = await fetch(session, f"{daemon.admin}/ready")
        assert status == 200


# ---------------------------------------------------------------- start and stop


async def test_sigterm_stops_cleanly(shop: Shop, start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(shop.folder)
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.gateway_port)
    writer.write(b"GET /reviews/1 HTTP/1.1\r\nhost: shop\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PATIENCE)
    assert head.startswith(b"HTTP/1.1 200")
    await reader.readexactly(len(b"reviews-v1"))  # a keep-alive connection, open and idle
    assert await asyncio.to_thread(daemon.stop) == 0
    assert await asyncio.wait_for(reader.read(), PATIENCE) == b""  # closed by the daemon
    writer.close()
    for port in (daemon.gateway_port, daemon.admin_port, shop.sidecar):
        assert refused(port), f"port {port} still accepts connections"
    assert "minimesh: stopping" in daemon.stderr()
    assert "Traceback" not in daemon.stderr()


def test_a_port_in_use_is_one_line(shop: Shop) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (admin,) = free_ports(1)
        done = minimesh("up", "--no-docker", "-f", str(shop.folder), "--gateway-port", str(port),
                        "--admin-port", str(admin), timeout=30)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == f"minimesh: error: port {port} is in use; pass --gateway-port"
    assert "Traceback" not in done.stderr


def test_invalid_config_at_start(shop: Shop) -> None:
    shop.write(shop.text().replace("hosts: [reviews]", "hosts: [reviews]\n  hots: [x]"))
    gateway, admin = free_ports(2)
    done = minimesh("up", "--no-docker", "-f", str(shop.folder), "--gateway-port", str(gateway),
                    "--admin-port", str(admin), timeout=30)  # fmt: skip
    assert done.returncode == 1
    assert re.search(rf"^{re.escape(str(shop.path))}:\d+:\d+: error: unknown field 'hots'", done.stderr, re.M)
    assert done.stderr.splitlines()[-1].startswith("minimesh: error: the config has 1 errors")


def test_capture_netns_without_docker_is_a_usage_error(shop: Shop) -> None:
    done = minimesh("up", "--capture", "netns", "--no-docker", "-f", str(shop.folder))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "cannot go with --no-docker" in done.stderr


# ---------------------------------------------------------------- status, wait, detach, down


async def test_status_and_wait(shop: Shop, start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(shop.folder, args=("--capture", "explicit"))
    assert minimesh("wait", "--admin", daemon.admin, "--timeout", "5").returncode == 0
    status = minimesh("status", "--admin", daemon.admin)
    assert status.returncode == 0, status.stderr
    out = status.stdout
    assert "config generation 1" in out
    assert "last reload error: none" in out
    assert (
        f"reviews.default.svc.cluster.local:9080  HTTP (declared)  127.0.0.1:{shop.ports['reviews_v1']} reviews-v1 healthy"
        in out
    )
    assert (
        f"productpage-v1.default  127.0.0.1  capture explicit sidecar (HTTP_PROXY=http://127.0.0.1:{shop.sidecar})"
        in out
    )
    assert "reviews-v1.default  127.0.0.1  capture none" in out

    assert await asyncio.to_thread(daemon.stop) == 0
    gone = minimesh("status", "--admin", daemon.admin)
    assert gone.returncode == 1
    assert gone.stderr.count("\n") == 1 and gone.stderr.startswith("minimesh: error: no daemon answers")
    assert minimesh("wait", "--admin", daemon.admin, "--timeout", "0.3").returncode == 1


async def test_detach_and_down(shop: Shop, tmp_path: Path) -> None:
    gateway, admin = free_ports(2)
    work = tmp_path / "work"
    work.mkdir()
    up = await asyncio.to_thread(
        minimesh, "up", "--detach", "--no-docker", "-f", str(shop.folder), "--gateway-port", str(gateway),
        "--admin-port", str(admin), cwd=work,
    )  # fmt: skip
    pid_file = work / ".minimesh" / "minimesh.pid"
    try:
        assert up.returncode == 0, up.stderr
        assert pid_file.is_file()
        async with aiohttp.ClientSession() as session:
            assert await fetch(session, f"http://127.0.0.1:{gateway}/reviews/1") == (200, "reviews-v1")
        assert "minimesh: ready" in (work / ".minimesh" / "minimesh.log").read_text()
    finally:
        down = await asyncio.to_thread(minimesh, "down", cwd=work)
    assert down.returncode == 0, down.stderr
    assert "stopped the daemon" in down.stdout
    assert not pid_file.exists()
    assert refused(gateway) and refused(admin)
    again = minimesh("down", cwd=work)
    assert again.returncode == 0 and "no detached daemon" in again.stdout


def test_detach_reports_a_daemon_that_died(shop: Shop, tmp_path: Path) -> None:
    shop.write(shop.text().replace("selector: {istio", "selectr: {istio"))
    gateway, admin = free_ports(2)
    up = minimesh("up", "--detach", "--no-docker", "-f", str(shop.folder), "--gateway-port", str(gateway),
                  "--admin-port", str(admin), cwd=tmp_path)  # fmt: skip
    assert up.returncode == 1
    assert f"{shop.path}:" in up.stderr and "error:" in up.stderr
    assert up.stderr.splitlines()[-1].startswith("minimesh: error: the daemon exited with code 1")
    assert not (tmp_path / ".minimesh" / "minimesh.pid").exists()


async def test_detach_again_finds_the_daemon_or_says_what_differs(shop: Shop, tmp_path: Path) -> None:
    gateway, admin, other = free_ports(3)
    work = tmp_path / "work"
    work.mkdir()
    ports = ("--gateway-port", str(gateway), "--admin-port", str(admin))
    first = await asyncio.to_thread(minimesh, "up", "--detach", "--no-docker", "-f", str(shop.folder), *ports, cwd=work)
    try:
        assert first.returncode == 0, first.stderr
        pid = (work / ".minimesh" / "minimesh.pid").read_text().strip()
        assert f"gateway http://127.0.0.1:{gateway}" in first.stdout
        relative = str(Path("..") / shop.folder.relative_to(tmp_path))  # the same folder, spelled otherwise
        again = await asyncio.to_thread(
            minimesh, "up", "--no-docker", "--bind", "127.0.0.1", "-f", relative, *ports, "--detach", cwd=work
        )
        assert again.returncode == 0, again.stderr
        assert again.stdout.startswith(f"minimesh: the daemon already runs (pid {pid}) with these settings: "
                                       f"gateway http://127.0.0.1:{gateway}, admin http://127.0.0.1:{admin}")  # fmt: skip
        changed = ("--gateway-port", str(other), "--admin-port", str(admin))
        different = minimesh("up", "--detach", "--no-docker", "-f", str(shop.folder), *changed, "--seed", "3", cwd=work)
        assert different.returncode == 1
        assert different.stderr == (
            f"minimesh: error: a detached daemon already runs (pid {pid}) with other settings (--gateway-port "
            f"{gateway}, not {other}; --seed (none), not 3); to replace it: minimesh down && minimesh up --detach "
            f"--no-docker -f {shop.folder} --gateway-port {other} --admin-port {admin} --seed 3\n"
        )
        assert refused(other)
        async with aiohttp.ClientSession() as session:
            assert await fetch(session, f"http://127.0.0.1:{gateway}/reviews/1") == (200, "reviews-v1")
    finally:
        down = await asyncio.to_thread(minimesh, "down", cwd=work)
    assert down.returncode == 0, down.stderr
    assert not (work / ".minimesh" / "minimesh.args").exists()
