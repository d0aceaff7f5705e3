"""Shared fixtures: where the repository, its examples and Istio's reference data live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BOOKINFO = EXAMPLES / "bookinfo"
SHARED = ROOT.parent / "shared"


def shared_or_skip() -> Path:
    """`../shared`, Istio's reference data; required under CI, skipped with a reason elsewhere."""
    if SHARED.is_dir():
        return SHARED
    if os.environ.get("CI"):
        pytest.fail(f"{SHARED} is missing: CI runs beside shared/, so its absence is a broken checkout")
    pytest.skip(f"{SHARED} is not beside this checkout")
