"""Checks one parsed config document against the published schema of its kind, as `kubectl apply` would;
each issue carries an `IssueCode` the loader decides its severity by.

Owns Istio's CRD OpenAPI v3 schemas (`schemas/istio.json`, made by `tools/gen_schemas.py`), their
CEL rules with the Kubernetes CEL functions they call, and ObjectMeta, core `Service` and our own kinds.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import datetime
import difflib
import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import Any, NoReturn

import celpy
import re2  # type: ignore[import-untyped]
from celpy import celtypes
from celpy.celparser import CELParseError

from minimesh.config import own_schemas
from minimesh.config.durations import duration_nanos, show
from minimesh.config.own_schemas import Schema
from minimesh.config.source import FieldPath

_RULES = "x-kubernetes-validations"
_INT_OR_STRING = "x-kubernetes-int-or-string"
_PRESERVE = "x-kubernetes-preserve-unknown-fields"
_ANY: Schema = {_PRESERVE: True}
_STRING: Schema = {"type": "string"}

_INT64 = (-(1 << 63), (1 << 63) - 1)
_INTEGER_FORMATS: Mapping[str, tuple[str, tuple[int, int]]] = {
    "int32": ("a 32-bit integer", (-(1 << 31), (1 << 31) - 1)),
    "uint32": ("an unsigned 32-bit integer", (0, (1 << 32) - 1)),
    "int64": ("a 64-bit integer", _INT64),
    "uint64": ("an unsigned 64-bit integer", (0, (1 << 64) - 1)),
}
_TYPE_NAMES = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean (true or false)",
}
_MAX_LISTED = 8
_ANNOTATIONS_LIMIT = 256 * 1024

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DATE_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII)
_GO_INT = re.compile(r"[+-]?[0-9]+")
_NUMERIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)
_FIELD_PATH_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\['((?:[^'\\]|\\.)*)'\]")


class IssueCode(StrEnum):
    """What kind of problem an issue is: the loader decides its severity by this, never by its text."""

    NOT_A_DOCUMENT = "not-a-document"
    """The document is not a mapping."""
    HEAD = "head"
    """apiVersion or kind is missing, or not a string."""
    UNKNOWN_KIND = "unknown-kind"
    """A kind minimesh holds no schema for: the document is ignored."""
    VERSION = "version"
    """A known kind under an apiVersion it is not served as."""
    SCHEMA = "schema"
    """A value breaks the kind's schema (types, bounds, patterns, required fields, CEL rules)."""


@dataclass(frozen=True, slots=True)
class SchemaIssue:
    """One way a document breaks its schema: where, a sentence saying what to change, and its code."""

    path: FieldPath
    message: str
    at_key: bool = False
    code: IssueCode = IssueCode.SCHEMA


# --- the catalog of kinds ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Kind:
    """One kind we hold a schema for: its root schema under each apiVersion it is served as."""

    roots: Mapping[str, Schema]

    def accepted(self) -> str:
        versions = sorted(self.roots, key=_version_rank)
        return _listing(versions, "or")


def _version_rank(api_version: str) -> tuple[int, int, int]:
    """Kubernetes' order of preference: GA, then beta, then alpha; higher numbers first."""
    match = re.search(r"v(\d+)(?:(alpha|beta)(\d+))?$", api_version)
    if match is None:
        return (3, 0, 0)
    stage = {"alpha": 2, "beta": 1}.get(match.group(2) or "", 0)
    return (stage, -int(match.group(1)), -int(match.group(3) or 0))


def _root(schema: Schema) -> Schema:
    """A kind's top-level schema plus what Kubernetes adds to every object (apiVersion, kind, metadata).

    `status` takes anything: the API server discards it when an object is created.
    """
    properties = {
        **schema.get("properties", {}),
        "apiVersion": _STRING,
        "kind": _STRING,
        "metadata": own_schemas.OBJECT_META,
        "status": _ANY,
    }
    return {**schema, "type": "object", "properties": properties, "required": ["metadata", *schema.get("required", ())]}


@functools.cache
def _catalog() -> Mapping[str, _Kind]:
    text = resources.files("minimesh.config").joinpath("schemas/istio.json").read_text(encoding="utf-8")
    data = json.loads(text)
    kinds: dict[str, _Kind] = {}
    for kind, entry in data["kinds"].items():
        roots = {f"{entry['group']}/{v}": _root(data["schemas"][key]) for v, key in entry["versions"].items()}
        kinds[kind] = _Kind(roots)
    retry = _walk(kinds["VirtualService"].roots["networking.istio.io/v1"], ("spec", "http", "retries"))
    if retry is None:
        raise RuntimeError("the bundled VirtualService schema has no spec.http.retries; regenerate istio.json")
    own = f"{own_schemas.MINIMESH_GROUP}/v1"
    kinds["Service"] = _Kind({"v1": _root(own_schemas.SERVICE)})
    kinds["MeshConfig"] = _Kind({own: _root(own_schemas.mesh_config(retry))})
    kinds["RouteTest"] = _Kind({own: _root(own_schemas.ROUTE_TEST)})
    return kinds


