"""The `minimesh` command as a user runs it: a subprocess, its output and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import BOOKINFO, ROOT

JASON = BOOKINFO / "variants" / "virtual-service-reviews-jason-v2.yaml"
FIFTY = BOOKINFO / "variants" / "virtual-service-reviews-50-v3.yaml"


def minimesh(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "minimesh", *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )


def test_validate_bookinfo_is_valid() -> None:
    result = minimesh("validate", "-f", "examples/bookinfo/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("valid: 10 documents, 0 errors, 0 warnings")


def test_validate_every_variant_layered_on_bookinfo() -> None:
    for variant in sorted((BOOKINFO / "variants").glob("*.yaml")):
        result = minimesh("validate", "--strict", "-f", str(BOOKINFO), "-f", str(variant))
        assert result.returncode == 0, f"{variant.name}: {result.stdout}"


def test_a_typo_exits_1_with_the_line_and_a_suggestion() -> None:
    result = minimesh("validate", "-f", "tests/data/typo.yaml")
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == (
        "tests/data/typo.yaml:13:7: error: unknown field 'weigth'; did you mean 'weight'? "
        "(VirtualService/reviews http[0].route[0].weigth)"
    )


def test_broken_yaml_is_one_clear_line_never_a_traceback(tmp_path: Path) -> None:
    broken = tmp_path / "mesh.yaml"
    broken.write_text("kind: VirtualService\nmetadata: {name: x\nspec: {}\n")
    result = minimesh("validate", "-f", str(broken))
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"{broken}:3:5: error: invalid YAML: ")


def test_json_format_lists_every_problem() -> None:
    result = minimesh("validate", "--format", "json", "-f", "tests/data/typo.yaml")
    report = json.loads(result.stdout)
    assert result.returncode == 1
    assert report["valid"] is False
    assert report["problems"][0] == {
        "file": "tests/data/typo.yaml",
        "line": 13,
        "col": 7,
        "severity": "error",
        "message": "unknown field 'weigth'; did you mean 'weight'?",
        "resource": "VirtualService/reviews",
        "field": "http[0].route[0].weigth",
    }


def test_strict_turns_warnings_into_errors(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: lock}\nspec: {}\n"
    )
    assert minimesh("validate", "-f", str(tmp_path)).returncode == 0
    strict = minimesh("validate", "--strict", "-f", str(tmp_path))
    assert strict.returncode == 1
    assert "error: an ALLOW policy with no rules" in strict.stdout


def test_usage_errors_exit_2() -> None:
    assert minimesh("validate", "--format", "yaml").returncode == 2
    assert minimesh("explain", "-f", str(BOOKINFO), "GET").returncode == 2
    bad_header = minimesh("explain", "-f", str(BOOKINFO), "GET", "http://reviews:9080/", "-H", "no-colon")
    assert bad_header.returncode == 2
    assert "-H takes 'Name: value'" in bad_header.stderr


def test_missing_file_is_an_error_naming_it() -> None:
    result = minimesh("validate", "-f", "does-not-exist.yaml")
    assert result.returncode == 1
    assert "no such file or folder 'does-not-exist.yaml'" in result.stdout


def test_explain_names_subset_v2_and_the_rule_for_jason() -> None:
    result = minimesh(
        "explain",
        "-f",
        str(BOOKINFO),
        "-f",
        str(JASON),
        "GET",
        "http://reviews:9080/reviews/0",
        "-H",
        "end-user: jason",
    )
    assert result.returncode == 0, result.stderr
    assert "http[0]" in result.stdout and "match" in result.stdout
    assert "header end-user exact 'jason'" in result.stdout
    assert result.stdout.splitlines()[-1] == (
        "result: route VirtualService/default/reviews#http[0]; destination reviews.default.svc.cluster.local "
        "subset v2 port 9080; status 200; flag -"
    )


def test_explain_says_why_a_rule_missed() -> None:
    result = minimesh("explain", "-f", str(BOOKINFO), "-f", str(JASON), "GET", "http://reviews:9080/reviews/0")
    assert "http[0] " in result.stdout
    assert "miss" in result.stdout
    assert "request has no end-user" in result.stdout
    assert "subset v1" in result.stdout.splitlines()[-1]


def test_explain_shows_the_weight_draw_and_the_seed_decides_it() -> None:
    picked = set()
    for seed in range(6):
        result = minimesh(
            "explain", "-f", str(BOOKINFO), "-f", str(FIFTY), "--seed", str(seed), "GET", "http://reviews:9080/"
        )
        assert result.returncode == 0
        assert "v1=50" in result.stdout and "v3=50" in result.stdout
        picked.add(result.stdout.splitlines()[-1].split(" subset ")[1].split()[0])
    assert picked == {"v1", "v3"}


def test_explain_at_the_gateway_and_a_404() -> None:
    ok = minimesh(
        "explain", "-f", str(BOOKINFO), "--gateway", "bookinfo-gateway", "GET", "http://localhost:8080/productpage"
    )
    assert "route VirtualService/default/bookinfo#http[0]" in ok.stdout
    missing = minimesh(
        "explain", "-f", str(BOOKINFO), "--gateway", "bookinfo-gateway", "GET", "http://localhost:8080/nope"
    )
    assert missing.stdout.splitlines()[-1].endswith("status 404; flag NR")


def test_route_tests_pass_and_fail_with_the_deciding_rule(tmp_path: Path) -> None:
    test = """\
