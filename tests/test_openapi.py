"""The management API's documentation works offline: `/schema` loads only what
the gateway serves itself, and the document says which key to send."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from gateway.openapi import ASSETS_DIR, SECURITY_SCHEME

PAGES = ["/schema", "/schema/swagger"]


class _Links(HTMLParser):
    """Every URL a page makes the browser load: script src, link href, img src."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.others: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script" and found.get("src"):
            self.scripts.append(found["src"] or "")
        elif tag == "link" and found.get("rel") == "stylesheet":
            self.styles.append(found.get("href") or "")
        elif found.get("href") or found.get("src"):
            self.others.append(found.get("href") or found.get("src") or "")


def links(page: str) -> _Links:
    parser = _Links()
    parser.feed(page)
    return parser


@pytest.mark.parametrize("path", PAGES)
def test_the_docs_page_names_no_external_url(http: httpx.Client, path: str) -> None:
    response = http.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert re.findall(r"https?://", response.text) == []
    found = links(response.text)
    for url in [*found.scripts, *found.styles, *found.others]:
        assert urlsplit(url).scheme in ("", "data"), url


@pytest.mark.parametrize("path", PAGES)
def test_the_docs_pages_script_and_css_are_served_by_the_gateway(
    http: httpx.Client, path: str
) -> None:
    found = links(http.get(path).text)
    assert found.scripts and found.styles
    for url, kind in [
        *((u, "javascript") for u in found.scripts),
        *((u, "css") for u in found.styles),
    ]:
        asset = http.get(urljoin(str(http.base_url) + path, url))
        assert asset.status_code == 200, url
        assert kind in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert len(asset.content) > 10_000, url


def test_the_served_assets_are_the_vendored_files(http: httpx.Client) -> None:
    bundle = (ASSETS_DIR / "swagger-ui-bundle.js").read_bytes()
    assert http.get("/schema/swagger-ui/swagger-ui-bundle.js").content == bundle
    assert http.get("/schema/swagger-ui/no-such-file.js").status_code == 404


@pytest.mark.parametrize("path", ["/schema/redoc", "/schema/rapidoc", "/schema/elements"])
def test_renderers_that_load_from_a_cdn_are_not_offered(http: httpx.Client, path: str) -> None:
    response = http.get(path)
    assert response.status_code == 404
    assert "http" not in response.text


def test_the_document_declares_the_bearer_key_on_the_memory_api(http: httpx.Client) -> None:
    document = http.get("/schema/openapi.json").json()
    scheme = document["components"]["securitySchemes"][SECURITY_SCHEME]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert "the admin key (auth.admin_key) or a per-user gateway key" in (
        scheme["description"].lower()
    )
    memory_operations = [
        operation
        for path, item in document["paths"].items()
        if path.startswith("/v1/memories")
        for operation in item.values()
        if isinstance(operation, dict) and "responses" in operation
    ]
    assert len(memory_operations) >= 10
    for operation in memory_operations:
        required = operation.get("security", document.get("security"))
        assert {SECURITY_SCHEME: []} in required
