"""The `minimesh` command: parses arguments, runs one command, maps outcomes to exit codes.

Each command is a small function from parsed arguments to an exit code; errors a user
can fix become one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from minimesh import HOT_PATH, __version__
from minimesh.admin.client import DEFAULT_ADMIN, NoDaemon, get, get_json, status_lines, wait_ready
from minimesh.background import alive, detach, down
from minimesh.config.compose import check_compose
from minimesh.config.load import load_paths
from minimesh.config.names import MESH, is_ip
from minimesh.config.source import MAX_DOCUMENT_BYTES, expand, too_large
from minimesh.daemon import Options, serve
from minimesh.daemon.pipeline import Ask, Passed, read_files, run_pipeline, url_port
from minimesh.dataplane.capture.manager import scrub_left_rules
from minimesh.dataplane.capture.netns import netns_unavailable
from minimesh.errors import ConfigError, MinimeshError, Problem
from minimesh.registry.model import Workload
from minimesh.registry.static import workloads_of
from minimesh.routing.connection import Handling, Reached, handling_of, plan, service_at, trace_connection
from minimesh.routing.match import trace
from minimesh.routing.request import RequestView
from minimesh.routing.snapshot import (
    BlackHole,
    Connect,
    ConnectionFacts,
    Forward,
    MeshService,
    NoRoute,
    Outcome,
    Snapshot,
    TraceStep,
)
from minimesh.routing.verify import Got, summarize

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(MinimeshError):
    """Arguments that do not make sense; exit code 2."""


def _add_files(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        metavar="PATH",
        help="config file or folder (its *.yaml/*.yml); repeatable; later ones replace same-named documents",
    )


def _files(args: argparse.Namespace) -> list[str]:
    return list(args.files or ["mesh.yaml"])


def _problems(passed: Passed, *, strict: bool) -> list[Problem]:
    problems = list(passed.problems)
    if strict:
        problems = [replace(p, severity="error") if p.severity == "warning" else p for p in problems]
    return sorted(problems, key=lambda p: (p.location.file, p.location.line, p.location.col))


def cmd_validate(args: argparse.Namespace) -> int:
    passed = run_pipeline(read_files(_files(args)), Ask(route_tests=True))
    loaded = passed.loaded
    problems = _problems(passed, strict=args.strict)
    if args.compose:
        try:
            text = Path(args.compose).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read --compose {args.compose}: {exc.strerror}") from exc
        problems += check_compose(args.compose, text, loaded.mesh)
    errors = sum(p.severity == "error" for p in problems)
    warnings = sum(p.severity == "warning" for p in problems)
    if args.format == "json":
        report = {
            "valid": errors == 0,
            "documents": len(loaded.documents),
            "errors": errors,
            "warnings": warnings,
            "problems": [p.as_json() for p in problems],
        }
        print(json.dumps(report, indent=2))
    else:
        for problem in problems:
            print(problem)
        verdict = "invalid" if errors else "valid"
        print(f"{verdict}: {len(loaded.documents)} documents, {errors} errors, {warnings} warnings")
    return EXIT_FAIL if errors else EXIT_OK


def _request_port(url: str) -> int:
    try:
        return url_port(url)
    except ValueError as exc:
        raise UsageError(f"cannot read URL '{url}': {exc}") from exc


def _source(labels: str | None) -> Workload | None:
    if not labels:
        return None
    pairs = [item.partition("=") for item in labels.split(",") if item]
    bad = [key for key, sep, _ in pairs if not sep or not key]
    if bad:
        raise UsageError(f"--source-labels takes k=v,k2=v2; cannot read '{labels}'")
    return Workload(name="explain-source", address="127.0.0.1", labels=tuple(sorted((k, v) for k, _, v in pairs)))


def _headers(values: list[str] | None) -> list[tuple[str, str]]:
    headers = []
    for raw in values or []:
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"-H takes 'Name: value'; cannot read '{raw}'")
        headers.append((name.strip(), value.strip()))
    return headers


CONNECTION_SCHEMES = ("tcp", "tls")
NO_ENDPOINTS = "UH (no endpoints known offline)"
HANDLING: dict[Handling, str] = {
    "http": "is served as HTTP: each request goes by http[] rules, never tcp[] or tls[] "
    "(explain METHOD http://HOST:PORT/PATH)",
    "tcp": "is proxied as bytes from the start (a server-first protocol works)",
    "tls": "is read up to the TLS ClientHello for its SNI, then passed through unterminated",
    "detect": "declares no protocol: the client's first bytes decide (HTTP goes by http[] rules, "
    "TLS by tls[], anything else by tcp[])",
    "passthrough": "is no service's port: the connection goes out as addressed, unread",
}
"""What a sidecar does with a connection by the handling of its destination port."""


def _explain_snapshot(args: argparse.Namespace, ports: Iterable[int]) -> Snapshot:
    """The snapshot `explain` decides by: the config, `--workloads`, and placeholders that
    stand for the services no workload backs, exposing `ports`."""
    files = read_files(_files(args))
    workloads = workloads_of(load_paths([args.workloads]).raise_errors()) if args.workloads else ()
    passed = run_pipeline(files, Ask(workloads=workloads, offline_ports=tuple(ports)))
    if passed.snapshot is None:
        raise ConfigError(list(passed.loaded.errors))
    return passed.snapshot


def cmd_explain(args: argparse.Namespace) -> int:
    scheme = args.url.partition("://")[0].lower() if "://" in args.url else ""
    if scheme in CONNECTION_SCHEMES:
        return _explain_connection(args, scheme)
    if args.method is None:
        raise UsageError(f"explain takes METHOD URL, or tcp://HOST:PORT or tls://SNI:PORT; got only '{args.url}'")
    snapshot = _explain_snapshot(args, [_request_port(args.url)])
    gateway = args.gateway or "mesh"
    if gateway != "mesh" and "/" not in gateway:
        gateway = f"default/{gateway}"
    view = RequestView.from_url(args.method, args.url, _headers(args.header), source=_source(args.source_labels),
                                gateway=gateway)  # fmt: skip
    outcome, steps = trace(snapshot, view, random.Random(args.seed))
    print(f"request: {view.method} {view.scheme}://{view.authority}{view.path} at {gateway}")
    _print_steps(steps)
    got = summarize(outcome)
    flag = _flag(outcome, got)
    destination = f"{got.host} subset {got.subset or '-'} port {got.port}" if got.host else "none"
    print(f"result: route {got.route or '-'}; destination {destination}; status {got.status}; flag {flag}")
    return EXIT_OK


def _flag(outcome: Outcome, got: Got) -> str:
    """The access-log flag Envoy would write, from the decision and its summary."""
    if isinstance(outcome, NoRoute):
        return outcome.flag
    if isinstance(outcome, Forward):
        if got.fault == "abort":
            return "FI"
        if not outcome.cluster.endpoints:
            return NO_ENDPOINTS
        if got.fault == "delay":
            return "DI"
    return "-"


def _connection_url(url: str) -> tuple[str, int]:
    """HOST and PORT of `tcp://HOST:PORT` or `tls://SNI:PORT`."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"cannot read URL '{url}': {exc}") from exc
    if not parts.hostname or port is None or parts.path not in ("", "/") or parts.query:
        raise UsageError(f"'{url}' is not {parts.scheme}://HOST:PORT, e.g. {parts.scheme}://mysqldb:3306")
    return parts.hostname, port


