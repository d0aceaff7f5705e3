"""Layers of documents merged as `kubectl apply` would: a later layer replaces the resource of
the same kind, namespace and name in the place the first one held, adds the rest after, and a
duplicate inside one layer is an error. The daemon's layers over the files (applied documents,
then unscoped overlays, then a scope's own) are stacked in that order."""

from __future__ import annotations

from dataclasses import replace

import pytest

from minimesh.config.load import Layer, Loaded, load_layers
from minimesh.config.source import Document, parse_text
from minimesh.overlays import Layers, Overlay


def vs(name: str, host: str, namespace: str | None = None) -> str:
    where = f", namespace: {namespace}" if namespace else ""
    return f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}{where}}}
spec: {{hosts: [{host}], http: [{{route: [{{destination: {{host: {host}}}}}]}}]}}
"""


def dr(name: str, host: str) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}}}
spec: {{host: {host}}}
"""


def layer(number: int, *documents: str) -> Layer:
    parsed, problems = parse_text("---\n".join(documents), f"layer{number}.yaml")
    assert problems == []
    return parsed


def load(*layers: tuple[str, ...]) -> Loaded:
    return load_layers([layer(number, *documents) for number, documents in enumerate(layers)])


def virtual_services(loaded: Loaded) -> list[tuple[str, str, str]]:
    return [(vs.meta.namespace, vs.meta.name, vs.hosts[0]) for vs in loaded.mesh.virtual_services]


MERGES = {
    "a later layer replaces in place": (
        [(vs("a", "one"), vs("b", "two"), vs("c", "three")), (vs("b", "TWO"),)],
        [("default", "a", "one"), ("default", "b", "TWO"), ("default", "c", "three")],
    ),
    "new documents go after": (
        [(vs("a", "one"),), (vs("z", "last"), vs("b", "two"))],
        [("default", "a", "one"), ("default", "z", "last"), ("default", "b", "two")],
    ),
    "the last of three layers wins, still in the first place": (
        [(vs("a", "one"), vs("b", "two")), (vs("a", "mid"),), (vs("a", "top"),)],
        [("default", "a", "top"), ("default", "b", "two")],
    ),
    "another namespace is another resource": (
        [(vs("a", "one"),), (vs("a", "other", namespace="prod"),)],
        [("default", "a", "one"), ("prod", "a", "other")],
    ),
    "no namespace is the default namespace": (
        [(vs("a", "one"),), (vs("a", "again", namespace="default"),)],
        [("default", "a", "again")],
    ),
}


@pytest.mark.parametrize(("layers", "expected"), MERGES.values(), ids=MERGES.keys())
def test_later_layers_replace_by_kind_namespace_and_name(
    layers: list[tuple[str, ...]], expected: list[tuple[str, str, str]]
) -> None:
    loaded = load(*layers)
    assert loaded.errors == ()
    assert virtual_services(loaded) == expected


def test_another_kind_of_the_same_name_is_kept_beside() -> None:
    loaded = load((vs("reviews", "reviews"),), (dr("reviews", "reviews"),))
    assert virtual_services(loaded) == [("default", "reviews", "reviews")]
    assert [d.meta.name for d in loaded.mesh.destination_rules] == ["reviews"]


def test_a_replacement_is_noted_with_where_the_replaced_one_was() -> None:
    loaded = load((vs("a", "one"), vs("b", "two")), (vs("b", "TWO"),))
    notes = [(p.severity, str(p.location), p.message) for p in loaded.problems]
    assert notes == [("note", "layer1.yaml:1:1", "replaces VirtualService/b from layer0.yaml:6:1")]


def test_a_duplicate_inside_one_layer_is_an_error_and_the_first_stays() -> None:
    loaded = load((vs("a", "one"), vs("a", "two")))
    assert virtual_services(loaded) == [("default", "a", "one")]
    (error,) = loaded.errors
    assert error.message.startswith("VirtualService/a is defined twice (first at layer0.yaml:1:1)")


def test_an_invalid_replacement_is_an_error_and_replaces_nothing() -> None:
    broken = vs("b", "TWO").replace("hosts:", "hostz:")
    loaded = load((vs("a", "one"), vs("b", "two")), (broken,))
    assert virtual_services(loaded) == [("default", "a", "one"), ("default", "b", "two")]
    assert [p.severity for p in loaded.errors] == ["error"]


def test_every_document_of_every_layer_is_kept_in_order() -> None:
    loaded = load((vs("a", "one"), vs("b", "two")), (vs("b", "TWO"),))
    assert [(d.file, d.name) for d in loaded.documents] == [
        ("layer0.yaml", "a"),
        ("layer0.yaml", "b"),
        ("layer1.yaml", "b"),
    ]


# ---------------------------------------------------------------- the daemon's layers


def documents(text: str, source: str) -> tuple[Document, ...]:
    parsed, _ = parse_text(text, source)
    return tuple(parsed)


def test_applied_then_unscoped_overlays_then_the_scopes_own() -> None:
    layers = Layers()
    layers = replace(layers, applied=layers.with_applied(list(documents(vs("a", "applied"), "applied"))))
    for number, scope in enumerate((None, "alice", None, "bob")):
        overlay_id = layers.next_id()
        layers.overlays[overlay_id] = Overlay(overlay_id, documents(vs("a", f"ov{number}"), overlay_id), None, scope)

    def hosts(scope: str | None) -> list[list[str]]:
        return [[d.body["spec"]["hosts"][0] for d in found] for found in layers.layers(scope)]

    assert hosts(None) == [["applied"], ["ov0"], ["ov2"]]
    assert hosts("alice") == [["applied"], ["ov0"], ["ov2"], ["ov1"]]
    assert hosts("bob") == [["applied"], ["ov0"], ["ov2"], ["ov3"]]
    assert layers.scopes() == {"alice", "bob"}


def test_apply_replaces_an_applied_document_of_the_same_name() -> None:
    layers = Layers()
    layers = replace(
        layers, applied=layers.with_applied(list(documents(vs("a", "one") + "---\n" + vs("b", "two"), "x")))
    )
    merged = layers.with_applied(list(documents(vs("a", "ONE"), "y")))
    assert [(d.name, d.file) for d in merged.values()] == [("a", "y"), ("b", "x")]
    assert [d.file for d in layers.applied.values()] == ["x", "x"], "the layers held are not changed"
