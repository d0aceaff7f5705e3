"""The loader: typed values with Istio's defaults, and every bad input located exactly."""

from __future__ import annotations

import random
import textwrap
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimesh.config import model as m
from minimesh.config.load import Loaded, load_layers, load_paths
from minimesh.config.source import parse_text
from minimesh.errors import ConfigError
from tests.conftest import BOOKINFO, ROOT

VS_HEAD = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
"""


def load(text: str, file: str = "mesh.yaml") -> Loaded:
    documents, problems = parse_text(textwrap.dedent(text), file)
    return load_layers([documents], problems)


def lines(loaded: Loaded, severity: str = "error") -> list[str]:
    return [str(p) for p in loaded.problems if p.severity == severity]


def test_bookinfo_loads_clean() -> None:
    loaded = load_paths([str(BOOKINFO)])
    assert [str(p) for p in loaded.problems if p.severity != "note"] == []
    mesh = loaded.mesh
    assert {vs.meta.name for vs in mesh.virtual_services} == {
        "bookinfo",
        "productpage",
        "reviews",
        "ratings",
        "details",
    }
    reviews = next(dr for dr in mesh.destination_rules if dr.host == "reviews")
    assert [s.name for s in reviews.subsets] == ["v1", "v2", "v3"]
    assert reviews.subsets[1].labels == (("version", "v2"),)
    assert mesh.gateways[0].selector == (("istio", "ingressgateway"),)


def test_a_later_layer_replaces_a_document_of_the_same_name() -> None:
    jason = BOOKINFO / "variants" / "virtual-service-reviews-jason-v2.yaml"
    loaded = load_paths([str(BOOKINFO), str(jason)])
    assert loaded.errors == ()
    reviews = next(vs for vs in loaded.mesh.virtual_services if vs.meta.name == "reviews")
    assert reviews.http[0].match[0].headers[0][0] == "end-user"
    assert any(p.severity == "note" and "replaces VirtualService/reviews" in p.message for p in loaded.problems)


def test_values_are_typed_with_istio_defaults() -> None:
    loaded = load(
        VS_HEAD
        + """\
  - timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 100ms}
    fault:
      delay: {fixedDelay: 1m, percentage: {value: 12.5}}
      abort: {httpStatus: 503, percentage: {value: 100}}
    mirror: {host: reviews, subset: v2}
    route:
    - destination: {host: reviews, subset: v1, port: {number: 9080}}
"""
    )
    assert lines(loaded) == []
    route = loaded.mesh.virtual_services[0].http[0]
    assert route.timeout == 1.5
    assert route.retries == m.HTTPRetry(attempts=3, per_try_timeout=0.1)
    assert route.fault == m.HTTPFaultInjection(m.Delay(60.0, 12.5), m.Abort(503, 100.0))
    assert route.mirrors == (m.Mirror(m.Destination("reviews", "v2"), None),)
    assert route.route[0].destination == m.Destination("reviews", "v1", 9080)
    assert route.location.line == 8


def test_a_grpc_status_abort_answers_200_with_the_code() -> None:
    loaded = load(VS_HEAD + "  - fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 50}}}\n"
                  "    route: [{destination: {host: reviews}}]\n")  # fmt: skip
    assert lines(loaded) == [] and lines(loaded, "warning") == []
    assert loaded.mesh.virtual_services[0].http[0].fault == m.HTTPFaultInjection(abort=m.Abort(200, 50.0, 14))


def test_outlier_detection_gets_istio_defaults() -> None:
    loaded = load(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews}
        spec:
          host: reviews
          trafficPolicy:
            outlierDetection: {baseEjectionTime: 1s}
        """
    )
    assert lines(loaded) == []
    policy = loaded.mesh.destination_rules[0].traffic_policy
    assert policy is not None
    assert policy.outlier_detection == m.OutlierDetection(
        consecutive_5xx_errors=5, interval=10.0, base_ejection_time=1.0, max_ejection_percent=10
    )


