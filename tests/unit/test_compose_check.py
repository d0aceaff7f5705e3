"""`validate --compose`: labels, ports and aliases of a compose file against the mesh config."""

from __future__ import annotations

from minimesh.config.compose import check_compose
from minimesh.config.load import load_paths
from tests.conftest import BOOKINFO

MESH = load_paths([str(BOOKINFO)]).raise_errors()


def test_the_bookinfo_compose_file_fits_its_mesh() -> None:
    path = BOOKINFO / "docker-compose.yml"
    assert check_compose(str(path), path.read_text(), MESH) == []


def test_a_version_without_the_shared_alias_is_an_error() -> None:
    text = (BOOKINFO / "docker-compose.yml").read_text()
    broken = text.replace(
        "      version: v3\n    networks:\n      bookinfo:\n        aliases: [reviews]",
        "      version: v3\n    networks:\n      bookinfo: {}",
    )
    assert broken != text
    problems = [str(p) for p in check_compose("compose.yml", broken, MESH)]
    assert len(problems) == 1
    assert problems[0].startswith("compose.yml:")
    assert "error: instances of service 'reviews' must answer to it: add `aliases: [reviews]`" in problems[0]
    assert problems[0].endswith("(compose service reviews-v3)")


def test_a_subset_no_container_carries_and_an_undeclared_port() -> None:
    text = """\
services:
  reviews-v1:
    image: x
    labels: {minimesh.service: reviews, minimesh.port: "http:9080", version: v1}
    networks: {default: {aliases: [reviews]}}
"""
    mesh = load_paths([str(BOOKINFO), str(BOOKINFO / "variants" / "virtual-service-reviews-jason-v2.yaml")])
    problems = [str(p) for p in check_compose("c.yml", text, mesh.raise_errors())]
    assert any(
        "subset 'v2' of DestinationRule/reviews selects version=v2, which no compose service" in p for p in problems
    )
    assert any("subset 'v3'" in p for p in problems)
    productpage = """\
services:
  productpage:
    image: x
    labels: {minimesh.service: productpage, minimesh.port: "http:9081", version: v1}
"""
    assert [str(p) for p in check_compose("c.yml", productpage, MESH)] == [
        "c.yml:4:13: error: the mesh routes to productpage:9080 but this service declares 9081; add 9080 to label "
        "minimesh.port (compose service productpage)"
    ]