def _walk(schema: Schema, path: Iterable[str]) -> Schema | None:
    current = schema
    for name in path:
        while isinstance(current.get("items"), Mapping):
            current = current["items"]
        properties = current.get("properties", {})
        additional = current.get("additionalProperties")
        if name in properties:
            current = properties[name]
        elif isinstance(additional, Mapping):
            current = additional
        else:
            return None
    return current


def known_kinds() -> frozenset[tuple[str, str]]:
    """Every (apiVersion, kind) we hold a schema for."""
    return frozenset((version, kind) for kind, entry in _catalog().items() for version in entry.roots)


def field_schema(api_version: str, kind: str, path: tuple[str, ...]) -> dict[str, object] | None:
    """The schema of the field at `path` (list items are transparent), None where there is no such field.

    The result shares nested mappings with the catalog: read it, do not change it.
    """
    entry = _catalog().get(kind)
    root = entry.roots.get(api_version) if entry else None
    found = _walk(root, path) if root is not None else None
    return dict(found) if found is not None else None


# --- documents --------------------------------------------------------------------------------


def check_document(body: object) -> list[SchemaIssue]:
    """Every way `body` breaks the schema of its kind; one `unknown kind` issue for a kind we lack."""
    if not isinstance(body, dict):
        message = f"a config document must be a mapping with apiVersion, kind and metadata, got {_describe(body)}"
        return [SchemaIssue((), message, code=IssueCode.NOT_A_DOCUMENT)]
    head = _check_head(body)
    if head:
        return head
    api_version, kind = body["apiVersion"], body["kind"]
    entry = _catalog().get(kind)
    if entry is None:
        return [_unknown_kind(kind, api_version)]
    root = entry.roots.get(api_version)
    if root is None:
        message = f"{kind} is not served as apiVersion '{api_version}'; use {entry.accepted()}"
        return [SchemaIssue(("apiVersion",), message, code=IssueCode.VERSION)]
    findings = _Findings()
    document = _plain(body)
    _check(document, root, (), findings)
    _check_object_meta(document.get("metadata"), kind, findings)
    return findings.issues


def check_value(value: object, schema: Mapping[str, Any], path: FieldPath = ()) -> list[SchemaIssue]:
    """Every way `value` breaks the OpenAPI v3 `schema`; paths are `path` plus the field's place in `value`."""
    findings = _Findings()
    _check(_plain(value), schema, path, findings)
    return findings.issues


def _check_head(body: Mapping[str, Any]) -> list[SchemaIssue]:
    kind = body.get("kind")
    entry = _catalog().get(kind) if isinstance(kind, str) else None
    issues: list[SchemaIssue] = []
    for key in ("apiVersion", "kind"):
        value = body.get(key)
        if value is None:
            hint = f"; {kind} uses {entry.accepted()}" if key == "apiVersion" and entry else ""
            issues.append(SchemaIssue((), f"missing required field '{key}'{hint}", code=IssueCode.HEAD))
        elif not isinstance(value, str):
            issues.append(SchemaIssue((key,), f"must be a string, got {_describe(value)}", code=IssueCode.HEAD))
    return issues


