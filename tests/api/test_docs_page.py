"""The API page, /docs: public, Swagger UI's files served by the server itself from the installed package
(no CDN, so it works offline), every route rendered in a real headless Chromium that requests nothing off
loopback, and "Try it out" sending the key given to Authorize as a Bearer header."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from chromium import Chromium, Page, chromium
from conftest import API_KEY
from embedserve.api.docs import ASSETS
from support import LiveServer

ASSET_FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}


def test_docs_page_is_public_and_names_no_other_host(server: LiveServer) -> None:
    response = httpx.get(f"{server.base_url}/docs")  # no key, on a server that requires one
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html), "a URL off this server"
    loaded = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sorted(loaded) == sorted(f"/docs/assets/{name}" for name in ASSET_FILES)
    assert "url: '/openapi.json'" in html
    assert httpx.get(f"{server.base_url}/openapi.json").status_code == 200  # public too


@pytest.mark.parametrize(("name", "media_type"), sorted(ASSET_FILES.items()))
def test_docs_assets_are_the_installed_packages_files(server: LiveServer, name: str, media_type: str) -> None:
    response = httpx.get(f"{server.base_url}/docs/assets/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == media_type
    assert response.content == (ASSETS / name).read_bytes()


@pytest.mark.parametrize("name", ["redoc.standalone.js", "..%2F__init__.py", "nope.js", "%2E%2E"])
def test_only_the_pages_own_assets_are_served(server: LiveServer, name: str) -> None:
    response = httpx.get(f"{server.base_url}/docs/assets/{name}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_the_bundled_swagger_ui_reads_openapi_3_1(server: LiveServer) -> None:
    """FastAPI writes OpenAPI 3.1, which Swagger UI renders from version 5 on (4 refuses the document)."""
    assert httpx.get(f"{server.base_url}/openapi.json").json()["openapi"].startswith("3.1")
    bundle = (ASSETS / "swagger-ui-bundle.js").read_text(encoding="utf-8")
    versions = re.findall(r'PACKAGE_VERSION:"(\d+)\.\d+\.\d+"', bundle)
    assert versions and int(versions[0]) >= 5, versions


# ---- in a real browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    with chromium() as running:
        yield running


def rendered_operations(page: Page) -> list[list[str]]:
    ops: list[list[str]] = page.evaluate(
        "[...document.querySelectorAll('.opblock')].map(block => ["
        "block.querySelector('.opblock-summary-method').textContent.toLowerCase(),"
        "block.querySelector('.opblock-summary-path').dataset.path])"
    )
    return ops


def test_docs_renders_every_route_in_chromium_and_requests_nothing_off_loopback(
    server: LiveServer, browser: Chromium
) -> None:
    document = httpx.get(f"{server.base_url}/openapi.json").json()
    documented = sorted([method, path] for path, ops in document["paths"].items() for method in ops)
    page = browser.open(f"{server.base_url}/docs")
    page.wait_for(f"document.querySelectorAll('.opblock').length === {len(documented)}")
    assert sorted(rendered_operations(page)) == documented
    assert ["post", "/v1/embeddings"] in documented
    assert page.evaluate("!!document.querySelector('.auth-wrapper .authorize')")  # the scheme's button
    urls = [request["url"] for request in page.requests]
    assert f"{server.base_url}/openapi.json" in urls
    assert f"{server.base_url}/docs/assets/swagger-ui-bundle.js" in urls
    off_loopback = [
        url for url in urls if urlsplit(url).scheme != "data" and urlsplit(url).hostname != "127.0.0.1"
    ]
    assert off_loopback == []


def _click(page: Page, selector: str) -> None:
    page.wait_for(f"!!document.querySelector({json.dumps(selector)})")
    page.evaluate(f"document.querySelector({json.dumps(selector)}).click()")


def _wait_for_status(page: Page, operation: str, status: str) -> None:
    page.wait_for(
        f"document.querySelector('{operation} .live-responses-table .response "
        f".response-col_status')?.textContent === '{status}'"
    )


def test_try_it_out_sends_the_authorized_key_as_a_bearer_header(
    server: LiveServer, browser: Chromium
) -> None:
    """Without a key the call is 401; after Authorize, the same call carries `Authorization: Bearer` and
    the page shows the server's 200 and its models."""
    page = browser.open(f"{server.base_url}/docs")
    operation = "#operations-default-list_models_v1_models_get"
    _click(page, f"{operation} .opblock-summary-control")
    _click(page, f"{operation} .try-out__btn")
    _click(page, f"{operation} .execute")
    _wait_for_status(page, operation, "401")

    _click(page, ".auth-wrapper .authorize")
    page.wait_for("!!document.querySelector('#auth-bearer-value')")
    # A React input: set its value through the native setter, then tell React with an input event.
    page.evaluate(
        "(() => { const input = document.querySelector('#auth-bearer-value');"
        "Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value')"
        f".set.call(input, {json.dumps(API_KEY)});"
        "input.dispatchEvent(new Event('input', {bubbles: true})); })()"
    )
    _click(page, ".auth-btn-wrapper .authorize")
    _click(page, ".auth-btn-wrapper .btn-done")
    _click(page, f"{operation} .execute")
    _wait_for_status(page, operation, "200")
    body = page.evaluate(
        f"document.querySelector('{operation} .live-responses-table .response "
        f".response-col_description').textContent"
    )
    assert "all-MiniLM-L6-v2" in body

    calls = [r for r in page.requests if r["url"] == f"{server.v1}/models"]
    assert len(calls) == 2
    headers = [{k.lower(): v for k, v in call.get("headers", {}).items()} for call in calls]
    assert "authorization" not in headers[0]
    assert headers[1]["authorization"] == f"Bearer {API_KEY}"
