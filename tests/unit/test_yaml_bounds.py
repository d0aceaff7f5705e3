"""YAML bounded as Kubernetes bounds it: size, nesting and alias expansion have limits, and every
hostile input (bad tags and values, bombs, bytes that are not YAML) is a located error, never an
exception; `validate` prints it and exits 1."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimesh.cli import main
from minimesh.config.load import load_layers
from minimesh.config.source import MAX_DEPTH, allowed_alias_ratio, parse_text
from tests.hostile import HOSTILE, Hostile, alias_bomb


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda h: h.name)
def test_validate_prints_a_located_error_and_exits_1(
    hostile: Hostile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_bytes(hostile.data)
    assert main(["validate", "-f", str(path)]) == 1
    out, err = capsys.readouterr()
    assert err == ""
    located = [line for line in out.splitlines() if line.startswith(f"{path}:{hostile.where}: error: ")]
    assert located and hostile.message in located[0], out[:2000]
    assert out.splitlines()[-1].startswith("invalid: ")


def test_an_alias_bomb_is_refused_before_it_expands() -> None:
    text = alias_bomb(levels=9, fanout=10)  # 10**9 nodes once expanded
    tracemalloc.start()
    try:
        documents, problems = parse_text(text, "bomb.yaml")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert documents == []
    assert [str(p).split(": aliases")[0] for p in problems] == [
        "bomb.yaml:8:27: error: document contains excessive aliasing"
    ]
    assert peak < 5 * 1024 * 1024, f"refusing the bomb took {peak} bytes"


def test_go_yamls_aliasing_ratio() -> None:
    assert allowed_alias_ratio(1000) == allowed_alias_ratio(400_000) == 0.99
    assert allowed_alias_ratio(2_200_000) == pytest.approx(0.545)
    assert allowed_alias_ratio(4_000_000) == allowed_alias_ratio(10**9) == 0.10


def test_anchors_used_as_people_use_them_are_fine() -> None:
    """A shared policy repeated 300 times: aliases repeat most of the nodes, within Go's ratio."""
    policy = "  policy: &p {connectionPool: {tcp: {maxConnections: 1}}, outlierDetection: {consecutive5xxErrors: 1}}\n"
    users = "".join(f"  u{i}: *p\n" for i in range(300))
    documents, problems = parse_text("spec:\n" + policy + users, "x.yaml")
    assert problems == []
    assert documents[0].body["spec"]["u299"]["connectionPool"]["tcp"]["maxConnections"] == 1


def nested(depth: int) -> str:
    """A document whose deepest node is `depth` levels down (the root mapping is level 1)."""
    return "a: " + "[" * (depth - 1) + "]" * (depth - 1) + "\n"


def test_nesting_up_to_the_limit_is_fine_and_one_more_is_not() -> None:
    assert parse_text(nested(MAX_DEPTH), "x.yaml")[1] == []
    _, problems = parse_text(nested(MAX_DEPTH + 1), "x.yaml")
    assert [str(p) for p in problems] == [
        f"x.yaml:1:{3 + MAX_DEPTH}: error: YAML nested deeper than {MAX_DEPTH} levels; no Istio resource needs "
        "that many: flatten it"
    ]


def test_nesting_counts_what_aliases_repeat() -> None:
    chain = "".join(f"l{i}: &l{i} [*l{i - 1}]\n" for i in range(1, MAX_DEPTH + 5))
    _, problems = parse_text("l0: &l0 [x]\n" + chain, "x.yaml")
    assert len(problems) == 1
    assert "nested deeper than 100 levels once aliases are expanded" in str(problems[0])


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("a: !!str [1]\n", "x.yaml:1:4: error: the tag '!!str' does not fit a sequence; remove it"),
        (
            "a: !!set {b: null}\n",
            "x.yaml:1:4: error: unknown tag '!!set'; minimesh reads YAML's standard tags only: remove it",
        ),
        (
            "a: !custom b\n",
            "x.yaml:1:4: error: unknown tag '!custom'; minimesh reads YAML's standard tags only: remove it",
        ),
        ("a: !!map b\n", "x.yaml:1:4: error: the tag '!!map' does not fit a scalar; remove it"),
        (
            "a: !!timestamp nope\n",
            "x.yaml:1:4: error: 'nope' is not a valid !!timestamp; write a valid one, or quote it to make it a string",
        ),
        (
            "? !!int abc\n: 1\n",
            "x.yaml:1:3: error: 'abc' is not a valid !!int (invalid literal for int() with base 10: 'abc'); write a valid one, or quote it to make it a string",
        ),
    ],
)
def test_tags_that_do_not_fit_are_located(text: str, error: str) -> None:
    _, problems = parse_text(text, "x.yaml")
    assert [str(p) for p in problems] == [error]


def test_plain_values_pyyaml_would_refuse_are_strings_or_located() -> None:
    documents, problems = parse_text("a: =\nb: 2001-12-14\n", "x.yaml")
    assert problems == []
    assert documents[0].body["a"] == "="
    _, problems = parse_text("a: 2001-13-45\n", "x.yaml")
    assert [str(p).split(" (")[0] for p in problems] == ["x.yaml:1:4: error: '2001-13-45' is not a valid !!timestamp"]


def test_an_aliased_mapping_with_a_merge_key_builds_the_same_each_time() -> None:
    text = "base: &b {a: 1, b: 2}\nmid: &m\n  <<: *b\n  b: 3\nx: *m\ny: *m\n"
    documents, problems = parse_text(text, "x.yaml")
    assert problems == []
    assert documents[0].body["x"] == documents[0].body["y"] == {"a": 1, "b": 3}


TOKENS = st.sampled_from(
    ["a", "b: ", "- ", "\n", "  ", "[", "]", "{", "}", ", ", ": ", "&x ", "*x", "&y ", "*y", "<<: ", "!!int ",
     "!!float ", "!!bool ", "!!timestamp ", "!!str ", "!!binary ", "!!set ", "!foo ", "? ", "'", '"', "#", "---\n",
     "...\n", "|\n", ">\n", "%YAML 1.1\n", "2001-13-45", "1e999", "9" * 50, ".nan", "~", "=", "\t", "\x00", "é",
     "\ud800", "\x85", "\ufeff", "apiVersion: networking.istio.io/v1\n", "kind: VirtualService\n"]
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TOKENS, max_size=60))
def test_any_text_is_documents_or_located_problems(tokens: list[str]) -> None:
    text = "".join(tokens)
    documents, problems = parse_text(text, "x.yaml")
    loaded = load_layers([documents], problems)
    lines = text.count("\n") + text.count("\x85") + 2
    for problem in loaded.problems:
        assert problem.location.file == "x.yaml"
        assert 1 <= problem.location.line <= lines and problem.location.col >= 1, problem


@settings(max_examples=60, deadline=None)
@given(levels=st.integers(1, 12), fanout=st.integers(1, 12))
def test_alias_trees_are_either_small_or_refused(levels: int, fanout: int) -> None:
    documents, problems = parse_text(alias_bomb(levels, fanout), "x.yaml")
    if problems:
        assert "excessive aliasing" in str(problems[0]) or "nested deeper" in str(problems[0])
    else:
        assert fanout**levels <= 400_000
        assert len(documents[0].body["spec"]) == 1 + levels