def _unknown_kind(kind: str, api_version: str) -> SchemaIssue:
    names = list(_catalog())
    by_case = {name.lower(): name for name in names}
    close = [by_case[kind.lower()]] if kind.lower() in by_case else difflib.get_close_matches(kind, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    message = f"unknown kind '{kind}' (apiVersion {api_version}): minimesh ignores this document{hint}"
    return SchemaIssue(("kind",), message, code=IssueCode.UNKNOWN_KIND)


def _plain(value: Any) -> Any:
    """`value` as Kubernetes sees the JSON kubectl sends: YAML timestamps are strings there."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, datetime.datetime):
        text = value.isoformat()
        return text.removesuffix("+00:00") + "Z" if text.endswith("+00:00") else text
    if isinstance(value, datetime.date):
        return value.isoformat()
    return value


# --- ObjectMeta: the rules Kubernetes checks in code rather than in a schema -----------------------


def _check_object_meta(meta: Any, kind: str, out: _Findings) -> None:
    if not isinstance(meta, dict):
        return
    name, namespace = meta.get("name"), meta.get("namespace")
    if isinstance(name, str):
        problem = _service_name_problem(name) if kind == "Service" else _subdomain_problem(name)
        if problem:
            out.add(SchemaIssue(("metadata", "name"), problem))
    if isinstance(namespace, str) and not _is_dns_label(namespace):
        message = (
            f"invalid namespace {show(namespace)}: use at most 63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
        out.add(SchemaIssue(("metadata", "namespace"), message))
    labels = meta.get("labels")
    if isinstance(labels, dict):
        for key, value in labels.items():
            path = ("metadata", "labels", key)
            if not _is_qualified_name(key):
                out.add(SchemaIssue(path, _qualified_name_message("label key", key), at_key=True))
            if isinstance(value, str) and not _is_label_value(value):
                message = (
                    f"invalid label value {show(value)}: use at most 63 letters, digits, '-', '_' or '.', "
                    "starting and ending with a letter or digit, or leave it empty"
                )
                out.add(SchemaIssue(path, message))
    annotations = meta.get("annotations")
    if isinstance(annotations, dict):
        for key in annotations:
            if not _is_qualified_name(key):
                message = _qualified_name_message("annotation key", key)
                out.add(SchemaIssue(("metadata", "annotations", key), message, at_key=True))
        size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items() if isinstance(v, str))
        if size > _ANNOTATIONS_LIMIT:
            message = f"annotations take {size} bytes; Kubernetes allows at most {_ANNOTATIONS_LIMIT}, so shorten them"
            out.add(SchemaIssue(("metadata", "annotations"), message))


def _subdomain_problem(name: str) -> str:
    if len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name):
        return ""
    return (
        f"invalid name {show(name)}: use at most 253 lowercase letters, digits, '-' or '.', "
        "starting and ending with a letter or digit"
    )


def _service_name_problem(name: str) -> str:
    if len(name) <= 63 and _DNS1035_LABEL.fullmatch(name):
        return ""
    return (
        f"invalid Service name {show(name)}: use at most 63 lowercase letters, digits or '-', "
        "starting with a letter and ending with a letter or digit"
    )


def _is_dns_label(text: str) -> bool:
    return len(text) <= 63 and _DNS_LABEL.fullmatch(text) is not None


def _is_qualified_name(key: str) -> bool:
    parts = key.split("/")
    if len(parts) > 2:
        return False
    if len(parts) == 2 and not (parts[0] and len(parts[0]) <= 253 and _DNS_SUBDOMAIN.fullmatch(parts[0])):
        return False
    return len(parts[-1]) <= 63 and _QUALIFIED_NAME.fullmatch(parts[-1]) is not None


def _is_label_value(value: str) -> bool:
    return value == "" or (len(value) <= 63 and _QUALIFIED_NAME.fullmatch(value) is not None)


def _qualified_name_message(what: str, key: str) -> str:
    return (
        f"invalid {what} {show(key)}: use an optional DNS prefix and '/', then at most 63 letters, "
        "digits, '-', '_' or '.', starting and ending with a letter or digit"
    )


# --- the OpenAPI v3 structural-schema checker --------------------------------------------------


class _Findings:
    """The issues found so far, and how many are type errors, which keep CEL rules from running."""

    __slots__ = ("blocking", "issues")

    def __init__(self) -> None:
        self.issues: list[SchemaIssue] = []
        self.blocking = 0

    def add(self, issue: SchemaIssue, *, blocking: bool = False) -> None:
        self.issues.append(issue)
        self.blocking += blocking


def _check(value: Any, schema: Schema, path: FieldPath, out: _Findings) -> None:
    """Adds to `out` every way `value` breaks `schema`; CEL rules run where no type error was found below."""
    blocking = out.blocking
    if value is None:
        if not schema.get("nullable") and ("type" in schema or schema.get(_INT_OR_STRING)):
            message = f"must be {_expected(schema)}, got null; give it a value or remove the field"
            out.add(SchemaIssue(path, message), blocking=True)
        return
    if not _check_type(value, schema, path, out):
        return
    if isinstance(value, dict):
        value = _check_object(value, schema, path, out)
    elif isinstance(value, list):
        _check_array(value, schema, path, out)
    elif isinstance(value, str):
        _check_string(value, schema, path, out)
    elif not isinstance(value, bool):
        _check_number(value, schema, path, out)
    _check_enum(value, schema, path, out)
    _check_combinators(value, schema, path, out)
    if out.blocking == blocking and _RULES in schema:
        _check_rules(value, schema, path, out)


def _check_type(value: Any, schema: Schema, path: FieldPath, out: _Findings) -> bool:
    if not isinstance(value, dict | list | str | int | float):
        message = f"is not a JSON value ({type(value).__name__}); write a string, number, boolean, list or mapping"
        out.add(SchemaIssue(path, message), blocking=True)
        return False
    if isinstance(value, float) and not math.isfinite(value):
        out.add(SchemaIssue(path, f"must be a finite number, got {value}"), blocking=True)
        return False
    if schema.get(_INT_OR_STRING):
        if _is_integer(value) or isinstance(value, str):
            return True
        out.add(SchemaIssue(path, f"must be an integer or a string, got {_describe(value)}"), blocking=True)
        return False
    expected = schema.get("type")
    if expected is None or _has_type(value, expected):
        return True
    out.add(SchemaIssue(path, _type_message(expected, value)), blocking=True)
    return False


def _has_type(value: Any, expected: str) -> bool:
    if expected == "object":
        return isinstance(value, dict)
    if expected == "array":
        return isinstance(value, list)
    if expected == "string":
        return isinstance(value, str)
    if expected == "boolean":
        return isinstance(value, bool)
    if expected == "integer":
        return _is_integer(value)
    if expected == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return True


def _is_integer(value: Any) -> bool:
    """An int, or a float with no fraction: kubectl's YAML-to-JSON step writes `80.0` as `80`."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) <= 2**53)


def _expected(schema: Schema) -> str:
    if schema.get(_INT_OR_STRING):
        return "an integer or a string"
    return _TYPE_NAMES.get(schema.get("type", ""), "a value")


def _type_message(expected: str, value: Any) -> str:
    message = f"must be {_TYPE_NAMES.get(expected, expected)}, got {_describe(value)}"
    if expected in ("integer", "number") and isinstance(value, str) and _NUMERIC.fullmatch(value.strip()):
        return f"{message}; write the number without quotes"
    if expected == "boolean" and isinstance(value, str) and value.lower() in ("true", "false"):
        return f"{message}; write {value.lower()} without quotes"
    if expected == "string" and isinstance(value, int | float):
        return f"{message}; put the value in quotes"
    return message


def _check_object(value: dict[str, Any], schema: Schema, path: FieldPath, out: _Findings) -> dict[str, Any]:
    """Checks fields, required and counts; returns the fields Kubernetes keeps (a non-nullable null is dropped)."""
    properties: Mapping[str, Schema] = schema.get("properties", {})
    present = {
        key: item
        for key, item in value.items()
        if not (item is None and key in properties and not properties[key].get("nullable"))
    }
    for name in schema.get("required", ()):
        if name not in present:
            out.add(SchemaIssue(path, f"missing required field '{name}'"))
    additional = schema.get("additionalProperties")
    open_ended = schema.get(_PRESERVE) or additional is True
    for key, item in present.items():
        sub = properties.get(key)
        if sub is None and isinstance(additional, Mapping):
            sub = additional
        if sub is None and open_ended:
            sub = _ANY
        if sub is not None:
            _check(item, sub, (*path, key), out)
        elif schema.get("type") == "object":
            out.add(_unknown_field(key, properties, (*path, key)))
    _check_count(len(present), schema, ("minProperties", "maxProperties"), "entry", path, out)
    return present


def _unknown_field(key: str, properties: Mapping[str, Schema], path: FieldPath) -> SchemaIssue:
    names = sorted(properties)
    by_case = {name.lower(): name for name in names}
    close = [by_case[key.lower()]] if key.lower() in by_case else difflib.get_close_matches(key, names, n=1)
    if close:
        message = f"unknown field '{key}'; did you mean '{close[0]}'?"
    elif names:
        listed = ", ".join(names[:_MAX_LISTED]) + (", ..." if len(names) > _MAX_LISTED else "")
        message = f"unknown field '{key}'; allowed here: {listed}"
    else:
        message = f"unknown field '{key}'; this field takes no sub-fields"
    return SchemaIssue(path, message, at_key=True)


def _check_count(
    count: int, schema: Schema, keywords: tuple[str, str], noun: str, path: FieldPath, out: _Findings
) -> None:
    low, high = (schema.get(keyword) for keyword in keywords)
    if low is not None and count < low:
        hint = "; add one or remove the field" if count == 0 else ""
        out.add(SchemaIssue(path, f"must have at least {_plural(low, noun)}, got {count}{hint}"))
    if high is not None and count > high:
        out.add(SchemaIssue(path, f"must have at most {_plural(high, noun)}, got {count}"))


def _check_array(value: list[Any], schema: Schema, path: FieldPath, out: _Findings) -> None:
    items = schema.get("items")
    if isinstance(items, Mapping):
        for index, item in enumerate(value):
            _check(item, items, (*path, index), out)
    _check_count(len(value), schema, ("minItems", "maxItems"), "item", path, out)
    list_type = schema.get("x-kubernetes-list-type")
    if list_type in ("set", "map"):
        keys = schema.get("x-kubernetes-list-map-keys", ()) if list_type == "map" else ()
        _check_unique(value, keys, path, out)


def _check_unique(value: list[Any], keys: Sequence[str], path: FieldPath, out: _Findings) -> None:
    """`x-kubernetes-list-type`: entries of a set are unique; entries of a map are unique by their `keys`."""
    named = " and ".join(keys)
    seen: dict[str, int] = {}
    for index, item in enumerate(value):
        if keys and not isinstance(item, dict):
            continue
        identity = json.dumps([item.get(key) for key in keys] if keys else item, sort_keys=True, default=repr)
        first = seen.setdefault(identity, index)
        if first == index:
            continue
        if keys:
            message = f"duplicate entry: entry {first} has the same {named}; give each entry its own {named}"
        else:
            message = f"duplicate entry: entry {first} has the same value; list each value once"
        out.add(SchemaIssue((*path, index), message))


def _check_string(value: str, schema: Schema, path: FieldPath, out: _Findings) -> None:
    low, high = schema.get("minLength"), schema.get("maxLength")
    if low is not None and len(value) < low:
        message = "must not be empty" if low == 1 else f"must be at least {_plural(low, 'character')} long"
        out.add(SchemaIssue(path, f"{message}, got {show(value)}"))
        return
    if high is not None and len(value) > high:
        out.add(SchemaIssue(path, f"must be at most {_plural(high, 'character')} long, got {len(value)}"))
        return
    pattern = schema.get("pattern")
    if pattern is not None and re2.search(pattern, value) is None:
        out.add(SchemaIssue(path, f"must match the pattern {pattern}, got {show(value)}"))
    problem = _format_problem(value, schema.get("format"))
    if problem:
        out.add(SchemaIssue(path, problem))


def _format_problem(value: str, fmt: str | None) -> str:
    if fmt == "date-time":
        match = _DATE_TIME.fullmatch(value)
        try:
            if match is not None:
                year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
                datetime.datetime(year, month, day, hour, minute, second)
                return ""
        except ValueError:
            pass
        return f"must be an RFC 3339 date-time such as 2024-01-31T12:00:00Z, got {show(value)}"
    if fmt == "byte":
        try:
            base64.b64decode(value, validate=True)
        except binascii.Error:
            return f"must be base64-encoded data, got {show(value)}"
    return ""


def _check_number(value: float, schema: Schema, path: FieldPath, out: _Findings) -> None:
    if schema.get("type") == "integer" or schema.get(_INT_OR_STRING):
        phrase, (low, high) = _INTEGER_FORMATS.get(schema.get("format", ""), ("a 64-bit integer", _INT64))
        if not low <= value <= high:
            out.add(SchemaIssue(path, f"must be {phrase} ({low} to {high}), got {_number(value)}"), blocking=True)
            return
    minimum, maximum = schema.get("minimum"), schema.get("maximum")
    strict_low, strict_high = bool(schema.get("exclusiveMinimum")), bool(schema.get("exclusiveMaximum"))
    if minimum is not None and (value <= minimum if strict_low else value < minimum):
        bound = f"{'greater than' if strict_low else 'at least'} {_number(minimum)}"
    elif maximum is not None and (value >= maximum if strict_high else value > maximum):
        bound = f"{'less than' if strict_high else 'at most'} {_number(maximum)}"
    else:
        return
    if minimum is not None and maximum is not None and not (strict_low or strict_high):
        bound = f"between {_number(minimum)} and {_number(maximum)}"
    out.add(SchemaIssue(path, f"must be {bound}, got {_number(value)}"))


def _check_enum(value: Any, schema: Schema, path: FieldPath, out: _Findings) -> None:
    allowed = schema.get("enum")
    if allowed is None or any(_same(value, choice) for choice in allowed):
        return
    listed = ", ".join(str(choice) for choice in allowed)
    message = f"must be one of {listed}, got {show(value) if isinstance(value, str) else _describe(value)}"
    if isinstance(value, str):
        texts = {str(choice).upper(): str(choice) for choice in allowed}
        close = difflib.get_close_matches(value.upper(), list(texts), n=1)
        if close:
            message += f"; did you mean '{texts[close[0]]}'?"
    out.add(SchemaIssue(path, message))


def _same(value: Any, choice: Any) -> bool:
    return isinstance(value, bool) == isinstance(choice, bool) and bool(value == choice)


def _check_combinators(value: Any, schema: Schema, path: FieldPath, out: _Findings) -> None:
    for sub in schema.get("allOf", ()):
        _check(value, sub, path, out)
    one_of = schema.get("oneOf")
    if one_of is not None:
        matched = sum(1 for sub in one_of if _matches(value, sub))
        if matched != 1:
            out.add(_one_of_issue(value, one_of, matched, path))
    any_of = schema.get("anyOf")
    if any_of is not None and not schema.get(_INT_OR_STRING) and not any(_matches(value, s) for s in any_of):
        out.add(SchemaIssue(path, "does not match any of the forms allowed here (anyOf)"))
    forbidden = schema.get("not")
    if forbidden is not None and _matches(value, forbidden):
        names = _required_names(forbidden)
        message = f"must not set {_quoted(names, 'or')}" if names else "has a form that is not allowed here (not)"
        out.add(SchemaIssue(path, message))


def _matches(value: Any, schema: Schema) -> bool:
    scratch = _Findings()
    _check(value, schema, (), scratch)
    return not scratch.issues


def _one_of_issue(value: Any, one_of: list[Schema], matched: int, path: FieldPath) -> SchemaIssue:
    """Istio writes "at most one of a, b, c" as oneOf: [not: anyOf: [required: [a], ...], required: [a], ...]."""
    names = [sub["required"][0] for sub in one_of if list(sub) == ["required"] and len(sub["required"]) == 1]
    exclusive = len(names) == len(one_of) - 1 and any(list(sub) == ["not"] for sub in one_of)
    present = [key for key in value if key in names] if isinstance(value, dict) else []
    if exclusive and len(present) > 1:
        message = f"set only one of {', '.join(_quote(name) for name in names)}; found {_quoted(present, 'and')}"
        return SchemaIssue((*path, present[1]), message, at_key=True)
    return SchemaIssue(path, f"must match exactly one of the forms allowed here (oneOf), but matches {matched}")


def _required_names(schema: Schema) -> list[str]:
    if list(schema) == ["required"]:
        return list(schema["required"])
    if list(schema) == ["anyOf"] and all(list(sub) == ["required"] for sub in schema["anyOf"]):
        return [name for sub in schema["anyOf"] for name in sub["required"]]
    return []


# --- CEL rules (x-kubernetes-validations) -------------------------------------------------------


class RuleCompileError(ValueError):
    """A CEL rule that minimesh cannot run: a syntax error, or a function our CEL library lacks."""


@dataclass(frozen=True, slots=True)
class _Failure:
    """Why one of our CEL functions refused its input; `whole` when the sentence needs no rule message."""

    message: str
    whole: bool = False


@dataclass(frozen=True, slots=True)
class _Verdict:
    """The outcome of one rule: passed, or why not (our function's reason, or CEL's own error)."""

    passed: bool
    failure: _Failure | None = None
    error: str = ""


_FAILURES: contextvars.ContextVar[list[_Failure]] = contextvars.ContextVar("cel_failures")


def _fail(message: str, *, whole: bool = False) -> NoReturn:
    """Records why a CEL function failed (for the issue message) and raises, which CEL turns into an error."""
    failure = _Failure(message, whole)
    failures = _FAILURES.get(None)
    if failures is not None:
        failures.append(failure)
    raise ValueError(message)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One CEL rule, parsed once and bound to the Kubernetes CEL functions."""

    text: str
    program: Any

    def evaluate(self, self_value: Any) -> _Verdict:
        failures: list[_Failure] = []
        token = _FAILURES.set(failures)
        try:
            result = self.program.evaluate({"self": self_value})
        except Exception as exc:  # celpy reports failures as exceptions of several kinds; each is a failed rule
            result = exc
        finally:
            _FAILURES.reset(token)
        if isinstance(result, celtypes.BoolType):
            return _Verdict(bool(result))
        if failures:
            return _Verdict(False, failures[0])
        return _Verdict(False, error=_cel_error_text(result))


def _cel_error_text(result: Any) -> str:
    if isinstance(result, Exception) and result.args:
        return str(result.args[0])
    return f"it gave {result!r} instead of true or false"


@functools.cache
def _environment() -> Any:
    return celpy.Environment()


@functools.cache
def compile_rule(text: str) -> CompiledRule:
    """`text` compiled once; RuleCompileError if it does not parse or calls a function we lack."""
    environment = _environment()
    try:
        ast = environment.compile(text)
    except CELParseError as exc:
        raise RuleCompileError(f"cannot parse the CEL rule {text!r}: {exc}") from exc
    known = set(celpy.evaluation.base_functions) | set(_FUNCTIONS) | _MACROS
    missing = sorted({name for name in _called_names(ast) if name not in known})
    if missing:
        raise RuleCompileError(f"the CEL rule {text!r} calls {', '.join(missing)}, which minimesh does not provide")
    return CompiledRule(text, environment.program(ast, functions=dict(_FUNCTIONS)))


def _called_names(ast: Any) -> Iterator[str]:
    for tree in ast.iter_subtrees():
        if tree.data in ("ident_arg", "dot_ident_arg"):
            yield str(tree.children[0].value)
        elif tree.data == "member_dot_arg":
            yield str(tree.children[1].value)


def _check_rules(value: Any, schema: Schema, path: FieldPath, out: _Findings) -> None:
    self_value = _to_cel(value, schema)
    for rule in schema[_RULES]:
        try:
            verdict = compile_rule(rule["rule"]).evaluate(self_value)
        except RuleCompileError as exc:
            verdict = _Verdict(False, error=str(exc))
        if not verdict.passed:
            where = (*path, *_field_path(rule.get("fieldPath", "")))
            out.add(SchemaIssue(where, _rule_message(rule, verdict, self_value)))


def _rule_message(rule: Mapping[str, Any], verdict: _Verdict, self_value: Any) -> str:
    if verdict.failure is not None and verdict.failure.whole:
        return verdict.failure.message
    base = _expression_message(rule.get("messageExpression"), self_value) or rule.get("message")
    base = base or f"must satisfy the rule {rule['rule']}"
    if verdict.failure is not None:
        return f"{base}; {verdict.failure.message}"
    if verdict.error:
        return f"{base} (the rule could not be evaluated: {verdict.error})"
    return str(base)


def _expression_message(expression: str | None, self_value: Any) -> str:
    if not expression:
        return ""
    try:
        result = compile_rule(expression).program.evaluate({"self": self_value})
    except Exception:  # a broken messageExpression falls back to `message`, as in Kubernetes
        return ""
    return str(result) if isinstance(result, str) else ""


def _field_path(text: str) -> tuple[str, ...]:
    return tuple(step.group(1) or re.sub(r"\\(.)", r"\1", step.group(2)) for step in _FIELD_PATH_STEP.finditer(text))


def _to_cel(value: Any, schema: Schema) -> Any:
    """`value` as a CEL value typed by `schema`, as Kubernetes presents `self` (unknown fields pruned)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int | float):
        if schema.get("type") == "number" or not _is_integer(value) or not _INT64[0] <= value <= _INT64[1]:
            return celtypes.DoubleType(value)
        return celtypes.IntType(int(value))
    if isinstance(value, str):
        return celtypes.StringType(value)
    if isinstance(value, list):
        items = schema.get("items")
        return celtypes.ListType([_to_cel(item, items if isinstance(items, Mapping) else _ANY) for item in value])
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        open_ended = schema.get(_PRESERVE) or additional is True or "type" not in schema
        fields = {}
        for key, item in value.items():
            sub = properties.get(key)
            if sub is None and isinstance(additional, Mapping):
                sub = additional
            if sub is None and open_ended:
                sub = _ANY
            if sub is None or (item is None and key in properties and not sub.get("nullable")):
                continue
            fields[celtypes.StringType(key)] = _to_cel(item, sub)
        return celtypes.MapType(fields)
    return celtypes.StringType(str(value))


