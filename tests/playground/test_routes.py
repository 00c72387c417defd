"""The playground's HTTP side in-process: pages, CSP, the static mount's allow-list, vendored files."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import PurePosixPath

import pytest
from fastapi.testclient import TestClient

from service.api import Settings, create_app
from service.playground import PLAYGROUND_DIR
from tests.api.fakes import FakePool
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(), pool=FakePool())) as test_client:
        yield test_client


@pytest.mark.parametrize("path", ["/", "/docs"])
def test_pages_are_html_that_may_load_only_from_this_server(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"  # no inline scripts, no eval, no CDN
    assert directives["connect-src"] == "'self'"
    # Every script, style and link the page names is relative (served here), never http(s)://.
    references = re.findall(r'(?:src|href)="([^"]+)"', response.text)
    assert references and not [r for r in references if re.match(r"(https?:)?//", r)]


def test_the_page_names_its_assets_and_they_are_served(client: TestClient) -> None:
    page = client.get("/").text
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', page)
    assert {"static/app.js", "static/style.css", "static/vendor/uplot/uPlot.iife.min.js"} <= set(assets)
    for asset in assets:
        response = client.get("/" + asset)
        assert response.status_code == 200, asset
        assert response.content == (PLAYGROUND_DIR / asset.removeprefix("static/")).read_bytes()
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")


def test_docs_page_uses_the_vendored_swagger_ui_on_this_openapi(client: TestClient) -> None:
    page = client.get("/docs").text
    assert "static/vendor/swagger-ui/swagger-ui-bundle.js" in page
    assert 'url: "openapi.json"' in client.get("/static/docs.js").text
    schema = client.get("/openapi.json")
    assert schema.status_code == 200 and schema.json()["info"]["title"] == "tapeserve"
    # The HTML pages are not API operations.
    assert "/" not in schema.json()["paths"] and "/docs" not in schema.json()["paths"]


@pytest.mark.parametrize(
    "path", ["/static/__init__.py", "/static/__pycache__/__init__.cpython-311.pyc", "/static/nope.js"]
)
def test_static_mount_serves_web_assets_only(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "not_found"


def test_static_mount_does_not_leave_its_directory(client: TestClient) -> None:
    for path in ("/static/../api/app.py", "/static/%2e%2e/api/app.py", "/static/..%2fapi%2fapp.py"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "create_app" not in response.text


def test_vendored_versions_match_their_readme() -> None:
    readme = (PLAYGROUND_DIR / "vendor" / "README.md").read_text(encoding="utf-8")
    uplot = (PLAYGROUND_DIR / "vendor/uplot/uPlot.iife.min.js").read_text(encoding="utf-8")
    swagger = (PLAYGROUND_DIR / "vendor/swagger-ui/swagger-ui-bundle.js").read_text(encoding="utf-8")
    uplot_version = re.search(r"\| \[uplot\]\([^)]*\) \| ([\d.]+) \|", readme)
    swagger_version = re.search(r"\| \[swagger-ui-dist\]\([^)]*\) \| ([\d.]+) \|", readme)
    assert uplot_version and swagger_version
    assert f"(v{uplot_version.group(1)})" in uplot[:200]
    assert f'PACKAGE_VERSION:"{swagger_version.group(1)}"' in swagger
    for license_file in ("uplot/LICENSE", "swagger-ui/LICENSE", "swagger-ui/NOTICE"):
        assert (PLAYGROUND_DIR / "vendor" / license_file).stat().st_size > 0


def test_package_data_ships_every_static_file() -> None:
    """A wheel must carry the page: every non-Python file matches pyproject's package-data globs."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    globs = config["tool"]["setuptools"]["package-data"]["service.playground"]
    files = [
        PurePosixPath(p.relative_to(PLAYGROUND_DIR).as_posix())
        for p in PLAYGROUND_DIR.rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    ]
    assert files
    unshipped = [f for f in files if not any(_matches(f, g) for g in globs)]
    assert not unshipped, f"add to [tool.setuptools.package-data]: {unshipped}"


def _matches(path: PurePosixPath, pattern: str) -> bool:
    # setuptools globs: '**' spans directories; PurePath.full_match (3.13) is not available on 3.11.
    regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
    return re.fullmatch(regex, str(path)) is not None


def test_our_own_static_files_name_no_other_site() -> None:
    for name in ("index.html", "docs.html", "app.js", "docs.js", "style.css"):
        assert "://" not in (PLAYGROUND_DIR / name).read_text(encoding="utf-8"), name
