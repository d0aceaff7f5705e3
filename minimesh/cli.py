"""The `minimesh` command: parses arguments, runs one command, maps outcomes to exit codes.

Each command is a small function from parsed arguments to an exit code; errors a user
can fix become one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace

from minimesh import __version__
from minimesh.config.check import check_mesh
from minimesh.config.load import Loaded, load_paths
from minimesh.errors import MinimeshError, Problem

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


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


def _problems(loaded: Loaded, *, strict: bool) -> list[Problem]:
    problems = list(loaded.problems)
    if not loaded.errors:
        problems.extend(check_mesh(loaded.mesh, loaded.documents))
    if strict:
        problems = [replace(p, severity="error") if p.severity == "warning" else p for p in problems]
    return sorted(problems, key=lambda p: (p.location.file, p.location.line, p.location.col))


def cmd_validate(args: argparse.Namespace) -> int:
    loaded = load_paths(_files(args))
    problems = _problems(loaded, strict=args.strict)
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


def cmd_version(_: argparse.Namespace) -> int:
    print(f"minimesh {__version__}")
    return EXIT_OK


Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minimesh", description="A service mesh for local development: your Istio YAML, no cluster."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    validate = commands.add_parser("validate", help="check config offline; exit 0 valid, 1 invalid")
    _add_files(validate)
    validate.add_argument("--format", choices=("text", "json"), default="text")
    validate.add_argument("--strict", action="store_true", help="treat every warning as an error")
    validate.set_defaults(run=cmd_validate)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(run=cmd_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Command = args.run
    try:
        return run(args)
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