# --- the Kubernetes CEL library functions the rules call ------------------------------------------

_MACROS = frozenset({"has", "all", "exists", "exists_one", "map", "filter"})


def _cel_duration(value: Any) -> Any:
    """CEL `duration(string)`: Go's time.ParseDuration, to the nanosecond."""
    if isinstance(value, celtypes.DurationType):
        return value
    if not isinstance(value, str):
        raise TypeError(f"duration() takes a string, got {type(value).__name__}")
    try:
        total = duration_nanos(value)
    except ValueError as exc:
        _fail(str(exc), whole=True)
    seconds, nanos = divmod(total, 1_000_000_000)
    return celtypes.DurationType(seconds, nanos)


def _cel_int(value: Any) -> Any:
    """CEL `int()`: strings as Go's strconv.ParseInt reads them (no spaces, no underscores)."""
    if isinstance(value, str):
        if not _GO_INT.fullmatch(value):
            _fail(f"{show(value)} is not an integer")
        number = int(value)
        if not _INT64[0] <= number <= _INT64[1]:
            _fail(f"{show(value)} does not fit in 64 bits")
        return celtypes.IntType(number)
    return celtypes.IntType(value)


def _cel_substring(text: Any, start: Any, end: Any = None) -> Any:
    """Kubernetes' `string.substring(start[, end])`, counted in code points; out of range is an error."""
    length = len(text)
    stop = length if end is None else int(end)
    if not 0 <= int(start) <= stop <= length:
        _fail(f"{show(str(text))} has no characters {int(start)} to {stop}")
    return celtypes.StringType(text[int(start) : stop])