def _connection_service(snapshot: Snapshot, host: str, port: int, sni: str | None, namespace: str) -> Reached | None:
    """The service (and service port) a connection reaches, as its sidecar finds it: by
    address (an IP), by the SNI it offers, else by the service name the client resolved."""
    if sni is None and is_ip(host):
        return service_at(snapshot, host, port, None)
    reached = service_at(snapshot, host, port, sni) if sni is not None else None
    named = snapshot.service_for(host, namespace)
    return reached or ((named, port) if named is not None else None)


def _served(snapshot: Snapshot, host: str, port: int, service: MeshService | None) -> tuple[Handling, str] | None:
    """How the sidecar serves the destination port before any rule, and the port's protocol;
    None for a name that is no service port (the decision says what happens)."""
    if is_ip(host):
        served = plan(snapshot, host, port)
        return served.handling, served.protocol
    found = service.port(port) if service is not None else None
    return (handling_of(found.protocol), found.protocol) if found is not None else None


def _explain_connection(args: argparse.Namespace, scheme: str) -> int:
    """`explain tcp://HOST:PORT` / `tls://SNI:PORT`: where a sidecar sends one connection.
    HOST is a service name or an address; for tls:// it is the SNI the client offers."""
    if args.method is not None:
        raise UsageError(f"a {scheme}:// connection takes no METHOD: minimesh explain {args.url}")
    if args.header or args.gateway:
        raise UsageError(f"-H and --gateway are for HTTP requests; a {scheme}:// connection is decided at its sidecar")
    host, port = _connection_url(args.url)
    sni = host if scheme == "tls" else None
    if sni is not None and is_ip(sni):
        raise UsageError(f"tls:// takes the SNI name a client offers, not an address: tls://NAME:{port}")
    snapshot = _explain_snapshot(args, [] if is_ip(host) else [port])
    source = _source(args.source_labels)
    namespace = source.namespace if source is not None else "default"
    reached = _connection_service(snapshot, host, port, sni, namespace)
    service, service_port = reached if reached is not None else (None, port)
    print(f"connection: {scheme}://{host}:{port} at {MESH}")
    served = _served(snapshot, host, port, service)
    listener = []
    if served is not None:
        handling, protocol = served
        text = HANDLING[handling].replace("HOST:PORT", f"{host}:{port}")
        listener.append(
            TraceStep("listener", "miss" if handling == "http" else "info", f"port {port}/{protocol} {text}")
        )
        if handling == "http":
            _print_steps(listener)
            print(f"result: HTTP, routed per request; explain METHOD http://{host}:{port}/PATH")
            return EXIT_OK
    labels, source_namespace = (source.label_map, source.namespace) if source is not None else (None, None)
    facts = ConnectionFacts(host, service_port, sni, MESH, labels, source_namespace)
    outcome, steps = trace_connection(snapshot, service, facts, random.Random(args.seed))
    _print_steps([*listener, *steps])
    if isinstance(outcome, Connect):
        cluster = outcome.cluster
        flag = "-" if cluster.endpoints or cluster.original_destination else NO_ENDPOINTS
        print(f"result: route {outcome.route_ref}; cluster {cluster.name}; flag {flag}")
    else:
        flag = "UH" if isinstance(outcome, BlackHole) else "-"
        print(f"result: route -; cluster {outcome.cluster}; flag {flag}")
    return EXIT_OK


