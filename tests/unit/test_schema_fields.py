"""Every field minimesh reads exists in Istio's schema, and every example validates against it.

The builders ask for fields by name; a misspelt name there would silently never be read.
This walks what the builders ask for over a corpus that uses every field, and looks each
one up in the schema the CRDs publish.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from minimesh.config.load import fields_read
from minimesh.config.schema import check_document, field_schema
from minimesh.config.source import read_paths
from tests.conftest import EXAMPLES, ROOT

CORPUS = ROOT / "tests" / "data" / "corpus"
EXAMPLE_FILES = sorted(p for p in EXAMPLES.rglob("*.y*ml") if "compose" not in p.name)


@pytest.mark.parametrize("path", [*EXAMPLE_FILES, *sorted(CORPUS.glob("*.yaml"))], ids=lambda p: p.name)
def test_every_example_and_corpus_document_validates_against_the_schema(path: Path) -> None:
    documents, problems = read_paths([str(path)])
    assert problems == []
    assert documents
    for document in documents:
        assert check_document(document.body) == [], f"{path}: {document.ref}"


def test_every_field_the_builders_read_is_in_istios_schema() -> None:
    documents, _ = read_paths([str(CORPUS)])
    kinds_seen: set[str] = set()
    missing: list[str] = []
    for document in documents:
        kinds_seen.add(document.kind)
        for path in fields_read(document):
            names = tuple(part for part in path if isinstance(part, str))
            if names and names[0] in {"apiVersion", "kind", "metadata"}:
                continue
            if field_schema(document.api_version, document.kind, names) is None:
                missing.append(f"{document.kind} {'.'.join(names)}")
    assert missing == []
    assert kinds_seen >= {
        "VirtualService",
        "DestinationRule",
        "Gateway",
        "ServiceEntry",
        "WorkloadEntry",
        "Service",
        "Sidecar",
        "PeerAuthentication",
        "AuthorizationPolicy",
        "MeshConfig",
        "RouteTest",
    }
