"""bookinfo on the real engine behind `minimesh up --capture netns`: the Istio tasks, edited
live into mesh.yaml, seen as a user sees them through the gateway."""

from __future__ import annotations

import concurrent.futures
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter

from tests.conftest import BOOKINFO
from tests.docker.conftest import PATIENCE, Compose, Mesh

VARIANTS = BOOKINFO / "variants"
SERVED_BY = re.compile(r"Reviews served by:</dt><dd><u>([^<]*)</u>")


def page(mesh: Mesh, user: str | None = None, timeout: float = 30) -> str:
    request = urllib.request.Request(mesh.url("/productpage"))
    if user:
        request.add_header("Cookie", f"user={user}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.status == 200
        return response.read().decode()


def stars(html: str) -> str:
    """What the reviews part shows: 'none', 'black', 'red', or 'ratings-error'."""
    if "Ratings service is currently unavailable" in html:
        return "ratings-error"
    found = re.search(r'<font color="(\w+)" class="stars">', html)
    return found.group(1) if found else "none"


def test_productpage_shows_the_book_and_reviews_through_the_gateway(mesh: Mesh) -> None:
    html = page(mesh)
    assert "The Comedy of Errors" in html
    assert "William Shakespeare" in html
    assert SERVED_BY.search(html)
    assert stars(html) == "none"


def test_both_sidecars_report_a_call_as_istio_does(mesh: Mesh, bookinfo: Compose) -> None:
    page(mesh)
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    series = [dict(re.findall(r'(\w+)="([^"]*)"', line)) for line in text.splitlines()]
    details = "details.default.svc.cluster.local"
    calls = {
        (labels["reporter"], labels["source_workload"], labels["destination_workload"])
        for labels in series
        if labels.get("destination_service") == details and labels.get("response_code") == "200"
    }
    productpage, details_workload = bookinfo.container("productpage"), bookinfo.container("details")
    assert calls == {("source", productpage, details_workload), ("destination", productpage, details_workload)}
    callers = {
        labels["source_workload"]
        for labels in series
        if labels.get("reporter") == "destination" and labels.get("destination_workload") == productpage
    }
    assert callers == {"istio-ingressgateway"}


def test_all_v1_sends_every_request_to_reviews_v1(mesh: Mesh, bookinfo: Compose) -> None:
    mesh.apply(VARIANTS / "virtual-service-all-v1.yaml")
    served = {SERVED_BY.search(page(mesh)).group(1) for _ in range(12)}  # type: ignore[union-attr]
    assert {stars(page(mesh)) for _ in range(6)} == {"none"}
    assert len(served) == 1


def test_jason_sees_v2_by_his_cookie_and_others_v1(mesh: Mesh) -> None:
    mesh.apply(VARIANTS / "virtual-service-reviews-jason-v2.yaml")
    assert {stars(page(mesh, "jason")) for _ in range(6)} == {"black"}
    assert {stars(page(mesh)) for _ in range(6)} == {"none"}
    assert {stars(page(mesh, "alice")) for _ in range(6)} == {"none"}


def test_fifty_fifty_between_v1_and_v3(mesh: Mesh) -> None:
    mesh.apply(VARIANTS / "virtual-service-reviews-50-v3.yaml")
    seen = Counter(stars(page(mesh)) for _ in range(200))
    assert set(seen) == {"none", "red"}
    assert 60 <= seen["red"] <= 140, seen


def test_ratings_abort_for_jason(mesh: Mesh) -> None:
    mesh.apply(VARIANTS / "virtual-service-ratings-abort.yaml")
    assert stars(page(mesh, "jason")) == "ratings-error"
    assert stars(page(mesh)) == "none"


def test_ratings_delay_for_jason_times_out_reviews(mesh: Mesh) -> None:
    mesh.apply(VARIANTS / "virtual-service-ratings-delay.yaml")
    started = time.monotonic()
    html = page(mesh, "jason")
    took = time.monotonic() - started
    assert "Sorry, product reviews are currently unavailable for this book." in html
    assert took > 5.5, took  # productpage gave up on reviews twice (3 s each), as in Istio's task
    assert stars(page(mesh)) == "none"


def test_a_second_v3_replica_is_discovered_and_balanced(mesh: Mesh, bookinfo: Compose) -> None:
    mesh.apply(VARIANTS / "virtual-service-reviews-50-v3.yaml")
    bookinfo.run("up", "-d", "--scale", "reviews-v3=2", "--no-recreate")
    deadline = time.monotonic() + PATIENCE
    v3_hosts: set[str] = set()
    while len(v3_hosts) < 2 and time.monotonic() < deadline:
        html = page(mesh)
        if stars(html) == "red":
            v3_hosts.add(SERVED_BY.search(html).group(1))  # type: ignore[union-attr]
    assert len(v3_hosts) == 2, v3_hosts


def test_stopping_a_container_loses_no_request_for_the_others(mesh: Mesh, bookinfo: Compose) -> None:
    mesh.apply(VARIANTS / "virtual-service-reviews-50-v3.yaml")
    bookinfo.run("up", "-d", "--scale", "reviews-v3=2", "--no-recreate")
    victim = bookinfo.container("reviews-v3", 2)
    failures: list[str] = []

    def one() -> None:
        try:
            html = page(mesh, timeout=20)
        except (urllib.error.URLError, OSError) as exc:
            failures.append(repr(exc))
            return
        if "unavailable" in html:
            failures.append("reviews unavailable")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one) for _ in range(40)]
        subprocess.run(["docker", "stop", "-t", "2", victim], check=True, capture_output=True)
        futures += [pool.submit(one) for _ in range(80)]
        concurrent.futures.wait(futures, timeout=120)
    assert failures == []
