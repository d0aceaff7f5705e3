"""`minimesh apply` and the overlays API on a running daemon: layered over the files,
validated first (a bad one changes nothing), dropped on reset, on DELETE or when their TTL ends."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.inproc.conftest import Shop, StartDaemon, minimesh
from tests.inproc.test_daemon import fetch, generation
from tests.inproc.upstreams import until

TO_V2 = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: entry}
spec:
  hosts: ["*"]
  gateways: [web]
  http:
  - route: [{destination: {host: reviews, subset: v2, port: {number: 9080}}}]
"""
YAML = {"content-type": "application/yaml"}


async def test_apply_replaces_a_document_and_reset_drops_it(
    shop: Shop, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(shop.folder)
    change = tmp_path / "to-v2.yaml"
    change.write_text(TO_V2)
    async with aiohttp.ClientSession() as session:
        assert await fetch(session, f"{daemon.gateway}/reviews") == (200, "reviews-v1")
        applied = minimesh("apply", "--admin", daemon.admin, "-f", str(change))
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout.startswith(f"minimesh: applied {change}: generation ")
        assert await fetch(session, f"{daemon.gateway}/reviews") == (200, "reviews-v2")
        assert await fetch(session, f"{daemon.gateway}/productpage") == (200, "reviews-v2"), (
            "the whole entry was replaced"
        )
        reset = minimesh("apply", "--admin", daemon.admin, "--reset")
        assert reset.returncode == 0
        assert await fetch(session, f"{daemon.gateway}/reviews") == (200, "reviews-v1")


async def test_a_bad_apply_changes_nothing(shop: Shop, start_daemon: StartDaemon, tmp_path: Path) -> None:
    daemon = await start_daemon(shop.folder)
    bad = tmp_path / "bad.yaml"
    bad.write_text(TO_V2.replace("subset: v2", "subsett: v2"))
    async with aiohttp.ClientSession() as session:
        before = await generation(daemon, session)
        done = minimesh("apply", "--admin", daemon.admin, "-f", str(bad))
        assert done.returncode == 1
        assert done.stdout.startswith(f"{bad}:8:43: error: unknown field 'subsett'; did you mean 'subset'?")
        assert await generation(daemon, session) == before
        assert await fetch(session, f"{daemon.gateway}/reviews") == (200, "reviews-v1")


def test_apply_without_a_daemon_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text(TO_V2)
    done = minimesh("apply", "--admin", "http://127.0.0.1:9", "-f", str(tmp_path / "x.yaml"))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "no daemon answers" in done.stderr


async def test_overlay_with_a_ttl_lives_and_ends(shop: Shop, start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(shop.folder)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.admin}/overlays?ttl=1s", data=TO_V2, headers=YAML) as response:
            assert response.status == 201
            created = await response.json()
        assert created["id"].startswith("ov-")
        assert await fetch(session, f"{daemon.gateway}/reviews") == (200, "reviews-v2")
        async with session.get(f"{daemon.admin}/overlays") as response:
            listed = await response.json()
        assert [o["id"] for o in listed["overlays"]] == [created["id"]]
        assert 0 <= listed["overlays"][0]["expiresIn"] <= 1

        async def back_to_v1() -> bool:
            return await fetch(session, f"{daemon.gateway}/reviews") == (200, "reviews-v1")

        await until(back_to_v1, "the overlay expired")


async def test_overlay_delete_and_a_bad_overlay(shop: Shop, start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(shop.folder)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.admin}/overlays", data=TO_V2.replace("v2", "v3x"), headers=YAML) as response:
            assert response.status == 201
            overlay = await response.json()
        async with session.delete(f"{daemon.admin}/overlays/{overlay['id']}") as response:
            assert response.status == 204
        async with session.delete(f"{daemon.admin}/overlays/{overlay['id']}") as response:
            assert response.status == 404
        async with session.post(
            f"{daemon.admin}/overlays", data="kind: VirtualService\nmetadata: {name: x\n", headers=YAML
        ) as response:
            assert response.status == 400
            text = await response.text()
        assert text.startswith("3:1: error: invalid YAML: ")
        assert await fetch(session, f"{daemon.gateway}/reviews") == (200, "reviews-v1")


async def test_a_scoped_overlay_applies_only_to_its_tests_requests(shop: Shop, start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(shop.folder)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.admin}/overlays?scope=test-42", data=TO_V2, headers=YAML) as response:
            assert response.status == 201
        url = f"{daemon.gateway}/reviews"
        assert await fetch(session, url, headers={"x-minimesh-test": "test-42"}) == (200, "reviews-v2")
        assert await fetch(session, url, headers={"x-minimesh-test": "other"}) == (200, "reviews-v1")
        assert await fetch(session, url) == (200, "reviews-v1")