@dataclass(frozen=True, slots=True)
class _URL:
    """The value of Kubernetes' CEL `url(string)`."""

    scheme: str


def _cel_is_url(text: Any) -> Any:
    try:
        _go_parse_url(str(text), via_request=True)
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(True)


def _cel_url(text: Any) -> _URL:
    """Kubernetes' `url()`: Go's url.ParseRequestURI must accept it, then url.Parse reads it."""
    raw = str(text)
    try:
        _go_parse_url(raw, via_request=True)
        before, _, fragment = raw.partition("#")
        _go_unescape(fragment, host=False)
        return _URL(_go_parse_url(before, via_request=False))
    except ValueError as exc:
        _fail(f"{show(raw)} is not a valid URL ({exc})")


def _cel_get_scheme(url: Any) -> Any:
    if not isinstance(url, _URL):
        raise TypeError("getScheme() applies to a url()")
    return celtypes.StringType(url.scheme)


_FUNCTIONS: Mapping[str, Callable[..., Any]] = {
    "duration": _cel_duration,
    "int": _cel_int,
    "substring": _cel_substring,
    "isURL": _cel_is_url,
    "url": _cel_url,
    "getScheme": _cel_get_scheme,
}


def _go_parse_url(raw: str, *, via_request: bool) -> str:
    """The scheme of `raw` as Go's net/url parse() reads it; ValueError where Go returns an error."""
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in raw):
        raise ValueError("invalid control character in URL")
    if raw == "":
        raise ValueError("empty url")
    if raw == "*":
        return ""
    scheme, rest = _go_scheme(raw)
    scheme = scheme.lower()
    rest = rest[:-1] if rest.endswith("?") and rest.count("?") == 1 else rest.partition("?")[0]
    if not rest.startswith("/"):
        if scheme:
            return scheme
        if via_request:
            raise ValueError("invalid URI for request")
    if (scheme or (not via_request and not rest.startswith("///"))) and rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        _go_check_authority(authority)
        rest = slash + path
    _go_unescape(rest, host=False)
    return scheme