BAD = [
    (
        "  - timeout: 1.5x\n    route: [{destination: {host: reviews}}]\n",
        "mesh.yaml:8:14: error: invalid duration '1.5x'; use a number with a unit: 100ms, 1.5s, 1m, 1h "
        "(VirtualService/reviews http[0].timeout)",
    ),
    (
        "  - match: [{uri: {regex: 'a(b'}}]\n    route: [{destination: {host: reviews}}]\n",
        "mesh.yaml:8:27: error: regex 'a(b' does not compile: missing ), unterminated subpattern at position 1; "
        "write it in RE2 syntax (VirtualService/reviews http[0].match[0].uri.regex)",
    ),
    (
        "  - route:\n    - {destination: {host: reviews}, weight: -5}\n    - {destination: {host: reviews}, weight: 5}\n",
        "mesh.yaml:9:46: error: weight must not be negative, got -5 (VirtualService/reviews http[0].route[0].weight)",
    ),
    (
        "  - route:\n    - {destination: {host: reviews}, weight: 0}\n    - {destination: {host: reviews}, weight: 0}\n",
        "mesh.yaml:9:5: error: every destination has weight 0, so none gets traffic; give at least one a weight "
        "(VirtualService/reviews http[0].route)",
    ),
    (
        "  - fault: {abort: {httpStatus: 503, percentage: {value: 150}}}\n    route: [{destination: {host: r}}]\n",
        "mesh.yaml:8:58: error: percentage must be between 0 and 100, got 150 "
        "(VirtualService/reviews http[0].fault.abort.percentage.value)",
    ),
    (
        "  - retries: {attempts: 2, retryOn: '5xx,gateway-eror'}\n    route: [{destination: {host: r}}]\n",
        "mesh.yaml:8:37: error: unknown retryOn condition 'gateway-eror'; did you mean 'gateway-error'? "
        "(VirtualService/reviews http[0].retries.retryOn)",
    ),
    (
        "  - fault: {abort: {httpStatus: 99, percentage: {value: 1}}}\n    route: [{destination: {host: r}}]\n",
        "mesh.yaml:8:33: error: httpStatus must be in 200-599, got 99 (VirtualService/reviews http[0].fault.abort.httpStatus)",
    ),
    (
        "  - fault: {abort: {grpcStatus: UNAVAILBLE, percentage: {value: 1}}}\n    route: [{destination: {host: r}}]\n",
        "mesh.yaml:8:33: error: unknown grpcStatus 'UNAVAILBLE'; did you mean 'UNAVAILABLE'? "
        "(VirtualService/reviews http[0].fault.abort.grpcStatus)",
    ),
    (
        "  - fault: {abort: {http2Error: REFUSED_STREAM}}\n    route: [{destination: {host: r}}]\n",
        "mesh.yaml:8:20: error: abort needs httpStatus or grpcStatus (http2Error has no effect locally) "
        "(VirtualService/reviews http[0].fault.abort)",
    ),
    (
        "  - match: [{uri: {exact: /}}]\n",
        "mesh.yaml:8:5: error: an http route needs one of route, redirect, directResponse (VirtualService/reviews http[0])",
    ),
]


@pytest.mark.parametrize(("http", "expected"), BAD)
def test_bad_values_are_located_exactly(http: str, expected: str) -> None:
    assert lines(load(VS_HEAD + http)) == [expected]


def test_typo_in_a_field_is_an_error_with_a_suggestion() -> None:
    loaded = load(VS_HEAD + "  - route:\n    - destination: {host: reviews}\n      weigth: 100\n")
    assert lines(loaded) == [
        "mesh.yaml:10:7: error: unknown field 'weigth'; did you mean 'weight'? "
        "(VirtualService/reviews http[0].route[0].weigth)"
    ]


def test_a_field_minimesh_does_not_implement_is_a_warning() -> None:
    loaded = load(VS_HEAD + "  - route: [{destination: {host: reviews}}]\n    mirrorPercentage: {value: 5}\n")
    assert lines(loaded) == []
    assert lines(loaded, "warning") == [
        "mesh.yaml:9:5: warning: field 'mirrorPercentage' has no effect locally; minimesh accepts but ignores it "
        "(VirtualService/reviews http[0].mirrorPercentage)"
    ]


