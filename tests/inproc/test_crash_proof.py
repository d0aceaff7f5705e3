"""Nothing a user writes or sends takes the daemon down (issue 12): a reload can fail, the daemon
cannot. Each hostile file saved into a running daemon's mesh.yaml under steady traffic is refused
with its location while the last good config serves every request; `apply` and overlays answer
4xx; a failure of minimesh itself is a logged, counted bug and every background task runs on."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from minimesh.admin.app import build_app
from minimesh.config.source import MAX_DOCUMENT_BYTES
from minimesh.daemon import Daemon, Options, compile_config, converge, pipeline
from minimesh.daemon import runtime as daemon_module
from minimesh.errors import ConfigError
from minimesh.registry.model import Origin, Workload
from minimesh.registry.watch import Discovered
from tests.hostile import HOSTILE, Hostile
from tests.inproc.conftest import Shop, StartDaemon, minimesh
from tests.inproc.test_daemon import fetch, traffic
from tests.inproc.upstreams import PATIENCE, until

YAML = {"content-type": "application/yaml"}


def peak_rss_kib(pid: int) -> int:
    """The most memory process `pid` has held (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


def save(path: Path, data: bytes) -> None:
    """Replace the file whole, as editors save."""
    aside = path.with_suffix(".tmp")
    aside.write_bytes(data)
    os.replace(aside, path)


# ---------------------------------------------------------------- the daemon as a user runs it


async def test_hostile_files_saved_under_traffic_lose_no_request(shop: Shop, start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(shop.folder)
    results: list[tuple[int, str]] = []
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session, aiohttp.ClientSession() as clients:
        load = asyncio.create_task(traffic(clients, f"{daemon.gateway}/reviews/1", results, clients=4, stop=stop))
        await until(lambda: len(results) >= 50, "traffic flowing")
        peak_before = peak_rss_kib(daemon.process.pid)
        for number, hostile in enumerate(HOSTILE, start=1):
            save(shop.path, hostile.data)

            async def refused(hostile: Hostile = hostile) -> bool:
                errors = (await daemon.config_dump(session))["lastReloadError"] or []
                assert isinstance(errors, list)
                return any(
                    e.startswith(f"{shop.path}:{hostile.where}: error: ") and hostile.message in e for e in errors
                )

            await until(refused, f"the reload of '{hostile.name}' refused with its location")
            dump = await daemon.config_dump(session)
            assert dump["generation"] == 1
            assert isinstance(dump["reloadsRejected"], int) and dump["reloadsRejected"] >= number
            assert daemon.process.poll() is None, daemon.stderr()
        grown = peak_rss_kib(daemon.process.pid) - peak_before
        assert grown < 64 * 1024, f"the hostile files took the daemon's peak memory up by {grown} KiB"
        status = minimesh("status", "--admin", daemon.admin)
        assert status.returncode == 0 and "still serving the generation above" in status.stdout

        shop.write(shop.text(entry_subset="v2"))

        async def fixed() -> bool:
            return (await daemon.config_dump(session))["generation"] == 2

        await until(fixed, "the good file after the hostile ones")
        await until(lambda: len(results) > 100, "more than 100 requests through it all")
        stop.set()
        await load
        assert await fetch(session, f"{daemon.gateway}/reviews/1") == (200, "reviews-v2")
        dump = await daemon.config_dump(session)
        assert dump["lastReloadError"] is None and dump["internalErrors"] == 0
    failed = [r for r in results if r[0] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed, e.g. {failed[:3]}"
    assert len(results) > 100
    assert "Traceback" not in daemon.stderr()


async def test_hostile_bodies_to_apply_and_overlays_are_4xx(shop: Shop, start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(shop.folder)
    async with aiohttp.ClientSession() as session:
        for hostile in HOSTILE:
            async with session.post(f"{daemon.admin}/apply?source=x.yaml", data=hostile.data, headers=YAML) as answer:
                text = await answer.text()
                big = len(hostile.data) > MAX_DOCUMENT_BYTES
                assert answer.status == (413 if big else 400), (hostile.name, text)
                assert hostile.message in text, (hostile.name, text)
                if not big:
                    assert text.startswith(f"x.yaml:{hostile.where}: error: "), (hostile.name, text)
            async with session.post(f"{daemon.admin}/overlays", data=hostile.data, headers=YAML) as answer:
                text = await answer.text()
                assert answer.status in (400, 413) and hostile.message in text, (hostile.name, text)
                if answer.status == 400:
                    assert text.startswith(f"{hostile.where}: error: "), (hostile.name, text)
        cases = [
            ({"content-type": "image/png"}, b"kind: x", 415, "Content-Type image/png is neither YAML nor JSON"),
            ({"content-type": "application/x-www-form-urlencoded"}, b"a=b", 415, "neither YAML nor JSON"),
            ({"content-type": "application/yaml; charset=klingon"}, b"a: b", 415, "charset klingon"),
            ({"content-type": "application/yaml; charset=latin-1"}, b"a: b", 415, "send UTF-8"),
            ({"content-type": "application/json"}, b'{"kind": ', 400, "invalid YAML"),
            ({"content-type": "application/yaml"}, b"", 400, "no documents to apply"),
            ({}, b"\xff\xfe", 400, "not UTF-8"),
        ]
        for headers, body, status, reason in cases:
            for path in ("/apply", "/overlays"):
                post = session.post(
                    f"{daemon.admin}{path}", data=body, headers=headers, skip_auto_headers=["content-type"]
                )
                async with post as answer:
                    text = await answer.text()
                    assert (answer.status, reason in text) == (status, True), (path, headers, text)
        async with session.post(f"{daemon.admin}/apply?source=a%0Ab", data=b"a: b", headers=YAML) as answer:
            assert answer.status == 400
        async with session.post(f"{daemon.admin}/overlays?ttl=forever", data=b"a: b", headers=YAML) as answer:
            assert answer.status == 400
        dump = await daemon.config_dump(session)
        assert dump["generation"] == 1 and dump["internalErrors"] == 0
        assert await fetch(session, f"{daemon.gateway}/reviews/1") == (200, "reviews-v1")
    assert "Traceback" not in daemon.stderr()


# ---------------------------------------------------------------- minimesh's own failures


def daemon_of(shop: Shop) -> Daemon:
    options = Options(paths=(str(shop.path),), gateway_port=0, admin_port=0)
    return Daemon(options, compile_config(options.paths, 1))


def broken(*args: object, **kwargs: object) -> None:
    raise RecursionError("a bug in the loader")


async def test_a_bug_in_the_loader_refuses_the_reload_and_shows_as_a_bug(
    shop: Shop, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = daemon_of(shop)
    monkeypatch.setattr(converge, "compile_all", broken)
    with caplog.at_level(logging.ERROR, logger="minimesh"):
        await daemon.reload()
        with pytest.raises(ConfigError) as applied:
            await daemon.apply("kind: x\n", "applied.yaml")
    assert daemon.current.get().generation == 1
    assert daemon.internal_errors == 2
    assert daemon.reloads_rejected == 1
    assert daemon.config.error == (
        f"{shop.path}:1:1: error: internal error in minimesh while loading this config: RecursionError('a bug in "
        "the loader'); the daemon's log has its traceback (please report it)",
    )
    assert str(applied.value) == daemon.config.error[0]
    tracebacks = [r for r in caplog.records if r.exc_info and "internal error while loading" in r.getMessage()]
    assert len(tracebacks) == 2


async def test_no_background_task_ends_the_daemon(
    shop: Shop, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(daemon_module, "RESTART_DELAY", 0.01)
    monkeypatch.setattr(daemon_module, "settle_heap", lambda: None)  # not in the test runner's process
    watching = Daemon._watch
    starts = 0

    async def flaky_watch(self: Daemon) -> None:
        nonlocal starts
        starts += 1
        if starts == 1:
            raise OSError("the watched folder went away")
        if starts == 2:
            return  # ended on its own, as if the watcher had nothing more to say
        await watching(self)

    monkeypatch.setattr(Daemon, "_watch", flaky_watch)
    daemon = daemon_of(shop)
    running = asyncio.create_task(daemon.run())
    try:
        await until(lambda: daemon.ready and starts == 3, "the watcher running again")
        assert daemon.internal_errors == 1

        compiling = pipeline.compile_snapshot
        monkeypatch.setattr(pipeline, "compile_snapshot", broken)
        container = Workload(name="web-1", address="172.18.0.5", labels=(("app", "web"),), origin=Origin.CONTAINER)
        daemon._discovered(Discovered((container,)))  # the containers changed, and recompiling fails
        await until(lambda: daemon.internal_errors == 2, "the failed recompile counted")
        monkeypatch.setattr(pipeline, "compile_snapshot", compiling)

        loop = asyncio.get_running_loop()
        loop.call_exception_handler({"message": "Task exception was never retrieved", "exception": KeyError("x")})
        assert daemon.internal_errors == 3

        shop.write(shop.text(entry_subset="v2"))  # the restarted watcher still reloads
        await until(lambda: daemon.current.get().generation >= 2, "the reload after the restarts")
        assert not running.done() and daemon.ready
    finally:
        daemon.stop()
        await asyncio.wait_for(running, PATIENCE)
    messages = [r.getMessage() for r in caplog.records if r.exc_info]
    assert sum("background task 'watch config files'" in m for m in messages) == 1
    assert "minimesh: the background task 'watch config files' ended while the daemon runs" in caplog.messages
    assert sum("internal error while loading" in m for m in messages) == 1


# ---------------------------------------------------------------- fuzzing the admin API

MESH = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: web}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
"""
GOOD = b"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: entry}
spec:
  hosts: ["*"]
  gateways: [web]
  http: [{route: [{destination: {host: reviews, port: {number: 9080}}}]}]
"""
ROUTES = [("POST", "/apply"), ("POST", "/overlays")] * 4 + [
    ("DELETE", "/apply"), ("DELETE", "/overlays/ov-1"), ("POST", "/logging"), ("GET", "/config_dump"),
    ("PUT", "/apply"), ("GET", "/nowhere"),
]  # fmt: skip
QUERY = ["", "?ttl=1s", "?ttl=%ff", "?ttl=-1s", "?ttl=99999999999999999h", "?scope=%00", "?source=%ff%fe",
         "?source=a%0Ab", "?level=%C3%28", "?level=debug", "?scope=s&ttl=0s", "?%zz=1"]  # fmt: skip
TYPES = [None, "application/yaml", "application/json", "text/yaml; charset=UTF-8", "image/png", "text/plain",
         "application/yaml; charset=klingon", "application/yaml; charset=", "multipart/form-data; boundary=x",
         "a/b;;;=", "application/json; charset=utf-16"]  # fmt: skip


def flip(data: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(len(data))
    return data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]


bodies = st.one_of(
    st.sampled_from([h.data for h in HOSTILE if len(h.data) < 10_000]),
    st.binary(max_size=300),
    st.builds(flip, st.just(GOOD), st.randoms(use_true_random=False)),
    st.just(GOOD),
    st.just(b'{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": [}'),
)


def test_the_admin_api_answers_bad_input_with_4xx_never_5xx(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(MESH)
    options = Options(paths=(str(tmp_path / "mesh.yaml"),))
    loop = asyncio.new_event_loop()
    daemon = Daemon(options, compile_config(options.paths, 1))
    runner = web.AppRunner(build_app(daemon), access_log=None)
    try:
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        admin = f"http://127.0.0.1:{runner.addresses[0][1]}"

        async def ask(method: str, url: str, content_type: str | None, body: bytes) -> tuple[int, str]:
            headers = {} if content_type is None else {"content-type": content_type}
            async with (
                aiohttp.ClientSession() as session,
                session.request(
                    method, URL(url, encoded=True), data=body, headers=headers, skip_auto_headers=["content-type"]
                ) as answer,
            ):
                return answer.status, await answer.text(errors="replace")

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(ROUTES), st.sampled_from(QUERY), st.sampled_from(TYPES), bodies)
        def one(route: tuple[str, str], query: str, content_type: str | None, body: bytes) -> None:
            method, path = route
            status, text = loop.run_until_complete(ask(method, admin + path + query, content_type, body))
            assert status < 500, (method, path, query, content_type, body[:200], status, text)
            if status in (413, 415):
                assert text.count("\n") == 1 and text.startswith("error: "), text

        one()
        assert daemon.internal_errors == 0
    finally:
        loop.run_until_complete(runner.cleanup())
        loop.close()