apiVersion: minimesh.dev/v1
kind: RouteTest
metadata: {name: jason-gets-v2}
spec:
  request: {url: "http://reviews:9080/reviews/0", headers: {end-user: jason}}
  expect: {host: reviews, subset: SUBSET, status: 200}
"""
    (tmp_path / "tests.yaml").write_text(test.replace("SUBSET", "v2"))
    passing = minimesh("validate", "-f", str(BOOKINFO), "-f", str(JASON), "-f", str(tmp_path))
    assert passing.returncode == 0, passing.stdout
    (tmp_path / "tests.yaml").write_text(test.replace("SUBSET", "v3"))
    failing = minimesh("validate", "-f", str(BOOKINFO), "-f", str(JASON), "-f", str(tmp_path))
    assert failing.returncode == 1
    assert (
        f"{tmp_path / 'tests.yaml'}:1:1: error: route test failed: subset: expected v3, got v2 "
        "(decided by VirtualService/default/reviews#http[0]) (RouteTest/jason-gets-v2 expect)"
    ) in failing.stdout


def test_version() -> None:
    result = minimesh("version")
    assert result.returncode == 0
    assert result.stdout.startswith("minimesh ")


def test_validate_compose_checks_the_compose_file(tmp_path: Path) -> None:
    ok = minimesh("validate", "-f", str(BOOKINFO), "--compose", str(BOOKINFO / "docker-compose.yml"))
    assert ok.returncode == 0, ok.stdout
    broken = tmp_path / "compose.yml"
    broken.write_text((BOOKINFO / "docker-compose.yml").read_text().replace("aliases: [reviews]", "aliases: [review]"))
    bad = minimesh("validate", "-f", str(BOOKINFO), "--compose", str(broken))
    assert bad.returncode == 1
    assert bad.stdout.count("error: instances of service 'reviews' must answer to it") == 3


def test_explain_on_a_broken_config_says_each_error_once() -> None:
    result = minimesh("explain", "-f", "tests/data/typo.yaml", "GET", "http://reviews:9080/")
    assert result.returncode == 1
    assert result.stderr.count("unknown field 'weigth'") == 1, result.stderr
    assert result.stderr.startswith("minimesh: error: tests/data/typo.yaml:13:7: error: unknown field 'weigth'")


def test_apply_of_a_missing_file_is_invalid_not_a_usage_error() -> None:
    result = minimesh("apply", "--admin", "http://127.0.0.1:9", "-f", "tests/data/no-such.yaml")
    assert result.returncode == 1
    assert "no such file or folder 'tests/data/no-such.yaml'" in result.stderr


TCP_ECHO = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcp-echo}
spec:
  host: tcp-echo
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo}
spec:
  hosts: [tcp-echo]
  tcp:
  - match: [{port: 9000, sourceLabels: {app: sleep}}]
    route:
    - {destination: {host: tcp-echo, subset: v1}, weight: 80}
    - {destination: {host: tcp-echo, subset: v2}, weight: 20}
  - route: [{destination: {host: tcp-echo, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api.example.com]
  tls:
  - match: [{sniHosts: ["*.example.com"]}]
    route: [{destination: {host: api.example.com, port: {number: 443}}}]
"""


