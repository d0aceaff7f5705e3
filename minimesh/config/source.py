"""Reads config files into plain documents that remember where every node was written.

The only place YAML is parsed: `-f` paths (files or folders) become `Document`s whose
`where(path)` gives the file, line and column of any field, for error messages. YAML is
bounded as Kubernetes bounds it (size, nesting, alias expansion); every bad input is a problem.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from minimesh.config.names import shown_ref
from minimesh.errors import Location, Problem

FieldPath = tuple[str | int, ...]
Marks = Mapping[FieldPath, tuple[int, int]]
SPEC: FieldPath = ("spec",)

MAX_DOCUMENT_BYTES = 3 * 1024 * 1024
"""The largest config file or request body: the Kubernetes API server's request limit."""
MAX_DEPTH = 100
"""The deepest nesting of a document, aliases expanded. Go's YAML (kubectl, Istio) stops at
10000 levels; Python's stack holds far fewer, and no Istio resource nests past about 20."""
ALIAS_RATIO_LOW = 400_000
ALIAS_RATIO_HIGH = 4_000_000
"""Go yaml's excessive-aliasing rule: once a document has decoded more than 1000 nodes, more
than 100 of them through aliases, the share from aliases may be 99% up to 400,000 nodes,
falling evenly to 10% at 4,000,000 nodes."""
TOO_DEEP = f"YAML nested deeper than {MAX_DEPTH} levels{{}}; no Istio resource needs that many: flatten it"
LIBYAML_TOO_DEEP = "exceeded maximum nesting depth"
"""libyaml's own bound (1000 levels), met first when its scanner looks ahead."""
YAML_TAG = "tag:yaml.org,2002:"
MERGE_TAG = YAML_TAG + "merge"
VALUE_TAG = YAML_TAG + "value"
"""What PyYAML makes of a plain `=`: a string everywhere else, so here too."""
TAGS = {
    "mapping": frozenset({YAML_TAG + "map"}),
    "sequence": frozenset({YAML_TAG + "seq"}),
    "scalar": frozenset(YAML_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp", "binary", "value")),
}
"""The tags each kind of node may carry: JSON's types, as Kubernetes reads YAML,
with timestamps and binary; any other is a problem (`!!set`, `!!python/...`, `!custom`)."""


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
        return shown_ref(self)


def _mapping_field(body: Any, key: str) -> Any:
    return body.get(key) if isinstance(body, dict) else None


def _str_field(body: Any, key: str) -> str:
    value = _mapping_field(body, key)
    return value if isinstance(value, str) else ""


def allowed_alias_ratio(decoded: int) -> float:
    """The share of `decoded` nodes that may come from aliases (Go yaml's `allowedAliasRatio`)."""
    if decoded <= ALIAS_RATIO_LOW:
        return 0.99
    if decoded >= ALIAS_RATIO_HIGH:
        return 0.10
    return 0.99 - 0.89 * (decoded - ALIAS_RATIO_LOW) / (ALIAS_RATIO_HIGH - ALIAS_RATIO_LOW)


class _LimitError(yaml.MarkedYAMLError):
    """A document past one of the bounds above; `problem` is the whole message."""

    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(problem=message, problem_mark=mark)


try:
    from yaml._yaml import CParser as _Events
except ImportError:  # PyYAML built without libyaml: the same events from its Python parser, slower

    class _Events(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


NOT_YAML = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
"""A character YAML does not allow anywhere (controls, lone surrogates)."""


class _BoundedLoader(Composer, _Events, SafeConstructor, Resolver):
    """PyYAML's safe loader on libyaml's parser, its composer bounded while it composes, before
    anything is expanded: nesting depth (aliases expanded), Go yaml's excessive-aliasing rule,
    and no alias inside the node it repeats."""

    def __init__(self, stream: str) -> None:
        _Events.__init__(self, stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._open: list[list[int]] = []
        """Per node being composed: the height and the size (aliases expanded) of its children."""
        self._shapes: dict[str, tuple[int, int]] = {}
        """Height and size of each anchored node composed so far."""
        self._decoded = 0
        self._aliased = 0

    def compose_all(self) -> list[yaml.Node | None]:
        """The root node of every document (`yaml.compose_all`)."""
        nodes = []
        while self.check_node():
            nodes.append(self.get_node())
        return nodes

    def compose_document(self) -> yaml.Node | None:
        self._shapes, self._decoded, self._aliased = {}, 0, 0
        return super().compose_document()

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: Any = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.anchors:
                self._expand(event)
            return super().compose_node(parent, index)
        if len(self._open) >= MAX_DEPTH:
            raise _LimitError(TOO_DEEP.format(""), event.start_mark)
        self._decoded += 1
        self._open.append([0, 1])
        try:
            node = super().compose_node(parent, index)
        finally:
            height, size = self._open.pop()
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._shapes[anchor] = (height + 1, size)
        self._add(height + 1, size)
        return node

    def _expand(self, event: yaml.AliasEvent) -> None:
        """Count what an alias expands to (Go counts the alias and all it repeats); refuse one
        inside its own anchor, one that nests too deep, and too much aliasing."""
        shape = self._shapes.get(str(event.anchor))
        if shape is None:
            message = f"alias '*{event.anchor}' is inside the node it repeats; repeat only a node that has ended"
            raise _LimitError(message, event.start_mark)
        height, size = shape
        if len(self._open) + height > MAX_DEPTH:
            raise _LimitError(TOO_DEEP.format(" once aliases are expanded"), event.start_mark)
        self._decoded += 1 + size
        self._aliased += size
        decoded, aliased = self._decoded, self._aliased
        if aliased > 100 and decoded > 1000 and aliased / decoded > allowed_alias_ratio(decoded):
            message = (f"document contains excessive aliasing: aliases repeat {aliased} of its {decoded} nodes; "
                       "write the repeated parts out")  # fmt: skip
            raise _LimitError(message, event.start_mark)
        self._add(height, size)

    def _add(self, height: int, size: int) -> None:
        """A child composed: its height and size count towards its parent's."""
        if self._open:
            parent = self._open[-1]
            parent[0] = max(parent[0], height)
            parent[1] += size


def _short_tag(tag: str) -> str:
    """`tag:yaml.org,2002:int` → `!!int`, as it is written."""
    return "!!" + tag.removeprefix(YAML_TAG) if tag.startswith(YAML_TAG) else tag


class _Builder:
    """Turns composed YAML nodes into plain values, recording each node's mark."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.values: dict[FieldPath, tuple[int, int]] = {}
        self.keys: dict[FieldPath, tuple[int, int]] = {}
        self.problems: list[Problem] = []
        self._scalars = yaml.constructor.SafeConstructor()
        self._merged: dict[int, int] = {}
        """How many leading pairs of each mapping came from merge keys (`<<`): flattening rewrites
        the node, and an aliased mapping is built again from the rewritten one."""

    def build(self, node: yaml.Node, path: FieldPath) -> Any:
        self.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        fits = self._tag_fits(node)
        if isinstance(node, yaml.MappingNode):
            merged = self._merged.get(id(node))
            if merged is None:
                explicit = sum(1 for key_node, _ in node.value if key_node.tag != MERGE_TAG)
                self._scalars.flatten_mapping(node)
                merged = self._merged[id(node)] = len(node.value) - explicit
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
        return self._scalar(node) if fits else None

    def _tag_fits(self, node: yaml.Node) -> bool:
        """Is `node`'s tag one minimesh reads on such a node? If not, that is a problem."""
        kind = type(node).__name__.removesuffix("Node").lower()
        if node.tag in TAGS[kind]:
            return True
        tag = _short_tag(node.tag)
        if any(node.tag in tags for tags in TAGS.values()):
            self._error(node, f"the tag '{tag}' does not fit a {kind}; remove it")
        else:
            self._error(node, f"unknown tag '{tag}'; minimesh reads YAML's standard tags only: remove it")
        return False

    def _scalar(self, node: yaml.Node) -> Any:
        """A scalar's value; one its tag cannot read (`!!int abc`) is a problem, and None."""
        if node.tag == VALUE_TAG:
            return node.value
        try:
            return self._scalars.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, LookupError, OverflowError, AttributeError, TypeError) as exc:
            cause = exc.problem if isinstance(exc, yaml.MarkedYAMLError) else ""
            if isinstance(exc, ValueError | OverflowError):
                cause = str(exc)  # Python's reason (`month must be in 1..12`); the others say nothing useful
            because = f" ({cause})" if cause else ""
            self._error(node, f"'{node.value}' is not a valid {_short_tag(node.tag)}{because}; write a valid one, "
                        "or quote it to make it a string")  # fmt: skip
        return None

    def _key(self, node: yaml.Node) -> str:
        if not isinstance(node, yaml.ScalarNode):
            self._error(node, "a mapping key must be a plain string")
            return f"<key at line {node.start_mark.line + 1}>"
        value = self._scalar(node) if self._tag_fits(node) else None
        return str(node.value) if value is None else value if isinstance(value, str) else str(value)

    def _error(self, node: yaml.Node, message: str) -> None:
        where = Location(self.file, node.start_mark.line + 1, node.start_mark.column + 1)
        self.problems.append(Problem(where, "error", message))


def too_large(size: int | None, file: str) -> Problem:
    """The problem of a file or body of `size` bytes (None: a body of unknown length), over MAX_DOCUMENT_BYTES."""
    took = f"{size} bytes is" if size is not None else "the body is"
    message = (f"{took} over the {MAX_DOCUMENT_BYTES >> 20} MiB limit of a Kubernetes request; "
               "split the documents across several files")  # fmt: skip
    return Problem(Location(file, 1, 1), "error", message)


def decode(data: bytes, file: str) -> tuple[str, Problem | None]:
    """`data` as UTF-8 text, or the located problem of its first byte that is not UTF-8."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - data.rfind(b"\n", 0, exc.start)
        message = f"not UTF-8: byte 0x{data[exc.start]:02x} {exc.reason}; save the file as UTF-8"
        return "", Problem(Location(file, line, col), "error", message)


def parse_text(text: str, file: str) -> tuple[list[Document], list[Problem]]:
    """Every document in `text`; a syntax error or a bound passed yields one located problem
    and no documents."""
    size = len(text.encode(errors="surrogatepass"))
    if size > MAX_DOCUMENT_BYTES:
        return [], [too_large(size, file)]
    bad = NOT_YAML.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        col = bad.start() - text.rfind("\n", 0, bad.start())
        message = f"invalid YAML: character U+{ord(bad.group()):04X} is not allowed in YAML; remove it"
        return [], [Problem(Location(file, line, col), "error", message)]
    try:
        nodes = _BoundedLoader(text).compose_all()
    except _LimitError as exc:
        return [], [Problem(_mark_location(file, exc.problem_mark), "error", str(exc.problem))]
    except yaml.MarkedYAMLError as exc:
        reason = exc.problem or exc.context or "invalid YAML"
        message = f"invalid YAML: {reason}; fix the syntax at this position"
        if reason == LIBYAML_TOO_DEEP:
            message = TOO_DEEP.format("")
        return [], [Problem(_mark_location(file, exc.problem_mark or exc.context_mark), "error", message)]
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
            where = _mark_location(file, exc.problem_mark)
            problems.append(Problem(where, "error", f"invalid YAML value: {exc.problem}"))
            continue
        problems.extend(builder.problems)
        if body is None:
            continue
        documents.append(Document(file, index, body, builder.values, builder.keys))
    return documents, problems


def _mark_location(file: str, mark: yaml.Mark | None) -> Location:
    return Location(file, mark.line + 1, mark.column + 1) if mark else Location(file, 1, 1)


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
            with path.open("rb") as stream:
                data = stream.read(MAX_DOCUMENT_BYTES + 1)
                size = max(len(data), os.fstat(stream.fileno()).st_size)
        except OSError as exc:
            problems.append(Problem(Location(str(path), 1, 1), "error", f"cannot read file: {exc}"))
            continue
        if size > MAX_DOCUMENT_BYTES:
            problems.append(too_large(size, str(path)))
            continue
        text, undecodable = decode(data, str(path))
        if undecodable is not None:
            problems.append(undecodable)
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
