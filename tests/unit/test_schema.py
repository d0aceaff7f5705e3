"""The schema checker against Istio's own CRD test suite, its bundled data, and table-driven cases."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimesh.config import own_schemas
from minimesh.config.schema import (
    IssueCode,
    SchemaIssue,
    check_document,
    check_value,
    compile_rule,
    field_schema,
    known_kinds,
)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"


def shared_istio() -> Path:
    """`../shared/istio`; its absence fails under CI and skips on a laptop without it."""
    folder = SHARED / "istio"
    if not folder.is_dir():
        reason = f"Istio reference data not found at {folder}; check out shared/ beside the repository"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return folder


def as_go_yaml_reads(value: Any) -> Any:
    """Undoes PyYAML's one divergence from go-yaml in these files.

    In a flow sequence, PyYAML ends a plain scalar at `:` before `]` or `,`, so `[001:db8::]`
    becomes `[{'001:db8:': None}]`; go-yaml (kubectl) reads the string `001:db8::`.
    """
    if isinstance(value, dict):
        return {key: as_go_yaml_reads(item) for key, item in value.items()}
    if isinstance(value, list):
        return [
            f"{next(iter(item))}:"
            if isinstance(item, dict) and len(item) == 1 and next(iter(item.values())) is None
            else as_go_yaml_reads(item)
            for item in value
        ]
    return value


def istio_documents(suffix: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(shared_istio().joinpath("testdata").glob(f"*-{suffix}.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(document, dict):
                yield f"{path.name}:{document.get('metadata', {}).get('name')}", as_go_yaml_reads(document)


def test_istio_valid_documents_pass() -> None:
    seen = 0
    for name, document in istio_documents("valid"):
        seen += 1
        assert check_document(document) == [], name
    assert seen >= 19


def test_istio_invalid_documents_fail() -> None:
    seen = 0
    for name, document in istio_documents("invalid"):
        if "_err" not in document:
            continue
        expected = document.pop("_err")
        seen += 1
        issues = check_document(document)
        assert issues, f"{name} should fail: {expected}"
        assert not any(found.message.startswith("unknown kind") for found in issues), name
    assert seen >= 40


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_schemas", REPO / "tools" / "gen_schemas.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_schemas_match_the_crd_file() -> None:
    generator = load_generator()
    crd = shared_istio() / "customresourcedefinitions.gen.yaml"
    expected = generator.render(generator.build(crd.read_text(encoding="utf-8")))
    bundled = resources.files("minimesh.config").joinpath("schemas/istio.json").read_text(encoding="utf-8")
    assert bundled == expected, "schemas/istio.json is stale: run `python tools/gen_schemas.py`"


def rules_in(schema: Any) -> Iterator[dict[str, Any]]:
    if isinstance(schema, dict):
        yield from schema.get("x-kubernetes-validations", ())
        for value in schema.values():
            yield from rules_in(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from rules_in(value)


def all_schemas() -> list[Any]:
    bundled = json.loads(resources.files("minimesh.config").joinpath("schemas/istio.json").read_text("utf-8"))
    retry = field_schema("networking.istio.io/v1", "VirtualService", ("spec", "http", "retries"))
    assert retry is not None
    own = [own_schemas.OBJECT_META, own_schemas.SERVICE, own_schemas.ROUTE_TEST, own_schemas.mesh_config(retry)]
    return [*bundled["schemas"].values(), *own]


def test_every_cel_rule_compiles() -> None:
    expressions = set()
    for rule in rules_in(all_schemas()):
        expressions.add(rule["rule"])
        if "messageExpression" in rule:
            expressions.add(rule["messageExpression"])
    assert len(expressions) >= 37
    for expression in sorted(expressions):
        compile_rule(expression)


def test_known_kinds() -> None:
    kinds = known_kinds()
    assert ("networking.istio.io/v1alpha3", "VirtualService") in kinds
    assert ("security.istio.io/v1beta1", "AuthorizationPolicy") in kinds
    assert ("v1", "Service") in kinds
    assert ("minimesh.dev/v1", "MeshConfig") in kinds
    assert ("minimesh.dev/v1", "RouteTest") in kinds
    assert ("security.istio.io/v1alpha3", "AuthorizationPolicy") not in kinds


def test_field_schema() -> None:
    weight = field_schema("networking.istio.io/v1", "VirtualService", ("spec", "http", "route", "weight"))
    assert weight == {"format": "int32", "type": "integer"}
    assert field_schema("networking.istio.io/v1", "VirtualService", ("spec", "http", "route", "wieght")) is None
    assert field_schema("networking.istio.io/v2", "VirtualService", ("spec",)) is None
    mode = field_schema("minimesh.dev/v1", "MeshConfig", ("spec", "outboundTrafficPolicy", "mode"))
    assert mode == {"type": "string", "enum": ["ALLOW_ANY", "REGISTRY_ONLY"]}


# --- table-driven cases -----------------------------------------------------------------------


def resource(api_version: str, kind: str, spec: Any, name: str = "reviews") -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name}, "spec": spec}


def vs(spec: Any) -> dict[str, Any]:
    return resource("networking.istio.io/v1", "VirtualService", spec)


def dr(spec: Any) -> dict[str, Any]:
    return resource("networking.istio.io/v1", "DestinationRule", spec)


def se(spec: Any) -> dict[str, Any]:
    return resource("networking.istio.io/v1", "ServiceEntry", spec)


def service(spec: Any, name: str = "reviews") -> dict[str, Any]:
    return resource("v1", "Service", spec, name)


def mesh_config(spec: Any) -> dict[str, Any]:
    return resource("minimesh.dev/v1", "MeshConfig", spec, "mesh")


def route_test(spec: Any) -> dict[str, Any]:
    return resource("minimesh.dev/v1", "RouteTest", spec, "jason-gets-v2")


def route(**extra: Any) -> dict[str, Any]:
    return {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}], **extra}]}


def issue(
    path: tuple[str | int, ...], message: str, at_key: bool = False, code: IssueCode = IssueCode.SCHEMA
) -> SchemaIssue:
    return SchemaIssue(path, message, at_key, code)


HTTP0 = ("spec", "http", 0)
GOOD_ROUTE_TEST = {"request": {"url": "http://reviews/", "headers": {"end-user": "jason"}}, "expect": {"subset": "v2"}}

GOOD = {
    "virtual service": vs(route(timeout="1.5s", retries={"attempts": 3, "perTryTimeout": "100ms"})),
    "durations with units combined": vs(route(timeout="1h2m", retries={"perTryTimeout": "0.5s"})),
    "an integral float is an integer": vs(
        {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}, "weight": 50.0}]}]}
    ),
    "a null field is dropped": vs({"hosts": ["reviews"], "http": None}),
    "legacy apiVersion": {**vs(route()), "apiVersion": "networking.istio.io/v1alpha3"},
    "destination rule": dr({"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}}),
    "preserved unknown fields": resource(
        "networking.istio.io/v1alpha3",
        "EnvoyFilter",
        {
            "configPatches": [
                {"applyTo": "HTTP_FILTER", "patch": {"operation": "MERGE", "value": {"any": [1, {"x": None}]}}}
            ]
        },
    ),
    "service": service(
        {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080, "targetPort": "http"}]}
    ),
    "service with numeric target port": service(
        {"selector": {"app": "r"}, "ports": [{"port": 80, "targetPort": 8080}]}
    ),
    "headless service": service({"clusterIP": "None", "selector": {"app": "r"}}),
    "service status": {**service({"ports": [{"port": 80}]}), "status": {"loadBalancer": {}}},
    "mesh config": mesh_config(
        {
            "outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"},
            "defaultRetry": {"attempts": 2, "perTryTimeout": "2s", "retryOn": "5xx"},
            "accessLogFile": "",
            "accessLogEncoding": "JSON",
        }
    ),
    "route test": route_test(GOOD_ROUTE_TEST),
    "full metadata": {
        **vs(route()),
        "metadata": {
            "name": "reviews.v1",
            "namespace": "bookinfo",
            "labels": {"app.kubernetes.io/name": "reviews", "version": ""},
            "annotations": {"example.com/owner": "team a"},
            "uid": "1234",
            "resourceVersion": "7",
            "generation": 3,
            "creationTimestamp": "2024-01-31T12:00:00Z",
            "finalizers": ["example.com/keep"],
        },
    },
}


@pytest.mark.parametrize("document", GOOD.values(), ids=GOOD.keys())
def test_accepts(document: dict[str, Any]) -> None:
    assert check_document(document) == []


BAD: dict[str, tuple[Any, list[SchemaIssue]]] = {
    "unknown field with did-you-mean": (
        vs({"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}, "weigth": 50}]}]}),
        [issue((*HTTP0, "route", 0, "weigth"), "unknown field 'weigth'; did you mean 'weight'?", True)],
    ),
    "unknown field without a close name": (
        vs({"hosts": ["r"], "zzz": 1}),
        [issue(("spec", "zzz"), "unknown field 'zzz'; allowed here: exportTo, gateways, hosts, http, tcp, tls", True)],
    ),
    "unknown field lists at most eight names": (
        vs(route(xyzzy=1)),
        [
            issue(
                (*HTTP0, "xyzzy"),
                "unknown field 'xyzzy'; allowed here: corsPolicy, delegate, directResponse, fault, headers, "
                "match, mirror, mirrorPercent, ...",
                True,
            )
        ],
    ),
    "unknown top-level field": (
        {**vs(route()), "specs": {}},
        [issue(("specs",), "unknown field 'specs'; did you mean 'spec'?", True)],
    ),
    "wrong type": (
        vs({"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}, "weight": "fifty"}]}]}),
        [issue((*HTTP0, "route", 0, "weight"), "must be an integer, got string 'fifty'")],
    ),
    "quoted number": (
        vs({"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}, "weight": "50"}]}]}),
        [issue((*HTTP0, "route", 0, "weight"), "must be an integer, got string '50'; write the number without quotes")],
    ),
    "a boolean is not an integer": (
        vs(route(retries={"attempts": True})),
        [issue((*HTTP0, "retries", "attempts"), "must be an integer, got boolean true")],
    ),
    "a fraction is not an integer": (
        vs(route(retries={"attempts": 1.5})),
        [issue((*HTTP0, "retries", "attempts"), "must be an integer, got number 1.5")],
    ),
    "a list where a string goes": (
        vs({"hosts": "reviews"}),
        [issue(("spec", "hosts"), "must be a list, got string 'reviews'")],
    ),
    "int32 range": (
        vs(route(retries={"attempts": 2**31})),
        [
            issue(
                (*HTTP0, "retries", "attempts"), "must be a 32-bit integer (-2147483648 to 2147483647), got 2147483648"
            )
        ],
    ),
    "bad enum with did-you-mean": (
        dr({"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "ROUNDROBIN"}}}),
        [
            issue(
                ("spec", "trafficPolicy", "loadBalancer", "simple"),
                "must be one of UNSPECIFIED, LEAST_CONN, RANDOM, PASSTHROUGH, ROUND_ROBIN, LEAST_REQUEST, "
                "got 'ROUNDROBIN'; did you mean 'ROUND_ROBIN'?",
            )
        ],
    ),
    "missing required": (dr({"subsets": [{"name": "v1"}]}), [issue(("spec",), "missing required field 'host'")]),
    "missing required in a list item": (
        vs({"hosts": ["r"], "http": [{"route": [{"weight": 1}]}]}),
        [issue((*HTTP0, "route", 0), "missing required field 'destination'")],
    ),
    "mutually exclusive fields": (
        vs(route(match=[{"uri": {"exact": "/a", "prefix": "/"}}])),
        [
            issue(
                (*HTTP0, "match", 0, "uri", "prefix"),
                "set only one of 'exact', 'prefix', 'regex'; found 'exact' and 'prefix'",
                True,
            )
        ],
    ),
    "mutually exclusive fields under allOf": (
        dr(
            {
                "host": "r",
                "trafficPolicy": {"loadBalancer": {"simple": "RANDOM", "consistentHash": {"useSourceIp": True}}},
            }
        ),
        [
            issue(
                ("spec", "trafficPolicy", "loadBalancer", "consistentHash"),
                "set only one of 'simple', 'consistentHash'; found 'simple' and 'consistentHash'",
                True,
            )
        ],
    ),
    "bad duration": (
        vs(route(timeout="1.5x")),
        [issue((*HTTP0, "timeout"), "invalid duration '1.5x'; use a number with a unit: 100ms, 1.5s, 1m, 1h")],
    ),
    "duration without unit": (
        vs(route(retries={"perTryTimeout": "5"})),
        [
            issue(
                (*HTTP0, "retries", "perTryTimeout"),
                "invalid duration '5'; use a number with a unit: 100ms, 1.5s, 1m, 1h",
            )
        ],
    ),
    "duration too short": (
        vs(route(timeout="999us")),
        [issue((*HTTP0, "timeout"), "must be a valid duration greater than 1ms")],
    ),
    "ServiceEntry port out of range": (
        se({"hosts": ["example.com"], "ports": [{"name": "http", "number": 70000}]}),
        [issue(("spec", "ports", 0, "number"), "port must be between 1-65535")],
    ),
    "duplicate list-map key": (
        se({"hosts": ["example.com"], "ports": [{"name": "a", "number": 1}, {"name": "a", "number": 2}]}),
        [issue(("spec", "ports", 1), "duplicate entry: entry 0 has the same name; give each entry its own name")],
    ),
    "map key that is not a port number": (
        resource(
            "security.istio.io/v1",
            "PeerAuthentication",
            {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"x": {}}},
        ),
        [issue(("spec", "portLevelMtls"), "port must be between 1-65535; 'x' is not an integer")],
    ),
    "substring out of range": (
        resource("networking.istio.io/v1", "WorkloadEntry", {"address": "unix://"}),
        [
            issue(
                ("spec", "address"),
                "UDS must be an absolute path or abstract socket; 'unix://' has no characters 7 to 8",
            ),
            issue(("spec", "address"), "UDS may not be a dir"),
        ],
    ),
    "url without scheme": (
        resource(
            "security.istio.io/v1", "RequestAuthentication", {"jwtRules": [{"issuer": "a", "jwksUri": "a.com/k"}]}
        ),
        [
            issue(
                ("spec", "jwtRules", 0, "jwksUri"),
                "url must have scheme http:// or https://; 'a.com/k' is not a valid URL (invalid URI for request)",
            )
        ],
    ),
    "url with another scheme": (
        resource(
            "security.istio.io/v1", "RequestAuthentication", {"jwtRules": [{"issuer": "a", "jwksUri": "ftp://a/k"}]}
        ),
        [issue(("spec", "jwtRules", 0, "jwksUri"), "url must have scheme http:// or https://")],
    ),
    "null list item": (
        vs({"hosts": ["r", None]}),
        [issue(("spec", "hosts", 1), "must be a string, got null; give it a value or remove the field")],
    ),
    "empty map with minProperties": (
        resource(
            "security.istio.io/v1", "PeerAuthentication", {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {}}
        ),
        [issue(("spec", "portLevelMtls"), "must have at least 1 entry, got 0; add one or remove the field")],
    ),
    "not a finite number": (
        dr(
            {"host": "r", "trafficPolicy": {"loadBalancer": {"warmup": {"duration": "1s", "aggression": float("nan")}}}}
        ),
        [issue(("spec", "trafficPolicy", "loadBalancer", "warmup", "aggression"), "must be a finite number, got nan")],
    ),
    "service: int-or-string gets a list": (
        service({"selector": {"app": "r"}, "ports": [{"port": 80, "targetPort": [80]}]}),
        [issue(("spec", "ports", 0, "targetPort"), "must be an integer or a string, got a list")],
    ),
    "service: target port out of range": (
        service({"selector": {"app": "r"}, "ports": [{"port": 80, "targetPort": 0}]}),
        [
            issue(
                ("spec", "ports", 0, "targetPort"),
                "targetPort must be a port number 1-65535 or the name of a container port",
            )
        ],
    ),
    "service: port out of range": (
        service({"selector": {"app": "r"}, "ports": [{"port": 65536}]}),
        [issue(("spec", "ports", 0, "port"), "must be between 1 and 65535, got 65536")],
    ),
    "service: port required": (
        service({"selector": {"app": "r"}, "ports": [{"name": "http"}]}),
        [issue(("spec", "ports", 0), "missing required field 'port'")],
    ),
    "service: protocol enum": (
        service({"ports": [{"port": 80, "protocol": "tcp"}]}),
        [issue(("spec", "ports", 0, "protocol"), "must be one of TCP, UDP, SCTP, got 'tcp'; did you mean 'TCP'?")],
    ),
    "service: two ports without names": (
        service({"ports": [{"port": 80}, {"port": 81}]}),
        [issue(("spec", "ports"), "a Service with more than one port needs a name on every port")],
    ),
    "service: no ports": (
        service({"selector": {"app": "r"}}),
        [
            issue(
                ("spec",),
                "a Service needs at least one entry in ports, unless it is headless (clusterIP: None) "
                "or of type ExternalName",
            )
        ],
    ),
    "service: name is a DNS-1035 label": (
        service({"ports": [{"port": 80}]}, name="9reviews"),
        [
            issue(
                ("metadata", "name"),
                "invalid Service name '9reviews': use at most 63 lowercase letters, digits or '-', "
                "starting with a letter and ending with a letter or digit",
            )
        ],
    ),
    "mesh config: bad mode": (
        mesh_config({"outboundTrafficPolicy": {"mode": "registry_only"}}),
        [
            issue(
                ("spec", "outboundTrafficPolicy", "mode"),
                "must be one of ALLOW_ANY, REGISTRY_ONLY, got 'registry_only'; did you mean 'REGISTRY_ONLY'?",
            )
        ],
    ),
    "mesh config: default retry is Istio's HTTPRetry": (
        mesh_config({"defaultRetry": {"attempts": 2, "perTryTimout": "1s"}}),
        [
            issue(
                ("spec", "defaultRetry", "perTryTimout"),
                "unknown field 'perTryTimout'; did you mean 'perTryTimeout'?",
                True,
            )
        ],
    ),
    "mesh config: bad retry timeout": (
        mesh_config({"defaultRetry": {"perTryTimeout": "soon"}}),
        [
            issue(
                ("spec", "defaultRetry", "perTryTimeout"),
                "invalid duration 'soon'; use a number with a unit: 100ms, 1.5s, 1m, 1h",
            )
        ],
    ),
    "mesh config: access log encoding": (
        mesh_config({"accessLogEncoding": "YAML"}),
        [issue(("spec", "accessLogEncoding"), "must be one of TEXT, JSON, got 'YAML'")],
    ),
    "route test: missing url and expect": (
        route_test({"request": {"method": "GET"}}),
        [
            issue(("spec",), "missing required field 'expect'"),
            issue(("spec", "request"), "missing required field 'url'"),
        ],
    ),
    "route test: status out of range": (
        route_test({**GOOD_ROUTE_TEST, "expect": {"status": 700}}),
        [issue(("spec", "expect", "status"), "must be between 100 and 599, got 700")],
    ),
    "route test: fault enum": (
        route_test({**GOOD_ROUTE_TEST, "expect": {"fault": "abrt"}}),
        [issue(("spec", "expect", "fault"), "must be one of abort, delay, none, got 'abrt'; did you mean 'abort'?")],
    ),
    "route test: no spec": (
        {"apiVersion": "minimesh.dev/v1", "kind": "RouteTest", "metadata": {"name": "t"}},
        [issue((), "missing required field 'spec'")],
    ),
    "wrong apiVersion": (
        {**vs(route()), "apiVersion": "networking.istio.io/v2"},
        [
            issue(
                ("apiVersion",),
                "VirtualService is not served as apiVersion 'networking.istio.io/v2'; use networking.istio.io/v1, "
                "networking.istio.io/v1beta1 or networking.istio.io/v1alpha3",
                code=IssueCode.VERSION,
            )
        ],
    ),
    "version not served for the kind": (
        {**resource("security.istio.io/v1alpha3", "PeerAuthentication", {})},
        [
            issue(
                ("apiVersion",),
                "PeerAuthentication is not served as apiVersion 'security.istio.io/v1alpha3'; "
                "use security.istio.io/v1 or security.istio.io/v1beta1",
                code=IssueCode.VERSION,
            )
        ],
    ),
    "service in the wrong group": (
        {**service({"ports": [{"port": 80}]}), "apiVersion": "networking.istio.io/v1"},
        [
            issue(
                ("apiVersion",),
                "Service is not served as apiVersion 'networking.istio.io/v1'; use v1",
                code=IssueCode.VERSION,
            )
        ],
    ),
    "unknown kind": (
        resource("example.com/v1", "Widget", {}),
        [
            issue(
                ("kind",),
                "unknown kind 'Widget' (apiVersion example.com/v1): minimesh ignores this document",
                code=IssueCode.UNKNOWN_KIND,
            )
        ],
    ),
    "unknown kind with did-you-mean": (
        resource("networking.istio.io/v1", "VirtualServce", {}),
        [
            issue(
                ("kind",),
                "unknown kind 'VirtualServce' (apiVersion networking.istio.io/v1): minimesh ignores this document; "
                "did you mean 'VirtualService'?",
                code=IssueCode.UNKNOWN_KIND,
            )
        ],
    ),
    "missing apiVersion": (
        {"kind": "VirtualService", "metadata": {"name": "r"}, "spec": {}},
        [
            issue(
                (),
                "missing required field 'apiVersion'; VirtualService uses networking.istio.io/v1, "
                "networking.istio.io/v1beta1 or networking.istio.io/v1alpha3",
                code=IssueCode.HEAD,
            )
        ],
    ),
    "missing kind and a non-string apiVersion": (
        {"apiVersion": 1, "metadata": {"name": "r"}},
        [
            issue(("apiVersion",), "must be a string, got integer 1", code=IssueCode.HEAD),
            issue((), "missing required field 'kind'", code=IssueCode.HEAD),
        ],
    ),
    "not a mapping": (
        ["a"],
        [
            issue(
                (),
                "a config document must be a mapping with apiVersion, kind and metadata, got a list",
                code=IssueCode.NOT_A_DOCUMENT,
            )
        ],
    ),
    "missing metadata": (
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "spec": {}},
        [issue((), "missing required field 'metadata'")],
    ),
    "missing name": (
        {**vs(route()), "metadata": {"namespace": "default"}},
        [issue(("metadata",), "missing required field 'name'")],
    ),
    "bad name": (
        {**vs(route()), "metadata": {"name": "Reviews_v1"}},
        [
            issue(
                ("metadata", "name"),
                "invalid name 'Reviews_v1': use at most 253 lowercase letters, digits, '-' or '.', "
                "starting and ending with a letter or digit",
            )
        ],
    ),
    "bad namespace": (
        {**vs(route()), "metadata": {"name": "r", "namespace": "a.b"}},
        [
            issue(
                ("metadata", "namespace"),
                "invalid namespace 'a.b': use at most 63 lowercase letters, digits or '-', "
                "starting and ending with a letter or digit",
            )
        ],
    ),
    "unknown metadata field": (
        {**vs(route()), "metadata": {"name": "r", "label": {"a": "b"}}},
        [issue(("metadata", "label"), "unknown field 'label'; did you mean 'labels'?", True)],
    ),
    "label key and value": (
        {**vs(route()), "metadata": {"name": "r", "labels": {"-app": "x y", "v": 1}}},
        [
            issue(("metadata", "labels", "v"), "must be a string, got integer 1; put the value in quotes"),
            issue(
                ("metadata", "labels", "-app"),
                "invalid label key '-app': use an optional DNS prefix and '/', then at most 63 letters, digits, "
                "'-', '_' or '.', starting and ending with a letter or digit",
                True,
            ),
            issue(
                ("metadata", "labels", "-app"),
                "invalid label value 'x y': use at most 63 letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit, or leave it empty",
            ),
        ],
    ),
}


@pytest.mark.parametrize(("document", "expected"), BAD.values(), ids=BAD.keys())
def test_rejects(document: Any, expected: list[SchemaIssue]) -> None:
    assert check_document(document) == expected


# --- CEL functions, through the rules that use them ------------------------------------------------

DURATION: dict[str, Any] = {
    "type": "string",
    "x-kubernetes-validations": [{"rule": "duration(self) >= duration('1ms')", "message": "too short"}],
}
BAD_DURATION = "invalid duration '{}'; use a number with a unit: 100ms, 1.5s, 1m, 1h"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1ms", None),
        ("1.5s", None),
        ("1h2m3.5s", None),
        ("+5s", None),
        (".5s", None),
        ("5.s", None),
        ("1000us", None),
        ("1000µs", None),
        ("1000000ns", None),
        ("999999ns", "too short"),
        ("0", "too short"),
        ("-1s", "too short"),
        ("1.5x", BAD_DURATION.format("1.5x")),
        ("1d", BAD_DURATION.format("1d")),
        ("1", BAD_DURATION.format("1")),
        ("", BAD_DURATION.format("")),
        (".s", BAD_DURATION.format(".s")),
        (" 1s", BAD_DURATION.format(" 1s")),
        ("1e3s", BAD_DURATION.format("1e3s")),
        ("2562048h", BAD_DURATION.format("2562048h")),
    ],
)
def test_go_durations(text: str, message: str | None) -> None:
    expected = [] if message is None else [SchemaIssue(("timeout",), message)]
    assert check_value(text, DURATION, ("timeout",)) == expected


WASM_URL = ("extensions.istio.io/v1alpha1", "WasmPlugin", ("spec", "url"))
JWKS_URI = ("security.istio.io/v1", "RequestAuthentication", ("spec", "jwtRules", "jwksUri"))


@pytest.mark.parametrize(
    ("field", "url", "ok"),
    [
        (WASM_URL, "oci://ghcr.io/istio/wasm:1", True),
        (WASM_URL, "https://example.com/filter.wasm", True),
        (WASM_URL, "file:///opt/filter.wasm", True),
        (WASM_URL, "ghcr.io/istio/wasm", True),
        (WASM_URL, "ftp://example.com/filter.wasm", False),
        (JWKS_URI, "https://example.com/.well-known/jwks.json", True),
        (JWKS_URI, "http://[::1]:8080/keys", True),
        (JWKS_URI, "http://user:pw@example.com/keys", True),
        (JWKS_URI, "http://bad host/keys", False),
        (JWKS_URI, "http://example.com:80a/keys", False),
        (JWKS_URI, "http://example.com/%zz", False),
        (JWKS_URI, "/keys", False),
        (JWKS_URI, "mailto:keys@example.com", False),
    ],
)
def test_kubernetes_url_functions(field: tuple[str, str, tuple[str, ...]], url: str, ok: bool) -> None:
    schema = field_schema(*field)
    assert schema is not None
    assert (check_value(url, schema) == []) is ok


def test_message_expression_and_field_path() -> None:
    schema = {
        "type": "object",
        "properties": {"low": {"type": "integer"}, "high": {"type": "integer"}},
        "x-kubernetes-validations": [
            {
                "rule": "self.low <= self.high",
                "messageExpression": "'low (' + string(self.low) + ') must not exceed high'",
                "fieldPath": ".low",
            }
        ],
    }
    assert check_value({"low": 3, "high": 2}, schema) == [SchemaIssue(("low",), "low (3) must not exceed high")]
    assert check_value({"low": 1, "high": 2}, schema) == []


def test_list_types() -> None:
    tags = {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"}
    assert check_value(["a", "b", "a"], tags) == [
        SchemaIssue((2,), "duplicate entry: entry 0 has the same value; list each value once")
    ]
    ports = {
        "type": "array",
        "items": {"type": "object", "properties": {"port": {"type": "integer"}, "protocol": {"type": "string"}}},
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["port", "protocol"],
    }
    entries = [{"port": 80, "protocol": "TCP"}, {"port": 80, "protocol": "UDP"}, {"port": 80, "protocol": "TCP"}]
    assert check_value(entries, ports) == [
        SchemaIssue(
            (2,), "duplicate entry: entry 0 has the same port and protocol; give each entry its own port and protocol"
        )
    ]


def test_yaml_values_kubernetes_reads_as_strings_or_rejects() -> None:
    created = datetime.datetime(2024, 1, 31, 12, 0, tzinfo=datetime.UTC)
    document = {**vs(route()), "metadata": {"name": "r", "creationTimestamp": created}}
    assert check_document(document) == []
    document = {**vs(route()), "metadata": {"name": "r", "creationTimestamp": datetime.date(2024, 1, 31)}}
    assert check_document(document) == [
        issue(
            ("metadata", "creationTimestamp"),
            "must be an RFC 3339 date-time such as 2024-01-31T12:00:00Z, got '2024-01-31'",
        )
    ]
    assert check_document(vs({"hosts": {"a", "b"}})) == [
        issue(("spec", "hosts"), "is not a JSON value (set); write a string, number, boolean, list or mapping")
    ]


def test_rule_on_an_absent_field_is_not_evaluated() -> None:
    document = vs({"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}]}]})
    assert check_document(document) == []


def test_rules_do_not_run_under_a_type_error() -> None:
    document = vs(route(retries={"perTryTimeout": 5}))
    assert check_document(document) == [
        issue((*HTTP0, "retries", "perTryTimeout"), "must be a string, got integer 5; put the value in quotes")
    ]


# --- robustness --------------------------------------------------------------------------------


KINDS = ["VirtualService", "DestinationRule", "ServiceEntry", "WorkloadEntry", "Gateway", "Sidecar"]


def property_names() -> list[str]:
    names: set[str] = set()

    def walk(schema: Any) -> None:
        if isinstance(schema, dict):
            names.update(schema.get("properties", {}))
            for value in schema.values():
                walk(value)
        elif isinstance(schema, list):
            for value in schema:
                walk(value)

    for kind in KINDS:
        walk(field_schema("networking.istio.io/v1", kind, ("spec",)))
    return sorted(names)


SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
KEYS = st.sampled_from(property_names()) | st.text(max_size=8)
JSON_LIKE = st.recursive(
    SCALARS | st.sampled_from(["1s", "100ms", "ROUND_ROBIN", "unix://", "80", "*", "1.2.3.4/16", "DNS"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), spec=JSON_LIKE)
def test_never_raises(kind: str, spec: Any) -> None:
    issues = check_document(resource("networking.istio.io/v1", kind, spec))
    assert isinstance(issues, list)
    assert all(isinstance(found, SchemaIssue) for found in issues)


@settings(max_examples=100, deadline=None)
@given(body=JSON_LIKE, metadata=JSON_LIKE)
def test_never_raises_on_any_document(body: Any, metadata: Any) -> None:
    if isinstance(body, dict):
        body = {**body, "apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": metadata}
    assert isinstance(check_document(body), list)
