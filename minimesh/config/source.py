"""Reads config files into plain documents that remember where every node was written.

The only place YAML is parsed: `-f` paths (files or folders) become `Document`s whose
`where(path)` gives the file, line and column of any field, for error messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from minimesh.errors import Location, Problem

FieldPath = tuple[str | int, ...]
Marks = Mapping[FieldPath, tuple[int, int]]
SPEC: FieldPath = ("spec",)


def field_path(path: FieldPath) -> str:
    """`("spec", "http", 0, "route")` → `http[0].route`; paths outside spec keep their root."""
    parts = path[1:] if path[:1] == SPEC else path
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


@dataclass(frozen=True, slots=True)
class Document:
    """One YAML document: its plain value and the position of each node in it."""

    file: str
    index: int
    body: Any
    values: Marks = field(repr=False)
    keys: Marks = field(repr=False)

    def where(self, path: FieldPath, *, key: bool = False) -> Location:
        """The location of `path` (its key when `key`), else of its nearest parent."""
        probe = tuple(path)
        while True:
            if key and probe in self.keys:
                line, col = self.keys[probe]
                return Location(self.file, line, col)
            if probe in self.values:
                line, col = self.values[probe]
                return Location(self.file, line, col)
            if not probe:
                return Location(self.file, 1, 1)
            probe = probe[:-1]

    @property
    def kind(self) -> str:
        return _str_field(self.body, "kind")

    @property
    def api_version(self) -> str:
        return _str_field(self.body, "apiVersion")

    @property
    def name(self) -> str:
        return _str_field(_mapping_field(self.body, "metadata"), "name")

    @property
    def namespace(self) -> str:
        return _str_field(_mapping_field(self.body, "metadata"), "namespace") or "default"

    @property
    def ref(self) -> str:
        """`Kind/name`, or `Kind/namespace/name` outside the default namespace."""
        if self.namespace == "default":
            return f"{self.kind}/{self.name}"
        return f"{self.kind}/{self.namespace}/{self.name}"


def _mapping_field(body: Any, key: str) -> Any:
    return body.get(key) if isinstance(body, dict) else None


def _str_field(body: Any, key: str) -> str:
    value = _mapping_field(body, key)
    return value if isinstance(value, str) else ""


class _Builder:
    """Turns composed YAML nodes into plain values, recording each node's mark."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.values: dict[FieldPath, tuple[int, int]] = {}
        self.keys: dict[FieldPath, tuple[int, int]] = {}
        self.problems: list[Problem] = []
        self._scalars = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, path: FieldPath) -> Any:
        self.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            explicit = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
            self._scalars.flatten_mapping(node)
            merged = len(node.value) - explicit
            result: dict[str, Any] = {}
            written: set[str] = set()
            for index, (key_node, value_node) in enumerate(node.value):
                key = self._key(key_node)
                if key in written:
                    self._error(key_node, f"duplicate key '{key}'")
                    continue
                if index >= merged:
                    written.add(key)
                child = (*path, key)
                self.keys[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                result[key] = self.build(value_node, child)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._scalars.construct_object(node, deep=True)

    def _key(self, node: yaml.Node) -> str:
        if not isinstance(node, yaml.ScalarNode):
            self._error(node, "a mapping key must be a plain string")
            return f"<key at line {node.start_mark.line + 1}>"
        value = self._scalars.construct_object(node)
        return value if isinstance(value, str) else str(value)

    def _error(self, node: yaml.Node, message: str) -> None:
        where = Location(self.file, node.start_mark.line + 1, node.start_mark.column + 1)
        self.problems.append(Problem(where, "error", message))


def parse_text(text: str, file: str) -> tuple[list[Document], list[Problem]]:
    """Every document in `text`; a syntax error yields one located problem and no documents."""
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        reason = exc.problem or exc.context or "invalid YAML"
        message = f"invalid YAML: {reason}; fix the syntax at this position"
        return [], [Problem(Location(file, line, col), "error", message)]
    except yaml.YAMLError as exc:
        return [], [Problem(Location(file, 1, 1), "error", f"invalid YAML: {exc}")]
    documents: list[Document] = []
    problems: list[Problem] = []
    for index, node in enumerate(nodes):
        if node is None:
            continue
        builder = _Builder(file)
        try:
            body = builder.build(node, ())
        except yaml.constructor.ConstructorError as exc:
            mark = exc.problem_mark
            where = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file, 1, 1)
            problems.append(Problem(where, "error", f"invalid YAML value: {exc.problem}"))
            continue
        problems.extend(builder.problems)
        if body is None:
            continue
        documents.append(Document(file, index, body, builder.values, builder.keys))
    return documents, problems


def expand(paths: Iterable[str]) -> tuple[list[Path], list[Problem]]:
    """Files named directly, and the `*.yaml`/`*.yml` files directly inside named folders."""
    files: list[Path] = []
    problems: list[Problem] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in {".yaml", ".yml"} and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            message = f"no such file or folder '{raw}'; pass an existing path with -f"
            problems.append(Problem(Location(raw, 1, 1), "error", message))
    return files, problems


def read_paths(paths: Iterable[str]) -> tuple[list[Document], list[Problem]]:
    """All config documents under `paths`; files of no Kubernetes-style document are noted and skipped."""
    files, problems = expand(paths)
    documents: list[Document] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(Location(str(path), 1, 1), "error", f"cannot read file: {exc}"))
            continue
        found, file_problems = parse_text(text, str(path))
        problems.extend(file_problems)
        config = [d for d in found if not _is_foreign(d)]
        if found and not config:
            note = "skipped: no document in this file has apiVersion and kind (not mesh config)"
            problems.append(Problem(Location(str(path), 1, 1), "note", note))
        documents.extend(config)
    return documents, problems


def _is_foreign(document: Document) -> bool:
    """A document with neither apiVersion nor kind is not mesh config (a compose file, say)."""
    body = document.body
    return not isinstance(body, dict) or ("apiVersion" not in body and "kind" not in body)
