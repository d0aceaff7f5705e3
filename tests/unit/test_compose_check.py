"""`validate --compose`: labels, ports and aliases of a compose file against the mesh config."""

from __future__ import annotations

from minimesh.config import model as m
from minimesh.config.compose import check_compose
from minimesh.config.load import load_layers, load_paths
from minimesh.config.source import parse_text
from tests.conftest import BOOKINFO

MESH = load_paths([str(BOOKINFO)]).raise_errors()


def load_layers_text(text: str) -> m.Mesh:
    documents, problems = parse_text(text, "mesh.yaml")
    return load_layers([documents], problems).raise_errors()


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


def test_a_server_first_port_without_a_declared_protocol_is_warned_about_with_the_label_to_add() -> None:
    text = """\
services:
  mysqldb:
    image: mariadb
    labels: {minimesh.service: mysqldb, version: v1}
    expose: ["3306"]
  mail:
    image: mail
    labels: {minimesh.service: mail, minimesh.port: "http:8080,587"}
  ftp:
    image: ftp
    labels: {minimesh.service: ftp}
    ports: ["2121:21", "127.0.0.1:8080:80/tcp", {target: 143, published: 1143}, "25:25/udp"]
  postgres:
    image: postgres
    labels: {minimesh.service: postgres}
    expose: [5432, 27017]
  declared:
    image: mariadb
    labels: {minimesh.service: declared, minimesh.port: "mysql:3306,tcp:25"}
  outside:
    image: mariadb
    expose: ["3306"]
"""
    trap = "whose server speaks first, and declares no protocol: each connection waits for client bytes that never come"
    assert [str(p).replace(trap, "...") for p in check_compose("c.yml", text, MESH)] == [
        "c.yml:4:13: warning: port 3306 looks like MySQL/MariaDB, ... before it is proxied; declare it with label "
        'minimesh.port: "mysql:3306" (compose service mysqldb)',
        "c.yml:8:53: warning: port 587 looks like SMTP, ... before it is proxied; declare it with label "
        'minimesh.port: "http:8080,tcp:587" (compose service mail)',
        "c.yml:11:13: warning: port 21 looks like FTP, ... before it is proxied; declare it with label "
        'minimesh.port: "tcp:21,80,tcp:143" (compose service ftp)',
        "c.yml:11:13: warning: port 143 looks like IMAP, ... before it is proxied; declare it with label "
        'minimesh.port: "tcp:21,80,tcp:143" (compose service ftp)',
    ]


def test_a_service_document_decides_the_protocol_so_its_labels_are_not_warned_about() -> None:
    mesh = load_layers_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: mysqldb}\n"
        "spec: {selector: {app: mysqldb}, ports: [{name: tcp-db, port: 3306}]}\n"
    )
    text = "services:\n  mysqldb:\n    image: mariadb\n    labels: {minimesh.service: mysqldb}\n    expose: [3306]\n"
    assert check_compose("c.yml", text, mesh) == []