def _go_scheme(raw: str) -> tuple[str, str]:
    for index, char in enumerate(raw):
        if char.isascii() and char.isalpha():
            continue
        if char.isascii() and (char.isdigit() or char in "+-."):
            if index == 0:
                return "", raw
            continue
        if char == ":":
            if index == 0:
                raise ValueError("missing protocol scheme")
            return raw[:index], raw[index + 1 :]
        return "", raw
    return "", raw


_USERINFO_EXTRA = set("-._:~!$&'()*+,;=%@")
_HOST_EXTRA = set("-_.~!$&'()*+,;=:[]<>\"")


def _go_check_authority(authority: str) -> None:
    userinfo, at, host = authority.rpartition("@")
    _go_check_host(host)
    if at and not all((c.isascii() and c.isalnum()) or c in _USERINFO_EXTRA for c in userinfo):
        raise ValueError("invalid userinfo")
    if at:
        _go_unescape(userinfo, host=False)


def _go_check_host(host: str) -> None:
    if host.startswith("["):
        close = host.rfind("]")
        if close < 0:
            raise ValueError("missing ']' in host")
        port = host[close + 1 :]
    else:
        colon = host.rfind(":")
        port = host[colon:] if colon >= 0 else ""
    if port and not (port.startswith(":") and all("0" <= c <= "9" for c in port[1:])):
        raise ValueError(f"invalid port {port!r} after host")
    _go_unescape(host, host=True)


