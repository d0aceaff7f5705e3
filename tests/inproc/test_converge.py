"""The converge task, in process and without listeners: a burst of triggers is one compile; a
burst that fails is tried source by source, so each source keeps its last good version (as
`kubectl apply` and Istio do: one bad resource never holds back a good one) and its error goes
to that source with file and line; a failed compile keeps the default and scoped snapshots."""

from __future__ import annotations

import logging

import pytest

from minimesh.config.source import Document, parse_text
from minimesh.daemon import Daemon, Options, compile_config
from minimesh.daemon.runtime import with_applied
from minimesh.errors import ConfigError
from minimesh.registry.model import Origin, Workload
from minimesh.registry.watch import Discovered
from minimesh.routing.snapshot import Snapshot
from tests.inproc.conftest import Shop

ENTRY = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: entry}}
spec:
  hosts: ["*"]
  gateways: [web]
  http: [{{route: [{{destination: {{host: reviews, subset: {subset}, port: {{number: 9080}}}}}}]}}]
"""
EXTRA = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: extra}
spec:
  hosts: [extra.example]
  http: [{route: [{destination: {host: reviews, subset: v1}}]}]
"""
BAD = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: broken}
spec:
  hosts: 5
"""


def daemon_of(shop: Shop) -> Daemon:
    options = Options(paths=(str(shop.path),), gateway_port=0, admin_port=0)
    return Daemon(options, compile_config(options.paths, 1))


def entry_subset(snapshot: Snapshot) -> str | None:
    """The subset the VirtualService `entry` sends the gateway's requests to."""
    (entry,) = [vs for vs in snapshot.mesh.virtual_services if vs.meta.name == "entry"]
    return entry.http[0].route[0].destination.subset


def applying(text: str, source: str = "applied.yaml") -> list[Document]:
    documents, problems = parse_text(text, source)
    assert not problems
    return list(documents)


def container(number: int) -> Workload:
    return Workload(
        name=f"web-{number}", address=f"172.18.0.{number}", labels=(("app", "web"),), origin=Origin.CONTAINER
    )


async def test_a_burst_of_triggers_is_one_compile(shop: Shop) -> None:
    daemon = daemon_of(shop)
    shop.write(shop.text(entry_subset="v2"))
    for number in range(1, 6):
        daemon.converger.files_changed()
        daemon.converger.containers(Discovered(tuple(container(n) for n in range(1, number + 1))))
    await daemon.converger.settled()
    assert daemon.converger.compiles == 1
    snapshot = daemon.current.get()
    assert snapshot.generation == 2
    assert entry_subset(snapshot) == "v2"
    assert {w.name for w in snapshot.workloads} >= {f"web-{n}" for n in range(1, 6)}


async def test_a_bad_apply_in_a_burst_does_not_hold_back_a_good_file_change(shop: Shop) -> None:
    daemon = daemon_of(shop)
    shop.write(shop.text(entry_subset="v2"))
    daemon.converger.files_changed()
    with pytest.raises(ConfigError) as refused:
        await daemon.converger.propose(with_applied(applying(BAD)))
    await daemon.converger.settled()
    assert str(refused.value).startswith("applied.yaml:5:")
    assert "(VirtualService/broken hosts)" in str(refused.value)
    snapshot = daemon.current.get()
    assert entry_subset(snapshot) == "v2", "the good file change is live"
    assert daemon.layers.applied == {}, "the applied layer keeps its last good version"
    assert daemon.config.error is None and daemon.reloads_rejected == 0
    assert daemon.converger.compiles == 3, "together, then the files, then the apply"


async def test_a_bad_apply_in_a_burst_does_not_hold_back_new_containers(shop: Shop) -> None:
    daemon = daemon_of(shop)
    daemon.converger.containers(Discovered((container(1),)))
    with pytest.raises(ConfigError):
        await daemon.converger.propose(with_applied(applying(BAD)))
    await daemon.converger.settled()
    assert "web-1" in {w.name for w in daemon.current.get().workloads}
    assert daemon.layers.applied == {}


async def test_a_bad_file_edit_in_a_burst_does_not_hold_back_a_good_apply(shop: Shop) -> None:
    daemon = daemon_of(shop)
    shop.write(shop.text(extra="---\n" + BAD))
    daemon.converger.files_changed()
    generation = await daemon.converger.propose(with_applied(applying(ENTRY.format(subset="v2"))))
    await daemon.converger.settled()
    snapshot = daemon.current.get()
    assert snapshot.generation == generation == 2
    assert entry_subset(snapshot) == "v2", "the apply is live, over the last good files"
    assert "broken" not in {vs.meta.name for vs in snapshot.mesh.virtual_services}
    assert daemon.reloads_rejected == 1
    assert daemon.config.error is not None
    assert any(line.startswith(f"{shop.path}:") and "broken" in line for line in daemon.config.error)


async def test_a_failed_compile_keeps_the_default_and_scoped_snapshots_together(shop: Shop) -> None:
    daemon = daemon_of(shop)
    _, generation = await daemon.add_overlay(ENTRY.format(subset="v2"), None, "alice")
    kept = daemon.current.get()
    assert (kept.generation, kept.scoped["alice"].generation) == (generation, generation)

    shop.write(shop.text(extra="---\n" + BAD))
    await daemon.reload()
    assert daemon.current.get() is kept and daemon.reloads_rejected == 1

    shop.write(shop.text(extra="---\n" + EXTRA))
    await daemon.reload()
    swapped = daemon.current.get()
    scoped = swapped.scoped["alice"]
    assert swapped.generation == scoped.generation == generation + 1
    assert all("extra" in {vs.meta.name for vs in found.mesh.virtual_services} for found in (swapped, scoped))
    assert entry_subset(swapped) == "v1" and entry_subset(scoped) == "v2"


async def test_a_crash_in_the_converge_task_is_counted_logged_and_the_next_trigger_still_converges(
    shop: Shop, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = daemon_of(shop)
    reconcile = Daemon.reconcile

    async def crashes(self: Daemon, snapshot: Snapshot) -> None:
        raise RuntimeError("a bug after the swap")

    monkeypatch.setattr(Daemon, "reconcile", crashes)
    with caplog.at_level(logging.ERROR, logger="minimesh"):
        generation = await daemon.converger.propose(with_applied(applying(ENTRY.format(subset="v2"))))
        await daemon.converger.settled()
    assert generation == daemon.current.get().generation == 2, "live before the listeners were reconciled"
    assert daemon.internal_errors == 1
    assert [r.exc_info is not None for r in caplog.records if "background task 'converge'" in r.getMessage()] == [True]

    monkeypatch.setattr(Daemon, "reconcile", reconcile)
    shop.write(shop.text(extra="---\n" + EXTRA))
    await daemon.reload()
    snapshot = daemon.current.get()
    assert snapshot.generation == 3 and entry_subset(snapshot) == "v2"
    assert "extra" in {vs.meta.name for vs in snapshot.mesh.virtual_services}
