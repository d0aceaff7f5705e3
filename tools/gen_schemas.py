"""Regenerates `minimesh/config/schemas/istio.json` from Istio's CustomResourceDefinition file.

Keeps, for every CRD kind and served version, the OpenAPI v3 schema without its descriptions;
versions whose schemas are identical share one entry. Usage: `python tools/gen_schemas.py [CRD_FILE]`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "istio" / "customresourcedefinitions.gen.yaml"
TARGET = REPO / "minimesh" / "config" / "schemas" / "istio.json"

_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")


def strip_descriptions(schema: Mapping[str, Any]) -> dict[str, Any]:
    """`schema` without `description` keywords; a property that happens to be named so is kept."""
    result: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "description":
            continue
        if key == "properties":
            result[key] = {name: strip_descriptions(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, Mapping)):
            result[key] = strip_descriptions(value)
        elif key in _SCHEMA_LISTS:
            result[key] = [strip_descriptions(sub) for sub in value]
        else:
            result[key] = value
    return result


def build(crd_text: str) -> dict[str, Any]:
    """The schema catalog: `kinds` (group and version → schema key) and the `schemas` they name."""
    kinds: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for crd in yaml.load_all(crd_text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        kind = spec["names"]["kind"]
        versions: dict[str, str] = {}
        keys_by_schema: dict[str, str] = {}
        for version in spec["versions"]:
            if not version.get("served", False):
                continue
            schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
            canonical = json.dumps(schema, sort_keys=True)
            key = keys_by_schema.setdefault(canonical, f"{kind}.{version['name']}")
            schemas[key] = schema
            versions[version["name"]] = key
        kinds[kind] = {"group": spec["group"], "versions": versions}
    return {"kinds": kinds, "schemas": schemas}


def render(catalog: Mapping[str, Any]) -> str:
    """Deterministic, compact JSON text of `catalog`."""
    return json.dumps(catalog, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    source = Path(argv[1]) if len(argv) > 1 else DEFAULT_SOURCE
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"cannot read the CRD file: {exc}; pass its path as the first argument", file=sys.stderr)
        return 1
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(render(build(text)), encoding="utf-8")
    print(f"wrote {TARGET.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