def _print_steps(steps: Sequence[TraceStep]) -> None:
    width = max((len(step.what) for step in steps), default=0)
    for step in steps:
        print(f"  {step.what:<{width}}  {step.verdict:<5}  {step.detail}")


def _log_to_stderr() -> logging.Logger:
    """The daemon's log: one plain line per event on stderr (the access log has stdout)."""
    log = logging.getLogger("minimesh")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def _url_of(args: argparse.Namespace, port: int) -> str:
    """Where a client on this machine reaches the daemon's `port`."""
    host = "127.0.0.1" if args.bind in ("0.0.0.0", "::", "") else args.bind
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _up_settings(args: argparse.Namespace) -> dict[str, str]:
    """`up`'s settings as a detached daemon records them, defaults included and paths absolute,
    so that the same daemon asked for twice is recognised however it was spelled."""

    def flag(on: bool) -> str:
        return "on" if on else "off"

    return {
        "-f": " ".join(str(Path(path).resolve()) for path in _files(args)),
        "--gateway-port": str(args.gateway_port),
        "--gateway-tls-port": str(args.gateway_tls_port),
        "--admin-port": str(args.admin_port),
        "--bind": args.bind,
        "--capture": args.capture,
        "--no-docker": flag(args.no_docker),
        "--docker-label": " ".join(sorted(args.docker_label or ())),
        "--debug-headers": flag(args.debug_headers),
        "--seed": "" if args.seed is None else str(args.seed),
    }


