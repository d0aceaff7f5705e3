"""The compiled hot path: `make test` runs the suite against it, and a stale build never runs."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import minimesh
from tools.native import HOT_PATH

PACKAGE = Path(minimesh.__file__).parent
BUILT = sorted(PACKAGE.rglob("*.so"))
PROBE = (
    "import minimesh, minimesh.dataplane.proxy as proxy, minimesh.dataplane.http1 as http1;"
    "print(minimesh.HOT_PATH); print(proxy.__file__); print(http1.__file__)"
)

needs_build = pytest.mark.skipif(
    not BUILT and not os.environ.get("CI"), reason="no compiled modules in this tree (`make native` builds them)"
)


def probe(root: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    return result.stdout.splitlines()


@needs_build
def test_every_hot_path_module_runs_compiled() -> None:
    how = minimesh.HOT_PATH
    assert how == f"compiled with mypyc ({len(HOT_PATH)} modules)"
    for path in HOT_PATH:
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert str(module.__file__).endswith(".so"), module.__file__


@needs_build
def test_a_source_changed_after_the_build_runs_every_module_as_python(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "minimesh", ignore=shutil.ignore_patterns("__pycache__"))
    how, proxy, http1 = probe(tmp_path)
    assert how.startswith("compiled with mypyc")
    assert proxy.endswith(".so") and http1.endswith(".so")

    (tmp_path / "minimesh/dataplane/proxy.py").touch()
    how, proxy, http1 = probe(tmp_path)
    assert how == "Python: minimesh/dataplane/proxy.py changed after it was compiled (`make native` compiles it again)"
    assert proxy == str(tmp_path / "minimesh/dataplane/proxy.py")
    assert http1 == str(tmp_path / "minimesh/dataplane/http1.py")


def test_without_a_build_the_hot_path_is_python(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "minimesh", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    how, proxy, _ = probe(tmp_path)
    assert how == "Python (`make native` compiles it with mypyc)"
    assert proxy == str(tmp_path / "minimesh/dataplane/proxy.py")
