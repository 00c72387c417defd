"""Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, with a guard against outside requests.

Each test's page may talk to 127.0.0.1 only: every other request is aborted and recorded, and the
test fails if one was attempted (the playground and /docs must work in an air gap). Page errors
(uncaught exceptions, Content-Security-Policy refusals) fail the test too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# The flags the task asks for: no sandbox (root in a container), and no background traffic of its own.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


# Module scope, not session: while Playwright's sync API is open, its event loop counts as running in
# this thread, and every later test that calls asyncio.run() would fail.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (`make test` installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Guarded:
    """A page plus what it tried that it should not have."""

    page: Any
    context: Any
    outside_requests: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)


def open_guarded_page(browser: Any, viewport: dict[str, int] | None = None) -> Guarded:
    context = browser.new_context(viewport=viewport or {"width": 1400, "height": 1000})
    page = context.new_page()
    guarded = Guarded(page, context)

    def route(route: Any) -> None:
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1" or url.startswith("data:"):
            route.continue_()
        else:
            guarded.outside_requests.append(url)
            route.abort()

    context.route("**/*", route)
    page.on("pageerror", lambda error: guarded.page_errors.append(str(error)))
    return guarded


@pytest.fixture
def guarded(browser: Any) -> Iterator[Guarded]:
    guarded = open_guarded_page(browser)
    try:
        yield guarded
    finally:
        guarded.context.close()
    assert guarded.outside_requests == [], "the page tried to reach another host"
    assert guarded.page_errors == [], "the page raised errors"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Screenshots for a person to look at; the folder ignores itself in git."""
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n", encoding="utf-8")
    return ARTIFACTS