def test_explain_tcp_shows_the_rule_the_weighted_draw_and_the_cluster(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(TCP_ECHO)
    picked = set()
    for seed in (0, 19):
        result = minimesh(
            "explain", "-f", str(tmp_path), "--seed", str(seed), "--source-labels", "app=sleep", "tcp://tcp-echo:9000"
        )
        assert result.returncode == 0, result.stderr
        assert "match[0]: port 9000 and sourceLabels app=sleep" in result.stdout
        assert "weights v1=80 v2=20 → drew" in result.stdout
        last = result.stdout.splitlines()[-1]
        assert last.startswith("result: route VirtualService/default/tcp-echo#tcp[0]; cluster outbound|9000|")
        picked.add(last.split("|")[2])
    assert picked == {"v1", "v2"}
    unlabelled = minimesh("explain", "-f", str(tmp_path), "tcp://tcp-echo:9000")
    assert "miss   match[0]: sourceLabels app=sleep — source does not carry them" in unlabelled.stdout
    assert unlabelled.stdout.splitlines()[-1] == (
        "result: route VirtualService/default/tcp-echo#tcp[1]; "
        "cluster outbound|9000|v1|tcp-echo.default.svc.cluster.local; flag -"
    )


def test_explain_tls_matches_sni_and_unknown_destinations_follow_the_outbound_policy(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(TCP_ECHO)
    tls = minimesh("explain", "-f", str(tmp_path), "tls://api.example.com:443")
    assert tls.returncode == 0, tls.stderr
    assert "port 443/TLS is read up to the TLS ClientHello for its SNI" in tls.stdout
    assert "tls[0]                      match  match[0]: sniHosts *.example.com" in tls.stdout
    assert tls.stdout.splitlines()[-1] == (
        "result: route VirtualService/default/api#tls[0]; cluster outbound|443||api.example.com; flag -"
    )
    passed = minimesh("explain", "-f", str(tmp_path), "tcp://203.0.113.9:6379")
    assert passed.stdout.splitlines()[-1] == "result: route -; cluster PassthroughCluster; flag -"
    (tmp_path / "meshconfig.yaml").write_text(
        "apiVersion: minimesh.dev/v1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
        "spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n"
    )
    blocked = minimesh("explain", "-f", str(tmp_path), "tls://unknown.example.net:443")
    assert blocked.returncode == 0, blocked.stderr
    assert "unknown.example.net:443 is no service of the registry" in blocked.stdout
    assert blocked.stdout.splitlines()[-1] == "result: route -; cluster BlackHoleCluster; flag UH"


def test_explain_a_connection_takes_no_method_and_needs_a_port(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(TCP_ECHO)
    for args, error in [
        (("GET", "tcp://tcp-echo:9000"), "a tcp:// connection takes no METHOD"),
        (("tcp://tcp-echo",), "'tcp://tcp-echo' is not tcp://HOST:PORT"),
        (("tls://10.0.0.1:443",), "tls:// takes the SNI name a client offers, not an address"),
        (("tcp://tcp-echo:9000", "-H", "a: b"), "-H and --gateway are for HTTP requests"),
    ]:
        result = minimesh("explain", "-f", str(tmp_path), *args)
        assert result.returncode == 2, (args, result.stdout)
        assert result.stderr.startswith(f"minimesh: usage error: {error}"), result.stderr


def test_apply_refuses_a_file_over_3_mib_before_sending_it(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (3 * 1024 * 1024 + 1))
    result = minimesh("apply", "--admin", "http://127.0.0.1:9", "-f", str(big))
    assert result.returncode == 1
    assert result.stderr == (
        f"minimesh: error: {big}:1:1: error: 3145729 bytes is over the 3 MiB limit of a Kubernetes request; "
        "split the documents across several files\n"
    )


DOTTED = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: prod}
spec:
  host: reviews.prod.svc.cluster.local
  subsets: [{name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: prod}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews.prod, subset: v2}}]
"""


def test_validate_reads_a_dotted_host_as_routing_does(tmp_path: Path) -> None:
    """Istio keeps `reviews.prod` as written (only a name without a dot is expanded), so the
    subset the DestinationRule of `reviews.prod.svc.cluster.local` defines is not v2's: routing
    sends such a request nowhere, and `validate --strict` must fail on it too."""
    (tmp_path / "mesh.yaml").write_text(DOTTED)
    result = minimesh("validate", "--strict", "-f", str(tmp_path / "mesh.yaml"))
    assert result.returncode == 1, result.stdout
    assert "reviews.prod" in result.stdout
    explained = minimesh("explain", "-f", str(tmp_path / "mesh.yaml"), "GET", "http://reviews.prod:9080/")
    assert "no service or ServiceEntry" in explained.stdout or "subset" in explained.stdout, explained.stdout