def test_duplicate_names_in_one_layer_are_errors() -> None:
    doc = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews}\nspec: {ports: [{port: 9080}]}\n"
    loaded = load(doc + "---\n" + doc)
    assert lines(loaded) == [
        "mesh.yaml:8:18: error: Service/reviews is defined twice (first at mesh.yaml:1:1); "
        "rename one or remove the duplicate (Service/reviews)"
    ]


def test_broken_yaml_is_one_located_line() -> None:
    loaded = load("kind: VirtualService\nmetadata: {name: x\nspec: {}\n")
    assert len(loaded.problems) == 1
    assert str(loaded.problems[0]).startswith("mesh.yaml:3:5: error: invalid YAML: ")


def test_a_compose_file_is_skipped_with_a_note() -> None:
    loaded = load_paths([str(BOOKINFO / "mesh.yaml"), str(BOOKINFO / "variants")][:1])
    assert loaded.errors == ()
    documents, problems = parse_text("services:\n  web: {image: nginx}\n", "docker-compose.yml")
    assert problems == [] and documents[0].kind == ""


def test_unknown_kind_is_a_warning_and_ignored() -> None:
    loaded = load("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\nspec: {}\n")
    assert lines(loaded) == []
    assert len(lines(loaded, "warning")) == 1
    assert "unknown kind" in lines(loaded, "warning")[0]


def test_raise_errors_raises_a_config_error() -> None:
    with pytest.raises(ConfigError) as raised:
        load(VS_HEAD + "  - timeout: nope\n    route: [{destination: {host: r}}]\n").raise_errors()
    assert "invalid duration 'nope'" in str(raised.value)


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
KINDS = ["VirtualService", "DestinationRule", "Gateway", "ServiceEntry", "WorkloadEntry", "AuthorizationPolicy"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), spec=yaml_values)
def test_random_documents_never_raise(kind: str, spec: object) -> None:
    group = "security.istio.io/v1" if kind == "AuthorizationPolicy" else "networking.istio.io/v1"
    text = yaml.safe_dump({"apiVersion": group, "kind": kind, "metadata": {"name": "x"}, "spec": spec})
    loaded = load(text)
    assert all(p.location.line >= 1 for p in loaded.problems)


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(min_value=0, max_value=2000), junk=st.text(max_size=5))
def test_mutated_bookinfo_never_raises(cut: int, junk: str) -> None:
    text = (BOOKINFO / "mesh.yaml").read_text()
    cut %= len(text)
    loaded = load(text[:cut] + junk + text[cut + len(junk) :])
    try:
        loaded.raise_errors()
    except ConfigError as exc:
        assert exc.problems


def test_yaml_merge_keys_merge_and_explicit_keys_win() -> None:
    documents, problems = parse_text("base: &b {a: 1, b: 2}\nother:\n  <<: *b\n  b: 3\n", "x.yaml")
    assert problems == []
    assert documents[0].body["other"] == {"a": 1, "b": 3}
    _, duplicate = parse_text("m:\n  a: 1\n  a: 2\n", "x.yaml")
    assert [str(p) for p in duplicate] == ["x.yaml:3:3: error: duplicate key 'a'"]


def test_redirect_prefix_rewrite_is_read_and_not_warned_about() -> None:
    loaded = load(VS_HEAD + "  - match: [{uri: {prefix: /foo/}}]\n    redirect: {prefixRewrite: /new/}\n")
    assert loaded.problems == ()
    assert loaded.mesh.virtual_services[0].http[0].redirect == m.HTTPRedirect(prefix_rewrite="/new/")


@pytest.mark.parametrize(
    ("http", "expected"),
    [
        (
            "  - redirect: {uri: /old, prefixRewrite: /new}\n",
            "mesh.yaml:8:15: error: a redirect takes only one of uri and prefixRewrite; remove one "
            "(VirtualService/reviews http[0].redirect)",
        ),
        (
            "  - match: [{uri: {prefix: /a}}, {uri: {exact: /b}}]\n    redirect: {prefixRewrite: /new}\n",
            "mesh.yaml:8:40: error: redirect.prefixRewrite replaces the matched prefix, but match[1] matches the uri "
            "by exact; use uri.prefix or redirect.uri (VirtualService/reviews http[0].match[1].uri)",
        ),
    ],
)
def test_redirect_prefix_rewrite_is_refused_where_istio_refuses_it(http: str, expected: str) -> None:
    assert lines(load(VS_HEAD + http)) == [expected]