def cmd_up(args: argparse.Namespace) -> int:
    if args.capture == "netns" and args.no_docker:
        raise UsageError("--capture netns captures Docker containers; it cannot go with --no-docker")
    if args.detach:
        up_args = [arg for arg in args.argv if arg != "--detach"]
        up_args.remove("up")
        return detach(up_args, _up_settings(args), _url_of(args, args.admin_port), _url_of(args, args.gateway_port))
    log = _log_to_stderr()
    capture = args.capture
    if capture == "auto":
        missing = "" if args.no_docker else netns_unavailable()
        capture = "explicit" if args.no_docker or missing else "netns"
        why = "--no-docker" if args.no_docker else missing or "root, Docker, iptables and nsenter are all here"
        log.info("minimesh: capture auto: chose %s (%s)", capture, why)
    options = Options(
        paths=tuple(_files(args)),
        bind=args.bind,
        gateway_port=args.gateway_port,
        admin_port=args.admin_port,
        debug_headers=args.debug_headers,
        seed=args.seed,
        docker=not args.no_docker,
        docker_labels=tuple(args.docker_label or ()),
        capture=capture,
    )
    _run(serve(options))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    try:
        dump = get_json(args.admin, "/config_dump")
        clusters = get_json(args.admin, "/clusters")["clusters"]
    except NoDaemon as exc:
        print(
            f"minimesh: error: no daemon answers at {args.admin} ({exc}); start one with minimesh up", file=sys.stderr
        )
        return EXIT_FAIL
    print("\n".join(status_lines(args.admin, dump, clusters)))
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    if wait_ready(args.admin, args.timeout):
        print(f"minimesh: ready at {args.admin}")
        return EXIT_OK
    print(f"minimesh: error: no daemon was ready at {args.admin} within {args.timeout:g} s", file=sys.stderr)
    return EXIT_FAIL


def cmd_apply(args: argparse.Namespace) -> int:
    """Send files to a running daemon's applied layer (or drop it with --reset)."""
    admin = args.admin.rstrip("/")
    requests: list[tuple[str, str, bytes | None, str]]
    if args.reset:
        if args.files:
            raise UsageError("apply takes -f FILE or --reset, not both")
        requests = [("DELETE", "/apply", None, "")]
    else:
        if not args.files:
            raise UsageError("apply needs -f FILE (or --reset)")
        files, problems = expand(args.files)
        problems += [too_large(f.stat().st_size, str(f)) for f in files if f.stat().st_size > MAX_DOCUMENT_BYTES]
        if problems:
            raise ConfigError(problems)
        requests = [("POST", f"/apply?source={quote(str(f))}", f.read_bytes(), str(f)) for f in files]
    for method, path, body, name in requests:
        try:
            status, answer = get(admin + path, timeout=30, method=method, body=body)
        except NoDaemon as exc:
            print(f"minimesh: error: no daemon answers at {args.admin} ({exc}); start one with minimesh up",
                  file=sys.stderr)  # fmt: skip
            return EXIT_FAIL
        if status != 200:
            sys.stdout.write(answer.decode())
            print(f"minimesh: {name or 'apply'} was not applied; the daemon keeps its config", file=sys.stderr)
            return EXIT_FAIL
        result = json.loads(answer)
        what = f"applied {name}" if name else "dropped the applied documents"
        print(f"minimesh: {what}: generation {result['generation']} is live")
    return EXIT_OK


def cmd_down(_: argparse.Namespace) -> int:
    """Stop the detached daemon, then remove any capture rules a killed one left behind."""
    code = down()
    cleaned = scrub_left_rules(alive)
    if cleaned:
        print(f"minimesh: removed capture rules left in {len(cleaned)} containers: {', '.join(sorted(cleaned))}")
    return code


def cmd_version(_: argparse.Namespace) -> int:
    print(f"minimesh {__version__}, hot path: {HOT_PATH}")
    return EXIT_OK


Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minimesh", description="A service mesh for local development: your Istio YAML, no cluster."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for add in (_add_validate, _add_explain, _add_up, _add_apply):
        add(commands)

    status = commands.add_parser("status", help="what a running daemon serves; exit 1 if none answers")
    status.add_argument("--admin", default=DEFAULT_ADMIN, metavar="URL", help="the daemon's admin API")
    status.set_defaults(run=cmd_status)

    wait = commands.add_parser("wait", help="wait until a daemon is ready; exit 1 on timeout")
    wait.add_argument("--admin", default=DEFAULT_ADMIN, metavar="URL", help="the daemon's admin API")
    wait.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds to wait")
    wait.set_defaults(run=cmd_wait)

    down_ = commands.add_parser("down", help="stop the daemon `up --detach` started")
    down_.set_defaults(run=cmd_down)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(run=cmd_version)
    return parser


