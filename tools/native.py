"""Compile the request hot path (HOT_PATH: plain, strictly typed modules) with mypyc into C
extensions next to their sources, which Python imports instead (about 1.5x the gateway's
throughput). Without a C compiler the same modules run as Python; `minimesh version` says which."""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "native"
GROUP = "minimesh.native"

HOT_PATH = (
    "minimesh/admin/metrics.py",
    "minimesh/config/model.py",
    "minimesh/config/names.py",
    "minimesh/dataplane/accesslog.py",
    "minimesh/dataplane/attempts.py",
    "minimesh/dataplane/call.py",
    "minimesh/dataplane/cors.py",
    "minimesh/dataplane/current.py",
    "minimesh/dataplane/deadline.py",
    "minimesh/dataplane/exchange.py",
    "minimesh/dataplane/fault.py",
    "minimesh/dataplane/grpc.py",
    "minimesh/dataplane/grpc_web.py",
    "minimesh/dataplane/http1.py",
    "minimesh/dataplane/http2.py",
    "minimesh/dataplane/http2_upstream.py",
    "minimesh/dataplane/mirror.py",
    "minimesh/dataplane/proxy.py",
    "minimesh/dataplane/respond.py",
    "minimesh/dataplane/sniff.py",
    "minimesh/dataplane/replay.py",
    "minimesh/dataplane/tcp.py",
    "minimesh/dataplane/upstream.py",
    "minimesh/registry/model.py",
    "minimesh/routing/headers.py",
    "minimesh/routing/match.py",
    "minimesh/routing/pick.py",
    "minimesh/routing/request.py",
    "minimesh/routing/retry.py",
    "minimesh/routing/snapshot.py",
)


def build() -> int:
    """Compile HOT_PATH into extension modules beside the sources; 1 when that cannot be done."""
    try:
        from mypyc.build import mypycify
        from setuptools import setup
    except ImportError as exc:
        print(f"==> hot path not compiled: {exc.name} is missing; running it as Python", file=sys.stderr)
        return 1
    remove()
    started = time.monotonic()
    os.chdir(ROOT)
    try:
        setup(
            name="minimesh-native",
            ext_modules=mypycify(list(HOT_PATH), group_name=GROUP, target_dir=str(BUILD / "c")),
            script_args=["--quiet", "build_ext", "--inplace", "--build-temp", str(BUILD / "temp")],
        )
    except (SystemExit, Exception) as exc:  # setuptools reports a failed compiler as SystemExit
        remove()
        print(f"==> hot path not compiled ({exc}); running it as Python", file=sys.stderr)
        return 1
    print(f"==> compiled {len(HOT_PATH)} hot-path modules with mypyc in {time.monotonic() - started:.0f} s")
    return 0


def remove() -> None:
    """Delete every compiled module, so the package runs as plain Python again."""
    for compiled in (ROOT / "minimesh").rglob("*.so"):
        compiled.unlink()
    shutil.rmtree(BUILD, ignore_errors=True)


def hidden_imports() -> list[str]:
    """Third-party modules the compiled modules import: PyInstaller cannot see into a `.so`."""
    names: set[str] = set()
    for path in HOT_PATH:
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    outside = {name for name in names if name.split(".")[0] not in {*sys.stdlib_module_names, "minimesh"}}
    return sorted(outside | {GROUP + "__mypyc"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--remove", action="store_true", help="delete the compiled modules")
    action.add_argument("--hidden-imports", action="store_true", help="print PyInstaller --hidden-import flags")
    args = parser.parse_args()
    if args.remove:
        remove()
        return 0
    if args.hidden_imports:
        print(" ".join(f"--hidden-import {name}" for name in hidden_imports()))
        return 0
    return build()


if __name__ == "__main__":
    sys.exit(main())