def _go_unescape(text: str, *, host: bool) -> None:
    index = 0
    while index < len(text):
        char = text[index]
        if char == "%":
            code = text[index + 1 : index + 3]
            if len(code) < 2 or not all(c in "0123456789abcdefABCDEF" for c in code):
                raise ValueError(f"invalid URL escape {text[index : index + 3]!r}")
            if host and int(code[0], 16) < 8 and code != "25":
                raise ValueError(f"invalid URL escape {text[index : index + 3]!r}")
            index += 3
            continue
        if host and ord(char) < 0x80 and not (char.isalnum() or char in _HOST_EXTRA):
            raise ValueError(f"invalid character {char!r} in host name")
        index += 1


# --- wording ------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int | float):
        return f"{'integer' if isinstance(value, int) else 'number'} {_number(value)}"
    if isinstance(value, str):
        return f"string {show(value)}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _number(value: float) -> str:
    return str(int(value)) if isinstance(value, int) else repr(value)


def _plural(count: int, noun: str) -> str:
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun[:-1]}ies" if noun.endswith("y") else f"{count} {noun}s"


def _quote(name: str) -> str:
    return f"'{name}'"


def _quoted(names: Iterable[str], joiner: str) -> str:
    return _listing([_quote(name) for name in names], joiner)


def _listing(items: list[str], joiner: str) -> str:
    """`a`, `a or b`, `a, b or c`."""
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {joiner} {items[-1]}"