def _add_validate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    validate = commands.add_parser("validate", help="check config offline; exit 0 valid, 1 invalid")
    _add_files(validate)
    validate.add_argument("--format", choices=("text", "json"), default="text")
    validate.add_argument("--strict", action="store_true", help="treat every warning as an error")
    validate.add_argument("--compose", metavar="FILE", help="also check a compose file's labels, ports and aliases")
    validate.set_defaults(run=cmd_validate)


def _add_explain(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    explain = commands.add_parser(
        "explain", help="trace one request, or a tcp:// or tls:// connection, through the routing rules, offline"
    )
    _add_files(explain)
    explain.add_argument("method", metavar="METHOD", nargs="?", help="the request's method; none for tcp:// and tls://")
    explain.add_argument("url", metavar="URL", help="http://HOST[:PORT]/PATH, tcp://HOST:PORT or tls://SNI:PORT")
    explain.add_argument("-H", "--header", action="append", metavar="'Name: value'")
    explain.add_argument("--source-labels", metavar="k=v,...", help="labels of the calling workload")
    explain.add_argument("--gateway", metavar="NAME", help="decide as the ingress gateway bound by this Gateway")
    explain.add_argument("--workloads", metavar="FILE", help="WorkloadEntry documents to resolve endpoints")
    explain.add_argument("--seed", type=int, default=0, help="seed for the weighted split draw")
    explain.set_defaults(run=cmd_explain)


def _add_up(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = commands.add_parser("up", help="run the daemon: gateway, sidecars, admin API, hot reload")
    _add_files(up)
    up.add_argument("--gateway-port", type=int, default=8080, metavar="PORT", help="ingress gateway HTTP port")
    up.add_argument(
        "--gateway-tls-port",
        type=int,
        default=8443,
        metavar="PORT",
        help="ingress gateway HTTPS port (HTTPS serving is not built yet)",
    )
    up.add_argument("--admin-port", type=int, default=15000, metavar="PORT", help="admin API port")
    up.add_argument("--bind", default="127.0.0.1", metavar="ADDRESS", help="address of the gateway and admin API")
    up.add_argument("--capture", choices=("auto", "netns", "explicit"), default="auto",
                    help="how workloads' traffic reaches their sidecars")  # fmt: skip
    up.add_argument("--no-docker", action="store_true", help="no Docker discovery: WorkloadEntry workloads only")
    up.add_argument(
        "--docker-label",
        action="append",
        metavar="KEY=VALUE",
        help="only containers that also carry this label (e.g. com.docker.compose.project=shop)",
    )
    up.add_argument("--debug-headers", action="store_true", help="add x-minimesh-route to responses")
    up.add_argument("--seed", type=int, metavar="N", help="seed splits and faults (deterministic tests)")
    up.add_argument("--detach", action="store_true", help="run in the background; stop it with minimesh down")
    up.set_defaults(run=cmd_up)


def _add_apply(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    apply = commands.add_parser("apply", help="add or replace documents in a running daemon, like kubectl apply")
    _add_files(apply)
    apply.add_argument("--reset", action="store_true", help="drop every document applied so far")
    apply.add_argument("--admin", default=DEFAULT_ADMIN, metavar="URL")
    apply.set_defaults(run=cmd_apply)


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)
    args.argv = raw
    run: Command = args.run
    try:
        return run(args)
    except UsageError as exc:
        print(f"minimesh: usage error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MinimeshError as exc:
        print(f"minimesh: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL
    except Exception as exc:
        if os.environ.get("MINIMESH_DEBUG"):
            raise
        print(
            f"minimesh: internal error: {exc!r}; rerun with MINIMESH_DEBUG=1 for the traceback",
            file=sys.stderr,
        )
        return EXIT_FAIL