def test_a_prefix_rewrite_on_a_rule_without_uri_matches_is_valid() -> None:
    loaded = load(VS_HEAD + "  - match: [{headers: {x-foo: {exact: bar}}}]\n    redirect: {prefixRewrite: /bar}\n")
    assert lines(loaded) == []


def test_without_headers_regex_star_is_a_present_match() -> None:
    loaded = load(
        VS_HEAD + "  - match: [{withoutHeaders: {x-canary: {regex: '*'}}}]\n    route: [{destination: {host: r}}]\n"
    )
    assert loaded.problems == ()
    assert loaded.mesh.virtual_services[0].http[0].match[0].without_headers == (("x-canary", None),)


def test_headers_regex_star_is_still_refused() -> None:
    loaded = load(VS_HEAD + "  - match: [{headers: {x-canary: {regex: '*'}}}]\n    route: [{destination: {host: r}}]\n")
    assert [p.field for p in loaded.errors] == ["http[0].match[0].headers.x-canary.regex"]
    assert "does not compile" in loaded.errors[0].message


def test_cookie_attributes_are_read() -> None:
    text = """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: web}
        spec:
          host: web
          trafficPolicy:
            loadBalancer:
              consistentHash:
                httpCookie: {name: s, ttl: 1h, path: /, attributes: [{name: SameSite, value: Lax}, {name: Secure}]}
        """
    loaded = load(text)
    assert loaded.problems == ()
    policy = loaded.mesh.destination_rules[0].traffic_policy
    assert policy is not None and policy.load_balancer is not None
    assert policy.load_balancer.consistent_hash == m.ConsistentHash(
        http_cookie_name="s",
        http_cookie_path="/",
        http_cookie_ttl=3600.0,
        http_cookie_attributes=(("SameSite", "Lax"), ("Secure", "")),
    )


def leaves(value: object, path: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every path to a value inside `value` (mappings and lists walked, the rest leaves)."""
    if isinstance(value, dict):
        return [path, *(p for key, child in value.items() for p in leaves(child, (*path, key)))]
    if isinstance(value, list):
        return [path, *(p for index, child in enumerate(value) for p in leaves(child, (*path, index)))]
    return [path]


def replaced(value: Any, path: tuple[object, ...], new: object) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(copy[path[0]], path[1:], new)  # type: ignore[index]
    return copy


CORPUS = [BOOKINFO / "mesh.yaml", *sorted((ROOT / "tests" / "data" / "corpus").glob("*.yaml"))]
CORPUS_DOCUMENTS = [d.body for path in CORPUS for d in parse_text(path.read_text(), str(path))[0]]


TRICKY = ["0", "-1", "1.5", "1e400", "99999999999999999999", "", "*", "0s", "-1s", "1h", "99999999999h", "1ms5",
          "0.0.0.0", "::1", "a..b", ".", "/", "[", "%", "nan", "inf", "-inf", "0x10", "v1", "HTTP", "GRPC"]  # fmt: skip
values = yaml_values | st.sampled_from(TRICKY) | st.integers(min_value=-(2**70), max_value=2**70)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CORPUS_DOCUMENTS), st.randoms(use_true_random=False), values)
def test_any_value_anywhere_in_a_real_document_is_a_located_problem_never_a_crash(
    body: dict[str, Any], rng: random.Random, new: object
) -> None:
    """A builder only meets documents the schema check passed; whatever value a user puts at any
    place in a real document, loading it reports problems (located) or builds it, and never
    raises: a builder's exception is a bug, not a config error."""
    path = rng.choice(leaves(body)[1:])
    text = yaml.safe_dump(replaced(body, path, new))
    loaded = load(text)
    assert all(p.location.line >= 1 and p.message for p in loaded.problems)
